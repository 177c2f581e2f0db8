"""Long reviews, read three ways: the accuracy of one fine-tuned model on IMDB test reviews longer than its limit.

    python benchmarks/long_documents.py --model runs/imdb_minilm_cpu/best --data ../shared/data/imdb --limit 1000

Every reading goes through harness.predict (the serving path), on the same reviews: `head` (the first
max_length tokens), `head+tail` (the first 128 and the last max_length - 130), and `windows` (every token, in
windows of max_length sharing --stride tokens, their logits averaged; `windows-max` takes the elementwise max).
Prints a table and, with --out, writes it with a JSON copy.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

if __package__ in (None, ""):
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # import the harness from the project root

DEFAULT_DATA = (Path(__file__).resolve().parents[2] / "shared" / "data" / "imdb").resolve()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a fine-tuned classifier folder (a run's best/)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with IMDB's test.parquet")
    parser.add_argument("--limit", type=int, default=1000, help="long reviews to score (seeded sample)")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--stride", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", type=Path)
    opts = parser.parse_args(argv)

    import numpy as np
    import pandas as pd

    from harness.data.tokenize import TextEncoder
    from harness.predict import classify, load_classifier, plain_spec

    tokenizer, model = load_classifier(opts.model, "cpu")
    frame = pd.read_parquet(opts.data / "test.parquet")
    encoder = TextEncoder(tokenizer, opts.max_length)
    lengths = np.asarray([len(b) for b in encoder.bodies(frame["text"].tolist())])
    long = np.flatnonzero(lengths > encoder.budget)
    chosen = np.random.default_rng(0).permutation(long)[: opts.limit]
    texts, labels = frame["text"].iloc[chosen].tolist(), frame["label"].iloc[chosen].to_numpy()
    base = replace(plain_spec(model, opts.max_length), labels=[model.config.id2label[i] for i in range(2)])
    readings = {
        "head": base,
        "head+tail": replace(base, truncation="head_tail", head_tokens=128),
        "windows": replace(base, long_documents="windows", window_stride=opts.stride),
        "windows-max": replace(base, long_documents="windows", window_stride=opts.stride, window_pooling="max"),
    }
    names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    rows = []
    for reading, spec in readings.items():
        start = time.perf_counter()
        predicted = classify(texts, tokenizer, model, opts.batch_size, opts.max_length, spec=spec)
        accuracy = float(np.mean([names.index(p["label"]) == y for p, y in zip(predicted, labels, strict=True)]))
        rows.append({"reading": reading, "accuracy": accuracy, "seconds": round(time.perf_counter() - start, 1)})
        print(f"{reading}: accuracy {accuracy:.4f} ({rows[-1]['seconds']} s)", file=sys.stderr, flush=True)
    header = (f"{len(texts)} IMDB test reviews longer than {opts.max_length} tokens (of {len(long)}; "
              f"mean {lengths[chosen].mean():.0f} tokens), model {opts.model}, stride {opts.stride}")  # fmt: skip
    table = [header, "", "| reading | accuracy | seconds |", "|---|--:|--:|"]
    table += [f"| {r['reading']} | {r['accuracy']:.4f} | {r['seconds']} |" for r in rows]
    print("\n".join(table))
    if opts.out:
        opts.out.write_text("\n".join(table) + "\n")
        opts.out.with_name(opts.out.name + ".json").write_text(json.dumps({"header": header, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
