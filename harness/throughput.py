"""Model FLOPs utilisation: the training FLOPs a model's config implies, and the device's measured matmul peak.

MFU = (training FLOPs of the real tokens processed) / wall time / (peak FLOP/s of all processes). The FLOPs
count only useful work: padding, dropout, softmax and layer norms are overhead that lowers MFU, so it says
how close the run is to the hardware, the same way on a CPU and a GPU. The benchmark (benchmarks/vs_trainer.py)
and the training log use these same definitions.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

MATMUL_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def train_flops_per_token(non_embedding_params: int, layers: int, hidden: int, mean_length: float) -> float:
    """Training FLOPs (forward + backward) per real token, from the model's config:

        6 * N                          dense matmuls: 2 FLOPs per weight per token forward, 4 backward, where
                                       N = parameters outside the embeddings (a lookup is not a matmul);
      + 12 * layers * hidden * S       attention: the scores Q K^T and the weighted sum A V cost 2 * S * hidden
                                       FLOPs each per token per layer forward (4 * S * hidden), times 3 for
                                       forward + backward;

    with S the mean real (non-padding) length of a training sequence (Kaplan et al. 2020; PaLM appendix B)."""
    return 6.0 * non_embedding_params + 12.0 * layers * hidden * mean_length


@dataclass(frozen=True)
class FlopCounter:
    """Training FLOPs of a batch of sequences: the per-token formula above, summed exactly over the batch
    (a sequence of s tokens costs 6 N s + 12 layers hidden s^2)."""

    non_embedding_params: int
    layers: int
    hidden: int

    def flops(self, lengths: np.ndarray) -> float:
        lengths = np.asarray(lengths, dtype=np.float64)
        return 6.0 * self.non_embedding_params * lengths.sum() + 12.0 * self.layers * self.hidden * (lengths**2).sum()


def flop_counter_for(model: torch.nn.Module) -> FlopCounter | None:
    """From a transformer's config (BERT-likes, DistilBERT); None where the model has no such config."""
    config = getattr(model, "config", None)
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layers", None)
    hidden = getattr(config, "hidden_size", None) or getattr(config, "dim", None)
    if not layers or not hidden:
        return None
    embedding = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    # Distinct parameters (a tied MLM decoder is the word embedding) outside the embedding tables.
    params = {id(p): p for p in model.parameters() if id(p) not in embedding}
    return FlopCounter(sum(p.numel() for p in params.values()), int(layers), int(hidden))


def measure_peak_flops(device: str | torch.device, precision: str, size: int, reps: int) -> float:
    """Best-of-`reps` FLOP/s of a size x size matmul in the training precision's matmul dtype, on `device`.

    Both operand layouts a dense layer uses are timed and the faster counts: x @ W^T (forward) and g @ W
    (backward). On CPUs without native bf16 they take different kernels, up to 20x apart (measured on an
    AVX2-only EPYC: 0.9 vs 19 GFLOP/s), and a peak from the slow one alone would put MFU above 100%."""
    device = torch.device(device)
    dtype = MATMUL_DTYPES[precision]
    # Constant operands: drawing random ones would advance the global RNG, and with it a run's dropout masks.
    a = torch.full((size, size), 0.5, device=device, dtype=dtype)
    b = torch.full((size, size), 0.25, device=device, dtype=dtype)
    c = torch.empty(size, size, device=device, dtype=dtype)
    inner = 20 if device.type == "cuda" else 1  # a GPU matmul takes about a millisecond: time a burst

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def seconds(left: torch.Tensor, right: torch.Tensor, out: torch.Tensor) -> float:
        start = time.perf_counter()
        for _ in range(inner):
            torch.mm(left, right, out=out)
        sync()  # host sync: wait for the burst before reading the clock
        return (time.perf_counter() - start) / inner

    # Pick the faster layout on a small probe first: timing the slow one at full size can take minutes.
    probe = [t[:256, :256].contiguous() for t in (a, b, c)]
    layouts = [lambda m: m, lambda m: m.t()]
    for layout in layouts:
        seconds(probe[0], layout(probe[1]), probe[2])  # warm-up: kernel selection
    fastest = min(layouts, key=lambda layout: min(seconds(probe[0], layout(probe[1]), probe[2]) for _ in range(3)))
    right = fastest(b)
    torch.mm(a, right, out=c)  # warm-up: kernel selection, page faults
    sync()
    best = min(seconds(a, right, c) for _ in range(reps))
    del a, b, c
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return 2.0 * size**3 / best


def quick_peak_flops(device: torch.device, precision: str) -> float:
    """The peak for a training run's log: a few matmuls, well under a second (the benchmark times longer)."""
    size = 8192 if device.type == "cuda" else 1024
    return measure_peak_flops(device, precision, size, reps=5)


def run_peak_flops(accelerator, precision: str, peak_tflops_per_process: float) -> tuple[float, str]:
    """Peak FLOP/s of all processes together and where it comes from: logging.peak_tflops per process, or each
    process's measured matmul peak (measured at the same time on every rank, so CPU ranks share the cores as
    they will in training)."""
    from accelerate.utils import gather_object

    if peak_tflops_per_process > 0:
        return peak_tflops_per_process * 1e12 * accelerator.num_processes, "logging.peak_tflops"
    accelerator.wait_for_everyone()
    return float(sum(gather_object([quick_peak_flops(accelerator.device, precision)]))), "measured"


class ThroughputMeter:
    """Samples/s, real tokens/s, model FLOP/s and MFU of the training steps alone.

    The clock runs from `start()` to `stop()`; time spent in `paused(what)` blocks (validation, checkpoints)
    is taken out of it and reported beside it, so the rate in the last log line and in results.json are the
    same figure. Counts start at this (re)start: a resumed run reports the speed of its own steps."""

    def __init__(self, flop_counter: FlopCounter | None, peak_flops: float | None, peak_source: str):
        self.flop_counter = flop_counter
        self.peak_flops = peak_flops
        self.peak_source = peak_source
        self.examples = 0
        self.tokens = 0
        self.flops = 0.0
        self.other_seconds: dict[str, float] = {}
        self._started: float | None = None
        self._stopped: float | None = None

    def start(self) -> None:
        self._started = time.monotonic()

    def stop(self) -> None:
        if self._started is not None and self._stopped is None:
            self._stopped = time.monotonic()

    def step(self, lengths: np.ndarray) -> None:
        """One optimizer step over sequences of these real lengths (all ranks' examples)."""
        self.examples += len(lengths)
        self.tokens += int(lengths.sum())
        if self.flop_counter is not None:
            self.flops += self.flop_counter.flops(lengths)

    @contextmanager
    def paused(self, what: str) -> Iterator[None]:
        """Time spent inside is `what`'s (validation, checkpoint, test), not training's."""
        start = time.monotonic()
        try:
            yield
        finally:
            self.other_seconds[what] = self.other_seconds.get(what, 0.0) + time.monotonic() - start

    @property
    def train_seconds(self) -> float:
        if self._started is None:
            return 0.0
        end = self._stopped if self._stopped is not None else time.monotonic()
        paused = sum(v for k, v in self.other_seconds.items() if k != "test")  # test runs after stop()
        return max(0.0, end - self._started - paused)

    def rates(self) -> dict[str, float]:
        """samples_per_s, tokens_per_s and, where the model's FLOPs are known, tflops_per_s and mfu."""
        seconds = self.train_seconds
        if seconds <= 0 or not self.examples:
            return {}
        rates = {"samples_per_s": self.examples / seconds, "tokens_per_s": self.tokens / seconds}
        if self.peak_flops and self.flop_counter is not None:
            rates["tflops_per_s"] = self.flops / seconds / 1e12
            rates["mfu"] = self.flops / seconds / self.peak_flops
        return rates

    def results(self) -> dict[str, float | str]:
        """results.json's throughput fields."""
        rates = self.rates()
        out: dict[str, float | str] = {
            "train_seconds": round(self.train_seconds, 3),
            "train_samples_per_s": rates.get("samples_per_s", 0.0),
            "train_tokens_per_s": rates.get("tokens_per_s", 0.0),
        }
        if "mfu" in rates:
            out.update(train_tflops_per_s=rates["tflops_per_s"], train_mfu=rates["mfu"],
                       peak_tflops=self.peak_flops / 1e12, peak_source=self.peak_source)  # fmt: skip
        for what in ("validation", "checkpoint", "test"):
            out[f"{what}_seconds"] = round(self.other_seconds.get(what, 0.0), 3)
        return out
