"""One side of the benchmark in its own process: what the parent asks for (`ChildSpec`), what the child
measures (`SideResult`), starting and finishing a child, and the harness side itself (the Trainer sides are
in benchmarks/trainer_sides.py).

Each side runs in a fresh Python process, so memory figures are clean and nothing leaks from one side into
the next. A child runs as `python -m benchmarks.sides SPEC.json` from the repository root.

Timing is the same on every side: training steps only, from the training loop's start to its last optimizer
step. The harness's `ThroughputMeter` takes validation and checkpoint time out of its clock (the
`train_seconds` of its results.json); the Trainer runs no validation and saves nothing (`eval_strategy` and
`save_strategy` "no") and is timed from `on_train_begin` to `on_train_end`. Model loading, tokenization and
the test pass are outside the span on every side.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.workloads import ROOT, data_fingerprint

SIDES = ("harness", "trainer-best", "trainer-default")
MIB = 2**20
HARNESS_EXTRA = ("train_mfu", "peak_tflops", "validation_seconds", "checkpoint_seconds", "test_seconds", "wall_seconds")
"""results.json fields the harness side keeps in its JSON: its own MFU, and where its other time went."""


@dataclass
class ChildSpec:
    """What a child process runs; written as JSON by the parent."""

    side: str
    config: str
    overrides: list[str]
    model_dir: str
    out_dir: str
    result_path: str
    device: str
    threads: int
    total_steps: int
    """Optimizer steps of the harness's batch plan; a Trainer side that runs another number fails."""


@dataclass
class SideResult:
    """What one run of one side measured: written as JSON by the child, completed by the parent."""

    side: str
    train_seconds: float
    """Training steps only (see the module docstring)."""
    train_examples: int
    real_tokens: int
    """Non-padding tokens fed to the model while training."""
    padded_tokens: int | None
    """All tokens fed to the model while training; None from the harness, whose count is its batch plan's."""
    optimizer_steps: int
    test_accuracy: float
    test_samples: int
    peak_memory_mib: float
    data_sha256: str
    """Fingerprint of the token ids and labels the side trained and tested on."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Side-specific figures, for the JSON only."""
    child_seconds: float = 0.0
    """The whole child process, imports and test pass included."""
    repeat: int = 0
    load_average_after: float | None = None
    others_cpu_share: float | None = None
    """CPU time other processes used while this side ran, as a share of all cores (CPU runs, not smoke)."""


Runs = dict[tuple[str, str], list[SideResult]]
"""Every run's result, by (workload name, side), in the order they ran."""


def peak_memory_mib(device: str) -> float:
    """This process's peak: resident set size on CPU, PyTorch's allocated GPU memory on CUDA."""
    if device == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / MIB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def run_harness_side(spec: ChildSpec) -> SideResult:
    """The harness's own loop: `harness.loop.run` as its three parts, so the meter's exact counts and clock are
    at hand (results.json rounds train_seconds to milliseconds and reports no token count)."""
    from harness.config import load_config
    from harness.loop import finish, setup, train
    from harness.tasks.classification import ClassificationTask

    overrides = [*spec.overrides, f"output_dir={spec.out_dir}", "overwrite=true", "logging.progress=plain"]
    if spec.device == "cpu":
        overrides.append(f"runtime.cpu_threads={spec.threads}")  # else the harness takes every core
    cfg = load_config(spec.config, overrides)
    run = setup(cfg, ClassificationTask(cfg))
    train(run)
    results = finish(run)
    meter, splits = run.meter, run.ctx.splits
    return SideResult(
        side=spec.side,
        train_seconds=meter.train_seconds,
        train_examples=meter.examples,
        real_tokens=meter.tokens,
        padded_tokens=None,
        optimizer_steps=results["optimizer_steps"],
        test_accuracy=results["test"]["accuracy"],
        test_samples=results["test"]["samples"],
        peak_memory_mib=peak_memory_mib(spec.device),
        data_sha256=data_fingerprint(splits["train"], splits["test"]),
        extra={key: results.get(key) for key in HARNESS_EXTRA},
    )


def child_main(spec_path: str) -> int:
    """Entry point of a child process: run one side, write its result JSON."""
    import torch

    spec = ChildSpec(**json.loads(Path(spec_path).read_text()))
    started = time.monotonic()
    if spec.device == "cpu":
        torch.set_num_threads(spec.threads)
    else:
        torch.cuda.reset_peak_memory_stats()
    if spec.side == "harness":
        result = run_harness_side(spec)
    else:
        from benchmarks.trainer_sides import run_trainer_side

        result = run_trainer_side(spec, best=spec.side == "trainer-best")
    result.child_seconds = time.monotonic() - started
    Path(spec.result_path).write_text(json.dumps(asdict(result), indent=2) + "\n")
    return 0


def start_side(spec: ChildSpec, log_path: Path) -> subprocess.Popen:
    """Start one side in a fresh Python process; its output goes to `log_path`, its spec next to it."""
    spec_path = log_path.with_suffix(".spec.json")
    spec_path.write_text(json.dumps(asdict(spec), indent=2))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
    if spec.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # the harness would pick a GPU if it saw one
        env["OMP_NUM_THREADS"] = str(spec.threads)
    with log_path.open("w") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "benchmarks.sides", str(spec_path)],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip


def finish_side(proc: subprocess.Popen, spec: ChildSpec, log_path: Path) -> SideResult:
    """Wait for a child and read its result; a failure raises with the end of its log."""
    if proc.wait() != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-40:])
        raise RuntimeError(f"{spec.side} exited with code {proc.returncode}; last lines of {log_path}:\n{tail}")
    return SideResult(**json.loads(Path(spec.result_path).read_text()))


if __name__ == "__main__":
    # Run the importable module's child_main, not this __main__ copy's: trainer_sides imports
    # benchmarks.sides, and both must share one ChildSpec and SideResult.
    from benchmarks.sides import child_main as main

    sys.exit(main(sys.argv[1]))
