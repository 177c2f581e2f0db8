"""Checkpoints and exports: everything a run writes about its model and its progress.

* Model weights: consolidated copies (also under ZeRO-3), reloading, the Hugging Face export of `best/` and
  `final/`.
* Resumable checkpoints, `<output_dir>/checkpoints/step-0000120/{state/, trainer_state.json, manifest.json}`.
* `CheckpointManager`: for one run, the trainer state, when to save (steps, minutes, epoch end, a stop
  signal), keep-last, the best model's weights, and every compatibility check on resume.

Everything on disk is written atomically: a temporary folder, then a rename; a checkpoint counts only once
its manifest, written last, is in place.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file

from harness.config import ConfigError, ExperimentConfig
from harness.console import LossWindow, RunLog
from harness.data.sampler import EpochPlanner, StepLayout
from harness.distributed import EXIT_REQUEUE, Preempted, RunPlace, StopRequest
from harness.evaluation import BestSoFar
from harness.faults import pause
from harness.fsdp import (
    full_state_dict,
    is_sharded,
    load_full_state_dict,
    load_sharded,
    original_class_name,
    save_sharded,
)
from harness.rundir import EXIT_STATUS_FILE, is_bookkeeping, remove_run_files, write_exit_status
from harness.serving import ServingSpec


def state_dict_copy(accelerator: Accelerator, model: torch.nn.Module, place: RunPlace) -> dict[str, torch.Tensor]:
    """A CPU copy of the full model weights on every rank, consolidated where ZeRO-3 shards them; under ZeRO with
    bf16 or fp16 weights, the fp32 master copy the optimizer updates (what DDP's fp32 parameters hold), not the
    low-precision module weights.

    Called on every rank: gathering shards and master partitions are collective operations (every rank walks the
    parameters in the same order). Under FSDP2 the copy is rank 0's alone ({} elsewhere): `load_weights`
    broadcasts it, and only rank 0 writes files."""
    if place.fsdp is not None:
        return full_state_dict(model)
    zero_stage = place.zero_stage
    module = accelerator.unwrap_model(model)
    if zero_stage == 3:
        import deepspeed

        # Gather the partitions (read-only), copy, and let them be re-partitioned on exit.
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            state = {name: t.detach().to("cpu", copy=True) for name, t in module.state_dict().items()}
    else:
        state = {name: t.detach().to("cpu", copy=True) for name, t in module.state_dict().items()}
    if zero_stage and any(t.dtype in (torch.bfloat16, torch.float16) for t in state.values()):
        from deepspeed.utils import safe_get_full_fp32_param

        masters: dict[int, torch.Tensor] = {}
        for name, param in module.named_parameters(remove_duplicate=False):
            if id(param) not in masters:
                master = safe_get_full_fp32_param(param)  # collective; None for a frozen parameter
                masters[id(param)] = master.detach().to("cpu", torch.float32) if master is not None else None
            if masters[id(param)] is not None and name in state:
                state[name] = masters[id(param)].clone()
    return state


def cast_floats(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """checkpoint.export_dtype: floating tensors cast (integer buffers such as position ids kept)."""
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}


def load_weights(accelerator: Accelerator, model: torch.nn.Module, state: dict[str, torch.Tensor],
                 place: RunPlace) -> None:  # fmt: skip
    """Put full weights (from `state_dict_copy`) back into the model on every rank, sharded or not."""
    if place.fsdp is not None:
        load_full_state_dict(model, state)
        return
    module = accelerator.unwrap_model(model)
    if place.zero_stage == 3:
        import deepspeed

        # Rank 0 writes the gathered parameters; on exit DeepSpeed re-partitions them from rank 0.
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=0):
            if accelerator.is_main_process:
                module.load_state_dict(state)
        return
    module.load_state_dict(state)


def export_model(
    accelerator: Accelerator,
    model: torch.nn.Module,
    tokenizer,
    state: dict[str, torch.Tensor],
    path: Path,
    serving: ServingSpec | None = None,
) -> None:
    """Write `state` as a Hugging Face model folder at `path` (with its input pipeline, `serving`), replacing it
    only once complete."""
    if accelerator.is_main_process:
        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        module = accelerator.unwrap_model(model)
        # Tied copies (an MLM decoder sharing the word embeddings) are left out; loading ties them again.
        tied = getattr(module, "_tied_weights_keys", None)
        tied = set(tied) if isinstance(tied, dict) and getattr(module.config, "tie_word_embeddings", True) else set()
        module.save_pretrained(
            tmp,
            state_dict={k: v for k, v in state.items() if k not in tied},  # a copy: save_pretrained consumes it
            safe_serialization=True,
            # The model's own parameter names: transformers would otherwise write the legacy names of the checkpoint
            # it loaded (ZeRO-3's loading path keeps them: LayerNorm gamma/beta), unlike every other export.
            save_original_format=False,
        )
        record_weights_dtype(tmp, state)
        if is_sharded(module):  # FSDP2 made it an FSDP<class> subclass: config.json names the class users load
            config = json.loads((tmp / "config.json").read_text())
            config["architectures"] = [original_class_name(module)]
            (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        tokenizer.save_pretrained(tmp)
        if serving is not None:
            serving.write(tmp)
        old = path.with_name(path.name + ".old")
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def record_weights_dtype(folder: Path, state: dict[str, torch.Tensor]) -> None:
    """Make config.json's `dtype` that of the weights written beside it.

    `save_pretrained` records the module's parameter dtype, which under DeepSpeed bf16 / fp16 is the half-precision
    working copy while the export holds the fp32 masters (or checkpoint.export_dtype's cast); transformers
    (dtype "auto" in pipelines) would load the export in the wrong precision."""
    floats = {t.dtype for t in state.values() if t.is_floating_point()}
    path = folder / "config.json"
    if len(floats) != 1 or not path.is_file():
        return
    dtype = str(floats.pop()).removeprefix("torch.")
    config = json.loads(path.read_text())

    def retag(node: dict) -> None:
        for key, value in node.items():
            if key in ("dtype", "torch_dtype") and isinstance(value, str):
                node[key] = dtype
            elif isinstance(value, dict):
                retag(value)  # sub-configs carry their own

    retag(config)
    config["dtype"] = dtype
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


# ----------------------------------------------------------------------------------------------------
# Resumable checkpoints: <output_dir>/checkpoints/step-0000120/{state/, trainer_state.json, manifest.json}
# ----------------------------------------------------------------------------------------------------

MANIFEST = "manifest.json"
SHARDED_STATE = "sharded"
"""Inside a checkpoint: FSDP2's model and optimizer state, every rank's shards (torch.distributed.checkpoint)."""
TRAINER_STATE = "trainer_state.json"
STEP_DIR_PREFIX = "step-"
EXPORT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
BEST_IN_CHECKPOINT = "best_model.safetensors"
"""The best model so far, saved in every checkpoint so that a resumed run can still test it."""


class CheckpointError(ValueError):
    """A checkpoint cannot be used; the message names it and says why."""


def step_dir_name(step: int) -> str:
    return f"{STEP_DIR_PREFIX}{step:07d}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with path.open("rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CheckpointSaveError(OSError):
    """Writing a checkpoint failed (disk full, unwritable folder); the previous checkpoints are untouched."""


def save_checkpoint(
    accelerator: Accelerator,
    checkpoints_dir: Path,
    step: int,
    trainer_state: str,
    manifest_info: dict,
    extra_weights: dict[str, dict[str, torch.Tensor]] | None = None,
    sharded: Callable[[Path], None] | None = None,
) -> Path:
    """Write a complete checkpoint atomically; called on every rank (each saves its own state files).

    Files go to a temporary folder, are flushed, the manifest (with checksums) is written last, then the
    folder is renamed into place: a crash at any point leaves either no new checkpoint or a complete one.
    On an OSError (disk full, unwritable folder) the temporary folder is removed and the error names where.
    `extra_weights` (file name -> state dict) are written by the main process, e.g. the best model so far;
    `sharded(folder)` by every rank, its shards of a state Accelerate does not hold (FSDP2's model and optimizer).
    """
    final = checkpoints_dir / step_dir_name(step)
    tmp = checkpoints_dir / f".tmp-{final.name}"
    failed = torch.zeros(1, device=accelerator.device)
    reason = ""
    try:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp / "state"))  # model, optimizer, scheduler, scaler, every rank's RNG
        if sharded is not None:
            sharded(tmp / SHARDED_STATE)
        pause("checkpoint")  # fault injection for tests: a signal in the middle of a write
        if accelerator.is_main_process:
            (tmp / TRAINER_STATE).write_text(trainer_state)
            for name, weights in (extra_weights or {}).items():
                save_file(weights, str(tmp / name))
    except OSError as exc:
        failed += 1
        reason = f"{exc.strerror or exc} ({exc.filename or tmp})"
    # Every rank learns whether any rank failed, so all raise together instead of some waiting forever.
    if accelerator.reduce(failed, reduction="sum").item() > 0:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointSaveError(f"saving checkpoint {final} failed: {reason or 'on another rank'}")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        try:
            files = {str(p.relative_to(tmp)): _sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
            _fsync_tree(tmp)
            manifest = {**manifest_info, "step": step, "files": files}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
            _fsync_tree(tmp)
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            _fsync_dir(checkpoints_dir)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointSaveError(
                f"saving checkpoint {final} failed: {exc.strerror or exc} ({exc.filename or tmp})"
            ) from exc
    accelerator.wait_for_everyone()
    return final


def verify_checkpoint(path: Path) -> dict:
    """The manifest of a complete, intact checkpoint; CheckpointError saying what is wrong otherwise."""
    manifest_path = path / MANIFEST
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a folder")
    if not manifest_path.is_file():
        raise CheckpointError(f"{path}: incomplete (no {MANIFEST}); it was being written when the run stopped")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{manifest_path}: unreadable manifest: {exc}") from exc
    for name, checksum in files.items():
        file = path / name
        try:
            actual = _sha256(file)
        except OSError as exc:
            raise CheckpointError(f"{file}: unreadable: {exc.strerror or exc}") from exc
        if actual != checksum:
            raise CheckpointError(f"{file}: checksum mismatch (corrupted or truncated)")
    return manifest


def complete_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """Step folders that have a manifest, oldest first (not verified: see `verify_checkpoint`)."""
    if not checkpoints_dir.is_dir():
        return []
    found = [p for p in checkpoints_dir.iterdir() if p.name.startswith(STEP_DIR_PREFIX) and (p / MANIFEST).is_file()]
    return sorted(found, key=lambda p: p.name)


def find_resume_checkpoint(checkpoints_dir: Path, warn, accept=None) -> tuple[Path, dict] | None:
    """The newest intact checkpoint (whose manifest `accept` takes, if given); broken or incomplete ones are
    skipped with a warning naming them."""
    candidates = (
        [p for p in checkpoints_dir.iterdir() if p.name.startswith(STEP_DIR_PREFIX)] if checkpoints_dir.is_dir() else []
    )
    for path in sorted(candidates, key=lambda p: p.name, reverse=True):
        if accept is not None and not _manifest_accepted(path, accept):
            continue
        try:
            return path, verify_checkpoint(path)
        except CheckpointError as exc:
            warn(f"skipping checkpoint: {exc}")
    return None


def _manifest_accepted(path: Path, accept) -> bool:
    try:
        return bool(accept(json.loads((path / MANIFEST).read_text())))
    except (OSError, ValueError):
        return True  # unreadable: verify_checkpoint names the problem


def prune_checkpoints(checkpoints_dir: Path, keep_last: int, protected_steps: set[int]) -> None:
    """Keep the newest `keep_last` complete checkpoints plus protected ones (the best); drop the rest."""
    complete = complete_checkpoints(checkpoints_dir)
    for path in complete[: max(0, len(complete) - keep_last)]:
        if int(path.name[len(STEP_DIR_PREFIX) :]) not in protected_steps:
            shutil.rmtree(path, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------
# One run's checkpoints
# ----------------------------------------------------------------------------------------------------


@dataclass
class TrainState:
    """Progress a resumed run needs besides model, optimizer, scheduler and RNG (saved in trainer_state.json)."""

    step: int = 0
    epoch: int = 0
    position: int = 0
    """Global steps of the current epoch plan already run."""
    consumed_before_plan: list[int] | None = None
    """Examples of this epoch consumed before the current plan (only after resuming with another world size)."""
    layout: list[int] = field(default_factory=list)
    """[batch_size, world_size, grad_accum, max_tokens] the plan was made with (older checkpoints: 3 values)."""
    examples_seen: int = 0
    tokens_seen: int = 0
    window_loss_per_rank: list[float] = field(default_factory=list)
    """Each rank's summed loss since the last train log line."""
    window_weight: float = 0
    """What the window's summed loss is divided by: the steps' weights (examples, or predicted tokens)."""
    nonfinite_streak: int = 0
    skipped_steps: int = 0
    last_eval_step: int = -1
    best: BestSoFar | None = None
    stopped_early: bool = False
    """Early stopping ended training at this step: a run resumed from here only finishes (export, validation,
    test), as one resumed from the schedule's last step does."""

    @classmethod
    def from_json(cls, text: str) -> TrainState:
        values = json.loads(text)
        best = values.pop("best", None)
        return cls(**values, best=BestSoFar(**best) if best else None)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    def finish_step(self, examples: int, tokens: int) -> None:
        self.step += 1
        self.position += 1
        self.examples_seen += examples
        self.tokens_seen += tokens

    def next_epoch(self) -> None:
        self.epoch, self.position, self.consumed_before_plan = self.epoch + 1, 0, None


def layout_list(layout: StepLayout) -> list[int]:
    return [layout.batch_size, layout.world_size, layout.grad_accum, layout.max_tokens]


@dataclass(frozen=True)
class ResumePoint:
    path: Path
    manifest: dict
    replaces_run: bool = False
    """The run's files in output_dir (RUN_FILES) are replaced, as a fresh start's are: overwrite=true with
    checkpoint.resume=<folder>, or a restart whose first attempt wrote files but no checkpoint of its own."""


def find_resume_point(cfg: ExperimentConfig, warn, job: str | None = None, restart: int = 0,
                      last: dict | None = None) -> ResumePoint | None:  # fmt: skip
    """Decide between a fresh start and a resume, refusing anything that would lose a user's files or mix two
    runs in one folder. Called on the main process only (`decide_resume` shares the answer).

    A restart of a job (`restart` > 0: a SLURM requeue, a torchrun restart) resumes from the newest intact
    checkpoint that job wrote, whatever overwrite and checkpoint.resume say: those apply to the job's first
    attempt, and a restart must never discard its own work. A restart with no checkpoint of its own starts as its
    first attempt did, which `last` (what the folder's lock file says the last run recorded: its job and its
    start) tells. Otherwise: the checkpoint named by checkpoint.resume, or (auto) the newest intact one in
    output_dir, or None for a fresh start into an empty (or overwritable) output_dir."""
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError([f"output_dir {out}: exists and is not a folder"])
    if restart > 0 and job is not None:
        found = find_resume_checkpoint(out / "checkpoints", warn, lambda manifest: manifest.get("job") == job)
        if found is not None:
            warn(f"restart {restart} of job {job}: resuming from its own newest checkpoint {found[0]} "
                 "(overwrite and checkpoint.resume apply to a job's first attempt only)")  # fmt: skip
            return ResumePoint(*found)
        first = (last or {}) if (last or {}).get("job") == job else {}
        if first.get("start") == "fresh":  # its own files (config.yaml, metrics.jsonl) and nothing else to keep
            warn(f"restart {restart} of job {job}: no checkpoint of its own yet; starting afresh, as its first "
                 "attempt did")  # fmt: skip
            return None
        if first.get("start"):  # its first attempt resumed from this checkpoint: again
            path = Path(first["start"])
            warn(f"restart {restart} of job {job}: no checkpoint of its own yet; resuming from {path}, as its first "
                 "attempt did")  # fmt: skip
            try:
                return ResumePoint(path, verify_checkpoint(path))
            except CheckpointError as exc:
                raise ConfigError([f"restart {restart} of job {job}: its first attempt resumed from {exc}"]) from exc
    not_empty = out.is_dir() and any(not is_bookkeeping(p) for p in out.iterdir())
    resume = cfg.checkpoint.resume
    if resume not in ("auto", "none"):
        path = Path(resume)
        try:
            manifest = verify_checkpoint(path)
        except CheckpointError as exc:
            raise ConfigError([f"checkpoint.resume: {exc}"]) from exc
        inside = path.resolve().is_relative_to((out / "checkpoints").resolve())
        if inside and cfg.overwrite:
            raise ConfigError([f"checkpoint.resume={resume} with overwrite=true: overwrite would delete that "
                               f"checkpoint with the rest of {out}; drop overwrite=true to resume this run, or "
                               "resume it into another output_dir"])  # fmt: skip
        if not_empty and not inside and not cfg.overwrite:
            raise ConfigError([f"checkpoint.resume={resume}: output_dir {out} holds another run; resuming into it "
                               "would mix the two. Choose an empty output_dir, or pass overwrite=true to replace "
                               "that run's files"])  # fmt: skip
        return ResumePoint(path, manifest, replaces_run=cfg.overwrite)
    if resume == "auto" and not cfg.overwrite:
        found = find_resume_checkpoint(out / "checkpoints", warn)
        if found is not None:
            return ResumePoint(*found)
    if not_empty and not cfg.overwrite:
        raise ConfigError(
            [f"output_dir {out}: not empty and holds no checkpoint to resume; pass overwrite=true to replace it"]
        )
    return None


def decide_resume(cfg: ExperimentConfig, accelerator: Accelerator, place: RunPlace, warn,
                  last: dict | None) -> ResumePoint | None:  # fmt: skip
    """`find_resume_point`, decided once: the main process chooses and verifies the checkpoint (reading it
    whole for its checksums) and every rank takes its answer, or its refusal, or its failure. Ranks deciding alone
    could resume from different steps after one of them met a transient read error, and each would read every
    file."""
    from accelerate.utils import broadcast_object_list

    answer: tuple[ResumePoint | None, list[str] | None, str | None] = (None, None, None)
    failure: Exception | None = None
    if place.is_main:
        try:
            answer = (find_resume_point(cfg, warn, place.job, place.restart, last), None, None)
        except ConfigError as exc:
            answer = (None, exc.problems, None)
        except Exception as exc:  # noqa: BLE001  (the other ranks must not wait for an answer that never comes)
            answer, failure = (None, None, f"rank 0 failed to decide where the run starts: {exc!r}"), exc
    if place.world_size > 1:
        [answer] = broadcast_object_list([answer])
    resume, problems, failed = answer
    if failure is not None:
        raise failure
    if failed is not None:
        raise RuntimeError(failed)
    if problems is not None:
        raise ConfigError(problems)
    return resume


def start_description(resume: ResumePoint | None) -> str:
    """How a run starts, as the lock file records it for a restart to replay: "fresh", or the checkpoint."""
    return "fresh" if resume is None else str(resume.path.resolve())


class CheckpointManager:
    """One run's checkpoints: the trainer state, when to save, keep-last, the best model's weights, resume.

    A checkpoint is due every `checkpoint.every_steps` steps, every `checkpoint.every_minutes` minutes (each
    rank's clock; the loop makes the ranks agree), at each epoch end but the last, and at a stop signal (then
    the run ends with `Preempted`). Every checkpoint carries the best model so far, so that a resumed run
    tests the same model an uninterrupted one would."""

    def __init__(self, cfg: ExperimentConfig, accelerator: Accelerator, place: RunPlace, log: RunLog,
                 stop: StopRequest, tokenizer, serving: ServingSpec | None = None, export_weights=None):  # fmt: skip
        self.cfg = cfg
        self.accelerator = accelerator
        self.place = place
        self.log = log
        self.stop = stop
        self.tokenizer = tokenizer
        self.serving = serving
        self.export_weights = export_weights
        self.out = Path(cfg.output_dir)
        self.dir = self.out / "checkpoints"
        self.best_weights: dict[str, torch.Tensor] | None = None
        self._last_save = time.monotonic()
        self.model: torch.nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None

    def track(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """The model and optimizer as prepared: under FSDP2 their sharded state is saved and loaded here (under
        DDP and DeepSpeed, Accelerate's save_state holds them)."""
        self.model, self.optimizer = model, optimizer

    # -- resume ------------------------------------------------------------------------------------------
    def restore_state(self, resume: ResumePoint, layout: StepLayout, planner: EpochPlanner) -> TrainState:
        """The checkpoint's trainer state, after checking the checkpoint fits this run; a changed batch layout
        (another world size) continues from the same sample position of the epoch."""
        path, manifest = resume.path, resume.manifest
        problems = []
        if manifest.get("model") != self.cfg.model.name_or_path:
            problems.append(f"model.name_or_path: the checkpoint {path} trained {manifest.get('model')!r}, "
                            f"this run asks for {self.cfg.model.name_or_path!r}")  # fmt: skip
        stage = self.place.zero_stage
        saved = manifest.get("sharding") or (f"zero{manifest['zero_stage']}" if manifest.get("zero_stage") else "ddp")
        if saved != self.place.sharding:
            problems.append(f"sharding: the checkpoint {path} was saved under {saved}, this run uses "
                            f"{self.place.sharding}; resume it with the same launch config")  # fmt: skip
        elif manifest.get("world_size") != layout.world_size and stage:
            problems.append(f"world size: the checkpoint {path} holds ZeRO state sharded over "
                            f"{manifest.get('world_size')} ranks; resume it with that many processes")  # fmt: skip
        if problems:
            raise ConfigError(problems, "resume")
        state = TrainState.from_json((path / TRAINER_STATE).read_text())
        old = StepLayout(*state.layout)
        if old != layout:
            # Continue from the same global sample position: what the old plan consumed this epoch is excluded.
            old_plan = planner.with_layout(old).plan(state.epoch, state.consumed_before_plan)
            consumed = list(state.consumed_before_plan or []) + [
                i for step in old_plan[: state.position] for mb in step for i in mb
            ]
            self.log.info(f"resuming with batch/world/accum {layout.batch_size}/{layout.world_size}/"
                          f"{layout.grad_accum} (was {old.batch_size}/{old.world_size}/{old.grad_accum}): "
                          f"continuing epoch {state.epoch} after its first {len(consumed)} examples")  # fmt: skip
            state.consumed_before_plan, state.position = consumed, 0
            state.layout = layout_list(layout)
            state.window_loss_per_rank = [sum(state.window_loss_per_rank)] + [0.0] * (layout.world_size - 1)
        self.log.info(f"resuming from {path} (step {state.step}, epoch {state.epoch}, position {state.position})")
        return state

    def load(self, resume: ResumePoint) -> None:
        """Model, optimizer, scheduler, scaler and every RNG from the checkpoint (after `prepare`), and the best
        model's weights."""
        self.accelerator.load_state(str(resume.path / "state"))
        if self.place.fsdp is not None:  # resharded onto this run's ranks, whatever their number
            load_sharded(self.model, self.optimizer, resume.path / SHARDED_STATE)
        if (resume.path / BEST_IN_CHECKPOINT).is_file():
            self.best_weights = load_file(str(resume.path / BEST_IN_CHECKPOINT))

    # -- saving ------------------------------------------------------------------------------------------
    def time_due(self) -> bool:
        """Whether checkpoint.every_minutes has passed on this rank's clock since the last save."""
        minutes = self.cfg.checkpoint.every_minutes
        return minutes > 0 and time.monotonic() - self._last_save >= minutes * 60

    def after_step(self, state: TrainState, window: LossWindow, end_of_epoch: bool, last_step: bool, stop_now: bool,
                   time_due: bool) -> None:  # fmt: skip
        """Save if a checkpoint is due after this step; at a stop signal, save and raise `Preempted`. The last
        step (of the schedule, or where early stopping ends training) always saves: whatever stops the finish
        (a signal, a time limit, a crash), the run resumes into the finish alone."""
        c = self.cfg.checkpoint
        if stop_now:
            self.preempt(state, self.save(state, window, f"signal {self.stop.signal_name}"))
        periodic = (c.every_steps > 0 and state.step % c.every_steps == 0) or time_due
        if periodic or last_step or (end_of_epoch and c.at_epoch_end):
            reason = "last step" if last_step else "epoch end" if end_of_epoch and c.at_epoch_end else "periodic"
            path = self.save(state, window, reason)
            if self.stop.agreed(self.accelerator):  # signalled while writing: the write finished, now stop
                self.preempt(state, path)

    def preempt(self, state: TrainState, path: Path | None) -> None:
        """Stop after the checkpoint at `path` (None: after the one the finish resumes from, or none at all):
        log how long it took since the signal, write the "preempted" status, and raise `Preempted` on every
        rank once the status is on disk. Collective: a launcher kills the remaining ranks as soon as one has
        exited, so rank 0 must not be the last to write."""
        seconds = time.monotonic() - self.stop.requested_at
        self.log.stop_progress()
        where = f"checkpoint {path} written" if path is not None else "stopped"
        self.log.info(f"{self.stop.signal_name}: {where} {seconds:.1f} s after the signal; "
                      f"exiting with code {EXIT_REQUEUE} (run the same command to resume)")  # fmt: skip
        self.log.record("preempted", step=state.step, signal=self.stop.signal_name, stopped_in=self.stop.phase,
                        seconds_to_checkpoint=round(seconds, 3))  # fmt: skip
        if self.place.is_main:
            if path is None and state.step == 0:  # an evaluate-only run: nothing to resume, so it starts afresh
                remove_run_files(self.out, keep=(EXIT_STATUS_FILE,))
            pause("status")  # fault injection for tests: the other ranks must still be waiting here
            write_exit_status(self.out, "preempted", EXIT_REQUEUE)
        self.accelerator.wait_for_everyone()
        raise Preempted(str(path))

    def stop_if_signalled(self, state: TrainState) -> None:
        """During the finish: stop (`preempt`) if any rank has been signalled (collective). The last step's
        checkpoint holds everything; the requeued run redoes the finish."""
        if self.stop.agreed(self.accelerator):
            self.preempt(state, None)

    def save(self, state: TrainState, window: LossWindow, reason: str) -> Path:
        """A complete checkpoint of this step (collective: every rank calls it)."""
        state.window_loss_per_rank, state.window_weight = window.per_rank(), window.weight
        manifest = {"epoch": state.epoch, "position": state.position, "world_size": self.place.world_size,
                    "reason": reason, "config_fingerprint": self.cfg.fingerprint(), "model": self.cfg.model.name_or_path,
                    "zero_stage": self.place.zero_stage, "sharding": self.place.sharding, "job": self.place.job}  # fmt: skip
        extra = {BEST_IN_CHECKPOINT: self.best_weights} if self.best_weights is not None else None
        sharded = None
        if self.place.fsdp is not None:
            sharded = partial(save_sharded, self.model, self.optimizer)
        path = save_checkpoint(self.accelerator, self.dir, state.step, state.to_json(), manifest, extra, sharded)
        if self.place.is_main:
            best_step = state.best.step if state.best else -1
            prune_checkpoints(self.dir, self.cfg.checkpoint.keep_last, protected_steps={best_step})
        self.log.record("checkpoint", step=state.step, path=str(path), reason=reason)
        self._last_save = time.monotonic()
        return path

    # -- exports and the best model ---------------------------------------------------------------------
    def keep_best(self, model: torch.nn.Module) -> None:
        """Remember the model's current weights as the best and export them to best/ (collective)."""
        self.best_weights = state_dict_copy(self.accelerator, model, self.place)
        self.export(model, self.best_weights, "best")

    def export_final(self, model: torch.nn.Module) -> None:
        """The model as it is now to final/ (collective)."""
        self.export(model, state_dict_copy(self.accelerator, model, self.place), "final")

    def export(self, model: torch.nn.Module, weights: dict[str, torch.Tensor], name: str) -> None:
        dtype = EXPORT_DTYPES[self.cfg.checkpoint.export_dtype]
        if self.export_weights is not None and weights:  # the task's view of its weights (regression: the head in
            # units); under FSDP2 only rank 0 holds them, and only rank 0 writes
            weights = self.export_weights(weights)
        export_model(
            self.accelerator, model, self.tokenizer, cast_floats(weights, dtype), self.out / name, self.serving
        )

    def restore_best(self, model: torch.nn.Module) -> None:
        """Put the best weights back into the model (collective)."""
        load_weights(self.accelerator, model, self.best_weights, self.place)
