"""Fault injection for tests of the failure paths, driven by environment variables (never by the config, so
that no experiment file can turn it on by accident)."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

NAN_STEPS_ENV = "HARNESS_INJECT_NAN_STEPS"
NAN_GRAD_STEPS_ENV = "HARNESS_INJECT_NAN_GRAD_STEPS"
PAUSE_ENV = "HARNESS_INJECT_PAUSE"


def _steps(name: str) -> frozenset[int]:
    return frozenset(int(part) for part in os.environ.get(name, "").split(",") if part.strip())


@dataclass(frozen=True)
class Faults:
    nan_loss: frozenset[int]
    """Optimizer steps (1-based) whose loss is replaced by NaN: HARNESS_INJECT_NAN_STEPS=3,4,5."""
    nan_grad: frozenset[int]
    """Steps whose loss stays finite but one gradient becomes NaN: HARNESS_INJECT_NAN_GRAD_STEPS=3."""

    def for_step(self, step: int) -> str | None:
        return "nan-loss" if step in self.nan_loss else "nan-grad" if step in self.nan_grad else None


def injected_faults() -> Faults:
    return Faults(_steps(NAN_STEPS_ENV), _steps(NAN_GRAD_STEPS_ENV))


def pause(phase: str) -> None:
    """HARNESS_INJECT_PAUSE=phase:seconds (setup, validation, checkpoint): sleep that long there, once the
    phase's work is under way, announcing it on stderr, so a test can signal the run in that phase."""
    spec = os.environ.get(PAUSE_ENV, "")
    name, _, seconds = spec.partition(":")
    if name == phase and seconds:
        print(f"fault injection: pausing {seconds} s in {phase}", file=sys.stderr, flush=True)
        time.sleep(float(seconds))
