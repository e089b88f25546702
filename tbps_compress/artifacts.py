"""Artifact folders: the contract between stages.

An artifact folder holds ``model_config.json`` and ``weights.safetensors`` (torch stages) or ``*.onnx`` files
(export and quantise stages), ``recipe.resolved.yaml``, ``metrics.json`` and ``lineage.json``. ``lineage.json``
records the stage, the parent artifact (path and content hash), the package version, the git commit and the
SHA-256 of every file, so a file changed after writing is detected on load.

Folders are written into a hidden temporary sibling and renamed into place when complete: a crash never leaves a
half artifact that looks whole. Existing folders are only replaced with ``force=True``; the folder gets the
permissions the user's umask gives (not the temporary folder's 0700). The mechanism, shared with every other
output, is :mod:`tbps_compress.io_utils`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import __version__
from .errors import ArtifactError
from .io_utils import WRITE_ERRNOS, atomic_folder, check_output_folder

__all__ = ["LINEAGE", "METRICS", "MODEL_CONFIG", "RECIPE", "WEIGHTS", "WRITE_ERRNOS", "Artifact", "check_output_dir",
           "content_hash", "open_artifact", "read_lineage", "sha256_file", "verify_artifact", "write_artifact",
           "write_json"]

log = logging.getLogger(__name__)

LINEAGE = "lineage.json"
MODEL_CONFIG = "model_config.json"
WEIGHTS = "weights.safetensors"
METRICS = "metrics.json"
RECIPE = "recipe.resolved.yaml"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True, text=True,
            timeout=5, check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def content_hash(files: dict[str, str]) -> str:
    """One hash over a folder's file hashes (names sorted)."""
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(f"{name}\0{files[name]}\n".encode())
    return h.hexdigest()


def _hash_tree(root: Path) -> dict[str, str]:
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.name != LINEAGE:
            out[path.relative_to(root).as_posix()] = sha256_file(path)
    return out


def check_output_dir(out: Path, force: bool) -> None:
    """Refuse, before any work, an artifact folder that cannot or must not be written: an existing non-empty folder
    unless ``force``, anything but a folder (even with ``force``), a location that is not a writable folder. See
    :func:`tbps_compress.io_utils.check_output_folder`."""
    check_output_folder(Path(out), force=force, flag="--out")


@contextlib.contextmanager
def write_artifact(
    out: Path, *, stage: str, parent: Path | None = None, force: bool = False, extra_lineage: dict | None = None
) -> Iterator[Path]:
    """Context manager yielding a temporary folder to fill; on success it gets ``lineage.json`` and the modes the
    umask gives, and is renamed to ``out`` (replacing an existing folder only with ``force``). On error the
    temporary folder is removed and ``out`` is left as it was (:func:`tbps_compress.io_utils.atomic_folder`)."""
    out = Path(out)
    with atomic_folder(out, force=force, flag="--out") as tmp:
        yield tmp
        files = _hash_tree(tmp)
        lineage: dict[str, Any] = {
            "stage": stage,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "package_version": __version__,
            "git_commit": _git_commit(),
            "parent": None,
            "files": files,
            "content_hash": content_hash(files),
        }
        if parent is not None:
            parent_lineage = read_lineage(Path(parent))
            lineage["parent"] = {
                "path": str(Path(parent).resolve()),
                "stage": parent_lineage.get("stage"),
                "content_hash": parent_lineage.get("content_hash"),
            }
        if extra_lineage:
            lineage.update(extra_lineage)
        (tmp / LINEAGE).write_text(json.dumps(lineage, indent=2) + "\n", encoding="utf-8")


def read_lineage(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_dir():
        raise ArtifactError(f"{path}: not an artifact folder (it does not exist or is not a directory)")
    lin = path / LINEAGE
    if not lin.is_file():
        raise ArtifactError(
            f"{lin}: missing; this folder is not a complete artifact (an interrupted stage?); re-run the stage"
        )
    try:
        data = json.loads(lin.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{lin}: corrupt lineage file ({exc}); re-run the stage that wrote it") from exc
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        raise ArtifactError(f"{lin}: corrupt lineage file (no 'files' table); re-run the stage that wrote it")
    return data


def verify_artifact(path: Path) -> dict[str, Any]:
    """Check every file against the hashes in ``lineage.json``; return the lineage."""
    path = Path(path)
    lineage = read_lineage(path)
    for name, digest in lineage["files"].items():
        f = path / name
        if not f.is_file():
            raise ArtifactError(f"{f}: listed in {LINEAGE} but missing; the artifact is incomplete, re-run its stage")
        if sha256_file(f) != digest:
            raise ArtifactError(
                f"{f}: content does not match the hash in {LINEAGE} (changed or corrupted after writing); "
                "re-run the stage or restore the file"
            )
    return lineage


@dataclass
class Artifact:
    """A verified artifact folder."""

    path: Path
    lineage: dict[str, Any]
    model_config: dict[str, Any] | None = None
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def stage(self) -> str:
        return str(self.lineage.get("stage"))

    @property
    def kind(self) -> str:
        """'torch' (weights.safetensors) or 'onnx' (image/text encoders)."""
        return "onnx" if (self.path / "image_encoder.onnx").exists() else "torch"

    def read_json(self, name: str) -> Any:
        f = self.path / name
        try:
            return json.loads(f.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ArtifactError(f"{f}: missing from the artifact; re-run the stage that wrote it") from exc
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ArtifactError(f"{f}: not valid JSON ({exc}); re-run the stage that wrote it") from exc


def open_artifact(path: Path, *, verify: bool = True) -> Artifact:
    """Open (and by default hash-verify) an artifact folder."""
    path = Path(path)
    lineage = verify_artifact(path) if verify else read_lineage(path)
    art = Artifact(path=path, lineage=lineage)
    if (path / MODEL_CONFIG).exists():
        art.model_config = art.read_json(MODEL_CONFIG)
    if (path / METRICS).exists():
        art.metrics = art.read_json(METRICS)
    return art


def write_json(path: Path, data: Any) -> None:
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
