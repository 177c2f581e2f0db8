"""Tokenization speed: the harness's cached tokenization of all 50,000 labelled IMDB reviews against the
recipe most fine-tuning scripts use, side by side, in one run.

Sides (each on the same texts, with the same tokenizer):

* ``harness cold``: `harness.data.tokenize.tokenize_split` for train and test with an empty cache folder
  (tokenize, truncate, write the Arrow cache, load it as arrays);
* ``harness cached``: the same call again, served from that cache (what every later run, and every rank after
  rank 0, pays);
* ``datasets.map baseline``: ``Dataset.map(lambda b: tokenizer(b["text"], truncation=True, max_length=L),
  batched=True)`` in memory, the Hugging Face course / Trainer-example recipe, with no cache written.

Targets (performance issue): cold under 60 s and cached under 3 s on 2 CPU cores.

Usage (from the repository root):

    python benchmarks/tokenize_imdb.py                       # all of IMDB train + test, MiniLM's WordPiece
    python benchmarks/tokenize_imdb.py --limit 200           # seconds; what the CI smoke test runs
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # import the harness from the project root

from benchmarks.workloads import DEFAULT_DATA  # noqa: E402
from harness.config import DataConfig, ExperimentConfig, ModelConfig  # noqa: E402
from harness.data.sources import load_raw_splits  # noqa: E402
from harness.data.tokenize import tokenize_split  # noqa: E402
from harness.model import load_tokenizer  # noqa: E402

TARGETS = {"harness cold": 60.0, "harness cached": 3.0}


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with train/test Parquet (text, label)")
    p.add_argument("--model", default="builtin:all-minilm-l6-v2", help="model.name_or_path whose tokenizer to use")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--limit", type=int, default=0, help="reviews per split (0: all)")
    opts = p.parse_args(argv)
    if not opts.data.is_dir():
        print(f"error: --data {opts.data}: no such folder (IMDB train/test Parquet expected)", file=sys.stderr)
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")  # the fast tokenizer's own threads, as in a run

    with tempfile.TemporaryDirectory(prefix="tokenize-bench-") as cache:
        experiment = ExperimentConfig(data=DataConfig(source="path", path=str(opts.data), max_length=opts.max_length,
                                                      cache_dir=cache))  # fmt: skip
        cfg = experiment.data
        read_seconds, splits = timed(lambda: load_raw_splits(experiment))
        if opts.limit:
            splits = {name: split.select(range(min(opts.limit, len(split)))) for name, split in splits.items()}
        tokenizer = load_tokenizer(ModelConfig(name_or_path=opts.model))
        reviews = sum(len(s) for s in splits.values())

        def harness_side():
            return {name: tokenize_split(split, tokenizer, cfg) for name, split in splits.items()}

        def baseline_side():
            import datasets

            def encode(batch):
                return tokenizer(batch["text"], truncation=True, max_length=opts.max_length)

            return {
                name: datasets.Dataset.from_dict({"text": split.texts, "label": split.labels}).map(
                    encode, batched=True, remove_columns=["text"], keep_in_memory=True, desc=None
                )
                for name, split in splits.items()
            }

        import datasets

        datasets.disable_progress_bars()
        rows = []
        cold, tokenized = timed(harness_side)
        rows.append(("harness cold", cold))
        cached, again = timed(harness_side)
        rows.append(("harness cached", cached))
        baseline, _ = timed(baseline_side)
        rows.append(("datasets.map baseline", baseline))
        for name in splits:  # the cache served exactly what was tokenized
            assert all((a == b).all() for a, b in zip(tokenized[name].input_ids, again[name].input_ids, strict=True))
        tokens = sum(split.real_tokens for split in tokenized.values())

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; Python "
          f"{platform.python_version()}; tokenizer {opts.model}; {reviews:,} reviews "
          f"({', '.join(f'{n} {len(s):,}' for n, s in splits.items())}), max_length {opts.max_length}, "
          f"{tokens:,} tokens after truncation; reading the Parquet files took {read_seconds:.1f} s (not counted)")  # fmt: skip
    print()
    print("| side | seconds | reviews/s | target | baseline ÷ this |")
    print("|---|--:|--:|--:|--:|")
    for name, seconds in rows:
        target = f"< {TARGETS[name]:.0f} s" if name in TARGETS and not opts.limit else ""
        print(f"| {name} | {seconds:.2f} | {reviews / seconds:,.0f} | {target} | {baseline / seconds:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
