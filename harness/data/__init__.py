"""IMDB (and friends) as tokenized train / validation / test splits, and their batches."""

from __future__ import annotations

from harness.config import ExperimentConfig
from harness.data.sources import DataError, LabelledTexts, load_raw_splits
from harness.data.splits import cap, split_validation

__all__ = ["DataError", "prepare_text_splits"]


def prepare_text_splits(cfg: ExperimentConfig) -> dict[str, LabelledTexts]:
    """Raw train / validation / test texts after the validation split and the sample caps."""
    raw = load_raw_splits(cfg.data, cfg.seed)
    train, validation = split_validation(raw["train"], cfg.data.validation_size, cfg.seed)
    return {
        "train": cap(train, cfg.data.max_train_samples, cfg.seed),
        "validation": cap(validation, cfg.data.max_eval_samples, cfg.seed),
        "test": cap(raw["test"], cfg.data.max_eval_samples, cfg.seed),
    }
