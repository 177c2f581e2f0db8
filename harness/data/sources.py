"""Raw labelled splits from the sources: any hub dataset (IMDB's is the `imdb` shortcut), a local folder of
Parquet / CSV / JSON-lines files or the Stanford aclImdb layout, or synthetic reviews.

Every source returns {"train": LabelledTexts, "test": LabelledTexts} (and "validation" where the source has
one), with the configured columns read (text, an optional second text of a pair, the label or one 0/1 column
per label, numeric features) and every cell checked: texts non-empty strings; labels turned into the task's
targets (a class id, a multi-hot row, a number). Bad input raises `DataError` naming the file or split, the row
and the column.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from harness.config import ExperimentConfig
from harness.locking import held

FILE_SUFFIXES = (".parquet", ".csv", ".jsonl", ".json")
SPLITS = ("train", "test")
UNLABELLED = -1
"""The label of a text with none (pre-training corpora)."""
IMDB_HUB = "stanfordnlp/imdb"


class DataError(ValueError):
    """Unusable input data; the message names the file (and row, and column) at fault."""


@dataclass
class LabelledTexts:
    texts: list[str]
    labels: list
    """Per row: a class id (single_label), a multi-hot list of 0/1 floats (multi_label), a float (regression), or
    UNLABELLED."""
    origin: str
    """Where the rows came from, for messages."""
    features: np.ndarray | None = None
    """[rows, data.feature_columns] float32: numeric columns read beside the text (for multimodal models)."""
    pairs: list[str] | None = None
    """The second text of each row's pair (data.text_pair_column), or None for single texts."""
    labelled: bool = True
    """False for a test split published without its labels (GLUE's test splits: label -1 everywhere): its labels
    are UNLABELLED, and it gets predictions but no metrics."""

    def __len__(self) -> int:
        return len(self.texts)

    def select(self, indices: Sequence[int]) -> LabelledTexts:
        features = self.features[np.asarray(indices, dtype=np.int64)] if self.features is not None else None
        pairs = [self.pairs[i] for i in indices] if self.pairs is not None else None
        return LabelledTexts([self.texts[i] for i in indices], [self.labels[i] for i in indices], self.origin,
                             features, pairs, self.labelled)  # fmt: skip

    def content_hash(self) -> str:
        """Hash of texts, pairs and labels: part of the tokenization cache key."""
        h = hashlib.sha256()
        for i, (text, label) in enumerate(zip(self.texts, self.labels, strict=True)):
            h.update(text.encode())
            if self.pairs is not None:
                h.update(b"\x01" + self.pairs[i].encode())
            h.update(b"\x00%s\x00" % repr(label).encode())
        return h.hexdigest()


@dataclass(frozen=True)
class TableSpec:
    """What to read from a table and how its labels become targets (from data.* and task.problem_type)."""

    problem_type: str = "single_label"
    labels: tuple[str, ...] = ("neg", "pos")
    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str = "label"
    label_columns: tuple[str, ...] = ()
    feature_columns: tuple[str, ...] = ()

    @classmethod
    def of(cls, cfg: ExperimentConfig) -> TableSpec:
        d = cfg.data
        return cls(cfg.task.problem_type, tuple(d.labels), d.text_column, d.text_pair_column, d.label_column,
                   tuple(d.label_columns), tuple(d.feature_columns))  # fmt: skip

    @property
    def label_names(self) -> list[str]:
        """Class names in id order (multi_label with 0/1 columns: the columns' names; regression: none)."""
        if self.problem_type == "regression":
            return []
        return list(self.label_columns) if self.label_columns else list(self.labels)

    @property
    def columns(self) -> tuple[str, ...]:
        pair = (self.text_pair_column,) if self.text_pair_column else ()
        labels = self.label_columns or (self.label_column,)
        return (self.text_column, *pair, *labels, *self.feature_columns)


# ----------------------------------------------------------------------------------------------------
# Cells to targets
# ----------------------------------------------------------------------------------------------------


def _class_id(label: Any, name_to_id: dict[str, int]) -> int | None:
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


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _targets(columns: list[Sequence[Any]], spec: TableSpec, origin: str) -> list:
    """The label column(s) of a table as the task's targets; DataError names the row and column at fault."""
    names = spec.label_names
    name_to_id = {name: i for i, name in enumerate(names)}
    where = f"column {spec.label_column!r}"
    targets = []
    if spec.problem_type == "multi_label" and spec.label_columns:
        for row in range(len(columns[0])):
            hot = []
            for name, column in zip(spec.label_columns, columns, strict=True):
                value = _number(column[row])
                if value not in (0.0, 1.0):
                    raise DataError(f"{origin}, row {row}: column {name!r} is {column[row]!r}, not 0 or 1")
                hot.append(value)
            targets.append(hot)
        return targets
    for row, value in enumerate(columns[0]):
        if spec.problem_type == "single_label":
            target = _class_id(value, name_to_id)
            if target is None:
                raise DataError(f"{origin}, row {row}: {where}: label {value!r} is not in the label set "
                                f"(ids 0..{len(names) - 1} or names {names}; data.labels sets it)")  # fmt: skip
        elif spec.problem_type == "regression":
            target = _number(value)
            if target is None:
                raise DataError(f"{origin}, row {row}: {where} is {value!r}, not a finite number (regression)")
        else:
            target = _multi_hot(value, name_to_id, names, f"{origin}, row {row}: {where}")
        targets.append(target)
    return targets


def _multi_hot(value: Any, name_to_id: dict[str, int], names: list[str], where: str) -> list[float]:
    """A list of label names (or ids) as a multi-hot row; a JSON-like string such as '["a", "b"]' too (CSV)."""
    if isinstance(value, str):
        import json

        try:
            value = json.loads(value) if value.strip().startswith("[") else [v for v in value.split(",") if v.strip()]
        except ValueError as exc:
            raise DataError(f"{where}: {value!r} is not a list of labels") from exc
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise DataError(f"{where}: {value!r} is not a list of labels (multi_label)")
    hot = [0.0] * len(names)
    for item in value:
        index = _class_id(item.strip() if isinstance(item, str) else item, name_to_id)
        if index is None:
            raise DataError(f"{where}: label {item!r} is not in the label set {names} (data.labels sets it)")
        hot[index] = 1.0
    return hot


def _texts(values: Sequence[Any], origin: str, column: str) -> list[str]:
    for row, text in enumerate(values):
        if not isinstance(text, str) or not text.strip():
            raise DataError(
                f"{origin}, row {row}: column {column!r}: text must be a non-empty string, got {text!r:.60}"
            )
    return list(values)


def _check_rows(columns: dict[str, Sequence[Any]], spec: TableSpec, origin: str, may_be_unlabelled: bool = False
                ) -> LabelledTexts:  # fmt: skip
    """A table's columns (by name) checked and turned into LabelledTexts; with `may_be_unlabelled`, a split whose
    every label is missing (-1 or null, as hubs publish test splits) is read as unlabelled."""
    texts = _texts(columns[spec.text_column], origin, spec.text_column)
    if len(texts) == 0:
        raise DataError(f"{origin}: the split is empty")
    pairs = _texts(columns[spec.text_pair_column], origin, spec.text_pair_column) if spec.text_pair_column else None
    label_columns = [columns[name] for name in (spec.label_columns or (spec.label_column,))]
    if may_be_unlabelled and all(value is None or value == UNLABELLED for column in label_columns for value in column):
        split = LabelledTexts(texts, [UNLABELLED] * len(texts), origin, pairs=pairs, labelled=False)
    else:
        split = LabelledTexts(texts, _targets(label_columns, spec, origin), origin, pairs=pairs)
    if spec.feature_columns:
        split.features = _check_features([columns[c] for c in spec.feature_columns], spec.feature_columns, origin)
    return split


def _check_features(columns: list[Sequence[Any]], names: Sequence[str], origin: str) -> np.ndarray:
    """The feature columns as a [rows, columns] float32 array; every value must be a finite number."""
    features = np.empty((len(columns[0]), len(names)), dtype=np.float32)
    for j, (name, column) in enumerate(zip(names, columns, strict=True)):
        for i, value in enumerate(column):
            number = _number(value)
            if number is None:
                shown = "empty" if value is None or value == "" else repr(value)
                raise DataError(f"{origin}, row {i}: column {name!r} is {shown}, not a finite number")
            features[i, j] = number
    return features


# ----------------------------------------------------------------------------------------------------
# Local files
# ----------------------------------------------------------------------------------------------------


def _read_table(path: Path, columns: Sequence[str]) -> dict[str, list[Any]]:
    """The named columns of a Parquet, CSV or JSON (lines) file."""
    import pandas as pd  # pandas (with pyarrow) reads all three formats and reports their parse errors well

    if path.suffix == ".parquet":
        return _read_parquet(path, columns)
    try:
        if path.suffix == ".csv":
            frame = pd.read_csv(path, keep_default_na=False)
        else:
            frame = pd.read_json(path, lines=path.suffix == ".jsonl")
    except Exception as exc:  # the formats raise many unrelated types; all mean "cannot read this file"
        raise DataError(f"{path}: cannot read it as {path.suffix[1:]}: {exc}") from exc
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; found {list(frame.columns)} (data.*_column sets them)")
    return {c: frame[c].tolist() for c in columns}


def _read_parquet(path: Path, columns: Sequence[str]) -> dict[str, list[Any]]:
    """The named columns of a Parquet file, read by pyarrow alone: only those columns, straight into Python
    values (through pandas, every text would also pass through an object column: a third copy of the split)."""
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
        missing = [c for c in columns if c not in schema.names]
        if missing:
            raise DataError(f"{path}: missing column(s) {missing}; found {schema.names} (data.*_column sets them)")
        table = pq.read_table(path, columns=list(dict.fromkeys(columns)))
    except DataError:
        raise
    except Exception as exc:  # pyarrow raises several types for a file that is not Parquet
        raise DataError(f"{path}: cannot read it as parquet: {exc}") from exc
    return {c: table.column(c).to_pylist() for c in columns}


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


def _read_aclimdb_split(root: Path, split: str, spec: TableSpec) -> LabelledTexts:
    texts, raw_labels = [], []
    for polarity in ("neg", "pos"):
        folder = root / split / polarity
        if not folder.is_dir():
            raise DataError(f"{folder}: missing (the aclImdb layout has {split}/neg and {split}/pos)")
        polarity_texts = _read_text_files(folder)
        texts += polarity_texts
        raw_labels += [polarity] * len(polarity_texts)
    origin = str(root / split)
    if {"neg", "pos"} - set(spec.label_names):
        raise DataError(f"{origin}: the aclImdb folders are neg/pos but data.labels is {spec.label_names}")
    return _check_rows({spec.text_column: texts, spec.label_column: raw_labels}, spec, origin)


def load_path_splits(path: str, spec: TableSpec, splits: Sequence[str] = SPLITS) -> dict[str, LabelledTexts]:
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise DataError(f"data.path {folder}: no such folder")
    root = _aclimdb_root(folder)
    if root is not None:
        if spec != TableSpec(labels=spec.labels):
            raise DataError(f"{root}: an aclImdb folder has texts and neg/pos labels only; the configured columns "
                            f"or task need Parquet/CSV/JSONL files")  # fmt: skip
        return {split: _read_aclimdb_split(root, split, spec) for split in splits}
    loaded = {}
    for split in splits:
        file = _find_split_file(folder, split)
        loaded[split] = _check_rows(_read_table(file, spec.columns), spec, str(file))
    return loaded


# ----------------------------------------------------------------------------------------------------
# The Hugging Face Hub (or its cache, or a local folder laid out like a dataset repository)
# ----------------------------------------------------------------------------------------------------


def split_base(spec: str) -> str:
    """The split a `datasets` split spec reads from: `train` of `train[:10%]` or `train[100:200]`."""
    return spec.split("[", 1)[0].strip()


def _hub_tables(dataset: str, config: str | None, specs: dict[str, str], lock_dir: Path | None) -> dict:
    """`datasets` tables of a hub dataset by our split name, from split specs (a name, or a slice such as
    `train[:10%]`). Only the splits named are downloaded and prepared (their data files, where the dataset lists
    them per split: `load_dataset` alone prepares every split). Every process may call it at once: under a lock
    in `lock_dir` the first downloads and the others then read the `datasets` cache."""
    import datasets

    where = f"data.dataset {dataset!r}{f' ({config})' if config else ''}"
    lock = (
        Path(lock_dir or ".").expanduser()
        / f"hub-{hashlib.sha256(f'{dataset}|{config}'.encode()).hexdigest()[:16]}.lock"
    )
    with held(lock, f"the download of {where}"):
        try:
            builder = datasets.load_dataset_builder(dataset, config)
        except Exception as exc:  # network, missing repository, unknown config: datasets raises many kinds
            raise DataError(f"{where}: cannot load it: {exc}") from exc
        files = builder.config.data_files or {}
        available = sorted(files) if files else sorted(builder.info.splits or {})
        for ours, theirs in specs.items():
            if split_base(theirs) not in available:
                raise DataError(f"{dataset}: no split {split_base(theirs)!r} (data.{ours}_split={theirs}); it has "
                                f"{available}")  # fmt: skip
        needed = sorted({split_base(theirs) for theirs in specs.values()})
        only = {"data_files": {name: files[name] for name in needed}} if files else {}
        tables = {}
        for ours, theirs in specs.items():
            try:
                tables[ours] = datasets.load_dataset(dataset, config, split=theirs, **only)
            except Exception as exc:  # a bad slice, a file that cannot be read
                raise DataError(f"{dataset}[{theirs}]: cannot load it: {exc}") from exc
    return tables


def load_hub_splits(dataset: str, config: str | None, split_names: dict[str, str], spec: TableSpec,
                    lock_dir: Path | None = None) -> dict[str, LabelledTexts]:  # fmt: skip
    """`split_names` maps our split (train, test, validation) to the dataset's split spec (`_hub_tables`);
    columns are checked by name. A test split without labels is read as unlabelled."""
    loaded = {}
    for ours, table in _hub_tables(dataset, config, split_names, lock_dir).items():
        origin = f"{dataset}[{split_names[ours]}]"
        missing = [c for c in spec.columns if c not in table.column_names]
        if missing:
            raise DataError(f"{origin}: missing column(s) {missing}; found {table.column_names} "
                            "(data.*_column sets them)")  # fmt: skip
        loaded[ours] = _check_rows({c: table[c] for c in spec.columns}, spec, origin, may_be_unlabelled=ours == "test")
    return loaded


# ----------------------------------------------------------------------------------------------------
# Synthetic reviews, unlabelled texts, and the choice of source
# ----------------------------------------------------------------------------------------------------


def load_synthetic(cfg, seed: int, spec: TableSpec = TableSpec()) -> dict[str, LabelledTexts]:
    from harness.data.synthetic import generate_reviews

    loaded = {}
    for split, size, split_seed in (("train", cfg.synthetic_train_size, seed), ("test", cfg.synthetic_test_size,
                                                                               seed + 1_000_003)):  # fmt: skip
        texts, labels = generate_reviews(size, seed=split_seed)
        loaded[split] = _check_rows({spec.text_column: texts, spec.label_column: labels}, spec, f"synthetic[{split}]")
    return loaded


def _unlabelled(texts: Sequence[Any], origin: str) -> LabelledTexts:
    """Texts without labels (label UNLABELLED), each checked to be a non-empty string."""
    if len(texts) == 0:
        raise DataError(f"{origin}: the split is empty")
    return LabelledTexts(_texts(texts, origin, "text"), [UNLABELLED] * len(texts), origin)


def load_unlabelled_split(cfg: ExperimentConfig) -> LabelledTexts | None:
    """The unlabelled reviews, if the source has them: unsup.* beside train.*, aclImdb's train/unsup/, or the
    hub IMDB's `unsupervised` split. None when the source has none."""
    d = cfg.data
    if d.source in ("synthetic", "hub"):
        return None
    if d.source == "imdb":
        hub = _hub_tables(IMDB_HUB, None, {"unlabelled": "unsupervised"}, Path(d.cache_dir))["unlabelled"]
        return _unlabelled(hub[d.text_column], f"{IMDB_HUB}[unsupervised]")
    folder = Path(d.path or "").expanduser()
    root = _aclimdb_root(folder)
    if root is not None:
        unsup = root / "train" / "unsup"
        return _unlabelled(_read_text_files(unsup), str(unsup)) if unsup.is_dir() else None
    file = _find_split_file(folder, "unsup", required=False)
    if file is None:
        return None
    return _unlabelled(_read_table(file, (d.text_column,))[d.text_column], str(file))


def load_raw_splits(cfg: ExperimentConfig, splits: Sequence[str] = SPLITS) -> dict[str, LabelledTexts]:
    """The labelled `splits` (train and test, plus validation where a hub dataset names one; pre-training asks
    for train only, so needs no test file)."""
    d = cfg.data
    spec = TableSpec.of(cfg)
    if (d.feature_columns or d.text_pair_column or d.label_columns) and d.source in ("synthetic", "imdb"):
        raise DataError(f"data.feature_columns, data.text_pair_column, data.label_columns: the {d.source} source has "
                        "text and label only; use data.source=path or hub")  # fmt: skip
    if d.source == "synthetic":
        return load_synthetic(d, cfg.seed, spec)
    if d.source == "path":
        assert d.path is not None  # validated in config
        return load_path_splits(d.path, spec, splits)
    dataset = IMDB_HUB if d.source == "imdb" else d.dataset
    names = {"train": d.train_split, "test": d.test_split}
    names = {ours: theirs for ours, theirs in names.items() if ours in splits}
    if d.validation_split and "test" in splits:
        names["validation"] = d.validation_split
    return load_hub_splits(dataset, d.dataset_config if d.source == "hub" else None, names, spec, Path(d.cache_dir))
