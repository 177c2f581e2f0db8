"""Fine-tuning's task: labelled splits, the classifier, cross-entropy per example, classification metrics."""

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
from harness.evaluation import evaluate_split, model_inputs
from harness.model import load_model, load_tokenizer
from harness.tasks import TaskSetup


@dataclass
class ClassificationSetup(TaskSetup):
    collator: PadCollator
    """Pads a batch of tokenized examples (validation and test; training too without augmentation)."""
    augmenting_collator: Callable[[int], Callable] | None
    """With augment.ops: epoch -> a collator that augments and tokenizes the training texts on the fly."""


class ClassificationTask:
    """Sequence classification: cross-entropy per example, accuracy / precision / recall / F1."""

    name = "classification"

    def __init__(self, cfg: ExperimentConfig):
        self.cfg = cfg

    def setup(self, accelerator, place) -> ClassificationSetup:
        cfg = self.cfg
        fields = {}
        if cfg.model.modalities == ["text"]:
            tokenizer, model = load_model(cfg.model, "classifier", cfg.data.labels, cfg.seed)
        else:  # several modalities: encoders from the registry and a fusion head (harness/multimodal.py)
            from harness.multimodal import build_fusion_classifier, field_collators

            tokenizer, model = load_tokenizer(cfg.model), build_fusion_classifier(cfg, cfg.seed)
            fields = field_collators(cfg.model.modalities)
        texts = prepare_text_splits(cfg)
        with accelerator.main_process_first():  # rank 0 fills the tokenization cache; the others then read it
            splits = {name: tokenize_split(split, tokenizer, cfg.data) for name, split in texts.items()}
        collator = PadCollator(tokenizer.pad_token_id, place.pad_multiple, fields)
        augmenting = None
        if cfg.augment.ops:  # training texts are then tokenized on the fly, after augmentation
            from harness.augment import Augmenter, AugmentingCollator

            augmenter = Augmenter(cfg.augment, cfg.seed)

            def augmenting(epoch: int) -> Callable:
                return AugmentingCollator(texts["train"].texts, augmenter, epoch, tokenizer, cfg.data, collator)

        return ClassificationSetup(tokenizer, model, splits, accelerator, place, collator, augmenting)

    def train_collator(self, setup: ClassificationSetup, epoch: int) -> Callable:
        return setup.augmenting_collator(epoch) if setup.augmenting_collator else setup.collator

    def step_weight(self, setup: ClassificationSetup, global_step: list[list[int]], epoch: int) -> int:
        """The loss of a step is averaged over its examples (all micro-batches on all ranks)."""
        return step_example_count(global_step)

    def loss_sum(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        logits = model(**model_inputs(batch)).logits
        return F.cross_entropy(logits.float(), batch["labels"], reduction="sum")

    def evaluate(self, setup: ClassificationSetup, model: torch.nn.Module, split: str) -> dict:
        cfg = self.cfg
        return evaluate_split(
            model, setup.splits[split], setup.collator, setup.accelerator, cfg.eval.batch_size, len(cfg.data.labels),
            cfg.data.num_workers, setup.place.pin_memory,
        )  # fmt: skip

    @staticmethod
    def summary(scores: dict) -> str:
        return f"loss {scores['loss']:.4f} accuracy {scores['accuracy']:.4f} f1_macro {scores['f1_macro']:.4f}"
