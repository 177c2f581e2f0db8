"""slurm/train.sbatch across two real nodes: `sbatch --nodes 2` on a two-node SLURM cluster whose nodes have their
own network stacks, addresses, hostnames and node-local scratch (tests/slurm_two_nodes.py). One process per
node, the rendezvous on node1's address; DDP, ZeRO-2 and FSDP2 train as the same topology on one node with two
processes does, and move the bytes benchmarks/scaling.py says they do (every topology's bytes on one host:
tests/distributed/test_network_bytes.py); a node that crashes costs the job its work since the last
checkpoint, nothing more."""

import json
import re
import statistics
import time

import pytest
import torch
from safetensors.torch import load_file

from benchmarks.scaling import shape_of, step_bytes
from tests.conftest import ROOT, deepspeed_env, fsdp_env, read_metrics, read_results, start_harness, tiny_config

pytestmark = pytest.mark.slow
SBATCH = ("--nodes=2", "--ntasks-per-node=1", "--gres=none", "--cpus-per-task=1", "--time=15")
TOPOLOGIES = {  # HARNESS_LAUNCH: the environment its processes get on one node (for the reference beside)
    "cpu": lambda: None,
    "zero2": lambda: deepspeed_env(2, ROOT / "configs" / "deepspeed" / "zero2.json"),
    "fsdp": lambda: fsdp_env(),
}
"""Each ZeRO stage's equality with DDP is tests/distributed's; ZeRO-2 stands for DeepSpeed's launcher path here."""
MODELLED = {"cpu": "ddp", "zero2": "zero2", "fsdp": "fsdp"}


def test_each_topology_trains_across_two_nodes_as_on_one(two_node_cluster, tmp_path):
    cluster = two_node_cluster
    config = tiny_config(
        tmp_path,
        runtime={"cpu_threads": 1},  # one CPU per task: the reference's ranks get one thread each too
        train={"max_steps": 8},
        eval={"every_steps": 4},
        data={"cache_dir": str(cluster.scratch / "cache")},  # node-local: tokenized once on each node
        logging={"every_steps": 1, "progress": "plain", "network_bytes": True},  # rank 0's bytes at every step
    )
    shape = shape_of("builtin:tiny-bert")
    jobs, references = {}, {}
    for launch in TOPOLOGIES:  # submitted together: SLURM runs them one after another on the two nodes
        jobs[launch] = cluster.sbatch(*SBATCH, f"--output={tmp_path}/{launch}-%j.out", "slurm/train.sbatch",
                                      str(config), f"output_dir={tmp_path / launch}",
                                      env={"HARNESS_LAUNCH": launch, "NPROC_PER_NODE": "1"}, cwd=ROOT)  # fmt: skip
    # output_dir on node-local scratch: each node would write its own half of the run. Refused.
    local = cluster.sbatch(*SBATCH, f"--output={tmp_path}/local-%j.out", "slurm/train.sbatch", str(config),
                           f"output_dir={cluster.scratch / 'run'}", env={"HARNESS_LAUNCH": "cpu", "NPROC_PER_NODE": "1"},
                           cwd=ROOT)  # fmt: skip
    for launch, env in TOPOLOGIES.items():  # the same topology with 2 processes on this host, forked
        references[launch] = start_harness(config, f"output_dir={tmp_path / f'ref-{launch}'}", nproc=2,
                                           env_extra=env())  # fmt: skip
    for launch, job in jobs.items():
        info = cluster.wait_until(job, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=300)
        log = (tmp_path / f"{launch}-{job}.out").read_text()
        assert info["JobState"] == "COMPLETED", (info, log[-3000:], cluster.logs())
        # One launcher per node, node2's reaching the head node by its name (torchrun, or accelerate's for DeepSpeed).
        assert "on node[1-2]" in log and re.search(r"--(node|machine)_rank 1 --(master_addr|main_process_ip) node1 ",
                                                   log), log[-3000:]  # fmt: skip
        setup = next(r for r in read_metrics(tmp_path / launch) if r["event"] == "setup")
        assert setup["world_size"] == 2 and setup["hosts"] == ["node1", "node2"], setup
        # The bytes rank 0 on node1 sent and received per step (the median of steps 2-8: a validation falls in
        # one window) are what benchmarks/scaling.py says rank 0 of 2 sends and receives on gloo, within 5%.
        rows = [r for r in read_metrics(tmp_path / launch) if r["event"] == "train" and r["step"] >= 2]
        expected = sum(step_bytes(shape, MODELLED[launch], world=2, backend="gloo").values())
        for direction in ("sent", "received"):
            measured = statistics.median(r[f"net_{direction}_bytes_per_step"] for r in rows)
            assert measured / expected == pytest.approx(1, abs=0.05), (launch, direction, measured, expected)
        assert references[launch].wait().returncode == 0, references[launch].stderr()[-3000:]
        results, reference = read_results(tmp_path / launch), read_results(tmp_path / f"ref-{launch}")
        assert results["test"] == reference["test"], launch  # the same arithmetic, across machines
        assert results["best"] == reference["best"]
    info = cluster.wait_until(local, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=300)
    log = (tmp_path / f"local-{local}.out").read_text()
    assert info["JobState"] == "FAILED" and "rank 1 on node2" in log and "cannot see it" in log, log[-3000:]
    assert "Every node must see one shared output_dir" in log
    for node in ("node1", "node2"):  # each node tokenized into its own scratch; the shared folder has no cache
        assert any((cluster.root / f"scratch-{node}" / "cache").iterdir()), node


def test_a_node_that_dies_mid_run_is_requeued_and_the_job_ends_as_if_uninterrupted(two_node_cluster, tmp_path):
    """node2 crashes after a checkpoint (link down, then its slurmd and the job's processes on it killed): the
    rank left on node1 gives up within runtime.collective_timeout_s with status "failed" and code 6 (lost a
    peer); node2 is declared down and SLURM requeues the job; node2 returns to service; the requeued job resumes
    from the newest complete checkpoint and ends with the uninterrupted run's final weights, bit for bit."""
    cluster = two_node_cluster
    config = tiny_config(
        tmp_path,
        runtime={"cpu_threads": 1, "collective_timeout_s": 8},
        data={"synthetic_train_size": 600},  # 34 steps
        checkpoint={"every_steps": 5},
        logging={"every_steps": 1, "progress": "plain"},
    )
    job = cluster.sbatch(*SBATCH, f"--output={tmp_path}/job-%j.out", "slurm/train.sbatch", str(config),
                         env={"HARNESS_LAUNCH": "cpu", "NPROC_PER_NODE": "1"}, cwd=ROOT)  # fmt: skip
    reference = start_harness(config, f"output_dir={tmp_path / 'ref'}", nproc=2)
    out = tmp_path / "run"
    deadline = time.monotonic() + 180
    while not any(r["event"] == "checkpoint" for r in read_metrics_if_any(out)):
        assert time.monotonic() < deadline and cluster.job(job)["JobState"] in ("PENDING", "RUNNING"), cluster.logs()
        time.sleep(0.1)
    cluster.fail_node("node2")
    failed_at = time.monotonic()
    while not (out / "exit_status.json").is_file():  # rank 0, on node1, waits for node2 no longer than its timeout
        assert time.monotonic() - failed_at < 8 + 15, "the rank on node1 did not give up on its lost peer"
        time.sleep(0.1)
    assert json.loads((out / "exit_status.json").read_text())["exit_code"] == 6
    checkpointed = max(r["step"] for r in read_metrics(out) if r["event"] == "checkpoint")
    # The controller is told node2 is down, as a cluster's health check tells it (its own verdict, after
    # SlurmdTimeout and a ping cycle, comes about 20 s later to the same effect); then node2 returns to service.
    cluster.run("scontrol", "update", "NodeName=node2", "State=DOWN", "Reason=crashed")
    assert cluster.node_states().get("node2") in ("down", "down*"), cluster.node_states()
    cluster.return_node("node2")

    info = cluster.wait_until(job, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=240)
    log = (tmp_path / f"job-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", (info, log[-4000:], cluster.logs())
    assert "DUE TO NODE FAILURE" in log and "lost contact with another rank" in log, log[-4000:]
    results = read_results(out)
    assert results["resumed_from_step"] == checkpointed and results["world_size"] == 2
    assert reference.wait().returncode == 0, reference.stderr()[-3000:]
    a, b = (load_file(str(folder / "final" / "model.safetensors")) for folder in (tmp_path / "ref", out))
    assert all(torch.equal(a[k], b[k]) for k in a), "the requeued job's final weights are the uninterrupted run's"


def read_metrics_if_any(out):
    try:
        return read_metrics(out)
    except (FileNotFoundError, json.JSONDecodeError):
        return []
