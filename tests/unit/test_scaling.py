"""benchmarks/scaling.py's communication model: parameter counts without downloads, the ring formulas per
topology, and the command line. (Its agreement with measured bytes: tests/integration/test_two_nodes.py.)"""

import pytest

from benchmarks import scaling

BERT_BASE = 109_483_778  # BertForSequenceClassification, 2 labels: the published 110M


def test_presets_count_parameters_without_downloading():
    bert = scaling.shape_of("bert-base-uncased")
    assert bert.parameters == BERT_BASE and bert.hidden_size == 768
    assert bert.buffer_bytes > 0 and 0 < bert.root_parameters < bert.parameters
    deberta = scaling.shape_of("microsoft/deberta-v3-large")
    assert 430e6 < deberta.parameters < 440e6 and deberta.partitioned < deberta.parameters


@pytest.mark.parametrize("world", [2, 64])
def test_bytes_per_rank_follow_the_ring_formulas(world):
    shape = scaling.shape_of("bert-base-uncased")
    share, p = (world - 1) / world, shape.parameters
    ddp = scaling.step_bytes(shape, "ddp", world, "bf16", micro_batches=4)
    assert ddp["all-reduce"] == pytest.approx(2 * share * 4 * p)  # fp32 gradients, once per step
    assert ddp["broadcast"] == pytest.approx(4 * share * shape.buffer_bytes)  # buffers at every forward
    zero2 = scaling.step_bytes(shape, "zero2", world, "bf16", micro_batches=4)
    assert zero2["all-reduce"] == pytest.approx(4 * 2 * share * 4 * p)  # every micro-batch, one bucket
    assert zero2["all-gather"] == pytest.approx(share * 2 * p)  # bf16 parameters, once
    assert scaling.step_bytes(shape, "zero1", world, "bf16", micro_batches=4)["all-reduce"] == ddp["all-reduce"]
    zero3 = scaling.step_bytes(shape, "zero3", world, "bf16", micro_batches=4)
    persistent = p - shape.partitioned  # whole on every rank, gathered once per step after the optimizer's update
    assert 0 < persistent < p / 100
    assert zero3["all-gather"] == pytest.approx(share * 2 * (4 * shape.partitioned + persistent))
    assert zero3["reduce-scatter"] == pytest.approx(4 * share * 4 * p)
    fsdp = scaling.step_bytes(shape, "fsdp", world, "bf16")
    assert fsdp["all-gather"] == pytest.approx(2 * share * 2 * p) and fsdp["reduce-scatter"] == pytest.approx(
        share * 4 * p
    )
    # Parameters stay gathered from a micro-batch's backward to the next's forward: 5 gathers for 4, not 8.
    assert scaling.step_bytes(shape, "fsdp", world, "bf16", micro_batches=4)["all-gather"] == pytest.approx(
        5 * share * 2 * p
    )
    gloo = scaling.step_bytes(shape, "fsdp", world, "bf16", backend="gloo")  # gloo's reduce-scatter is an all-reduce
    assert gloo["reduce-scatter"] == pytest.approx(2 * fsdp["reduce-scatter"])
    assert scaling.step_bytes(shape, "fsdp-offload", world, "bf16") == fsdp  # offload is not network traffic


def test_one_process_moves_nothing_and_more_bandwidth_scales_better():
    shape = scaling.shape_of("bert-base-uncased")
    assert sum(scaling.step_bytes(shape, "ddp", 1).values()) == 0
    fast = scaling.projection(shape, "ddp", 64, "h100-nvlink-ib400", 0.06, 32)
    slow = scaling.projection(shape, "ddp", 64, "h100-nvlink-ib100", 0.06, 32)
    assert slow["comm_seconds"] == pytest.approx(4 * fast["comm_seconds"])
    assert slow["efficiency_serial"] < fast["efficiency_serial"] <= fast["efficiency_overlapped"] == 1.0
    inside = scaling.projection(shape, "ddp", 8, "h100-nvlink-ib400", 0.06, 32)  # one node: NVLink only
    assert inside["efficiency_serial"] > fast["efficiency_serial"]


def test_the_command_prints_bytes_and_a_projection(capsys):
    assert scaling.main(["--model", "bert-base-uncased", "--topology", "zero2", "--gpus", "64"]) == 0
    out = capsys.readouterr().out
    assert "109.5M parameters" in out and "zero2 on 64 GPUs" in out
    assert "all-reduce" in out and "862 MB" in out and "216 MB" in out and "total" in out
    assert "samples/s" in out and "scaling efficiency" in out
    with pytest.raises(SystemExit):
        scaling.main(["--gpus", "0"])
