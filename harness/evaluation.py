"""Evaluation: sharded forward passes, predictions gathered from every rank, metrics via `evaluate`.

Each rank evaluates its share of length-sorted batches (see `plan_eval`), then every rank receives all
(index, prediction, loss) records. Records are put back in example order before anything is summed, so the
numbers equal a single process's on the same set: nothing is duplicated or dropped, whatever the world size.
"""

from __future__ import annotations

from pathlib import Path

import evaluate
import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch.utils.data import DataLoader

from harness.data.collate import PadCollator
from harness.data.sampler import plan_eval
from harness.data.tokenize import TokenizedSplit

METRIC_MODULE = Path(__file__).parent / "metrics" / "classification.py"
LOWER_IS_BETTER = {"loss"}


def load_metric(accelerator: Accelerator) -> evaluate.EvaluationModule:
    # The main process copies the module into evaluate's cache first, so ranks do not race on it.
    with accelerator.main_process_first():
        return evaluate.load(str(METRIC_MODULE), keep_in_memory=True)


def is_improvement(value: float, best: float | None, metric: str) -> bool:
    if best is None:
        return True
    return value < best if metric in LOWER_IS_BETTER else value > best


@torch.no_grad()
def evaluate_split(
    model: torch.nn.Module,
    split: TokenizedSplit,
    collator: PadCollator,
    accelerator: Accelerator,
    metric: evaluate.EvaluationModule,
    batch_size: int,
    num_labels: int,
    num_workers: int = 0,
) -> dict[str, float]:
    """Loss, accuracy, precision, recall, macro and micro F1 of `model` on `split`, identical on every rank."""
    plan = plan_eval(split.lengths, batch_size, accelerator.num_processes, accelerator.process_index)
    loader = DataLoader(
        split,
        batch_sampler=plan.batches,
        collate_fn=collator,
        num_workers=num_workers,
        pin_memory=accelerator.device.type == "cuda",
        generator=torch.Generator(),  # never draw from the global RNG (keeps training resumable bit for bit)
    )
    was_training = model.training
    model.eval()
    indices, predictions, losses = [], [], []
    for batch, is_padding in zip(loader, plan.is_padding, strict=True):
        batch = {k: v.to(accelerator.device, non_blocking=True) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        if is_padding:
            continue  # a repeated batch that only keeps this rank in step with the others
        indices.append(batch["index"])
        predictions.append(logits.argmax(dim=-1))
        losses.append(F.cross_entropy(logits, batch["labels"], reduction="none"))
    model.train(was_training)

    # Host sync: one transfer per evaluation, then an all-gather of plain arrays.
    local = [
        (
            torch.cat(indices).cpu().numpy() if indices else np.zeros(0, np.int64),
            torch.cat(predictions).cpu().numpy() if predictions else np.zeros(0, np.int64),
            torch.cat(losses).double().cpu().numpy() if losses else np.zeros(0, np.float64),
        )
    ]
    gathered = gather_object(local) if accelerator.num_processes > 1 else local
    all_index = np.concatenate([g[0] for g in gathered])
    order = np.argsort(all_index, kind="stable")
    all_index = all_index[order]
    if not np.array_equal(all_index, np.arange(len(split))):
        raise RuntimeError(f"evaluation gathered {len(all_index)} records for {len(split)} examples")
    all_pred = np.concatenate([g[1] for g in gathered])[order]
    all_loss = np.concatenate([g[2] for g in gathered])[order]
    scores = metric.compute(predictions=all_pred, references=split.labels, num_labels=num_labels)
    return {"loss": float(all_loss.mean()), **scores, "samples": len(split)}
