"""FSDP2 on 2 gloo CPU processes (the harness's own `fully_shard`, harness/fsdp.py) against plain DDP: the same
losses, gradient norms and weights, about half the memory per rank; sharded checkpoints that resume bit for bit,
and on another number of ranks; exports that transformers loads.

The ranks get the environment `accelerate launch --config_file configs/accelerate/fsdp2[_offload].yaml` gives its
processes (conftest.fsdp_env); the launcher itself runs in the SIGKILL test."""

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch
from safetensors.torch import load_file
from transformers import pipeline

from tests.conftest import (
    ROOT,
    assert_trains_like,
    free_port,
    fsdp_env,
    read_metrics,
    read_results,
    run_harness,
    tiny_config,
)
from tests.tiny_families import save_tiny_model

pytestmark = pytest.mark.slow

STEPS = 10
# Accumulation, clipping (active on every step at 0.01), layer-wise rates and frozen embeddings: all as under DDP.
COMMON = ("train.grad_accum=2", "train.batch_size=4", f"train.max_steps={STEPS}", "logging.every_steps=1",
          "train.layer_lr_decay=0.9", "model.freeze_embeddings=true", "checkpoint.every_steps=5")  # fmt: skip


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp")
    pretrained = save_tiny_model("bert", tmp / "pretrained")
    # Dropout off: DDP and FSDP2 then compute the same function.
    return tiny_config(tmp, model={"name_or_path": str(pretrained), "dropout": 0.0, "classifier_dropout": 0.0},
                       train={"lr": 2e-3, "max_grad_norm": 0.01})  # fmt: skip


@pytest.fixture(scope="module")
def ddp(config, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    run_harness(config, *COMMON, f"output_dir={out}", nproc=2)
    return out


@pytest.fixture(scope="module")
def fsdp(config, tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp2")
    run_harness(config, *COMMON, f"output_dir={out}", nproc=2, env_extra=fsdp_env())
    return out


def rows(out, event="train"):
    return [r for r in read_metrics(out) if r["event"] == event]


def weights(out, folder="final"):
    return load_file(str(out / folder / "model.safetensors"))


def test_fsdp2_matches_ddp_with_half_the_memory_and_exports_a_whole_model(fsdp, ddp):
    setup = read_metrics(fsdp)[0]
    assert setup["distributed_type"] == "FSDP2" and setup["world_size"] == 2 and setup["sharding"] == "fsdp2"
    assert rows(fsdp, "optimizer")[0]["groups"] == rows(ddp, "optimizer")[0]["groups"]  # LLRD, decay, frozen
    assert_trains_like(fsdp, ddp, STEPS, clip=0.01)
    # What each rank holds: about half of DDP's parameters, gradients (the trainable ones) and optimizer state.
    ddp_mem, fsdp_mem = rows(ddp, "memory")[0]["per_rank"], rows(fsdp, "memory")[0]["per_rank"]
    for rank in (0, 1):
        for part in ("parameters", "gradients", "optimizer_state"):
            assert 0.45 < fsdp_mem[rank][part] / ddp_mem[rank][part] < 0.55, (rank, part)
    # The export is the whole model under its own class name, in fp32, as transformers loads it.
    assert json.loads((fsdp / "best" / "config.json").read_text())["architectures"] == ["BertForSequenceClassification"]
    classify = pipeline("text-classification", model=str(fsdp / "final"))
    assert classify.model.dtype == torch.float32 and classify("great wonderful film")[0]["label"] in {"neg", "pos"}


def test_fsdp2_offload_with_gradient_checkpointing_matches_ddp(config, ddp, tmp_path):
    # On a CPU the shards are in host memory already (no offload policy to apply): the config is accepted and
    # trains the same. Gradient checkpointing recomputes each layer in backward: the same gradients.
    out = tmp_path / "offload"
    run_harness(config, *COMMON, "train.gradient_checkpointing=true", f"output_dir={out}", nproc=2,
                env_extra=fsdp_env(offload=True))  # fmt: skip
    setup = read_metrics(out)[0]
    assert setup["fsdp"] == {"offload": True, "reshard_after_forward": True}
    assert_trains_like(out, ddp, STEPS, clip=0.01)
    kept = [rank["activations"] for rank in rows(out, "memory")[0]["per_rank"]]
    assert all(0 < k < 0.5 * d["activations"] for k, d in zip(kept, rows(ddp, "memory")[0]["per_rank"], strict=True))


def test_a_2_rank_fsdp2_checkpoint_resumes_on_2_ranks_bitwise_and_on_1(config, fsdp, tmp_path):
    checkpoint = fsdp / "checkpoints" / "step-0000005"
    shards = sorted(p.name for p in (checkpoint / "sharded").iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"]  # each rank wrote its own shard
    two, one = tmp_path / "two", tmp_path / "one"
    run_harness(config, *COMMON, f"checkpoint.resume={checkpoint}", f"output_dir={two}", nproc=2, env_extra=fsdp_env())
    assert read_results(two)["resumed_from_step"] == 5
    a, b = weights(fsdp), weights(two)
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed on 2 ranks: bit for bit"
    # On one rank: DCP gathers both shards into it; the run continues the epoch after the examples already seen
    # (steps of another layout hold other examples, so the weights only come near the 2-rank run's).
    proc = run_harness(config, *COMMON, "train.grad_accum=4", f"checkpoint.resume={checkpoint}", f"output_dir={one}",
                       env_extra=fsdp_env())  # fmt: skip
    results = read_results(one)
    assert results["resumed_from_step"] == 5 and results["world_size"] == 1 and results["optimizer_steps"] == STEPS
    assert "resuming with batch/world/accum 4/1/4 (was 4/2/2)" in proc.stdout
    resumed_loss = rows(one)[0]["loss"]
    assert resumed_loss == pytest.approx(rows(fsdp)[5]["loss"], rel=0.05)  # step 6, from the same weights
    b = weights(one)
    assert max((b[k] - a[k]).abs().max().item() for k in a) < 0.05


def test_sigkill_under_accelerate_launch_then_the_same_command_resumes_bitwise(config, fsdp, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "configs/accelerate/fsdp2.yaml",
           "--num_processes", "2", "--main_process_port", str(free_port()), "harness/train.py", "--config",
           str(config), *COMMON, f"output_dir={out}"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    job = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not (out / "checkpoints" / "step-0000005" / "manifest.json").is_file():
        assert job.poll() is None and time.monotonic() < deadline, job.stdout.read()[-3000:] if job.poll() else ""
        time.sleep(0.02)
    for process in [psutil.Process(job.pid), *psutil.Process(job.pid).children(recursive=True)]:
        process.send_signal(signal.SIGKILL)
    job.communicate(timeout=60)
    assert rows(out)[0]["step"] == 1 and read_metrics(out)[0]["world_size"] == 2
    run_harness(config, *COMMON, f"output_dir={out}", nproc=2, env_extra=fsdp_env())  # the same command, again
    assert read_results(out)["resumed_from_step"] >= 5
    a, b = weights(fsdp), weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed run's final weights are the uninterrupted run's"


def test_nonfinite_gradients_under_fsdp2_are_skipped_and_counted(config, tmp_path):
    out = tmp_path / "run"
    proc = run_harness(config, "train.max_steps=4", f"output_dir={out}", nproc=2,
                       env_extra={**fsdp_env(), "HARNESS_INJECT_NAN_GRAD_STEPS": "3"})  # fmt: skip
    assert "step 3: non-finite gradient norm (finite loss), update skipped" in proc.stderr
    assert read_results(out)["skipped_steps"] == 1
    assert all(torch.isfinite(w).all() for w in weights(out).values())
