"""Fault injection for tests of the failure paths, driven by environment variables (never by the config, so
that no experiment file can turn it on by accident)."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

import torch

NAN_STEPS_ENV = "HARNESS_INJECT_NAN_STEPS"
NAN_GRAD_STEPS_ENV = "HARNESS_INJECT_NAN_GRAD_STEPS"
NAN_EVAL_STEPS_ENV = "HARNESS_INJECT_NAN_EVAL_STEPS"
PAUSE_ENV = "HARNESS_INJECT_PAUSE"


def _steps(name: str) -> frozenset[int]:
    return frozenset(int(part) for part in os.environ.get(name, "").split(",") if part.strip())


@dataclass(frozen=True)
class Faults:
    nan_loss: frozenset[int]
    """Optimizer steps (1-based) whose loss is replaced by NaN: HARNESS_INJECT_NAN_STEPS=3,4,5."""
    nan_grad: frozenset[int]
    """Steps whose loss stays finite but whose gradients are NaN: HARNESS_INJECT_NAN_GRAD_STEPS=3."""
    nan_eval: frozenset[int] = frozenset()
    """Steps whose validation scores are NaN (as after an fp16 overflow in the forward pass):
    HARNESS_INJECT_NAN_EVAL_STEPS=10."""

    def for_step(self, step: int) -> str | None:
        return "nan-loss" if step in self.nan_loss else "nan-grad" if step in self.nan_grad else None


def injected_faults() -> Faults:
    return Faults(_steps(NAN_STEPS_ENV), _steps(NAN_GRAD_STEPS_ENV), _steps(NAN_EVAL_STEPS_ENV))


_paused: set[str] = set()


def pause(phase: str, once: bool = False) -> None:
    """HARNESS_INJECT_PAUSE=phase:seconds (setup, tokenize, train, validation, checkpoint, test, status): sleep that
    long there, once the phase's work is under way, announcing it on stderr, so a test can signal the run in that
    phase (with `once`, only the first time the process gets there)."""
    spec = os.environ.get(PAUSE_ENV, "")
    name, _, seconds = spec.partition(":")
    if name == phase and seconds and not (once and phase in _paused):
        _paused.add(phase)
        print(f"fault injection: pausing {seconds} s in {phase}", file=sys.stderr, flush=True)
        time.sleep(float(seconds))


class _NonFiniteGradient(torch.autograd.Function):
    """The identity forward; NaN gradients backward (a finite loss whose gradients are not)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad * float("nan")


def inject_fault(loss_sum: torch.Tensor, fault: str | None) -> torch.Tensor:
    """Fault injection for tests, before backward so that it reaches every path (DeepSpeed steps inside its
    backward): a NaN loss (HARNESS_INJECT_NAN_STEPS) or a finite loss with NaN gradients
    (HARNESS_INJECT_NAN_GRAD_STEPS)."""
    if fault == "nan-loss":
        return loss_sum * float("nan")
    if fault == "nan-grad":
        return _NonFiniteGradient.apply(loss_sum)
    return loss_sum
