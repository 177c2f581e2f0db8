"""Hyper-parameter search with Optuna: a sampler proposes each trial's config, a pruner stops trials that fall
behind at their validations, and the trials run as harness runs: local processes under any launch intent, or
SLURM array tasks on many nodes, sharing one study through Optuna's journal file in the search folder.

    python -m launch search search.yaml                 # run the study here, `parallel` trials at a time
    sbatch --array=0-7%2 slurm/search.sbatch search.yaml   # the same study as SLURM array tasks
    python -m launch search --summary runs/search       # trials ranked by validation, the best config

search.yaml:
    config: configs/quickstart.yaml        # the experiment every trial starts from
    overrides: [train.max_steps=60]        # for every trial (optional)
    output_dir: runs/search                # the search folder: study.journal, trial-<n>/, trial-<n>.overrides
    trials: 8                              # the budget: trials in all (counting finished, pruned, failed)
    parallel: 2                            # trials at a time (locally; under SLURM, the array's %N)
    launch: [cpu, "1"]                     # how each trial runs locally: python -m launch <these> -- ...
    sampler: {name: tpe, seed: 0}          # tpe (default) or random
    pruner: {name: median, startup_trials: 2}       # median, successive_halving or none
    enqueue: [{train.lr: 1.0e-3}]          # configs to try first (optional; the rest of each is sampled)
    space:                                 # any config key: float, log_float, int, categorical
      train.lr: {log_float: [1.0e-5, 1.0e-3]}
      train.weight_decay: {float: [0.0, 0.1]}
      train.warmup_steps: {int: [0, 20]}
      train.batch_size: {categorical: [8, 16]}

Paths are relative to the directory the search runs from (the repository root, as for every entry point). The
median pruner stops a trial whose validation is worse than the median of earlier trials' at the same step, once
`startup_trials` trials have finished. The objective is the run's own eval.metric on validation (its direction from the metric); test scores are shown
beside, never used. A pruned trial stops at its validation with status "pruned" (exit code 7) and keeps its files;
a trial interrupted with the search (or requeued under SLURM) resumes from its checkpoints, as any run does.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import socket
import subprocess
import sys
import threading
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from harness.config import LOWER_IS_BETTER, ConfigError, load_config
from harness.trial import make_pruner

STUDY = "search"
JOURNAL = "study.journal"
EXIT_PRUNED = 7
KINDS = ("float", "log_float", "int", "categorical")


@dataclass
class SearchSpec:
    path: Path
    config: Path
    output_dir: Path
    space: dict[str, tuple[str, list]]
    overrides: list[str] = field(default_factory=list)
    trials: int = 8
    parallel: int = 1
    launch: list[str] = field(default_factory=lambda: ["cpu", "1"])
    enqueue: list[dict] = field(default_factory=list)
    sampler: dict = field(default_factory=lambda: {"name": "tpe"})
    pruner: dict = field(default_factory=lambda: {"name": "median"})
    metric: str = "loss"
    """The experiment's eval.metric (the objective), read from its config when the search file is loaded."""

    @classmethod
    def load(cls, path: str | Path) -> SearchSpec:
        """Read and check a search file; every problem named with its key, as the harness's config errors are."""
        path = Path(path)
        try:
            raw = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError([f"{path}: cannot read it as YAML ({exc})"]) from exc
        problems = []
        if not isinstance(raw, dict):
            raise ConfigError([f"{path}: expected a mapping of search settings"])
        known = {"config", "output_dir", "space", "overrides", "trials", "parallel", "launch", "sampler", "pruner",
                 "enqueue"}  # fmt: skip
        problems += [
            f"{path}: unknown key {key!r} (known: {', '.join(sorted(known))})" for key in raw if key not in known
        ]
        for key in ("config", "output_dir", "space"):
            if key not in raw:
                problems.append(f"{path}: {key} is required")
        space: dict[str, tuple[str, list]] = {}
        for name, spec in (raw.get("space") or {}).items():
            if not (isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in KINDS):
                problems.append(f"{path}: space.{name}: one of {', '.join(KINDS)} with its range or choices")
                continue
            kind, values = next(iter(spec.items()))
            if not isinstance(values, list) or (kind != "categorical" and len(values) != 2) or not values:
                problems.append(f"{path}: space.{name}: {kind} takes [low, high]" if kind != "categorical"
                                else f"{path}: space.{name}: categorical takes a list of choices")  # fmt: skip
                continue
            if kind != "categorical" and not values[0] < values[1]:
                problems.append(f"{path}: space.{name}: low {values[0]} must be below high {values[1]}")
            if kind == "log_float" and values[0] <= 0:
                problems.append(f"{path}: space.{name}: log_float needs low > 0")
            space[name] = (kind, values)
        for key in ("trials", "parallel"):
            if key in raw and not (isinstance(raw[key], int) and raw[key] >= 1):
                problems.append(f"{path}: {key} must be an integer >= 1, got {raw[key]!r}")
        sampler, pruner = raw.get("sampler") or {"name": "tpe"}, raw.get("pruner") or {"name": "median"}
        if sampler.get("name") not in ("tpe", "random"):
            problems.append(f"{path}: sampler.name: tpe or random, got {sampler.get('name')!r}")
        if pruner.get("name") not in ("median", "successive_halving", "none"):
            problems.append(f"{path}: pruner.name: median, successive_halving or none, got {pruner.get('name')!r}")
        enqueue = raw.get("enqueue") or []
        for number, values in enumerate(enqueue if isinstance(enqueue, list) else [None]):
            if not isinstance(values, dict) or set(values) - set(space):
                problems.append(f"{path}: enqueue[{number}]: a mapping of keys in space, got {values!r}")
        if problems:
            raise ConfigError(problems)
        # The experiment itself loads, with the overrides, and has every key of the space.
        config, overrides = Path(raw["config"]), [str(o) for o in raw.get("overrides") or []]
        cfg = load_config(str(config), overrides)
        unknown = [f"{path}: space.{key}: not a config key of {config}" for key in space
                   if not hasattr(getattr(cfg, key.partition(".")[0], None), key.partition(".")[2])]  # fmt: skip
        if unknown:
            raise ConfigError(unknown)
        return cls(path=path, config=config, output_dir=Path(raw["output_dir"]), space=space, overrides=overrides,
                   trials=raw.get("trials", 8), parallel=raw.get("parallel", 1),
                   launch=[str(word) for word in raw.get("launch", ["cpu", "1"])], sampler=sampler, pruner=pruner,
                   enqueue=enqueue, metric=cfg.eval.metric)  # fmt: skip


def journal_storage(folder: Path):
    """The Optuna storage of the search in `folder`: its journal file, which every worker on every node appends
    to (a file lock serialises them; the folder must be shared)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(folder / JOURNAL)))


def open_study(spec: SearchSpec, create: bool = True, worker: str = ""):
    """The search's study in its journal file (created with its sampler and pruner on first use). Each process
    that asks for trials is a `worker` with a sampler of its own: a fixed seed is varied by the worker's name, or
    every array task would draw the same first (random) trials."""
    import optuna

    spec.output_dir.mkdir(parents=True, exist_ok=True)
    storage = journal_storage(spec.output_dir)
    seed = spec.sampler.get("seed")
    if seed is not None and worker:
        seed += zlib.crc32(worker.encode())
    sampler = (optuna.samplers.TPESampler(seed=seed, n_startup_trials=spec.sampler.get("startup_trials", 4))
               if spec.sampler["name"] == "tpe" else optuna.samplers.RandomSampler(seed=seed))  # fmt: skip
    pruner = make_pruner(spec.pruner)
    direction = "minimize" if spec.metric in LOWER_IS_BETTER else "maximize"
    study = optuna.create_study(study_name=STUDY, storage=storage, sampler=sampler, pruner=pruner,
                                direction=direction, load_if_exists=create)  # fmt: skip
    study.set_user_attr("pruner", spec.pruner)  # for the trials' processes, which report and ask it
    for values in spec.enqueue:  # known configs first (once: every worker enqueues the same, skipped if there)
        study.enqueue_trial(values, skip_if_exists=True)
    return study


def distributions(spec: SearchSpec) -> dict[str, Any]:
    import optuna.distributions as d

    made = {}
    for key, (kind, values) in spec.space.items():
        if kind == "categorical":
            made[key] = d.CategoricalDistribution(values)
        elif kind == "int":
            made[key] = d.IntDistribution(int(values[0]), int(values[1]))
        else:
            made[key] = d.FloatDistribution(float(values[0]), float(values[1]), log=kind == "log_float")
    return made


def trial_overrides(params: dict[str, Any]) -> list[str]:
    return [f"{key}={json.dumps(value) if isinstance(value, str) else value}" for key, value in params.items()]


def ask(spec: SearchSpec, study) -> tuple[int, list[str]] | None:
    """A new trial and its overrides (written beside its folder), or None when the budget is spent."""
    with ASKING:  # the budget check and the ask together (the journal's file lock orders other processes)
        if len(study.get_trials(deepcopy=False)) >= spec.trials:
            return None
        trial = study.ask(distributions(spec))
    overrides = trial_overrides(trial.params)
    (spec.output_dir / f"trial-{trial.number}.overrides").write_text(" ".join(overrides) + "\n")
    return trial.number, overrides


ASKING = threading.Lock()


def trial_command(spec: SearchSpec, number: int, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "launch", *spec.launch, "--", "--config", str(spec.config), *spec.overrides,
            *overrides, f"output_dir={spec.output_dir / f'trial-{number}'}"]  # fmt: skip


def trial_env(spec: SearchSpec, number: int) -> dict[str, str]:
    return {"HARNESS_OPTUNA_TRIAL": f"{(spec.output_dir / JOURNAL).resolve()}::{STUDY}::{number}"}


def tell(spec: SearchSpec, study, number: int) -> str:
    """Record how trial `number` ended, from its run folder: complete with its best validation value, pruned, or
    failed. Returns the state."""
    import optuna

    folder = spec.output_dir / f"trial-{number}"
    status = _read(folder / "exit_status.json").get("status")
    results = _read(folder / "results.json")
    best = (results.get("best") or {}).get("value")
    if status == "completed" and best is not None:
        study.tell(number, best)
        return "complete"
    if status == "pruned":
        study.tell(number, state=optuna.trial.TrialState.PRUNED)
        return "pruned"
    study.tell(number, state=optuna.trial.TrialState.FAIL)
    return "failed"


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


class PortLeases:
    """Rendezvous ports for the trials running at once: each a port free when leased, none two trials' at a time
    (two launchers each probing for a free port at the same moment took the same one: EADDRINUSE)."""

    def __init__(self):
        self._held: set[int] = set()
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def lease(self):
        with self._lock:
            while True:
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", 0))
                    port = probe.getsockname()[1]
                if port not in self._held:
                    self._held.add(port)
                    break
        try:
            yield port
        finally:
            with self._lock:
                self._held.discard(port)


def run_local(spec: SearchSpec) -> int:
    """Run the study here: `parallel` workers, each asking for a trial, running it, telling how it ended."""
    import optuna

    study = open_study(spec)
    # Trials left running by an interrupted search resume first (their runs resume from their checkpoints).
    pending = [t.number for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.RUNNING]
    pending_lock = threading.Lock()
    logs = spec.output_dir
    ports = PortLeases()

    def worker() -> None:
        while True:
            with pending_lock:
                number = pending.pop(0) if pending else None
            if number is not None:
                overrides = shlex.split((spec.output_dir / f"trial-{number}.overrides").read_text())
            else:
                asked = ask(spec, study)
                if asked is None:
                    return
                number, overrides = asked
            print(f"search: trial {number}: {' '.join(overrides)}", flush=True)
            with (logs / f"trial-{number}.log").open("a") as log:
                with ports.lease() as port:  # concurrent trials' launchers must not race for one free port
                    env = {**os.environ, **trial_env(spec, number), **({} if "MASTER_PORT" in os.environ else
                                                                       {"MASTER_PORT": str(port)})}  # fmt: skip
                    code = subprocess.run(trial_command(spec, number, overrides), env=env, stdout=log,
                                          stderr=subprocess.STDOUT).returncode  # fmt: skip
            state = tell(spec, study, number)
            print(f"search: trial {number}: {state} (exit code {code})", flush=True)

    threads = [threading.Thread(target=worker) for _ in range(spec.parallel)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    print_summary(spec.output_dir)
    return 0


def summary_rows(folder: Path) -> tuple[list[dict], str]:
    import optuna

    study = optuna.load_study(study_name=STUDY, storage=journal_storage(folder))
    rows = []
    for trial in study.get_trials(deepcopy=False):
        results = _read(folder / f"trial-{trial.number}" / "results.json")
        best = results.get("best") or {}
        complete = trial.state == optuna.trial.TrialState.COMPLETE
        last = trial.intermediate_values.get(trial.last_step) if trial.last_step is not None else None
        rows.append({"trial": trial.number, "state": trial.state.name.lower(),
                     "validation": trial.value if complete else None, "last_step": trial.last_step,
                     "last_reported": last, "test": (results.get("test") or {}).get(best.get("metric")),
                     "overrides": " ".join(trial_overrides(trial.params))})  # fmt: skip
    minimize = study.direction == optuna.study.StudyDirection.MINIMIZE
    done = sorted((r for r in rows if r["validation"] is not None), key=lambda r: r["validation"], reverse=not minimize)
    return done + [r for r in rows if r["validation"] is None], "minimize" if minimize else "maximize"


def print_summary(folder: Path) -> None:
    rows, direction = summary_rows(folder)
    print(f"| trial | state | best validation ({direction}) | stopped at | test (reference only) | overrides |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        value = f"{row['validation']:.4f}" if row["validation"] is not None else "-"
        if row["state"] == "pruned" and row["last_reported"] is not None:
            stopped = f"step {row['last_step']} ({row['last_reported']:.4f})"
        else:
            stopped = "-"
        test = f"{row['test']:.4f}" if row["test"] is not None else "-"
        print(f"| {row['trial']} | {row['state']} | {value} | {stopped} | {test} | {row['overrides']} |")
    if rows and rows[0]["validation"] is not None:
        print(f"best: trial {rows[0]['trial']}: {rows[0]['overrides']} (validation {rows[0]['validation']:.4f})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch search", description=__doc__.split("\n\n")[0])
    parser.add_argument("search", nargs="?", help="the search file (YAML)")
    parser.add_argument("--summary", metavar="FOLDER", help="rank a search folder's trials and exit")
    sub = parser.add_argument_group("for slurm/search.sbatch")
    sub.add_argument(
        "--ask",
        metavar="TASK",
        help="print the trial of this array task, <array job>_<task> (a new one the first time)",
    )
    sub.add_argument("--tell", type=int, metavar="TRIAL", help="record how this trial's run ended")
    args = parser.parse_args(argv)
    try:
        import optuna  # noqa: F401
    except ImportError:
        print('error: the search needs Optuna: pip install -e ".[search]"', file=sys.stderr)
        return 2
    try:
        if args.summary:
            if not (Path(args.summary) / JOURNAL).is_file():
                raise ConfigError([f"{args.summary}: no {JOURNAL}; not a search folder"])
            print_summary(Path(args.summary))
            return 0
        if not args.search:
            parser.error("give a search file (or --summary FOLDER)")
        spec = SearchSpec.load(args.search)
        if args.ask is not None:
            return slurm_ask(spec, args.ask)
        if args.tell is not None:
            print(tell(spec, open_study(spec), args.tell))
            return 0
        return run_local(spec)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def slurm_ask(spec: SearchSpec, task: str) -> int:
    """For an array task: its trial number, command and environment as shell words (eval'd by the script). A
    requeued task gets the trial it had: the task's trial is kept in the search folder."""
    study = open_study(spec, worker=task)
    kept = spec.output_dir / f"task-{task}.trial"
    if kept.is_file():
        number = int(kept.read_text())
        overrides = shlex.split((spec.output_dir / f"trial-{number}.overrides").read_text())
    else:
        asked = ask(spec, study)
        if asked is None:
            print("trial=", flush=True)
            return 0
        number, overrides = asked
        kept.write_text(f"{number}\n")
    env = trial_env(spec, number)["HARNESS_OPTUNA_TRIAL"]
    words = [*spec.overrides, *overrides, f"output_dir={spec.output_dir / f'trial-{number}'}"]
    print(f"trial={number}\nexport HARNESS_OPTUNA_TRIAL={shlex.quote(env)}\nconfig={shlex.quote(str(spec.config))}\n"
          f"overrides=({' '.join(shlex.quote(w) for w in words)})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
