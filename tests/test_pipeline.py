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


# ------------------------------------------------------------------------------------ checks before anything runs
# None of these trains: the pipeline refuses before the first stage (or the stages are stand-ins).

TEACHER = {**COMMON, "model": {"config": "test-tiny"}, "losses": {"n_itc": {"weight": 1.0}}}
DISTILL = {**COMMON, "teacher": {"artifact": "unused"},
           "student": {"config": "test-tiny", "init": "inherit"}, "losses": {"kd_feature": {"weight": 1.0}}}


def _pipeline(tmp_path: Path, *stages: dict, distill: dict | None = None) -> Path:
    """A pipeline file in ``tmp_path``: a valid teacher recipe, a distill recipe (``distill`` or a valid one), no
    dataset (none is needed: every check runs before the data is looked at) and the given stages."""
    _write(tmp_path / "teacher.yaml", TEACHER)
    _write(tmp_path / "distill.yaml", distill if distill is not None else DISTILL)
    pipe = {"run_dir": str(tmp_path / "run"), "data": str(tmp_path / "nodata"), "synth": None,
            "stages": [{"name": "teacher", "kind": "train", "recipe": str(tmp_path / "teacher.yaml")}, *stages]}
    return _write(tmp_path / "pipeline.yaml", pipe)


STUDENT = {"name": "student", "kind": "distill", "recipe": "{t}/distill.yaml", "teacher": "teacher"}
ONNX = {"name": "onnx", "kind": "export", "source": "teacher"}
INT8 = {"name": "int8", "kind": "quantize", "source": "onnx"}


def _fmt(stage: dict, tmp_path: Path) -> dict:
    return {k: v.format(t=tmp_path) if isinstance(v, str) else v for k, v in stage.items()}


BAD_PIPELINES = {
    "missing-recipe-of-a-later-stage": (
        [{**STUDENT, "recipe": "{t}/missing.yaml"}], None,
        r"pipeline.yaml: stage 'student' \(distill\): recipe file .*missing.yaml not found; fix 'recipe:'"),
    "unknown-key-in-a-later-recipe": (
        [STUDENT], {**DISTILL, "optim": {**COMMON["optim"], "epochz": 1}},
        r"pipeline.yaml: stage 'student' \(distill\): recipe .*distill.yaml: unknown key 'optim.epochz'"),
    "misspelled-bench-option": (
        [ONNX, INT8, {"name": "bench", "kind": "bench", "artifacts": ["int8"], "options": {"rep": 2}}], None,
        r"pipeline.yaml: stage 'bench' \(bench\): unknown option 'rep' \(did you mean 'reps'\?\); valid options: "
        r".*gallery_size.*reps"),
    "misspelled-quantize-option": (
        [ONNX, {**INT8, "options": {"mdoe": "static"}}], None,
        r"pipeline.yaml: stage 'int8' \(quantize\): unknown option 'mdoe' \(did you mean 'mode'\?\); valid "
        r"options: backend, calib_data, calib_method, calib_size, mode, op_types, towers"),
    "bad-quantize-mode": (
        [ONNX, {**INT8, "options": {"mode": "int3"}}], None,
        r"stage 'int8' \(quantize\): option 'mode': got 'int3'; choose one of dynamic, static, fp16"),
    "bad-bench-option-type": (
        [ONNX, {"name": "bench", "kind": "bench", "artifacts": ["onnx"], "options": {"reps": "many"}}], None,
        r"stage 'bench' \(bench\): option 'reps': Input should be a valid integer"),
    "bad-set-value": (
        [{**STUDENT, "set": ["optim.lr=abc"]}], None,
        r"pipeline.yaml: stage 'student' \(distill\): recipe .*distill.yaml with the stage's set: overrides: key "
        r"'optim.lr'.*'abc'"),
    "options-on-a-recipe-stage": (
        [{**STUDENT, "options": {"epochs": 2}}], None,
        r"stage 'student' \(distill\): takes no options \(got \['epochs'\]\); set recipe keys with 'set:"),
}


@pytest.mark.parametrize("case", list(BAD_PIPELINES))
def test_every_stage_is_checked_before_the_first_runs(tmp_path: Path, case: str) -> None:
    from tbps_compress.errors import ConfigError

    stages, distill, message = BAD_PIPELINES[case]
    pipe = _pipeline(tmp_path, *[_fmt(s, tmp_path) for s in stages], distill=distill)
    with pytest.raises(ConfigError, match=message) as info:
        Pipeline(load_pipeline(pipe), pipe).run()
    assert "\n" not in str(info.value)
    assert not (tmp_path / "run").exists(), "nothing may be written before every stage is checked"


def test_misspelled_bench_option_fails_fast_through_the_cli(tmp_path: Path, run_cli) -> None:
    pipe = _pipeline(tmp_path, ONNX, {"name": "bench", "kind": "bench", "artifacts": ["onnx"],
                                      "options": {"warmpu": 1}})
    code, _, err = run_cli(["run", pipe])
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err
    assert "stage 'bench' (bench): unknown option 'warmpu' (did you mean 'warmup'?); valid options:" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", ["../escaped", "a/b", "..", ".", "", "sp ace", "/abs", "a\\b", "tab\t"])
def test_stage_names_are_plain_folder_names(tmp_path: Path, name: str) -> None:
    from tbps_compress.errors import ConfigError

    pipe = _write(tmp_path / "p.yaml", {"run_dir": str(tmp_path / "run"), "synth": None,
                                        "stages": [{"name": name, "kind": "export", "source": None}]})
    with pytest.raises(ConfigError, match=r"p.yaml: key 'stages.0.name': .*stage name .* must be one plain folder "
                                          r"name under run_dir") as info:
        load_pipeline(pipe)
    assert repr(name) in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "escaped").exists()


def test_stage_names_may_use_letters_digits_dash_underscore_dot(tmp_path: Path) -> None:
    pipe = _pipeline(tmp_path, {"name": "v1.2_int8-final", "kind": "export", "source": "teacher"})
    assert load_pipeline(pipe).stages[1].name == "v1.2_int8-final"


# ----------------------------------------------------------------------------------- stage folders it did not write
@pytest.fixture
def fake_stages(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Stages that write a one-file artifact (bench: bench.json) instead of training; no dataset needed."""
    from tbps_compress.artifacts import write_artifact

    ran: list[str] = []

    def run_stage(self, st, out, force, resume):  # noqa: ANN001, ANN202
        ran.append(st.name)
        if st.kind == "bench":
            out.mkdir(parents=True, exist_ok=True)
            (out / "bench.json").write_text(json.dumps({"rows": [len(ran)]}))
            return out
        with write_artifact(out, stage=st.kind, force=force) as tmp:
            (tmp / "weights.txt").write_text(f"{st.name} {len(ran)}")
        return out

    monkeypatch.setattr(Pipeline, "_run_stage", run_stage)
    monkeypatch.setattr(Pipeline, "ensure_data", lambda self: None)
    return ran


def test_a_folder_it_did_not_write_is_refused_then_replaced_with_force(tmp_path: Path, fake_stages: list[str],
                                                                        run_cli) -> None:
    from tbps_compress.errors import UserError

    pipe = _pipeline(tmp_path)
    mine = tmp_path / "run" / "teacher"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("my own results\n")
    with pytest.raises(UserError, match=r"run/teacher: exists but was not written by this pipeline \(no record of "
                                        r"it in .*pipeline_state.json\); stage 'teacher' would replace it; .*--force"):
        Pipeline(load_pipeline(pipe), pipe).run()
    code, _, err = run_cli(["run", pipe])
    assert code == 2 and err.count("\n") == 1 and "--force" in err and str(mine) in err
    assert (mine / "notes.txt").read_text() == "my own results\n" and fake_stages == []
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["teacher"]  # no state file either

    Pipeline(load_pipeline(pipe), pipe).run(force=True)
    assert fake_stages == ["teacher"] and not (mine / "notes.txt").exists() and (mine / "weights.txt").exists()


def test_its_own_folders_are_replaced_unless_a_file_was_added(tmp_path: Path, fake_stages: list[str]) -> None:
    from tbps_compress.errors import UserError

    pipe = _pipeline(tmp_path, ONNX, {"name": "bench", "kind": "bench", "artifacts": ["onnx"]})
    Pipeline(load_pipeline(pipe), pipe).run()
    assert fake_stages == ["teacher", "onnx", "bench"]
    state = json.loads((tmp_path / "run" / "pipeline_state.json").read_text())
    assert set(state["@outputs"]) == {"teacher", "onnx", "bench"}
    Pipeline(load_pipeline(pipe), pipe).run(from_stage="teacher")  # written by it: replaced without --force
    assert fake_stages[3:] == ["teacher", "onnx", "bench"]

    (tmp_path / "run" / "onnx" / "mine.txt").write_text("keep me\n")
    with pytest.raises(UserError, match=r"run/onnx: holds files this pipeline did not write \(e.g. mine.txt\)"):
        Pipeline(load_pipeline(pipe), pipe).run(from_stage="teacher")
    (tmp_path / "run" / "onnx" / "mine.txt").unlink()
    (tmp_path / "run" / "bench" / "bench.json").write_text("{}")  # changed after the pipeline wrote it
    with pytest.raises(UserError, match=r"run/bench: its content is not what this pipeline recorded"):
        Pipeline(load_pipeline(pipe), pipe).run(only="bench")
    assert len(fake_stages) == 6


def test_a_state_file_of_an_earlier_version_is_trusted_with_a_matching_lineage(tmp_path: Path,
                                                                               fake_stages: list[str]) -> None:
    from tbps_compress.artifacts import write_artifact
    from tbps_compress.errors import UserError

    pipe = _pipeline(tmp_path)
    run = tmp_path / "run"
    with write_artifact(run / "teacher", stage="train") as tmp:
        (tmp / "weights.txt").write_text("old")
    (run / "pipeline_state.json").write_text(json.dumps({"teacher": "a key of an older recipe"}))
    Pipeline(load_pipeline(pipe), pipe).run()
    assert fake_stages == ["teacher"]

    with write_artifact(run / "teacher", stage="export", force=True) as tmp:  # not what a train stage writes
        (tmp / "weights.txt").write_text("old")
    (run / "pipeline_state.json").write_text(json.dumps({"teacher": "a key of an older recipe"}))
    with pytest.raises(UserError, match=r"its lineage.json says stage 'export', not 'train'"):
        Pipeline(load_pipeline(pipe), pipe).run()
