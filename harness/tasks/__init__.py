"""What differs between kinds of training. A `Task` gives the training loop (harness/loop.py) its data, model,
loss and metrics; everything else (distribution, precision, accumulation, clipping, checkpoints, resume,
logging, model selection) is the loop's and shared.

* `ClassificationTask` (harness/tasks/classification.py): fine-tuning, cross-entropy per example.
* `MaskedLMTask` (harness/tasks/masked_lm.py): in-domain pre-training, cross-entropy per masked token.

`setup` returns everything later calls need (a `TaskSetup`, or a task's subclass of it); the task object itself
holds only the config.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from accelerate import Accelerator

from harness.distributed import RunPlace
from harness.serving import ServingSpec


@dataclass
class Evaluation:
    """A split's scores (identical on every rank; `loss` and the selection metric among them) and, where the
    task has them, per-example predictions in example order (written for the test split)."""

    scores: dict
    predictions: list[dict] | None = None


@dataclass
class TaskSetup:
    """What a task hands the loop: tokenizer, model (not yet prepared) and tokenized splits."""

    tokenizer: object
    model: torch.nn.Module
    splits: dict
    """train and validation, and test when the task has one."""
    accelerator: Accelerator
    place: RunPlace
    serving: ServingSpec | None
    """What an export needs to read raw text as in training (classifiers: harness.json beside the weights)."""
    export_weights: Callable[[dict], dict] | None
    """What the exported weights are, from the model's (regression: the head in the targets' units)."""


class Task(Protocol):
    name: str

    def setup(self, accelerator: Accelerator, place: RunPlace) -> TaskSetup:
        """Tokenizer, model and tokenized splits; every rank validates its inputs (bad input fails everywhere
        before any work)."""

    def train_collator(self, setup: TaskSetup, epoch: int) -> Callable:
        """Turns a micro-batch of split items into model inputs plus `labels` and `index`."""

    def step_weight(self, setup: TaskSetup, global_step: list[list[int]], epoch: int) -> float:
        """What a step's summed loss is divided by (examples, class weights, or predicted tokens), over all its
        micro-batches on all ranks, computed identically on every rank without communication."""

    def loss_sum(self, setup: TaskSetup, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        """The micro-batch's summed (not averaged) loss."""

    def evaluate(self, setup: TaskSetup, model: torch.nn.Module, split: str,
                 interrupt: Callable[[], None] | None = None) -> Evaluation:  # fmt: skip
        """The named split's scores (and predictions), identical on every rank; `interrupt` is called before
        each batch on every rank (collective) and may stop the evaluation by raising."""

    def summary(self, scores: dict) -> str:
        """The scores in one log line."""
