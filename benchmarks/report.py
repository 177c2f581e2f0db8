"""The side-by-side report: one row per workload and side (medians over repeats), a Markdown table, a header
that says where, when and on what the figures were measured, and the JSON behind it all."""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from benchmarks.sides import Runs, SideResult
from benchmarks.workloads import ROOT, PreparedWorkload

if TYPE_CHECKING:
    from benchmarks.vs_trainer import BenchOptions

COLUMNS = ["workload", "side", "train s", "samples/s", "real tokens/s", "padding", "MFU (real tokens)", "{memory}",
           "test accuracy", "harness ÷ this (samples/s)"]  # fmt: skip
"""The table's columns (tests/unit/test_benchmark_smoke.py reads its rows by these positions)."""


@dataclass
class Peak:
    """The measured hardware limit MFU is taken against."""

    flops: float
    precision: str
    size: int
    reps: int

    def describe(self) -> str:
        return (
            f"{self.flops / 1e9:,.1f} GFLOP/s ({self.precision} {self.size}x{self.size} matmul, best of {self.reps} "
            f"before and {self.reps} after the runs)"
        )


@dataclass
class Row:
    """One side of one workload, the median over repeats."""

    workload: str
    side: str
    train_seconds: float
    samples_per_s: float
    real_tokens_per_s: float
    padding_fraction: float
    mfu: float
    """The workload's training FLOPs (harness.throughput.FlopCounter) / train seconds / the peak."""
    peak_memory_mib: float
    test_accuracy: float
    harness_ratio: float
    """Harness samples/s divided by this row's."""
    runs: list[SideResult]


def summarize(prepared: PreparedWorkload, side: str, runs: list[SideResult], peak: Peak) -> Row:
    def median(values) -> float:
        return float(statistics.median(values))

    padded = [r.padded_tokens if r.padded_tokens is not None else prepared.harness_padded_tokens for r in runs]
    return Row(
        workload=prepared.workload.name,
        side=side,
        train_seconds=median(r.train_seconds for r in runs),
        samples_per_s=median(r.train_examples / r.train_seconds for r in runs),
        real_tokens_per_s=median(r.real_tokens / r.train_seconds for r in runs),
        padding_fraction=median(1.0 - r.real_tokens / p if p else math.nan for r, p in zip(runs, padded, strict=True)),
        mfu=median(prepared.train_flops / r.train_seconds for r in runs) / peak.flops,
        peak_memory_mib=median(r.peak_memory_mib for r in runs),
        test_accuracy=median(r.test_accuracy for r in runs),
        harness_ratio=math.nan,
        runs=runs,
    )


def build_rows(prepared: list[PreparedWorkload], runs: Runs, sides: list[str], peak: Peak) -> list[Row]:
    """One row per workload and side, with the harness's samples/s over each row's."""
    rows = []
    for p in prepared:
        group = [summarize(p, side, runs[(p.workload.name, side)], peak) for side in sides]
        harness = next((row for row in group if row.side == "harness"), None)
        for row in group:
            row.harness_ratio = harness.samples_per_s / row.samples_per_s if harness else math.nan
        rows += group
    return rows


def format_table(rows: list[Row], memory_label: str) -> str:
    """A Markdown table: readable in a terminal, pasteable into RESULTS.md."""
    lines = [[c.format(memory=memory_label) for c in COLUMNS]]
    for r in rows:
        lines.append([
            r.workload, r.side, f"{r.train_seconds:.1f}", f"{r.samples_per_s:.2f}", f"{r.real_tokens_per_s:,.0f}",
            f"{100 * r.padding_fraction:.1f}%", f"{100 * r.mfu:.1f}%", f"{r.peak_memory_mib:,.0f}",
            f"{r.test_accuracy:.4f}", f"{r.harness_ratio:.2f}x",
        ])  # fmt: skip
    widths = [max(len(line[i]) for line in lines) for i in range(len(COLUMNS))]
    out = []
    for n, line in enumerate(lines):
        cells = [c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths, strict=True))]
        out.append("| " + " | ".join(cells) + " |")
        if n == 0:
            out.append("|" + "|".join("-" * (w + 1) + ("-" if i < 2 else ":") for i, w in enumerate(widths)) + "|")
    return "\n".join(out)


def machine_description(device: str) -> str:
    """The accelerator (or CPU model and usable cores) and the library versions."""
    import torch
    import transformers

    if device == "cuda":
        hw = f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    else:
        model = platform.processor() or platform.machine()
        try:
            model = next(
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            )
        except (OSError, StopIteration):
            pass
        hw = f"{model}, {len(os.sched_getaffinity(0))} cores"
    return (
        f"{hw}; torch {torch.__version__}, transformers {transformers.__version__}, Python {platform.python_version()}"
    )


def harness_revision() -> str:
    """The commit, and whether harness/ differs from it (the figures then belong to uncommitted code)."""

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--", "harness")
    return commit + (" + uncommitted changes in harness/" if dirty else "")


def describe_workload(p: PreparedWorkload) -> str:
    """One header line: the work, its settings, its size, its FLOPs and the fingerprints every side shares."""
    c = p.flop_counter
    return (
        f"- {p.workload.name}: {p.workload.description}; {p.settings}; {p.train_examples} train / "
        f"{p.test_examples} test examples, mean real length {p.mean_real_length:.1f} tokens; training FLOPs "
        f"(harness.throughput.FlopCounter over every trained sequence's real length s) 6 x {c['dense']:,} x sum(s) "
        f"+ 6 x {c['head']:,} per sequence + 12 x {c['width']} x sum(s^2) over {len(c['windows'])} attention layers = "
        f"{p.train_flops / 1e9:,.1f} GFLOP, "
        f"{p.train_flops / p.real_train_tokens / 1e6:.1f} M per real token; initial weights sha256 "
        f"{p.weights_sha256[:12]}, token ids sha256 {p.data_sha256[:12]} (same on every side)"
    )


def build_report(
    opts: BenchOptions, command: str, prepared: list[PreparedWorkload], rows: list[Row], peak: Peak,
    load: list[float], minutes: float,
) -> str:  # fmt: skip
    """Header (machine, code, command, peak, workloads and their FLOPs, load) and the table, in Markdown."""
    device = opts.work.device
    machine = machine_description(device)
    if opts.work.smoke:
        machine += "; sides run concurrently, 1 thread each"
    elif device == "cpu":
        machine += f"; {opts.threads} thread{'s' if opts.threads != 1 else ''} per side, one side at a time"
    header = [
        f"# harness vs Hugging Face Trainer ({time.strftime('%Y-%m-%d %H:%M')})",
        "",
        f"- machine: {machine}",
        f"- harness: {harness_revision()}",
        f"- command: `{command}`",
        f"- peak: {peak.describe()}",
        *(describe_workload(p) for p in prepared),
    ]
    own = 3 if opts.work.smoke else opts.threads if device == "cpu" else 1
    header.append(
        f"- 1-minute load average around the runs: {min(load):.2f} to {max(load):.2f} (the benchmark itself "
        f"accounts for about {own}; more means other work shared the machine)"
    )
    if device == "cpu" and not opts.work.smoke:
        shares = [f"{row.workload}/{row.side} {100 * statistics.median(r.others_cpu_share for r in row.runs):.0f}%"
                  for row in rows]  # fmt: skip
        header.append(
            "- CPU time other processes used while each side ran, as a share of all cores (0% is a quiet "
            f"machine): {', '.join(shares)}"
        )
    header.append(f"- benchmark time: {minutes:.1f} min; {opts.repeats} repeat(s), interleaved; medians shown")
    memory_label = "peak GPU MiB" if device == "cuda" else "peak RSS MiB"
    return "\n".join(header) + "\n\n" + format_table(rows, memory_label) + "\n"


def write_outputs(
    path: Path, report: str, opts: BenchOptions, prepared: list[PreparedWorkload], rows: list[Row], peak: Peak
) -> None:
    """The report to `path`, and everything behind it (every run of every side) to `path`.json."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(report)
    options = {**asdict(opts.work), **{k: v for k, v in asdict(opts).items() if k != "work"}}
    data = {
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in options.items()},
        "peak": asdict(peak),
        "workloads": [
            {**asdict(p), "workload": {**asdict(p.workload), "config": str(p.workload.config)}} for p in prepared
        ],  # fmt: skip
        "rows": [asdict(r) for r in rows],
    }
    path.with_name(path.name + ".json").write_text(json.dumps(data, indent=2) + "\n")
