"""What each topology's collectives move per optimizer step, measured, against benchmarks/scaling.py's model.

Two gloo ranks train tiny BERT with two micro-batches per step (ZeRO-2 reduces gradients at each of them, ZeRO-1
and DDP once, ZeRO-3 gathers the parameters at each forward) and record the payload their TCP sockets carried
at every step (logging.network_bytes). Rank 0's bytes sent and received are the model's within 5%. The same
across two real nodes, for the topologies trained there: tests/integration/test_two_nodes.py."""

import statistics

import pytest

from benchmarks.scaling import shape_of, step_bytes
from tests.conftest import ROOT, deepspeed_env, fsdp_env, read_metrics, run_harness, tiny_config

pytestmark = pytest.mark.slow
DEEPSPEED = ROOT / "configs" / "deepspeed"
TOPOLOGIES = {  # the model's name: the environment its launcher gives the ranks
    "ddp": lambda: None,
    "zero1": lambda: deepspeed_env(1, DEEPSPEED / "zero1.json"),
    "zero2": lambda: deepspeed_env(2, DEEPSPEED / "zero2.json"),
    "zero3": lambda: deepspeed_env(3, DEEPSPEED / "zero3.json"),
    "fsdp": lambda: fsdp_env(),
}
MICRO_BATCHES = 2


@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_bytes_each_rank_moves_per_step_are_the_models(topology, tmp_path):
    if topology.startswith("zero"):
        pytest.importorskip("deepspeed", reason="needs the deepspeed package")
    config = tiny_config(
        tmp_path,
        data={"synthetic_train_size": 120, "synthetic_test_size": 16, "validation_size": 16},
        train={"max_steps": 5, "grad_accum": MICRO_BATCHES, "batch_size": 4},
        logging={"every_steps": 1, "progress": "plain", "network_bytes": True},
    )
    run_harness(config, nproc=2, env_extra=TOPOLOGIES[topology]())
    rows = [r for r in read_metrics(tmp_path / "run") if r["event"] == "train"]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    expected = sum(step_bytes(shape_of("builtin:tiny-bert"), topology, 2, "fp32", MICRO_BATCHES, "gloo").values())
    for direction in ("sent", "received"):
        # Step 1 also carries the first step's setup (ZeRO-3 records its trace, FSDP2 its lazy init): from step 2.
        measured = statistics.median(r[f"net_{direction}_bytes_per_step"] for r in rows[1:])
        assert measured / expected == pytest.approx(1, abs=0.05), (topology, direction, measured, expected)
