"""The stop request's signal handling in this process: one signal delivered twice (the launcher's copy plus
SLURM's) is one request; a second signal seconds later still exits at once, with the requeue code."""

from __future__ import annotations

import os
import signal

import pytest

from harness import distributed
from harness.distributed import EXIT_REQUEUE, StopRequest


@pytest.fixture
def stop():
    saved = {sig: signal.getsignal(sig) for sig in StopRequest.SIGNALS}
    request = StopRequest().install()
    request.phase = "train"
    yield request
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def test_one_signal_delivered_twice_is_one_request(stop, monkeypatch):
    monkeypatch.setattr(distributed.os, "_exit", lambda code: pytest.fail(f"exited with {code}"))
    os.kill(os.getpid(), signal.SIGTERM)  # SLURM's
    first = stop.requested_at
    os.kill(os.getpid(), signal.SIGTERM)  # the launcher's copy, milliseconds later
    assert stop.requested and stop.requested_at == first and stop.signal_name == "SIGTERM"


def test_a_second_signal_later_exits_at_once(stop, monkeypatch):
    exits = []
    monkeypatch.setattr(distributed.os, "_exit", exits.append)
    os.kill(os.getpid(), signal.SIGUSR1)
    stop.requested_at -= StopRequest.SAME_REQUEST_S  # as if the first came that long ago
    os.kill(os.getpid(), signal.SIGTERM)
    assert exits == [EXIT_REQUEUE]
