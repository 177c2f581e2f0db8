"""MFU arithmetic: FLOPs from a model's config, exactly summed over a batch's lengths."""

import time

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, BertForSequenceClassification

from harness.throughput import FlopCounter, flop_counter_for, measure_peak_flops, train_flops_per_token

CONFIG = dict(vocab_size=500, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
              max_position_embeddings=128)  # fmt: skip


def test_counter_excludes_embeddings_and_counts_attention_per_sequence():
    model = BertForSequenceClassification(BertConfig(**CONFIG, num_labels=2))
    counter = flop_counter_for(model)
    embeddings = sum(p.numel() for p in model.bert.embeddings.parameters()) - sum(
        p.numel() for p in model.bert.embeddings.LayerNorm.parameters()
    )  # the three lookup tables; the embedding LayerNorm is counted like any other weight
    assert counter == FlopCounter(sum(p.numel() for p in model.parameters()) - embeddings, 3, 32)
    # One sequence of s tokens: s times the benchmark's per-token formula at mean length s.
    assert counter.flops(np.array([40])) == pytest.approx(
        40 * train_flops_per_token(counter.non_embedding_params, 3, 32, 40)
    )
    # Sequences of 10 and 30 cost more attention than two of 20 (s^2 per sequence), the same dense work.
    n = counter.non_embedding_params
    assert counter.flops(np.array([10, 30])) - counter.flops(np.array([20, 20])) == pytest.approx(12 * 3 * 32 * 200)
    assert counter.flops(np.array([10, 30])) == pytest.approx(6 * n * 40 + 12 * 3 * 32 * (100 + 900))


def test_tied_mlm_decoder_is_the_embedding_not_a_second_matrix():
    mlm = BertForMaskedLM(BertConfig(**CONFIG))
    classifier = BertForSequenceClassification(BertConfig(**CONFIG, num_labels=2))
    head = 32 * 32 + 32 + 2 * 32 + 500  # MLM transform dense + its LayerNorm + the decoder bias
    pooler_and_classifier = 32 * 32 + 32 + 2 * 32 + 2
    assert (flop_counter_for(mlm).non_embedding_params - head
            == flop_counter_for(classifier).non_embedding_params - pooler_and_classifier)  # fmt: skip


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
    faster one's (else MFU would exceed 100%). Here one layout is made 0.2 s slower per call."""
    real_mm = torch.mm

    def mm(left, right, *, out):
        transposed = not right.is_contiguous()
        if transposed == (slow_layout == "x @ W^T"):
            time.sleep(0.2)
        return real_mm(left, right, out=out)

    monkeypatch.setattr(torch, "mm", mm)
    peak = measure_peak_flops("cpu", "fp32", size=256, reps=2)
    assert peak > 2 * 256**3 / 0.1  # a call took well under the slow layout's 0.2 s
