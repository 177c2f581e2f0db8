"""Dropout for training on CPU at a tenth of the cost of torch's, same probabilities, same math.

Profiling MiniLM fine-tuning on a 2-core CPU (16 x ~210 tokens, fp32) put a third of each step into dropout:
torch draws every mask element with `bernoulli_` from a serial Mersenne Twister (about 8 ns an element), and
attention-probability dropout forces `scaled_dot_product_attention` off its fused CPU kernel onto the math
path, which also masks, checks and copies the full (batch, heads, length, length) tensor several times.

Here a mask costs about 1.5 ns an element: 32 random bits per element from NumPy's SFC64 generator, compared
against a threshold, so an element is dropped with probability p to within 2^-32 (finer than float32 can hold
p). Each mask's generator is seeded by one draw from torch's global RNG, so masks follow torch's RNG state:
a run is as reproducible, and a checkpoint (which saves that state) as exactly resumable, as with torch's
dropout. The masks are different random numbers from torch's, so a run's trajectory differs from one with
`train.fast_cpu_dropout=false` the way two seeds differ; the expected update is the same.

`use_fast_cpu_dropout(model)` swaps a model's `nn.Dropout` modules for `CpuDropout` and, for models that use
transformers' `sdpa` attention, routes training-time attention through `attention_with_cpu_dropout`, which
computes softmax(q k^T / sqrt(d) + mask), drops with a fast mask and multiplies by v, in fp32 as PyTorch's CPU
math kernel does for bf16 inputs. In evaluation, without dropout, or off CPU, both defer to the stock path
(PyTorch's fused SDPA kernels; on GPUs dropout is generated inside the kernels and is already cheap).
The attention implementation's name is not saved with a model (transformers keeps it out of config.json), so
exports load anywhere with plain `sdpa`.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

ATTENTION_NAME = "sdpa_cpu_dropout"
"""transformers attention implementation registered by this module."""


def dropped_mask(shape: torch.Size | tuple[int, ...], p: float) -> torch.Tensor:
    """A bool CPU tensor of `shape`, each element True (dropped) with probability p (to within 2^-32)."""
    count = int(np.prod(shape))
    seed = int(torch.randint(0, 2**62, ()))  # one draw from torch's global RNG: masks follow its state
    bits = np.random.SFC64(seed).random_raw((count + 1) // 2).view(np.int32)[:count]
    threshold = round(p * 2**32) - 2**31  # int32 values are uniform over [-2^31, 2^31)
    return torch.from_numpy(bits).reshape(shape) < threshold


class CpuDropout(nn.Dropout):
    """`nn.Dropout` whose training-time mask on CPU comes from `dropped_mask`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or x.device.type != "cpu":
            return super().forward(x)
        if self.p == 1:
            return torch.zeros_like(x)
        # mul's output is not needed by its backward, so masking it in place is safe for autograd.
        return x.mul(1 / (1 - self.p)).masked_fill_(dropped_mask(x.shape, self.p), 0)


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
    # fp32 throughout, as PyTorch's CPU math kernel computes bf16 attention (and fp32 matmuls are the faster
    # ones on CPUs without AMX).
    with torch.autocast("cpu", enabled=False):
        scores = torch.matmul(query.float() * scale, key.float().transpose(-1, -2))
        if attention_mask is not None:  # matmul keeps its inputs for backward, not its output: in place is safe
            if attention_mask.dtype == torch.bool:  # sdpa masks: True attends
                scores.masked_fill_(~attention_mask, torch.finfo(scores.dtype).min)
            else:  # additive float masks
                scores.add_(attention_mask)
        probs = torch.softmax(scores, dim=-1).masked_fill(dropped_mask(scores.shape, dropout), 0)
        # 1 / (1 - p) applied to the (much smaller) output instead of the probabilities: the same product.
        output = torch.matmul(probs, value.float()).mul_(1 / (1 - dropout))
    return output.to(query.dtype).transpose(1, 2).contiguous(), None


def register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, attention_with_cpu_dropout)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)  # the same boolean masks as sdpa


def use_fast_cpu_dropout(model: nn.Module) -> dict[str, int]:
    """Swap `model`'s dropout for the CPU-fast one, in place. Returns what was swapped, for the log."""
    swapped = 0
    for parent in model.modules():
        for name, child in parent.named_children():
            if type(child) is nn.Dropout:  # subclasses may do more than drop: leave them alone
                setattr(parent, name, CpuDropout(child.p, child.inplace).train(child.training))
                swapped += 1
    attention = 0
    for sub in model.modules():  # the model and any pretrained encoders inside it (multimodal fusion)
        config = getattr(sub, "config", None)
        if getattr(sub, "set_attn_implementation", None) and getattr(config, "_attn_implementation", None) == "sdpa":
            register_attention()
            sub.set_attn_implementation(ATTENTION_NAME)
            attention += 1
    return {"dropout_modules": swapped, "attention_models": attention}
