"""slurm/train.sbatch across two real nodes: `sbatch --nodes 2` on a two-node SLURM cluster whose nodes have their
own network stacks, addresses, hostnames and node-local scratch (tests/slurm_two_nodes.py). One process per
node, the rendezvous on node1's address; each topology trains as the same topology on one node with two
processes does."""

import re

import pytest

from tests.conftest import ROOT, deepspeed_env, fsdp_env, read_metrics, read_results, start_harness, tiny_config

pytestmark = pytest.mark.slow
SBATCH = ("--nodes=2", "--ntasks-per-node=1", "--gres=none", "--cpus-per-task=1", "--time=15")
TOPOLOGIES = {  # HARNESS_LAUNCH: the environment its processes get on one node (for the reference beside)
    "cpu": lambda: None,
    "zero2": lambda: deepspeed_env(2, ROOT / "configs" / "deepspeed" / "zero2.json"),
    "fsdp": lambda: fsdp_env(),
}


def test_each_topology_trains_across_two_nodes_as_on_one(two_node_cluster, tmp_path):
    cluster = two_node_cluster
    config = tiny_config(
        tmp_path,
        runtime={"cpu_threads": 1},  # one CPU per task: the reference's ranks get one thread each too
        train={"max_steps": 8},
        eval={"every_steps": 4},
        data={"cache_dir": str(cluster.scratch / "cache")},  # node-local: tokenized once on each node
    )
    jobs, references = {}, {}
    for launch in TOPOLOGIES:  # submitted together: SLURM runs them one after another on the two nodes
        jobs[launch] = cluster.sbatch(*SBATCH, f"--output={tmp_path}/{launch}-%j.out", "slurm/train.sbatch",
                                      str(config), f"output_dir={tmp_path / launch}",
                                      env={"HARNESS_LAUNCH": launch, "NPROC_PER_NODE": "1"}, cwd=ROOT)  # fmt: skip
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
        assert references[launch].wait().returncode == 0, references[launch].stderr()[-3000:]
        results, reference = read_results(tmp_path / launch), read_results(tmp_path / f"ref-{launch}")
        assert results["test"] == reference["test"], launch  # the same arithmetic, across machines
        assert results["best"] == reference["best"]
    for node in ("node1", "node2"):  # each node tokenized into its own scratch; the shared folder has no cache
        assert any((cluster.root / f"scratch-{node}" / "cache").iterdir()), node
