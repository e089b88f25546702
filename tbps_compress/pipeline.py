"""``tbps-compress run PIPELINE.yaml``: every stage in order, each into its own artifact folder of one run folder.

A stage is skipped when its output exists, is complete (hash-verified) and was made from the same inputs: the
stage's resolved recipe and its parents' content hashes, recorded in ``RUN/pipeline_state.json``. An interrupted
pipeline therefore resumes where it stopped (a training stage with a checkpoint continues from it); ``--from
STAGE`` forces that stage and every later one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from .config import Strict, read_yaml, validate
from .errors import ConfigError, UserError

log = logging.getLogger(__name__)

STAGE_KINDS = ("train", "distill", "prune", "export", "quantize", "bench")
STATE_FILE = "pipeline_state.json"


class SynthCfg(Strict):
    """SynthPedes to generate when ``data`` is missing: a preset and the flags of ``tbps-compress synth``."""

    preset: Literal["demo", "benchmark"] | None = Field(None, description="demo (default) or benchmark (1,000 "
                                                                          "test identities, 10,000 train)")
    identities: int | None = Field(None, ge=5, description="Total identities split 80/10/10 (replaces the "
                                                            "preset's split sizes).")
    train_ids: int | None = Field(None, ge=1)
    val_ids: int | None = Field(None, ge=0)
    test_ids: int | None = Field(None, ge=2)
    images_per_id: int | None = Field(None, ge=1)
    eval_images_per_id: int | None = Field(None, ge=1, description="Images per val / test identity.")
    captions_per_image: int | None = Field(None, ge=1)
    size: tuple[int, int] = (384, 128)
    seed: int = 0


class StageCfg(Strict):
    name: str = Field(..., description="Stage name; also the folder name under run_dir.")
    kind: Literal["train", "distill", "prune", "export", "quantize", "bench"]
    recipe: str | None = Field(None, description="Stage recipe YAML (train / distill / prune).")
    set: list[str] = Field(default_factory=list, description="Overrides key.path=value for the stage recipe.")
    source: str | None = Field(None, description="Name of the stage whose artifact this stage reads.")
    teacher: str | None = Field(None, description="Name of the stage whose artifact is the teacher.")
    options: dict[str, Any] = Field(default_factory=dict, description="Keyword options of export/quantize/bench.")
    artifacts: list[str] = Field(default_factory=list, description="bench: the stages to benchmark.")


class PipelineRecipe(Strict):
    """A pipeline: dataset (generated if missing), then stages in order."""

    stage: Literal["pipeline"] = "pipeline"
    run_dir: str = "runs/synth"
    data: str = "data/synthpedes"
    synth: SynthCfg | None = Field(default_factory=SynthCfg, description="Generate the data if missing.")
    stages: list[StageCfg]

    @model_validator(mode="after")
    def _check(self) -> PipelineRecipe:
        names: list[str] = []
        for st in self.stages:
            if st.name in names:
                raise ValueError(f"duplicate stage name '{st.name}'")
            for ref in [st.source, st.teacher, *st.artifacts]:
                if ref is not None and ref not in names:
                    raise ValueError(f"stage '{st.name}' refers to '{ref}', which is not an earlier stage")
            if st.kind in ("train", "distill", "prune") and not st.recipe:
                raise ValueError(f"stage '{st.name}' ({st.kind}) needs a recipe")
            if st.kind in ("distill", "prune") and not st.teacher:
                raise ValueError(f"stage '{st.name}' ({st.kind}) needs a teacher stage")
            if st.kind in ("export", "quantize") and not st.source:
                raise ValueError(f"stage '{st.name}' ({st.kind}) needs a source stage")
            names.append(st.name)
        return self


def load_pipeline(path: Path, overrides: list[str] | None = None) -> PipelineRecipe:
    from .config import apply_overrides

    data = apply_overrides(read_yaml(Path(path)), overrides)
    return validate(PipelineRecipe, data, str(path))


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _content_hash(folder: Path) -> str | None:
    try:
        return json.loads((folder / "lineage.json").read_text())["content_hash"]
    except (OSError, ValueError, KeyError):
        return None


class Pipeline:
    def __init__(self, recipe: PipelineRecipe, recipe_path: Path, progress_factory: Callable | None = None) -> None:
        self.recipe = recipe
        self.recipe_path = Path(recipe_path)
        self.run_dir = Path(recipe.run_dir)
        self.data = Path(recipe.data)
        self.progress_factory = progress_factory
        self.state_path = self.run_dir / STATE_FILE

    def _state(self) -> dict[str, Any]:
        try:
            return json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            return {}

    def _save_state(self, state: dict[str, Any]) -> None:
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        os.replace(tmp, self.state_path)

    def out(self, name: str) -> Path:
        return self.run_dir / name

    def ensure_data(self) -> None:
        from .data.readers import detect_format

        try:
            detect_format(self.data)
            return
        except UserError:
            if self.recipe.synth is None:
                raise
        from .data.synthpedes import generate

        from .data.synthpedes import preset_settings

        s = self.recipe.synth
        settings = preset_settings(s.preset, s.identities, train_ids=s.train_ids, val_ids=s.val_ids,
                                   test_ids=s.test_ids, images_per_id=s.images_per_id,
                                   eval_images_per_id=s.eval_images_per_id, captions_per_image=s.captions_per_image)
        log.info("generating SynthPedes into %s (%s)", self.data, settings)
        generate(self.data, size=tuple(s.size), seed=s.seed, **settings)

    def stage_key(self, st: StageCfg) -> str:
        parents = {ref: _content_hash(self.out(ref)) for ref in [st.source, st.teacher, *st.artifacts] if ref}
        recipe_text = Path(st.recipe).read_text() if st.recipe else None
        return _hash({"stage": st.model_dump(), "recipe": recipe_text, "parents": parents, "data": str(self.data)})

    def run(self, from_stage: str | None = None, only: str | None = None) -> dict[str, Any]:
        names = [s.name for s in self.recipe.stages]
        for ref in (from_stage, only):
            if ref is not None and ref not in names:
                raise ConfigError(f"--from/--only: no stage '{ref}' in {self.recipe_path}; stages: {', '.join(names)}")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.ensure_data()
        state = self._state()
        forced = False
        timings: dict[str, float] = {}
        result: dict[str, Any] = {}
        for st in self.recipe.stages:
            if st.name == from_stage:
                forced = True
            if only is not None and st.name != only:
                continue
            key = self.stage_key(st)
            out = self.out(st.name)
            marker = out / ("bench.json" if st.kind == "bench" else "lineage.json")
            done = marker.exists() and state.get(st.name) == key
            if done and not forced:
                from .artifacts import verify_artifact

                try:
                    verify_artifact(out) if st.kind != "bench" else None
                    log.info("stage %s: up to date, skipped", st.name)
                    continue
                except UserError as exc:
                    log.warning("stage %s: output is damaged (%s); re-running", st.name, exc)
            t0 = time.time()
            # A checkpoint left by an interrupted run of this very stage configuration is continued.
            resume = state.get(f"{st.name}.pending") == key and self._resumable(out)
            state[f"{st.name}.pending"] = key
            state.pop(st.name, None)
            self._save_state(state)
            log.info("stage %s (%s) -> %s%s", st.name, st.kind, out, " (resuming)" if resume else "")
            result[st.name] = self._run_stage(st, out, force=True, resume=resume)
            timings[st.name] = round(time.time() - t0, 1)
            state = self._state()
            state[st.name] = key
            state.pop(f"{st.name}.pending", None)
            self._save_state(state)
        result["timings_s"] = timings
        return result

    # each stage kind -------------------------------------------------------------------------------------------
    def _run_stage(self, st: StageCfg, out: Path, force: bool, resume: bool) -> Any:
        progress = self.progress_factory() if self.progress_factory else None
        common = [f"output={out}", f"data.root={self.data}"]
        if st.kind == "train":
            from .config import load_recipe
            from .engine.train import Trainer
            from .recipes import TrainRecipe

            r = load_recipe(Path(st.recipe), TrainRecipe, [*st.set, *common])
            return Trainer(r, progress=progress).run(resume=resume, force=force)
        if st.kind == "distill":
            from .compress.distill import DistillRecipe, run_distill
            from .config import load_recipe

            r = load_recipe(Path(st.recipe), DistillRecipe,
                            [*st.set, *common, f"teacher.artifact={self.out(st.teacher)}"])
            return run_distill(r, resume=resume, force=force, progress=progress)
        if st.kind == "prune":
            from .compress.prune import PruneRecipe, run_prune
            from .config import load_recipe

            src = self.out(st.source) if st.source else self.out(st.teacher)
            r = load_recipe(Path(st.recipe), PruneRecipe,
                            [*st.set, *common, f"teacher.artifact={self.out(st.teacher)}", f"source={src}"])
            return run_prune(r, resume=resume, force=force, progress=progress)
        if st.kind == "export":
            from .export.onnx_export import export_onnx

            return export_onnx(self.out(st.source), out, force=force, parity_data=self.data, **st.options)
        if st.kind == "quantize":
            from .compress.quantize import quantize_artifact

            opts = {"mode": "dynamic", **st.options}
            if opts["mode"] == "static":
                opts.setdefault("calib_data", self.data)
            return quantize_artifact(self.out(st.source), out, force=force, eval_data=self.data, **opts)
        if st.kind == "bench":
            from .bench.runner import run_bench

            arts = [self.out(a) for a in st.artifacts]
            return run_bench(arts, self.data, out=out, **st.options)
        raise ConfigError(f"unknown stage kind {st.kind}")

    @staticmethod
    def _resumable(out: Path) -> bool:
        return (out.parent / f"{out.name}.ckpt" / "last.ckpt").exists() or (out.parent / f"{out.name}.steps").is_dir()
