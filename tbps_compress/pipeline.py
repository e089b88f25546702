"""``tbps-compress run PIPELINE.yaml``: every stage in order, each into its own artifact folder of one run folder.

A stage is skipped when its output exists, is complete (hash-verified) and was made from the same inputs: the
stage's resolved recipe and its parents' content hashes, recorded in ``RUN/pipeline_state.json``. An interrupted
pipeline therefore resumes where it stopped (a training stage with a checkpoint continues from it); ``--from
STAGE`` forces that stage and every later one.

Stages are the registered ones of :mod:`tbps_compress.stages` (the CLI dispatches through the same registry).
Before anything runs or is written (no run folder, no dataset, no stage), every stage is checked: its name is one
plain folder name, its recipe file loads into its stage's recipe model with its ``set:`` overrides and the
pipeline's paths, its ``options`` validate into its stage's config model (``ExportCfg``, ``QuantizeCfg``,
``BenchCfg``), and its folder, when it exists, was written by this
pipeline: the state file records each finished stage's output (content hash and files), and a folder without
such a record, or holding other files, is refused unless ``force`` (``tbps-compress run --force``) says to replace
it.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from .config import Strict, apply_overrides, format_validation_error, read_yaml, validate
from .errors import ConfigError, UserError
from .stages import get_stage, run_stage, stage_config, with_paths

log = logging.getLogger(__name__)

STATE_FILE = "pipeline_state.json"
OUTPUTS_KEY = "@outputs"  # state entry: stage name -> {"hash", "files"} of the output it wrote ('@': no stage name)
BENCH_MARKER = "bench.json"
_STAGE_NAME = re.compile(r"[A-Za-z0-9_.-]+")


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
    name: str = Field(..., description="Stage name; also the folder name under run_dir (letters, digits, - _ .).")
    kind: str = Field(..., description="A registered stage kind: train, distill, prune, export, quantize, bench.")
    recipe: str | None = Field(None, description="Stage recipe YAML (train / distill / prune).")
    set: list[str] = Field(default_factory=list, description="Overrides key.path=value for the stage recipe.")
    source: str | None = Field(None, description="Name of the stage whose artifact this stage reads.")
    teacher: str | None = Field(None, description="Name of the stage whose artifact is the teacher.")
    options: dict[str, Any] = Field(default_factory=dict, description="export / quantize / bench: the keys of "
                                                                     "ExportCfg / QuantizeCfg / BenchCfg.")
    artifacts: list[str] = Field(default_factory=list, description="bench: the stages to benchmark.")

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, v: str) -> str:
        from .stages import stage_kinds

        if v not in stage_kinds():
            raise ValueError(f"unknown stage kind {v!r}; choose one of {', '.join(stage_kinds())}")
        return v

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        if not _STAGE_NAME.fullmatch(v) or v in (".", ".."):
            raise ValueError(f"stage name {v!r} must be one plain folder name under run_dir: letters, digits, '-', "
                             "'_' and '.' only (not '.' or '..'); rename the stage")
        return v


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
            stage = get_stage(st.kind)
            if stage.recipe and not st.recipe:
                raise ValueError(f"stage '{st.name}' ({st.kind}) needs a recipe")
            for role in stage.required:
                if role != "artifacts" and getattr(st, role) is None:
                    raise ValueError(f"stage '{st.name}' ({st.kind}) needs a {role} stage")
            names.append(st.name)
        return self


def load_pipeline(path: Path, overrides: list[str] | None = None) -> PipelineRecipe:
    data = apply_overrides(read_yaml(Path(path)), overrides)
    return validate(PipelineRecipe, data, str(path))


def _recipe_paths(kind: str, inputs: dict[str, Any]) -> dict[str, Any]:
    """Recipe keys that hold a recipe stage's input artifacts."""
    keys = {"teacher": "teacher.artifact", "source": "source"}
    return {keys[role]: path for role, path in inputs.items() if role in keys and role in get_stage(kind).inputs}


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _content_hash(folder: Path) -> str | None:
    try:
        return json.loads((folder / "lineage.json").read_text())["content_hash"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


_BENCH_FILES = ("bench.csv", BENCH_MARKER, "bench.md", "pareto.png")


def _output_hash(st: StageCfg, out: Path) -> str | None:
    """What identifies a stage's output: its lineage content hash, or the hash of a bench stage's bench.json."""
    if st.kind != "bench":
        return _content_hash(out)
    try:
        return hashlib.sha256((out / BENCH_MARKER).read_bytes()).hexdigest()
    except OSError:
        return None


class Pipeline:
    def __init__(self, recipe: PipelineRecipe, recipe_path: Path, progress_factory: Callable | None = None) -> None:
        self.recipe = recipe
        self.recipe_path = Path(recipe_path)
        self.run_dir = Path(recipe.run_dir)
        self.data = Path(recipe.data)
        self.progress_factory = progress_factory
        self.state_path = self.run_dir / STATE_FILE
        self._configs: dict[str, BaseModel] = {}  # stage name -> its validated recipe or options

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

    # checks before anything runs -------------------------------------------------------------------------------
    def _where(self, st: StageCfg) -> str:
        return f"{self.recipe_path}: stage '{st.name}' ({st.kind})"

    def stage_inputs(self, st: StageCfg) -> dict[str, Any]:
        """The stage's input artifacts by role (the folders of the stages it names)."""
        inputs: dict[str, Any] = {}
        if st.teacher:
            inputs["teacher"] = self.out(st.teacher)
        if st.source:
            inputs["source"] = self.out(st.source)
        elif st.kind == "prune":
            inputs["source"] = self.out(st.teacher)  # pruning starts from the teacher unless told otherwise
        if st.artifacts:
            inputs["artifacts"] = [self.out(a) for a in st.artifacts]
        return inputs

    def load_stage_recipe(self, st: StageCfg) -> BaseModel:
        """The stage's recipe file with its ``set:`` overrides and the pipeline's paths, validated; errors name the
        pipeline file and the stage."""
        where = self._where(st)
        path = Path(st.recipe)
        if not path.is_file():
            raise ConfigError(f"{where}: recipe file {path} not found; fix 'recipe:' (relative paths are read from "
                              f"{Path.cwd()})")
        try:
            data = read_yaml(path)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from exc
        data = apply_overrides(data, st.set, source=f"{where}: set:")
        src = f"{where}: recipe {path}" + (" with the stage's set: overrides" if st.set else "")
        recipe = stage_config(st.kind, data, src)
        try:  # the pipeline's paths (output, data, input artifacts), checked by the recipe's own validators too
            return with_paths(recipe, self.out(st.name), self.data, _recipe_paths(st.kind, self.stage_inputs(st)))
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, f"{where}: recipe {path} with the pipeline's paths")) \
                from exc

    def _check_options(self, st: StageCfg) -> None:
        """A recipe stage takes no options; any other stage's options are validated into its config model."""
        where = self._where(st)
        stage = get_stage(st.kind)
        if stage.recipe:
            if st.options:
                raise ConfigError(f"{where}: takes no options (got {sorted(st.options)}); set recipe keys with "
                                  "'set: [key.path=value]'")
            return
        accepted = sorted(stage.config.model_fields)
        if st.recipe or st.set:
            raise ConfigError(f"{where}: takes no recipe and no set: overrides; give its settings as options "
                              f"(valid keys: {', '.join(accepted)})")
        for key in st.options:
            if key not in accepted:
                close = difflib.get_close_matches(key, accepted, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise ConfigError(f"{where}: unknown option '{key}'{hint}; valid options: {', '.join(accepted)}")
        labels = {k: f"option '{k}'" for k in accepted}
        self._configs[st.name] = stage_config(st.kind, st.options, where, labels)

    def validate_stages(self) -> None:
        """Check every stage's recipe (with its ``set:``) and options; raise :class:`ConfigError` naming the pipeline
        file and the stage. Nothing is written."""
        self._configs = {}
        for st in self.recipe.stages:
            self._check_options(st)
            if get_stage(st.kind).recipe:
                self._configs[st.name] = self.load_stage_recipe(st)

    def _foreign(self, st: StageCfg, out: Path, state: dict[str, Any]) -> str | None:
        """Why ``out`` must not be replaced by this pipeline (``None``: absent, empty, or this pipeline's output)."""
        if not out.exists() and not out.is_symlink():
            return None
        if out.is_symlink() or not out.is_dir():
            return "exists and is not a folder this pipeline wrote"
        files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if not p.is_dir())
        if not files:
            return None
        record = state.get(OUTPUTS_KEY, {}).get(st.name)
        if isinstance(record, dict):
            extra = sorted(set(files) - set(record.get("files", [])))
            if extra:
                return f"holds files this pipeline did not write (e.g. {extra[0]})"
            if _output_hash(st, out) != record.get("hash"):
                return f"its content is not what this pipeline recorded in {self.state_path}"
            return None
        if st.name not in state and f"{st.name}.pending" not in state:
            return f"exists but was not written by this pipeline (no record of it in {self.state_path})"
        # A state file of an earlier version (stage keys, no output records): trust a matching lineage.
        if st.kind == "bench":
            foreign = sorted(set(files) - set(_BENCH_FILES))
            return f"holds files this pipeline did not write (e.g. {foreign[0]})" if foreign else None
        try:
            lineage = json.loads((out / "lineage.json").read_text())
            listed = set(lineage["files"]) | {"lineage.json"}
        except (OSError, ValueError, KeyError, TypeError):
            return "exists but holds no lineage.json of this pipeline's stage"
        if lineage.get("stage") != st.kind:
            return f"its lineage.json says stage '{lineage.get('stage')}', not '{st.kind}'"
        extra = sorted(set(files) - listed)
        return f"holds files this pipeline did not write (e.g. {extra[0]})" if extra else None

    def check_stage_folders(self, stages: list[StageCfg], force: bool) -> None:
        """Refuse (unless ``force``) to run when a stage folder exists that this pipeline did not write."""
        if force:
            return
        state = self._state()
        for st in stages:
            out = self.out(st.name)
            why = self._foreign(st, out, state)
            if why is not None:
                raise UserError(f"{out}: {why}; stage '{st.name}' would replace it; move it away, choose another "
                                f"run_dir, or pass --force to replace it")

    def _record_output(self, state: dict[str, Any], st: StageCfg, out: Path) -> None:
        files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if not p.is_dir())
        state.setdefault(OUTPUTS_KEY, {})[st.name] = {"hash": _output_hash(st, out), "files": files}

    def ensure_data(self) -> None:
        from .data.readers import detect_format

        try:
            detect_format(self.data)
            return
        except UserError:
            if self.recipe.synth is None:
                raise
        from .data.synthpedes import generate, preset_settings

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

    def run(self, from_stage: str | None = None, only: str | None = None, force: bool = False) -> dict[str, Any]:
        """Run the stages (see the module docs). ``force``: replace stage folders this pipeline did not write."""
        names = [s.name for s in self.recipe.stages]
        for ref in (from_stage, only):
            if ref is not None and ref not in names:
                raise ConfigError(f"--from/--only: no stage '{ref}' in {self.recipe_path}; stages: {', '.join(names)}")
        self.validate_stages()
        selected = [st for st in self.recipe.stages if only is None or st.name == only]
        self.check_stage_folders(selected, force)
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
            marker = out / (BENCH_MARKER if st.kind == "bench" else "lineage.json")
            done = marker.exists() and state.get(st.name) == key
            if done and not forced:
                from .artifacts import verify_artifact

                try:
                    verify_artifact(out) if st.kind != "bench" else None
                    log.info("stage %s: up to date, skipped", st.name)
                    if st.name not in state.get(OUTPUTS_KEY, {}):  # a state file of an earlier version
                        self._record_output(state, st, out)
                        self._save_state(state)
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
            # Replacing the folder is safe: check_stage_folders found it absent, this pipeline's, or --force.
            result[st.name] = self._run_stage(st, out, force=True, resume=resume)
            timings[st.name] = round(time.time() - t0, 1)
            state = self._state()
            state[st.name] = key
            state.pop(f"{st.name}.pending", None)
            self._record_output(state, st, out)
            self._save_state(state)
        result["timings_s"] = timings
        return result

    # each stage kind -------------------------------------------------------------------------------------------
    def _run_stage(self, st: StageCfg, out: Path, force: bool, resume: bool) -> Any:
        progress = self.progress_factory() if self.progress_factory else None
        if st.name not in self._configs:
            self.validate_stages()
        # a bench folder was checked to be this pipeline's own output (check_stage_folders) before any stage ran
        return run_stage(st.kind, self._configs[st.name], out=out, inputs=self.stage_inputs(st), data=self.data,
                         force=force, resume=resume, progress=progress)

    @staticmethod
    def _resumable(out: Path) -> bool:
        return (out.parent / f"{out.name}.ckpt" / "last.ckpt").exists() or (out.parent / f"{out.name}.steps").is_dir()
