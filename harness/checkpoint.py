"""Model weights: consolidated copies (also under ZeRO-3), reloading, and export in Hugging Face format
(`best/`, `final/`) written atomically: a temporary folder, then a rename."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from accelerate import Accelerator

from harness.distributed import zero_stage


def state_dict_copy(accelerator: Accelerator, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of the full model weights on every rank, consolidated where ZeRO-3 shards them.

    Called on every rank: under ZeRO-3, gathering the weights is a collective operation.
    """
    module = accelerator.unwrap_model(model)
    if zero_stage(accelerator) == 3:
        import deepspeed

        # Gather the partitions (read-only), copy, and let them be re-partitioned on exit.
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            return {name: t.detach().to("cpu", copy=True) for name, t in module.state_dict().items()}
    return {name: t.detach().to("cpu", copy=True) for name, t in module.state_dict().items()}


def load_weights(accelerator: Accelerator, model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Put full weights (from `state_dict_copy`) back into the model on every rank, sharded or not."""
    module = accelerator.unwrap_model(model)
    if zero_stage(accelerator) == 3:
        import deepspeed

        # Rank 0 writes the gathered parameters; on exit DeepSpeed re-partitions them from rank 0.
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=0):
            if accelerator.is_main_process:
                module.load_state_dict(state)
        return
    module.load_state_dict(state)


def export_model(
    accelerator: Accelerator, model: torch.nn.Module, tokenizer, state: dict[str, torch.Tensor], path: Path
) -> None:
    """Write `state` as a Hugging Face model folder at `path`, replacing it only once complete."""
    if accelerator.is_main_process:
        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        accelerator.unwrap_model(model).save_pretrained(
            tmp, state_dict=dict(state), safe_serialization=True  # a copy: save_pretrained consumes the dict
        )
        tokenizer.save_pretrained(tmp)
        old = path.with_name(path.name + ".old")
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
