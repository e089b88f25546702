"""Artifact folders: atomic writes, refusal to overwrite, lineage hashes, tamper detection."""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

import pytest
import torch

from tbps_compress.artifacts import (
    LINEAGE,
    METRICS,
    MODEL_CONFIG,
    WEIGHTS,
    check_output_dir,
    content_hash,
    open_artifact,
    sha256_file,
    write_artifact,
    write_json,
)
from tbps_compress.errors import ArtifactError, UserError
from tbps_compress.models.factory import build_model
from tbps_compress.models.io import load_model, save_model
from tbps_compress.models.meta import meta_of


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
    assert art.model_config == meta_of(tiny_model).config
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


# ------------------------------------------------------------------------------------------------ the shared writer
@pytest.fixture
def umask_022():
    """Run with umask 022 (restored after): what most systems give their users."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def _modes(root: Path) -> dict[str, int]:
    return {p.relative_to(root).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")]}


def test_artifact_folder_gets_the_umask_modes_not_the_temporary_ones(tmp_path: Path, tiny_model: torch.nn.Module,
                                                                     umask_022) -> None:
    """``tempfile`` makes 0700 folders and 0600 files; the renamed artifact has what the umask gives (022: 0755 for
    folders, 0644 for files), nested ones and lineage.json included."""
    out = _write(tmp_path / "a0", tiny_model)
    modes = _modes(out)
    assert modes.pop(".") == 0o755 and modes.pop("sub") == 0o755
    assert set(modes) == {MODEL_CONFIG, WEIGHTS, METRICS, LINEAGE, "sub/note.txt"}
    assert set(modes.values()) == {0o644}, modes
    os.umask(0o077)  # a stricter umask is followed as well
    strict = _modes(_write(tmp_path / "a1", tiny_model))
    assert strict.pop(".") == 0o700 and strict.pop("sub") == 0o700 and set(strict.values()) == {0o600}


def test_a_file_in_the_way_is_never_replaced_even_with_force(tmp_path: Path) -> None:
    out = tmp_path / "a0"
    out.write_text("my notes\n")
    with pytest.raises(UserError) as info:
        with write_artifact(out, stage="train", force=True):
            pytest.fail("the body must not run")
    assert str(info.value) == (f"{out}: exists and is not a folder; choose another --out (it is not replaced, even "
                               "with --force)")
    assert out.read_text() == "my notes\n" and _leftovers(tmp_path, "a0") == []


def test_location_checked_before_the_body_and_made_folders_removed_on_failure(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UserError) as info:
        check_output_dir(tmp_path / "afile" / "a0", force=False)
    assert str(info.value) == (f"{tmp_path / 'afile' / 'a0'}: cannot be created: {tmp_path / 'afile'} is not a "
                               "folder; choose another --out")
    out = tmp_path / "new" / "deeper" / "a0"
    with pytest.raises(RuntimeError, match="boom"):
        with write_artifact(out, stage="train") as tmp:
            assert tmp.parent == out.parent and tmp.name.startswith(".a0.tmp-")
            raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"], "the folders made for it are removed"


def test_full_disk_at_the_rename_keeps_the_previous_artifact(tmp_path: Path, tiny_model: torch.nn.Module,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    out = _write(tmp_path / "a0", tiny_model)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    real_replace = os.replace

    def replace(src, dst):  # noqa: ANN001, ANN202 - the rename of the complete temporary onto a0 fails
        if Path(dst) == out and Path(src).name.startswith(".a0.tmp-"):
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(UserError) as info:
        _write(out, tiny_model, force=True)
    monkeypatch.undo()
    assert str(info.value) == (f"{out}: not written (No space left on device); the previous folder is unchanged; "
                               "free space or choose a writable --out")
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    open_artifact(out)
    assert _leftovers(tmp_path, "a0") == []
