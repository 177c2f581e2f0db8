"""Write a self-contained HTML report of a finished run, from its `metrics.jsonl` and `results.json`.

    python -m harness.report runs/quickstart                  # writes runs/quickstart/report.html
    python -m harness.report runs/quickstart --out report.html

The report holds the run summary, training loss, learning-rate, gradient-norm and throughput curves, the
validation metrics of every evaluation (curves and a table), the test metrics of the best model and its test
confusion matrix, with label names from `best/config.json`. Charts are inline SVG drawn here, so the file
needs no network, no JavaScript and no plotting library. Missing or unreadable run files exit with code 2.
"""

from __future__ import annotations

import argparse
import html
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from harness.cli import EXIT_BAD_INPUT

METRIC_NAMES = ("loss", "accuracy", "precision", "recall", "f1_macro", "f1_micro")
"""The columns of a classification run; other problem types show the scalar scores their results hold."""


def metric_names(scores: dict | None) -> tuple[str, ...]:
    """The scalar scores a run reports, loss first (classification: METRIC_NAMES, in that order)."""
    found = [k for k, v in (scores or {}).items() if isinstance(v, (int, float)) and k not in ("samples", "windows")]
    if set(METRIC_NAMES) <= set(found) or not found:
        return METRIC_NAMES
    return tuple(dict.fromkeys(["loss", *found]))


# Series colours (colour-blind safe, from the Okabe-Ito palette).
COLOURS = ("#0072b2", "#d55e00", "#009e73", "#cc79a7", "#e69f00", "#56b4e9")
CHART_WIDTH, CHART_HEIGHT = 560, 260
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 64, 16, 34, 42
MAX_MARKED_POINTS = 60  # beyond this many points a curve is drawn without a dot (and tooltip) per point


class ReportError(ValueError):
    """The run folder cannot be reported on; the message names the file at fault."""


@dataclass
class RunRecord:
    """What a report is made of, read from a run's output_dir."""

    output_dir: Path
    results: dict
    setup: dict
    """The run's "setup" event (world size, device, total steps); empty if absent."""
    train: list[dict]
    """"train" events, one per logged step, in step order."""
    validation: list[dict]
    """Validation "eval" events, one per evaluated step, in step order."""
    labels: list[str]
    """Label names by class id, for the confusion matrix."""


# ---- reading a run ---------------------------------------------------------------------------------------


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ReportError(f"{path}: not found") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ReportError(f"{path}: cannot read it as JSON ({exc})") from exc


def read_metrics_jsonl(path: Path) -> list[dict]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError as exc:
        raise ReportError(f"{path}: not found") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ReportError(f"{path}: cannot read it ({exc})") from exc
    rows, bad = [], []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if isinstance(row, dict):
            rows.append(row)
        else:
            bad.append(number)
    if bad:
        # A run killed while writing leaves a cut-short line, and a resumed run appends after it: report the
        # rest rather than nothing.
        shown = ", ".join(map(str, bad[:5])) + (", ..." if len(bad) > 5 else "")
        print(f"warning: {path}: skipped {len(bad)} line(s) that are not JSON objects: line {shown}", file=sys.stderr)
    return rows


def latest_per_step(rows: list[dict]) -> list[dict]:
    """One row per step, in step order. A resumed run logs the steps after its checkpoint again: the later
    record is the one that led to the final model."""
    by_step = {row["step"]: row for row in rows if isinstance(row.get("step"), (int, float))}
    return [by_step[step] for step in sorted(by_step)]


def label_names(output_dir: Path, num_labels: int) -> list[str]:
    """Names from the exported model's id2label (best/, else final/); class ids as text when there is none."""
    for folder in ("best", "final"):
        path = output_dir / folder / "config.json"
        try:
            id2label = json.loads(path.read_text(encoding="utf-8")).get("id2label") or {}
            names = [str(id2label[key]) for key in sorted(id2label, key=int)]
        except (OSError, ValueError, TypeError, AttributeError):
            continue
        if len(names) == num_labels:
            return names
    return [str(i) for i in range(num_labels)]


def load_run(output_dir: str | Path) -> RunRecord:
    out = Path(output_dir)
    if not out.is_dir():
        raise ReportError(f"output_dir {out}: no such folder" if not out.exists() else f"{out}: not a folder")
    for name in ("metrics.jsonl", "results.json"):
        if not (out / name).is_file():
            raise ReportError(
                f"{out / name}: not found; the report needs a finished run's output_dir "
                "(with metrics.jsonl and results.json)"
            )
    rows = read_metrics_jsonl(out / "metrics.jsonl")
    results = read_json(out / "results.json")
    if not isinstance(results.get("test"), dict):
        raise ReportError(f'{out / "results.json"}: no test results (a "test" object)')
    matrix = results["test"].get("confusion_matrix") or []
    return RunRecord(
        output_dir=out,
        results=results,
        setup=next((row for row in rows if row.get("event") == "setup"), {}),
        train=latest_per_step([row for row in rows if row.get("event") == "train"]),
        validation=latest_per_step(
            [row for row in rows if row.get("event") == "eval" and row.get("split") == "validation"]
        ),
        labels=label_names(out, len(matrix)),
    )


# ---- formatting ------------------------------------------------------------------------------------------


def fmt_metric(value: object) -> str:
    """Metrics as the console prints them: 4 decimals."""
    return f"{value:.4f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "—"


def fmt_mfu(results: dict) -> str:
    """MFU with what it is measured against, e.g. `41.2% of 1,978 TFLOP/s (measured)`."""
    if results.get("train_mfu") is None:
        return "—"
    peak = results["peak_tflops"]
    shown = f"{peak:,.0f}" if peak >= 100 else f"{peak:.3g}"
    return f"{100 * results['train_mfu']:.1f}% of {shown} TFLOP/s ({results['peak_source']})"


def fmt_number(value: object, decimals: int = 1) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "—" if value is None else str(value)
    return f"{value:,}" if isinstance(value, int) else f"{value:,.{decimals}f}"


def tick_labels(ticks: list[float]) -> list[str]:
    """Labels for one axis, in one style: scientific for tiny scales (learning rates), plain otherwise."""
    if 0 < max(abs(t) for t in ticks) < 1e-2:
        return ["0" if t == 0 else f"{t:.1e}" for t in ticks]
    return [f"{int(t):,}" if float(t).is_integer() else f"{t:.4g}" for t in ticks]


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About `count` round-numbered ticks (steps of 1, 2 or 5 x 10^k) whose ends enclose [lo, hi]."""
    if hi < lo:
        lo, hi = hi, lo
    if hi == lo:  # one value, or a flat curve: give it some room
        pad = abs(lo) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    # Multiples of step (not repeated additions), so that 0.1 + 0.2 noise does not creep into the labels;
    # rounded to the step's own digits (a learning rate of 1e-13 has ticks too).
    digits = max(0, -math.floor(math.log10(step))) + 3
    return [round(i * step, digits) for i in range(first, last + 1)]


# ---- charts ----------------------------------------------------------------------------------------------


def line_chart(
    title: str,
    series: dict[str, list[tuple[float, float]]],
    x_label: str = "step",
    marker: tuple[float, str] | None = None,
    empty_message: str = "nothing logged",
) -> str:
    """An inline SVG line chart of `series` ({name: [(x, y), ...]}), with an optional dashed vertical
    `marker` (x, label). Without any point, a short note instead of an empty chart."""
    # Non-finite values (a NaN validation, a diverged loss) have no place on an axis: the curve skips them.
    series = {name: [(float(x), float(y)) for x, y in pts if y is not None and math.isfinite(float(y))]
              for name, pts in series.items()}  # fmt: skip
    series = {name: pts for name, pts in series.items() if pts}
    if not series:
        return f'<figure class="chart"><figcaption>{html.escape(title)}</figcaption><p class="note">{html.escape(empty_message)}</p></figure>'
    xs = [x for pts in series.values() for x, _ in pts]
    ys = [y for pts in series.values() for _, y in pts]
    # Steps from 0, so that the curves of a run line up across charts; a span of at least 5, so that the
    # ticks of a short (or evaluate-only) run fall on whole steps.
    x_lo = min(0.0, *xs)
    x_ticks = nice_ticks(x_lo, max(x_lo + 5.0, *xs))
    y_ticks = nice_ticks(min(ys), max(ys))
    x0, x1, y0, y1 = x_ticks[0], x_ticks[-1], y_ticks[0], y_ticks[-1]
    left, right = MARGIN_LEFT, CHART_WIDTH - MARGIN_RIGHT
    top, bottom = MARGIN_TOP, CHART_HEIGHT - MARGIN_BOTTOM

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * (right - left)

    def py(y: float) -> float:
        return bottom - (y - y0) / (y1 - y0) * (bottom - top)

    parts = [
        f'<svg class="chart" viewBox="0 0 {CHART_WIDTH} {CHART_HEIGHT}" width="{CHART_WIDTH}" '
        f'height="{CHART_HEIGHT}" role="img" aria-label="{html.escape(title)}">',
        f'<text class="title" x="{left}" y="18">{html.escape(title)}</text>',
    ]
    for y, label in zip(y_ticks, tick_labels(y_ticks), strict=True):
        parts.append(f'<line class="grid" x1="{left}" x2="{right}" y1="{py(y):.1f}" y2="{py(y):.1f}"/>')
        parts.append(f'<text class="tick" x="{left - 6}" y="{py(y) + 4:.1f}" text-anchor="end">{label}</text>')
    for x, label in zip(x_ticks, tick_labels(x_ticks), strict=True):
        parts.append(f'<line class="axis" x1="{px(x):.1f}" x2="{px(x):.1f}" y1="{bottom}" y2="{bottom + 4}"/>')
        parts.append(f'<text class="tick" x="{px(x):.1f}" y="{bottom + 16}" text-anchor="middle">{label}</text>')
    parts.append(f'<line class="axis" x1="{left}" x2="{right}" y1="{bottom}" y2="{bottom}"/>')
    parts.append(f'<line class="axis" x1="{left}" x2="{left}" y1="{top}" y2="{bottom}"/>')
    parts.append(
        f'<text class="tick" x="{(left + right) / 2:.1f}" y="{CHART_HEIGHT - 6}" text-anchor="middle">'
        f"{html.escape(x_label)}</text>"
    )
    if marker is not None:
        mx, mlabel = marker
        parts.append(f'<line class="marker" x1="{px(mx):.1f}" x2="{px(mx):.1f}" y1="{top}" y2="{bottom}"/>')
        parts.append(f'<text class="tick" x="{px(mx) + 3:.1f}" y="{top - 3}">{html.escape(mlabel)}</text>')
    # Legend on the title's line, right-aligned: entries of a swatch and the name (about 6.5 px per character).
    legend_x = right - sum(30 + 6.5 * len(name) for name in series)
    for i, (name, pts) in enumerate(series.items()):
        colour = COLOURS[i % len(COLOURS)]
        points = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.8" points="{points}"/>')
        if len(pts) <= MAX_MARKED_POINTS:
            for x, y in pts:
                tip = html.escape(f"{name} @ {x_label} {x:g}: {y:.6g}")
                parts.append(
                    f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.6" fill="{colour}"><title>{tip}</title></circle>'
                )
        parts.append(
            f'<line x1="{legend_x:.1f}" x2="{legend_x + 18:.1f}" y1="14" y2="14" stroke="{colour}" stroke-width="2.5"/>'
        )
        parts.append(f'<text class="tick" x="{legend_x + 22:.1f}" y="18">{html.escape(name)}</text>')
        legend_x += 30 + 6.5 * len(name)
    parts.append("</svg>")
    return '<figure class="chart">' + "".join(parts) + "</figure>"


# ---- tables ----------------------------------------------------------------------------------------------


def key_value_table(rows: list[tuple[str, str]]) -> str:
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    return f'<table class="summary">{body}</table>'


def validation_table(validation: list[dict], best_step: object) -> str:
    if not validation:
        return '<p class="note">No validation events in metrics.jsonl.</p>'
    names = metric_names(validation[-1])
    head = "".join(f"<th>{name}</th>" for name in ("step", "epoch", *names, "samples"))
    body = []
    for row in validation:
        best = ' class="best"' if row.get("step") == best_step else ""
        cells = [fmt_number(row.get("step")), fmt_number(row.get("epoch"), 2)]
        cells += [fmt_metric(row.get(name)) for name in names]
        cells.append(fmt_number(row.get("samples")))
        body.append(f"<tr{best}>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    return f'<table class="metrics"><tr>{head}</tr>{"".join(body)}</table>'


def test_table(test: dict, best_validation: dict | None) -> str:
    columns = [("validation (best model)", best_validation or {}), ("test", test)]
    head = "<th>metric</th>" + "".join(f"<th>{html.escape(name)}</th>" for name, _ in columns)
    body = [
        f"<tr><th>{name}</th>" + "".join(f"<td>{fmt_metric(values.get(name))}</td>" for _, values in columns) + "</tr>"
        for name in metric_names(test)
    ]
    body.append(
        "<tr><th>samples</th>"
        + "".join(f"<td>{fmt_number(values.get('samples'))}</td>" for _, values in columns)
        + "</tr>"
    )
    return f'<table class="metrics"><tr>{head}</tr>{"".join(body)}</table>'


def confusion_section(test: dict, labels: list[str]) -> str:
    """The test confusion matrix of a single-label classifier (other problem types have none)."""
    if "confusion_matrix" not in test and "accuracy" not in test:
        return ""
    return (f'<h2>Test confusion matrix</h2>\n<p class="sub">Rows: true label; columns: predicted label; '
            f'{fmt_number(test.get("samples"))} test examples.</p>\n'
            f"{confusion_matrix_table(test.get('confusion_matrix') or [], labels)}")  # fmt: skip


def confusion_matrix_table(matrix: list[list[int]], labels: list[str]) -> str:
    """Rows are true labels, columns predicted ones; cells shaded by their share of the row."""
    if not matrix:
        return '<p class="note">results.json holds no test confusion matrix.</p>'
    head = '<th class="corner">true ↓ / predicted →</th>' + "".join(f"<th>{html.escape(name)}</th>" for name in labels)
    body = []
    for i, (label, row) in enumerate(zip(labels, matrix, strict=True)):
        total = sum(row) or 1
        cells = []
        for j, count in enumerate(row):
            share = count / total
            kind = "hit" if i == j else "miss"
            cells.append(
                f'<td class="{kind}" style="--share:{share:.3f}" title="{share:.1%} of true {html.escape(label)}">'
                f"{count}</td>"
            )
        body.append(f"<tr><th>{html.escape(label)}</th>{''.join(cells)}</tr>")
    return f'<table class="confusion"><tr>{head}</tr>{"".join(body)}</table>'


# ---- the page --------------------------------------------------------------------------------------------

STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1b1f24; margin: 24px auto;
       max-width: 1180px; padding: 0 16px; }
h1 { font-size: 22px; margin-bottom: 2px; } h2 { font-size: 17px; margin-top: 28px; border-bottom: 1px solid #ddd; }
.sub { color: #666; margin-top: 0; }
table { border-collapse: collapse; margin: 8px 0; }
th, td { padding: 3px 10px; border-bottom: 1px solid #eee; text-align: right; font-variant-numeric: tabular-nums; }
table.summary th { text-align: left; color: #555; font-weight: normal; }
table.summary td { text-align: left; }
tr.best td { background: #eaf4ea; font-weight: 600; }
table.confusion td { min-width: 64px; text-align: center; font-weight: 600; }
table.confusion td.hit { background: rgb(0 114 178 / calc(var(--share) * 0.6)); }
table.confusion td.miss { background: rgb(213 94 0 / calc(var(--share) * 0.6)); }
.corner { color: #666; font-weight: normal; font-size: 12px; }
.charts { display: grid; grid-template-columns: repeat(auto-fill, minmax(560px, 1fr)); gap: 12px; }
figure.chart { margin: 0; }
figcaption { font-weight: 600; }
svg.chart { max-width: 100%; height: auto; background: #fff; }
svg .title { font-size: 13px; font-weight: 600; }
svg .tick { font-size: 11px; fill: #444; }
svg .grid { stroke: #e6e6e6; }
svg .axis { stroke: #888; }
svg .marker { stroke: #999; stroke-dasharray: 4 3; }
.note { color: #777; font-style: italic; }
"""


def describe_place(setup: dict) -> str:
    """ "cpu", or with distribution "cuda (MULTI_GPU, nccl)", from the run's setup event."""
    device = str(setup.get("device", "—"))
    details = [str(setup[k]) for k in ("distributed_type", "backend") if setup.get(k) not in (None, "NO")]
    return f"{device} ({', '.join(details)})" if details else device


def render_report(run: RunRecord) -> str:
    results, setup = run.results, run.setup
    best = results.get("best") or {}
    best_step = best.get("step")
    steps = results.get("optimizer_steps", setup.get("total_steps"))
    summary = [
        ("output_dir", str(run.output_dir)),
        ("model", str(results.get("model", "—"))),
        ("world size", fmt_number(results.get("world_size", setup.get("world_size")))),
        ("device", describe_place(setup)),
        ("precision", str(results.get("precision", setup.get("precision", "—")))),
        ("optimizer steps", fmt_number(steps)),
        ("epochs completed", fmt_number(results.get("epochs_completed"), 2)),
        ("wall seconds", fmt_number(results.get("wall_seconds"))),
        ("train seconds", fmt_number(results.get("train_seconds"))),
        ("train samples/s", fmt_number(results.get("train_samples_per_s"))),
        ("train tokens/s", fmt_number(results.get("train_tokens_per_s"), 0)),
        ("train MFU", fmt_mfu(results)),
        ("best step", fmt_number(best_step)),
        ("best validation", f"{best.get('metric', '—')} {fmt_metric(best.get('value'))}"),
        ("config fingerprint", str(results.get("config_fingerprint", "—"))),
    ]
    no_training = "No training steps were logged: an evaluate-only run (train.max_steps=0)."
    marker = (float(best_step), "best") if isinstance(best_step, (int, float)) and best_step >= 0 else None

    def points(rows: list[dict], key: str) -> list[tuple[float, float]]:
        return [(row["step"], row[key]) for row in rows if isinstance(row.get(key), (int, float))]

    # Two scores besides the loss: accuracy and macro F1 for a classifier, the first two a run reports otherwise.
    shown = [n for n in metric_names(run.validation[-1] if run.validation else None) if n != "loss"][:2]
    shown = ["accuracy", "f1_macro"] if shown == ["accuracy", "precision"] else shown

    charts = [
        line_chart(
            "Loss",
            {"train": points(run.train, "loss"), "validation": points(run.validation, "loss")},
            marker=marker,
            empty_message="No loss was logged.",
        ),
        line_chart("Learning rate", {"lr": points(run.train, "lr")}, empty_message=no_training),
        line_chart(
            "Validation " + " and ".join(shown),
            {name: points(run.validation, name) for name in shown},
            marker=marker,
            empty_message="No validation events.",
        ),
        line_chart(
            "Throughput (samples/s)", {"samples/s": points(run.train, "samples_per_s")}, empty_message=no_training
        ),
        line_chart(
            "Gradient norm (before clipping)",
            {"grad norm": points(run.train, "grad_norm")},
            empty_message=no_training if not run.train else "No gradient norms: clipping (train.max_grad_norm) is off.",
        ),
    ]
    test = results["test"]
    title = f"Run report: {run.output_dir.resolve().name}"
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title>
<style>{STYLE}</style>
</head>
<body>
<h1>{html.escape(title)}</h1>
<p class="sub">{html.escape(str(run.output_dir))} · report written {time.strftime("%Y-%m-%d %H:%M:%S")}</p>
<h2>Summary</h2>
{key_value_table(summary)}
<h2>Curves</h2>
<div class="charts">
{chr(10).join(charts)}
</div>
<h2>Validation per evaluation</h2>
{validation_table(run.validation, best_step)}
<h2>Best model: validation and test</h2>
{test_table(test, best.get("validation"))}
{confusion_section(test, run.labels)}
</body>
</html>
"""


def write_report(output_dir: str | Path, out: str | Path | None = None) -> Path:
    """Render the report of the run in `output_dir` to `out` (default <output_dir>/report.html)."""
    run = load_run(output_dir)
    path = Path(out) if out is not None else run.output_dir / "report.html"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(render_report(run), encoding="utf-8")
    except OSError as exc:
        raise ReportError(f"--out {path}: cannot write it ({exc.strerror or exc})") from exc
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("output_dir", help="a finished run's output_dir (with metrics.jsonl and results.json)")
    parser.add_argument("--out", help="HTML file to write (default: <output_dir>/report.html)")
    args = parser.parse_args(argv)
    try:
        path = write_report(args.output_dir, args.out)
    except ReportError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
