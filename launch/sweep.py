"""Sweep helpers for slurm/sweep.sbatch.

python -m launch.sweep line <sweep file> <index>     # the overrides of one task, one per line
python -m launch.sweep summarize <sweep folder>      # a table of every task: overrides, status, test metrics
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

COLUMNS = ("accuracy", "f1_macro", "loss")


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
    """One row per task folder: its overrides, how it ended, and the best model's test metrics."""
    rows = []
    tasks = sorted(sweep_dir.glob("task-*"), key=lambda p: int(p.name.split("-")[1].split(".")[0]))
    for task in (p for p in tasks if p.is_dir()):
        overrides_file = sweep_dir / f"{task.name}.overrides"
        row = {"task": task.name, "overrides": overrides_file.read_text().strip() if overrides_file.is_file() else ""}
        status_file, results_file = task / "exit_status.json", task / "results.json"
        row["status"] = json.loads(status_file.read_text())["status"] if status_file.is_file() else "running or lost"
        if results_file.is_file() and row["status"] == "completed":
            results = json.loads(results_file.read_text())
            row.update({name: results["test"][name] for name in COLUMNS})
            row["steps"] = results["optimizer_steps"]
            row["wall_s"] = results["wall_seconds"]
        rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    headers = ["task", "overrides", "status", *COLUMNS, "steps", "wall_s"]
    cells = [[f"{r[h]:.4f}" if isinstance(r.get(h), float) else str(r.get(h, "")) for h in headers] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
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
