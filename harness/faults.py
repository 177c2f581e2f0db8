"""Fault injection for tests of the failure paths, driven by environment variables (never by the config, so
that no experiment file can turn it on by accident)."""

from __future__ import annotations

import os

NAN_STEPS_ENV = "HARNESS_INJECT_NAN_STEPS"


def injected_nan_steps() -> set[int]:
    """Optimizer steps (1-based) whose loss is replaced by NaN: HARNESS_INJECT_NAN_STEPS=3,4,5."""
    raw = os.environ.get(NAN_STEPS_ENV, "")
    return {int(part) for part in raw.split(",") if part.strip()}
