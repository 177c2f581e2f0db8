"""MFU arithmetic: FLOPs from a model's structure, exactly summed over a batch's lengths (every family's count
against torch's FlopCounterMode: tests/unit/test_families.py)."""

import socket
import time

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from harness.config import ModelConfig
from harness.model import load_model
from harness.throughput import (
    FlopCounter,
    NetworkMeter,
    attention_pairs,
    flop_counter_for,
    measure_peak_flops,
    process_tcp_bytes,
)

CONFIG = dict(vocab_size=500, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
              max_position_embeddings=128)  # fmt: skip


def test_counter_counts_layer_matmuls_per_token_the_head_per_sequence_and_attention_per_pair():
    model = BertForSequenceClassification(BertConfig(**CONFIG, num_labels=2))
    counter = flop_counter_for(model)
    per_layer = 4 * 32 * 32 + 2 * 32 * 64  # Q, K, V, output; the MLP's two matrices
    assert counter == FlopCounter(dense=3 * per_layer, head=32 * 32 + 2 * 32, width=32, windows=(None,) * 3)
    # Sequences of 10 and 30 cost more attention than two of 20 (s^2 per sequence), the same dense work.
    assert counter.flops(np.array([10, 30])) - counter.flops(np.array([20, 20])) == pytest.approx(12 * 3 * 32 * 200)
    assert counter.flops(np.array([10, 30])) == pytest.approx(
        6 * 3 * per_layer * 40 + 6 * (32 * 32 + 64) * 2 + 12 * 3 * 32 * (100 + 900)
    )


def test_local_windows_count_only_the_pairs_a_query_sees():
    lengths = np.array([5, 20])
    assert list(attention_pairs(lengths, None)) == [25, 400]
    # +-4: 9 keys per query away from the ends; the 2 x (4 + 3 + 2 + 1) corner pairs fall outside the sequence.
    assert list(attention_pairs(lengths, 4)) == [25, 20 * 9 - 20]


def test_masked_lm_heads_are_not_counted():
    classifier = flop_counter_for(
        load_model(ModelConfig(name_or_path="builtin:tiny-bert"), "classifier", ["a", "b"])[1]
    )
    mlm = flop_counter_for(load_model(ModelConfig(name_or_path="builtin:tiny-bert"), "masked-lm")[1])
    assert mlm.dense == classifier.dense and mlm.head == 64 * 64  # the (frozen) pooler only
    assert classifier.head == 64 * 64 + 2 * 64


def test_models_without_a_transformer_config_have_no_counter():
    assert flop_counter_for(torch.nn.Linear(4, 2)) is None


def test_measured_peak_is_a_plausible_flop_rate_and_leaves_the_rng_alone():
    torch.manual_seed(0)
    peak = measure_peak_flops("cpu", "fp32", size=256, reps=3)
    assert 1e8 < peak < 1e14  # between 0.1 GFLOP/s and 100 TFLOP/s on any CPU
    after = torch.rand(3)
    torch.manual_seed(0)
    assert torch.equal(after, torch.rand(3)), "measuring the peak must not change a run's random draws"


@pytest.mark.parametrize("slow_layout", ["x @ W^T", "g @ W"])
def test_the_faster_of_the_two_matmul_layouts_sets_the_peak(monkeypatch, slow_layout):
    """CPUs without native bf16 run one layout through a kernel 20x slower than the other; the peak is the
    faster one's (else MFU would exceed 100%). Here one layout is made 50 ms slower per call."""
    real_mm = torch.mm

    def mm(left, right, *, out):
        transposed = not right.is_contiguous()
        if transposed == (slow_layout == "x @ W^T"):
            time.sleep(0.05)
        return real_mm(left, right, out=out)

    monkeypatch.setattr(torch, "mm", mm)
    peak = measure_peak_flops("cpu", "fp32", size=256, reps=2)
    assert peak > 2 * 256**3 / 0.025  # a call took well under the slow layout's 50 ms


def test_network_meter_counts_this_processs_tcp_payload_per_step():
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        peer, _ = server.accept()
        meter = NetworkMeter(step=0)  # the connection's handshake before this is not counted
        client.sendall(b"x" * 300_000)
        received = 0
        while received < 300_000:
            received += len(peer.recv(1 << 20))
        peer.sendall(b"y" * 1_000)
        assert len(client.recv(1 << 20)) == 1_000
        deadline = time.monotonic() + 5  # sent bytes count once acknowledged (a delayed ACK: up to 200 ms)
        while sum(sent for sent, _ in process_tcp_bytes().values()) < 301_000 and time.monotonic() < deadline:
            time.sleep(0.01)
        # Both ends are this process's: each direction counted once as sent and once as received, over 2 steps.
        assert meter.per_step(2) == {"net_sent_bytes_per_step": 150_500, "net_received_bytes_per_step": 150_500}
        client.close()  # sockets gone since the last count drop out, without a negative count
        peer.close()
        assert meter.per_step(3) == {"net_sent_bytes_per_step": 0, "net_received_bytes_per_step": 0}
