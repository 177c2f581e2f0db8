"""The launcher for real: `python -m launch cpu 2` trains as 2 gloo ranks on CPU."""

import os
import shlex
import subprocess
import sys

import pytest

from tests.conftest import ROOT, free_port, read_results

pytestmark = pytest.mark.slow


def launch_quickstart(intent: str, tmp_path, port: int) -> subprocess.CompletedProcess:
    """`python -m launch <intent> 2 -- <6 quickstart steps>`, run for real from the repo root."""
    cmd = [
        sys.executable, "-m", "launch", intent, "2", "--port", str(port), "--",
        "--config", "configs/quickstart.yaml", f"output_dir={tmp_path / 'run'}", "train.max_steps=6",
        f"data.cache_dir={tmp_path / 'cache'}", "logging.progress=plain",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def test_launch_cpu_2_trains_with_world_size_2(tmp_path):
    out = tmp_path / "run"
    port = free_port()
    proc = launch_quickstart("cpu", tmp_path, port)
    # The launcher printed the torchrun command it ran (one line, stderr) before the training output.
    printed = next(line for line in proc.stderr.splitlines() if "--nproc_per_node" in line)
    argv = shlex.split(printed)
    while "=" in argv[0]:  # environment additions lead the line (OMP_NUM_THREADS=...)
        argv.pop(0)
    assert argv[0].endswith("torchrun")
    assert argv[argv.index("--nproc_per_node") + 1] == "2"
    assert argv[argv.index("--master_port") + 1] == str(port)
    results = read_results(out)
    assert results["world_size"] == 2
    assert results["optimizer_steps"] == 6


def test_launch_zero2_2_trains_under_deepspeed_with_world_size_2(tmp_path):
    pytest.importorskip("deepspeed", reason="needs the deepspeed package")
    out = tmp_path / "run"
    proc = launch_quickstart("zero2", tmp_path, free_port())
    printed = next(line for line in proc.stderr.splitlines() if "--config_file" in line)
    assert "configs/accelerate/zero2.yaml" in printed and "--num_processes 2" in printed
    assert "world size 2 (DEEPSPEED, gloo)" in proc.stdout
    results = read_results(out)
    assert results["world_size"] == 2 and results["optimizer_steps"] == 6
