"""Training behaviours that need a real run."""

import pytest

from tests.conftest import read_metrics, read_results, run_harness, tiny_config

pytestmark = pytest.mark.slow


def test_early_stopping_and_best_model_selection(tmp_path):
    # A learning rate too small to change predictions: accuracy never improves after the first validation.
    config = tiny_config(tmp_path, train={"lr": 1e-12, "max_steps": 20},
                         eval={"every_steps": 2, "metric": "accuracy", "patience": 2})  # fmt: skip
    proc = run_harness(config)
    results = read_results(tmp_path / "run")
    assert results["optimizer_steps"] == 6, "validations at steps 2 (best), 4 and 6 (no improvement: stop)"
    assert results["best"]["step"] == 2 and results["best"]["metric"] == "accuracy"
    assert "early stopping" in proc.stdout
    evals = [r["step"] for r in read_metrics(tmp_path / "run") if r["event"] == "eval" and r["split"] == "validation"]
    assert evals == [2, 4, 6]
