"""Worked multimodal example: reviews plus numeric features, where the label needs both.

    python -m harness.examples.text_tabular runs/text_tabular_data       # writes train/test Parquet
    accelerate launch harness/train.py --config configs/text_tabular.yaml

Each row has a synthetic review (its sentiment: 0 or 1) and four features. `gate` says which source holds the
label: where gate > 0 the label is the review's sentiment; elsewhere it is the sign of `score` (a second
opinion, e.g. the reviewer's rating history). `noise_a` and `noise_b` carry nothing. So the text alone is right
on the gated half only (about 75%), the features alone likewise, and only a model that fuses both can be
right nearly always.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from harness.data.synthetic import generate_reviews

FEATURE_COLUMNS = ["gate", "score", "noise_a", "noise_b"]


def make_split(n: int, seed: int) -> pd.DataFrame:
    texts, sentiment = generate_reviews(n, seed=seed)
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({"text": texts})
    for column in FEATURE_COLUMNS:
        frame[column] = rng.normal(size=n)
    frame["label"] = np.where(frame["gate"] > 0, np.asarray(sentiment), (frame["score"] > 0).astype(int))
    return frame


def write_example(folder: Path, train: int = 2400, test: int = 500, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    make_split(train, seed).to_parquet(folder / "train.parquet")
    make_split(test, seed + 1_000_003).to_parquet(folder / "test.parquet")
    return folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="where to write train.parquet and test.parquet")
    parser.add_argument("--train", type=int, default=2400)
    parser.add_argument("--test", type=int, default=500)
    args = parser.parse_args(argv)
    write_example(args.folder, args.train, args.test)
    print(f"wrote {args.folder}/train.parquet ({args.train} rows) and test.parquet ({args.test} rows)")


if __name__ == "__main__":
    main()
