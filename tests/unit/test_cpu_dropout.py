"""CPU-fast dropout (harness/cpu_dropout.py) and the CPU allocator setting (harness/distributed.py)."""

import copy
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from harness import cpu_dropout
from harness.config import ModelConfig
from harness.cpu_dropout import ATTENTION_NAME, CpuDropout, attention_with_cpu_dropout, kept_mask
from harness.model import load_model


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_masks_drop_with_the_asked_probability_and_follow_torchs_rng(p):
    n = 1_000_000
    torch.manual_seed(0)
    first, second = kept_mask((n,), p), kept_mask((1000, 1000), p)
    torch.manual_seed(0)
    again = kept_mask((n,), p)
    assert first.dtype == torch.uint8 and second.shape == (1000, 1000) and set(first.unique().tolist()) == {0, 1}
    assert torch.equal(first, again), "the same torch RNG state gives the same mask"
    assert not torch.equal(first, second.flatten()), "the next mask is a new draw"
    sigma = (p * (1 - p) / n) ** 0.5
    for mask in (first, second):
        assert abs((mask == 0).float().mean().item() - p) < 5 * sigma


def test_a_mask_filled_into_a_slice_lands_there_only():
    keep = torch.full((4, 6), 7, dtype=torch.uint8)
    cpu_dropout.fill_kept_mask(keep[1:3], 0.5)
    assert (keep[[0, 3]] == 7).all() and set(keep[1:3].unique().tolist()) <= {0, 1}
    with pytest.raises(RuntimeError):  # a strided view cannot be filled in place: refused, not silently copied
        cpu_dropout.fill_kept_mask(keep[:, 1:3], 0.5)


def test_dropout_module_keeps_the_expectation_and_masks_its_gradient():
    torch.manual_seed(1)
    x = torch.rand(64, 300, requires_grad=True)
    dropout = CpuDropout(0.25)
    y = dropout(x)
    dropped = y == 0
    assert 0.2 < dropped.float().mean() < 0.3
    torch.testing.assert_close(y[~dropped], (x / 0.75)[~dropped])
    y.sum().backward()
    torch.testing.assert_close(x.grad, (~dropped).float() / 0.75)
    dropout.eval()
    assert dropout(x) is x


def bert_like_module(training: bool) -> nn.Module:
    module = nn.Module()
    module.is_causal = False
    module.train(training)
    return module


def attention_inputs(dtype=torch.float32):
    torch.manual_seed(2)
    q, k, v = (torch.randn(3, 4, 10, 8, dtype=dtype, requires_grad=True) for _ in range(3))
    keep = torch.ones(3, 1, 10, 10, dtype=torch.bool)
    keep[1, ..., 7:] = False  # the second sequence has 3 padding positions
    return q, k, v, keep


@pytest.mark.parametrize(("autocast", "chunk"), [(False, 2**19), (True, 2**19), (False, 800), (False, 1)])
def test_training_attention_equals_softmax_dropout_matmul_with_its_mask(monkeypatch, autocast, chunk):
    """Forward and the hand-written backward equal autograd over the plain ops, whether the batch goes through
    in one chunk, in chunks of two sequences (800 scores: 2 x 4 heads x 10 x 10) or one head at a time."""
    masks = []
    fill = cpu_dropout.fill_kept_mask

    def recording(keep, p):
        fill(keep, p)
        masks.append(keep.clone())

    monkeypatch.setattr(cpu_dropout, "fill_kept_mask", recording)
    monkeypatch.setattr(cpu_dropout, "ATTENTION_CHUNK_ELEMENTS", chunk)
    q, k, v, keep = attention_inputs()
    scale, p = 8**-0.5, 0.3
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out, _ = attention_with_cpu_dropout(bert_like_module(True), q, k, v, keep, dropout=p, scaling=scale)
    assert out.shape == (3, 10, 4, 8) and out.dtype == torch.float32
    assert len(masks) == {2**19: 1, 800: 2, 1: 12}[chunk]  # 3 sequences x 4 heads
    drop = torch.cat([m.flatten() for m in masks]).view(3, 4, 10, 10) == 0  # chunks come in (sequence, head) order
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))

    scores = (q @ k.transpose(-1, -2) * scale).masked_fill(~keep, float("-inf"))
    expected = (scores.softmax(-1) * ~drop / (1 - p)) @ v
    expected = expected.transpose(1, 2)
    torch.testing.assert_close(out, expected)
    for got, want in zip(grads, torch.autograd.grad(expected.square().sum(), (q, k, v)), strict=True):
        torch.testing.assert_close(got, want)
    assert not drop[1, :, :, 7:].logical_not().all(), "padding columns get masks too (they are zeros anyway)"


def test_evaluation_and_no_dropout_take_the_stock_sdpa_path():
    q, k, v, keep = attention_inputs()
    for training, p in ((False, 0.3), (True, 0.0)):
        module = bert_like_module(training)
        torch.manual_seed(4)  # the stock path drops whenever it is given p > 0: the same RNG state for both
        got, _ = attention_with_cpu_dropout(module, q, k, v, keep, dropout=p, scaling=0.3)
        torch.manual_seed(4)
        want, _ = sdpa_attention_forward(module, q, k, v, keep, dropout=p, scaling=0.3)
        assert torch.equal(got, want)


def test_a_swapped_model_evaluates_identically_and_exports_plain_sdpa(tmp_path):
    tokenizer, model = load_model(ModelConfig(name_or_path="builtin:tiny-bert"), "classifier", ["neg", "pos"], 3)
    model.eval()
    batch = tokenizer(["a good film", "bad"], padding=True, return_tensors="pt")
    before = model(**batch).logits
    swapped = cpu_dropout.use_fast_cpu_dropout(model)
    # embeddings, then per layer attention (its p), attention output and feed-forward output, then the head
    assert swapped == {"dropout_modules": 1 + 2 * 3 + 1, "attention_models": 1, "kept": []}
    assert model.config._attn_implementation == ATTENTION_NAME
    assert all(type(m) is not nn.Dropout for m in model.modules())
    assert torch.equal(model(**batch).logits, before)

    model.train()
    torch.manual_seed(5)
    first = model(**batch).logits
    torch.manual_seed(5)
    assert torch.equal(model(**batch).logits, first), "training forward passes follow torch's RNG"
    assert not torch.equal(first, before)

    model.save_pretrained(tmp_path)
    assert ATTENTION_NAME not in (tmp_path / "config.json").read_text()
    assert "sdpa_cpu_dropout" not in json.dumps(model.config.to_dict())


def test_freed_cpu_memory_is_reused_instead_of_faulted_in_again():
    probe = textwrap.dedent("""
        import resource, sys, torch
        from harness.distributed import keep_freed_cpu_memory
        if sys.argv[1] == "keep":
            assert keep_freed_cpu_memory()
        def faults():
            return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.ones(16 * 2**20).sum()  # 64 MiB: over glibc's largest mmap threshold
        start = faults()
        for _ in range(20):
            torch.ones(16 * 2**20).sum()
        print(faults() - start)
    """)
    faults = {}
    for mode in ("keep", "default"):
        proc = subprocess.run([sys.executable, "-c", probe, mode], capture_output=True, text=True, check=True)
        faults[mode] = int(proc.stdout.split()[-1])
    assert faults["default"] > 20 * 16_000 * 0.9, faults  # every 64 MiB tensor is 16,384 fresh 4 KiB pages
    assert faults["keep"] < faults["default"] / 20, faults


def test_training_loss_and_gradient_have_torchs_expectation():
    """Over many dropout draws, the mean loss and mean gradient equal those of torch's dropout: the difference
    from torch is no larger than the difference between two torch runs with other seeds."""
    tokenizer, model = load_model(
        ModelConfig(name_or_path="builtin:tiny-bert", dropout=0.3), "classifier", ["neg", "pos"], 3
    )
    batch = tokenizer(["a good film with a plot", "bad", "the story was fine but long and dull"] * 4,
                      padding=True, return_tensors="pt")  # fmt: skip
    labels = torch.tensor([1, 0, 0] * 4)
    fast = copy.deepcopy(model)
    cpu_dropout.use_fast_cpu_dropout(fast)
    fast.train(), model.train()

    def mean_loss_and_gradient(m, seed: int, draws: int = 300):
        torch.manual_seed(seed)
        losses, gradient = [], 0
        for _ in range(draws):
            m.zero_grad()
            loss = torch.nn.functional.cross_entropy(m(**batch).logits, labels)
            loss.backward()
            losses.append(loss.item())
            gradient = gradient + m.bert.encoder.layer[0].attention.self.query.weight.grad
        losses = torch.tensor(losses)
        return losses.mean(), losses.std() / draws**0.5, gradient / draws

    torch_loss, torch_se, torch_grad = mean_loss_and_gradient(model, 0)
    fast_loss, fast_se, fast_grad = mean_loss_and_gradient(fast, 0)
    other_loss, _, other_grad = mean_loss_and_gradient(model, 1)
    assert abs(fast_loss - torch_loss) < 5 * (torch_se**2 + fast_se**2) ** 0.5
    # Relative to the gradient, measured: 0.173 (fast vs torch) and 0.147 (torch vs torch) at 300 draws; 0.023
    # and 0.024 at 1,500. A wrong scale or a biased mask shifts the mean loss and gradient far beyond that.
    assert (fast_grad - torch_grad).norm() < 1.5 * (other_grad - torch_grad).norm()
