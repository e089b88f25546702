"""``tbps-compress run PIPELINE.yaml``: every stage in order, each into its own artifact folder of one run folder.

A stage is skipped when its output exists, is complete (hash-verified) and was made from the same inputs: the
stage's resolved recipe and its parents' content hashes, recorded in ``RUN/pipeline_state.json``. An interrupted
pipeline therefore resumes where it stopped (a training stage with a checkpoint continues from it); ``--from
STAGE`` forces that stage and every later one.

Before anything runs or is written (no run folder, no dataset, no stage), every stage is checked: its name is one
plain folder name, its recipe file loads into its stage's recipe model with its ``set:`` overrides, its ``options``
are ones its kind accepts (with values of the right type), and its folder, when it exists, was written by this
pipeline: the state file records each finished stage's output (content hash and files), and a folder without
such a record, or holding other files, is refused unless ``force`` (``tbps-compress run --force``) says to replace
it.
"""

from __future__ import annotations

import difflib
import hashlib
import inspect
import json
import logging
import os
import re
import time
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, TypeAdapter, ValidationError, field_validator, model_validator

from .config import Strict, apply_overrides, format_validation_error, read_yaml, validate
from .errors import ConfigError, UserError

log = logging.getLogger(__name__)

STAGE_KINDS = ("train", "distill", "prune", "export", "quantize", "bench")
RECIPE_KINDS = ("train", "distill", "prune")
STATE_FILE = "pipeline_state.json"
OUTPUTS_KEY = "@outputs"  # state entry: stage name -> {"hash", "files"} of the output it wrote ('@': no stage name)
BENCH_MARKER = "bench.json"
_STAGE_NAME = re.compile(r"[A-Za-z0-9_.-]+")
# Keyword arguments of a stage's function that the pipeline itself passes (not options).
_PIPELINE_ARGS = {
    "export": {"artifact", "out", "force", "parity_data"},
    "quantize": {"src", "out", "force", "eval_data"},
    "bench": {"artifacts", "data", "out", "meta", "force"},
}


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
    kind: Literal["train", "distill", "prune", "export", "quantize", "bench"]
    recipe: str | None = Field(None, description="Stage recipe YAML (train / distill / prune).")
    set: list[str] = Field(default_factory=list, description="Overrides key.path=value for the stage recipe.")
    source: str | None = Field(None, description="Name of the stage whose artifact this stage reads.")
    teacher: str | None = Field(None, description="Name of the stage whose artifact is the teacher.")
    options: dict[str, Any] = Field(default_factory=dict, description="Keyword options of export/quantize/bench.")
    artifacts: list[str] = Field(default_factory=list, description="bench: the stages to benchmark.")

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
            if st.kind in ("train", "distill", "prune") and not st.recipe:
                raise ValueError(f"stage '{st.name}' ({st.kind}) needs a recipe")
            if st.kind in ("distill", "prune") and not st.teacher:
                raise ValueError(f"stage '{st.name}' ({st.kind}) needs a teacher stage")
            if st.kind in ("export", "quantize") and not st.source:
                raise ValueError(f"stage '{st.name}' ({st.kind}) needs a source stage")
            names.append(st.name)
        return self


def load_pipeline(path: Path, overrides: list[str] | None = None) -> PipelineRecipe:
    data = apply_overrides(read_yaml(Path(path)), overrides)
    return validate(PipelineRecipe, data, str(path))


def _recipe_model(kind: str) -> type[BaseModel]:
    if kind == "train":
        from .recipes import TrainRecipe

        return TrainRecipe
    if kind == "distill":
        from .compress.distill import DistillRecipe

        return DistillRecipe
    from .compress.prune import PruneRecipe

    return PruneRecipe


def _stage_function(kind: str) -> Callable[..., Any]:
    if kind == "export":
        from .export.onnx_export import export_onnx

        return export_onnx
    if kind == "quantize":
        from .compress.quantize import quantize_artifact

        return quantize_artifact
    from .bench.runner import run_bench

    return run_bench


def _option_parsers(kind: str) -> dict[str, Callable[[Any], Any]]:
    """Options a stage checks with its own parser (raising :class:`UserError`): name -> parser."""
    if kind == "quantize":
        from .compress.quantize import BACKENDS, CALIB_METHODS, MODES, _parse_towers

        def choice(allowed: tuple[str, ...]) -> Callable[[Any], Any]:
            def check(value: Any) -> Any:
                if value not in allowed:
                    raise UserError(f"got {value!r}; choose one of {', '.join(allowed)}")
                return value

            return check

        return {"mode": choice(MODES), "calib_method": choice(CALIB_METHODS), "backend": choice(BACKENDS),
                "towers": _parse_towers}
    if kind == "bench":
        from .bench.runner import parse_int_list, parse_runtimes

        return {"runtimes": parse_runtimes, "batches": parse_int_list}
    return {}


def stage_options(kind: str) -> dict[str, Any]:
    """The ``options`` a stage kind accepts: name -> type annotation (``Any`` when it cannot be resolved)."""
    if kind in RECIPE_KINDS:
        return {}
    fn = _stage_function(kind)
    try:
        hints = typing.get_type_hints(fn)
    except (NameError, TypeError):  # an annotation that does not resolve: check the names only
        hints = {}
    params = inspect.signature(fn).parameters
    return {name: hints.get(name, Any) for name, p in params.items()
            if name not in _PIPELINE_ARGS[kind] and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}


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
        self._recipes: dict[str, BaseModel] = {}

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

    def _stage_overrides(self, st: StageCfg) -> list[str]:
        """What the pipeline sets in a recipe stage's recipe (after the stage's own ``set:``)."""
        common = [f"output={self.out(st.name)}", f"data.root={self.data}"]
        if st.kind == "distill":
            common.append(f"teacher.artifact={self.out(st.teacher)}")
        elif st.kind == "prune":
            src = self.out(st.source) if st.source else self.out(st.teacher)
            common += [f"teacher.artifact={self.out(st.teacher)}", f"source={src}"]
        return common

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
        data = apply_overrides(data, self._stage_overrides(st), source=f"{where}: pipeline path")
        try:
            return _recipe_model(st.kind).model_validate(data)
        except ValidationError as exc:
            src = f"{where}: recipe {path}" + (" with the stage's set: overrides" if st.set else "")
            raise ConfigError(format_validation_error(exc, src)) from exc

    def _check_options(self, st: StageCfg) -> None:
        where = self._where(st)
        accepted = stage_options(st.kind)
        if st.kind in RECIPE_KINDS:
            if st.options:
                raise ConfigError(f"{where}: takes no options (got {sorted(st.options)}); set recipe keys with "
                                  "'set: [key.path=value]'")
            return
        if st.recipe or st.set:
            raise ConfigError(f"{where}: takes no recipe and no set: overrides; give its settings as options "
                              f"(valid keys: {', '.join(sorted(accepted))})")
        parsers = _option_parsers(st.kind)
        for key, value in st.options.items():
            if key not in accepted:
                close = difflib.get_close_matches(key, list(accepted), n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise ConfigError(f"{where}: unknown option '{key}'{hint}; valid options: "
                                  f"{', '.join(sorted(accepted))}")
            if key in parsers:  # the stage's own parser (it accepts more than the annotation says)
                try:
                    parsers[key](value)
                except UserError as exc:
                    raise ConfigError(f"{where}: option '{key}': {exc}") from None
                continue
            annotation = accepted[key]
            if annotation is Any:
                continue
            try:
                adapter = TypeAdapter(annotation)
            except Exception:  # noqa: BLE001 - a type pydantic cannot validate: the name check is all
                continue
            try:
                adapter.validate_python(value)
            except ValidationError as exc:
                msg = exc.errors()[0]["msg"] if exc.errors() else str(exc)
                raise ConfigError(f"{where}: option '{key}': {msg} (got {value!r})") from None

    def validate_stages(self) -> None:
        """Check every stage's recipe (with its ``set:``) and options; raise :class:`ConfigError` naming the pipeline
        file and the stage. Nothing is written."""
        self._recipes = {}
        for st in self.recipe.stages:
            self._check_options(st)
            if st.kind in RECIPE_KINDS:
                self._recipes[st.name] = self.load_stage_recipe(st)

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
        if st.kind in RECIPE_KINDS:
            r = self._recipes.get(st.name) or self.load_stage_recipe(st)
        if st.kind == "train":
            from .engine.train import Trainer

            return Trainer(r, progress=progress).run(resume=resume, force=force)
        if st.kind == "distill":
            from .compress.distill import run_distill

            return run_distill(r, resume=resume, force=force, progress=progress)
        if st.kind == "prune":
            from .compress.prune import run_prune

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
            # the folder was checked to be this pipeline's own output (check_stage_folders) before any stage ran
            return run_bench(arts, self.data, out=out, **{**st.options, "force": True})
        raise ConfigError(f"unknown stage kind {st.kind}")

    @staticmethod
    def _resumable(out: Path) -> bool:
        return (out.parent / f"{out.name}.ckpt" / "last.ckpt").exists() or (out.parent / f"{out.name}.steps").is_dir()
