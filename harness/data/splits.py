"""Validation carved from train (stratified, seeded) and sample caps."""

from __future__ import annotations

import random
from collections import defaultdict

from harness.data.sources import DataError, LabelledTexts


def split_validation(
    train: LabelledTexts, size: int, seed: int, stratify: bool = True
) -> tuple[LabelledTexts, LabelledTexts]:
    """A seeded split of `size` examples; stratified (each class keeps its share of `size`, largest remainder)
    when the labels are classes, uniformly random otherwise (multi-label rows, numbers, unlabelled texts)."""
    n = len(train)
    if size >= n:
        raise DataError(f"{train.origin}: data.validation_size ({size}) must be smaller than the train split ({n})")
    by_label: dict[int, list[int]] = defaultdict(list)
    for i, label in enumerate(train.labels):
        by_label[label if stratify else 0].append(i)
    exact = {label: size * len(idx) / n for label, idx in by_label.items()}
    quota = {label: int(share) for label, share in exact.items()}
    short = size - sum(quota.values())
    for label in sorted(exact, key=lambda k: (exact[k] - quota[k], -k), reverse=True)[:short]:
        quota[label] += 1
    rng = random.Random(seed)
    val_idx, train_idx = [], []
    for label in sorted(by_label):
        idx = by_label[label][:]
        rng.shuffle(idx)
        val_idx += idx[: quota[label]]
        train_idx += idx[quota[label] :]
    # Shuffle so neither split is ordered by label (IMDB's files are).
    rng.shuffle(val_idx)
    rng.shuffle(train_idx)
    return train.select(train_idx), train.select(val_idx)


def cap(split: LabelledTexts, max_samples: int | None, seed: int) -> LabelledTexts:
    """A seeded random subset of at most `max_samples` rows (all rows, in their order, when under the cap)."""
    if max_samples is None or len(split) <= max_samples:
        return split
    return split.select(random.Random(seed).sample(range(len(split)), max_samples))
