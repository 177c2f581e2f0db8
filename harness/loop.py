"""The fine-tuning run, top to bottom: set up, train (accumulate, forward, backward, clip, step, log,
validate, keep the best), then evaluate the best model on test and write results.json."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate.utils import gather_object
from torch.utils.data import DataLoader

from harness.checkpoint import export_model, load_weights, state_dict_copy
from harness.config import ConfigError, ExperimentConfig
from harness.console import RunLog, quiet_library_progress_bars
from harness.data import prepare_text_splits
from harness.data.collate import PadCollator
from harness.data.sampler import StepLayout, plan_epoch, rank_micro_batches, step_example_count, steps_per_epoch
from harness.data.tokenize import tokenize_split
from harness.distributed import RunPlace, build_accelerator, memory_report
from harness.evaluation import evaluate_split, is_improvement, load_metric
from harness.model import load_tokenizer_and_model, max_positions, parameter_groups
from harness.optim import build_optimizer, build_scheduler

RUN_FILES = ("config.yaml", "metrics.jsonl", "results.json", "best", "final")


def every_n_steps(step: int, n: int) -> bool:
    return n > 0 and step % n == 0


def prepare_output_dir(cfg: ExperimentConfig) -> Path:
    """Refuse a non-empty output_dir unless told to overwrite; then clear only this harness's own files."""
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError([f"output_dir {out}: exists and is not a folder"])
    if out.is_dir() and any(out.iterdir()) and not cfg.overwrite:
        raise ConfigError([f"output_dir {out}: not empty; pass overwrite=true to replace its results"])
    return out


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


def report_memory(accelerator, model, optimizer, log: RunLog) -> None:
    """Per-rank parameter / gradient / optimizer-state bytes, so users see what each ZeRO stage buys them."""
    per_rank = gather_object([memory_report(accelerator, model, optimizer)])
    mib = 2**20
    for rank, row in enumerate(per_rank):
        log.info(
            f"memory rank {rank}: parameters {row['parameters'] / mib:.1f} MiB, gradients {row['gradients'] / mib:.1f} "
            f"MiB, optimizer state {row['optimizer_state'] / mib:.1f} MiB, fp32 master {row['fp32_master'] / mib:.1f} MiB"
        )
    log.record("memory", per_rank=per_rank)


def run(cfg: ExperimentConfig) -> dict:
    t_start = time.monotonic()
    quiet_library_progress_bars()
    out = prepare_output_dir(cfg)
    accelerator = build_accelerator(cfg)
    world, rank = accelerator.num_processes, accelerator.process_index

    # ---- data and model: every rank validates its inputs, so bad input fails everywhere before any work ----
    tokenizer, model = load_tokenizer_and_model(cfg.model, cfg.data.labels, cfg.seed)
    limit = max_positions(model, tokenizer)
    if cfg.data.max_length > limit:
        raise ConfigError([f"data.max_length: {cfg.data.max_length} exceeds the model's limit of {limit} tokens"])
    texts = prepare_text_splits(cfg)
    with accelerator.main_process_first():  # rank 0 fills the tokenization cache; the others then read it
        splits = {name: tokenize_split(split, tokenizer, cfg.data) for name, split in texts.items()}
    train_split, val_split, test_split = splits["train"], splits["validation"], splits["test"]

    layout = StepLayout(cfg.train.batch_size, world, cfg.train.grad_accum)
    per_epoch = steps_per_epoch(len(train_split), layout)
    if per_epoch == 0 and cfg.train.max_steps != 0:
        raise ConfigError(
            [f"data: {len(train_split)} training examples cannot fill one step of {layout.micro_batches} micro-batches"]
        )
    total_steps = cfg.train.max_steps if cfg.train.max_steps >= 0 else cfg.train.epochs * per_epoch

    optimizer = build_optimizer(parameter_groups(model, cfg.train.weight_decay), cfg.train, accelerator.device)
    scheduler = build_scheduler(optimizer, cfg.train, max(total_steps, 1))
    model, optimizer = accelerator.prepare(model, optimizer)
    collator = PadCollator(tokenizer.pad_token_id, pad_to_multiple_of=8 if accelerator.device.type == "cuda" else None)
    metric = load_metric(accelerator)
    num_labels = len(cfg.data.labels)

    def validate(split) -> dict:
        return evaluate_split(
            model, split, collator, accelerator, metric, cfg.eval.batch_size, num_labels, cfg.data.num_workers
        )

    # ---- run files: written only now, after every input has been checked ----
    log = RunLog(out, accelerator.is_main_process, rank, cfg.logging.progress)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        for name in RUN_FILES:
            target = out / name
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
        (out / "config.yaml").write_text(cfg.to_yaml())
    accelerator.wait_for_everyone()
    place = RunPlace.of(accelerator, cfg.train.precision)
    log.info(
        f"world size {world} ({place.distributed_type}, {place.backend or 'no backend'}) on {place.device}, "
        f"precision {cfg.train.precision}; train/validation/test = "
        f"{len(train_split)}/{len(val_split)}/{len(test_split)}; {per_epoch} steps per epoch of "
        f"{layout.examples_per_step} examples; {total_steps} steps"
    )
    log.record("setup", total_steps=total_steps, steps_per_epoch=per_epoch, **asdict(place))

    best = BestSoFar(cfg.eval.metric)
    best_state: dict[str, torch.Tensor] | None = None

    def validate_and_keep_best(step: int, epoch: float) -> bool:
        """Validate; export the model to best/ when it improves. Returns True when early stopping says stop."""
        nonlocal best_state
        scores = validate(val_split)
        improved = best.update(step, scores)
        log.record("eval", split="validation", step=step, epoch=round(epoch, 4), **scores)
        log.info(
            f"validation @ step {step}: loss {scores['loss']:.4f} accuracy {scores['accuracy']:.4f} "
            f"f1_macro {scores['f1_macro']:.4f}" + ("  (best)" if improved else "")
        )
        if improved:
            best_state = state_dict_copy(accelerator, model)
            export_model(accelerator, model, tokenizer, best_state, out / "best")
        return 0 < cfg.eval.patience <= best.evals_without_improvement

    # ---- training ----
    step, epoch, examples_seen, tokens_seen = 0, 0, 0, 0
    window_loss = torch.zeros((), device=accelerator.device)  # summed on the device; read at log time only
    window_examples = 0
    last_eval_step = -1
    stop_early = False
    model.train()
    log.start_progress(total_steps)
    t_train = time.monotonic()
    while step < total_steps and not stop_early:
        plan = plan_epoch(train_split.lengths, layout, cfg.seed, epoch, cfg.data.bucket_size_multiplier)
        plan = plan[: total_steps - step]
        my_batches = [mb for global_step in plan for mb in rank_micro_batches(global_step, layout, rank)]
        loader = DataLoader(
            train_split,
            batch_sampler=my_batches,
            collate_fn=collator,
            num_workers=cfg.data.num_workers,
            pin_memory=accelerator.device.type == "cuda",
        )
        batches = iter(loader)
        for step_in_epoch, global_step in enumerate(plan):
            # The loss of a step is normalised over every example in it: all micro-batches on all ranks.
            # Accelerate divides each backward by grad_accum and DDP averages gradients over ranks, so scale
            # the summed loss by world x grad_accum / (examples in the step) to get exactly sum / examples.
            step_examples = step_example_count(global_step)
            loss_scale = world * cfg.train.grad_accum / step_examples
            for _ in range(cfg.train.grad_accum):
                batch = {k: v.to(accelerator.device, non_blocking=True) for k, v in next(batches).items()}
                with accelerator.accumulate(model):  # no gradient sync until the step's last micro-batch
                    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                    loss_sum = F.cross_entropy(logits.float(), batch["labels"], reduction="sum")
                    accelerator.backward(loss_sum * loss_scale)
                window_loss += loss_sum.detach()
            # Accelerate's accumulation counter is now at a step boundary: gradients are synchronised.
            if cfg.train.max_grad_norm > 0:
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.train.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            step += 1
            if step == 1:
                report_memory(accelerator, model, optimizer, log)
            examples_seen += step_examples
            tokens_seen += int(train_split.lengths[np.concatenate(global_step)].sum())
            window_examples += step_examples
            epoch_progress = epoch + (step_in_epoch + 1) / len(plan) if plan else float(epoch)

            log_values = None
            if every_n_steps(step, cfg.logging.every_steps) or step == total_steps:
                # Host sync: the window's summed loss from every rank.
                loss = accelerator.reduce(window_loss, reduction="sum").item() / window_examples
                elapsed = time.monotonic() - t_train
                log_values = {
                    "loss": loss,
                    "lr": scheduler.get_last_lr()[0],
                    "samples/s": examples_seen / elapsed,
                    "tokens/s": tokens_seen / elapsed,
                }
                grad = float(grad_norm) if cfg.train.max_grad_norm > 0 else None
                log.record(
                    "train", split="train", step=step, epoch=round(epoch_progress, 4), loss=loss,
                    lr=log_values["lr"], grad_norm=grad, samples_per_s=log_values["samples/s"],
                    tokens_per_s=log_values["tokens/s"],
                )  # fmt: skip
                window_loss.zero_()
                window_examples = 0
            log.advance(step, total_steps, log_values)

            end_of_epoch = step_in_epoch == len(plan) - 1
            if every_n_steps(step, cfg.eval.every_steps) or end_of_epoch:
                last_eval_step = step
                if validate_and_keep_best(step, epoch_progress):
                    log.info(f"early stopping: no improvement in {cfg.eval.patience} validations")
                    stop_early = True
                    break
        epoch += 1
    train_seconds = time.monotonic() - t_train
    log.stop_progress()

    # ---- the last state to final/, the best model on test ----
    export_model(accelerator, model, tokenizer, state_dict_copy(accelerator, model), out / "final")
    if last_eval_step != step:  # evaluate-only runs (max_steps=0), or a run cut short by max_steps
        validate_and_keep_best(step, float(epoch))
    if best.step != step:
        load_weights(accelerator, model, best_state)
        log.info(f"loaded the best model (step {best.step}, validation {best.metric} {best.value:.4f}) for test")
    test_scores = validate(test_split)
    log.record("eval", split="test", step=best.step, **test_scores)
    log.metrics_table("best model", {"validation": best.validation, "test": test_scores})

    results = {
        "test": test_scores,
        "best": {"step": best.step, "metric": best.metric, "value": best.value, "validation": best.validation},
        "world_size": world,
        "optimizer_steps": step,
        "epochs_completed": round(examples_seen / max(1, len(train_split)), 4),
        "train_examples_seen": examples_seen,
        "wall_seconds": round(time.monotonic() - t_start, 3),
        "train_seconds": round(train_seconds, 3),
        "train_samples_per_s": examples_seen / train_seconds if step else 0.0,
        "train_tokens_per_s": tokens_seen / train_seconds if step else 0.0,
        "precision": cfg.train.precision,
        "model": cfg.model.name_or_path,
        "config_fingerprint": cfg.fingerprint(),
    }
    if accelerator.is_main_process:
        (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return results
