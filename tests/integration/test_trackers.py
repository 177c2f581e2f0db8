"""TensorBoard through Accelerate's trackers: the same numbers as metrics.jsonl; unknown trackers refused."""

import pytest

from tests.conftest import read_metrics, read_results, run_harness, tiny_config

pytestmark = pytest.mark.slow


def test_tensorboard_receives_the_train_and_eval_records(tmp_path):
    pytest.importorskip("tensorboard", reason="needs the tensorboard package (dev extra)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = tiny_config(tmp_path, train={"max_steps": 10}, eval={"every_steps": 5},
                         logging={"every_steps": 2, "progress": "plain", "trackers": ["tensorboard"]})  # fmt: skip
    run_harness(config)
    out = tmp_path / "run"
    events = EventAccumulator(str(out / "trackers" / "run"))  # <output_dir>/trackers/<run name>/
    events.Reload()
    train = {r["step"]: r["loss"] for r in read_metrics(out) if r["event"] == "train"}
    logged = {e.step: e.value for e in events.Scalars("train/loss")}
    assert sorted(logged) == sorted(train) == [2, 4, 6, 8, 10]
    assert logged == pytest.approx(train, rel=1e-6)
    validation = {r["step"]: r["accuracy"] for r in read_metrics(out) if r.get("split") == "validation"}
    assert {e.step: e.value for e in events.Scalars("validation/accuracy")} == pytest.approx(validation)
    results = read_results(out)  # the test row is logged at the step of the best model it evaluates
    assert [(e.step, e.value) for e in events.Scalars("test/f1_macro")] == [
        (results["best"]["step"], pytest.approx(results["test"]["f1_macro"]))
    ]


def test_an_unknown_tracker_is_refused_before_anything_is_written(tmp_path):
    proc = run_harness(tiny_config(tmp_path), "logging.trackers=[tensorbored]", check=False)
    assert proc.returncode == 2
    assert "logging.trackers: unknown tracker 'tensorbored'" in proc.stderr and "tensorboard" in proc.stderr
    assert not (tmp_path / "run").exists()
