"""Run logging for humans and machines: rich progress on a terminal, plain lines in batch logs (SLURM),
rank-prefixed warnings, and `metrics.jsonl` (one JSON object per event) written by the main process.

Named `console` rather than `logging` so that running `python harness/train.py` (which puts harness/ on
sys.path) can never shadow the standard library's logging module.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)


def quiet_library_progress_bars() -> None:
    """datasets' and transformers' own bars would interleave with ours (and fill batch logs)."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


class RunLog:
    def __init__(self, output_dir: Path, is_main: bool, rank: int, progress: str = "auto"):
        self.is_main = is_main
        self.rank = rank
        self.metrics_path = output_dir / "metrics.jsonl"
        self.use_rich = is_main and (progress == "rich" or (progress == "auto" and sys.stdout.isatty()))
        self.console = Console(highlight=False) if self.use_rich else None
        self._progress: Progress | None = None
        self._task = None
        self._start = time.monotonic()
        self._tracker: Callable[..., None] | None = None
        self.phase: str | None = None
        """Set to "finish" for the final export, validation and test: their rows carry it (`truncate_after`)."""

    def attach_tracker(self, log: Callable[..., None]) -> None:
        """Also send train / eval records to `log(values, step=...)` (Accelerator.log: the configured trackers)."""
        self._tracker = log

    # -- messages ----------------------------------------------------------------------------------------
    def info(self, message: str) -> None:
        if not self.is_main:
            return
        if self.console is not None:
            self.console.print(message)
        else:
            print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)

    def warn(self, message: str) -> None:
        """Every rank may warn; the prefix says which."""
        print(f"[rank {self.rank}] WARNING: {message}", file=sys.stderr, flush=True)

    # -- metrics.jsonl -----------------------------------------------------------------------------------
    def record(self, event: str, **values: Any) -> None:
        if not self.is_main:
            return
        row = {"event": event, "time": round(time.time(), 3), **values, **({"phase": self.phase} if self.phase else {})}
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tracker is not None and event in ("train", "eval"):
            scalars = {
                f"{values['split']}/{name}": value
                for name, value in values.items()
                if name not in ("step", "epoch") and isinstance(value, (int, float)) and not isinstance(value, bool)
            }
            self._tracker(scalars, step=values["step"])

    def truncate_after(self, step: int) -> None:
        """Drop rows an interrupted run logged after `step`, and those of its finish (a resumed run logs them
        again), atomically."""
        if not self.is_main or not self.metrics_path.is_file():
            return
        rows = [(line, json.loads(line)) for line in self.metrics_path.read_text().splitlines() if line.strip()]
        kept = [line for line, row in rows if row.get("step", -1) <= step and row.get("phase") != "finish"]
        tmp = self.metrics_path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(self.metrics_path)
        self.record("resume", step=step)

    # -- progress ----------------------------------------------------------------------------------------
    def start_progress(self, total_steps: int) -> None:
        self._start = time.monotonic()
        if self.use_rich and total_steps > 0:
            self._progress = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                TextColumn("{task.fields[status]}"),
                console=self.console,
            )
            self._progress.start()
            self._task = self._progress.add_task("train", total=total_steps, status="")

    def advance(self, step: int, total_steps: int, values: dict[str, Any] | None) -> None:
        """Move the bar to `step`; with `values` (a log step), show them (rich) or print a plain line."""
        if not self.is_main:
            return
        if self._progress is not None:
            status = "  ".join(f"{k} {_fmt(v)}" for k, v in (values or {}).items())
            fields = {"status": status} if values else {}
            self._progress.update(self._task, completed=step, **fields)
        elif values:
            elapsed = time.monotonic() - self._start
            eta = elapsed / max(step, 1) * (total_steps - step)
            body = "  ".join(f"{k} {_fmt(v)}" for k, v in values.items())
            self.info(f"step {step}/{total_steps}  {body}  eta {timedelta(seconds=round(eta))}")

    def stop_progress(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    # -- tables ------------------------------------------------------------------------------------------
    def metrics_table(self, title: str, rows: dict[str, dict[str, float]]) -> None:
        if not self.is_main:
            return
        # Every scalar score the rows have (classification, multi-label, regression or masked-LM), in order.
        names = list(dict.fromkeys(n for values in rows.values() if values for n, v in values.items()
                                   if isinstance(v, float) and n != "samples"))  # fmt: skip
        if self.console is None:
            for split, values in rows.items():
                self.info(f"{title} [{split}] " + "  ".join(f"{n} {values[n]:.4f}" for n in names if n in values))
            return
        table = Table(title=title)
        table.add_column("split")
        for n in names:
            table.add_column(n, justify="right")
        for split, values in rows.items():
            table.add_row(split, *(f"{values[n]:.4f}" if n in values else "" for n in names))
        self.console.print(table)


class LossWindow:
    """The training loss since the last log line: each rank sums its steps' losses on the device (no host sync
    per step) and the steps' weights; the ranks' sums are read only when a line is logged or a checkpoint saved."""

    def __init__(self, accelerator, per_rank: list[float], weight: float):
        self.accelerator = accelerator
        start = per_rank[accelerator.process_index] if per_rank else 0.0
        self.loss_sum = torch.tensor(start, device=accelerator.device)
        self.weight = weight

    def add(self, step_loss: torch.Tensor, weight: float) -> None:
        self.loss_sum += step_loss
        self.weight += weight

    def skip(self, weight: float) -> None:
        """A skipped step's weight still counts (as when it is logged: the window's steps, applied or not)."""
        self.weight += weight

    def mean(self) -> float:
        """The window's loss over all ranks; then a new window starts. Host sync: one all-reduce and one read."""
        total = self.accelerator.reduce(self.loss_sum, reduction="sum").item()
        loss = total / (self.weight if self.weight > 0 else 1)
        self.loss_sum.zero_()
        self.weight = 0
        return loss

    def per_rank(self) -> list[float]:
        """Each rank's summed loss so far (for a checkpoint). Collective: every rank calls it."""
        from accelerate.utils import gather_object

        return [float(v) for v in gather_object([self.loss_sum.item()])]
