"""`python -m harness.predict` as users run it, on a model that harness/train.py trained: arguments, a file and
stdin; JSON lines; input order; the same answers as transformers' pipeline; exit code 2 for bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests import ranks
from tests.conftest import ROOT, run_harness, tiny_config

pytestmark = pytest.mark.slow

POSITIVE = "great excellent wonderful superb"
NEGATIVE = "awful terrible boring dull"
# Mixed lengths, so that sorting by length reorders them across batches of 2.
TEXTS = [
    "the film was " + "great excellent " * 12 + "and the cast was wonderful",
    NEGATIVE,
    "superb",
    "the story was dull and the ending was boring but the music was brilliant",
    POSITIVE,
    "terrible",
    ("a charming film with a clever script " * 3).strip(),
]


def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BERT trained to beat chance clearly (72 steps, ~3 s of training on 2 cores), shared by the predict
    and report tests of one pytest session: trained by whichever module asks first, then reused."""
    out = tmp_path_factory.getbasetemp() / "trained-tiny-run"
    if not (out / "run" / "results.json").is_file():  # results.json is the run's last file
        out.mkdir(exist_ok=True)
        config = tiny_config(
            out,
            data={"synthetic_train_size": 1200, "max_length": 32},
            train={"batch_size": 32, "lr": 2e-3, "max_steps": 72},
            eval={"every_steps": 20},
        )
        run_harness(config, "overwrite=true")
    return out / "run"


@pytest.fixture(scope="module")
def best(tmp_path_factory) -> Path:
    return trained_run(tmp_path_factory) / "best"


def predict_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    """`python -m harness.predict ARGS`: with text on stdin, the real command; otherwise its main() in a process
    forked from the test session's forkserver (its stdin is empty)."""
    if stdin is None:
        return ranks.run("predict", list(args), check=False, timeout=120)
    return subprocess.run(
        [sys.executable, "-m", "harness.predict", *args],
        cwd=ROOT, input=stdin, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_argument_texts_as_jsonl_in_input_order_and_equal_to_the_pipeline(best):
    proc = predict_cli("--model", str(best), "--jsonl", "--batch-size", "2", *TEXTS)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["text"] for r in rows] == TEXTS
    for r in rows:
        assert r["label"] in {"neg", "pos"} and set(r["probabilities"]) == {"neg", "pos"}
        assert sum(r["probabilities"].values()) == pytest.approx(1.0, abs=1e-6)
        assert r["score"] == r["probabilities"][r["label"]] > 0.5
    by_text = {r["text"]: r["label"] for r in rows}
    assert by_text[POSITIVE] == "pos" and by_text[NEGATIVE] == "neg"  # the model learned the synthetic signal

    # The reference: transformers' own pipeline on the same folder, one text at a time (no padding), told the
    # run's input pipeline (head truncation at 32 tokens) that harness.predict reads from the export's harness.json.
    from transformers import pipeline

    classifier = pipeline("text-classification", model=str(best), device="cpu")
    for r, expected in zip(rows, classifier(TEXTS, top_k=None, truncation=True, max_length=32), strict=True):
        top = max(expected, key=lambda e: e["score"])
        assert r["label"] == top["label"]
        for e in expected:
            assert r["probabilities"][e["label"]] == pytest.approx(e["score"], abs=1e-5)


def test_file_with_blank_lines_readable_aligned_output(best, tmp_path):
    path = tmp_path / "reviews.txt"
    path.write_text(f"{POSITIVE}\n\n   \n{NEGATIVE}\n{'boring ' * 40}\n")
    proc = predict_cli("--model", str(best), "--file", str(path))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 3
    labels = [line.split()[0] for line in lines]
    scores = [float(line.split()[1]) for line in lines]
    assert labels[:2] == ["pos", "neg"] and labels[2] in {"neg", "pos"} and all(0.5 < s <= 1 for s in scores)
    assert lines[0].endswith(POSITIVE) and lines[1].endswith(NEGATIVE)
    assert lines[2].endswith("…") and len(lines[2]) < 100  # the long text is cut for display
    assert len({line.index(line.split()[2]) for line in lines}) == 1  # texts start in one column


def test_stdin_when_no_texts_or_file(best):
    proc = predict_cli("--model", str(best), "--jsonl", stdin=f"{NEGATIVE}\n\n{POSITIVE}\n")
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [(r["text"], r["label"]) for r in rows] == [(NEGATIVE, "neg"), (POSITIVE, "pos")]


def test_bad_input_exits_2_naming_the_problem(best, tmp_path):
    run_dir = best.parent
    cases = [
        (["--model", str(tmp_path / "missing"), "text"], f"--model {tmp_path / 'missing'}: no such folder"),
        (["--model", str(run_dir), "text"], f"no config.json); did you mean {best}?"),
        (["--model", str(best), "--file", str(tmp_path / "none.txt")], f"--file {tmp_path / 'none.txt'}: cannot read"),
        (["--model", str(best)], "no texts to classify: stdin held no non-blank text"),
    ]
    for args, message in cases:
        proc = predict_cli(*args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert message in proc.stderr and proc.stdout == "", (args, proc.stderr)


def test_a_model_that_ships_its_own_code_exports_it_and_serves_with_trust_remote_code(tmp_path):
    from transformers import pipeline

    from tests.remote_code import write_remote_code_model

    model = write_remote_code_model(tmp_path / "remote")
    config = tiny_config(tmp_path, model={"name_or_path": str(model), "trust_remote_code": True},
                         train={"max_steps": 3})  # fmt: skip
    run_harness(config)
    best = tmp_path / "run" / "best"
    # The export carries the code its config.json names, so it loads anywhere, from the folder alone.
    assert {"configuration_tiny_remote.py", "modeling_tiny_remote.py"} <= {p.name for p in best.iterdir()}
    auto_map = json.loads((best / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForSequenceClassification"] == "modeling_tiny_remote.TinyRemoteForSequenceClassification"
    classify = pipeline("text-classification", model=str(best), trust_remote_code=True)
    assert type(classify.model).__name__ == "TinyRemoteForSequenceClassification"
    proc = predict_cli("--model", str(best), "--jsonl", "--trust-remote-code", POSITIVE)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["label"] == classify(POSITIVE)[0]["label"]
    refused = predict_cli("--model", str(best), POSITIVE)
    assert refused.returncode == 2 and "pass --trust-remote-code to run it" in refused.stderr, refused.stderr
