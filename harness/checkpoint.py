"""Model weights (consolidated copies, also under ZeRO-3; reloading; Hugging Face export of `best/` and
`final/`) and resumable checkpoints. Everything on disk is written atomically: a temporary folder, then a
rename; a checkpoint counts only once its manifest, written last, is in place."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import save_file

from harness.distributed import zero_stage


def state_dict_copy(accelerator: Accelerator, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of the full model weights on every rank, consolidated where ZeRO-3 shards them.

    Called on every rank: under ZeRO-3, gathering the weights is a collective operation.
    """
    module = accelerator.unwrap_model(model)
    if zero_stage(accelerator) == 3:
        import deepspeed

        # Gather the partitions (read-only), copy, and let them be re-partitioned on exit.
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            return {name: t.detach().to("cpu", copy=True) for name, t in module.state_dict().items()}
    return {name: t.detach().to("cpu", copy=True) for name, t in module.state_dict().items()}


def load_weights(accelerator: Accelerator, model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Put full weights (from `state_dict_copy`) back into the model on every rank, sharded or not."""
    module = accelerator.unwrap_model(model)
    if zero_stage(accelerator) == 3:
        import deepspeed

        # Rank 0 writes the gathered parameters; on exit DeepSpeed re-partitions them from rank 0.
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=0):
            if accelerator.is_main_process:
                module.load_state_dict(state)
        return
    module.load_state_dict(state)


def export_model(
    accelerator: Accelerator, model: torch.nn.Module, tokenizer, state: dict[str, torch.Tensor], path: Path
) -> None:
    """Write `state` as a Hugging Face model folder at `path`, replacing it only once complete."""
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
        )
        tokenizer.save_pretrained(tmp)
        old = path.with_name(path.name + ".old")
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


# ----------------------------------------------------------------------------------------------------
# Resumable checkpoints: <output_dir>/checkpoints/step-0000120/{state/, trainer_state.json, manifest.json}
# ----------------------------------------------------------------------------------------------------

MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"
STEP_DIR_PREFIX = "step-"


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
    trainer_state: dict,
    manifest_info: dict,
    extra_weights: dict[str, dict[str, torch.Tensor]] | None = None,
) -> Path:
    """Write a complete checkpoint atomically; called on every rank (each saves its own state files).

    Files go to a temporary folder, are flushed, the manifest (with checksums) is written last, then the
    folder is renamed into place: a crash at any point leaves either no new checkpoint or a complete one.
    On an OSError (disk full, unwritable folder) the temporary folder is removed and the error names where.
    `extra_weights` (file name -> state dict) are written by the main process, e.g. the best model so far.
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
        if accelerator.is_main_process:
            (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=1))
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


def find_resume_checkpoint(checkpoints_dir: Path, warn) -> tuple[Path, dict] | None:
    """The newest intact checkpoint; broken or incomplete ones are skipped with a warning naming them."""
    candidates = (
        [p for p in checkpoints_dir.iterdir() if p.name.startswith(STEP_DIR_PREFIX)] if checkpoints_dir.is_dir() else []
    )
    for path in sorted(candidates, key=lambda p: p.name, reverse=True):
        try:
            return path, verify_checkpoint(path)
        except CheckpointError as exc:
            warn(f"skipping checkpoint: {exc}")
    return None


def prune_checkpoints(checkpoints_dir: Path, keep_last: int, protected_steps: set[int]) -> None:
    """Keep the newest `keep_last` complete checkpoints plus protected ones (the best); drop the rest."""
    complete = complete_checkpoints(checkpoints_dir)
    for path in complete[: max(0, len(complete) - keep_last)]:
        if int(path.name[len(STEP_DIR_PREFIX) :]) not in protected_steps:
            shutil.rmtree(path, ignore_errors=True)
