"""Security: no code runs from a checkpoint (``import`` and ``train --resume`` refuse pickle payloads, and the
payload provably did not run), dataset paths cannot leave the dataset root, recipes are parsed with safe YAML, and
the package holds no ``eval``/``exec``/unsafe ``torch.load``/``yaml.load``/``pickle.load``."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

PACKAGE = Path(__file__).resolve().parents[1] / "tbps_compress"


class _Payload:
    """Unpickling this calls ``Path.touch(marker)``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _one_line_error(code: int, out: str, err: str, *needles: str) -> str:
    assert code == 2, (code, out[-1000:], err[-1000:])
    assert "Traceback" not in err and "Traceback" not in out
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def _poisoned(path: Path, marker: Path, payload: dict[str, Any] | None = None) -> Path:
    torch.save({**(payload or {}), "x": _Payload(marker)}, path)
    return path


def test_the_payload_would_run_if_unpickled(tmp_path: Path) -> None:
    """The guard for the tests below: an unsafe load really runs it."""
    marker = tmp_path / "ran"
    torch.load(_poisoned(tmp_path / "p.pt", marker), weights_only=False)  # the unsafe load, on purpose
    assert marker.exists()


# ------------------------------------------------------------------------------------------------ checkpoints
@pytest.mark.parametrize("name", ["ViT-B-16.pt", "open_clip_model.bin", "weights.pth"])
def test_import_refuses_a_pickle_payload(name: str, tmp_path: Path, run_cli) -> None:
    marker = tmp_path / "PWNED"
    ck = _poisoned(tmp_path / name, marker, {"state_dict": {"w": torch.zeros(1)}})
    code, out, err = run_cli(["import", ck, "--config", "test-tiny", "--out", tmp_path / "a"])
    _one_line_error(code, out, err, str(ck), "refused")
    assert not marker.exists(), "the payload ran"
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


@pytest.mark.parametrize("digest", ["none", "forged"])
def test_resume_refuses_a_poisoned_checkpoint(digest: str, train_recipe_data, tmp_path: Path, run_cli) -> None:
    """A ``last.ckpt`` carrying a payload is refused by ``train --resume``, also when whoever planted it wrote a
    matching ``last.ckpt.sha256`` (the digest proves integrity, not safety: loading stays weights-only)."""
    from tbps_compress.artifacts import sha256_file

    marker = tmp_path / "PWNED"
    work = tmp_path / "run.ckpt"
    work.mkdir()
    ck = _poisoned(work / "last.ckpt", marker, {"model": {}, "state": {"epoch": 0}})
    if digest == "forged":
        (work / "last.ckpt.sha256").write_text(json.dumps({"sha256": [sha256_file(ck)]}))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(train_recipe_data(tmp_path / "run")))
    code, out, err = run_cli(["train", recipe, "--resume"])
    _one_line_error(code, out, err, str(ck), "refused")
    assert not marker.exists(), "the payload ran"
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------------ dataset paths
def _dataset_with(tmp_path: Path, tiny_dataset: Path, change) -> Path:
    ds = tmp_path / "ds"
    shutil.copytree(tiny_dataset, ds)
    entries = json.loads((ds / "reid_raw.json").read_text())
    change(ds, entries)
    (ds / "reid_raw.json").write_text(json.dumps(entries))
    return ds


def _outside(tmp_path: Path, ds: Path, entries: list[dict[str, Any]]) -> Path:
    """A real image outside the dataset root."""
    target = tmp_path / "outside" / "secret.jpg"
    target.parent.mkdir(exist_ok=True)
    shutil.copyfile(ds / "imgs" / entries[0]["file_path"], target)
    return target


def _dotdot(tmp_path: Path):
    def change(ds: Path, entries: list[dict[str, Any]]) -> None:
        _outside(tmp_path, ds, entries)
        entries[0]["file_path"] = "../../outside/secret.jpg"  # from ds/imgs to the target

    return change


def _absolute(tmp_path: Path):
    def change(ds: Path, entries: list[dict[str, Any]]) -> None:
        entries[0]["file_path"] = str(_outside(tmp_path, ds, entries))

    return change


def _file_symlink(tmp_path: Path):
    def change(ds: Path, entries: list[dict[str, Any]]) -> None:
        target = _outside(tmp_path, ds, entries)
        img = ds / "imgs" / entries[0]["file_path"]
        img.unlink()
        img.symlink_to(target)

    return change


def _folder_symlink(tmp_path: Path):
    def change(ds: Path, entries: list[dict[str, Any]]) -> None:
        target = _outside(tmp_path, ds, entries).parent
        folder = (ds / "imgs" / entries[0]["file_path"]).parent
        shutil.copytree(folder, target, dirs_exist_ok=True)
        shutil.rmtree(folder)
        folder.symlink_to(target, target_is_directory=True)

    return change


@pytest.mark.parametrize(("kind", "needle"), [
    ("dotdot", "'..'"), ("absolute", "absolute"), ("file-symlink", "outside"), ("folder-symlink", "outside"),
])
def test_dataset_paths_cannot_leave_the_root(kind: str, needle: str, tiny_dataset: Path, tmp_path: Path,
                                             run_cli) -> None:
    change = {"dotdot": _dotdot, "absolute": _absolute, "file-symlink": _file_symlink,
              "folder-symlink": _folder_symlink}[kind](tmp_path)
    ds = _dataset_with(tmp_path, tiny_dataset, change)
    code, out, err = run_cli(["data", "stats", ds])
    _one_line_error(code, out, err, str(ds / "reid_raw.json"), "entry 0", "'file_path'", needle)


def test_symlinks_inside_the_root_are_fine(tiny_dataset: Path, tmp_path: Path, run_cli) -> None:
    def change(ds: Path, entries: list[dict[str, Any]]) -> None:
        img = ds / "imgs" / entries[0]["file_path"]
        shutil.move(img, ds / "imgs" / "moved.jpg")
        img.symlink_to(ds / "imgs" / "moved.jpg")

    ds = _dataset_with(tmp_path, tiny_dataset, change)
    code, out, err = run_cli(["data", "stats", ds])
    assert code == 0, err


# ------------------------------------------------------------------------------------------------ YAML
def test_recipe_yaml_cannot_run_code(tmp_path: Path, run_cli) -> None:
    marker = tmp_path / "PWNED"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"output: runs/x\nseed: !!python/object/apply:os.system ['touch {marker}']\n")
    code, out, err = run_cli(["train", recipe])
    _one_line_error(code, out, err, str(recipe), "YAML")
    assert not marker.exists(), "the YAML tag ran a command"


def test_set_override_cannot_run_code(train_recipe_data, tmp_path: Path, run_cli) -> None:
    marker = tmp_path / "PWNED"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(train_recipe_data(tmp_path / "run")))
    code, out, err = run_cli(["train", recipe, "--set", f"seed=!!python/object/apply:os.system ['touch {marker}']"])
    _one_line_error(code, out, err, "seed")
    assert not marker.exists(), "the YAML tag ran a command"
    assert not (tmp_path / "run").exists()


def test_pipeline_recipe_yaml_cannot_run_code(tmp_path: Path, run_cli) -> None:
    marker = tmp_path / "PWNED"
    recipe = tmp_path / "p.yaml"
    recipe.write_text(f"run_dir: !!python/object/apply:os.system ['touch {marker}']\n")
    code, out, err = run_cli(["run", recipe])
    _one_line_error(code, out, err, str(recipe))
    assert not marker.exists(), "the YAML tag ran a command"


# ------------------------------------------------------------------------------------------------ source scan
_TEXT_BANNED = ("weights_only=False", "yaml.load(", "yaml.unsafe_load", "yaml.full_load", "Loader=yaml.Loader",
                "yaml.UnsafeLoader", "pickle.load(", "pickle.loads(", "marshal.loads(", "dill.load")


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def unsafe_calls(source: str, filename: str) -> list[str]:
    """Calls that can run code from data: builtins eval/exec/compile/__import__, torch.load without
    ``weights_only=True``, any ``weights_only=False``, yaml loaders other than safe_load, pickle/marshal loads."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        where = f"{filename}:{node.lineno}"
        if name in ("eval", "exec", "compile", "__import__", "builtins.eval", "builtins.exec"):
            found.append(f"{where}: {name}(")
        kw = {k.arg: k.value for k in node.keywords if k.arg}
        wo = kw.get("weights_only")
        if isinstance(wo, ast.Constant) and wo.value is False:
            found.append(f"{where}: weights_only=False")
        if name.endswith("torch.load") and not (isinstance(wo, ast.Constant) and wo.value is True):
            found.append(f"{where}: {name}( without weights_only=True")
        if name.startswith("yaml.") and name.split(".")[-1] in ("load", "load_all", "unsafe_load", "full_load",
                                                                "unsafe_load_all", "full_load_all"):
            found.append(f"{where}: {name}(")
        if name in ("pickle.load", "pickle.loads", "marshal.load", "marshal.loads", "numpy.load", "np.load"):
            if name.endswith("np.load") or name.endswith("numpy.load"):
                ap = kw.get("allow_pickle")
                if not (isinstance(ap, ast.Constant) and ap.value is True):
                    continue
            found.append(f"{where}: {name}(")
    return found


def test_the_scan_finds_what_it_looks_for() -> None:
    bad = ("x = eval('1')\nexec('y=1')\nimport torch, yaml, pickle\ntorch.load('a')\n"
           "torch.load('a', weights_only=False)\nyaml.load('a')\npickle.loads(b'')\n")
    assert len(unsafe_calls(bad, "bad.py")) == 7
    ok = "m.eval()\ntorch.load('a', weights_only=True)\nyaml.safe_load('a')\ndef eval(self): pass\n"
    assert unsafe_calls(ok, "ok.py") == []


def test_package_has_no_code_execution_from_data() -> None:
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 20
    problems = []
    for f in files:
        text = f.read_text(encoding="utf-8")
        rel = f.relative_to(PACKAGE.parent).as_posix()
        problems += unsafe_calls(text, rel)
        for i, line in enumerate(text.splitlines(), 1):
            code = line.split("#", 1)[0]
            problems += [f"{rel}:{i}: {b}" for b in _TEXT_BANNED if b in code]
            if re.search(r"(?<![\w.])(eval|exec)\(", code) and not re.match(r"\s*def (eval|exec)\(", code):
                problems.append(f"{rel}:{i}: {code.strip()}")
    assert not problems, "\n".join(problems)


def test_no_checkpoint_loader_turns_safety_off_via_environment() -> None:
    """torch honours TORCH_FORCE_WEIGHTS_ONLY_LOAD / TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD; the package never sets them."""
    for f in PACKAGE.rglob("*.py"):
        assert "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD" not in f.read_text(encoding="utf-8"), f
    assert os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD") in (None, "", "0")
