"""Two "nodes" on one machine: two launcher processes (node ranks 0 and 1) rendezvous over localhost."""

import subprocess
import sys

import pytest

from tests.conftest import ROOT, free_port, read_metrics, read_results, tiny_config

pytestmark = pytest.mark.slow


def test_two_launchers_form_one_world_of_four(tmp_path):
    config = tiny_config(tmp_path, data={"synthetic_train_size": 300}, train={"batch_size": 4})
    port = str(free_port())
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "launch",
                "cpu",
                "2",
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
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=300) for node in nodes]
    for node, (_, err) in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, err[-3000:]
    results = read_results(tmp_path / "run")
    assert results["world_size"] == 4
    setup = read_metrics(tmp_path / "run")[0]
    assert setup["world_size"] == 4 and setup["backend"] == "gloo"
    # 239 examples, 4 ranks x 4 per micro-batch: 14 full steps of 16 and a tail of 15.
    assert results["optimizer_steps"] == 15
