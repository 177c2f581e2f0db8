"""Sweep helpers for slurm/sweep.sbatch.

python -m launch.sweep line <sweep file> <index>     # the overrides of one task, one per line
python -m launch.sweep summarize <sweep folder>      # every task ranked by its best validation score, test beside
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from harness.config import LOWER_IS_BETTER


def sweep_lines(path: Path) -> list[list[str]]:
    """Each non-blank, non-comment line as a list of key=value words."""
    lines = []
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        words = shlex.split(line)
        bad = [w for w in words if "=" not in w]
        if bad:
            raise ValueError(f"{path}:{number}: expected key=value words, got {bad}")
        lines.append(words)
    return lines


def summarize(sweep_dir: Path) -> list[dict]:
    """One row per task folder: its overrides, how it ended, its best validation score (by the run's own
    eval.metric) and the best model's test scores, ranked by validation (the selected task first and marked).

    Test scores are shown for reference only: choosing by them would tune on the test set."""
    rows = []
    tasks = sorted(sweep_dir.glob("task-*"), key=lambda p: int(p.name.split("-")[1].split(".")[0]))
    for task in (p for p in tasks if p.is_dir()):
        overrides_file = sweep_dir / f"{task.name}.overrides"
        row = {"task": task.name, "overrides": overrides_file.read_text().strip() if overrides_file.is_file() else ""}
        status_file, results_file = task / "exit_status.json", task / "results.json"
        row["status"] = json.loads(status_file.read_text())["status"] if status_file.is_file() else "running or lost"
        if results_file.is_file() and row["status"] == "completed":
            results = json.loads(results_file.read_text())
            best = results["best"]
            row["metric"] = best["metric"]
            row["validation"] = best["value"]
            row["test"] = (results.get("test") or {}).get(best["metric"])
            row["steps"] = results["optimizer_steps"]
            row["wall_s"] = results["wall_seconds"]
        rows.append(row)
    scored = [r for r in rows if r.get("validation") is not None]
    metrics = {r["metric"] for r in scored}
    if len(metrics) > 1:
        raise ValueError(
            f"{sweep_dir}: its tasks selected by different eval.metric {sorted(metrics)}; cannot rank them"
        )
    lower = bool(metrics & LOWER_IS_BETTER)
    scored.sort(key=lambda r: r["validation"] if lower else -r["validation"])
    for rank, row in enumerate(scored, start=1):
        row["rank"] = rank
        row["selected"] = rank == 1
    return scored + [r for r in rows if r.get("validation") is None]


def format_table(rows: list[dict]) -> str:
    metric = next((r["metric"] for r in rows if "metric" in r), "metric")
    headers = ["rank", "task", "overrides", "status", f"validation {metric}", f"test {metric}", "steps", "wall_s"]
    keys = ["rank", "task", "overrides", "status", "validation", "test", "steps", "wall_s"]

    def cell(row: dict, key: str) -> str:
        value = row.get(key, "")
        text = f"{value:.4f}" if isinstance(value, float) else "" if value is None else str(value)
        return text + ("  <- selected" if key == "wall_s" and row.get("selected") else "")

    cells = [[cell(r, k) for k in keys] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.sweep", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    line = commands.add_parser("line", help="print the overrides of task INDEX")
    line.add_argument("sweep_file", type=Path)
    line.add_argument("index", type=int)
    summary = commands.add_parser("summarize", help="print a table of the sweep's tasks")
    summary.add_argument("sweep_dir", type=Path)
    summary.add_argument("--json", action="store_true", help="JSON rows instead of a table")
    args = parser.parse_args(argv)
    try:
        if args.command == "line":
            lines = sweep_lines(args.sweep_file)
            if not 0 <= args.index < len(lines):
                raise ValueError(f"{args.sweep_file}: task {args.index} asked for, but it has {len(lines)} lines")
            print("\n".join(lines[args.index]))  # one per line: the shell reads them with mapfile
            return 0
        if not args.sweep_dir.is_dir():
            raise ValueError(f"{args.sweep_dir}: no such sweep folder")
        rows = summarize(args.sweep_dir)
        print(json.dumps(rows, indent=1) if args.json else format_table(rows))
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
