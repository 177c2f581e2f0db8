"""Fine-tuning's task: labelled splits (single texts or pairs), the classifier, its loss and metrics for the
problem type (single-label, multi-label, regression: harness/objectives.py), and long texts read in windows."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch

from harness.config import ExperimentConfig
from harness.data import prepare_text_splits
from harness.data.collate import PadCollator
from harness.data.sources import TableSpec
from harness.data.tokenize import TextEncoder, Windows, takes_token_types, tokenize_split, windowed
from harness.evaluation import gather_example_records, logits_of, model_inputs
from harness.model import load_model, load_tokenizer
from harness.objectives import (
    Objective,
    fold_regression_head,
    pool_windows,
    target_statistics,
    unfold_regression_head,
)
from harness.serving import ServingSpec
from harness.tasks import Evaluation, TaskSetup


@dataclass
class ClassificationSetup(TaskSetup):
    objective: Objective
    collator: PadCollator
    """Pads a batch of tokenized examples (validation and test; training too without augmentation)."""
    augmenting_collator: Callable[[int], Callable] | None
    """With augment.ops: epoch -> a collator that augments and tokenizes the training texts on the fly."""
    windows: dict[str, Windows] = field(default_factory=dict)
    """With eval.long_documents=windows: validation and test texts read whole, in windows."""


class ClassificationTask:
    """Sequence classification and regression (task.problem_type)."""

    name = "classification"

    def __init__(self, cfg: ExperimentConfig):
        self.cfg = cfg

    def setup(self, accelerator, place) -> ClassificationSetup:
        cfg = self.cfg
        spec = TableSpec.of(cfg)
        labels = spec.label_names
        fields = {}
        if cfg.model.modalities == ["text"]:
            tokenizer, model = load_model(cfg.model, "classifier", labels or ["score"], cfg.seed, cfg.task.problem_type)
        else:  # several modalities: encoders from the registry and a fusion head (harness/multimodal.py)
            from harness.multimodal import build_fusion_classifier, field_collators

            tokenizer, model = load_tokenizer(cfg.model), build_fusion_classifier(cfg, cfg.seed)
            fields = field_collators(cfg.model.modalities)
        texts = prepare_text_splits(cfg)
        token_types = takes_token_types(tokenizer, model)
        # Every rank at once: one fills each cache entry under its lock, the others wait for it and read it.
        splits = {name: tokenize_split(split, tokenizer, cfg.data, token_types=token_types)
                  for name, split in texts.items()}  # fmt: skip
        windows = {}
        if cfg.eval.long_documents == "windows":
            encoder = TextEncoder.of(tokenizer, cfg.data)
            windows = {name: windowed(tokenize_split(texts[name], tokenizer, cfg.data, full=True), encoder,
                                      cfg.eval.window_stride) for name in ("validation", "test")}  # fmt: skip
        mean, std = target_statistics(splits["train"].labels) if cfg.task.problem_type == "regression" else (0.0, 1.0)
        objective = Objective(cfg.task.problem_type, tuple(labels), cfg.eval.threshold,
                              class_weights(cfg, splits["train"].labels, len(labels)), mean, std)  # fmt: skip
        export_weights = None
        if cfg.task.problem_type == "regression":
            export_weights = partial(fold_regression_head, mean=mean, std=std)
            exported = ServingSpec.read(Path(cfg.model.name_or_path)) if Path(cfg.model.name_or_path).is_dir() else None
            if exported is not None and exported.problem_type == "regression":  # a head in units: standardise it
                unfold_regression_head(model, mean, std)
        collator = PadCollator(tokenizer.pad_token_id, place.pad_multiple, fields)
        augmenting = None
        if cfg.augment.ops:  # training texts are then tokenized on the fly, after augmentation
            from harness.augment import Augmenter, AugmentingCollator

            augmenter = Augmenter(cfg.augment, cfg.seed)

            def augmenting(epoch: int) -> Callable:
                return AugmentingCollator(texts["train"].texts, augmenter, epoch, tokenizer, cfg.data, collator)

        serving = ServingSpec.of(cfg, labels)
        return ClassificationSetup(tokenizer, model, splits, accelerator, place, serving, export_weights, objective,
                                   collator, augmenting, windows)  # fmt: skip

    def train_collator(self, setup: ClassificationSetup, epoch: int) -> Callable:
        return setup.augmenting_collator(epoch) if setup.augmenting_collator else setup.collator

    def step_weight(self, setup: ClassificationSetup, global_step: list[list[int]], epoch: int) -> float:
        """The loss of a step is averaged over its examples (all micro-batches on all ranks); with class weights,
        over their weights."""
        indices = np.concatenate(global_step)
        return setup.objective.weight_of(setup.splits["train"].labels[indices])

    def loss_sum(self, setup: ClassificationSetup, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        return setup.objective.loss_sum(model(**model_inputs(batch)).logits, batch["labels"])

    def evaluate(self, setup: ClassificationSetup, model: torch.nn.Module, split: str,
                 interrupt: Callable[[], None] | None = None) -> Evaluation:  # fmt: skip
        cfg = self.cfg
        windows = setup.windows.get(split)
        data = windows.split if windows else setup.splits[split]
        logits = gather_example_records(
            model, data, setup.collator, setup.accelerator, cfg.eval.batch_size, logits_of, cfg.data.num_workers,
            setup.place.pin_memory, interrupt,
        )["logits"]  # fmt: skip
        if windows:
            logits = pool_windows(logits, windows.document, windows.documents, cfg.eval.window_pooling)
        labels = setup.splits[split].labels
        if not setup.splits[split].labelled:  # a test split published without labels: predictions only
            return Evaluation({"samples": len(labels), "labelled": False}, setup.objective.predictions(logits))
        scores = {**setup.objective.scores(logits, labels), "samples": len(labels)}
        if windows:
            scores["windows"] = len(windows.document)
        return Evaluation(scores, setup.objective.predictions(logits, labels))

    def summary(self, scores: dict) -> str:
        names = {"single_label": ("accuracy", "f1_macro"), "multi_label": ("subset_accuracy", "f1_micro"),
                 "regression": ("mse", "spearman")}[self.cfg.task.problem_type]  # fmt: skip
        return f"loss {scores['loss']:.4f} " + " ".join(f"{name} {scores[name]:.4f}" for name in names)


def class_weights(cfg: ExperimentConfig, train_labels: np.ndarray, classes: int) -> tuple[float, ...] | None:
    """train.class_weights: as given, or `balanced`: n / (classes x count) over the training split."""
    weights = cfg.train.class_weights
    if weights is None:
        return None
    if weights == "balanced":
        counts = np.bincount(train_labels, minlength=classes)
        return tuple(float(len(train_labels) / (classes * c)) if c else 0.0 for c in counts)
    return tuple(weights)
