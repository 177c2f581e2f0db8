"""In-job restarts for real: `python -m launch cpu 2 --max-restarts 1` (torchrun's elastic agent underneath), one
rank SIGKILLed mid-run; the restarted group resumes from the newest checkpoint and ends with the weights of an
uninterrupted run, bit for bit. The job's command says overwrite=true, as users pass it to replace an earlier run
in the folder: that applies to the job's first attempt, never to its restart."""

import json
import subprocess
import sys
import time

import psutil
import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import ROOT, free_port, read_results, start_harness, tiny_config

pytestmark = pytest.mark.slow


def test_a_crashed_rank_is_restarted_and_the_job_ends_as_if_uninterrupted(tmp_path):
    config = tiny_config(tmp_path, data={"synthetic_train_size": 600, "validation_size": 40},
                         train={"epochs": 1, "batch_size": 8}, checkpoint={"every_steps": 9},
                         logging={"every_steps": 1, "progress": "plain"})  # fmt: skip
    reference, restarted = tmp_path / "reference", tmp_path / "restarted"
    restarted.mkdir()
    (restarted / "results.json").write_text("{}")  # an earlier run's, which overwrite=true replaces
    # The uninterrupted reference runs (forked) while the launched job starts.
    reference_run = start_harness(config, f"output_dir={reference}", nproc=2)
    launcher = subprocess.Popen(
        [sys.executable, "-m", "launch", "cpu", "2", "--max-restarts", "1", "--port", str(free_port()), "--",
         "--config", str(config), f"output_dir={restarted}", "overwrite=true"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    metrics = restarted / "metrics.jsonl"
    deadline = time.monotonic() + 180
    while not (metrics.is_file() and metrics.read_text().count('"event": "checkpoint"') >= 3):
        assert launcher.poll() is None and time.monotonic() < deadline, "the job ended or stalled before step 27"
        time.sleep(0.05)
    workers = psutil.Process(launcher.pid).children(recursive=True)
    rank1 = next(p for p in workers if p.environ().get("RANK") == "1")
    rank1.kill()
    output, _ = launcher.communicate(timeout=300)
    assert launcher.returncode == 0, output[-5000:]
    assert "local_rank: 1" in output, output[-5000:]  # the launcher names the rank that died
    assert "resuming from" in output
    assert reference_run.wait().returncode == 0, reference_run.stderr()[-3000:]

    results = read_results(restarted)
    assert (
        results["resumed_from_step"] >= 27 and results["optimizer_steps"] == read_results(reference)["optimizer_steps"]
    )
    assert json.loads((restarted / "exit_status.json").read_text())["status"] == "completed"
    a = load_file(str(reference / "final" / "model.safetensors"))
    b = load_file(str(restarted / "final" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a), "the restarted job's final weights are bitwise the reference's"
    assert results["test"] == read_results(reference)["test"]
