"""GPU-path and cluster decisions that a CPU can check: precision auto, TF32, FSDP on CPU, DeepSpeed's bf16
reduction dtype and offload threads and ninja, the launcher's --max-restarts, CPU threads within a SLURM job."""

from __future__ import annotations

import os

import pytest
import torch

from harness import distributed
from harness.config import ConfigError, config_from_dict
from launch.commands import Host, Request, build_command


@pytest.mark.parametrize(
    ("gpu", "gpu_bf16", "cpu_bf16", "expected"),
    [
        (True, True, False, "bf16"),
        (True, False, False, "fp16"),
        (False, False, True, "bf16"),
        (False, False, False, "fp32"),
    ],
)
def test_auto_precision_follows_the_machine(monkeypatch, gpu, gpu_bf16, cpu_bf16, expected):
    monkeypatch.setattr(distributed, "native_gpu_bf16", lambda: gpu_bf16)
    monkeypatch.setattr(distributed, "native_cpu_bf16", lambda: cpu_bf16)
    assert distributed.resolve_precision("auto", on_gpu=gpu) == expected
    assert distributed.resolve_precision("fp32", on_gpu=gpu) == "fp32"  # an explicit choice stands


@pytest.mark.parametrize(("capability", "expected"), [((7, 0), "fp16"), ((7, 5), "fp16"), ((8, 0), "bf16"),
                                                      ((9, 0), "bf16")])  # fmt: skip
def test_auto_precision_asks_this_ranks_gpu_and_never_counts_emulated_bf16(monkeypatch, capability, expected):
    # V100 (7.0) and T4 (7.5) emulate bf16, which torch.cuda.is_bf16_supported() counts by default, by allocating on
    # cuda:0 in every rank. Rank 3 of 4 GPUs must read its own GPU's properties, and nothing else.
    asked = []
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: asked.append(device) or capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: pytest.fail("emulation counted"))
    assert distributed.resolve_precision("auto", on_gpu=True) == expected and asked == [3]


def test_the_cpu_intent_hides_a_gpu_nodes_gpus():
    # Without it, the ranks of `cpu 2` would take GPUs (and `cpu 16` on an 8-GPU node would ask for cuda:8).
    command = build_command(Request("cpu", 2), {}, Host(gpus=8, cpus=16, free_port=41000))
    assert command.env["CUDA_VISIBLE_DEVICES"] == "" and command.argv[0] == "torchrun"
    slurm = build_command(Request("cpu", 2, from_slurm=True), {"SLURM_JOB_ID": "7", "SLURM_NNODES": "1",
                          "SLURM_NODEID": "0", "SLURM_JOB_NODELIST": "gpu01", "SLURM_GPUS_ON_NODE": "4"}, Host())  # fmt: skip
    assert slurm.env["CUDA_VISIBLE_DEVICES"] == ""
    # Also where no GPU was counted: a SLURM job without --gres may see the node's GPUs all the same.
    assert build_command(Request("cpu", 2), {}, Host(gpus=0)).env["CUDA_VISIBLE_DEVICES"] == ""
    assert "CUDA_VISIBLE_DEVICES" not in build_command(Request("gpus", 1, max_restarts=1), {}, Host(gpus=1)).env


def test_tf32_follows_the_setting():
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        distributed.use_tf32(True)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        distributed.use_tf32(False)
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_an_fsdp1_launch_or_what_fsdp2_does_not_run_is_bad_input_naming_the_fix(monkeypatch):
    cfg = config_from_dict({"model": {"name_or_path": "builtin:tiny-bert"}})
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(
        ConfigError, match=r"FSDP version 1 .*FSDP2 only; set fsdp_version: 2 \(configs/accelerate/fsdp2"
    ):
        distributed.build_accelerator(cfg)
    monkeypatch.setenv("FSDP_VERSION", "2")
    monkeypatch.setenv("FSDP_ACTIVATION_CHECKPOINTING", "true")
    with pytest.raises(ConfigError, match="set train.gradient_checkpointing=true"):
        distributed.build_accelerator(cfg)


def test_deepspeed_bf16_reduces_and_accumulates_gradients_in_fp32_unless_the_config_says_otherwise():
    cfg = config_from_dict({"train": {"precision": "bf16"}})
    filled = distributed.fill_deepspeed_config({"zero_optimization": {"stage": 2}}, cfg, 2, "test", "bf16")
    assert filled["bf16"]["enabled"] and not filled["fp16"]["enabled"]
    assert filled["communication_data_type"] == "fp32" and filled["data_types"]["grad_accum_dtype"] == "fp32"
    mine = distributed.fill_deepspeed_config({"communication_data_type": "bf16"}, cfg, 2, "test", "bf16")
    assert mine["communication_data_type"] == "bf16"
    fp16 = distributed.fill_deepspeed_config({}, config_from_dict({}), 2, "test", "fp16")
    assert fp16["fp16"]["enabled"] and "communication_data_type" not in fp16


def test_offloaded_optimizers_are_recognised():
    class Plugin:
        def __init__(self, zero):
            self.deepspeed_config = {"zero_optimization": zero}

    assert distributed.offloads_to_cpu(Plugin({"stage": 3, "offload_optimizer": {"device": "cpu"}}))
    assert not distributed.offloads_to_cpu(Plugin({"stage": 3, "offload_optimizer": {"device": "none"}}))
    assert not distributed.offloads_to_cpu(Plugin({"stage": 2}))


def test_max_restarts_reaches_torchrun_and_accelerate_launch():
    host = Host(gpus=0, cpus=4, free_port=29500)
    torchrun = build_command(Request("cpu", nproc=2, max_restarts=3), {}, host).argv
    assert torchrun[torchrun.index("--max-restarts") + 1] == "3"
    accelerate = build_command(Request("zero2", nproc=2, max_restarts=1), {}, host).argv
    assert accelerate[accelerate.index("--max_restarts") + 1] == "1"
    assert "--max-restarts" not in build_command(Request("cpu", nproc=2), {}, host).argv


def test_deepspeed_builds_its_ops_with_this_pythons_ninja(monkeypatch, tmp_path):
    """DeepSpeed JIT-builds ops with the first ninja on PATH; two ninja versions alternating rebuild them each run."""
    fake_python = tmp_path / "venv" / "bin" / "python"
    for folder in (fake_python.parent, tmp_path / "usr"):  # the venv's ninja, and the system's on PATH
        folder.mkdir(parents=True)
        (folder / "ninja").write_text("#!/bin/sh\n")
        (folder / "ninja").chmod(0o755)
    monkeypatch.setattr(distributed.sys, "executable", str(fake_python))
    monkeypatch.setenv("PATH", str(tmp_path / "usr"))
    distributed.use_this_pythons_ninja()
    assert distributed.shutil.which("ninja") == str(fake_python.parent / "ninja")
    path = distributed.os.environ["PATH"]
    distributed.use_this_pythons_ninja()  # already first: PATH stays as it is
    assert distributed.os.environ["PATH"] == path


def test_cpu_threads_stay_within_the_slurm_allocation(monkeypatch):
    """Without task affinity (TaskPlugin=task/none) every process of a job sees the whole node; the threads
    follow the job's CPUs on this node instead, divided among the node's processes."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    monkeypatch.delenv("SLURM_CPUS_ON_NODE", raising=False)
    assert distributed.usable_cores() == 64
    monkeypatch.setenv("SLURM_CPUS_ON_NODE", "8")
    assert distributed.usable_cores() == 8
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})  # affinity narrower than the allocation
    assert distributed.usable_cores() == 2


def test_the_forked_runs_deepspeed_environment_is_accelerate_launchs():
    env = distributed.accelerate_launch_env(["--config_file", "configs/accelerate/zero3.yaml"], num_processes=1)
    assert env["ACCELERATE_USE_DEEPSPEED"] == "true" and env["ACCELERATE_DEEPSPEED_ZERO3_INIT"] == "false"
    assert env["ACCELERATE_DEEPSPEED_CONFIG_FILE"] == "configs/deepspeed/zero3.json"
    assert all(key.startswith("ACCELERATE_") for key in env)
    fsdp = distributed.accelerate_launch_env(["--config_file", "configs/accelerate/fsdp2_offload.yaml"], 2)
    assert (
        fsdp["ACCELERATE_USE_FSDP"] == "true" and fsdp["FSDP_VERSION"] == "2" and fsdp["FSDP_OFFLOAD_PARAMS"] == "true"
    )
    with pytest.raises(ValueError, match="neither a DeepSpeed nor an FSDP launch"):
        distributed.accelerate_launch_env(["--config_file", "configs/accelerate/cpu_gloo.yaml"], num_processes=2)


def test_a_users_default_accelerate_config_does_not_reach_the_forked_runs(monkeypatch, tmp_path):
    from accelerate.commands import launch
    from accelerate.commands.config import config_args

    default = tmp_path / "default_config.yaml"  # what `accelerate config` would have saved for this user
    default.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: DEEPSPEED\nmixed_precision: bf16\n"
                       "deepspeed_config:\n  zero_stage: 3\n  gradient_accumulation_steps: 4\n")  # fmt: skip
    monkeypatch.setattr(launch, "default_config_file", str(default))
    monkeypatch.setattr(config_args, "default_config_file", str(default))
    env = distributed.accelerate_launch_env(["--use_deepspeed", "--zero_stage", "2", "--mixed_precision", "no"], 2)
    assert env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == "2" and env["ACCELERATE_MIXED_PRECISION"] == "no"
    assert "ACCELERATE_GRADIENT_ACCUMULATION_STEPS" not in env and env["ACCELERATE_CONFIG_DS_FIELDS"] == ""
    assert launch.default_config_file == str(default)  # put back
