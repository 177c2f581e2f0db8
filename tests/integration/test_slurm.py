"""slurm/*.sbatch on a real one-node SLURM cluster: a train job preempted mid-run, which requeues, resumes and
completes with the same result as an uninterrupted run; a pre-training job; a sweep as a job array."""

import json
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT, read_metrics, read_results, start_harness, tiny_config
from tests.pretrain_corpus import write_cyclic_corpus

pytestmark = pytest.mark.slow
CPU_JOB = {"HARNESS_LAUNCH": "cpu", "NPROC_PER_NODE": "2"}  # 2 gloo processes on the node
SBATCH_CPU = ("--gres=none", "--cpus-per-task=2", "--time=15")  # the scripts' GPU defaults, overridden


def submit(cluster, tmp_path, *args):
    return cluster.sbatch(*SBATCH_CPU, f"--output={tmp_path}/%x-%j.out", *args, env=CPU_JOB, cwd=ROOT)


def cluster_submit_one_process(cluster, tmp_path, *args):
    return cluster.sbatch(*SBATCH_CPU, f"--output={tmp_path}/%x-%j.out", *args, env={**CPU_JOB, "NPROC_PER_NODE": "1"},
                          cwd=ROOT)  # fmt: skip


def log_of(tmp_path, name, job_id):
    return (tmp_path / f"{name}-{job_id}.out").read_text()


def test_pretrain_job_runs_to_completion(slurm_cluster, tmp_path):
    corpus = write_cyclic_corpus(tmp_path / "corpus", 200, 100)
    config = tiny_config(tmp_path, data={"source": "path", "path": str(corpus), "validation_size": 40},
                         train={"max_steps": 12, "batch_size": 8})  # fmt: skip
    # One process on a 2-CPU task: it gets both CPUs only if the job's CPUs reach the srun step.
    job = cluster_submit_one_process(slurm_cluster, tmp_path, "slurm/pretrain.sbatch", str(config), "train.lr=2e-3")
    info = slurm_cluster.wait_until(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"})
    log = log_of(tmp_path, "harness-pretrain", job)
    assert info["JobState"] == "COMPLETED", log[-3000:]
    assert "(2 CPUs per task)" in log and "(2 threads per process)" in log
    results = read_results(tmp_path / "run")
    assert results["task"] == "masked-lm" and results["world_size"] == 1 and results["optimizer_steps"] == 12
    assert "harness/pretrain.py" in log and "run status completed" in log
    assert (tmp_path / "run" / "best" / "model.safetensors").is_file()


def test_preempted_job_checkpoints_requeues_resumes_and_matches_an_uninterrupted_job(slurm_cluster, tmp_path):
    config = tiny_config(
        tmp_path,
        # One thread per rank, as the 2-CPU job gives each of its 2 ranks: the forked reference gets the same
        # float summation order whatever the machine's cores.
        runtime={"cpu_threads": 1},
        data={"synthetic_train_size": 800},  # 2 epochs of 47 steps: the signal comes at about step 12
        train={"epochs": 2, "batch_size": 8},
        checkpoint={"every_steps": 10},
    )
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "results.json").write_text("{}")  # an earlier run's, which overwrite=true replaces once
    # overwrite=true applies to the job's first start: the requeued job resumes from its own checkpoint.
    job = submit(slurm_cluster, tmp_path, "slurm/train.sbatch", str(config), "overwrite=true")
    # The reference: the same 2-rank run, uninterrupted, forked beside the job (the launchers are not what it checks).
    reference = start_harness(config, f"output_dir={tmp_path / 'ref'}", nproc=2)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.is_file() and '"event": "checkpoint"' in metrics.read_text()):
        assert time.monotonic() < deadline, "no checkpoint was written"
        time.sleep(0.2)
    slurm_cluster.run("scancel", "--signal=USR1", job)
    assert reference.wait().returncode == 0, reference.stderr()[-3000:]

    # Requeued (held until its old credential expires, 5 s here), started again, completed: one restart.
    info = slurm_cluster.wait_until(job, {"COMPLETED", "FAILED", "CANCELLED"})
    log = log_of(tmp_path, "harness-train", job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", (info, log[-3000:])
    assert log.count("torchrun --nproc_per_node 2") == 2, log[-3000:]  # both attempts: 2 gloo processes
    assert "run status preempted" in log and "requeueing job" in log and "restart 1" in log
    # The requeue's TERM ends the script at once: no trap left to call scancel on a job SLURM is requeueing
    # (which it refuses until KillWait, 30 s, kills the script).
    assert "received TERM" not in log, log[-3000:]
    assert log.rstrip().endswith("run status completed"), log[-3000:]
    preempted = [r for r in read_metrics(tmp_path / "run") if r["event"] == "preempted"]
    assert preempted and preempted[0]["signal"] == "SIGUSR1"
    results = read_results(tmp_path / "run")
    assert results["resumed_from_step"] == preempted[0]["step"] and results["world_size"] == 2
    assert json.loads((tmp_path / "run" / "exit_status.json").read_text())["status"] == "completed"
    assert set(results["test"]) >= {"loss", "accuracy", "precision", "recall", "f1_macro"}
    assert results["test"] == read_results(tmp_path / "ref")["test"]  # the same run, bit for bit
    assert results["optimizer_steps"] == read_results(tmp_path / "ref")["optimizer_steps"]


def test_sweep_array_runs_each_line_and_summarizes(slurm_cluster, tmp_path):
    config = tiny_config(tmp_path, data={"synthetic_train_size": 221})  # 160 training examples: 20 steps of 8
    sweep = tmp_path / "sweep.txt"
    sweep.write_text("# learning rates\ntrain.lr=1e-3\n\ntrain.lr=3e-3 train.batch_size=4\n")
    sweep_dir = tmp_path / "sweep"
    job = slurm_cluster.sbatch(
        # One process on one CPU per task: the two tasks run side by side on the 2-core test machine.
        *SBATCH_CPU, "--cpus-per-task=1", f"--output={tmp_path}/%x-%A_%a.out", "--array=0-1", "slurm/sweep.sbatch",
        str(config), str(sweep), env={**CPU_JOB, "NPROC_PER_NODE": "1", "SWEEP_DIR": str(sweep_dir)}, cwd=ROOT,
    )  # fmt: skip
    for task in ("0", "1"):
        info = slurm_cluster.wait_until(f"{job}_{task}", {"COMPLETED", "FAILED", "CANCELLED"})
        log = (tmp_path / f"harness-sweep-{job}_{task}.out").read_text()
        assert info["JobState"] == "COMPLETED", log[-3000:]
        # The cluster has no task affinity (task/none): the process sees both cores, and uses the one it was given.
        assert "(1 CPUs per task)" in log and "(1 thread per process)" in log, log[-3000:]
    assert (
        read_results(sweep_dir / "task-1")["optimizer_steps"]
        == 2 * read_results(sweep_dir / "task-0")["optimizer_steps"]
    )
    summary = subprocess.run(
        [sys.executable, "-m", "launch.sweep", "summarize", str(sweep_dir)], cwd=ROOT, capture_output=True, text=True
    )
    assert summary.returncode == 0, summary.stderr
    lines = summary.stdout.splitlines()
    assert lines[0].split()[:5] == ["rank", "task", "overrides", "status", "validation"]
    rows = {line.split()[1]: line for line in lines[1:]}
    assert "train.lr=1e-3" in rows["task-0"] and "train.lr=3e-3 train.batch_size=4" in rows["task-1"]
    assert all("completed" in line for line in rows.values()) and lines[1].endswith("<- selected")
    losses = {task: read_results(sweep_dir / task)["best"]["value"] for task in rows}
    assert lines[1].split()[1] == min(losses, key=losses.get)  # selected by validation loss
