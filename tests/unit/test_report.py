"""harness.report on hand-written run folders: axes, charts, tables, label names and the errors (milliseconds)."""

import json
import re

import pytest

from harness import report as R

TEST = {
    "loss": 0.31234,
    "accuracy": 0.875,
    "precision": 0.8571428,
    "recall": 0.9,
    "f1_macro": 0.87468,
    "f1_micro": 0.875,
    "confusion_matrix": [[17, 3], [2, 18]],
    "samples": 40,
}


def write_run(out, train_steps=(10, 20, 30), eval_steps=(15, 30), best_step=30, id2label=None):
    """A finished run's files as harness/train.py writes them, with made-up numbers."""
    out.mkdir(parents=True, exist_ok=True)
    rows = [{"event": "setup", "total_steps": max(train_steps, default=0), "world_size": 2, "device": "cpu",
             "distributed_type": "MULTI_CPU", "backend": "gloo", "precision": "bf16"}]  # fmt: skip
    for s in train_steps:
        rows.append({"event": "train", "split": "train", "step": s, "epoch": s / 30, "loss": 1 / s, "lr": 1e-4 * s,
                     "grad_norm": 0.5, "samples_per_s": 100.0 + s, "tokens_per_s": 9000.0})  # fmt: skip
    for s in eval_steps:
        rows.append({"event": "eval", "split": "validation", "step": s, "epoch": s / 30, **TEST, "loss": 0.4 + s / 1000,
                     "accuracy": 0.5 + s / 100})  # fmt: skip
    rows.append({"event": "eval", "split": "test", "step": best_step, **TEST})
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    results = {
        "test": TEST,
        "best": {"step": best_step, "metric": "loss", "value": 0.43, "validation": {**TEST, "accuracy": 0.8}},
        "world_size": 2,
        "optimizer_steps": max(train_steps, default=0),
        "wall_seconds": 12.5,
        "train_seconds": 10.0,
        "train_samples_per_s": 123.456,
        "train_tokens_per_s": 9876.5,
        "train_mfu": 0.4123,
        "peak_tflops": 1978.0,
        "peak_source": "measured",
        "precision": "bf16",
        "model": "builtin:tiny-bert",
    }
    (out / "results.json").write_text(json.dumps(results))
    if id2label is not None:
        (out / "best").mkdir()
        (out / "best" / "config.json").write_text(json.dumps({"id2label": id2label}))
    return out


# ---- axes -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "lo, hi, expected",
    [
        (0, 126, [0, 50, 100, 150]),
        (0.1, 0.69, [0, 0.2, 0.4, 0.6, 0.8]),
        (0.757, 0.98, [0.75, 0.8, 0.85, 0.9, 0.95, 1.0]),
        (0, 1e-3, [0, 2e-4, 4e-4, 6e-4, 8e-4, 1e-3]),
        (5, 5, [4.4, 4.6, 4.8, 5.0, 5.2, 5.4, 5.6]),  # a flat curve gets room around it
    ],
)
def test_nice_ticks_are_round_and_enclose_the_range(lo, hi, expected):
    ticks = R.nice_ticks(lo, hi)
    assert ticks == pytest.approx(expected)
    assert ticks[0] <= lo and ticks[-1] >= hi


def test_tick_labels_one_style_per_axis():
    assert R.tick_labels([0, 50, 100, 1500]) == ["0", "50", "100", "1,500"]
    assert R.tick_labels([0.75, 0.8, 1.0]) == ["0.75", "0.8", "1"]
    assert R.tick_labels([0, 5e-4, 1e-3]) == ["0", "5.0e-04", "1.0e-03"]  # learning rates


# ---- charts ---------------------------------------------------------------------------------------------


def test_line_chart_draws_each_series_and_escapes_names():
    svg = R.line_chart("Loss <train>", {"a&b": [(1, 0.5), (2, 0.4), (3, 0.3)], "empty": []}, marker=(2, "best"))
    assert svg.count("<svg") == 1 and svg.count("<polyline") == 1  # the empty series is left out
    points = re.search(r'<polyline[^>]*points="([^"]+)"', svg).group(1).split()
    assert len(points) == 3
    assert "Loss &lt;train&gt;" in svg and "a&amp;b" in svg and "a&b" not in svg
    assert 'class="marker"' in svg and ">best<" in svg
    # y grows downwards in SVG: a falling loss has rising y coordinates.
    ys = [float(p.split(",")[1]) for p in points]
    assert ys == sorted(ys)


def test_line_chart_without_points_is_a_note():
    html = R.line_chart("Learning rate", {"lr": []}, empty_message="No training steps.")
    assert "<svg" not in html and "No training steps." in html


def test_single_point_chart_is_drawn():
    svg = R.line_chart("Loss", {"validation": [(0, 0.69)]})
    assert "<svg" in svg and svg.count("<circle") == 1 and "nan" not in svg


def test_a_tiny_flat_curve_has_distinct_ticks():
    ticks = R.nice_ticks(8.333e-13, 8.333e-13)
    assert len(set(ticks)) == len(ticks) >= 2 and ticks[0] <= 8.333e-13 <= ticks[-1]
    assert "<svg" in R.line_chart("Learning rate", {"lr": [(5, 8.333e-13)]})


def test_non_finite_values_are_left_off_the_curve():
    svg = R.line_chart("Accuracy", {"validation": [(10, float("nan")), (20, 0.8), (30, float("inf")), (40, 0.9)]})
    assert svg.count("<circle") == 2 and "nan" not in svg and "inf" not in svg
    only_nan = R.line_chart("Loss", {"train": [(10, float("nan"))]}, empty_message="No finite loss.")
    assert "<svg" not in only_nan and "No finite loss." in only_nan


# ---- reading a run --------------------------------------------------------------------------------------


def test_latest_record_of_a_repeated_step_wins():
    rows = [{"step": 10, "loss": 1.0}, {"step": 20, "loss": 0.9}, {"step": 10, "loss": 0.5}]
    assert R.latest_per_step(rows) == [{"step": 10, "loss": 0.5}, {"step": 20, "loss": 0.9}]


def test_label_names_from_best_config_else_indices(tmp_path):
    assert R.label_names(write_run(tmp_path / "a", id2label={"1": "pos", "0": "neg"}), 2) == ["neg", "pos"]
    assert R.label_names(write_run(tmp_path / "b"), 2) == ["0", "1"]
    assert R.label_names(write_run(tmp_path / "c", id2label={"0": "only"}), 2) == ["0", "1"]  # wrong count


# ---- the report -----------------------------------------------------------------------------------------


def test_report_holds_summary_curves_tables_and_confusion_matrix(tmp_path):
    out = write_run(tmp_path / "run", id2label={"0": "neg", "1": "pos"})
    path = R.write_report(out)
    assert path == out / "report.html"
    html = path.read_text()
    assert html.count("<svg") == 5  # loss, learning rate, validation accuracy/F1, throughput, gradient norm
    for name in ("loss", "accuracy", "precision", "recall", "f1_macro", "f1_micro"):
        assert f"<td>{TEST[name]:.4f}</td>" in html, name
    for count in (17, 3, 2, 18):
        assert f">{count}</td>" in html
    assert "<th>neg</th>" in html and "<th>pos</th>" in html
    assert "MULTI_CPU, gloo" in html and "bf16" in html and "123.5" in html and "9,876" in html
    assert "41.2% of 1,978 TFLOP/s (measured)" in html
    assert '<tr class="best"><td>30</td>' in html  # the best evaluation is marked in the validation table
    assert "<script" not in html and "http" not in html  # self-contained: nothing to fetch


def test_report_of_an_evaluate_only_run(tmp_path):
    out = write_run(tmp_path / "run", train_steps=(), eval_steps=(0,), best_step=0)
    html = R.write_report(out, tmp_path / "elsewhere" / "r.html").read_text()
    assert html.count("<svg") == 2  # loss (the one validation point) and validation accuracy/F1
    assert html.count("No training steps were logged") == 3  # learning rate, throughput, gradient norm
    assert f"<td>{TEST['accuracy']:.4f}</td>" in html


@pytest.mark.parametrize("missing", ["metrics.jsonl", "results.json"])
def test_missing_run_file_is_named(tmp_path, missing, capsys):
    out = write_run(tmp_path / "run")
    (out / missing).unlink()
    assert R.main([str(out)]) == R.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.startswith("error: ") and f"{out / missing}: not found" in err
    assert not (out / "report.html").exists()


def test_missing_output_dir(tmp_path, capsys):
    assert R.main([str(tmp_path / "nope")]) == R.EXIT_BAD_INPUT
    assert f"output_dir {tmp_path / 'nope'}: no such folder" in capsys.readouterr().err


def test_cut_short_metrics_line_is_skipped_with_a_warning(tmp_path, capsys):
    out = write_run(tmp_path / "run")
    text = (out / "metrics.jsonl").read_text().splitlines(keepends=True)
    # A run killed while writing line 3, then resumed: the cut line is followed by more records.
    text[2] = text[2][:25] + "\n"
    (out / "metrics.jsonl").write_text("".join(text))
    assert R.main([str(out)]) == 0
    assert "skipped 1 line(s) that are not JSON objects: line 3" in capsys.readouterr().err
    assert len(R.load_run(out).train) == 2
