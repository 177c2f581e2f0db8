"""Raw labelled splits from the three sources: the hub's IMDB, a local folder, or synthetic reviews.

Every source returns the same thing: {"train": LabelledTexts, "test": LabelledTexts}, with texts checked
(non-empty strings) and labels mapped to ids of `data.labels`. Bad input raises `DataError` naming the file
and, where there is one, the row.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from harness.config import DataConfig

FILE_SUFFIXES = (".parquet", ".csv", ".jsonl", ".json")
SPLITS = ("train", "test")
UNLABELLED = -1
"""The label of a text with none (pre-training corpora)."""


class DataError(ValueError):
    """Unusable input data; the message names the file (and row) at fault."""


@dataclass
class LabelledTexts:
    texts: list[str]
    labels: list[int]
    origin: str
    """Where the rows came from, for messages."""
    features: np.ndarray | None = None
    """[rows, data.feature_columns] float32: numeric columns read beside the text (for multimodal models)."""

    def __len__(self) -> int:
        return len(self.texts)

    def select(self, indices: Sequence[int]) -> LabelledTexts:
        features = self.features[np.asarray(indices, dtype=np.int64)] if self.features is not None else None
        return LabelledTexts([self.texts[i] for i in indices], [self.labels[i] for i in indices], self.origin, features)

    def content_hash(self) -> str:
        """Hash of texts and labels: part of the tokenization cache key."""
        h = hashlib.sha256()
        for text, label in zip(self.texts, self.labels, strict=True):
            h.update(text.encode())
            h.update(b"\x00%d\x00" % label)
        return h.hexdigest()


def _label_id(label: Any, name_to_id: dict[str, int]) -> int | None:
    """A label as an id into the label set: a name from it, or an integer (also as text) in range."""
    if isinstance(label, str):
        if label in name_to_id:
            return name_to_id[label]
        if not label.strip().lstrip("-").isdigit():
            return None
        label = int(label)
    if isinstance(label, bool):
        return None
    try:
        as_int = int(label)  # also numpy integers, and floats like 1.0 that pandas makes of int columns
    except (TypeError, ValueError, OverflowError):
        return None
    return as_int if as_int == label and 0 <= as_int < len(name_to_id) else None


def _check_rows(texts: Sequence[Any], raw_labels: Sequence[Any], labels: list[str], origin: str) -> LabelledTexts:
    """Validate texts and map labels (ids into `labels`, or label names) to ids."""
    if len(texts) == 0:
        raise DataError(f"{origin}: the split is empty")
    name_to_id = {name: i for i, name in enumerate(labels)}
    ids = []
    for row, (text, label) in enumerate(zip(texts, raw_labels, strict=True)):
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{origin}, row {row}: text must be a non-empty string, got {text!r:.60}")
        label_id = _label_id(label, name_to_id)
        if label_id is None:
            raise DataError(
                f"{origin}, row {row}: label {label!r} is not in the label set "
                f"(ids 0..{len(labels) - 1} or names {labels}; data.labels sets it)"
            )
        ids.append(label_id)
    return LabelledTexts(list(texts), ids, origin)


def _read_table(path: Path, columns: tuple[str, ...] = ("text", "label")) -> list[list[Any]]:
    """The named columns of a Parquet, CSV or JSON (lines) file."""
    import pandas as pd  # pandas (with pyarrow) reads all three formats and reports their parse errors well

    try:
        if path.suffix == ".parquet":
            frame = pd.read_parquet(path)
        elif path.suffix == ".csv":
            frame = pd.read_csv(path, keep_default_na=False)
        else:
            frame = pd.read_json(path, lines=path.suffix == ".jsonl")
    except Exception as exc:  # the formats raise many unrelated types; all mean "cannot read this file"
        raise DataError(f"{path}: cannot read it as {path.suffix[1:]}: {exc}") from exc
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; found {list(frame.columns)}")
    return [frame[c].tolist() for c in columns]


def _find_split_file(folder: Path, split: str, required: bool = True) -> Path | None:
    found = [folder / f"{split}{s}" for s in FILE_SUFFIXES if (folder / f"{split}{s}").is_file()]
    if not found and not required:
        return None
    if not found:
        raise DataError(f"{folder}: no {split} file (expected one of {', '.join(split + s for s in FILE_SUFFIXES)})")
    if len(found) > 1:
        raise DataError(f"{folder}: several {split} files {[p.name for p in found]}; keep one")
    return found[0]


def _aclimdb_root(folder: Path) -> Path | None:
    """The folder holding train/{pos,neg} in the Stanford layout, if `folder` is (or contains) one."""
    for candidate in (folder, folder / "aclImdb"):
        if (candidate / "train" / "pos").is_dir() and (candidate / "train" / "neg").is_dir():
            return candidate
    return None


def _read_text_files(folder: Path) -> list[str]:
    texts = []
    for file in sorted(folder.glob("*.txt")):
        try:
            texts.append(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"{file}: unreadable: {exc}") from exc
    return texts


def _read_aclimdb_split(root: Path, split: str, labels: list[str]) -> LabelledTexts:
    texts, raw_labels = [], []
    for polarity in ("neg", "pos"):
        folder = root / split / polarity
        if not folder.is_dir():
            raise DataError(f"{folder}: missing (the aclImdb layout has {split}/neg and {split}/pos)")
        polarity_texts = _read_text_files(folder)
        texts += polarity_texts
        raw_labels += [polarity] * len(polarity_texts)
    origin = str(root / split)
    missing = {"neg", "pos"} - set(labels)
    if missing:
        raise DataError(f"{origin}: the aclImdb folders are neg/pos but data.labels is {labels}")
    return _check_rows(texts, raw_labels, labels, origin)


def load_path_splits(
    path: str, labels: list[str], splits: tuple[str, ...] = SPLITS, feature_columns: Sequence[str] = ()
) -> dict[str, LabelledTexts]:
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise DataError(f"data.path {folder}: no such folder")
    root = _aclimdb_root(folder)
    if root is not None:
        if feature_columns:
            raise DataError(f"{root}: an aclImdb folder has no columns; data.feature_columns needs Parquet/CSV/JSONL")
        return {split: _read_aclimdb_split(root, split, labels) for split in splits}
    loaded = {}
    for split in splits:
        file = _find_split_file(folder, split)
        texts, raw_labels, *columns = _read_table(file, ("text", "label", *feature_columns))
        loaded[split] = _check_rows(texts, raw_labels, labels, str(file))
        if feature_columns:
            loaded[split].features = _check_features(columns, feature_columns, file)
    return loaded


def _check_features(columns: list[Sequence[Any]], names: Sequence[str], file: Path) -> np.ndarray:
    """The feature columns as a [rows, columns] float32 array; every value must be a finite number."""
    features = np.empty((len(columns[0]), len(names)), dtype=np.float32)
    for j, (name, column) in enumerate(zip(names, columns, strict=True)):
        for i, value in enumerate(column):
            try:
                number = float(value)
            except (TypeError, ValueError):
                number = math.nan
            if not math.isfinite(number):
                shown = "empty" if value is None or value == "" else repr(value)
                raise DataError(f"{file}, row {i}: column {name!r} is {shown}, not a finite number")
            features[i, j] = number
    return features


def _unlabelled(texts: Sequence[Any], origin: str) -> LabelledTexts:
    """Texts without labels (label UNLABELLED), each checked to be a non-empty string."""
    if len(texts) == 0:
        raise DataError(f"{origin}: the split is empty")
    for row, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{origin}, row {row}: text must be a non-empty string, got {text!r:.60}")
    return LabelledTexts(list(texts), [UNLABELLED] * len(texts), origin)


def load_unlabelled_split(cfg: DataConfig) -> LabelledTexts | None:
    """The unlabelled reviews, if the source has them: unsup.* beside train.*, aclImdb's train/unsup/, or the
    hub's `unsupervised` split. None when a local folder has none."""
    if cfg.source == "synthetic":
        return None
    if cfg.source == "imdb":
        import datasets

        hub = datasets.load_dataset("stanfordnlp/imdb", split="unsupervised")
        return _unlabelled(hub["text"], "stanfordnlp/imdb[unsupervised]")
    folder = Path(cfg.path or "").expanduser()
    root = _aclimdb_root(folder)
    if root is not None:
        unsup = root / "train" / "unsup"
        return _unlabelled(_read_text_files(unsup), str(unsup)) if unsup.is_dir() else None
    file = _find_split_file(folder, "unsup", required=False)
    if file is None:
        return None
    (texts,) = _read_table(file, columns=("text",))
    return _unlabelled(texts, str(file))


def load_imdb_hub(labels: list[str]) -> dict[str, LabelledTexts]:
    """stanfordnlp/imdb through `datasets` (needs the Hugging Face Hub or its local cache)."""
    import datasets

    hub = datasets.load_dataset("stanfordnlp/imdb")
    return {
        split: _check_rows(hub[split]["text"], hub[split]["label"], labels, f"stanfordnlp/imdb[{split}]")
        for split in SPLITS
    }


def load_synthetic(cfg: DataConfig, seed: int) -> dict[str, LabelledTexts]:
    from harness.data.synthetic import generate_reviews

    train = generate_reviews(cfg.synthetic_train_size, seed=seed)
    test = generate_reviews(cfg.synthetic_test_size, seed=seed + 1_000_003)
    return {
        "train": _check_rows(*train, cfg.labels, "synthetic[train]"),
        "test": _check_rows(*test, cfg.labels, "synthetic[test]"),
    }


def load_raw_splits(cfg: DataConfig, seed: int, splits: tuple[str, ...] = SPLITS) -> dict[str, LabelledTexts]:
    """The labelled `splits` (train and test; pre-training asks for train only, so needs no test file)."""
    if cfg.feature_columns and cfg.source != "path":
        raise DataError(f"data.feature_columns: only files (data.source=path) have columns; source is {cfg.source!r}")
    if cfg.source == "synthetic":
        return load_synthetic(cfg, seed)
    if cfg.source == "path":
        assert cfg.path is not None  # validated in config
        return load_path_splits(cfg.path, cfg.labels, splits, cfg.feature_columns)
    return load_imdb_hub(cfg.labels)
