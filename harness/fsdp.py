"""FSDP2 (`torch.distributed.fsdp.fully_shard`): parameters, gradients and optimizer state sharded over the ranks,
one shard unit per encoder layer (found by the family registry, harness/families.py) plus the rest at the root.

The harness shards the model itself, on GPUs and CPUs alike (Accelerate runs FSDP on GPUs only), so one code path
trains, checkpoints and exports under every device, and the CPU tests cover it. An Accelerate FSDP config
(`accelerate launch --config_file configs/accelerate/fsdp2.yaml`, or `python -m launch fsdp N`) asks for it: its
`fsdp_version` must be 2, `fsdp_offload_params` and `fsdp_reshard_after_forward` are honoured, and the shard units,
mixed precision and state-dict layout are the harness's (`FSDPSettings.from_env`).

* Mixed precision the FSDP2 way (`MixedPrecisionPolicy`): the sharded parameters stay fp32 (the optimizer's
  master weights); each unit's all-gathered copy is cast to bf16 / fp16 for compute; gradients are reduced in
  fp32; the logits come out in fp32.
* Gradient accumulation without communication: a step's micro-batches but the last neither reduce-scatter
  gradients nor reshard parameters (`micro_batch`).
* Checkpoints: `torch.distributed.checkpoint` (DCP), each rank writing its own shards of the model and optimizer
  state into the checkpoint folder; loading reshards, so a checkpoint of N ranks resumes on M.
* Exports and the best model: the full state dict, gathered to rank 0 (`full_state_dict`), loaded back by
  broadcast from rank 0 (`load_full_state_dict`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from harness.config import ConfigError

LOW_PRECISION = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class FSDPSettings:
    """What an Accelerate FSDP launch asks for, as the harness applies it."""

    offload: bool
    """fsdp_offload_params: sharded parameters, gradients and optimizer state in CPU memory (GPUs only; on a
    CPU they are there already)."""
    reshard_after_forward: bool
    """fsdp_reshard_after_forward: free each unit's gathered parameters after its forward (FULL_SHARD) or keep
    them until backward (SHARD_GRAD_OP: more memory, one all-gather fewer)."""

    @classmethod
    def from_env(cls, env: Mapping[str, str], gradient_checkpointing: bool) -> FSDPSettings | None:
        """The settings of an `accelerate launch` FSDP config (the FSDP_* variables it exports), or None without
        one; ConfigError for what the harness does not run."""
        if env.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
            return None
        problems = []
        version = env.get("FSDP_VERSION", "1")
        if version != "2":
            problems.append(f"FSDP version {version} (fsdp_version in the accelerate config): the harness runs FSDP2 "
                            "only; set fsdp_version: 2 (configs/accelerate/fsdp2.yaml, or python -m launch fsdp N)")  # fmt: skip
        if env.get("FSDP_ACTIVATION_CHECKPOINTING", "false").lower() == "true" and not gradient_checkpointing:
            problems.append("fsdp_activation_checkpointing is true in the accelerate config but the experiment's "
                            "train.gradient_checkpointing is false; set train.gradient_checkpointing=true (the "
                            "experiment owns it) and drop it from the accelerate config")  # fmt: skip
        if problems:
            raise ConfigError(problems, "launch")
        return cls(
            offload=env.get("FSDP_OFFLOAD_PARAMS", "false").lower() == "true",
            reshard_after_forward=env.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() == "true",
        )


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The modules that become their own FSDP unit: the encoder's layers, in order, each once (ALBERT's layers
    share one group)."""
    from harness.families import StructureError, structure_of, transformer_in

    try:
        parts = structure_of(transformer_in(model), "FSDP2")
    except StructureError as exc:
        raise ConfigError([f"FSDP2: {exc}"], "launch") from exc
    return list({id(layer): layer for layer in parts.layers}.values())


def shard_model(model: nn.Module, settings: FSDPSettings, precision: str, device: torch.device) -> nn.Module:
    """Apply `fully_shard` to each encoder layer, then to the whole model, on a 1-D mesh of every rank; the
    model is moved to `device` first. Returns the model (its class becomes an FSDP subclass, in place)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    model.to(device)
    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    compute = LOW_PRECISION.get(precision)
    layer_policy = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32)
    # The root's output (the logits) in fp32; inside, each unit takes its input in the compute dtype.
    root_policy = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32,
                                       output_dtype=torch.float32 if compute is not None else None)  # fmt: skip
    kwargs = {"mesh": mesh, "reshard_after_forward": settings.reshard_after_forward}
    if settings.offload and device.type == "cuda":  # on a CPU everything is in host memory already
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=True)
    for unit in shard_units(model):
        fully_shard(unit, mp_policy=layer_policy, **kwargs)
    fully_shard(model, mp_policy=root_policy, **kwargs)
    if device.type == "cpu":
        # gloo's reduce-scatter with AVG is not what NCCL's is (pytorch#162338): sum, then divide, as DDP does.
        model.set_force_sum_reduction_for_comms(True)
    return model


@contextmanager
def micro_batch(model: nn.Module, last: bool) -> Iterator[None]:
    """One micro-batch's forward and backward: before the step's last, gradients stay local (no reduce-scatter)
    and the gathered parameters stay gathered (no reshard between micro-batches)."""
    model.set_requires_gradient_sync(last)
    model.set_reshard_after_backward(last)
    model.set_is_last_backward(last)
    yield


def local(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's shard on this rank (a plain tensor as it is)."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def full(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor gathered whole (collective), e.g. the global gradient norm; a plain tensor as it is."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state dict in CPU memory on rank 0 ({} on the others). Collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Put a full state dict (rank 0's; the others may pass theirs or {}) into the sharded model. Collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    rank0 = torch.distributed.get_rank() == 0
    set_model_state_dict(model, state if rank0 else {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))  # fmt: skip


def save_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Every rank writes its shards of the model and optimizer state into `folder` (DCP). Collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(folder))


def load_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Load what `save_sharded` wrote, resharded onto this run's ranks (another world size too). Collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def memory(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes this rank holds of the parameters, gradients and optimizer state: its shards (a trainable
    parameter's gradient shard is the size of its parameter shard, reduced in fp32)."""

    def nbytes(tensors) -> int:
        return sum(local(t).numel() * local(t).element_size() for t in tensors if isinstance(t, torch.Tensor))

    params = list(model.parameters())
    moments = [v for state in optimizer.state.values() for k, v in state.items() if k != "step"]
    return {"parameters": nbytes(params), "gradients": nbytes(p for p in params if p.requires_grad),
            "optimizer_state": nbytes(moments), "fp32_master": 0}  # fmt: skip


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def original_class_name(model: nn.Module) -> str:
    """The model's class before fully_shard made it an `FSDP<name>` subclass (what config.json must name)."""
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule)).__name__
