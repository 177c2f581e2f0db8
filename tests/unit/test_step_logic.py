"""What a step does when its loss or gradients are not finite (harness.loop.apply_step), with torch's real
GradScaler (its CPU build) and fused AdamW: fp16 overflow is skipped by the scaler, which lowers its scale, the
schedule does not advance and the step is counted; bf16 / fp32 skip without touching the optimizer and stop
after runtime.max_nonfinite_steps in a row; under DeepSpeed fp16 its own scaler's skip is counted and the run
goes on, while a non-finite loss under DeepSpeed bf16 (already applied) stops it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from harness import loop
from harness.checkpoint import TrainState
from harness.config import ExperimentConfig
from harness.optim import build_scheduler


@pytest.fixture
def step_parts():
    return torch.nn.Linear(4, 2)


class ScaledOptimizer:
    """What Accelerate's AcceleratedOptimizer.step does with a loss scaler: scaler.step, then scaler.update."""

    def __init__(self, optimizer, scaler):
        self.optimizer, self.scaler = optimizer, scaler

    def step(self):
        if self.scaler is None:
            return self.optimizer.step()
        self.scaler.step(self.optimizer)
        self.scaler.update()


def make_run(model, precision: str, zero_stage: int = 0, scaler=None):
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)  # fused, as the harness builds it
    wrapped = ScaledOptimizer(optimizer, scaler)
    cfg = ExperimentConfig()
    warnings = []
    return SimpleNamespace(
        cfg=cfg, optimizer=wrapped, scheduler=build_scheduler(optimizer, cfg.train, 10),
        accelerator=SimpleNamespace(scaler=scaler), place=SimpleNamespace(zero_stage=zero_stage, precision=precision),
        log=SimpleNamespace(warn=warnings.append), warnings=warnings,
    )  # fmt: skip


def backward_with_inf(model, scaler=None) -> None:
    model.zero_grad()
    loss = model(torch.ones(3, 4)).sum()
    (scaler.scale(loss) if scaler is not None else loss).backward()
    model.weight.grad[0, 0] = float("inf")


def test_fp16_overflow_is_skipped_by_the_scaler_which_lowers_its_scale(step_parts):
    model = step_parts
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    r = make_run(model, "fp16", scaler=scaler)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    backward_with_inf(model, scaler)
    scaler.unscale_(r.optimizer.optimizer)  # what clipping (gradient_norm) does first
    state = TrainState()
    assert loop.apply_step(r, state, bad_loss=False, bad_grads=True) is False
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items()), "weights untouched"
    assert scaler.get_scale() == 2.0**9 and r.scheduler.last_epoch == 0  # scale lowered, schedule not advanced
    assert state.skipped_steps == 1 and state.nonfinite_streak == 0  # counted, but not a failure streak
    assert "fp16 gradient overflow" in r.warnings[0]
    # A good step after it updates weights and schedule.
    model.zero_grad()
    scaler.scale(model(torch.ones(3, 4)).sum()).backward()
    scaler.unscale_(r.optimizer.optimizer)
    assert loop.apply_step(r, state, bad_loss=False, bad_grads=False) is True
    assert not torch.equal(model.weight, before["weight"]) and r.scheduler.last_epoch == 1


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_nonfinite_gradients_without_a_scaler_skip_and_stop_after_the_streak(step_parts, precision):
    model = step_parts
    r = make_run(model, precision)
    r.cfg.runtime.max_nonfinite_steps = 2
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = TrainState()
    backward_with_inf(model)
    assert loop.apply_step(r, state, bad_loss=False, bad_grads=True) is False
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items()) and r.scheduler.last_epoch == 0
    assert state.skipped_steps == 1 and state.nonfinite_streak == 1
    assert "non-finite gradient norm (finite loss)" in r.warnings[0]
    with pytest.raises(loop.NonFiniteLoss, match="2 consecutive steps with a non-finite loss or gradient"):
        loop.apply_step(r, state, bad_loss=False, bad_grads=True)


def test_deepspeed_fp16_overflow_goes_on_and_a_bf16_nonfinite_loss_stops(step_parts, monkeypatch):
    model = step_parts
    monkeypatch.setattr(loop, "deepspeed_overflow", lambda accelerator: True)
    r = make_run(model, "fp16", zero_stage=2)
    state = TrainState()
    assert loop.apply_step(r, state, bad_loss=False, bad_grads=True) is False
    assert state.skipped_steps == 1 and state.nonfinite_streak == 0 and r.scheduler.last_epoch == 0
    monkeypatch.setattr(loop, "deepspeed_overflow", lambda accelerator: False)
    with pytest.raises(loop.NonFiniteLoss, match="under DeepSpeed, which has already applied it"):
        loop.apply_step(make_run(model, "bf16", zero_stage=2), TrainState(), bad_loss=True, bad_grads=False)


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_deepspeed_skips_outside_fp16_count_toward_the_streak(step_parts, monkeypatch, precision):
    # DeepSpeed skips a step with non-finite gradients in every precision; only fp16's is a loss-scale overflow.
    monkeypatch.setattr(loop, "deepspeed_overflow", lambda accelerator: True)
    r = make_run(step_parts, precision, zero_stage=2)
    r.cfg.runtime.max_nonfinite_steps = 2
    state = TrainState()
    assert loop.apply_step(r, state, bad_loss=False, bad_grads=True) is False
    assert state.skipped_steps == 1 and state.nonfinite_streak == 1 and r.scheduler.last_epoch == 0
    with pytest.raises(loop.NonFiniteLoss, match="2 consecutive steps"):
        loop.apply_step(r, state, bad_loss=False, bad_grads=True)
