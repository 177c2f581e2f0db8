"""Labelled texts as tokenized train / validation / test splits, and their batches."""

from __future__ import annotations

from harness.config import ExperimentConfig, PretrainConfig
from harness.data.sources import UNLABELLED, DataError, LabelledTexts, load_raw_splits, load_unlabelled_split
from harness.data.splits import cap, split_validation

__all__ = ["DataError", "prepare_pretraining_splits", "prepare_text_splits"]


def prepare_text_splits(cfg: ExperimentConfig) -> dict[str, LabelledTexts]:
    """Raw train / validation / test texts: the source's validation split, or data.validation_size examples
    carved from train (stratified by class for single_label); then the sample caps."""
    raw = load_raw_splits(cfg)
    if "validation" in raw:
        train, validation = raw["train"], raw["validation"]
    else:
        stratify = cfg.task.problem_type == "single_label"
        train, validation = split_validation(raw["train"], cfg.data.validation_size, cfg.seed, stratify)
    return {
        "train": cap(train, cfg.data.max_train_samples, cfg.seed),
        "validation": cap(validation, cfg.data.max_eval_samples, cfg.seed),
        "test": cap(raw["test"], cfg.data.max_eval_samples, cfg.seed),
    }


def prepare_pretraining_splits(cfg: PretrainConfig) -> dict[str, LabelledTexts]:
    """The pre-training corpus: train texts (labels dropped) plus, with mlm.include_unlabelled, the source's
    unlabelled split; `data.validation_size` texts held out for validation. Test texts are never used."""
    train = load_raw_splits(cfg, splits=("train",))["train"]
    corpus = LabelledTexts(list(train.texts), [UNLABELLED] * len(train), train.origin)
    unlabelled = load_unlabelled_split(cfg) if cfg.mlm.include_unlabelled else None
    if unlabelled is not None:
        corpus = LabelledTexts(corpus.texts + unlabelled.texts, corpus.labels + unlabelled.labels,
                               f"{train.origin} + {unlabelled.origin}")  # fmt: skip
    train, validation = split_validation(corpus, cfg.data.validation_size, cfg.seed, stratify=False)
    return {
        "train": cap(train, cfg.data.max_train_samples, cfg.seed),
        "validation": cap(validation, cfg.data.max_eval_samples, cfg.seed),
    }
