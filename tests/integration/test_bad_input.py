"""Bad input: exit code 2 and a message naming the problem, before any training, with output_dir untouched."""

import hashlib

import pandas as pd
import pytest

from tests.conftest import run_harness, tiny_config

pytestmark = pytest.mark.slow


def snapshot(folder):
    return {
        p.relative_to(folder): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def previous_run(tmp_path_factory):
    """An interrupted run with checkpoints, whose folder every bad invocation below points at (a completed one
    would be refused as completed before the inputs are read)."""
    tmp = tmp_path_factory.mktemp("bad")
    config = tiny_config(tmp, train={"max_steps": 4}, checkpoint={"every_steps": 2})
    run_harness(config)
    (tmp / "run" / "exit_status.json").unlink()
    return config, tmp / "run"


def write_files(folder, train, test):
    folder.mkdir(parents=True, exist_ok=True)
    for name, frame in (("train.csv", train), ("test.csv", test)):
        if isinstance(frame, bytes):
            (folder / name).write_bytes(frame)
        else:
            frame.to_csv(folder / name, index=False)
    return folder


GOOD = pd.DataFrame({"text": [f"review {i}" for i in range(40)], "label": [i % 2 for i in range(40)]})


def case_overrides(kind, tmp_path, run_dir):
    data = ["data.source=path", "data.validation_size=4"]
    if kind == "unknown key":
        return ["train.lrr=1"], "train.lrr: unknown key (did you mean 'train.lr'?)"
    if kind == "wrong type":
        return ["train.batch_size=many"], "train.batch_size: expected an integer, got 'many'"
    if kind == "zero lr":
        return ["train.lr=0"], "train.lr: must be > 0"
    if kind == "negative batch size":
        return ["train.batch_size=-4"], "train.batch_size: must be >= 1"
    if kind == "max_length above the model's limit":
        return ["data.max_length=1024"], "data.max_length: 1024 exceeds the model's limit of 512 tokens"
    if kind == "missing data path":
        return [*data, f"data.path={tmp_path / 'nowhere'}"], "no such folder"
    if kind == "malformed data file":
        folder = write_files(tmp_path / "d", GOOD, b'text,label\n"unterminated,1\n\x00\xff')
        return [*data, f"data.path={folder}"], "test.csv: cannot read it as csv"
    if kind == "missing label column":
        folder = write_files(tmp_path / "d", GOOD[["text"]], GOOD)
        return [*data, f"data.path={folder}"], "train.csv: missing column(s) ['label']"
    if kind == "label outside the label set":
        bad = GOOD.assign(label=[i % 3 for i in range(40)])
        folder = write_files(tmp_path / "d", bad, GOOD)
        return [*data, f"data.path={folder}"], "row 2: column 'label': label 2 is not in the label set"
    if kind == "empty split":
        folder = write_files(tmp_path / "d", GOOD, GOOD.iloc[:0])
        return [*data, f"data.path={folder}"], "test.csv: the split is empty"
    if kind == "model path that is not a model":
        (tmp_path / "not-a-model").mkdir()
        return [f"model.name_or_path={tmp_path / 'not-a-model'}"], "not a model folder (no config.json)"
    if kind == "resume path that is not a checkpoint":
        (tmp_path / "not-a-checkpoint").mkdir()
        return [f"checkpoint.resume={tmp_path / 'not-a-checkpoint'}"], "checkpoint.resume:"
    if kind == "checkpoint from another model":
        return [f"model.name_or_path={run_dir / 'best'}", "checkpoint.resume=auto"], "the checkpoint"
    raise AssertionError(kind)


KINDS = [
    "unknown key", "wrong type", "zero lr", "negative batch size", "max_length above the model's limit",
    "missing data path", "malformed data file", "missing label column", "label outside the label set",
    "empty split", "model path that is not a model", "resume path that is not a checkpoint",
    "checkpoint from another model",
]  # fmt: skip


@pytest.mark.parametrize("kind", KINDS)
def test_bad_input_exits_2_and_touches_nothing(kind, previous_run, tmp_path):
    config, run_dir = previous_run
    before = snapshot(run_dir)
    overrides, message = case_overrides(kind, tmp_path, run_dir)
    # overwrite=true where the case allows it: even a run told to replace output_dir must check first.
    allow = [] if "checkpoint" in kind else ["overwrite=true"]
    proc = run_harness(config, *overrides, *allow, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert snapshot(run_dir) == before


def test_non_empty_output_dir_is_refused_without_overwrite(previous_run, tmp_path):
    config, run_dir = previous_run
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    proc = run_harness(config, f"output_dir={tmp_path / 'mine'}", check=False)
    assert proc.returncode == 2 and "not empty" in proc.stderr
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
