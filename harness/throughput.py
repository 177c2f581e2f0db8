"""Model FLOPs utilisation: the training FLOPs a model's structure implies, and the device's measured matmul peak.

MFU = (training FLOPs of the real tokens processed) / wall time / (peak FLOP/s of all processes). The FLOPs
count only useful work: padding, dropout, softmax and layer norms are overhead that lowers MFU, so it says
how close the run is to the hardware, the same way on a CPU and a GPU. The benchmark (benchmarks/vs_trainer.py)
and the training log use these same definitions.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

MATMUL_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class FlopCounter:
    """Training FLOPs (forward + backward, 3x forward) of sequences with given real lengths, from the model's
        structure (harness/families.py). A sequence of s real tokens costs

            6 * dense * s                    every weight of the encoder's matmuls, 2 FLOPs per token forward, 4
                                             backward; `dense` counts a weight once per use (ALBERT's shared layer
                                             group as often as it runs; factorised embedding projections once)
          + 6 * head                         the task head's matmul weights (pooler, classifier, fusion head), run
                                             once per sequence
          + 12 * width * sum_l pairs_l(s)    attention: Q K^T and A V, 2 * width FLOPs per (query, key) pair each;
                                             pairs = s^2 for global layers, s(2w+1) - w(w+1) for a local window of
                                             +-w (ModernBERT's sliding layers), summed over attention applications
          + 6 * width * s * 2k * types * L   DeBERTa's disentangled attention: each layer scores every query
                                             against 2k relative positions, one matmul per type (c2p, p2c)

    plus, once per forward pass (micro-batch), 6 * width^2 * 2k * types * L: DeBERTa projects its 2k relative
    embeddings through each layer's query or key weights.

        (Kaplan et al. 2020; PaLM appendix B). Not counted, as not useful work or not per token: padding, dropout,
        softmax, norms, embedding lookups, and a
        masked-LM head (it runs on the predicted tokens only; its decoder is the tied word embedding). Frozen
        weights are counted as trained (an upper bound of their backward)."""

    dense: int
    head: int
    width: int
    windows: tuple[int | None, ...]
    """One entry per attention application in a forward pass: None (global) or the local window w."""
    relative: int = 0
    """DeBERTa: 2k x score types x layers (0 elsewhere)."""

    def flops(self, lengths: np.ndarray, passes: int = 1) -> float:
        """Training FLOPs of sequences of these real lengths, run in `passes` forward passes (micro-batches)."""
        s = np.asarray(lengths, dtype=np.float64)
        pairs = sum(attention_pairs(s, w).sum() for w in self.windows)
        attention = 12.0 * self.width * pairs + 6.0 * self.width * self.relative * s.sum()
        relative_projections = 6.0 * self.width**2 * self.relative * passes
        return float(6.0 * self.dense * s.sum() + 6.0 * self.head * len(s) + attention + relative_projections)

    def per_sample(self, lengths: np.ndarray) -> float:
        """Mean training FLOPs of one sequence of these lengths (the per-micro-batch DeBERTa term left out)."""
        return self.flops(lengths, passes=0) / max(1, len(lengths))

    def per_token(self, lengths: np.ndarray) -> float:
        """Training FLOPs per real token over sequences of these lengths (the per-micro-batch term left out)."""
        return self.flops(lengths, passes=0) / max(1, int(np.sum(lengths)))


def attention_pairs(lengths: np.ndarray, window: int | None) -> np.ndarray:
    """(query, key) pairs a bidirectional attention layer scores per sequence: s^2, or with a local window of
    +-w, s(2w+1) - w(w+1) (the two corners a window cannot reach) once s > w."""
    if window is None:
        return lengths**2
    return np.where(lengths <= window + 1, lengths**2, lengths * (2 * window + 1) - window * (window + 1))


def flop_counter_for(model: torch.nn.Module) -> FlopCounter | None:
    """The counter for a model of a family harness/families.py knows (inside a multimodal classifier too); None
    for other models."""
    from harness.families import StructureError, structure_of, transformer_in

    encoder = transformer_in(model)
    try:
        parts = structure_of(encoder, "MFU")
    except StructureError:
        return None
    config = encoder.config

    def matmul_weights(modules) -> int:
        return sum(m.weight.numel() for root in modules for m in root.modules() if isinstance(m, torch.nn.Linear))

    runs = parts.family.runs_per_layer(config)
    in_encoder = {id(p) for root in [*parts.layers, *parts.embeddings] for p in root.parameters()}
    tied = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    head_modules = [m for m in model.modules() if isinstance(m, torch.nn.Linear)
                    and id(m.weight) not in in_encoder and id(m.weight) not in tied]  # fmt: skip
    if getattr(model, "harness_family", None) is not None:  # a masked-LM model: its head is not counted
        head_modules = [m for m in head_modules if any(m is p for p in parts.base.modules())]
    span, types = parts.family.relative_scores(config)
    return FlopCounter(
        dense=matmul_weights(parts.layers) * runs + matmul_weights(parts.embeddings),
        head=sum(m.weight.numel() for m in head_modules),
        width=int(config.hidden_size),
        windows=tuple(parts.family.attention_windows(config)),
        relative=2 * span * types * int(config.num_hidden_layers),
    )


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


def process_tcp_bytes() -> dict[int, tuple[int, int]]:
    """Payload bytes each TCP socket of this process has sent (and had acknowledged) and received so far, by
    socket inode: what its collectives moved over gloo's TCP pairs (and its rendezvous store client), without
    the link's framing (TCP/IP headers, acknowledgements), which grows with the number of messages rather than
    their size. Linux only (TCP_INFO's tcpi_bytes_acked / tcpi_bytes_received, kernel 4.1+)."""
    counts: dict[int, tuple[int, int]] = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # closed since the listing (the listing's own fd among them)
            continue
        if not target.startswith("socket:["):
            continue
        inode = int(target[len("socket:[") : -1])
        if inode in counts:
            continue
        try:
            with socket.socket(fileno=os.dup(int(fd))) as sock:  # a second fd onto the socket, closed after
                if sock.type != socket.SOCK_STREAM or sock.family not in (socket.AF_INET, socket.AF_INET6):
                    continue
                info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_BYTES_END)
        except OSError:
            continue
        if len(info) >= TCP_INFO_BYTES_END:
            counts[inode] = struct.unpack_from("QQ", info, TCP_INFO_BYTES_ACKED)
    return counts


TCP_INFO_BYTES_ACKED = 120
"""Offset of tcpi_bytes_acked in struct tcp_info (linux/tcp.h); tcpi_bytes_received follows it."""
TCP_INFO_BYTES_END = TCP_INFO_BYTES_ACKED + 16


class NetworkMeter:
    """This process's network traffic per optimizer step between two log steps (logging.network_bytes): the
    payload its TCP sockets sent and received, i.e. what its gloo collectives moved (NCCL's traffic over NVLink
    or InfiniBand does not pass through sockets and is not counted). Counted from the start of training; a
    window with a validation or a checkpoint in it counts their traffic too."""

    def __init__(self, step: int):
        self._step = step
        self._sockets = process_tcp_bytes()

    def per_step(self, step: int) -> dict[str, float]:
        sockets = process_tcp_bytes()
        sent = received = 0
        for inode, (now_sent, now_received) in sockets.items():
            # A socket opened since the last count counts from zero; one closed since drops out without a loss.
            last_sent, last_received = self._sockets.get(inode, (0, 0))
            sent, received = sent + now_sent - last_sent, received + now_received - last_received
        steps = max(1, step - self._step)
        self._step, self._sockets = step, sockets
        return {"net_sent_bytes_per_step": sent / steps, "net_received_bytes_per_step": received / steps}


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

    def step(self, lengths: np.ndarray, passes: int) -> None:
        """One optimizer step over sequences of these real lengths (all ranks' examples) in `passes` forward
        passes (micro-batches, over all ranks)."""
        self.examples += len(lengths)
        self.tokens += int(lengths.sum())
        if self.flop_counter is not None:
            self.flops += self.flop_counter.flops(lengths, passes)

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
