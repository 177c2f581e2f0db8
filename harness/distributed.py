"""The one place that knows about launchers, backends, devices and world size.

Everything else talks to the returned `Accelerator`. The same code serves `python harness/train.py` (one
process), `torchrun --nproc_per_node N` and `accelerate launch` on CPU (gloo) or GPUs (NCCL).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from harness.config import ConfigError, ExperimentConfig

MIXED_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


def launched_world_size() -> int:
    """Processes the launcher started (torchrun and accelerate launch both export WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def build_accelerator(cfg: ExperimentConfig) -> Accelerator:
    on_cpu = not torch.cuda.is_available()
    if cfg.train.precision == "fp16" and on_cpu:
        raise ConfigError(["train.precision: fp16 needs a CUDA GPU (loss scaling); use bf16 or fp32 on CPU"])
    # Accelerate enters multi-process CPU mode (gloo) only when told cpu=True inside a torchrun-style launch;
    # without it, N launched CPU processes would each train alone as world size 1.
    accelerator = Accelerator(
        cpu=on_cpu,
        mixed_precision=MIXED_PRECISION[cfg.train.precision],
        gradient_accumulation_steps=cfg.train.grad_accum,
        step_scheduler_with_optimizer=False,
    )
    if accelerator.num_processes != launched_world_size():
        raise RuntimeError(
            f"the launcher started {launched_world_size()} processes but Accelerate formed a world of "
            f"{accelerator.num_processes}; check the launch command"
        )
    set_seed(cfg.seed)
    return accelerator


@dataclass(frozen=True)
class RunPlace:
    """Where a run executes, for logs and results.json."""

    world_size: int
    distributed_type: str
    device: str
    backend: str | None
    precision: str

    @classmethod
    def of(cls, accelerator: Accelerator, precision: str) -> "RunPlace":
        state = accelerator.state
        return cls(
            world_size=accelerator.num_processes,
            distributed_type=str(state.distributed_type).split(".")[-1],
            device=str(accelerator.device),
            backend=getattr(state, "backend", None),
            precision=precision,
        )
