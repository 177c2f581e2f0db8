"""Experiment trackers (TensorBoard, MLflow, trackio) through Accelerate, fed with the harness's records.

Accelerate owns the trackers; the harness decides what they are called and what they receive:
- the project (MLflow experiment, trackio project; TensorBoard's folder under <output_dir>/trackers/) is
  `logging.project`, else the run folder's name; the run inside it is named after the run folder;
- the config as flat `section.key` parameters, every train / eval record as `<split>/<metric>` by step
  (`RunLog.attach_tracker`), and at the end `results.json` and `report.html` as files where a tracker keeps
  files (MLflow and trackio artifacts);
- a resumed run (a requeue, a restart) continues the tracker run it started, not a new one: the run ids are kept
  in <output_dir>/trackers/runs.json. Steps logged after the checkpoint it resumes from are logged again.

Where runs are stored is each tracker's own setting: `MLFLOW_TRACKING_URI` (a server, or MLflow's default
`sqlite:///mlflow.db` in the working directory), `TRACKIO_DIR` (default ~/.cache/huggingface/trackio). Other
Accelerate trackers (wandb, comet_ml, ...) receive the same records under Accelerate's defaults.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from harness.config import ConfigError, ExperimentConfig

EXTRAS = {"tensorboard": "tensorboard", "mlflow": "mlflow", "trackio": "trackio"}
"""The pyproject extra that installs each tracker the harness supports (`pip install -e ".[mlflow]"`)."""
RUN_IDS_FILE = "runs.json"
"""In <output_dir>/trackers/: the tracker runs this run started, by tracker name (resumed runs continue them)."""


def check_trackers(names: list[str]) -> list[str]:
    """Accelerate drops a tracker whose package is missing with a debug message only: refuse instead."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers

    problems = []
    installed = [str(t) for t in get_available_trackers()]
    for name in names:
        if name not in LOGGER_TYPE_TO_CLASS:
            problems.append(
                f"logging.trackers: unknown tracker {name!r}; Accelerate has {sorted(LOGGER_TYPE_TO_CLASS)}"
            )
        elif name not in installed:
            install = f'pip install -e ".[{EXTRAS[name]}]"' if name in EXTRAS else f"pip install {name}"
            problems.append(f"logging.trackers: {name!r} is not installed here ({install})")
    if problems:
        raise ConfigError(problems)
    return names


def start_trackers(accelerator: Accelerator, cfg: ExperimentConfig, out: Path, resuming: bool) -> list[str]:
    """Start every configured tracker (a resumed run continues its tracker runs); what each one writes where."""
    run_ids_path = out / "trackers" / RUN_IDS_FILE
    run_ids = json.loads(run_ids_path.read_text()) if resuming and run_ids_path.is_file() else {}
    project = cfg.logging.project or out.name
    init_kwargs: dict[str, dict[str, Any]] = {
        # The MLflow experiment is the project (Accelerate names it); a resumed run reopens its run by id.
        "mlflow": {"run_name": out.name, "run_id": run_ids.get("mlflow"), "tags": {"harness.output_dir": str(out)}},
        # trackio finds a run by name within its project: "allow" continues it when it exists.
        "trackio": {"name": out.name, "resume": "allow"},
    }
    accelerator.init_trackers(project, config=flat_scalars(cfg.to_dict()),
                              init_kwargs={k: v for k, v in init_kwargs.items() if k in cfg.logging.trackers})  # fmt: skip
    if not accelerator.is_main_process:
        return []
    started = {}
    places = []
    for name in cfg.logging.trackers:
        run = accelerator.get_tracker(name, unwrap=True)
        if name == "mlflow":
            import mlflow

            started["mlflow"] = run.info.run_id
            places.append(f"mlflow run {run.info.run_id} in experiment {project!r} at {mlflow.get_tracking_uri()}")
        elif name == "trackio":
            from trackio.utils import TRACKIO_DIR

            places.append(f"trackio run {out.name!r} in project {project!r} at {TRACKIO_DIR}")
        elif name == "tensorboard":
            places.append(f"tensorboard in {out / 'trackers' / project}")
        else:
            places.append(name)
    if started:
        run_ids_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = run_ids_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(started, indent=2) + "\n")
        tmp.replace(run_ids_path)
    return places


def log_run_files(accelerator: Accelerator, files: list[Path]) -> None:
    """The run's result files to the trackers that keep files (main process; call before `end_training`)."""
    if not accelerator.is_main_process:
        return
    for tracker in accelerator.trackers:
        for path in files:
            if tracker.name == "mlflow":
                tracker.log_artifact(str(path))
            elif tracker.name == "trackio":  # a versioned artifact per file, named after the run and the file
                tracker.tracker.log_artifact(str(path), name=f"{tracker.tracker.name}-{path.name}", type="run-file")


def close_trackers(accelerator: Accelerator, status: str) -> None:
    """End every tracker run (main process), flushing what it buffers: at the end of a run (FINISHED), and when
    an attempt stops early, preempted (KILLED) or failed (FAILED), as MLflow names them. A resumed attempt
    reopens its runs."""
    for tracker in accelerator.trackers:
        if tracker.name == "mlflow":
            if accelerator.is_main_process:
                import mlflow

                mlflow.end_run(status)
        else:
            tracker.finish()
    accelerator.trackers.clear()  # ended: `end_training` must not end them again


def flat_scalars(tree: dict, prefix: str = "") -> dict[str, int | float | str | bool]:
    """The config as flat `section.key` scalars (what trackers' hyper-parameter tables accept)."""
    flat: dict[str, int | float | str | bool] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flat_scalars(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat
