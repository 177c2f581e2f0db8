"""The training run: `setup` (or resume), `train`, `finish` (the best model on test, results.json).

The same loop fine-tunes classifiers and pre-trains encoders: a `Task` (harness/tasks/) supplies what differs.
Components own their concerns and decide for themselves when they are due: `CheckpointManager` (saving,
resume, the best weights), `Validator` (validation, model selection, early stopping), `ThroughputMeter`
(samples/s, tokens/s, MFU over training steps only), `LossWindow` (the logged loss), `RunPlace` (where the run
executes). `train` itself says what happens at a step.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch.utils.data import DataLoader

from harness.card import write_model_cards
from harness.checkpoint import (
    CheckpointManager,
    ResumePoint,
    TrainState,
    decide_resume,
    layout_list,
    start_description,
)
from harness.config import ConfigError, ExperimentConfig
from harness.console import LossWindow, RunLog, quiet_library_progress_bars
from harness.cpu_dropout import use_fast_cpu_dropout
from harness.data.sampler import EpochPlanner, StepLayout, rank_micro_batches, step_example_count
from harness.distributed import (
    Preempted,
    RunPlace,
    SavedActivations,
    StopRequest,
    agree,
    build_accelerator,
    deepspeed_grad_norm,
    deepspeed_overflow,
    keep_freed_cpu_memory,
    memory_report,
    micro_batch,
    precision_warning,
    prepare,
    release_setup_memory,
    torch_optimizer,
    wait_for_everyone_untimed,
)
from harness.evaluation import BestSoFar
from harness.faults import inject_fault, injected_faults, pause
from harness.fsdp import full, shard_model
from harness.model import (
    attention_in_use,
    compile_model,
    compiled_graph_count,
    describe_learning_rates,
    describe_weight_decay,
    enable_gradient_checkpointing,
    max_positions,
    parameter_groups,
)
from harness.optim import build_optimizer, build_scheduler
from harness.push import PushError, hub_ready, push
from harness.report import write_report
from harness.rundir import PREDICTIONS_FILE, RunDirectory, remove_run_files
from harness.tasks import Task, TaskSetup
from harness.tasks.classification import ClassificationTask
from harness.throughput import NetworkMeter, ThroughputMeter, flop_counter_for, run_peak_flops
from harness.tracking import close_trackers, log_run_files, start_trackers
from harness.trial import Pruned, SearchTrial


class NonFiniteLoss(RuntimeError):
    """Too many consecutive non-finite losses; the last good checkpoint is left intact."""


def every_n_steps(step: int, n: int) -> bool:
    return n > 0 and step % n == 0


@dataclass
class Run:
    """Everything `train` and `finish` work with, built by `setup`."""

    cfg: ExperimentConfig
    task: Task
    ctx: TaskSetup
    accelerator: Accelerator
    place: RunPlace
    log: RunLog
    out: Path
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    state: TrainState
    planner: EpochPlanner
    total_steps: int
    checkpoints: CheckpointManager
    validator: Validator
    meter: ThroughputMeter
    window: LossWindow
    stop: StopRequest
    resumed_from: ResumePoint | None
    started: float
    activations: SavedActivations = field(default_factory=SavedActivations)
    """What the run's first forward keeps for backward (the memory line)."""
    trial: SearchTrial | None = field(default_factory=SearchTrial.from_env)
    """The Optuna trial this run is, in a search (`python -m launch search`); None otherwise."""
    network: NetworkMeter | None = None
    """This process's TCP payload bytes per step in the train records (logging.network_bytes)."""


def run(cfg: ExperimentConfig, task: Task | None = None) -> dict:
    r = setup(cfg, task or ClassificationTask(cfg))
    try:
        train(r)
        return finish(r)
    except BaseException as exc:  # the trackers keep what they were sent, and say how the attempt ended
        close_trackers(r.accelerator, "KILLED" if isinstance(exc, (Preempted, Pruned)) else "FAILED")
        raise


# ----------------------------------------------------------------------------------------------------
# setup
# ----------------------------------------------------------------------------------------------------


def setup(cfg: ExperimentConfig, task: Task) -> Run:
    """Every input checked (on every rank, so bad input fails everywhere before any work), the model prepared,
    the run's files started or its checkpoint loaded."""
    started = time.monotonic()
    quiet_library_progress_bars()
    if cfg.hub.push_to:  # a push the end could not make: refused now, before any work
        try:
            hub_ready()
        except PushError as exc:
            raise ConfigError([f"hub.push_to={cfg.hub.push_to}: {exc}"]) from exc
    stop = StopRequest().install()  # phase setup: a signal stops the run at once
    accelerator, place = build_accelerator(cfg)
    # One shared folder, one run in it, a finished run left alone; then the start decided once, by rank 0.
    rundir = RunDirectory.claim(cfg, accelerator, place.job)
    early_warnings: list[str] = []
    resume = decide_resume(cfg, accelerator, place, early_warnings.append, rundir.last)
    out = Path(cfg.output_dir)
    log = RunLog(out, place.is_main, place.rank, cfg.logging.progress)
    slow_precision = precision_warning(place.device, place.precision)
    for message in early_warnings + ([slow_precision] if slow_precision else []):
        log.warn(message)

    ctx = task.setup(accelerator, place)
    # Ranks that read a warm tokenization cache wait here for those that tokenize (a node-local cache may be cold on
    # one node only), with no time limit: the next collectives are bounded by runtime.collective_timeout_s.
    wait_for_everyone_untimed(accelerator, "data setup")
    pause("setup")  # fault injection for tests: a signal before the first step
    limit = max_positions(ctx.model, ctx.tokenizer)
    if cfg.data.max_length > limit:
        raise ConfigError([f"data.max_length: {cfg.data.max_length} exceeds the model's limit of {limit} tokens"])
    train_split = ctx.splits["train"]
    layout = StepLayout(cfg.train.batch_size, place.world_size, cfg.train.grad_accum, cfg.train.max_tokens_per_batch)
    planner = EpochPlanner(train_split.lengths, layout, cfg.seed, cfg.data.bucket_size_multiplier)
    per_epoch = len(planner.plan(0))
    if per_epoch == 0 and cfg.train.max_steps != 0:
        raise ConfigError(
            [f"data: {len(train_split)} training examples cannot fill one step of {layout.micro_batches} micro-batches"]
        )

    checkpoints = CheckpointManager(cfg, accelerator, place, log, stop, ctx.tokenizer, ctx.serving, ctx.export_weights)
    state = TrainState(layout=layout_list(layout))
    if resume is not None:
        state = checkpoints.restore_state(resume, layout, planner)
    state.best = state.best or BestSoFar(cfg.eval.metric)
    window = LossWindow(accelerator, state.window_loss_per_rank, state.window_weight)
    total_steps = cfg.train.max_steps if cfg.train.max_steps >= 0 else state.step + planner.steps_left(
        state.epoch, state.position, state.consumed_before_plan, cfg.train.epochs)  # fmt: skip

    model = ctx.model
    if place.fast_cpu_dropout:
        swapped = use_fast_cpu_dropout(model)
        kept = f"; kept: {', '.join(swapped['kept'])}" if swapped["kept"] else ""
        log.info(f"fast CPU dropout: {swapped['dropout_modules']} dropout modules, "
                 f"{swapped['attention_models']} attention implementation(s) swapped{kept}")  # fmt: skip
    flop_counter = flop_counter_for(model)  # before prepare: ZeRO-3 partitions the parameters
    if cfg.train.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if place.fsdp is not None:  # FSDP2: sharded now, so that the optimizer is built on the shards
        model = shard_model(model, place.fsdp, place.precision, place.device)
    groups = parameter_groups(model, cfg.train.weight_decay, cfg.train.lr, cfg.train.layer_lr_decay)
    # Described now: the optimizer and its schedule change the groups' "lr" in place (DeepSpeed keeps our dicts).
    group_rows = [{"name": g["name"], "lr": g["lr"], "weight_decay": g["weight_decay"], "params": g["param_names"]}
                  for g in groups]  # fmt: skip
    optimizer_text = f"learning rates: {describe_learning_rates(groups)}; {describe_weight_decay(groups)}"
    optimizer = build_optimizer(groups, cfg.train, place.device)
    optimizer_text = f"AdamW ({'fused' if optimizer.defaults.get('fused') else 'foreach'}); {optimizer_text}"
    attention = attention_in_use(model)
    model, optimizer = prepare(accelerator, place, model, optimizer)
    checkpoints.track(model, optimizer)
    if cfg.train.compile:
        compile_model(accelerator.unwrap_model(model))  # compiled lazily, at the first forward
    peak, peak_source = None, ""
    if flop_counter is not None and total_steps > 0:
        peak, peak_source = run_peak_flops(accelerator, place.precision, cfg.logging.peak_tflops)
    scheduler = build_scheduler(torch_optimizer(optimizer), cfg.train, max(total_steps, 1))
    accelerator.register_for_checkpointing(scheduler)

    start_run_files(cfg, accelerator, place, out, resume, checkpoints, log, state)
    rundir.announce(start_description(resume))
    if cfg.logging.trackers:  # TensorBoard, MLflow & co. receive every train / eval record from here on
        for place_text in start_trackers(accelerator, cfg, out, resuming=resume is not None):
            log.info(f"tracking: {place_text}")
        log.attach_tracker(accelerator.log)
    splits = "/".join(str(len(ctx.splits[s])) if s in ctx.splits else "-" for s in ("train", "validation", "test"))
    log.info(f"{place.describe()}; {task.name}; train/validation/test = {splits}; {per_epoch} steps per epoch "
             f"of {layout.examples_per_step} examples; {total_steps} steps")  # fmt: skip
    log.record("setup", total_steps=total_steps, steps_per_epoch=per_epoch,
               resumed_from_step=state.step if resume else None, **place.record())  # fmt: skip
    log.info(f"attention: {attention}; {optimizer_text}")
    log.record("optimizer", layer_lr_decay=cfg.train.layer_lr_decay, attention=attention, groups=group_rows)
    if flop_counter is not None:
        per_token, per_sample = (
            flop_counter.per_token(train_split.lengths),
            flop_counter.per_sample(train_split.lengths),
        )
        log.info(f"MFU counts {per_token:.3g} training FLOPs per token, {per_sample:.3g} per sample "
                 f"(the training split's mean length, {train_split.lengths.mean():.0f} tokens)")  # fmt: skip
        log.record("flops", per_token=per_token, per_sample=per_sample, dense_weights=flop_counter.dense,
                   head_weights=flop_counter.head)  # fmt: skip
    release_setup_memory()  # the raw texts, and what tokenizing them took
    if place.keep_freed_memory:
        keep_freed_cpu_memory()
    meter = ThroughputMeter(flop_counter, peak, peak_source)
    validator = Validator(cfg, task, ctx, checkpoints, log, meter)
    return Run(cfg, task, ctx, accelerator, place, log, out, model, optimizer, scheduler, state, planner,
               total_steps, checkpoints, validator, meter, window, stop, resume, started)  # fmt: skip


def start_run_files(cfg, accelerator, place, out: Path, resume, checkpoints, log: RunLog, state: TrainState) -> None:
    """Written only now, after every input has been checked: a fresh run replaces the previous run's files; a
    resumed one loads its checkpoint and drops what the interrupted run logged after it."""
    if resume is None or resume.replaces_run:
        if place.is_main:
            out.mkdir(parents=True, exist_ok=True)
            remove_run_files(out)
            (out / "config.yaml").write_text(cfg.to_yaml())
        accelerator.wait_for_everyone()
        if resume is None:
            return
    checkpoints.load(resume)
    if place.is_main:
        out.mkdir(parents=True, exist_ok=True)  # resuming from checkpoint.resume=<folder> into a new run
        (out / "config.yaml").write_text(cfg.to_yaml())
        (out / "exit_status.json").unlink(missing_ok=True)  # this run writes its own
    log.truncate_after(state.step)  # rows the interrupted run logged after its checkpoint are redone


class Validator:
    """When to validate (every eval.every_steps steps and at each epoch end), the best result so far (in the
    trainer state, so it survives a resume), early stopping, and best/ whenever the result improves."""

    def __init__(self, cfg: ExperimentConfig, task: Task, ctx: TaskSetup, checkpoints: CheckpointManager,
                 log: RunLog, meter: ThroughputMeter):  # fmt: skip
        self.cfg, self.task, self.ctx, self.checkpoints, self.log, self.meter = cfg, task, ctx, checkpoints, log, meter
        self.last_scores: dict = {}
        """The latest validation's scores."""

    def due(self, step: int, end_of_epoch: bool) -> bool:
        return every_n_steps(step, self.cfg.eval.every_steps) or end_of_epoch

    def validate(self, model, state: TrainState, epoch: float) -> bool:
        """Validate; keep and export the model when it improves. Returns True when early stopping says stop."""
        with self.meter.paused("validation"):
            pause("validation")  # fault injection for tests: a signal during validation
            scores = self.task.evaluate(self.ctx, model, "validation").scores
            if state.step in injected_faults().nan_eval:  # fault injection for tests: NaN validation scores
                scores = {k: float("nan") if isinstance(v, float) else v for k, v in scores.items()}
            improved = state.best.update(state.step, scores)
            state.last_eval_step = state.step
            self.last_scores = scores
            self.log.record("eval", split="validation", step=state.step, epoch=round(epoch, 4), **scores)
            self.log.info(
                f"validation @ step {state.step}: {self.task.summary(scores)}" + ("  (best)" if improved else "")
            )
            if improved:
                self.checkpoints.keep_best(model)
        return 0 < self.cfg.eval.patience <= state.best.evals_without_improvement


# ----------------------------------------------------------------------------------------------------
# train
# ----------------------------------------------------------------------------------------------------


def train(r: Run) -> None:
    """Steps until total_steps (or early stopping): accumulate, forward, backward, clip, step, log, validate,
    checkpoint. The loss of a step is normalised over all of it (every micro-batch on every rank)."""
    cfg, state, model, log = r.cfg, r.state, r.model, r.log
    faults = injected_faults()
    pause("train")  # fault injection for tests and benchmarks/setup_memory.py: setup done, no step taken
    model.train()
    log.start_progress(r.total_steps)
    log.advance(state.step, r.total_steps, None)
    r.meter.start()
    r.network = NetworkMeter(state.step) if cfg.logging.network_bytes else None
    r.stop.phase = "train"
    stop_early = False
    while state.step < r.total_steps and not stop_early and not state.stopped_early:
        plan = r.planner.plan(state.epoch, state.consumed_before_plan)
        todo = plan[state.position :][: r.total_steps - state.step]
        batches = iter(train_loader(r, todo))
        for global_step in todo:
            weight = r.task.step_weight(r.ctx, global_step, state.epoch)
            step_loss = forward_backward(r, batches, weight, faults.for_step(state.step + 1))
            grad_norm = gradient_norm(r)  # on the device (DeepSpeed: None, it clips inside its own step)

            # Host sync, once per step: every rank agrees on a stop signal, a timed checkpoint, a non-finite loss
            # or gradient norm (one all-reduce of four flags, one read).
            stop_now, time_due, bad_loss, bad_grads = agree(r.accelerator, [r.stop.requested, r.checkpoints.time_due()],
                                                             [~torch.isfinite(step_loss), nonfinite(grad_norm, step_loss)])  # fmt: skip
            applied = apply_step(r, state, bad_loss, bad_grads)
            if applied:
                r.window.add(step_loss, weight)
            else:
                r.window.skip(weight)
            r.optimizer.zero_grad(set_to_none=True)

            lengths = r.ctx.splits["train"].lengths[np.concatenate(global_step)]  # every rank's examples
            state.finish_step(step_example_count(global_step), int(lengths.sum()))
            r.meter.step(lengths, passes=r.planner.layout.micro_batches)
            if state.step == 1:
                report_memory(r)
            epoch_progress = state.epoch + state.position / len(plan)
            last_step = state.step == r.total_steps
            if every_n_steps(state.step, cfg.logging.every_steps) or last_step:
                log_training(r, epoch_progress, grad_norm if applied else None)
            else:
                log.advance(state.step, r.total_steps, None)

            end_of_epoch = state.position == len(plan)
            validating = r.validator.due(state.step, end_of_epoch)
            stop_early = validating and r.validator.validate(model, state, epoch_progress)
            if validating and r.trial is not None:
                prune_if_told(r)
            stop_now = stop_now or (validating and r.stop.agreed(r.accelerator))  # signalled while validating
            if end_of_epoch:
                state.next_epoch()
            state.stopped_early = stop_early
            with r.meter.paused("checkpoint"):
                r.checkpoints.after_step(state, r.window, end_of_epoch, last_step or stop_early, stop_now, time_due)
            if stop_early:
                log.info(f"early stopping: no improvement in {cfg.eval.patience} validations")
                break
    r.meter.stop()
    log.stop_progress()


def train_loader(r: Run, steps: list) -> DataLoader:
    """This rank's micro-batches of `steps`, in order."""
    layout = r.planner.layout
    return DataLoader(
        r.ctx.splits["train"],
        batch_sampler=[mb for step in steps for mb in rank_micro_batches(step, layout, r.place.rank)],
        collate_fn=r.task.train_collator(r.ctx, r.state.epoch),
        num_workers=r.cfg.data.num_workers,
        pin_memory=r.place.pin_memory,
        generator=torch.Generator(),  # never draw from the global RNG: dropout masks stay resumable
    )


def forward_backward(r: Run, batches, weight: float, fault: str | None) -> torch.Tensor:
    """The step's micro-batches on this rank; returns their summed loss (on the device, not read here).

    Accelerate divides each backward by grad_accum and DDP averages gradients over ranks, so the summed loss is
    scaled by world x grad_accum / (the step's weight) to make the update exactly sum / weight."""
    scale = r.place.world_size * r.cfg.train.grad_accum / (weight if weight > 0 else 1)
    step_loss = torch.zeros((), device=r.place.device)
    for micro in range(r.cfg.train.grad_accum):
        batch = {k: v.to(r.place.device, non_blocking=True) for k, v in next(batches).items()}
        last = micro == r.cfg.train.grad_accum - 1
        # No gradient sync (DDP, DeepSpeed, FSDP2) until the step's last micro-batch.
        with r.accelerator.accumulate(r.model), micro_batch(r.place, r.model, last):
            with r.activations.first_forward():  # counts what the run's first forward keeps for backward
                loss_sum = inject_fault(r.task.loss_sum(r.ctx, r.model, batch), fault)
            r.accelerator.backward(loss_sum * scale)
        step_loss += loss_sum.detach()
    return step_loss


def gradient_norm(r: Run) -> torch.Tensor | None:
    """The global gradient norm before clipping, on the device; gradients are clipped to train.max_grad_norm.
    Accelerate's accumulation counter is at a step boundary here: gradients are synchronised (and, under fp16,
    unscaled first). Under DeepSpeed, the norm its engine computed when it clipped and stepped inside backward
    (inf where it found non-finite gradients and skipped the step)."""
    if r.place.zero_stage:
        return deepspeed_grad_norm(r.accelerator)
    params = [p for p in r.model.parameters() if p.grad is not None]
    if r.cfg.train.max_grad_norm > 0:
        norm = r.accelerator.clip_grad_norm_(params, r.cfg.train.max_grad_norm)
    else:
        r.accelerator.unscale_gradients()
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    return full(norm)  # FSDP2: the norm of sharded gradients is itself a DTensor (collective)


def nonfinite(value: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """A 0-dim bool tensor on `like`'s device: whether `value` is non-finite (False for None)."""
    return ~torch.isfinite(value) if value is not None else torch.zeros((), dtype=torch.bool, device=like.device)


def apply_step(r: Run, state: TrainState, bad_loss: bool, bad_grads: bool) -> bool:
    """Update the weights and the schedule, or skip the step; returns whether it was applied.

    A step with a non-finite loss or gradient norm is skipped and counted (skipped_steps); after
    runtime.max_nonfinite_steps in a row the run stops (NonFiniteLoss), the last checkpoint intact. Under fp16
    the loss scaler's overflow (non-finite gradients of a finite loss) is the scaler's business: the optimizer
    step is called so that the scaler skips it and lowers its scale, the schedule does not advance, and the
    streak does not count it. DeepSpeed applies its step inside backward: a non-finite loss under bf16 / fp32
    has already been taken or skipped: a step it skipped (its overflow check: non-finite gradients, whatever the
    precision) is counted like any other, fp16's finite-loss overflow as the scaler's; one it applied with a
    non-finite loss or gradient has reached the weights, and the run stops."""
    if r.place.zero_stage:
        skipped = deepspeed_overflow(r.accelerator)
        if not skipped and (bad_loss or bad_grads):
            raise NonFiniteLoss(f"non-finite {'loss' if bad_loss else 'gradient norm'} at step {state.step + 1} under "
                                "DeepSpeed, which has already applied it; resume from the last checkpoint with a "
                                "lower train.lr")  # fmt: skip
        bad_grads = bad_grads or skipped
    if not (bad_loss or bad_grads):
        r.optimizer.step()
        r.scheduler.step()
        state.nonfinite_streak = 0
        return True
    state.skipped_steps += 1
    if not r.place.zero_stage and r.accelerator.scaler is not None:
        r.optimizer.step()  # the scaler finds the overflow, skips the update and lowers its scale
    scaler_overflow = r.place.precision == "fp16" and not bad_loss
    if scaler_overflow:
        r.log.warn(f"step {state.step + 1}: fp16 gradient overflow, update skipped and loss scale lowered")
        return False
    state.nonfinite_streak += 1
    what = "loss" if bad_loss else "gradient norm (finite loss)"
    r.log.warn(f"step {state.step + 1}: non-finite {what}, update skipped ({state.nonfinite_streak} in a row)")
    if state.nonfinite_streak >= r.cfg.runtime.max_nonfinite_steps:
        raise NonFiniteLoss(
            f"{state.nonfinite_streak} consecutive steps with a non-finite loss or gradient (runtime.max_nonfinite_steps); "
            "stopping. The last checkpoint is intact: lower train.lr or check the data, then resume."
        )
    return False


def prune_if_told(r: Run) -> None:
    """In a search, report the validation just done to the study; when its pruner says so, stop every rank."""
    state = r.state
    latest = float(r.validator.last_scores[state.best.metric])
    # Rank 0 asks the study; the others say no, and `agree` makes any yes every rank's.
    if agree(r.accelerator, [r.place.is_main and r.trial.should_stop(latest, state.step)], [])[0]:
        r.log.record("pruned", step=state.step, value=latest)
        r.log.info(f"pruned by the search at step {state.step} ({state.best.metric} {latest:.4f})")
        raise Pruned(f"trial {r.trial.number} pruned at step {state.step}")


def log_training(r: Run, epoch: float, grad_norm: torch.Tensor | None) -> None:
    """A log step: the window's loss, the rates and the last step's gradient norm, on the console and as a
    metrics.jsonl row."""
    state = r.state
    traffic = r.network.per_step(state.step) if r.network is not None else {}  # before this log's collectives
    loss = r.window.mean()  # host sync: every rank's window
    rates = r.meter.rates()
    shown = {"loss": loss, "lr": r.scheduler.get_last_lr()[0], "samples/s": rates.get("samples_per_s", 0.0),
             "tokens/s": rates.get("tokens_per_s", 0.0)}  # fmt: skip
    if "mfu" in rates:
        shown["mfu"] = f"{100 * rates['mfu']:.1f}%"
    r.log.record(
        "train", split="train", step=state.step, epoch=round(epoch, 4), loss=loss, lr=shown["lr"],
        grad_norm=float(grad_norm) if grad_norm is not None else None,  # host sync (log steps only)
        **rates, skipped_steps=state.skipped_steps, **traffic,
    )  # fmt: skip
    r.log.advance(state.step, r.total_steps, shown)


def report_memory(r: Run) -> None:
    """Per-rank parameter / gradient / optimizer-state bytes, so users see what each ZeRO stage buys them."""
    row = {**memory_report(r.accelerator.unwrap_model(r.model), r.optimizer, r.place),
           "activations": r.activations.bytes}  # fmt: skip
    per_rank = gather_object([row])
    mib = 2**20
    checkpointing = " (gradient checkpointing)" if r.cfg.train.gradient_checkpointing else ""
    for rank, row in enumerate(per_rank):
        r.log.info(
            f"memory rank {rank}: parameters {row['parameters'] / mib:.2f} MiB, gradients "
            f"{row['gradients'] / mib:.2f} MiB, optimizer state {row['optimizer_state'] / mib:.2f} MiB, "
            f"fp32 master {row['fp32_master'] / mib:.2f} MiB, activations kept for backward "
            f"{row['activations'] / mib:.2f} MiB{checkpointing}"
        )
    r.log.record("memory", per_rank=per_rank)


# ----------------------------------------------------------------------------------------------------
# finish
# ----------------------------------------------------------------------------------------------------


def finish(r: Run) -> dict:
    """The last state to final/; the best model (validated once more if the last step was not) on test;
    results.json. The last step's checkpoint is on disk: a signal stops the finish between its parts (and
    between test batches), and the requeued run resumes into the finish alone."""
    cfg, state, log = r.cfg, r.state, r.log
    r.stop.phase = log.phase = "finish"  # the finish's rows are marked: a resumed run redoes the finish
    r.checkpoints.stop_if_signalled(state)
    if cfg.train.compile:
        log.info(f"torch.compile: {compiled_graph_count()} graph(s) compiled for training and validation")
    r.checkpoints.export_final(r.model)
    r.checkpoints.stop_if_signalled(state)
    if state.last_eval_step != state.step:  # evaluate-only runs (max_steps=0), or a run cut short by max_steps
        r.validator.validate(r.model, state, float(state.epoch))
        r.checkpoints.stop_if_signalled(state)
    best = state.best
    if best.value is None:
        log.warn(f"no validation gave a finite {best.metric}: there is no best model (best/ is not written); "
                 "testing the final model")  # fmt: skip
    elif best.step != state.step:
        r.checkpoints.restore_best(r.model)
        log.info(f"loaded the best model (step {best.step}, validation {best.metric} {best.value:.4f}) for test")
    final_scores = {"validation": best.validation} if best.validation is not None else {}
    if "test" in r.ctx.splits:
        with r.meter.paused("test"):
            pause("test")  # fault injection for tests: a signal during the final test
            test = r.task.evaluate(r.ctx, r.model, "test", interrupt=lambda: r.checkpoints.stop_if_signalled(state))
        final_scores["test"] = test.scores
        log.record("eval", split="test", step=best.step, **test.scores)
        if test.scores.get("labelled") is False:
            log.info(f"the test split has no labels: {test.scores['samples']} predictions in {r.out / PREDICTIONS_FILE}, "
                     "no test metrics")  # fmt: skip
        if test.predictions is not None and r.place.is_main:
            write_predictions(r.out / PREDICTIONS_FILE, test.predictions)
    log.metrics_table("best model" if best.value is not None else "final model", final_scores)

    results = {
        "task": r.task.name,
        **({"test": final_scores["test"]} if "test" in final_scores else {}),
        "best": {"step": best.step, "metric": best.metric, "value": best.value, "validation": best.validation},
        "world_size": r.place.world_size,
        "optimizer_steps": state.step,
        "skipped_steps": state.skipped_steps,
        "epochs_completed": round(state.examples_seen / max(1, len(r.ctx.splits["train"])), 4),
        "train_examples_seen": state.examples_seen,
        "wall_seconds": round(time.monotonic() - r.started, 3),
        **r.meter.results(),
        "resumed_from_step": r.resumed_from.manifest["step"] if r.resumed_from else None,
        **({"compiled_graphs": compiled_graph_count()} if cfg.train.compile else {}),
        "precision": r.place.precision,
        "tf32": r.place.tf32,
        "model": cfg.model.name_or_path,
        "config_fingerprint": cfg.fingerprint(),
    }
    if r.place.is_main:
        (r.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        write_model_cards(r.out)  # README.md in best/ and final/, from the run's files
        files = [r.out / "results.json"]
        if "test" in results:  # the report shows the best model's test results beside the training curves
            try:
                files.append(write_report(r.out))
            except Exception as exc:  # a derived file: its failure must not fail the run that completed
                log.warn(f"the report could not be written ({type(exc).__name__}: {exc}); the run's files are "
                         f"complete: python -m harness.report {r.out} retries it")  # fmt: skip
        log_run_files(r.accelerator, files)  # to the trackers that keep files
        log.info(f"results: {'; '.join(map(str, files))}; best model: {r.out / 'best'}")
    r.accelerator.wait_for_everyone()
    close_trackers(r.accelerator, "FINISHED")
    r.accelerator.end_training()
    if cfg.hub.push_to and r.place.is_main:  # after the last collective: the other ranks need not wait for it
        folder = r.out / ("best" if (r.out / "best").is_dir() else "final")
        log.info(f"pushed {folder} to {push(folder, cfg.hub.push_to, cfg.hub.private)}")
    return results


def write_predictions(path: Path, predictions: list[dict]) -> None:
    """One JSON line per test example, in the test split's order: its index, true label and prediction."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps({"index": i, **row}) + "\n" for i, row in enumerate(predictions)))
    tmp.replace(path)
