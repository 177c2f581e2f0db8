"""Dropout for training on CPU at a tenth of the cost of torch's, same probabilities, same math.

Profiling MiniLM fine-tuning on a 2-core CPU (16 x ~210 tokens, fp32) put a third of each step into dropout:
torch draws every mask element with `bernoulli_` from a serial Mersenne Twister (about 8 ns an element), and
attention-probability dropout forces `scaled_dot_product_attention` off its fused CPU kernel onto the math
path, which also masks, checks and copies the full (batch, heads, length, length) tensor several times.

Here a mask costs about 1.2 ns an element: 32 random bits per element from NumPy's SFC64 generator, compared
against a threshold, so an element is dropped with probability p to within 2^-32 (finer than float32 can hold
p). Each mask's generator is seeded by one draw from torch's global RNG, so masks follow torch's RNG state:
a run is as reproducible, and a checkpoint (which saves that state) as exactly resumable, as with torch's
dropout. The masks are different random numbers from torch's, so a run's trajectory differs from one with
`train.fast_cpu_dropout=false` the way two seeds differ; the expected update is the same. Masks are uint8 and
applied by multiplication, which PyTorch's CPU kernels do about 6x faster than masked_fill with a bool mask.

`use_fast_cpu_dropout(model)` swaps a model's `nn.Dropout` modules for `CpuDropout` and, for models that use
transformers' `sdpa` attention, routes training-time attention through `attention_with_cpu_dropout`:
`DropoutAttention` computes softmax(q k^T / sqrt(d) + mask), drops with a fast mask and multiplies by v,
forward and backward written out by hand and run a sequence at a time so each piece stays in cache, in fp32
as PyTorch's CPU math kernel does for bf16 inputs. In evaluation, without dropout, or off CPU, both defer to
the stock path (PyTorch's fused SDPA kernels; on GPUs dropout is generated inside the kernels and is cheap).
The attention implementation's name is not saved with a model (transformers keeps it out of config.json), so
exports load anywhere with plain `sdpa`.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

ATTENTION_NAME = "sdpa_cpu_dropout"
"""transformers attention implementation registered by this module."""


def _mask_bits(count: int) -> np.ndarray:
    """`count` int32 values, uniform over [-2^31, 2^31), from NumPy's SFC64 seeded by one draw from torch's
    global RNG: masks follow torch's RNG state, so runs are reproducible and resumes exact."""
    seed = int(torch.randint(0, 2**62, ()))
    return np.random.SFC64(seed).random_raw((count + 1) // 2).view(np.int32)[:count]


def _threshold(p: float) -> int:
    return round(p * 2**32) - 2**31  # an int32 below it has probability p (to within 2^-32)


def kept_mask(shape: torch.Size | tuple[int, ...], p: float) -> torch.Tensor:
    """A uint8 CPU tensor of `shape`: 0 (dropped) with probability p (to within 2^-32), else 1 (kept).

    uint8, not bool, because PyTorch's CPU kernels multiply by a uint8 tensor at about 0.25 ns an element and
    masked_fill with a bool one at 1.5-1.8 (measured on a 2-core EPYC): dropout is applied as `x * keep`."""
    keep = torch.empty(shape, dtype=torch.uint8)
    fill_kept_mask(keep, p)
    return keep


def fill_kept_mask(keep: torch.Tensor, p: float) -> None:
    """Fill a contiguous uint8 CPU tensor with a fresh keep mask, in place (NumPy compares 3x faster than
    torch, and writes the result straight into the tensor's memory)."""
    np.greater_equal(_mask_bits(keep.numel()), _threshold(p), out=keep.view(-1).numpy().view(np.bool_))


class CpuDropout(nn.Dropout):
    """`nn.Dropout` whose training-time mask on CPU comes from `kept_mask`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or x.device.type != "cpu":
            return super().forward(x)
        if self.p == 1:
            return torch.zeros_like(x)
        # mul's backward needs the mask, not its output, so scaling that output in place is safe for autograd.
        return x.mul(kept_mask(x.shape, self.p)).mul_(1 / (1 - self.p))


ATTENTION_CHUNK_ELEMENTS = 2**19
"""Attention scores per chunk in `DropoutAttention` (2 MiB of fp32): one sequence at MiniLM's IMDB lengths
(12 heads x 208 x 208), two heads of one at 512 tokens, so a chunk's scores, probabilities and mask stay in
cache between the steps that use them. Measured on a 2-core EPYC (one layer's forward + backward, medians of
10, the machine's speed drifting by about 20% over the day): at 16 x 208 tokens per-sequence chunks took
56-86 ms and one chunk for the whole batch about as long; one head per chunk 1.5-1.8x longer (more, smaller
matmuls); at 4 x 512, chunks of one or two heads 110 ms and the whole batch 132."""


class DropoutAttention(torch.autograd.Function):
    """softmax(q k^T * scale + bias) with dropout, times v, forward and backward by hand, a few heads at a
    time. q, k, v: [batch, heads, length, head_dim] fp32; bias: additive, broadcastable to
    [batch, heads, length, length], or None. Returns [batch, length, heads, head_dim].

    Autograd over the same ops makes about a dozen passes over the [batch, heads, length, length] tensors
    through main memory, each op allocating its own output. Here each chunk (`ATTENTION_CHUNK_ELEMENTS`
    scores) goes through all its steps while it is in cache, and only the probabilities and the keep mask are
    kept for backward (the gradient through the softmax needs the undropped probabilities): two writes
    forward, two reads backward. The 1 / (1 - p) of dropout rides on the matmuls' alpha."""

    @staticmethod
    def forward(ctx, query, key, value, bias, p: float, scale: float):
        # One copy each into [batch, heads, length, head_dim] order up front, so every chunk below is a view.
        query, key, value = (t.contiguous() for t in (query, key, value))
        batch, heads, length, head_dim = query.shape
        keys = key.shape[-2]
        probs = query.new_empty(batch, heads, length, keys)  # saved for backward
        keep = torch.empty(batch, heads, length, keys, dtype=torch.uint8)  # saved for backward
        context = query.new_empty(batch, heads, length, head_dim)
        for seqs, hds in chunks(batch, heads, length * keys):
            q, k, v, out = (t[seqs, hds].flatten(0, 1) for t in (query, key, value, context))
            scores = torch.baddbmm(_empty(q.shape[0], length, keys), q, k.transpose(1, 2), beta=0, alpha=scale)
            if bias is not None:
                scores.view(probs[seqs, hds].shape).add_(_rows(bias, seqs, hds))
            torch._softmax(scores.view(probs[seqs, hds].shape), -1, False, out=probs[seqs, hds])
            fill_kept_mask(keep[seqs, hds], p)
            dropped = probs[seqs, hds].flatten(0, 1) * keep[seqs, hds].flatten(0, 1)
            torch.baddbmm(out, dropped, v, beta=0, alpha=1 / (1 - p), out=out)
        ctx.save_for_backward(query, key, value, probs, keep)
        ctx.p, ctx.scale = p, scale
        return context.transpose(1, 2)  # [batch, length, heads, head_dim], as transformers' attention returns

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, probs, keep = ctx.saved_tensors
        batch, heads, length, head_dim = query.shape
        keys = key.shape[-2]
        keep_scale = 1 / (1 - ctx.p)
        grad_context = grad_out.transpose(1, 2).contiguous()  # [batch, heads, length, head_dim]
        grads = [torch.empty_like(t) for t in (query, key, value)]
        for seqs, hds in chunks(batch, heads, length * keys):
            q, k, v, g, dq, dk, dv = (t[seqs, hds].flatten(0, 1) for t in (query, key, value, grad_context, *grads))
            p_all, kept = probs[seqs, hds].flatten(0, 1), keep[seqs, hds].flatten(0, 1)
            torch.baddbmm(dv, (p_all * kept).transpose(1, 2), g, beta=0, alpha=keep_scale, out=dv)
            # d(dropped probabilities), then through the mask, then through the softmax; 1 / (1 - p) and the
            # score scale are applied by the last two matmuls
            d_probs = torch.bmm(g, v.transpose(1, 2)).mul_(kept)
            d_scores = torch._softmax_backward_data(d_probs, p_all, -1, p_all.dtype)
            factor = keep_scale * ctx.scale
            torch.baddbmm(dq, d_scores, k, beta=0, alpha=factor, out=dq)
            torch.baddbmm(dk, d_scores.transpose(1, 2), q, beta=0, alpha=factor, out=dk)
        return grads[0], grads[1], grads[2], None, None, None


def chunks(batch: int, heads: int, per_head: int) -> list[tuple[slice, slice]]:
    """(sequences, heads) slices holding about ATTENTION_CHUNK_ELEMENTS scores each: several whole sequences,
    or a group of one sequence's heads (at least one head)."""
    if heads * per_head <= ATTENTION_CHUNK_ELEMENTS:
        step = ATTENTION_CHUNK_ELEMENTS // (heads * per_head)
        return [(slice(b, min(b + step, batch)), slice(0, heads)) for b in range(0, batch, step)]
    step = max(1, ATTENTION_CHUNK_ELEMENTS // per_head)
    return [(slice(b, b + 1), slice(h, min(h + step, heads))) for b in range(batch) for h in range(0, heads, step)]


def _rows(bias: torch.Tensor, seqs: slice, hds: slice) -> torch.Tensor:
    """The part of a broadcastable [batch or 1, heads or 1, length or 1, keys] bias that a chunk adds."""
    return bias[seqs if bias.shape[0] > 1 else slice(None), hds if bias.shape[1] > 1 else slice(None)]


def _empty(*shape: int) -> torch.Tensor:
    return torch.empty(shape)


def attention_with_cpu_dropout(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers attention function: `sdpa`, except training-time dropout on CPU (see module docstring)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    plain = (
        query.device.type == "cpu"
        and module.training
        and 0 < dropout < 1
        and not kwargs.get("is_causal")
        and not getattr(module, "is_causal", False)
        and kwargs.get("position_bias") is None
        and getattr(module, "num_key_value_groups", 1) == 1
        and query.shape[-2] == key.shape[-2]
    )
    if not plain:  # everything this function does not specialise: the stock path, unchanged
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)  # fmt: skip
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    bias = None
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:  # sdpa masks: True attends
            bias = torch.zeros(attention_mask.shape).masked_fill_(~attention_mask, torch.finfo(torch.float32).min)
        else:  # additive float masks
            bias = attention_mask.float()
    # fp32 throughout, as PyTorch's CPU math kernel computes bf16 attention (and fp32 matmuls are the faster
    # ones on CPUs without AMX).
    with torch.autocast("cpu", enabled=False):
        output = DropoutAttention.apply(query.float(), key.float(), value.float(), bias, dropout, scale)
    return output.to(query.dtype), None


def register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, attention_with_cpu_dropout)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)  # the same boolean masks as sdpa


def use_fast_cpu_dropout(model: nn.Module) -> dict:
    """Swap `model`'s dropout for the CPU-fast one, in place, and route its training attention through
    `attention_with_cpu_dropout` where the model uses transformers' sdpa attention. Models with another
    attention (DeBERTa's own, eager) keep it: their dropout modules are swapped, their attention is not.
    Returns what was swapped and what was kept, for the log."""
    from harness.families import family_of_config

    swapped = 0
    for parent in model.modules():
        for name, child in parent.named_children():
            if type(child) is nn.Dropout:  # subclasses may do more than drop: leave them alone
                setattr(parent, name, CpuDropout(child.p, child.inplace).train(child.training))
                swapped += 1
    attention, kept = 0, []
    for sub in model.modules():  # the model and any pretrained encoders inside it (multimodal fusion)
        config = getattr(sub, "config", None)
        if config is None or getattr(sub, "set_attn_implementation", None) is None or sub is not _outermost(model, sub):
            continue
        implementation = getattr(config, "_attn_implementation", None)
        if implementation == "sdpa":
            register_attention()
            sub.set_attn_implementation(ATTENTION_NAME)
            attention += 1
        elif implementation != ATTENTION_NAME:
            family = family_of_config(config)
            kept.append(f"{family.name if family else config.model_type} ({implementation} attention)")
    return {"dropout_modules": swapped, "attention_models": attention, "kept": kept}


def _outermost(model: nn.Module, sub: nn.Module) -> nn.Module:
    """The outermost transformers model that shares `sub`'s config (a classifier and its base model share one).
    A module that only holds the config (the multimodal fusion model keeps its text encoder's) is not a
    transformers model: it cannot set the attention, and the encoder inside it must."""
    for candidate in model.modules():
        if getattr(candidate, "config", None) is getattr(sub, "config", None) and hasattr(
            candidate, "set_attn_implementation"
        ):
            return candidate
    return sub
