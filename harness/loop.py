"""The training run, top to bottom: set up (or resume), train (accumulate, forward, backward, clip, step,
log, validate, keep the best, checkpoint), then evaluate the best model on test and write results.json.

The same loop fine-tunes classifiers and pre-trains encoders: a `Task` supplies what differs between them."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from accelerate.utils import gather_object
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from harness.checkpoint import (
    CheckpointError,
    export_model,
    find_resume_checkpoint,
    load_weights,
    prune_checkpoints,
    save_checkpoint,
    state_dict_copy,
    verify_checkpoint,
)
from harness.classification import ClassificationTask, TaskSetup
from harness.config import ConfigError, ExperimentConfig
from harness.console import RunLog, quiet_library_progress_bars
from harness.cpu_dropout import use_fast_cpu_dropout
from harness.data.sampler import StepLayout, plan_epoch, rank_micro_batches, step_example_count
from harness.distributed import (
    TRACKER_DIR,
    RunPlace,
    StopRequest,
    agree,
    build_accelerator,
    memory_report,
    precision_warning,
    torch_optimizer,
    zero_stage,
)
from harness.evaluation import is_improvement
from harness.faults import injected_nan_steps
from harness.model import compile_model, compiled_graph_count, max_positions, parameter_groups
from harness.optim import build_optimizer, build_scheduler
from harness.throughput import flop_counter_for, quick_peak_flops

RUN_FILES = ("config.yaml", "metrics.jsonl", "results.json", "best", "final", "checkpoints", "exit_status.json",
             TRACKER_DIR)  # fmt: skip
BEST_IN_CHECKPOINT = "best_model.safetensors"
EXIT_REQUEUE = 75  # sysexits' EX_TEMPFAIL: stopped by a signal after a checkpoint; run again to resume


class Preempted(Exception):
    """Stopped by SIGTERM/SIGUSR1 after writing a checkpoint; the same command resumes the run."""


class NonFiniteLoss(RuntimeError):
    """Too many consecutive non-finite losses; the last good checkpoint is left intact."""


class Task(Protocol):
    """What differs between kinds of training (fine-tuning: `harness.classification.ClassificationTask`,
    pre-training: `harness.mlm.MaskedLMTask`)."""

    name: str

    def setup(self, accelerator) -> TaskSetup:
        """Tokenizer, model and tokenized splits (train, validation, and optionally test)."""

    def train_collator(self, epoch: int) -> Callable:
        """Turns a micro-batch of split items into model inputs plus `labels` and `index`."""

    def step_weight(self, global_step: list[list[int]], epoch: int) -> int:
        """What a step's summed loss is divided by (examples, or predicted tokens), over all its micro-batches
        on all ranks, computed identically on every rank without communication."""

    def loss_sum(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        """The micro-batch's summed (not averaged) loss."""

    def evaluate(self, model: torch.nn.Module, split) -> dict:
        """Scores of the split, identical on every rank; `loss` and the selection metric among them."""

    def summary(self, scores: dict) -> str:
        """The scores in one log line."""


def every_n_steps(step: int, n: int) -> bool:
    return n > 0 and step % n == 0


@dataclass
class BestSoFar:
    """The best validation result so far and the early-stopping count."""

    metric: str
    value: float | None = None
    step: int = -1
    validation: dict | None = None
    evals_without_improvement: int = 0

    def update(self, step: int, scores: dict) -> bool:
        if is_improvement(scores[self.metric], self.value, self.metric):
            self.value, self.step, self.validation = scores[self.metric], step, scores
            self.evals_without_improvement = 0
            return True
        self.evals_without_improvement += 1
        return False


@dataclass
class TrainState:
    """Progress a resumed run needs besides model, optimizer, scheduler and RNG (saved in trainer_state.json)."""

    step: int = 0
    epoch: int = 0
    position: int = 0
    """Global steps of the current epoch plan already run."""
    consumed_before_plan: list[int] | None = None
    """Examples of this epoch consumed before the current plan (only after resuming with another world size)."""
    layout: list[int] = field(default_factory=list)
    """[batch_size, world_size, grad_accum, max_tokens] the plan was made with (older checkpoints: 3 values)."""
    examples_seen: int = 0
    tokens_seen: int = 0
    window_loss_per_rank: list[float] = field(default_factory=list)
    """Each rank's summed loss since the last train log line."""
    window_weight: int = 0
    """What the window's summed loss is divided by: the steps' weights (examples, or predicted tokens)."""
    nonfinite_streak: int = 0
    skipped_steps: int = 0
    last_eval_step: int = -1
    best: dict = field(default_factory=dict)


def layout_list(layout: StepLayout) -> list[int]:
    return [layout.batch_size, layout.world_size, layout.grad_accum, layout.max_tokens]


def epoch_plan(lengths: np.ndarray, layout: StepLayout, cfg: ExperimentConfig, epoch: int, exclude) -> list:
    """The epoch's global steps; with `exclude`, a plan over the examples not yet consumed this epoch."""
    if not exclude:
        return plan_epoch(lengths, layout, cfg.seed, epoch, cfg.data.bucket_size_multiplier)
    remaining = np.setdiff1d(np.arange(len(lengths)), np.asarray(exclude))
    plan = plan_epoch(lengths[remaining], layout, cfg.seed, epoch, cfg.data.bucket_size_multiplier)
    return [[remaining[mb].tolist() for mb in step] for step in plan]


def prepare_output_dir(cfg: ExperimentConfig, warn) -> tuple[Path, tuple[Path, dict] | None]:
    """Decide between a fresh start and a resume, refusing anything that would lose a user's files.

    Returns the output folder and, when resuming, the checkpoint and its manifest."""
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError([f"output_dir {out}: exists and is not a folder"])
    resume = cfg.checkpoint.resume
    if resume not in ("auto", "none") and not cfg.overwrite:
        try:
            return out, (Path(resume), verify_checkpoint(Path(resume)))
        except CheckpointError as exc:
            raise ConfigError([f"checkpoint.resume: {exc}"]) from exc
    if resume == "auto" and not cfg.overwrite:
        found = find_resume_checkpoint(out / "checkpoints", warn)
        if found is not None:
            return out, found
    if out.is_dir() and any(out.iterdir()) and not cfg.overwrite:
        raise ConfigError(
            [f"output_dir {out}: not empty and holds no checkpoint to resume; pass overwrite=true to replace it"]
        )
    return out, None


def report_memory(accelerator, model, optimizer, log: RunLog) -> None:
    """Per-rank parameter / gradient / optimizer-state bytes, so users see what each ZeRO stage buys them."""
    per_rank = gather_object([memory_report(accelerator, model, optimizer)])
    mib = 2**20
    for rank, row in enumerate(per_rank):
        log.info(
            f"memory rank {rank}: parameters {row['parameters'] / mib:.2f} MiB, gradients "
            f"{row['gradients'] / mib:.2f} MiB, optimizer state {row['optimizer_state'] / mib:.2f} MiB, "
            f"fp32 master {row['fp32_master'] / mib:.2f} MiB"
        )
    log.record("memory", per_rank=per_rank)


def run_peak_flops(cfg: ExperimentConfig, accelerator) -> float:
    """Peak FLOP/s of all processes together: logging.peak_tflops per process, or each process's measured
    matmul peak (measured at the same time on every rank, so CPU ranks share the cores as in training)."""
    if cfg.logging.peak_tflops > 0:
        return cfg.logging.peak_tflops * 1e12 * accelerator.num_processes
    accelerator.wait_for_everyone()
    return float(sum(gather_object([quick_peak_flops(accelerator.device, cfg.train.precision)])))


def throughput_results(flops_done: float, train_seconds: float, peak_flops: float | None, cfg) -> dict:
    """results.json's MFU fields (absent for models whose FLOPs the config does not tell)."""
    if not peak_flops or train_seconds <= 0:
        return {}
    return {
        "train_tflops_per_s": flops_done / train_seconds / 1e12,
        "train_mfu": flops_done / train_seconds / peak_flops,
        "peak_tflops": peak_flops / 1e12,
        "peak_source": "logging.peak_tflops" if cfg.logging.peak_tflops > 0 else "measured",
    }


def run(cfg: ExperimentConfig, task: Task | None = None) -> dict:
    task = task or ClassificationTask(cfg)
    t_start = time.monotonic()
    quiet_library_progress_bars()
    stop = StopRequest(EXIT_REQUEUE).install()
    early_warnings: list[str] = []
    out, resume_from = prepare_output_dir(cfg, early_warnings.append)
    accelerator = build_accelerator(cfg)
    world, rank = accelerator.num_processes, accelerator.process_index
    log = RunLog(out, accelerator.is_main_process, rank, cfg.logging.progress)
    slow_precision = precision_warning(accelerator.device, cfg.train.precision)
    for message in early_warnings + ([slow_precision] if slow_precision else []):
        log.warn(message)

    # ---- data and model: every rank validates its inputs, so bad input fails everywhere before any work ----
    setup = task.setup(accelerator)
    tokenizer, model = setup.tokenizer, setup.model
    limit = max_positions(model, tokenizer)
    if cfg.data.max_length > limit:
        raise ConfigError([f"data.max_length: {cfg.data.max_length} exceeds the model's limit of {limit} tokens"])
    train_split, val_split = setup.splits["train"], setup.splits["validation"]
    test_split = setup.splits.get("test")  # pre-training has none

    layout = StepLayout(cfg.train.batch_size, world, cfg.train.grad_accum, cfg.train.max_tokens_per_batch)
    per_epoch = len(epoch_plan(train_split.lengths, layout, cfg, 0, None))
    if per_epoch == 0 and cfg.train.max_steps != 0:
        raise ConfigError(
            [f"data: {len(train_split)} training examples cannot fill one step of {layout.micro_batches} micro-batches"]
        )

    # ---- where training starts: fresh, or from a checkpoint (its trainer state, checked for compatibility) ----
    state = TrainState(layout=layout_list(layout))
    if resume_from is not None:
        state = restore_trainer_state(resume_from, cfg, layout, train_split.lengths, accelerator, log)
    remaining_this_epoch = len(epoch_plan(train_split.lengths, layout, cfg, state.epoch, state.consumed_before_plan))
    if cfg.train.max_steps >= 0:
        total_steps = cfg.train.max_steps
    else:  # epochs: what is left of this epoch plus the epochs after it
        later = range(state.epoch + 1, cfg.train.epochs)  # planned: with a token budget their sizes differ
        total_steps = (
            state.step
            + remaining_this_epoch
            - state.position
            + sum(len(epoch_plan(train_split.lengths, layout, cfg, epoch, None)) for epoch in later)
        )

    if accelerator.device.type == "cpu" and cfg.train.fast_cpu_dropout and not cfg.train.compile:
        swapped = use_fast_cpu_dropout(model)  # compiled graphs draw their own masks: leave those to inductor
        log.info(f"fast CPU dropout: {swapped['dropout_modules']} dropout modules, "
                 f"{swapped['attention_models']} attention implementation(s) swapped")  # fmt: skip
    flop_counter = flop_counter_for(model)  # before prepare: ZeRO-3 partitions the parameters
    optimizer = build_optimizer(parameter_groups(model, cfg.train.weight_decay), cfg.train, accelerator.device)
    model, optimizer = accelerator.prepare(model, optimizer)
    if cfg.train.compile:
        compile_model(accelerator.unwrap_model(model))  # compiled lazily, at the first forward
    peak_flops = run_peak_flops(cfg, accelerator) if flop_counter is not None and total_steps > 0 else None
    scheduler = build_scheduler(torch_optimizer(optimizer), cfg.train, max(total_steps, 1))
    accelerator.register_for_checkpointing(scheduler)

    # ---- run files: written only now, after every input has been checked ----
    best = BestSoFar(**state.best) if state.best else BestSoFar(cfg.eval.metric)
    best_state: dict[str, torch.Tensor] | None = None
    if resume_from is None:
        if accelerator.is_main_process:
            out.mkdir(parents=True, exist_ok=True)
            for name in RUN_FILES:
                target = out / name
                shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
            (out / "config.yaml").write_text(cfg.to_yaml())
        accelerator.wait_for_everyone()
    else:
        checkpoint_dir, _ = resume_from
        accelerator.load_state(str(checkpoint_dir / "state"))  # model, optimizer, scheduler, scaler, RNG
        if (checkpoint_dir / BEST_IN_CHECKPOINT).is_file():
            best_state = load_file(str(checkpoint_dir / BEST_IN_CHECKPOINT))
        if accelerator.is_main_process:
            out.mkdir(parents=True, exist_ok=True)  # resuming from checkpoint.resume=<folder> into a new run
            (out / "config.yaml").write_text(cfg.to_yaml())
            (out / "exit_status.json").unlink(missing_ok=True)  # this run writes its own
        log.truncate_after(state.step)  # rows the interrupted run logged after its checkpoint are redone
    if cfg.logging.trackers:  # TensorBoard & co. receive every train / eval record from here on
        accelerator.init_trackers(out.name, config=flat_scalars(cfg.to_dict()))
        log.attach_tracker(accelerator.log)
    place = RunPlace.of(accelerator, cfg.train.precision)
    log.info(
        f"world size {world} ({place.distributed_type}, {place.backend or 'no backend'}) on {place.device} "
        f"({place.threads} threads per process), "
        f"precision {cfg.train.precision}; {task.name}; train/validation/test = "
        f"{len(train_split)}/{len(val_split)}/{len(test_split) if test_split else '-'}; {per_epoch} steps per epoch of "
        f"{layout.examples_per_step} examples; {total_steps} steps"
    )
    log.record(
        "setup",
        total_steps=total_steps,
        steps_per_epoch=per_epoch,
        resumed_from_step=state.step if resume_from else None,
        **asdict(place),
    )

    def validate_and_keep_best(epoch: float) -> bool:
        """Validate; export the model to best/ when it improves. Returns True when early stopping says stop."""
        nonlocal best_state
        scores = task.evaluate(model, val_split)
        improved = best.update(state.step, scores)
        state.last_eval_step = state.step
        log.record("eval", split="validation", step=state.step, epoch=round(epoch, 4), **scores)
        log.info(f"validation @ step {state.step}: {task.summary(scores)}" + ("  (best)" if improved else ""))
        if improved:
            best_state = state_dict_copy(accelerator, model)
            export_model(accelerator, model, tokenizer, best_state, out / "best")
        return 0 < cfg.eval.patience <= best.evals_without_improvement

    def checkpoint(reason: str) -> Path:
        state.best = asdict(best)
        state.window_loss_per_rank = [float(v) for v in gather_object([window_loss.item()])]
        path = save_checkpoint(
            accelerator, out / "checkpoints", state.step, asdict(state),
            {"epoch": state.epoch, "position": state.position, "world_size": world, "reason": reason,
             "config_fingerprint": cfg.fingerprint(), "model": cfg.model.name_or_path, "zero_stage": zero_stage(accelerator)},
            extra_weights={BEST_IN_CHECKPOINT: best_state} if best_state is not None else None,
        )  # fmt: skip
        if accelerator.is_main_process:
            prune_checkpoints(out / "checkpoints", cfg.checkpoint.keep_last, protected_steps={best.step})
        log.record("checkpoint", step=state.step, path=str(path), reason=reason)
        return path

    # ---- training ----
    nan_steps = injected_nan_steps()
    window_loss = torch.tensor(state.window_loss_per_rank[rank] if state.window_loss_per_rank else 0.0,
                               device=accelerator.device)  # summed on the device; read at log time only  # fmt: skip
    last_checkpoint_time = time.monotonic()
    stop_early = False
    model.train()
    log.start_progress(total_steps)
    log.advance(state.step, total_steps, None)
    t_train = time.monotonic()
    examples_at_start, tokens_at_start = state.examples_seen, state.tokens_seen
    flops_done = 0.0  # model FLOPs of the real tokens trained on since this (re)start
    while state.step < total_steps and not stop_early:
        plan = epoch_plan(train_split.lengths, layout, cfg, state.epoch, state.consumed_before_plan)
        todo = plan[state.position :][: total_steps - state.step]
        my_batches = [mb for global_step in todo for mb in rank_micro_batches(global_step, layout, rank)]
        loader = DataLoader(
            train_split,
            batch_sampler=my_batches,
            collate_fn=task.train_collator(state.epoch),
            num_workers=cfg.data.num_workers,
            pin_memory=accelerator.device.type == "cuda",
            generator=torch.Generator(),  # never draw from the global RNG: dropout masks stay resumable
        )
        batches = iter(loader)
        for global_step in todo:
            # The loss of a step is normalised over all of it: every micro-batch on every rank. Accelerate
            # divides each backward by grad_accum and DDP averages gradients over ranks, so scale the summed
            # loss by world x grad_accum / (the step's weight) to get exactly sum / weight.
            step_examples = step_example_count(global_step)
            step_weight = task.step_weight(global_step, state.epoch)
            loss_scale = world * cfg.train.grad_accum / max(1, step_weight)
            step_loss = torch.zeros((), device=accelerator.device)
            for _ in range(cfg.train.grad_accum):
                batch = {k: v.to(accelerator.device, non_blocking=True) for k, v in next(batches).items()}
                with accelerator.accumulate(model):  # no gradient sync until the step's last micro-batch
                    loss_sum = task.loss_sum(model, batch)
                    if state.step + 1 in nan_steps:
                        loss_sum = loss_sum * float("nan")  # fault injection for tests (HARNESS_INJECT_NAN_STEPS)
                    accelerator.backward(loss_sum * loss_scale)
                step_loss += loss_sum.detach()

            # Host sync, once per step: every rank agrees on a stop signal, a non-finite loss, a timed checkpoint.
            stop_now, nonfinite, time_due = agree(accelerator, [
                stop.requested,
                not bool(torch.isfinite(step_loss)),
                every_minutes_due(last_checkpoint_time, cfg.checkpoint.every_minutes),
            ])  # fmt: skip
            if nonfinite:
                handle_nonfinite(state, accelerator, cfg, log)
            else:
                # Accelerate's accumulation counter is at a step boundary: gradients are synchronised.
                if cfg.train.max_grad_norm > 0:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.train.max_grad_norm)
                optimizer.step()
                scheduler.step()
                state.nonfinite_streak = 0
                window_loss += step_loss
            optimizer.zero_grad(set_to_none=True)

            state.step += 1
            state.position += 1
            if state.step == 1:
                report_memory(accelerator, model, optimizer, log)
            state.examples_seen += step_examples
            step_lengths = train_split.lengths[np.concatenate(global_step)]  # every rank's examples
            state.tokens_seen += int(step_lengths.sum())
            flops_done += flop_counter.flops(step_lengths) if flop_counter is not None else 0.0
            state.window_weight += step_weight
            epoch_progress = state.epoch + state.position / len(plan)

            log_values = None
            if every_n_steps(state.step, cfg.logging.every_steps) or state.step == total_steps:
                # Host sync: the window's summed loss from every rank.
                loss = accelerator.reduce(window_loss, reduction="sum").item() / max(1, state.window_weight)
                elapsed = time.monotonic() - t_train
                log_values = {
                    "loss": loss,
                    "lr": scheduler.get_last_lr()[0],
                    "samples/s": (state.examples_seen - examples_at_start) / elapsed,
                    "tokens/s": (state.tokens_seen - tokens_at_start) / elapsed,
                }
                mfu = {}
                if peak_flops:
                    mfu = {"tflops_per_s": flops_done / elapsed / 1e12, "mfu": flops_done / elapsed / peak_flops}
                    log_values["mfu"] = f"{100 * mfu['mfu']:.1f}%"
                grad = float(grad_norm) if cfg.train.max_grad_norm > 0 and not nonfinite else None
                log.record(
                    "train", split="train", step=state.step, epoch=round(epoch_progress, 4), loss=loss,
                    lr=log_values["lr"], grad_norm=grad, samples_per_s=log_values["samples/s"],
                    tokens_per_s=log_values["tokens/s"], **mfu, skipped_steps=state.skipped_steps,
                )  # fmt: skip
                window_loss.zero_()
                state.window_weight = 0
            log.advance(state.step, total_steps, log_values)

            end_of_epoch = state.position == len(plan)
            if every_n_steps(state.step, cfg.eval.every_steps) or end_of_epoch:
                stop_early = validate_and_keep_best(epoch_progress)
            if end_of_epoch:
                state.epoch, state.position, state.consumed_before_plan = state.epoch + 1, 0, None
            if stop_now:
                path = checkpoint(f"signal {stop.signal_name}")
                log.stop_progress()
                log.info(f"{stop.signal_name}: checkpoint {path} written {time.monotonic() - stop.requested_at:.1f} s "
                         f"after the signal; exiting with code {EXIT_REQUEUE} (run the same command to resume)")  # fmt: skip
                log.record("preempted", step=state.step, signal=stop.signal_name,
                           seconds_to_checkpoint=round(time.monotonic() - stop.requested_at, 3))  # fmt: skip
                raise Preempted(str(path))
            if (
                every_n_steps(state.step, cfg.checkpoint.every_steps)
                or time_due
                or (end_of_epoch and cfg.checkpoint.at_epoch_end and state.step < total_steps)
            ):
                checkpoint("periodic" if not end_of_epoch else "epoch end")
                last_checkpoint_time = time.monotonic()
            if stop_early:
                log.info(f"early stopping: no improvement in {cfg.eval.patience} validations")
                break
    train_seconds = time.monotonic() - t_train
    log.stop_progress()
    if cfg.train.compile:
        log.info(f"torch.compile: {compiled_graph_count()} graph(s) compiled for training and validation")

    # ---- the last state to final/, the best model on test ----
    export_model(accelerator, model, tokenizer, state_dict_copy(accelerator, model), out / "final")
    if state.last_eval_step != state.step:  # evaluate-only runs (max_steps=0), or a run cut short by max_steps
        validate_and_keep_best(float(state.epoch))
    if best.step != state.step:
        load_weights(accelerator, model, best_state)
        log.info(f"loaded the best model (step {best.step}, validation {best.metric} {best.value:.4f}) for test")
    final_scores = {"validation": best.validation}
    if test_split is not None:
        final_scores["test"] = task.evaluate(model, test_split)
        log.record("eval", split="test", step=best.step, **final_scores["test"])
    log.metrics_table("best model", final_scores)

    trained = state.examples_seen - examples_at_start
    results = {
        "task": task.name,
        **({"test": final_scores["test"]} if test_split is not None else {}),
        "best": {"step": best.step, "metric": best.metric, "value": best.value, "validation": best.validation},
        "world_size": world,
        "optimizer_steps": state.step,
        "skipped_steps": state.skipped_steps,
        "epochs_completed": round(state.examples_seen / max(1, len(train_split)), 4),
        "train_examples_seen": state.examples_seen,
        "wall_seconds": round(time.monotonic() - t_start, 3),
        "train_seconds": round(train_seconds, 3),
        "train_samples_per_s": trained / train_seconds if trained else 0.0,
        "train_tokens_per_s": (state.tokens_seen - tokens_at_start) / train_seconds if trained else 0.0,
        **throughput_results(flops_done, train_seconds, peak_flops, cfg),
        "resumed_from_step": resume_from[1]["step"] if resume_from else None,
        **({"compiled_graphs": compiled_graph_count()} if cfg.train.compile else {}),
        "precision": cfg.train.precision,
        "model": cfg.model.name_or_path,
        "config_fingerprint": cfg.fingerprint(),
    }
    if accelerator.is_main_process:
        (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return results


def flat_scalars(tree: dict, prefix: str = "") -> dict[str, int | float | str | bool]:
    """The config as flat `section.key` scalars (what trackers' hyper-parameter tables accept)."""
    flat: dict[str, int | float | str | bool] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flat_scalars(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


def every_minutes_due(since: float, minutes: float) -> bool:
    return minutes > 0 and time.monotonic() - since >= minutes * 60


def handle_nonfinite(state: TrainState, accelerator, cfg: ExperimentConfig, log: RunLog) -> None:
    """Skip a step whose loss is not finite (its gradients are dropped); stop after too many in a row."""
    if zero_stage(accelerator):
        # DeepSpeed applies the update inside backward, before the loss can be checked.
        raise NonFiniteLoss(f"non-finite loss at step {state.step + 1} under DeepSpeed, which has already applied it; "
                            "resume from the last checkpoint with a lower train.lr")  # fmt: skip
    state.nonfinite_streak += 1
    state.skipped_steps += 1
    log.warn(f"step {state.step + 1}: non-finite loss, update skipped ({state.nonfinite_streak} in a row)")
    if state.nonfinite_streak >= cfg.runtime.max_nonfinite_steps:
        raise NonFiniteLoss(
            f"{state.nonfinite_streak} consecutive non-finite losses (runtime.max_nonfinite_steps); stopping. "
            "The last checkpoint is intact: lower train.lr or check the data, then resume."
        )


def restore_trainer_state(resume_from, cfg, layout: StepLayout, lengths, accelerator, log: RunLog) -> TrainState:
    """Read trainer_state.json and check the checkpoint fits this run; map a world-size change onto samples."""
    path, manifest = resume_from
    problems = []
    if manifest.get("model") != cfg.model.name_or_path:
        problems.append(f"model.name_or_path: the checkpoint {path} trained {manifest.get('model')!r}, "
                        f"this run asks for {cfg.model.name_or_path!r}")  # fmt: skip
    if manifest.get("zero_stage", 0) != zero_stage(accelerator):
        problems.append(f"ZeRO stage: the checkpoint {path} was saved under stage {manifest.get('zero_stage', 0)}, "
                        f"this run uses stage {zero_stage(accelerator)}; resume it with the same launch config")  # fmt: skip
    elif manifest.get("world_size") != layout.world_size and zero_stage(accelerator):
        problems.append(f"world size: the checkpoint {path} holds ZeRO state sharded over "
                        f"{manifest.get('world_size')} ranks; resume it with that many processes")  # fmt: skip
    if problems:
        raise ConfigError(problems, "resume")
    state = TrainState(**json.loads((path / "trainer_state.json").read_text()))
    old = StepLayout(*state.layout)
    if old != layout:
        # Continue from the same global sample position: what the old plan consumed this epoch is excluded.
        old_plan = epoch_plan(lengths, old, cfg, state.epoch, state.consumed_before_plan)
        consumed = list(state.consumed_before_plan or []) + [
            i for s in old_plan[: state.position] for mb in s for i in mb
        ]
        log.info(f"resuming with batch/world/accum {layout.batch_size}/{layout.world_size}/{layout.grad_accum} "
                 f"(was {old.batch_size}/{old.world_size}/{old.grad_accum}): continuing epoch {state.epoch} after "
                 f"its first {len(consumed)} examples")  # fmt: skip
        state.consumed_before_plan, state.position = consumed, 0
        state.layout = layout_list(layout)
        state.window_loss_per_rank = [sum(state.window_loss_per_rank)] + [0.0] * (layout.world_size - 1)
    log.info(f"resuming from {path} (step {state.step}, epoch {state.epoch}, position {state.position})")
    return state
