"""Model export in Hugging Face format (`best/`), written atomically: a temporary folder, then a rename."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from accelerate import Accelerator


def state_dict_copy(accelerator: Accelerator, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of the full model weights (consolidated across ranks where they are sharded).

    Called on every rank: under sharded training, gathering the weights is a collective operation.
    """
    state = accelerator.get_state_dict(model, unwrap=True)
    return {name: tensor.detach().to("cpu", copy=True) for name, tensor in state.items()}


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
