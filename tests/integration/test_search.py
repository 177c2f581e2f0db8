"""`python -m launch search`: an Optuna study whose trials are harness runs, sampled by TPE, pruned at their
validations by the median pruner, sharing one journal file; run locally with 2 trials at a time, and as SLURM
array tasks on the local test cluster."""

import json
import subprocess
import sys

import pytest
import yaml

from launch.search import STUDY, journal_storage
from tests.conftest import ROOT, read_metrics, read_results, tiny_config

pytestmark = pytest.mark.slow
optuna = pytest.importorskip("optuna", reason="needs optuna (pip install -e '.[search]')")


def write_search(tmp_path, trials: int, sampler: str) -> tuple:
    config = tiny_config(tmp_path, train={"max_steps": 12, "batch_size": 8}, eval={"every_steps": 3},
                         runtime={"cpu_threads": 1}, logging={"every_steps": 3, "progress": "plain"})  # fmt: skip
    folder = tmp_path / "search"
    search = tmp_path / "search.yaml"
    search.write_text(yaml.safe_dump({
        "config": str(config), "output_dir": str(folder), "trials": trials, "parallel": 2,
        "launch": ["gpus", "1"], "sampler": {"name": sampler, "seed": 3}, "pruner": {"name": "median", "startup_trials": 1},
        # Half the learning rates diverge at once. The first two trials (enqueued) learn; a trial starts only when
        # one has completed, so every later trial on the diverging rate is far behind that one at its first
        # validation, and the pruner stops it there, whatever the timing. The random sampler's seed gives some.
        "enqueue": [{"train.lr": 3.0e-3, "train.warmup_steps": 0}, {"train.lr": 3.0e-3, "train.warmup_steps": 2}],
        "space": {"train.lr": {"categorical": [3.0e-3, 0.5]}, "train.warmup_steps": {"int": [0, 3]},
                  "train.weight_decay": {"log_float": [1.0e-4, 0.1]}},
    }))  # fmt: skip
    return search, folder


def summary(folder):
    proc = subprocess.run([sys.executable, "-m", "launch", "search", "--summary", str(folder)], cwd=ROOT,
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def check_trials(folder, trials: int) -> dict[int, str]:
    """Every trial ended complete or pruned, as its run folder says; the study's values are the runs' own."""
    study = optuna.load_study(study_name=STUDY, storage=journal_storage(folder))
    states = {t.number: t.state.name for t in study.trials}
    params = [tuple(sorted(t.params.items())) for t in study.trials]
    assert len(set(params)) == len(params), params  # every worker samples for itself (seeded per worker)
    assert sorted(states) == list(range(trials)) and set(states.values()) <= {"COMPLETE", "PRUNED"}, states
    for trial in study.trials:
        run = folder / f"trial-{trial.number}"
        status = json.loads((run / "exit_status.json").read_text())
        if trial.state.name == "COMPLETE":
            assert status["status"] == "completed" and trial.value == read_results(run)["best"]["value"]
        else:  # stopped at a validation, before the last step, with its files kept
            assert status == {**status, "status": "pruned", "exit_code": 7}
            (pruned,) = [r for r in read_metrics(run) if r["event"] == "pruned"]
            assert pruned["step"] < 12 and (run / "config.yaml").is_file() and not (run / "results.json").exists()
            assert trial.last_step == pruned["step"]
    return states


def test_a_local_search_samples_prunes_and_ranks_its_trials(tmp_path):
    search, folder = write_search(tmp_path, trials=6, sampler="random")
    proc = subprocess.run([sys.executable, "-m", "launch", "search", str(search)], cwd=ROOT, capture_output=True,
                          text=True, timeout=400)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    states = check_trials(folder, 6)
    assert "PRUNED" in states.values(), (states, proc.stdout)  # the pruner stopped at least one trial early
    diverging = [
        t
        for t in optuna.load_study(study_name=STUDY, storage=journal_storage(folder)).trials
        if t.params["train.lr"] == 0.5
    ]
    assert diverging and all(t.state.name == "PRUNED" and t.last_step == 3 for t in diverging), states
    text = summary(folder)
    rows = [line for line in text.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == 6 and "| complete |" in rows[0] and "| pruned |" in rows[-1], text
    values = [float(row.split("|")[3]) for row in rows if "| complete |" in row]
    assert values == sorted(values)  # validation loss: lower first
    assert text.splitlines()[-1].startswith(f"best: trial {rows[0].split('|')[1].strip()}: train.lr=")


def test_a_search_runs_as_slurm_array_tasks_sharing_one_study(slurm_cluster, tmp_path):
    search, folder = write_search(tmp_path, trials=3, sampler="tpe")
    job = slurm_cluster.sbatch("--gres=none", "--cpus-per-task=1", "--time=15", "--array=0-3%2",
                               f"--output={tmp_path}/%x-%A_%a.out", "slurm/search.sbatch", str(search),
                               env={"HARNESS_LAUNCH": "cpu", "NPROC_PER_NODE": "1"}, cwd=ROOT)  # fmt: skip
    for task in range(4):  # one task more than the budget: it finds nothing left to run
        info = slurm_cluster.wait_until(f"{job}_{task}", {"COMPLETED", "FAILED", "CANCELLED"})
        log = (tmp_path / f"harness-search-{job}_{task}.out").read_text()
        assert info["JobState"] == "COMPLETED", (info, log[-3000:])  # pruned trials too: ended on purpose
    check_trials(folder, 3)
    assert "budget is spent" in "".join(p.read_text() for p in tmp_path.glob("harness-search-*.out"))
    assert sorted(int(p.read_text()) for p in folder.glob(f"task-{job}_*.trial")) == [0, 1, 2]
    assert "best: trial" in summary(folder)
