"""Labelled files of every shape the harness reads, made from the synthetic reviews (so tiny BERT learns them):
other column names, text pairs, multi-label tags (a list column or one 0/1 column per label), regression scores."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from harness.data.synthetic import NEGATIVE, POSITIVE, generate_reviews


def _reviews(n: int, seed: int) -> tuple[list[str], list[int]]:
    return generate_reviews(n, seed=seed)


def _counts(text: str) -> tuple[int, int]:
    words = text.rstrip(".").split()
    return sum(w in POSITIVE for w in words), sum(w in NEGATIVE for w in words)


def write_renamed_csv(folder: Path, train: int = 300, test: int = 101) -> Path:
    """review / sentiment columns, sentiment as the words 'positive' and 'negative'."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, n, seed in (("train", train, 1), ("test", test, 2)):
        texts, labels = _reviews(n, seed)
        pd.DataFrame({"review": texts, "sentiment": ["positive" if y else "negative" for y in labels]}).to_csv(
            folder / f"{split}.csv", index=False
        )
    return folder


def write_pairs(folder: Path, train: int = 400, test: int = 101) -> Path:
    """premise / hypothesis / label: the polarity (neg, pos) of the hypothesis, the pair's second text, so a model
    that does not read the second segment cannot learn it."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, n, seed in (("train", train, 3), ("test", test, 4)):
        first, _ = _reviews(n, seed)
        second, polarity = _reviews(n, seed + 100)
        labels = ["pos" if y else "neg" for y in polarity]
        pd.DataFrame({"premise": first, "hypothesis": second, "label": labels}).to_parquet(folder / f"{split}.parquet")
    return folder


def multi_labels(text: str) -> list[str]:
    positive, negative = _counts(text)
    return [name for name, on in (("praise", positive > 0), ("complaint", negative > 0),
                                  ("long", len(text.split()) > 30)) if on]  # fmt: skip


def write_multilabel(folder: Path, layout: str, train: int = 400, test: int = 101) -> Path:
    """Tags praise / complaint / long: as a JSON list column `tags` (layout 'list') or as 0/1 columns ('columns')."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, n, seed in (("train", train, 5), ("test", test, 6)):
        texts, _ = _reviews(n, seed)
        tags = [multi_labels(t) for t in texts]
        if layout == "list":
            (folder / f"{split}.jsonl").write_text(
                "".join(json.dumps({"text": t, "tags": g}) + "\n" for t, g in zip(texts, tags, strict=True))
            )
        else:
            columns = {name: [int(name in g) for g in tags] for name in ("praise", "complaint", "long")}
            pd.DataFrame({"text": texts, **columns}).to_csv(folder / f"{split}.csv", index=False)
    return folder


def write_regression(folder: Path, train: int = 400, test: int = 101) -> Path:
    """score = positive minus negative sentiment words, a number per review."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, n, seed in (("train", train, 7), ("test", test, 8)):
        texts, _ = _reviews(n, seed)
        scores = [float(p - q) for p, q in map(_counts, texts)]
        pd.DataFrame({"text": texts, "score": scores}).to_parquet(folder / f"{split}.parquet")
    return folder
