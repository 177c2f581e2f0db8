"""Real runs of the entry points without paying Python's imports for each: one forkserver per test session.

A fresh interpreter spends seconds importing torch, transformers, datasets, accelerate, evaluate and DeepSpeed
before the harness does anything, and the suite runs about a hundred harness processes. Here a forkserver
(multiprocessing's) imports all of that once (`tests/preload.py`); every run forks from it. Each run is still its
own process (its own RNG, Accelerate state, signal handlers, exit code; SIGKILL kills it alone), and `nproc`
ranks form a real gloo world from the environment torchrun would give them (RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT).

What this does not exercise, the launchers themselves (torchrun, accelerate launch, python -m launch, SLURM), is
tested with real launcher processes elsewhere (tests/distributed/test_launch_cpu.py, test_gloo.py, tests/integration/).
"""

from __future__ import annotations

import importlib
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Read when the libraries are imported, so set before the forkserver imports them.
BASE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONUNBUFFERED": "1"}  # fmt: skip
ENTRIES = {"train": "harness.train", "pretrain": "harness.pretrain", "predict": "harness.predict"}

_context: multiprocessing.context.ForkServerContext | None = None


def context() -> multiprocessing.context.ForkServerContext:
    global _context
    if _context is None:
        os.environ.update(BASE_ENV)
        if "DS_ACCELERATOR" not in os.environ and not os.path.exists("/dev/nvidia0"):
            os.environ["DS_ACCELERATOR"] = "cpu"  # as the harness sets it on CPU, before DeepSpeed is imported
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(["tests.preload"])
    return _context


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(entry: str, argv: list[str], env: dict[str, str], stdout: str, stderr: str, cwd: str) -> None:
    """A rank's body, in the forked process: its output to files, its environment and folder, then the entry's
    main()."""
    for fd, path in ((1, stdout), (2, stderr)):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115  (the process's own stdout)
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.environ.update(env)
    os.chdir(cwd)
    sys.argv = [f"harness/{entry}.py", *argv]  # what the harness records as the run's command, as if typed
    code = importlib.import_module(ENTRIES[entry]).main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    sys.exit(code)


@dataclass
class Ranks:
    """The processes of one run (one per rank), started by `start`."""

    processes: list[multiprocessing.process.BaseProcess]
    outputs: list[tuple[Path, Path]]
    argv: list[str]
    envs: list[dict[str, str]] = field(default_factory=list)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    def poll(self) -> int | None:
        """None while any rank runs; then the run's exit code (the first non-zero rank's, else 0)."""
        if any(p.exitcode is None for p in self.processes):
            return None
        return next((p.exitcode for p in self.processes if p.exitcode), 0)

    def wait(self, timeout: float = 300) -> subprocess.CompletedProcess:
        deadline = time.monotonic() + timeout
        for p in self.processes:
            p.join(max(0.0, deadline - time.monotonic()))
        if any(p.exitcode is None for p in self.processes):
            self.kill()
            raise AssertionError(f"run timed out after {timeout} s: {self.argv}\n{self.stderr()[-4000:]}")
        return subprocess.CompletedProcess(self.argv, self.poll(), self.stdout(), self.stderr())

    def kill(self, rank: int | None = None) -> None:
        """SIGKILL every rank (or one) and reap it."""
        for p in self.processes if rank is None else [self.processes[rank]]:
            if p.exitcode is None:
                p.kill()
            p.join()

    def send_signal(self, sig: int) -> None:
        for p in self.processes:
            if p.exitcode is None:
                os.kill(p.pid, sig)

    def stdout(self) -> str:
        return "".join(out.read_text() for out, _ in self.outputs if out.is_file())

    def stderr(self) -> str:
        return "".join(err.read_text() for _, err in self.outputs if err.is_file())


def start(entry: str, argv: list[str], nproc: int = 1, env_extra: dict[str, str] | None = None,
          log_dir: Path | None = None, cwds: list[Path] | None = None) -> Ranks:  # fmt: skip
    """Start `nproc` ranks of an entry point ('train', 'pretrain', 'predict') with these arguments, each in the
    repository root (or in its own folder of `cwds`: "nodes" that resolve relative paths differently)."""
    ctx = context()
    log_dir = Path(log_dir or tempfile.mkdtemp(prefix="harness-ranks-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    port = str(free_port())
    processes, outputs, envs = [], [], []
    stamp = f"{os.getpid()}-{time.monotonic_ns()}"
    for rank in range(nproc):
        env = dict(env_extra or {})
        if nproc > 1:
            env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
                       GROUP_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)  # fmt: skip
        out, err = log_dir / f"{stamp}-rank{rank}.out", log_dir / f"{stamp}-rank{rank}.err"
        cwd = str(cwds[rank] if cwds else ROOT)
        process = ctx.Process(target=_rank_main, args=(entry, list(argv), env, str(out), str(err), cwd), daemon=False)
        process.start()
        processes.append(process)
        outputs.append((out, err))
        envs.append(env)
    return Ranks(processes, outputs, [entry, *argv], envs)


def run(entry: str, argv: list[str], nproc: int = 1, env_extra: dict[str, str] | None = None,
        timeout: float = 300, check: bool = True, log_dir: Path | None = None) -> subprocess.CompletedProcess:  # fmt: skip
    """Run an entry point to its end; with `check`, a non-zero exit raises with the output's tail."""
    proc = start(entry, argv, nproc, env_extra, log_dir).wait(timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(proc.args)} (nproc {nproc}) exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
        )
    return proc
