"""Real IMDB reviews and the real pretrained MiniLM: a short fine-tune must beat chance clearly."""

import pytest
from transformers import pipeline

from tests.conftest import ROOT, read_metrics, read_results, run_harness

pytestmark = [pytest.mark.slow, pytest.mark.realdata]


def test_minilm_learns_imdb_sentiment_from_a_slice(tmp_path, imdb_dir, minilm_path):
    out = tmp_path / "run"
    run_harness(
        ROOT / "configs" / "imdb_minilm_cpu.yaml",
        f"data.path={imdb_dir}", f"output_dir={out}", f"data.cache_dir={tmp_path / 'cache'}",
        "data.max_train_samples=320", "data.max_eval_samples=200", "data.validation_size=200",
        "data.max_length=128", "data.head_tokens=32", "train.batch_size=16", "train.lr=3e-4", "train.warmup_ratio=0.05",
        "eval.every_steps=10",
    )  # fmt: skip
    results = read_results(out)
    assert results["test"]["samples"] == 200 and results["optimizer_steps"] == 20
    assert results["test"]["accuracy"] >= 0.68, results["test"]  # 0.75 measured; chance is 0.5
    evals = [r for r in read_metrics(out) if r["event"] == "eval" and r["split"] == "validation"]
    assert [r["step"] for r in evals] == [10, 20]
    classify = pipeline("text-classification", model=str(out / "best"))
    assert classify("A wonderful, moving film with superb acting. I loved it.")[0]["label"] == "pos"
    assert classify("Dreadful. Boring, badly acted, a total waste of two hours.")[0]["label"] == "neg"
