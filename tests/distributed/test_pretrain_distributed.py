"""Pre-training on 2 gloo ranks: a step split over ranks and micro-batches is the same update, also under ZeRO-3."""

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import PRETRAIN, deepspeed_env, read_metrics, read_results, run_harness, tiny_config
from tests.pretrain_corpus import write_cyclic_corpus

pytestmark = pytest.mark.slow
STEPS = 12


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pretrain")
    # Dropout off, so that every layout computes the same function; clipping at 0.05 acts on every step.
    return tiny_config(
        tmp,
        model={"name_or_path": "builtin:tiny-bert", "dropout": 0.0},
        data={"source": "path", "path": str(write_cyclic_corpus(tmp / "corpus", 120, 60)), "validation_size": 30,
              "max_length": 40},
        train={"max_steps": STEPS, "lr": 3e-3, "max_grad_norm": 0.05},
        logging={"every_steps": 1, "progress": "plain"},
    )  # fmt: skip


def losses(out) -> list[float]:
    return [r["loss"] for r in read_metrics(out) if r["event"] == "train"]


@pytest.fixture(scope="module")
def one_process(config, tmp_path_factory):
    out = tmp_path_factory.mktemp("w1")
    run_harness(config, "train.batch_size=16", f"output_dir={out}", entry=PRETRAIN)
    return out


def test_two_ranks_with_accumulation_make_the_same_steps_as_one_process(config, one_process, tmp_path):
    # Micro-batches of 4 on 2 ranks x 2 accumulation hold different numbers of masked tokens: averaging each
    # micro-batch's loss would weight tokens unequally; the harness divides by the step's total instead.
    out = tmp_path / "w2"
    run_harness(config, "train.batch_size=4", "train.grad_accum=2", f"output_dir={out}", nproc=2, entry=PRETRAIN)
    assert read_results(out)["world_size"] == 2 and read_results(one_process)["world_size"] == 1
    assert len(losses(out)) == STEPS
    assert losses(out) == pytest.approx(losses(one_process), rel=1e-5)
    a, b = (load_file(str(o / "final" / "model.safetensors")) for o in (one_process, out))
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=2e-6, msg=key)


def test_zero3_pretraining_matches_and_exports_a_full_model(config, one_process, tmp_path):
    pytest.importorskip("deepspeed", reason="needs the deepspeed package")
    out = tmp_path / "zero3"
    run_harness(config, "train.batch_size=8", f"output_dir={out}", entry=PRETRAIN, nproc=2, env_extra=deepspeed_env(3))
    setup = next(r for r in read_metrics(out) if r["event"] == "setup")
    assert setup["world_size"] == 2 and setup["distributed_type"] == "DEEPSPEED"
    assert losses(out) == pytest.approx(losses(one_process), rel=1e-5)
    exported = load_file(str(out / "final" / "model.safetensors"))  # consolidated from the shards
    reference = load_file(str(one_process / "final" / "model.safetensors"))
    assert set(exported) == set(reference)
    for key in reference:
        torch.testing.assert_close(exported[key], reference[key], rtol=1e-4, atol=1e-5, msg=key)
