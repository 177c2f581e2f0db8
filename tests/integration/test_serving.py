"""Serving exactly what was trained: `python -m harness.predict --model <run>/best --file test.txt` gives the run's
own test predictions (the same label for every example, so the same accuracy), reading texts as the run did:
head+tail truncation at 64 tokens, or whole texts in windows."""

from __future__ import annotations

import json

import numpy as np
import pytest

from harness.config import load_config
from harness.data import prepare_text_splits
from tests import ranks
from tests.conftest import read_results, run_harness, tiny_config

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("reading", ["head_tail", "windows"])
def test_predict_on_the_test_texts_reproduces_the_runs_test_predictions(reading, tmp_path):
    overrides = ["data.truncation=head_tail", "data.head_tokens=16", "data.max_length=64"]
    if reading == "windows":
        overrides += ["eval.long_documents=windows", "eval.window_stride=16"]
    config = tiny_config(tmp_path, data={"synthetic_train_size": 1200, "synthetic_test_size": 151},
                         train={"max_steps": 60, "batch_size": 32, "lr": 2e-3}, eval={"batch_size": 16})  # fmt: skip
    run_harness(config, *overrides)
    out = tmp_path / "run"
    results = read_results(out)
    expected = [json.loads(line) for line in (out / "test_predictions.jsonl").read_text().splitlines()]
    assert results["test"]["accuracy"] > 0.75  # a trained model (measured 0.9 and more), so labels vary
    texts = prepare_text_splits(load_config(config, overrides))["test"].texts
    lengths = np.asarray([len(t.split()) for t in texts])
    assert (lengths > 64).mean() > 0.2, "enough texts longer than max_length for the reading to matter"
    if reading == "windows":
        assert results["test"]["windows"] > len(texts)

    (tmp_path / "test.txt").write_text("".join(t + "\n" for t in texts))
    proc = ranks.run("predict", ["--model", str(out / "best"), "--file", str(tmp_path / "test.txt"), "--jsonl"])
    served = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [s["text"] for s in served] == texts
    assert [s["label"] for s in served] == [e["prediction"] for e in expected]  # every example, exactly
    for s, e in zip(served, expected, strict=True):
        assert s["probabilities"] == pytest.approx(e["probabilities"], abs=1e-6)
    accuracy = np.mean([s["label"] == e["label"] for s, e in zip(served, expected, strict=True)])
    assert accuracy == results["test"]["accuracy"]

    # Read another way (plain head truncation at the model's limit), the same model answers differently.
    plain = ranks.run("predict", ["--model", str(out / "best"), "--file", str(tmp_path / "test.txt"), "--jsonl",
                                  "--long", "truncate", "--max-length", "512"])  # fmt: skip
    other = [json.loads(line)["probabilities"] for line in plain.stdout.splitlines()]
    assert any(o != pytest.approx(e["probabilities"], abs=1e-6) for o, e in zip(other, expected, strict=True))
