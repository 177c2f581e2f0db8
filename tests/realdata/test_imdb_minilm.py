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
        # Many short steps learn more than a few long ones: 960 reviews at 48 tokens (first 16 + last 30).
        "data.max_train_samples=960", "data.max_eval_samples=200", "data.validation_size=200",
        "data.max_length=48", "data.head_tokens=16", "train.batch_size=16", "eval.every_steps=30",
    )  # fmt: skip
    results = read_results(out)
    assert results["test"]["samples"] == 200 and results["optimizer_steps"] == 60
    # Measured 0.780 and 0.765 (seeds 42 and 7; test loss 0.51 and 0.52) on the 2-core AMD EPYC dev machine,
    # 2026-12-02 (at 64 tokens: 0.775, 7 s more); chance is 0.5.
    assert results["test"]["accuracy"] >= 0.72 and results["test"]["loss"] < 0.6, results["test"]
    evals = [r for r in read_metrics(out) if r["event"] == "eval" and r["split"] == "validation"]
    assert [r["step"] for r in evals] == [30, 60]
    classify = pipeline("text-classification", model=str(out / "best"))
    assert classify("A wonderful, moving film with superb acting. I loved it.")[0]["label"] == "pos"
    assert classify("Dreadful. Boring, badly acted, a total waste of two hours.")[0]["label"] == "neg"
