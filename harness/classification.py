"""Fine-tuning's task for the training loop: labelled splits, the classifier, its loss and its metrics.

A task tells `harness.loop.run` what is specific to one kind of training (see `harness.loop.Task`):
what data and model to set up, how a micro-batch's summed loss is computed and what it is normalised by,
and how a split is evaluated. Everything else (distribution, precision, accumulation, clipping,
checkpoints, resume, logging, model selection) is the loop's and is shared with pre-training.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from harness.config import ExperimentConfig
from harness.data import prepare_text_splits
from harness.data.collate import PadCollator
from harness.data.sampler import step_example_count
from harness.data.tokenize import tokenize_split
from harness.evaluation import evaluate_split, load_metric, model_inputs
from harness.model import load_tokenizer, load_tokenizer_and_model


@dataclass
class TaskSetup:
    """What a task hands the loop: tokenizer, model (not yet prepared) and tokenized splits."""

    tokenizer: object
    model: torch.nn.Module
    splits: dict
    """train and validation, and test when the task has one."""


class ClassificationTask:
    """Sequence classification: cross-entropy per example, accuracy / precision / recall / F1."""

    name = "classification"

    def __init__(self, cfg: ExperimentConfig):
        self.cfg = cfg

    def setup(self, accelerator) -> TaskSetup:
        cfg = self.cfg
        collators = {}
        if cfg.model.modalities == ["text"]:
            tokenizer, model = load_tokenizer_and_model(cfg.model, cfg.data.labels, cfg.seed)
        else:  # several modalities: encoders from the registry and a fusion head (harness/multimodal.py)
            from harness.multimodal import build_fusion_classifier, field_collators

            tokenizer, model = load_tokenizer(cfg.model), build_fusion_classifier(cfg, cfg.seed)
            collators = field_collators(cfg.model.modalities)
        texts = prepare_text_splits(cfg)
        with accelerator.main_process_first():  # rank 0 fills the tokenization cache; the others then read it
            splits = {name: tokenize_split(split, tokenizer, cfg.data) for name, split in texts.items()}
        self.collator = PadCollator(tokenizer.pad_token_id, pad_multiple(accelerator), collators)
        self.augment = None
        if cfg.augment.ops:  # training texts are then tokenized on the fly, after augmentation
            from harness.augment import Augmenter, AugmentingCollator

            augmenter = Augmenter(cfg.augment, cfg.seed)
            self.augment = lambda epoch: AugmentingCollator(
                texts["train"].texts, augmenter, epoch, tokenizer, cfg.data, self.collator
            )
        self.metric = load_metric(accelerator)
        self.accelerator = accelerator
        return TaskSetup(tokenizer, model, splits)

    def train_collator(self, epoch: int) -> Callable:
        return self.augment(epoch) if self.augment else self.collator

    def step_weight(self, global_step: list[list[int]], epoch: int) -> int:
        """The loss of a step is averaged over its examples (all micro-batches on all ranks)."""
        return step_example_count(global_step)

    def loss_sum(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        logits = model(**model_inputs(batch)).logits
        return F.cross_entropy(logits.float(), batch["labels"], reduction="sum")

    def evaluate(self, model: torch.nn.Module, split) -> dict:
        cfg = self.cfg
        return evaluate_split(
            model, split, self.collator, self.accelerator, self.metric, cfg.eval.batch_size, len(cfg.data.labels),
            cfg.data.num_workers,
        )  # fmt: skip

    @staticmethod
    def summary(scores: dict) -> str:
        return f"loss {scores['loss']:.4f} accuracy {scores['accuracy']:.4f} f1_macro {scores['f1_macro']:.4f}"


def pad_multiple(accelerator) -> int | None:
    """Pad lengths to a multiple of 8 on GPUs (tensor cores); exact longest elsewhere."""
    return 8 if accelerator.device.type == "cuda" else None
