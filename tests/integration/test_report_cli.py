"""`python -m harness.report` on real runs of harness/train.py: a trained run and an evaluate-only one."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, read_results, run_harness, tiny_config
from tests.integration.test_predict_cli import trained_run

pytestmark = pytest.mark.slow
METRICS = ("loss", "accuracy", "precision", "recall", "f1_macro", "f1_micro")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return trained_run(tmp_path_factory)


def report_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness.report", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)  # fmt: skip


def test_report_of_a_trained_run(run_dir):
    proc = report_cli(str(run_dir))
    assert proc.returncode == 0, proc.stderr
    path = run_dir / "report.html"
    assert proc.stdout.strip() == f"wrote {path}"
    html = path.read_text()
    results = read_results(run_dir)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [m for m in metrics if m["event"] == "train"]
    validation_rows = [m for m in metrics if m["event"] == "eval" and m["split"] == "validation"]

    # Charts: loss (train + validation), learning rate, validation accuracy/F1, throughput, gradient norm.
    assert html.count("<svg") == 5
    polylines = re.findall(r'<polyline[^>]*points="([^"]+)"', html)
    assert [len(p.split()) for p in polylines] == [
        len(train_rows), len(validation_rows), len(train_rows), len(validation_rows), len(validation_rows),
        len(train_rows), len(train_rows),
    ]  # fmt: skip
    # Every test metric, as printed in results.json, formatted like the console's tables.
    for name in METRICS:
        assert f"<td>{results['test'][name]:.4f}</td>" in html, name
    # One validation table row per evaluation, the best one marked.
    assert html.count("<tr><td>") + html.count('<tr class="best"><td>') == len(validation_rows)
    assert f'<tr class="best"><td>{results["best"]["step"]}</td>' in html
    # The test confusion matrix with the model's label names.
    (tn, fp), (fn, tp) = results["test"]["confusion_matrix"]
    cells = re.findall(r'<td class="(hit|miss)"[^>]*>(\d+)</td>', html)
    assert cells == [("hit", str(tn)), ("miss", str(fp)), ("miss", str(fn)), ("hit", str(tp))]
    assert "<th>neg</th>" in html and "<th>pos</th>" in html
    assert f"<td>{results['optimizer_steps']}</td>" in html and f"<td>{results['model']}</td>" in html
    assert "<script" not in html and "http" not in html  # self-contained


def test_report_of_an_evaluate_only_run(tmp_path):
    config = tiny_config(tmp_path, data={"synthetic_train_size": 64, "synthetic_test_size": 40, "validation_size": 20})
    run_harness(config, "train.max_steps=0")
    out = tmp_path / "custom" / "eval-only.html"
    proc = report_cli(str(tmp_path / "run"), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    html = out.read_text()
    results = read_results(tmp_path / "run")
    assert results["optimizer_steps"] == 0
    assert html.count("<svg") == 2  # the loss and accuracy/F1 charts, each with the one validation at step 0
    assert html.count("No training steps were logged") == 3
    for name in METRICS:
        assert f"<td>{results['test'][name]:.4f}</td>" in html, name
    assert sum(int(c) for c in re.findall(r'<td class="(?:hit|miss)"[^>]*>(\d+)</td>', html)) == 40


def test_missing_files_exit_2_naming_them(tmp_path):
    proc = report_cli(str(tmp_path / "nope"))
    assert proc.returncode == 2 and f"output_dir {tmp_path / 'nope'}: no such folder" in proc.stderr
    (tmp_path / "metrics.jsonl").write_text("")
    proc = report_cli(str(tmp_path))
    assert proc.returncode == 2 and f"{tmp_path / 'results.json'}: not found" in proc.stderr
    assert not (tmp_path / "report.html").exists()
