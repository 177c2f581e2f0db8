"""A small corpus that masked-LM training can learn in a few hundred CPU steps: every text is a window of one
fixed cycle of 40 words, so each masked word is predictable from its neighbours."""

from pathlib import Path

import numpy as np
import pandas as pd

from harness.data.synthetic import VOCABULARY


def write_cyclic_corpus(folder: Path, train: int = 500, unlabelled: int = 300, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    cycle = list(rng.permutation(VOCABULARY[:40]))

    def texts(n: int) -> list[str]:
        starts, lengths = rng.integers(40, size=n), rng.integers(15, 30, size=n)
        return [
            " ".join(cycle[(s + k) % 40] for k in range(n_words)) for s, n_words in zip(starts, lengths, strict=True)
        ]

    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"text": texts(train), "label": rng.integers(0, 2, train)}).to_parquet(folder / "train.parquet")
    pd.DataFrame({"text": texts(unlabelled), "label": -1}).to_parquet(folder / "unsup.parquet")
    return folder
