"""DeepSpeed ZeRO 1/2/3 on 2 gloo CPU processes against plain DDP: same losses, same weights, less memory.

The model is a pretrained checkpoint loaded by path (a tiny BERT saved with `save_pretrained`, its classifier
head new), so `from_pretrained` runs as it does for users' models: under ZeRO-3, transformers would load it
partitioned unless told otherwise. The ranks get the environment `accelerate launch --use_deepspeed --zero_stage
N` gives its processes (conftest.deepspeed_env); the launcher itself is run for real in
tests/distributed/test_launch_cpu.py."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import pipeline

from tests.conftest import assert_trains_like, deepspeed_env, read_metrics, read_results, run_harness, tiny_config
from tests.tiny_families import save_tiny_model

pytest.importorskip("deepspeed", reason="needs the deepspeed package")
pytestmark = pytest.mark.slow

STEPS = 10
COMMON = ("train.grad_accum=2", "train.batch_size=4", f"train.max_steps={STEPS}", "logging.every_steps=1")


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("zero")
    pretrained = save_tiny_model("bert", tmp / "pretrained")  # a masked-LM checkpoint: the classifier head is new
    # Dropout off: DDP and ZeRO then compute the same function; clipping at 0.01 is active on every step.
    return tiny_config(
        tmp,
        model={"name_or_path": str(pretrained), "dropout": 0.0, "classifier_dropout": 0.0},
        train={"lr": 2e-3, "max_grad_norm": 0.01},
    )


@pytest.fixture(scope="module")
def ddp(config, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    run_harness(config, *COMMON, f"output_dir={out}", nproc=2)
    return out


def train_rows(out):
    return [r for r in read_metrics(out) if r["event"] == "train"]


def memory(out):
    return next(r for r in read_metrics(out) if r["event"] == "memory")["per_rank"]


def event(out, name):
    row = next(r for r in read_metrics(out) if r["event"] == name)
    return {k: v for k, v in row.items() if k != "time"}


def assert_same_model_view(out, ddp):
    """The optimizer's groups (weight decay on every matrix, none on biases and norms) and the FLOP count are
    DDP's: read from the whole model, never from a partitioned placeholder."""
    groups, ddp_groups = event(out, "optimizer")["groups"], event(ddp, "optimizer")["groups"]
    assert groups == ddp_groups
    decayed = [name for g in groups if g["weight_decay"] > 0 for name in g["params"]]
    assert len(decayed) == 3 * 6 + 2 + 3  # per layer Q, K, V, O, FFN in and out; pooler, classifier; 3 embeddings
    flops = event(out, "flops")
    assert flops == event(ddp, "flops") and flops["per_token"] > 6 * flops["dense_weights"] > 0


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_matches_ddp(stage, config, ddp, tmp_path):
    out = tmp_path / f"zero{stage}"
    # ZeRO-3 (parameters gathered per layer) recomputes each layer in backward: the same gradients.
    checkpointing = ["train.gradient_checkpointing=true"] if stage == 3 else []
    run_harness(config, *COMMON, *checkpointing, f"output_dir={out}", nproc=2, env_extra=deepspeed_env(stage))
    assert read_results(out)["world_size"] == 2
    setup = read_metrics(out)[0]
    assert setup["distributed_type"] == "DEEPSPEED" and setup["world_size"] == 2 and setup["zero_stage"] == stage
    assert_same_model_view(out, ddp)

    # The exported final model (under ZeRO-3: consolidated from the shards) equals DDP's parameters.
    assert_trains_like(out, ddp, STEPS, clip=0.01)

    # What each rank holds, measured from the engine: ZeRO-1/2 halve optimizer state, ZeRO-3 parameters too.
    ddp_mem, zero_mem = memory(ddp), memory(out)
    for rank in (0, 1):
        state_ratio = zero_mem[rank]["optimizer_state"] / ddp_mem[rank]["optimizer_state"]
        assert 0.45 < state_ratio < 0.55, state_ratio
        param_ratio = zero_mem[rank]["parameters"] / ddp_mem[rank]["parameters"]
        assert (0.45 < param_ratio < 0.55) if stage == 3 else param_ratio == 1.0, param_ratio

    if stage == 3:
        classify = pipeline("text-classification", model=str(out / "final"))
        assert classify("great wonderful film")[0]["label"] in {"neg", "pos"}


def test_deepspeed_json_disagreeing_with_experiment_names_both(config, tmp_path):
    ds_json = tmp_path / "ds.json"
    ds_json.write_text(json.dumps({"zero_optimization": {"stage": 2}, "gradient_accumulation_steps": 4,
                                   "train_micro_batch_size_per_gpu": "auto"}))  # fmt: skip
    proc = run_harness(config, "train.grad_accum=2", f"output_dir={tmp_path / 'run'}", check=False,
                       env_extra=deepspeed_env(2, config_file=ds_json))  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"{ds_json}: gradient_accumulation_steps is 4 but the experiment's train.grad_accum is 2" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_resume_from_a_zero2_checkpoint_continues_the_same_run(config, tmp_path):
    zero2 = deepspeed_env(2)
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    run_harness(config, *COMMON, "checkpoint.every_steps=5", f"output_dir={full}", nproc=2, env_extra=zero2)
    checkpoint = full / "checkpoints" / "step-0000005"
    assert (checkpoint / "state" / "pytorch_model").is_dir()  # DeepSpeed's sharded engine state
    run_harness(config, *COMMON, f"checkpoint.resume={checkpoint}", f"output_dir={resumed}", nproc=2, env_extra=zero2)
    assert read_results(resumed)["resumed_from_step"] == 5
    after = {r["step"]: r["loss"] for r in train_rows(resumed) if r["step"] > 5}
    assert after == {r["step"]: r["loss"] for r in train_rows(full) if r["step"] > 5}
    assert list(after) == list(range(6, STEPS + 1))
    a, b = load_file(str(full / "final" / "model.safetensors")), load_file(str(resumed / "final" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_in_bf16_exports_the_fp32_master_weights(stage, config, ddp, tmp_path):
    # Under DeepSpeed bf16 the module's own weights are bf16; the optimizer updates fp32 masters, which best/ and
    # final/ must hold (as a DDP run's fp32 parameters): values a bf16 tensor cannot represent. ZeRO-1 in bf16 runs
    # DeepSpeed's BF16_Optimizer (fp32 gradient accumulation), whose partitions live elsewhere than ZeRO's.
    out = tmp_path / f"zero{stage}"
    run_harness(config, *COMMON, "train.precision=bf16", f"output_dir={out}", nproc=2, env_extra=deepspeed_env(stage))
    assert read_results(out)["precision"] == "bf16" and read_metrics(out)[0]["zero_stage"] == stage
    assert_same_model_view(out, ddp)
    for rank in memory(out):  # each rank's fp32 master partition: half of the fp32 weights
        assert 0.45 < rank["fp32_master"] / memory(ddp)[0]["parameters"] < 0.55, rank
    for folder in ("final", "best"):
        weights = [w for w in load_file(str(out / folder / "model.safetensors")).values() if w.is_floating_point()]
        assert all(w.dtype == torch.float32 for w in weights)
        assert sum(int((w != w.bfloat16().float()).sum()) for w in weights) > 1000, folder
    # The export says what its weights are: transformers loads it in fp32, not in the training's bf16.
    classify = pipeline("text-classification", model=str(out / "best"))
    assert classify.model.dtype == torch.float32
    assert classify("great wonderful film")[0]["label"] in {"neg", "pos"}


@pytest.mark.parametrize(("stage", "precision"), [(2, "fp32"), (1, "bf16")])
def test_steps_deepspeed_skips_for_nonfinite_gradients_count_toward_the_streak(stage, precision, config, tmp_path):
    # A finite loss with NaN gradients: DeepSpeed's overflow check skips the step in every precision (ZeRO-1 in
    # bf16 through its BF16_Optimizer). Outside fp16 that is no loss-scale overflow: two in a row stop the run.
    out = tmp_path / "run"
    proc = run_harness(config, *COMMON, f"train.precision={precision}", "runtime.max_nonfinite_steps=2",
                       f"output_dir={out}", nproc=2, env_extra={**deepspeed_env(stage),
                       "HARNESS_INJECT_NAN_GRAD_STEPS": "3,4"}, check=False)  # fmt: skip
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "step 3: non-finite gradient norm (finite loss), update skipped (1 in a row)" in proc.stderr
    assert "2 consecutive steps with a non-finite loss or gradient" in proc.stderr
    assert json.loads((out / "exit_status.json").read_text())["status"] == "failed"
