"""`tbps-compress run`: every stage end to end on tiny shapes, skipping up-to-date stages, --from, resuming."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tbps_compress.pipeline import Pipeline, load_pipeline

COMMON = {
    "seed": 0,
    "device": "cpu",
    "optim": {"epochs": 1, "batch_size": 8, "lr": 1e-3, "max_steps": 3, "warmup_epochs": 0},
    "eval": {"batch_size": 64},
}


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture
def tiny_pipeline(tmp_path: Path, tiny_dataset: Path) -> Path:
    rec = tmp_path / "recipes"
    rec.mkdir()
    teacher = _write(rec / "teacher.yaml", {**COMMON, "model": {"config": "test-tiny"},
                                            "losses": {"n_itc": {"weight": 1.0}, "r_itc": {"weight": 1.0}}})
    distill = _write(rec / "distill.yaml", {
        **COMMON, "teacher": {"artifact": "unused"},
        "student": {"config": "test-tiny", "inline": {"vision": {"width": 32}, "text": {"width": 32, "layers": 1}},
                    "init": "inherit", "vocab_prune": True},
        "losses": {"n_itc": {"weight": 0.5}, "kd_feature": {"weight": 1.0}, "kd_affinity": {"weight": 1.0}},
    })
    prune = _write(rec / "prune.yaml", {
        **COMMON, "teacher": {"artifact": "unused"},
        "prune": {"criterion": "l2", "vision": {"mlp_ratio": 0.5}, "text": {"mlp_ratio": 0.5},
                  "iterative_steps": 1, "recovery_steps": 2},
    })
    pipe = {
        "run_dir": str(tmp_path / "run"),
        "data": str(tiny_dataset),
        "synth": None,
        "stages": [
            {"name": "teacher", "kind": "train", "recipe": str(teacher)},
            {"name": "student", "kind": "distill", "recipe": str(distill), "teacher": "teacher"},
            {"name": "pruned", "kind": "prune", "recipe": str(prune), "teacher": "teacher", "source": "student"},
            {"name": "onnx", "kind": "export", "source": "pruned"},
            {"name": "int8", "kind": "quantize", "source": "onnx", "options": {"mode": "dynamic"}},
            {"name": "bench", "kind": "bench", "artifacts": ["teacher", "pruned", "int8"],
             "options": {"batches": [1, 4], "reps": 2, "warmup": 1, "gallery_size": 100}},
        ],
    }
    return _write(tmp_path / "pipeline.yaml", pipe)


def _mtime(folder: Path) -> float:
    return (folder / "lineage.json").stat().st_mtime


def test_pipeline_runs_skips_and_forces(tiny_pipeline: Path) -> None:
    recipe = load_pipeline(tiny_pipeline)
    run = Path(recipe.run_dir)
    result = Pipeline(recipe, tiny_pipeline).run()
    assert set(result["timings_s"]) == {"teacher", "student", "pruned", "onnx", "int8", "bench"}
    for name in ("teacher", "student", "pruned", "onnx", "int8"):
        lineage = json.loads((run / name / "lineage.json").read_text())
        assert lineage["files"], name
    parent = json.loads((run / "student" / "lineage.json").read_text())["parent"]
    assert parent["path"] == str((run / "teacher").resolve())
    assert (run / "onnx" / "image_encoder.onnx").exists() and (run / "int8" / "text_encoder.onnx").exists()
    assert (run / "bench" / "bench.md").exists()
    before = {n: _mtime(run / n) for n in ("teacher", "student", "pruned")}

    again = Pipeline(load_pipeline(tiny_pipeline), tiny_pipeline).run()
    assert again["timings_s"] == {}, "an up-to-date pipeline re-runs nothing"
    assert {n: _mtime(run / n) for n in before} == before

    forced = Pipeline(load_pipeline(tiny_pipeline), tiny_pipeline).run(from_stage="pruned")
    assert set(forced["timings_s"]) == {"pruned", "onnx", "int8", "bench"}
    assert _mtime(run / "teacher") == before["teacher"] and _mtime(run / "student") == before["student"]


def test_pipeline_rejects_unknown_stage_references(tmp_path: Path) -> None:
    from tbps_compress.errors import ConfigError

    bad = _write(tmp_path / "p.yaml", {"stages": [{"name": "x", "kind": "export", "source": "nope"}]})
    with pytest.raises(ConfigError, match="'nope', which is not an earlier stage"):
        load_pipeline(bad)
