"""The study drivers of benchmarks/ on the tiny teacher: they run, write their tables and judge with seeds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def test_distill_study_runs_each_variant_per_seed(benchmark_script, tiny_teacher_artifact: Path,
                                                  tiny_dataset: Path, tmp_path: Path) -> None:
    study = benchmark_script("distill_study")
    out = tmp_path / "study"
    rc = study.main(["--teacher", str(tiny_teacher_artifact), "--data", str(tiny_dataset), "--out", str(out),
                     "--steps", "2", "--batch-size", "8", "--variants", "scratch,inherit+kd", "--seeds", "0,1",
                     "--set", "student.config=test-tiny", "--set", "student.inline.text.layers=1"])
    assert rc == 0
    result = json.loads((out / "distill_study.json").read_text())
    assert result["seeds"] == [0, 1] and result["test_queries"] > 0
    for name in ("scratch", "inherit+kd"):
        row = result["variants"][name]
        assert len(row["seeds"]) == 2 and len(row["R1_seeds"]) == 2
        assert abs(row["test"]["R1"] - sum(row["R1_seeds"]) / 2) < 1e-3  # rounded to 3 places
        assert row["R1_spread"] == round(max(row["R1_seeds"]) - min(row["R1_seeds"]), 3)
        folders = {Path(s["artifact"]).name for s in row["seeds"]}
        assert folders == {name.replace("+", "_") + "-s0", name.replace("+", "_") + "-s1"}
    assert any("more than 3 seed spreads" in c["check"] for c in result["acceptance"])
    table = (out / "distill_study.md").read_text()
    assert "| R@1 per seed |" in table and "standard error" in table
    r1 = result["variants"]["scratch"]["R1_seeds"]
    assert f"s0 {r1[0]:.2f}, s1 {r1[1]:.2f}" in table
    # tabulating what finished: a seed that never ran is left out, nothing is trained
    rc = study.main(["--teacher", str(tiny_teacher_artifact), "--data", str(tiny_dataset), "--out", str(out),
                     "--steps", "2", "--batch-size", "8", "--variants", "scratch,inherit+kd,inherit",
                     "--seeds", "0,1,2", "--only-finished", "--set", "student.config=test-tiny",
                     "--set", "student.inline.text.layers=1"])
    assert rc == 0
    again = json.loads((out / "distill_study.json").read_text())
    assert set(again["variants"]) == {"scratch", "inherit+kd"} and again["variants"]["scratch"]["R1_seeds"] == r1
    assert not (out / "runs" / "scratch-s2").exists() and not (out / "runs" / "inherit-s0").exists()


def test_distill_study_starts_the_pruned_variant_from_the_given_artifact(benchmark_script, tiny_teacher_artifact: Path,
                                                                        tiny_dataset: Path, tmp_path: Path) -> None:
    study = benchmark_script("distill_study")
    args = ["--teacher", str(tiny_teacher_artifact), "--data", str(tiny_dataset), "--out", str(tmp_path / "s"),
            "--steps", "2", "--batch-size", "8", "--variants", "pruned+kd",
            "--set", "student.config=null", "--set", "student.inline=null"]
    with pytest.raises(SystemExit, match="variant pruned\\+kd: starts from an artifact; give it with --init-artifact"):
        study.main(args)
    assert study.main([*args, "--init-artifact", str(tiny_teacher_artifact)]) == 0
    row = json.loads((tmp_path / "s" / "distill_study.json").read_text())["variants"]["pruned+kd"]
    assert row["init"] == "artifact" and row["parameters"]["non_embedding"] > 0
    recipe = (Path(row["artifact"]) / "recipe.resolved.yaml").read_text()
    assert str(tiny_teacher_artifact) in recipe


@pytest.mark.slow  # two diagnose subprocesses (torch imports): about a minute; `make test-all` runs it
def test_attribute_cost_compares_each_model_with_its_reference(tmp_path: Path) -> None:
    from benchmarks import attribute_cost
    from tbps_compress.bench.zoo import random_artifact
    from tbps_compress.data.synthpedes import generate

    data = tmp_path / "ds"
    generate(data, train_ids=4, val_ids=0, test_ids=12, images_per_id=2, captions_per_image=2, size=(64, 32),
             seed=1, workers=1)
    ref = random_artifact("test-tiny", tmp_path / "ref", seed=0)
    other = random_artifact("test-tiny", tmp_path / "other", seed=1)
    out = tmp_path / "cost"
    assert attribute_cost.main(["--data", str(data), "--out", str(out), "--reference", f"teacher={ref}",
                                f"student={other}", "--threads", "1"]) == 0
    result = json.loads((out / "attribute_cost.json").read_text())
    row = result["rows"][0]
    assert row["name"] == "student" and result["reference"]["name"] == "teacher"
    for fam, delta in row["auc_delta"].items():
        assert abs(delta - (row["auc"][fam] - result["reference"]["auc"][fam])) < 0.02, fam
    assert "upper_color" in row["auc_delta"]
    assert (out / "attribute_cost.png").stat().st_size > 0 and "| family | teacher | student |" in (
        out / "attribute_cost.md").read_text()


def test_teacher_curves_append_the_final_point_and_draw(benchmark_script, tmp_path: Path) -> None:
    mod = benchmark_script("teacher_curves")
    header = "step,epoch,train_seconds,split,R1,R5,R10,mAP,mINP\n"
    csv_only = tmp_path / "a.csv"
    csv_only.write_text(header + "100,0.1,60,test,1.0,5.0,9.0,2.0,1.0\n", encoding="utf-8")
    art = tmp_path / "run"
    art.mkdir()
    (art / "curve.csv").write_text(header + "100,0.1,50,test,2.0,6.0,10.0,3.0,1.0\n", encoding="utf-8")
    (art / "metrics.json").write_text(json.dumps({"steps": 150, "train_seconds": 75.0, "test": {
        "R1": 4.5, "R5": 9.0, "R10": 12.0, "mAP": 5.0}}), encoding="utf-8")
    out = tmp_path / "out"
    assert mod.main([f"old={csv_only}", f"new run={art}", "--out", str(out)]) == 0
    assert (out / "curves.png").stat().st_size > 0
    table = (out / "curves.md").read_text(encoding="utf-8")
    assert "| new run | 150 | 1.2 | 4.50 |" in table and "| old | 100 | 1.0 | 1.00 |" in table
    assert (out / "new-run-curve.csv").read_text(encoding="utf-8").splitlines()[-1].startswith("150.0,75.0,4.5")
    with pytest.raises(SystemExit, match="no learning curve"):
        mod.main([f"x={tmp_path / 'missing.csv'}", "--out", str(out)])


def test_gpu_studies_dry_run_runs_every_stage_on_cpu(benchmark_script, tiny_dataset: Path, tmp_path: Path) -> None:
    """The GPU run's commands, on the CPU with the tiny stripe-gru model: every stage exits 0 and is summarised."""
    mod = benchmark_script("gpu_studies")
    out = tmp_path / "gpu"
    assert mod.main(["--data", str(tiny_dataset), "--out", str(out), "--dry-run"]) == 0
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert [r["stage"] for r in summary["stages"]] == ["teacher", "student", "pruned", "student-onnx", "bench"]
    assert summary["stages"][0]["steps"] == 2 and "R1" in summary["stages"][1] and "R1" in summary["stages"][2]
    assert (out / "bench" / "bench.md").is_file() and "| teacher |" in (out / "summary.md").read_text()
    with pytest.raises(SystemExit, match="no reid_raw.json"):
        mod.main(["--data", str(tmp_path / "none"), "--out", str(out), "--dry-run"])


def test_capacity_trains_only_the_missing_runs_and_reports_each_models_seeds(benchmark_script, tiny_dataset: Path,
                                                                           tiny_teacher_artifact: Path,
                                                                           tmp_path: Path) -> None:
    import yaml
    from conftest import train_recipe_dict

    cap = benchmark_script("capacity")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(train_recipe_dict(tiny_dataset, tmp_path / "unused",
                                                       optim={"max_steps": 1})), encoding="utf-8")
    out = tmp_path / "cap"
    assert cap.main(["--recipe", str(recipe), "--models", "test-tiny", "test-tiny-stripe-gru", "--seeds", "0",
                     "--full-seeds", "0", "--reuse", f"test-tiny:0={tiny_teacher_artifact}", "--out", str(out)]) == 0
    result = json.loads((out / "capacity.json").read_text())
    folders = {(r["model"], r["seed"]): r["folder"] for r in result}
    assert folders == {("test-tiny", 0): str(tiny_teacher_artifact),
                       ("test-tiny-stripe-gru", 0): str(out / "test-tiny-stripe-gru-s0")}
    assert not (out / "test-tiny-s0").exists() and result[1]["steps"] == 1
    assert "R@1 gap (test-tiny minus test-tiny-stripe-gru)" in (out / "capacity.md").read_text()
