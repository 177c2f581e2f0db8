"""AdamW (fused where the device supports it) and warmup + decay learning-rate schedules."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from harness.config import TrainConfig


def build_optimizer(param_groups: list[dict], cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW, fused where torch has it for these parameters (CPU and CUDA float tensors, FSDP2's DTensor shards
    included), else the foreach implementation (`optimizer.defaults["fused"]` says which; the run logs it)."""
    kwargs = {"lr": cfg.lr, "betas": (cfg.adam_beta1, cfg.adam_beta2), "eps": cfg.adam_eps}
    if device.type in ("cpu", "cuda"):
        try:
            return torch.optim.AdamW(param_groups, fused=True, **kwargs)  # one kernel for all parameters
        except (RuntimeError, TypeError, ValueError):  # a parameter kind fused AdamW does not take
            pass
    return torch.optim.AdamW(param_groups, foreach=True, **kwargs)


def warmup_steps(cfg: TrainConfig, total_steps: int) -> int:
    return cfg.warmup_steps if cfg.warmup_steps > 0 else math.ceil(cfg.warmup_ratio * total_steps)


def lr_multiplier(step: int, warmup: int, total: int, kind: str) -> float:
    """Linear warmup from 0 to 1 over `warmup` steps, then linear or cosine decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return max(0.0, 1.0 - progress)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int) -> LambdaLR:
    warmup = warmup_steps(cfg, total_steps)
    return LambdaLR(optimizer, lambda step: lr_multiplier(step, warmup, total_steps, cfg.scheduler))
