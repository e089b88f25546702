"""Artifact folders: atomic writes, refusal to overwrite, lineage hashes, tamper detection."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tbps_compress.artifacts import (
    LINEAGE,
    METRICS,
    MODEL_CONFIG,
    WEIGHTS,
    content_hash,
    open_artifact,
    sha256_file,
    write_artifact,
    write_json,
)
from tbps_compress.errors import ArtifactError, UserError
from tbps_compress.models.factory import build_model
from tbps_compress.models.io import load_model, save_model


@pytest.fixture(scope="module")
def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("test-tiny").eval()


def _write(out: Path, model: torch.nn.Module, **kwargs) -> Path:
    with write_artifact(out, stage="train", **kwargs) as tmp:
        save_model(model, tmp)
        write_json(tmp / METRICS, {"test": {"R1": 12.5}})
        (tmp / "sub").mkdir()
        (tmp / "sub" / "note.txt").write_text("nested files are hashed too\n")
    return out


def _leftovers(parent: Path, name: str) -> list[Path]:
    return [p for p in parent.iterdir() if p.name.startswith(f".{name}.")]


def test_lineage_records_every_file_hash(tmp_path: Path, tiny_model: torch.nn.Module) -> None:
    out = _write(tmp_path / "a0", tiny_model)
    lineage = json.loads((out / LINEAGE).read_text())
    assert lineage["stage"] == "train" and lineage["parent"] is None and lineage["package_version"]
    files = lineage["files"]
    assert set(files) == {MODEL_CONFIG, WEIGHTS, METRICS, "sub/note.txt"}
    for name, digest in files.items():
        assert sha256_file(out / name) == digest
    assert lineage["content_hash"] == content_hash(files)
    art = open_artifact(out)
    assert art.stage == "train" and art.kind == "torch"
    assert art.metrics == {"test": {"R1": 12.5}}
    assert art.model_config == tiny_model.tbps_config
    assert _leftovers(tmp_path, "a0") == []


def test_child_lineage_points_at_parent(tmp_path: Path, tiny_model: torch.nn.Module) -> None:
    parent = _write(tmp_path / "a0", tiny_model)
    child = _write(tmp_path / "a1", tiny_model, parent=parent)
    lin = open_artifact(child).lineage["parent"]
    assert lin["path"] == str(parent.resolve())
    assert lin["stage"] == "train"
    assert lin["content_hash"] == open_artifact(parent).lineage["content_hash"]


def test_exception_inside_leaves_nothing(tmp_path: Path, tiny_model: torch.nn.Module) -> None:
    out = tmp_path / "half"
    with pytest.raises(RuntimeError, match="boom"):
        with write_artifact(out, stage="train") as tmp:
            save_model(tiny_model, tmp)
            raise RuntimeError("boom")
    assert not out.exists()
    assert _leftovers(tmp_path, "half") == []


def test_keyboard_interrupt_inside_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "half"
    with pytest.raises(KeyboardInterrupt):
        with write_artifact(out, stage="train") as tmp:
            (tmp / "x").write_text("partial")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_failed_force_rewrite_keeps_the_old_artifact(tmp_path: Path, tiny_model: torch.nn.Module) -> None:
    out = _write(tmp_path / "a0", tiny_model)
    before = (out / LINEAGE).read_bytes()
    with pytest.raises(RuntimeError):
        with write_artifact(out, stage="train", force=True):
            raise RuntimeError("crash while rewriting")
    assert (out / LINEAGE).read_bytes() == before
    open_artifact(out)


def test_existing_output_needs_force(tmp_path: Path, tiny_model: torch.nn.Module) -> None:
    out = _write(tmp_path / "a0", tiny_model)
    old_hash = open_artifact(out).lineage["content_hash"]
    with pytest.raises(UserError, match="--force"):
        with write_artifact(out, stage="train"):
            pytest.fail("the body must not run when the output exists")
    assert open_artifact(out).lineage["content_hash"] == old_hash
    torch.manual_seed(1)
    other = build_model("test-tiny")
    _write(out, other, force=True)
    assert open_artifact(out).lineage["content_hash"] != old_hash
    assert _leftovers(tmp_path, "a0") == []
    # an existing EMPTY folder is fine without force (e.g. made by a job scheduler)
    empty = tmp_path / "empty"
    empty.mkdir()
    _write(empty, other)
    open_artifact(empty)


def test_a_changed_byte_is_detected(tmp_path: Path, tiny_model: torch.nn.Module) -> None:
    out = _write(tmp_path / "a0", tiny_model)
    weights = out / WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError) as exc:
        open_artifact(out)
    assert WEIGHTS in str(exc.value) and "hash" in str(exc.value)
    with pytest.raises(ArtifactError):
        load_model(out)


def test_missing_listed_file_is_detected(tmp_path: Path, tiny_model: torch.nn.Module) -> None:
    out = _write(tmp_path / "a0", tiny_model)
    (out / "sub" / "note.txt").unlink()
    with pytest.raises(ArtifactError, match="note.txt"):
        open_artifact(out)


def test_missing_or_corrupt_lineage(tmp_path: Path, tiny_model: torch.nn.Module) -> None:
    out = _write(tmp_path / "a0", tiny_model)
    (out / LINEAGE).unlink()
    with pytest.raises(ArtifactError, match=LINEAGE):
        open_artifact(out)
    (out / LINEAGE).write_text("{not json")
    with pytest.raises(ArtifactError, match="corrupt"):
        open_artifact(out)
    with pytest.raises(ArtifactError, match="not an artifact folder"):
        open_artifact(tmp_path / "does-not-exist")


def test_load_model_round_trip(tmp_path: Path, tiny_model: torch.nn.Module) -> None:
    out = _write(tmp_path / "a0", tiny_model)
    loaded = load_model(out).eval()
    for (k, v), (k2, v2) in zip(tiny_model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2)
