"""Advisory file locks (flock) between the processes of a run and across runs: which run owns an output_dir
(harness/rundir.py) and which process fills a cache entry while the others wait for it (harness/data/).

The kernel drops a lock when its holder dies, so SIGKILL and preemption never leave one behind. Some shared
file systems do not implement flock (Lustre mounted without `-o flock`, some NFS setups): `try_lock` raises
`LockingUnsupported` there, and each caller falls back to a way that needs no lock, with a warning."""

from __future__ import annotations

import errno
import fcntl
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

UNSUPPORTED = {errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK, errno.EINVAL}
"""What flock fails with where the file system has no locks (rather than another process holding one)."""


class LockingUnsupported(OSError):
    """The file system of the lock file does not implement flock."""


def try_lock(fd: int, path: Path) -> bool:
    """Take the exclusive lock on an open file without waiting: True if taken, False if another process holds
    it; LockingUnsupported where the file system has no flock."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as exc:
        if exc.errno in UNSUPPORTED:
            raise LockingUnsupported(
                exc.errno, f"{path}: the file system does not support flock ({exc.strerror})"
            ) from exc
        raise
    return True


@contextmanager
def held(path: Path, waiting: str, report_every_s: float = 60.0, poll_s: float = 0.2) -> Iterator[bool]:
    """Hold the exclusive lock on `path` (created if missing) inside the block: True once held; False where the
    file system has no locks (then the block runs unguarded, with a warning). While another process holds it,
    wait, with no time limit (a collective would fail after runtime.collective_timeout_s), and say so on stderr
    every `report_every_s` seconds: `waiting` names what for. Signals still stop the wait (the handler runs
    between polls)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        started = reported = time.monotonic()
        try:
            while not try_lock(fd, path):
                now = time.monotonic()
                if now - reported >= report_every_s:
                    print(f"waiting {now - started:.0f} s for {waiting} ({path} is held by another process)",
                          file=sys.stderr, flush=True)  # fmt: skip
                    reported = now
                time.sleep(poll_s)
        except LockingUnsupported as exc:
            print(f"warning: {exc}; going on without it", file=sys.stderr, flush=True)
            yield False
            return
        yield True
    finally:
        os.close(fd)  # closing drops the lock
