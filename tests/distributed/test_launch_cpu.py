"""The launchers for real: `python -m launch cpu 1 --nodes 2` (two "nodes" on one machine, torchrun underneath)
trains as one gloo world. `python -m launch zero2 2` (accelerate launch with a DeepSpeed config) is run for real
by tests/distributed/test_launcher_signals.py.

Every other distributed test forks its ranks from the test session's forkserver (tests/ranks.py); these are
the ones where the launcher is the point."""

import os
import shlex
import subprocess
import sys

import pytest

from tests.conftest import ROOT, free_port, read_metrics, read_results, tiny_config

pytestmark = pytest.mark.slow
# The session's environment (offline: tests/conftest.py) less DS_ACCELERATOR, which the launcher must set itself.
ENV = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}


def printed_command(stderr: str, marker: str) -> list[str]:
    """The launcher prints the command it runs (one shell-quoted line on stderr) before the training output."""
    argv = shlex.split(next(line for line in stderr.splitlines() if marker in line))
    while "=" in argv[0]:  # environment additions lead the line (OMP_NUM_THREADS=...)
        argv.pop(0)
    return argv


def test_two_launchers_form_one_world_across_two_nodes(tmp_path):
    # One process per "node": the rendezvous across launchers is the point (more processes per node only cost
    # imports on the 2-core test machine; `cpu 2` per node is the README's example).
    config = tiny_config(tmp_path, data={"synthetic_train_size": 300}, train={"batch_size": 8})
    port = str(free_port())
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "launch",
                "cpu",
                "1",
                "--nodes",
                "2",
                "--node-rank",
                str(rank),
                "--head-addr",
                "127.0.0.1",
                "--port",
                port,
                "--",
                "--config",
                str(config),
            ],
            cwd=ROOT,
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=300) for node in nodes]
    for node, (_, err) in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, err[-3000:]
    argv = printed_command(outputs[0][1], "--nproc_per_node")
    assert argv[0].endswith("torchrun")
    assert argv[argv.index("--nproc_per_node") + 1] == "1" and argv[argv.index("--nnodes") + 1] == "2"
    assert argv[argv.index("--node_rank") + 1] == "0" and argv[argv.index("--master_port") + 1] == port
    results = read_results(tmp_path / "run")
    assert results["world_size"] == 2
    setup = read_metrics(tmp_path / "run")[0]
    assert setup["world_size"] == 2 and setup["backend"] == "gloo"
    # 239 examples, 2 ranks x 8 per micro-batch: 14 full steps of 16 and a tail of 15.
    assert results["optimizer_steps"] == 15
