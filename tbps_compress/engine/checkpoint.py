"""Training checkpoints: the folder rules of a run, atomic writes with a digest, verified weights-only reads.

A run writing the artifact ``<out>`` keeps its checkpoint in ``<out>.ckpt/last.ckpt`` (``torch.save`` of plain
data and tensors: model, loss heads, optimiser, scaler, RNG states, the loop position, the best weights so far, the
model config and a hash of the recipe). Next to it, ``last.ckpt.sha256`` holds the checkpoint's SHA-256 (the
current and the previous one, see :func:`write_checkpoint`). Reading (:func:`read_checkpoint`) checks the digest
first and loads with ``torch.load(weights_only=True)``: a file carrying pickled objects other than tensors and
plain data is refused, never run.

:class:`TrainState` is the loop position stored in a checkpoint; :func:`rng_state` / :func:`set_rng_state` capture
and restore the random streams (also used by the trainer to replay dropout in gradient-cached steps).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, UserError

log = logging.getLogger(__name__)

CKPT_NAME = "last.ckpt"
DIGEST_SUFFIX = ".sha256"  # last.ckpt.sha256: the checkpoint's SHA-256 (current and previous)
REQUIRED_KEYS = frozenset({"model", "heads", "optimizer", "scaler", "rng", "state"})


@dataclass
class TrainState:
    """Where the training loop is: epoch, step inside it, steps so far, best validation metrics, seconds."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    best: dict[str, Any] = field(default_factory=dict)
    elapsed_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
                "best": self.best, "elapsed_s": self.elapsed_s}

    @classmethod
    def from_dict(cls, s: dict[str, Any]) -> TrainState:
        return cls(epoch=s["epoch"], step_in_epoch=s["step_in_epoch"], global_step=s["global_step"],
                   best=s["best"], elapsed_s=s.get("elapsed_s", 0.0))


# ------------------------------------------------------------------------------------------------- random state
def rng_state(device: torch.device) -> dict[str, Any]:
    """The torch and Python random states (and the CUDA one on a CUDA device)."""
    st = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        st["cuda"] = torch.cuda.get_rng_state(device)
    return st


def set_rng_state(st: dict[str, Any], device: torch.device) -> None:
    """Restore what :func:`rng_state` captured (the Python state may come back from a checkpoint as lists)."""
    torch.set_rng_state(st["torch"])
    random.setstate(_as_tuple(st["python"]))
    if device.type == "cuda" and "cuda" in st:
        torch.cuda.set_rng_state(st["cuda"], device)


def _as_tuple(x: Any) -> Any:
    return tuple(_as_tuple(v) for v in x) if isinstance(x, list | tuple) else x


# ------------------------------------------------------------------------------------------------- folders
def recipe_hash(recipe: Any) -> str:
    """A short hash of a recipe without its output path (a changed recipe is reported on resume)."""
    data = recipe.model_dump(mode="json")
    data.pop("output", None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def work_dir(out: Path) -> Path:
    """The checkpoint folder of a run writing the artifact ``out``: ``<out>.ckpt`` next to it."""
    return out.parent / f"{out.name}.ckpt"


def check_run_folders(out: Path, work: Path, *, resume: bool, force: bool) -> None:
    """Refuse, before any work, a run that would overwrite an artifact or an earlier run's checkpoint, and a resume
    with nothing to resume (a finished run, or no checkpoint)."""
    from ..artifacts import check_output_dir

    if not resume:
        check_output_dir(out, force)
        if (work / CKPT_NAME).exists() and not force:
            raise UserError(f"{work}: a checkpoint of an earlier run exists; pass --resume to continue it "
                            "or --force to start over")
    elif out.exists() and (out / "lineage.json").exists() and not force:
        raise UserError(f"{out}: this run already finished; nothing to resume (use --force to retrain)")
    elif not (work / CKPT_NAME).exists():  # say so before loading data and building the model
        raise UserError(f"{work / CKPT_NAME}: no checkpoint to resume from; start without --resume")


# ------------------------------------------------------------------------------------------------- write / read
def write_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` atomically (temporary file, then rename) with its SHA-256 in ``path.sha256``.

    The digest file is replaced first and accepts the new and the previous digest, so a kill between the two
    renames leaves a consistent pair; a checkpoint changed after writing is refused by :func:`read_checkpoint`.
    A failed write (full disk, read-only folder) removes the temporaries, keeps the previous checkpoint and raises
    a one-line :class:`UserError`."""
    tmp = path.with_name(path.name + ".tmp")
    digest_path = path.with_name(path.name + DIGEST_SUFFIX)
    digest_tmp = digest_path.with_name(digest_path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:  # a file object: a full disk raises OSError (a path gives a RuntimeError)
            hashing = HashingWriter(f)
            torch.save(payload, hashing)
        previous = accepted_digests(digest_path)[:1]
        digest_tmp.write_text(json.dumps({"sha256": [hashing.hexdigest(), *previous]}) + "\n")
        os.replace(digest_tmp, digest_path)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:
        tmp.unlink(missing_ok=True)
        digest_tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.strerror:
            reason = exc.strerror
        else:  # torch's zip writer reports a short write (a full disk) as a RuntimeError
            reason = f"the write failed, is the disk full? {' '.join(str(exc).split())}"
        raise UserError(f"{path}: cannot write checkpoint ({reason}); the previous checkpoint "
                        "is kept; free space or fix permissions, then --resume") from exc


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The training checkpoint at ``path``, after checking it against its digest file; refused
    (:class:`CheckpointError`) when changed after writing, unreadable, carrying pickled code or not a checkpoint of
    this tool."""
    from ..artifacts import sha256_file

    if not path.exists():
        raise UserError(f"{path}: no checkpoint to resume from; start without --resume")
    digest_path = path.with_name(path.name + DIGEST_SUFFIX)
    accepted = accepted_digests(digest_path)
    if not accepted:
        log.warning("%s: no readable %s; the checkpoint's integrity is not checked", path, digest_path.name)
    elif sha256_file(path) not in accepted:
        raise CheckpointError(f"{path}: content does not match the hash in {digest_path.name} (changed or "
                              "corrupted after writing); restore it or start over with --force")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        from ..models.io import unpickling_reason

        raise CheckpointError(f"{path}: refused: the file holds pickled objects other than tensors and plain "
                              f"data (possibly code: {unpickling_reason(exc)}); start over with --force") from exc
    except Exception as exc:  # noqa: BLE001 - any unreadable checkpoint is a user-facing error
        raise CheckpointError(f"{path}: unreadable checkpoint ({str(exc).splitlines()[0]}); "
                              "start over with --force") from exc
    if not isinstance(ck, dict) or not REQUIRED_KEYS <= set(ck):
        raise CheckpointError(f"{path}: not a training checkpoint of this tool (keys missing); "
                              "start over with --force")
    return ck


def check_checkpoint_fits(ck: dict[str, Any], path: Path, *, model_config: str, recipe_digest: str,
                          model_name: str) -> None:
    """Refuse a checkpoint written for another architecture (``model_config``: the JSON of this run's config);
    warn when the recipe changed since it was written."""
    if ck.get("model_config") != model_config:
        raise CheckpointError(f"{path}: checkpoint is for another architecture than model "
                              f"'{model_name}'; use the recipe it was written with or --force")
    if ck.get("recipe_hash") != recipe_digest:
        log.warning("%s: the recipe changed since this checkpoint was written; resuming anyway", path)


class HashingWriter:
    """A write-only file wrapper that hashes what passes through (for ``torch.save``)."""

    def __init__(self, f) -> None:
        self._f = f
        self._h = hashlib.sha256()

    def write(self, data) -> int:
        self._h.update(data)
        return self._f.write(data)

    def flush(self) -> None:
        self._f.flush()

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def accepted_digests(path: Path) -> list[str]:
    """Digests a checkpoint may have (newest first) from its ``.sha256`` file; empty when missing or unreadable."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    digests = data.get("sha256") if isinstance(data, dict) else None
    return [d for d in digests if isinstance(d, str)] if isinstance(digests, list) else []
