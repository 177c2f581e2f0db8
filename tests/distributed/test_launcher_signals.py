"""Preemption through real launchers: TERM sent as SLURM sends it (to every process of the job step: the launcher
and its workers, so each worker also gets the launcher's forwarded copy) and as a user sends it (to the launcher
alone, which forwards it). Each run checkpoints at the next step boundary, says "preempted" with code 75 in
exit_status.json, and the same command resumes it to the uninterrupted run's final weights, bit for bit.

torchrun (`python -m launch cpu 2`), accelerate launch's torchrun (`python -m launch zero2 2`: accelerate launch
with the ZeRO-2 config, DeepSpeed's sharded checkpoints) and accelerate launch's one-process launcher (which
kills its process 5 s after a TERM) are the three launchers users type."""

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch
from safetensors.torch import load_file

from harness.checkpoint import verify_checkpoint
from tests.conftest import (
    ROOT,
    deepspeed_env,
    free_port,
    read_metrics,
    read_results,
    run_harness,
    start_harness,
    tiny_config,
)

pytestmark = pytest.mark.slow
ENV = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
ONE_PROCESS = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "configs/accelerate/default.yaml"]
LAUNCHERS = {  # name: (the command before the entry's arguments, given a port; processes)
    "launch-cpu-2": (lambda port: [sys.executable, "-m", "launch", "cpu", "2", "--port", port, "--"], 2),
    "launch-zero2-2": (lambda port: [sys.executable, "-m", "launch", "zero2", "2", "--port", port, "--"], 2),
    "accelerate-1": (lambda port: [*ONE_PROCESS, "harness/train.py"], 1),
}
CASES = [("launch-cpu-2", "every process"), ("launch-zero2-2", "launcher"), ("accelerate-1", "every process")]


def worker_env(launcher: str) -> dict[str, str] | None:
    """What the launcher gives its workers, for the forked runs beside it (DeepSpeed's: accelerate's own code)."""
    return deepspeed_env(2, ROOT / "configs" / "deepspeed" / "zero2.json") if launcher == "launch-zero2-2" else None


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("signals")
    return tiny_config(tmp, train={"epochs": 3, "batch_size": 8}, logging={"every_steps": 1, "progress": "plain"})


@pytest.fixture(scope="module")
def references(config, tmp_path_factory):
    """The uninterrupted runs, one per launcher, forked now (in the environment the launcher gives its workers)
    and awaited when first needed."""
    tmp = tmp_path_factory.mktemp("references")
    running = {}
    for name, (_, nproc) in LAUNCHERS.items():
        running[name] = tmp / name, start_harness(config, f"output_dir={tmp / name}", nproc=nproc,
                                                  env_extra=worker_env(name))  # fmt: skip

    def reference(launcher: str):
        out, ranks = running[launcher]
        assert ranks.wait().returncode == 0, ranks.stderr()[-3000:]
        return out

    return reference


def train_step_reached(out, step: int) -> bool:
    metrics = out / "metrics.jsonl"
    if not metrics.is_file():
        return False
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.endswith("}")]
    return any(r["event"] == "train" and r["step"] >= step for r in rows)


@pytest.mark.parametrize(("launcher", "target"), CASES, ids=[f"{a}-to-{b.replace(' ', '-')}" for a, b in CASES])
def test_term_through_a_launcher_checkpoints_and_resumes_as_if_uninterrupted(launcher, target, config, references,
                                                                             tmp_path):  # fmt: skip
    out = tmp_path / "run"
    prefix, nproc = LAUNCHERS[launcher]
    job = subprocess.Popen([*prefix(str(free_port())), "--config", str(config), f"output_dir={out}"], cwd=ROOT,
                           env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    deadline = time.monotonic() + 120
    while not train_step_reached(out, 3):
        assert job.poll() is None and time.monotonic() < deadline, "the job ended or stalled before step 3"
        time.sleep(0.02)
    launcher_process = psutil.Process(job.pid)
    workers = launcher_process.children(recursive=True)
    for process in [launcher_process, *workers] if target == "every process" else [launcher_process]:
        os.kill(process.pid, signal.SIGTERM)
    output, _ = job.communicate(timeout=120)

    assert "second SIGTERM" not in output, output[-3000:]  # the launcher's copy was the same request
    if launcher == "launch-zero2-2":  # the command the launcher printed, and the world it formed
        assert "accelerate launch --config_file configs/accelerate/zero2.yaml --num_processes 2" in output
        assert "world size 2 (DEEPSPEED, gloo)" in output and "Setting accelerator to CPU" not in output
    status = json.loads((out / "exit_status.json").read_text())
    assert (status["status"], status["exit_code"]) == ("preempted", 75), output[-3000:]
    (preempted,) = [r for r in read_metrics(out) if r["event"] == "preempted"]
    assert preempted["signal"] == "SIGTERM" and preempted["stopped_in"] == "train" and preempted["step"] < 45 // nproc
    verify_checkpoint(out / "checkpoints" / f"step-{preempted['step']:07d}")
    assert read_metrics(out)[0]["world_size"] == nproc

    run_harness(config, f"output_dir={out}", nproc=nproc, env_extra=worker_env(launcher))  # the same command, again
    results, reference = read_results(out), references(launcher)
    assert results["resumed_from_step"] == preempted["step"]
    assert results["test"] == read_results(reference)["test"]
    a, b = (load_file(str(folder / "final" / "model.safetensors")) for folder in (reference, out))
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed run's final weights are the uninterrupted run's"
