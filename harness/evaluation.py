"""Evaluation: sharded forward passes whose per-example outputs are gathered from every rank; model selection.

Each rank evaluates its share of length-sorted batches (see `plan_eval`), then every rank receives all
per-example records (logits, or a task's own values). Records are put back in example order before anything
is summed, so the numbers equal a single process's on the same set: nothing is duplicated or dropped, whatever
the world size. What the logits mean (losses, metrics, predictions) is harness/objectives.py's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch.utils.data import DataLoader

from harness.data.sampler import plan_eval
from harness.objectives import is_improvement


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


@torch.no_grad()
def gather_example_records(
    model: torch.nn.Module,
    split,
    collator: Callable,
    accelerator: Accelerator,
    batch_size: int,
    score_batch: Callable[[torch.nn.Module, dict], dict[str, torch.Tensor]],
    num_workers: int = 0,
    pin_memory: bool = False,
    interrupt: Callable[[], None] | None = None,
) -> dict[str, np.ndarray]:
    """Run `score_batch` (per-example values, each of shape [batch]) over the split, sharded over ranks;
    returns every example's values in example order, on every rank. `interrupt` is called before each batch
    (every rank runs as many batches, padding included, so it may be collective) and stops the evaluation by
    raising."""
    plan = plan_eval(split.lengths, batch_size, accelerator.num_processes, accelerator.process_index)
    loader = DataLoader(
        split,
        batch_sampler=plan.batches,
        collate_fn=collator,
        num_workers=num_workers,
        pin_memory=pin_memory,
        generator=torch.Generator(),  # never draw from the global RNG (keeps training resumable bit for bit)
    )
    was_training = model.training
    model.eval()
    records: dict[str, list[torch.Tensor]] = {}
    for batch, is_padding in zip(loader, plan.is_padding, strict=True):
        if interrupt is not None:
            interrupt()
        batch = {k: v.to(accelerator.device, non_blocking=True) for k, v in batch.items()}
        values = score_batch(model, batch)
        if is_padding:
            continue  # a repeated batch that only keeps this rank in step with the others
        for name, tensor in {"index": batch["index"], **values}.items():
            records.setdefault(name, []).append(tensor)
    model.train(was_training)

    # Host sync: one transfer per evaluation, then an all-gather of plain arrays.
    local = [{name: torch.cat(parts).cpu().numpy() for name, parts in records.items()}]
    gathered = [g for g in gather_object(local) if g] if accelerator.num_processes > 1 else local
    all_index = np.concatenate([g["index"] for g in gathered])
    order = np.argsort(all_index, kind="stable")
    if not np.array_equal(all_index[order], np.arange(len(split))):
        raise RuntimeError(f"evaluation gathered {len(all_index)} records for {len(split)} examples")
    return {name: np.concatenate([g[name] for g in gathered])[order] for name in gathered[0] if name != "index"}


def logits_of(model: torch.nn.Module, batch: dict) -> dict[str, torch.Tensor]:
    """Per example: the model's logits in fp32 ([batch, outputs])."""
    return {"logits": model(**model_inputs(batch)).logits.float()}


def model_inputs(batch: dict) -> dict[str, torch.Tensor]:
    """What the model's forward takes: everything in the batch but the targets and bookkeeping."""
    return {k: v for k, v in batch.items() if k not in NOT_MODEL_INPUTS}


NOT_MODEL_INPUTS = ("labels", "index", "predicted", "targets")
