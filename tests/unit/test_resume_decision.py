"""Where a run starts (harness.checkpoint.find_resume_point), on folders of checkpoints as runs leave them:
overwrite and checkpoint.resume apply to a job's first attempt; a restart of the same job (SLURM requeue,
torchrun restart) resumes from its own newest checkpoint, and never from another job's; combinations that would
delete the checkpoint to resume or mix two runs in one folder are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.checkpoint import MANIFEST, find_resume_point, step_dir_name
from harness.config import ConfigError, load_config
from harness.distributed import job_attempt
from tests.conftest import tiny_config


def checkpoint(folder: Path, step: int, job: str | None) -> Path:
    """A complete checkpoint as far as the decision reads it: its manifest (no files to checksum)."""
    path = folder / "checkpoints" / step_dir_name(step)
    path.mkdir(parents=True)
    (path / MANIFEST).write_text(json.dumps({"step": step, "job": job, "files": {}}))
    return path


def decide(tmp_path, *overrides, job=None, restart=0, last=None):
    """Where a run starts; `last` is what the folder's lock file says the run before recorded (job, start)."""
    cfg = load_config(tiny_config(tmp_path), [f"output_dir={tmp_path / 'run'}", *overrides])
    warnings = []
    point = find_resume_point(cfg, warnings.append, job, restart, last)
    return point, warnings


def test_a_restart_resumes_its_own_checkpoint_whatever_overwrite_and_resume_say(tmp_path):
    out = tmp_path / "run"
    elsewhere = checkpoint(tmp_path / "pretrained-run", 40, "slurm:1")
    checkpoint(out, 8, "slurm:7")  # this job's first attempt
    checkpoint(out, 12, "slurm:3")  # left by another job: never this job's restart point
    (out / "metrics.jsonl").write_text("")
    for settings in (["overwrite=true"], [f"checkpoint.resume={elsewhere}"], ["checkpoint.resume=none"]):
        point, warnings = decide(
            tmp_path, *settings, job="slurm:7", restart=1, last={"job": "slurm:7", "start": "fresh"}
        )
        assert point.path == out / "checkpoints" / "step-0000008" and not point.replaces_run, settings
        assert "restart 1 of job slurm:7: resuming from its own newest checkpoint" in warnings[0]
    # The first attempt: the settings hold. overwrite=true starts afresh (replacing the folder's files) ...
    assert decide(tmp_path, "overwrite=true", job="slurm:7")[0] is None
    # ... and checkpoint.resume=<folder> starts from that folder, replacing the folder's run if told to.
    point, _ = decide(tmp_path, f"checkpoint.resume={elsewhere}", "overwrite=true", job="slurm:7")
    assert point.path == elsewhere and point.replaces_run


def test_a_restart_without_a_checkpoint_of_its_own_starts_as_its_first_attempt_did(tmp_path):
    out = tmp_path / "run"
    earlier = checkpoint(out, 300, "slurm:100")  # an earlier job's run, which job 200's first attempt resumed
    (out / "metrics.jsonl").write_text("")
    point, _ = decide(tmp_path, job="slurm:200")
    assert point.path == earlier  # the first attempt (resume=auto), which then dies before a checkpoint of its own
    first = {"job": "slurm:200", "start": str(earlier)}
    point, warnings = decide(tmp_path, job="slurm:200", restart=1, last=first)
    assert point.path == earlier and not point.replaces_run, "job 100's work must survive job 200's restart"
    assert "no checkpoint of its own yet; resuming from" in warnings[0]
    # Started afresh the first time (overwrite=true): afresh again, replacing only what that attempt wrote.
    assert decide(tmp_path, job="slurm:200", restart=1, last={"job": "slurm:200", "start": "fresh"})[0] is None
    # Files another job left, or a lock record of another job: the first attempt's settings, never "own" files.
    elsewhere = checkpoint(tmp_path / "pretrained-run", 40, None)
    with pytest.raises(ConfigError, match="holds another run; resuming into it would mix the two"):
        decide(tmp_path, f"checkpoint.resume={elsewhere}", job="torchrun:h:9", restart=1,
               last={"job": "slurm:3", "start": "fresh"})  # fmt: skip


def test_combinations_that_would_lose_or_mix_work_are_refused(tmp_path):
    out = tmp_path / "run"
    own = checkpoint(out, 8, None)
    with pytest.raises(ConfigError, match="overwrite would delete that checkpoint"):
        decide(tmp_path, f"checkpoint.resume={own}", "overwrite=true")
    assert decide(tmp_path, f"checkpoint.resume={own}")[0].path == own  # resuming this run by path: fine


def test_the_job_and_its_restarts_come_from_the_launch_environment():
    assert job_attempt({"SLURM_JOB_ID": "41", "SLURM_RESTART_COUNT": "2"}) == ("slurm:41", 2)
    assert job_attempt({"TORCHELASTIC_RESTART_COUNT": "1", "TORCHELASTIC_RUN_ID": "abc"}) == ("torchrun:abc", 1)
    job, restart = job_attempt({"TORCHELASTIC_RESTART_COUNT": "0", "TORCHELASTIC_RUN_ID": "none"})
    assert job.startswith("torchrun:") and restart == 0  # the static rendezvous: the agent's host and pid
    assert job_attempt({}) == (None, 0)
