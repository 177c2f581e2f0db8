"""Kill, signal, corrupt and break real runs; check that nothing is lost and resumed runs are the same run.

The runs are real processes (forked from the test session's forkserver, tests/ranks.py): SIGKILL, signals and
exit codes are those of the harness's own processes."""

import json
import random
import re
import signal
import socket
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from harness.checkpoint import complete_checkpoints, verify_checkpoint
from tests import ranks
from tests.conftest import read_metrics, read_results, run_harness, start_harness, tiny_config
from tests.ranks import Ranks

pytestmark = pytest.mark.slow


def wait_for(out: Path, predicate, proc: Ranks, timeout: float = 120) -> None:
    """Poll metrics.jsonl until a row satisfies `predicate`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"run ended early ({proc.poll()}): {proc.stderr()[-3000:]}")
        path = out / "metrics.jsonl"
        if path.is_file():
            for line in path.read_text().splitlines():
                try:
                    if predicate(json.loads(line)):
                        return
                except json.JSONDecodeError:
                    pass  # a line being written
        time.sleep(0.02)
    raise AssertionError("timed out waiting for the run")


def steps_rows(out: Path, event: str, after: int) -> dict[int, dict]:
    rows = [r for r in read_metrics(out) if r["event"] == event and r.get("split") != "test" and r["step"] > after]
    keys = ("loss", "lr", "grad_norm", "accuracy", "f1_macro")
    return {r["step"]: {k: r[k] for k in keys if k in r} for r in rows}


@pytest.fixture
def config(tmp_path):
    # Dropout on: a resumed run must restore every RNG to draw the same masks.
    return tiny_config(
        tmp_path,
        data={"synthetic_train_size": 240, "validation_size": 40},
        train={"epochs": 2, "batch_size": 8},
        eval={"every_steps": 10, "batch_size": 16},
        checkpoint={"every_steps": 4, "keep_last": 2},
        logging={"every_steps": 1, "progress": "plain"},
    )


@pytest.mark.parametrize("nproc", [1, 2])
def test_sigkill_then_resume_is_bitwise_the_uninterrupted_run(config, tmp_path, nproc):
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    run_harness(config, f"output_dir={reference}", nproc=nproc)
    total = read_results(reference)["optimizer_steps"]

    kill_at = random.Random(nproc).randint(6, total - 2)  # some step after the first checkpoint (step 4)
    proc = start_harness(config, f"output_dir={interrupted}", nproc=nproc)
    wait_for(interrupted, lambda r: r["event"] == "train" and r["step"] >= kill_at, proc)
    proc.kill()  # SIGKILL, every rank

    resumed = run_harness(config, f"output_dir={interrupted}", nproc=nproc)
    results = read_results(interrupted)
    resume_step = results["resumed_from_step"]
    assert resume_step is not None and resume_step % 4 == 0 and resume_step <= kill_at, resume_step
    assert f"resuming from {interrupted / 'checkpoints'}" in resumed.stdout
    assert results["world_size"] == nproc and results["optimizer_steps"] == total

    a, b = (
        load_file(str(reference / "final" / "model.safetensors")),
        load_file(str(interrupted / "final" / "model.safetensors")),
    )
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights must be bitwise equal"
    for event in ("train", "eval"):
        assert steps_rows(interrupted, event, resume_step) == steps_rows(reference, event, resume_step)
    assert results["test"] == read_results(reference)["test"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_checkpoints_and_exits_with_requeue_code(config, tmp_path, sig):
    out = tmp_path / "run"
    proc = start_harness(config, f"output_dir={out}", "checkpoint.every_steps=0")
    wait_for(out, lambda r: r["event"] == "train" and r["step"] >= 3, proc)
    proc.send_signal(sig)
    done = proc.wait(timeout=60)
    assert done.returncode == 75, done.stderr[-2000:]
    preempted = [r for r in read_metrics(out) if r["event"] == "preempted"]
    assert preempted and preempted[0]["signal"] == sig.name and preempted[0]["seconds_to_checkpoint"] < 30
    step = preempted[0]["step"]
    verify_checkpoint(out / "checkpoints" / f"step-{step:07d}")  # complete and intact
    run_harness(config, f"output_dir={out}", "checkpoint.every_steps=0")
    assert read_results(out)["resumed_from_step"] == step


def test_corrupted_newest_checkpoint_is_skipped_for_the_previous_one(config, tmp_path):
    out = tmp_path / "run"
    run_harness(config, f"output_dir={out}", "train.max_steps=13", "checkpoint.keep_last=3")  # saves 8, 12, 13
    (out / "exit_status.json").unlink()  # as if the run had been killed after its last checkpoint
    weights = out / "checkpoints" / "step-0000013" / "state" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated, as by a crash mid-copy
    partial = out / "checkpoints" / "step-0000012"
    (partial / "manifest.json").unlink()  # a folder without its manifest: a save that never finished
    # Resumed by 2 ranks: rank 0 alone verifies (and reads) the checkpoints and decides; each warning comes once.
    proc = run_harness(config, f"output_dir={out}", "train.max_steps=14", nproc=2)
    assert proc.stderr.count(f"skipping checkpoint: {partial}: incomplete") == 1, proc.stderr[-3000:]
    assert proc.stderr.count(f"skipping checkpoint: {weights}: checksum mismatch") == 1
    assert read_results(out)["resumed_from_step"] == 8


def test_nonfinite_losses_are_skipped_then_stop_the_run(config, tmp_path):
    out = tmp_path / "one"
    run_harness(config, f"output_dir={out}", "train.max_steps=8", env_extra={"HARNESS_INJECT_NAN_STEPS": "3"})
    results = read_results(out)
    assert results["skipped_steps"] == 1 and results["optimizer_steps"] == 8
    assert [r["skipped_steps"] for r in read_metrics(out) if r["event"] == "train"][2] == 1

    out = tmp_path / "many"
    proc = run_harness(
        config, f"output_dir={out}", "runtime.max_nonfinite_steps=3", "checkpoint.every_steps=2",
        env_extra={"HARNESS_INJECT_NAN_STEPS": "5,6,7,8"}, check=False,
    )  # fmt: skip
    assert proc.returncode == 3
    assert "3 consecutive steps with a non-finite loss or gradient" in proc.stderr
    # Skipped steps apply no update: the checkpoint at step 6 (inside the streak) holds step 4's weights.
    good, during = out / "checkpoints" / "step-0000004", out / "checkpoints" / "step-0000006"
    verify_checkpoint(good)
    verify_checkpoint(during)
    a, b = load_file(str(good / "state" / "model.safetensors")), load_file(str(during / "state" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_dead_rank_ends_the_job_within_the_timeout(config, tmp_path):
    # No launcher to stop the survivors here: rank 0 must fail by itself, in its next collective.
    out = tmp_path / "run"
    proc = start_harness(config, f"output_dir={out}", "runtime.collective_timeout_s=20", "train.epochs=50", nproc=2)
    wait_for(out, lambda r: r["event"] == "train" and r["step"] >= 3, proc)
    killed_at = time.monotonic()
    proc.kill(rank=1)
    done = proc.wait(timeout=90)
    assert proc.processes[0].exitcode == 6 and done.returncode != 0, done.stderr[-3000:]  # "lost a peer"
    assert time.monotonic() - killed_at < 60
    assert "error: lost contact with another rank" in done.stderr
    assert json.loads((out / "exit_status.json").read_text())["exit_code"] == 6


def test_a_failed_save_keeps_the_previous_checkpoint(config, tmp_path):
    out = tmp_path / "run"
    blocker = out / "checkpoints" / ".tmp-step-0000008"
    proc = start_harness(config, f"output_dir={out}")
    wait_for(out, lambda r: r["event"] == "checkpoint" and r["step"] == 4, proc)
    blocker.write_text("a file where the next checkpoint's folder must go")
    done = proc.wait(timeout=120)
    stderr = done.stderr
    assert done.returncode == 4, stderr[-2000:]
    assert f"saving checkpoint {out / 'checkpoints' / 'step-0000008'} failed" in stderr
    verify_checkpoint(out / "checkpoints" / "step-0000004")


def test_resume_with_another_world_size_continues_from_the_same_sample_position(config, tmp_path):
    two, one = tmp_path / "two", tmp_path / "one"
    run_harness(config, f"output_dir={two}", "train.max_steps=5", "checkpoint.every_steps=5", "train.epochs=1", nproc=2)
    checkpoint = two / "checkpoints" / "step-0000005"
    proc = run_harness(config, f"output_dir={one}", f"checkpoint.resume={checkpoint}", "train.epochs=1")
    # 200 training examples; the 2-rank run consumed some (its steps hold 16, or fewer for the shuffled-in tail
    # step); one process continues with exactly the others, in steps of 8.
    consumed = read_results(two)["train_examples_seen"]
    assert 5 * 16 - 8 <= consumed <= 5 * 16
    assert f"(was 8/2/1): continuing epoch 0 after its first {consumed} examples" in proc.stdout
    results = read_results(one)
    assert results["world_size"] == 1 and results["optimizer_steps"] == 5 + -(-(200 - consumed) // 8)
    assert results["train_examples_seen"] == 200 and results["epochs_completed"] == 1.0


# ---- signals in every phase --------------------------------------------------------------------------------


def wait_for_pause(proc: Ranks, phase: str, timeout: float = 60) -> None:
    """Until the run announces the fault-injected pause in `phase` (HARNESS_INJECT_PAUSE) on stderr."""
    deadline = time.monotonic() + timeout
    while not re.search(rf"pausing \d+ s in {phase}", proc.stderr()):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"no pause in {phase} ({proc.poll()}): {proc.stderr()[-3000:]}")
        time.sleep(0.02)


def test_ranks_wait_for_a_long_tokenization_beyond_the_collective_timeout(config, tmp_path):
    # One rank tokenizes (its first split takes 5 s here) while the other waits for the cache entry's lock, and then
    # at the end of data setup, not in a collective: a collective would have failed after
    # runtime.collective_timeout_s (4 s; the rest of the run's collectives wait far less).
    out = tmp_path / "run"
    proc = run_harness(config, f"output_dir={out}", "train.max_steps=2", "runtime.collective_timeout_s=4", nproc=2,
                       env_extra={"HARNESS_INJECT_PAUSE": "tokenize:5"}, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("pausing 5 s in tokenize") == 1  # the rank that tokenized; the other read its cache
    assert read_results(out)["world_size"] == 2


def test_a_warm_node_waits_for_a_cold_node_beyond_the_collective_timeout(config, tmp_path):
    # Node-local caches (a relative data.cache_dir, two "nodes" with their own folders): node 0's is warm, node 1
    # tokenizes (5 s here). Node 0 waits at the end of data setup with no time limit, not in the first collective.
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    for node in nodes:
        node.mkdir()
    common = ["--config", str(config), "data.cache_dir=cache", "train.max_steps=2"]
    ranks.start("train", [*common, f"output_dir={tmp_path / 'warming'}"], cwds=nodes[:1]).wait(60)
    assert (nodes[0] / "cache").is_dir() and not (nodes[1] / "cache").exists()
    proc = ranks.start("train", [*common, f"output_dir={tmp_path / 'run'}", "runtime.collective_timeout_s=4"],
                       nproc=2, cwds=nodes, env_extra={"HARNESS_INJECT_PAUSE": "tokenize:5"}).wait(90)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("pausing 5 s in tokenize") == 1 and (nodes[1] / "cache").is_dir()


def test_a_signal_before_the_first_step_exits_at_once_with_the_requeue_code(config, tmp_path):
    out = tmp_path / "run"
    proc = start_harness(config, f"output_dir={out}", env_extra={"HARNESS_INJECT_PAUSE": "setup:20"})
    wait_for_pause(proc, "setup")
    signalled = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    done = proc.wait(timeout=60)
    assert done.returncode == 75 and time.monotonic() - signalled < 10, done.stderr[-2000:]  # not after the pause
    assert "SIGTERM before the first training step: nothing to save" in done.stderr
    assert json.loads((out / "exit_status.json").read_text())["status"] == "preempted"
    assert not (out / "checkpoints").exists()
    run_harness(config, f"output_dir={out}")  # the same command starts the run
    assert read_results(out)["resumed_from_step"] is None


@pytest.mark.parametrize("phase", ["validation", "checkpoint"])
def test_a_signal_during_validation_or_a_checkpoint_write_lets_it_finish_then_stops(config, tmp_path, phase):
    # Validation at step 10 (eval.every_steps); the first checkpoint at step 4 (checkpoint.every_steps).
    out = tmp_path / "run"
    proc = start_harness(config, f"output_dir={out}", nproc=2, env_extra={"HARNESS_INJECT_PAUSE": f"{phase}:3"})
    wait_for_pause(proc, phase)
    proc.send_signal(signal.SIGTERM)
    done = proc.wait(timeout=90)
    assert done.returncode == 75, done.stderr[-3000:]
    rows = read_metrics(out)
    preempted = next(r for r in rows if r["event"] == "preempted")
    step = 10 if phase == "validation" else 4
    assert preempted["step"] == step  # stopped right after the phase, not a step later
    if phase == "validation":
        assert any(r["event"] == "eval" and r["step"] == 10 for r in rows), "the validation finished"
    assert not any(r["event"] == "train" and r["step"] > step for r in rows)
    verify_checkpoint(out / "checkpoints" / f"step-{step:07d}")  # complete: manifest written last
    run_harness(config, f"output_dir={out}", nproc=2)
    assert read_results(out)["resumed_from_step"] == step


def test_a_signal_during_the_final_test_stops_and_the_requeued_run_only_finishes(config, tmp_path):
    # The last step's checkpoint is written before the finish; TERM during the test stops it at the next test
    # batch. Rank 0 pauses before writing the "preempted" status: rank 1 must still be waiting for it then (a
    # launcher would kill rank 0 as soon as rank 1 exits, before the status that requeues the job).
    out = tmp_path / "run"
    proc = start_harness(config, f"output_dir={out}", nproc=2, env_extra={"HARNESS_INJECT_PAUSE": "test:3"})
    wait_for_pause(proc, "test")
    proc.send_signal(signal.SIGTERM)
    done = proc.wait(timeout=60)
    assert done.returncode == 75, done.stderr[-3000:]
    rows = read_metrics(out)
    total = rows[0]["total_steps"]
    preempted = next(r for r in rows if r["event"] == "preempted")
    assert preempted["stopped_in"] == "finish" and preempted["step"] == total
    assert [r["reason"] for r in rows if r["event"] == "checkpoint"][-1] == "last step"
    assert json.loads((out / "exit_status.json").read_text())["status"] == "preempted"
    assert not (out / "results.json").exists()
    trained = [r["step"] for r in rows if r["event"] == "train"]

    run_harness(config, f"output_dir={out}", nproc=2)  # the requeued run: the finish alone
    results = read_results(out)
    assert results["resumed_from_step"] == total and results["optimizer_steps"] == total
    assert results["test"]["samples"] == 101
    rows = read_metrics(out)
    assert [r["step"] for r in rows if r["event"] == "train"] == trained, "nothing trained again"
    # The interrupted finish's rows are gone: one test result, no stale "preempted".
    assert [r["event"] for r in rows if r.get("split") == "test" or r["event"] == "preempted"] == ["eval"]


def test_an_evaluate_only_run_signalled_during_its_test_starts_afresh_with_the_same_command(config, tmp_path):
    # Nothing trained, so no checkpoint: its files go, and the folder takes the same command again.
    out = tmp_path / "run"
    proc = start_harness(config, f"output_dir={out}", "train.max_steps=0", env_extra={"HARNESS_INJECT_PAUSE": "test:3"})
    wait_for_pause(proc, "test")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60).returncode == 75
    assert json.loads((out / "exit_status.json").read_text())["status"] == "preempted"
    assert not (out / "metrics.jsonl").exists() and not (out / "final").exists()
    run_harness(config, f"output_dir={out}", "train.max_steps=0")
    assert read_results(out)["test"]["samples"] == 101


def test_the_preempted_status_is_written_before_any_rank_exits(config, tmp_path):
    out = tmp_path / "run"
    proc = start_harness(config, f"output_dir={out}", nproc=2, env_extra={"HARNESS_INJECT_PAUSE": "status:3"})
    wait_for(out, lambda r: r["event"] == "train" and r["step"] >= 3, proc)
    proc.send_signal(signal.SIGTERM)
    wait_for_pause(proc, "status")  # rank 0, about to write the status
    assert proc.processes[1].exitcode is None, "rank 1 exited before the status was written"
    assert proc.wait(timeout=60).returncode == 75
    assert json.loads((out / "exit_status.json").read_text())["status"] == "preempted"


# ---- non-finite gradients, one run per folder, a finished run, a shared folder --------------------------


def test_a_nonfinite_gradient_with_a_finite_loss_is_skipped_and_counted(config, tmp_path):
    out = tmp_path / "run"
    proc = run_harness(config, f"output_dir={out}", "train.max_steps=8", "checkpoint.every_steps=1",
                       "checkpoint.keep_last=8", env_extra={"HARNESS_INJECT_NAN_GRAD_STEPS": "3"})  # fmt: skip
    assert "step 3: non-finite gradient norm (finite loss), update skipped" in proc.stderr
    results = read_results(out)
    assert results["skipped_steps"] == 1 and results["optimizer_steps"] == 8
    weights = load_file(str(out / "final" / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values()), "no NaN reached the weights"
    # The skipped step applied nothing: step 3's weights are step 2's, and the lr schedule did not move.
    step_weights = [
        load_file(str(out / "checkpoints" / f"step-{s:07d}" / "state" / "model.safetensors")) for s in (2, 3, 4)
    ]
    assert all(torch.equal(step_weights[0][k], step_weights[1][k]) for k in step_weights[0])
    assert not all(torch.equal(step_weights[1][k], step_weights[2][k]) for k in step_weights[1])  # step 4 did
    rows = {r["step"]: r for r in read_metrics(out) if r["event"] == "train"}
    assert rows[3]["grad_norm"] is None and rows[3]["lr"] == rows[2]["lr"]
    proc = run_harness(config, f"output_dir={tmp_path / 'streak'}", "runtime.max_nonfinite_steps=2", check=False,
                       env_extra={"HARNESS_INJECT_NAN_GRAD_STEPS": "3,4"})  # fmt: skip
    assert proc.returncode == 3 and "2 consecutive steps with a non-finite loss or gradient" in proc.stderr


def test_a_nan_validation_never_becomes_the_best_model(config, tmp_path):
    # Validations at steps 10 and 20; step 10's scores are NaN (as after an fp16 overflow in the forward pass).
    out = tmp_path / "run"
    run_harness(config, f"output_dir={out}", "train.max_steps=20", env_extra={"HARNESS_INJECT_NAN_EVAL_STEPS": "10"})
    best = read_results(out)["best"]
    assert best["step"] == 20 and best["value"] == best["value"], best  # finite, not the NaN of step 10
    # Every validation NaN: no best model; the final one is tested, and nothing claims to be the best.
    out = tmp_path / "all_nan"
    proc = run_harness(config, f"output_dir={out}", "train.max_steps=20",
                       env_extra={"HARNESS_INJECT_NAN_EVAL_STEPS": "10,20"})  # fmt: skip
    assert "no validation gave a finite loss: there is no best model" in proc.stderr
    results = read_results(out)
    assert results["best"]["step"] == -1 and results["best"]["value"] is None and results["test"]["samples"] == 101
    assert (out / "final" / "model.safetensors").is_file() and not (out / "best").exists()


def test_a_second_run_into_a_busy_folder_is_refused_naming_the_first(config, tmp_path):
    out = tmp_path / "run"
    first = start_harness(config, f"output_dir={out}", "train.epochs=20")
    wait_for(out, lambda r: r["event"] == "train" and r["step"] >= 2, first)
    second = run_harness(config, f"output_dir={out}", "train.epochs=20", check=False)
    assert second.returncode == 2, second.stderr[-2000:]
    holder = f"is in use by another run (pid {first.pids[0]} on {socket.gethostname()}, started 20"
    assert holder in second.stderr and f"harness/train.py --config {config} output_dir={out}" in second.stderr, (
        second.stderr
    )
    assert first.poll() is None, "the first run goes on"
    wait_for(out, lambda r: r["event"] == "train" and r["step"] >= 5, first)  # past its first checkpoint
    first.kill()
    # SIGKILL drops the lock with the process: the same command resumes, from the first run's newest checkpoint
    # (the first run went on while the second was refused: which one that is depends on the machine's speed).
    newest = int(complete_checkpoints(out / "checkpoints")[-1].name.removeprefix("step-"))
    run_harness(config, f"output_dir={out}", f"train.max_steps={newest + 2}")
    assert read_results(out)["resumed_from_step"] == newest >= 4


def test_a_completed_run_is_not_run_again(config, tmp_path):
    out = tmp_path / "run"
    run_harness(config, f"output_dir={out}", "train.max_steps=5")
    before = (out / "results.json").read_text()
    again = run_harness(config, f"output_dir={out}", "train.max_steps=5", check=False)
    assert again.returncode == 2 and "this run has completed" in again.stderr
    assert f"python -m harness.report {out}" in again.stderr and "overwrite=true" in again.stderr
    assert (out / "results.json").read_text() == before
    run_harness(config, f"output_dir={out}", "train.max_steps=5", "overwrite=true")
    assert read_results(out)["resumed_from_step"] is None


def test_ranks_that_see_different_output_dirs_refuse_to_start(config, tmp_path):
    # Two "nodes" whose relative output_dir resolves to different local folders.
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    for node in nodes:
        node.mkdir()
    proc = ranks.start("train", ["--config", str(config), "output_dir=relative/run"], nproc=2, cwds=nodes)
    done = proc.wait(timeout=60)
    assert [p.exitcode for p in proc.processes] == [2, 2], done.stderr[-2000:]
    assert "Every node must see one shared output_dir" in done.stderr
    assert "rank 1 on" in done.stderr and str(nodes[1] / "relative" / "run") in done.stderr
    assert not (nodes[0] / "relative" / "run" / "metrics.jsonl").exists()
