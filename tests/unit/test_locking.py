"""File locks: a lock held elsewhere is waited for (saying so, with no time limit); a file system without flock
(ENOLCK, ENOSYS, EOPNOTSUPP: some Lustre and NFS mounts) is a warning, never a traceback that stops every start."""

from __future__ import annotations

import errno
import fcntl
import os
import threading
import time

import pytest

from harness import locking
from harness.rundir import _lock


def test_a_held_lock_is_waited_for_and_reported(tmp_path, capsys):
    path = tmp_path / "cache.lock"
    other = os.open(path, os.O_RDWR | os.O_CREAT)  # another open file: flock conflicts, even in this process
    fcntl.flock(other, fcntl.LOCK_EX)
    threading.Timer(0.3, os.close, [other]).start()  # the holder finishes
    started = time.monotonic()
    with locking.held(path, "the tokenization cache", report_every_s=0.1, poll_s=0.02) as locked:
        assert locked and time.monotonic() - started >= 0.3
    assert "for the tokenization cache" in capsys.readouterr().err


@pytest.mark.parametrize("code", [errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP])
def test_a_file_system_without_flock_warns_and_goes_on(tmp_path, monkeypatch, capsys, code):
    monkeypatch.setattr(locking.fcntl, "flock", lambda fd, op: (_ for _ in ()).throw(OSError(code, os.strerror(code))))
    with locking.held(tmp_path / "cache.lock", "the tokenization cache") as locked:
        assert locked is False
    fd, holder, _ = _lock(tmp_path / "run")  # the run's folder: kept, unlocked, with a warning
    assert fd is not None and holder is None
    os.close(fd)
    err = capsys.readouterr().err
    assert "does not support flock" in err and "a second run into output_dir" in err


def test_other_flock_errors_are_not_taken_for_missing_support(tmp_path, monkeypatch):
    monkeypatch.setattr(locking.fcntl, "flock", lambda fd, op: (_ for _ in ()).throw(OSError(errno.EBADF, "bad")))
    with pytest.raises(OSError, match="bad"), locking.held(tmp_path / "x.lock", "x"):
        pass
