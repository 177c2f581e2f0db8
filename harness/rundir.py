"""The run's folder: one folder every rank shares, one run in it at a time, and a finished run left alone.

`RunDirectory.claim` runs on every rank before anything is read from or written to output_dir:
* every rank must see the folder rank 0 sees (a probe file written by rank 0, read by all): nodes whose
  output_dir resolves to different local folders would each write part of every checkpoint, and a later
  resume would hang;
* rank 0 holds an advisory lock (`.harness.lock`, flock) for the run's lifetime: a second run into the same
  folder (a second terminal, a requeued job whose predecessor is still alive) stops at once, naming the holder.
  The kernel drops the lock when the holder dies, so SIGKILL and requeue still resume;
* a completed run (exit_status.json says so) is not run again: the same command says where its results are;
  overwrite=true redoes it.
Each refusal is a `RunDirectoryError` on every rank (exit code 2) before any work.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from harness.config import ConfigError, ExperimentConfig
from harness.locking import LockingUnsupported, try_lock

if TYPE_CHECKING:  # imported where used: harness.cli writes the exit status before torch is imported
    from accelerate import Accelerator

LOCK_FILE = ".harness.lock"
PROBE_PREFIX = ".harness-probe-"
EXIT_STATUS_FILE = "exit_status.json"
PREDICTIONS_FILE = "test_predictions.jsonl"
TRACKER_DIR = "trackers"
RUN_FILES = ("config.yaml", "metrics.jsonl", "results.json", "report.html", "best", "final", "checkpoints",
             EXIT_STATUS_FILE, PREDICTIONS_FILE, TRACKER_DIR)  # fmt: skip
"""What a run writes into output_dir: a fresh run (overwrite=true) replaces exactly these, nothing else."""


def remove_run_files(path: Path, keep: tuple[str, ...] = ()) -> None:
    """Remove a run's files (RUN_FILES) from its folder, but `keep`; nothing else there is touched."""
    for name in RUN_FILES:
        target = path / name
        if name in keep:
            continue
        shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)


def is_bookkeeping(path: Path) -> bool:
    """Files that do not make an output_dir "not empty": the harness's own hidden ones, and the exit status of a
    run stopped before its first step (which wrote nothing else)."""
    return path.name in (LOCK_FILE, EXIT_STATUS_FILE) or path.name.startswith(PROBE_PREFIX)


class RunDirectoryError(ConfigError):
    """output_dir cannot be used by this run; the message names why and what to do."""

    def __init__(self, problem: str):
        super().__init__([problem], "output_dir")


@dataclass
class RunDirectory:
    path: Path
    lock_fd: int | None
    """rank 0's open lock file (the flock lives as long as it is open); None on other ranks."""
    job: str | None = None
    """This run's job (RunPlace.job), written into the lock file by `announce`."""
    last: dict = field(default_factory=dict)
    """What the run that last held the lock recorded (rank 0 only): its job and how it started, so that a
    restarted job finds its own first attempt and can start as it did."""

    @classmethod
    def claim(cls, cfg: ExperimentConfig, accelerator: Accelerator, job: str | None = None) -> RunDirectory:
        path = Path(cfg.output_dir)
        _check_shared(path, accelerator)
        lock_fd, holder, last = None, None, {}
        if accelerator.is_main_process:
            lock_fd, holder, last = _lock(path)
        from accelerate.utils import broadcast_object_list

        refusal = None
        if holder is not None:
            refusal = (f"output_dir {path} is in use by another run ({holder}); wait for it to end, or choose another "
                       "output_dir")  # fmt: skip
        elif accelerator.is_main_process and not cfg.overwrite:
            refusal = _completed(path)
        [refusal] = broadcast_object_list([refusal]) if accelerator.num_processes > 1 else [refusal]
        if refusal:
            if lock_fd is not None:
                os.close(lock_fd)
            raise RunDirectoryError(refusal)
        return cls(path, lock_fd, job, last)

    def announce(self, start: str) -> None:
        """Write who holds the lock (host, pid, start time, command) into the lock file: what a second run reports;
        and its job and `start` ("fresh", or the checkpoint it resumed from): what a restart of the job replays.
        Called once every input has been checked, so a refused run leaves the file as it was."""
        if self.lock_fd is None:
            return
        holder = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                  "command": " ".join(sys.argv), "job": self.job, "start": start}  # fmt: skip
        os.ftruncate(self.lock_fd, 0)
        os.pwrite(self.lock_fd, json.dumps(holder).encode(), 0)


def _check_shared(path: Path, accelerator: Accelerator) -> None:
    """Rank 0 writes a probe into output_dir; every rank must read it back there."""
    from accelerate.utils import broadcast_object_list, gather_object

    if accelerator.num_processes == 1:
        return
    name = None
    if accelerator.is_main_process:
        path.mkdir(parents=True, exist_ok=True)
        name = PROBE_PREFIX + secrets.token_hex(8)
        (path / name).write_text(name)
    [name] = broadcast_object_list([name])
    probe = path / name
    seen = probe.is_file() and probe.read_text() == name
    views = gather_object([(socket.gethostname(), accelerator.process_index, str(path.resolve()), seen)])
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        probe.unlink(missing_ok=True)
    blind = [f"rank {rank} on {host} ({where})" for host, rank, where, ok in views if not ok]
    if blind:
        raise RunDirectoryError(
            f"output_dir {path}: rank 0 on {views[0][0]} wrote into {views[0][2]}, but {', '.join(blind)} cannot see "
            "it. Every node must see one shared output_dir: a folder on a filesystem all nodes mount, by the same path"
        )


def _lock(path: Path) -> tuple[int | None, str | None, dict]:
    """(the locked file's descriptor, None, what the last holder recorded), or (None, who holds it, {}) when
    another run does. Where the file system has no flock, the file is kept open unlocked, with a warning: two runs
    into one folder are then not stopped here, while the shared-folder check (`_check_shared`) still holds."""
    path.mkdir(parents=True, exist_ok=True)
    fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        locked = try_lock(fd, path / LOCK_FILE)
    except LockingUnsupported as exc:
        print(f"warning: {exc}; a second run into output_dir {path} will not be refused", file=sys.stderr, flush=True)
        locked = True
    content = os.pread(fd, 4096, 0).decode(errors="replace")
    try:
        record = json.loads(content) if content else {}
    except ValueError:
        record = {}
    if locked:
        return fd, None, record if isinstance(record, dict) else {}
    os.close(fd)
    try:
        return None, f"pid {record['pid']} on {record['host']}, started {record['started']}: {record['command']}", {}
    except (KeyError, TypeError):
        return None, "a run still setting up", {}


def write_exit_status(output_dir: str | Path, status: str, code: int) -> None:
    """<output_dir>/exit_status.json, from the main process (RANK 0): how the run ended, for batch scripts.

    Launchers (torchrun, accelerate launch) turn any failing worker into their own exit code 1, so a SLURM
    script reads this file to tell a preemption (requeue it) from a failure (do not)."""
    if os.environ.get("RANK", "0") != "0" or not os.path.isdir(output_dir):
        return
    path = os.path.join(output_dir, EXIT_STATUS_FILE)
    with open(path + ".tmp", "w") as f:
        json.dump({"status": status, "exit_code": code, "time": time.time()}, f)
    os.replace(path + ".tmp", path)


def _completed(path: Path) -> str | None:
    status_file = path / EXIT_STATUS_FILE
    try:
        status = json.loads(status_file.read_text()).get("status")
    except (OSError, ValueError, AttributeError):
        return None
    if status != "completed":
        return None
    return (f"output_dir {path}: this run has completed (results.json, best/ and final/ are there; "
            f"python -m harness.report {path} shows it); pass overwrite=true to run it again, or choose another "
            "output_dir")  # fmt: skip
