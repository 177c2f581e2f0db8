"""Command line: `python -m launch INTENT [N] [options] -- ENTRY_ARGS...`; a thin shell around build_command.

It measures the host (GPU devices, usable cores, a free port), builds the command, prints it as one
shell-quoted line and replaces itself with it (os.execvpe), so the exit code and signals such as SLURM's
USR1 reach the launcher's processes directly. `--dry-run` prints the line on stdout and exits 0.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import sys
from dataclasses import replace
from pathlib import Path

from launch.commands import DEFAULT_SCRIPT, INTENTS, Command, Host, Request, build_command
from launch.slurm import LaunchError

USAGE = """\
python -m launch {debug,cpu,gpus,zero1,zero2,zero3,zero3-offload,fsdp,fsdp-offload} [N] [--script PATH] [--dry-run] [--max-restarts N]
                 [--nodes K --node-rank R --head-addr HOST --port P | --from-slurm] -- ENTRY_ARGS...
       python -m launch search SEARCH.yaml | --summary FOLDER     (an Optuna search: launch/search.py)"""

EPILOG = """\
examples:
  python -m launch debug -- --config configs/quickstart.yaml
  python -m launch cpu 2 -- --config configs/quickstart.yaml
  python -m launch zero2 8 -- --config configs/imdb_bert_base.yaml
  python -m launch fsdp 8 -- --config configs/imdb_bert_base.yaml
  python -m launch zero3 8 --nodes 2 --node-rank 0 --head-addr node01 --port 29500 -- --config ...
  srun --ntasks-per-node=1 python -m launch gpus --from-slurm -- --config ...

processes per node: N, else $NPROC_PER_NODE, else the node's GPUs (SLURM_GPUS_ON_NODE, SLURM_GPUS_PER_NODE,
CUDA_VISIBLE_DEVICES). Without GPUs, `gpus` runs CPU gloo processes with torchrun.
port: --port, else $MASTER_PORT, else (SLURM) 15000 + SLURM_JOB_ID % 10000, else a free port."""

EXIT_USAGE = 2


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Split at the first `--`: launcher options before it, the entry script's arguments after it."""
    parser = argparse.ArgumentParser(
        prog="python -m launch",
        usage=USAGE,
        description="Turn an intent into the right python/torchrun/accelerate command, print it and run it.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("intent", choices=INTENTS, help="what to run")
    parser.add_argument("nproc", nargs="?", type=_positive_int, metavar="N", help="processes per node")
    parser.add_argument("--script", default=DEFAULT_SCRIPT, help=f"entry script (default {DEFAULT_SCRIPT})")
    parser.add_argument("--dry-run", action="store_true", help="print the command on stdout; do not run it")
    parser.add_argument("--max-restarts", type=_count, default=0, metavar="N",
                        help="restart the node's processes N times after one fails; they resume from the newest "
                             "checkpoint (torchrun's elastic restarts; for preemption, use SLURM's requeue)")  # fmt: skip
    nodes = parser.add_argument_group("multi-node (gpus, zero*, fsdp*, cpu)")
    nodes.add_argument("--nodes", type=_positive_int, metavar="K", help="number of nodes")
    nodes.add_argument("--node-rank", type=int, metavar="R", help="this node's rank, 0 on the head node")
    nodes.add_argument("--head-addr", metavar="HOST", help="address of the node-rank-0 host")
    nodes.add_argument("--port", type=int, metavar="P", help="rendezvous port, the same on every node")
    nodes.add_argument("--from-slurm", action="store_true", help="read nodes, rank, head, port and GPUs from SLURM")
    if "--" in argv:
        split = argv.index("--")
        own, entry_args = argv[:split], argv[split + 1 :]
    else:
        own, entry_args = argv, None
    args = parser.parse_args(own)
    if entry_args is None:
        parser.error("give the entry script's arguments after `--`, e.g. -- --config configs/quickstart.yaml")
    return args, entry_args


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def measure_host() -> Host:
    """GPU device files (no torch import: the launcher starts in milliseconds), usable cores, a free port."""
    gpus = sum(1 for path in Path("/dev").glob("nvidia*") if re.fullmatch(r"nvidia\d+", path.name))
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    with socket.socket() as sock:
        sock.bind(("", 0))
        free_port = sock.getsockname()[1]
    return Host(gpus=gpus, cpus=cpus, free_port=free_port)


def resolve_program(name: str) -> str:
    """Run the tools of the interpreter running us (its venv), even when that venv is not activated."""
    if name == "python":
        return sys.executable
    sibling = Path(sys.executable).parent / name
    return str(sibling) if os.access(sibling, os.X_OK) else name


def missing_files(command: Command, script: str) -> list[str]:
    """Paths the command needs (entry script, accelerate config) that do not exist from the cwd."""
    argv = command.argv
    needed = [script, *([argv[argv.index("--config_file") + 1]] if "--config_file" in argv else [])]
    return [path for path in needed if not Path(path).is_file()]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["search"]:  # an Optuna search whose trials are launches (launch/search.py)
        from launch.search import main as search

        return search(argv[1:])
    args, entry_args = parse_args(argv)
    request = Request(
        intent=args.intent,
        nproc=args.nproc,
        script=args.script,
        script_args=tuple(entry_args),
        nodes=args.nodes,
        node_rank=args.node_rank,
        head_addr=args.head_addr,
        port=args.port,
        from_slurm=args.from_slurm,
        max_restarts=args.max_restarts,
    )
    try:
        command = build_command(request, os.environ, measure_host())
    except LaunchError as exc:
        print(f"launch: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    missing = missing_files(command, args.script)
    if missing:
        print(f"launch: error: not found from {Path.cwd()}: {', '.join(missing)}; run from the repository root",
              file=sys.stderr)  # fmt: skip
        return EXIT_USAGE
    command = replace(command, argv=[resolve_program(command.argv[0]), *command.argv[1:]])
    for note in command.notes:
        print(f"launch: {note}", file=sys.stderr)
    # The command line is the first thing in the log; on stdout for --dry-run so `$(...)` captures it.
    print(command.shell(), file=sys.stdout if args.dry_run else sys.stderr, flush=True)
    if args.dry_run:
        return 0
    sys.stderr.flush()
    # SIGUSR1 (SLURM's early warning, sent to every process of the job step) must reach only the training
    # processes, which install their own handler: torchrun and accelerate have none, and would die of it
    # and orphan their workers. An ignored signal stays ignored across exec into the launcher program.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    try:
        os.execvpe(command.argv[0], command.argv, {**os.environ, **command.env})
    except FileNotFoundError:
        print(f"launch: error: {command.argv[0]} not found; activate the project's virtual environment",
              file=sys.stderr)  # fmt: skip
        return 127
    return 0  # not reached: exec replaced this process


if __name__ == "__main__":
    sys.exit(main())
