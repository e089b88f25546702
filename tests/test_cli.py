"""The ``tbps-compress`` command line: fast help, one-line user errors with exit code 2, and the main commands."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

COMMANDS = ("synth", "train", "eval", "import", "data", "list")

_HELP_SCRIPT = """
import sys, time
t0 = time.perf_counter()
from tbps_compress.cli import main
for args in (["--help"], ["train", "--help"], ["eval", "--help"], ["data", "stats", "--help"]):
    print("=== RC", main(args))
import tbps_compress.devices, tbps_compress.io_utils  # the checks run before anything heavy is loaded
print("=== HEAVY", sorted(m for m in ("torch", "open_clip", "torchvision", "onnxruntime") if m in sys.modules))
print("=== SECONDS", time.perf_counter() - t0)
"""


def _assert_user_error(code: int, out: str, err: str, *needles: str) -> str:
    assert code == 2, (code, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    assert "Traceback" not in err and "Traceback" not in out
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


# ----------------------------------------------------------------------------------------------- help
def test_help_is_fast_and_imports_no_torch() -> None:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _HELP_SCRIPT], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "COLUMNS": "120"}, check=False)
    wall = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.count("=== RC 0") == 4, out
    assert "=== HEAVY []" in out, out
    top_help = out.split("=== RC")[0]
    for command in COMMANDS:
        assert command in top_help
    assert "--set" in out and "--resume" in out and "--out" in out
    assert wall < 3.0, f"tbps-compress --help took {wall:.2f} s"


def test_console_script_help(run_cli_subprocess) -> None:
    code, out, err = run_cli_subprocess(["--help"], timeout=60)
    assert code == 0, err
    for command in COMMANDS:
        assert command in out
    assert err == ""


# ----------------------------------------------------------------------------------------------- user errors
def test_missing_recipe_file(run_cli, tmp_path: Path) -> None:
    code, out, err = run_cli(["train", tmp_path / "missing.yaml"])
    _assert_user_error(code, out, err, str(tmp_path / "missing.yaml"), "not found")


def test_recipe_with_unknown_key(run_cli, tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("optim:\n  epochs: 1\n  warmup: 2\n")
    code, out, err = run_cli(["train", recipe])
    _assert_user_error(code, out, err, str(recipe), "optim.warmup")


def test_eval_on_missing_artifact(run_cli, tiny_dataset: Path, tmp_path: Path) -> None:
    code, out, err = run_cli(["eval", tmp_path / "no-artifact", "--data", tiny_dataset, "--device", "cpu"])
    _assert_user_error(code, out, err, str(tmp_path / "no-artifact"))


def test_data_stats_on_empty_folder(run_cli, tmp_path: Path) -> None:
    code, out, err = run_cli(["data", "stats", tmp_path])
    _assert_user_error(code, out, err, str(tmp_path), "reid_raw.json")


def test_import_of_missing_checkpoint(run_cli, tmp_path: Path) -> None:
    out_dir = tmp_path / "a0"
    code, out, err = run_cli(["import", tmp_path / "ViT-B-16.pt", "--config", "test-tiny", "--out", out_dir])
    _assert_user_error(code, out, err, "ViT-B-16.pt", "not found")
    assert not out_dir.exists()


def test_train_with_batch_larger_than_the_data(run_cli, train_recipe_data, tmp_path: Path) -> None:
    out_dir = tmp_path / "run"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(train_recipe_data(out_dir)))
    code, out, err = run_cli(["train", recipe, "--set", "optim.batch_size=1000"])
    _assert_user_error(code, out, err, "optim.batch_size", "1000")
    assert list(tmp_path.iterdir()) == [recipe], "a failed start must leave no output or checkpoint folder"


def test_unknown_model_config_on_import(run_cli, tmp_path: Path) -> None:
    code, out, err = run_cli(["import", tmp_path / "x.bin", "--config", "vit-z", "--out", tmp_path / "a"])
    _assert_user_error(code, out, err, "vit-z", "test-tiny")


def test_user_error_through_the_console_script(run_cli_subprocess, tmp_path: Path) -> None:
    _assert_user_error(*run_cli_subprocess(["data", "stats", tmp_path], timeout=60), str(tmp_path))


def test_usage_errors_exit_2_without_traceback(run_cli) -> None:
    code, _, err = run_cli(["train"])
    assert code == 2 and "Missing argument 'recipe'" in err and "Traceback" not in err
    code, _, err = run_cli(["list", "bogus"])
    assert code == 2 and "bogus" in err and "Traceback" not in err
    code, _, err = run_cli(["eval", "x", "--data", "y", "--batch-size", "0"])
    assert code == 2 and "--batch-size" in err and "Traceback" not in err


# ----------------------------------------------------------------------------------------------- commands
def test_list_commands(run_cli) -> None:
    code, out, _ = run_cli(["list", "models"])
    assert code == 0 and "test-tiny" in out.split() and "tbps-vit-b-16" in out.split()
    code, out, _ = run_cli(["list", "losses"])
    assert code == 0 and {"n_itc", "r_itc", "mvs_i", "ss_i", "c_itc", "id"} <= set(out.split())
    code, out, _ = run_cli(["list", "formats"])
    assert code == 0 and {"cuhk-pedes", "icfg-pedes", "rstpreid", "tbps-clip"} <= set(out.split())


def test_data_stats(run_cli, tiny_dataset: Path) -> None:
    code, out, err = run_cli(["data", "stats", tiny_dataset])
    assert code == 0, err
    stats = json.loads(out)
    assert stats["format"] == "cuhk-pedes"
    entries = json.loads((tiny_dataset / "reid_raw.json").read_text())
    for split in ("train", "val", "test"):
        mine = [e for e in entries if e["split"] == split]
        assert stats["splits"][split] == {"identities": len({e["id"] for e in mine}), "images": len(mine),
                                          "captions": sum(len(e["captions"]) for e in mine)}


def test_import_command_writes_a_loadable_artifact(run_cli, tmp_path: Path) -> None:
    from tbps_compress.models.factory import build_model
    from tbps_compress.models.io import load_model

    torch.manual_seed(5)
    src = build_model("test-tiny")
    ckpt = tmp_path / "tiny.bin"
    torch.save(src.state_dict(), ckpt)
    out_dir = tmp_path / "imported"
    code, out, err = run_cli(["import", ckpt, "--config", "test-tiny", "--out", out_dir])
    assert code == 0, err
    lineage = json.loads((out_dir / "lineage.json").read_text())
    assert lineage["stage"] == "import" and lineage["source_checkpoint"] == str(ckpt.resolve())
    loaded = load_model(out_dir)
    for k, v in src.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    code, out, err = run_cli(["import", ckpt, "--config", "test-tiny", "--out", out_dir])
    _assert_user_error(code, out, err, "--force")


def test_eval_prints_a_table_and_writes_json(run_cli, tiny_teacher_artifact: Path, tiny_dataset: Path,
                                             tmp_path: Path) -> None:
    target = tmp_path / "metrics.json"
    code, out, err = run_cli(["eval", tiny_teacher_artifact, "--data", tiny_dataset, "--device", "cpu",
                              "--out", target])
    assert code == 0, err
    for column in ("split", "R1", "R5", "R10", "mAP", "mINP", "test"):
        assert column in out
    result = json.loads(target.read_text())
    assert set(result) >= {"R1", "R5", "R10", "mAP", "mINP"}
    assert f"{result['R1']:.2f}" in out
    # the same weights on the same split: the trainer's own final test evaluation
    trained = json.loads((tiny_teacher_artifact / "metrics.json").read_text())["test"]
    for k in ("R1", "R5", "R10", "mAP", "mINP"):
        assert result[k] == pytest.approx(trained[k], abs=1e-6), k


def test_train_command_end_to_end(run_cli, train_recipe_data, tmp_path: Path) -> None:
    out_dir = tmp_path / "run"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(train_recipe_data(out_dir)))
    code, out, err = run_cli(["train", recipe, "--set", "optim.max_steps=2", "--set", "losses.c_itc.weight=0.1"])
    assert code == 0, err
    assert "R1" in out and "test" in out
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["steps"] == 2
    resolved = yaml.safe_load((out_dir / "recipe.resolved.yaml").read_text())
    assert resolved["optim"]["max_steps"] == 2 and resolved["losses"]["c_itc"] == {"weight": 0.1}
    assert not (tmp_path / "run.ckpt").exists(), "the checkpoint folder is removed once the artifact is written"
    code, out, err = run_cli(["train", recipe])
    _assert_user_error(code, out, err, str(out_dir), "--force")


def test_eval_out_is_checked_before_the_evaluation_and_replaced_only_with_force(
        run_cli, tiny_teacher_artifact: Path, tiny_dataset: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from tbps_compress import evaluation

    target = tmp_path / "metrics.json"
    target.write_text("earlier metrics\n")
    calls = []
    real = evaluation.evaluate_artifact
    monkeypatch.setattr(evaluation, "evaluate_artifact", lambda *a, **k: calls.append(1) or real(*a, **k))
    argv = ["eval", tiny_teacher_artifact, "--data", tiny_dataset, "--device", "cpu", "--out", target]
    code, out, err = run_cli(argv)
    _assert_user_error(code, out, err, f"{target}: file already exists; choose another --out or pass --force")
    assert calls == [] and target.read_text() == "earlier metrics\n", "refused before evaluating, file kept"
    old = os.umask(0o022)
    try:
        code, out, err = run_cli([*argv, "--force"])
    finally:
        os.umask(old)
    assert code == 0, err
    assert calls == [1] and f"wrote {target}" in out
    assert set(json.loads(target.read_text())) >= {"R1", "R5", "R10", "mAP", "mINP"}
    assert target.stat().st_mode & 0o777 == 0o644, "the umask's mode, not the temporary file's 0600"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"], "no temporary left"


def test_synth_preview_into_the_dataset_folder_it_creates(run_cli, tmp_path: Path) -> None:
    """--preview is checked before generating, yet may name a file inside the (not yet existing) dataset folder."""
    from PIL import Image

    ds = tmp_path / "ds"
    argv = ["synth", ds, "--identities", "5", "--images-per-id", "1", "--captions-per-image", "1", "--size", "64x32",
            "--workers", "1", "--preview", ds / "sheets" / "preview.png"]
    code, out, err = run_cli(argv)
    assert code == 0, err
    assert json.loads(out)["identities"] == 5
    with Image.open(ds / "sheets" / "preview.png") as im:
        assert im.format == "PNG" and im.width > 0
    assert [p.name for p in (ds / "sheets").iterdir()] == ["preview.png"], "no temporary left"
