"""Trackers through Accelerate (TensorBoard, MLflow, trackio): the same numbers as metrics.jsonl, read back with
each tracker's own reader; unknown or missing trackers refused."""

import json
import signal
from pathlib import Path

import pytest

from tests.conftest import read_metrics, read_results, run_harness, start_harness, tiny_config
from tests.integration.test_fault_tolerance import wait_for

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


def test_mlflow_and_trackio_receive_the_run_and_its_resumed_attempt_continues_it(tmp_path, monkeypatch):
    """A real local MLflow store (SQLite) and trackio store, read back with their own clients: the config as
    parameters, every train / eval record by step, results.json and report.html as files; a run preempted and
    resumed is one MLflow run and one trackio run, whose latest value at each step is metrics.jsonl's."""
    pytest.importorskip("mlflow", reason="needs MLflow (pip install -e '.[mlflow]')")
    pytest.importorskip("trackio", reason="needs trackio (pip install -e '.[trackio]')")
    from mlflow import MlflowClient
    from trackio import sqlite_storage
    from trackio.sqlite_storage import SQLiteStorage

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {"MLFLOW_TRACKING_URI": store, "TRACKIO_DIR": str(tmp_path / "trackio")}
    config = tiny_config(tmp_path, train={"max_steps": 12}, eval={"every_steps": 6}, checkpoint={"every_steps": 4},
                         logging={"every_steps": 2, "progress": "plain", "trackers": ["mlflow", "trackio"],
                                  "project": "imdb-search"})  # fmt: skip
    client = MlflowClient(store)  # the experiment made beforehand, as a team's is, with its artifacts beside
    client.create_experiment("imdb-search", artifact_location=str(tmp_path / "artifacts"))  # (default: ./mlruns)
    out = tmp_path / "run"
    proc = start_harness(config, env_extra=env)
    wait_for(out, lambda r: r["event"] == "train" and r["step"] >= 6, proc)
    proc.send_signal(signal.SIGUSR1)
    first = proc.wait(timeout=120)
    assert first.returncode == 75, first.stderr[-3000:]
    second = run_harness(config, env_extra=env)
    results = read_results(out)
    assert results["resumed_from_step"] is not None and results["optimizer_steps"] == 12
    assert "tracking: mlflow run" in second.stdout and f"at {store}" in second.stdout

    rows = read_metrics(out)  # the resumed run's rows: the latest value per step, as the report reads them
    train = {r["step"]: r["loss"] for r in rows if r["event"] == "train"}
    validation = {r["step"]: r["accuracy"] for r in rows if r.get("split") == "validation"}
    assert sorted(train) == [2, 4, 6, 8, 10, 12] and sorted(validation) == [6, 12]

    experiment = client.get_experiment_by_name("imdb-search")
    [run] = client.search_runs([experiment.experiment_id])  # one run, continued by the resumed attempt
    assert run.info.run_name == "run" and run.info.status == "FINISHED"
    assert run.data.params["train.lr"] == "0.001" and run.data.params["model.name_or_path"] == "builtin:tiny-bert"
    history = {m.step: m.value for m in sorted(client.get_metric_history(run.info.run_id, "train/loss"),
                                                key=lambda m: m.timestamp)}  # fmt: skip
    assert history == pytest.approx(train, rel=1e-6)
    assert {m.step: m.value for m in client.get_metric_history(run.info.run_id, "validation/accuracy")} == (
        pytest.approx(validation))  # fmt: skip
    [test_f1] = client.get_metric_history(run.info.run_id, "test/f1_macro")
    assert (test_f1.step, test_f1.value) == (results["best"]["step"], pytest.approx(results["test"]["f1_macro"]))
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"results.json", "report.html"}
    assert sorted(p.name for p in (tmp_path / "artifacts").glob("*/artifacts/*")) == ["report.html", "results.json"]
    assert json.loads(Path(client.download_artifacts(run.info.run_id, "results.json", str(tmp_path))).read_text()) == (
        results)  # fmt: skip

    monkeypatch.setattr(sqlite_storage, "TRACKIO_DIR", tmp_path / "trackio")  # read from TRACKIO_DIR at import
    assert SQLiteStorage.get_runs("imdb-search") == ["run"]
    logs = SQLiteStorage.get_logs("imdb-search", "run")
    latest = {}
    for row in logs:
        if "train/loss" in row:
            latest[row["step"]] = row["train/loss"]
    assert latest == pytest.approx(train, rel=1e-6)
    assert [row["test/f1_macro"] for row in logs if "test/f1_macro" in row] == [
        pytest.approx(results["test"]["f1_macro"])
    ]
    assert SQLiteStorage.get_run_config("imdb-search", "run")["train.lr"] == 0.001
    artifacts = SQLiteStorage.get_run_artifacts("imdb-search", "run", None)["output"]
    assert {a["name"] for a in artifacts} == {"run-results.json", "run-report.html"}
