"""The stage registry: each stage of the tool is one registered function with a typed (pydantic) config.

``tbps-compress train|distill|prune|export|quantize|bench`` and ``tbps-compress run`` (the pipeline) both dispatch
through :func:`run_stage`, so a stage behaves the same whichever way it is started, and a pipeline validates every
stage's config with the very model the stage runs with (:func:`stage_config`) before the first stage runs.

A stage is ``run(config, out=..., inputs=..., data=..., force=..., resume=..., progress=...)``:

- ``config``: the stage's config object. For ``train``, ``distill`` and ``prune`` it is the recipe (a YAML file,
  validated into :class:`~tbps_compress.recipes.TrainRecipe`, ``DistillRecipe`` or ``PruneRecipe``); for ``export``,
  ``quantize`` and ``bench`` it is ``ExportCfg`` (``export/onnx_export.py``), ``QuantizeCfg``
  (``export/quantize.py``) or ``BenchCfg`` (``bench/runner.py``): the CLI flags, or a pipeline stage's
  ``options``. Each config lives beside the function it configures.
- ``out``: the folder the stage writes (for a recipe stage ``None`` keeps the recipe's ``output``).
- ``inputs``: the input artifacts by role, as paths: ``source`` (export, quantize, prune), ``teacher`` (distill,
  prune), ``artifacts`` (bench, a list). A recipe stage's inputs replace the recipe's own paths.
- ``data``: the dataset root (a recipe's ``data.root``; export's parity samples; quantize's metrics and static
  calibration; bench's retrieval metrics).

Registering a stage (:func:`register_stage`) adds it to both the CLI's dispatch and the pipeline's ``kind:``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from .errors import ConfigError


@dataclass(frozen=True)
class Stage:
    """One registered stage: its kind, its config model (``module:Class``, imported on first use), the roles of its
    input artifacts, whether its config is a recipe file, and the function that runs it."""

    kind: str
    config_ref: str
    inputs: tuple[str, ...]
    required: tuple[str, ...]
    recipe: bool
    run: Callable[..., Any]
    help: str = ""

    @property
    def config(self) -> type[BaseModel]:
        module, name = self.config_ref.split(":")
        return getattr(importlib.import_module(module), name)


_REGISTRY: dict[str, Stage] = {}


def register_stage(kind: str, config: str, inputs: tuple[str, ...] = (), required: tuple[str, ...] | None = None,
                   recipe: bool = False, help: str = "") -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: register ``fn(config, *, out, inputs, data, force, resume, progress)`` as stage ``kind``.
    ``inputs``: the roles of its input artifacts; ``required``: those a pipeline stage must name (default all)."""

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        if kind in _REGISTRY:
            raise ValueError(f"stage kind '{kind}' is already registered")
        need = tuple(inputs) if required is None else tuple(required)
        _REGISTRY[kind] = Stage(kind, config, tuple(inputs), need, recipe, fn, help)
        return fn

    return deco


def stage_kinds() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def get_stage(kind: str) -> Stage:
    try:
        return _REGISTRY[kind]
    except KeyError:
        raise ConfigError(f"unknown stage kind '{kind}'; registered: {', '.join(_REGISTRY)}") from None


def stage_config(kind: str, data: dict[str, Any], source: str, labels: dict[str, str] | None = None) -> BaseModel:
    """Validate ``data`` into stage ``kind``'s config. A mistake is one :class:`ConfigError` line naming ``source``
    and the key, shown as ``labels[key]`` when given (the CLI passes its flag names)."""
    from pydantic import ValidationError

    from .config import format_validation_error

    try:
        return get_stage(kind).config.model_validate(data)
    except ValidationError as exc:
        if labels is None:
            raise ConfigError(format_validation_error(exc, source)) from None
        err = exc.errors()[0]
        key = str(err["loc"][0]) if err["loc"] else ""
        label = labels.get(key, key)
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] != "value_error":
            msg = f"{msg} (got {err.get('input')!r})"
        raise ConfigError(f"{source}: {msg}" if msg.startswith(label) else f"{source}: {label}: {msg}") from None


def run_stage(kind: str, config: BaseModel, *, out: Path | None = None, inputs: dict[str, Any] | None = None,
              data: Path | None = None, force: bool = False, resume: bool = False, progress: Any = None) -> Any:
    """Run stage ``kind`` with a validated ``config`` (see the module docs); returns what the stage returns (an
    artifact folder, an export / quantisation report, or the bench rows)."""
    st = get_stage(kind)
    if not isinstance(config, st.config):
        raise TypeError(f"stage '{kind}' takes a {st.config.__name__}, got {type(config).__name__}")
    inputs = dict(inputs or {})
    unknown = sorted(set(inputs) - set(st.inputs))
    if unknown:
        raise TypeError(f"stage '{kind}' takes inputs {st.inputs}, got {unknown}")
    return st.run(config, out=out, inputs=inputs, data=data, force=force, resume=resume, progress=progress)


def with_paths(recipe: BaseModel, out: Path | None, data: Path | None, paths: dict[str, Any]) -> BaseModel:
    """A recipe with its output, ``data.root`` and input-artifact keys (dotted ``paths``) replaced, re-validated (so
    its validators see the final paths)."""
    if out is None and data is None and not paths:
        return recipe
    doc = recipe.model_dump(mode="json")
    updates = dict(paths)
    if out is not None:
        updates["output"] = out
    if data is not None:
        updates["data.root"] = data
    for key, value in updates.items():
        node = doc
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = str(value)
    return type(recipe).model_validate(doc)


# ------------------------------------------------------------------------------------------------ the stages
@register_stage("train", "tbps_compress.recipes:TrainRecipe", recipe=True,
                help="Train a TBPS-CLIP teacher (recipes/teacher/).")
def _train(cfg: Any, *, out: Path | None, inputs: dict[str, Any], data: Path | None, force: bool, resume: bool,
           progress: Any) -> Path:
    from .engine.train import Trainer

    return Trainer(with_paths(cfg, out, data, {}), progress=progress).run(resume=resume, force=force)


@register_stage("distill", "tbps_compress.compress.distill:DistillRecipe", inputs=("teacher",), recipe=True,
                help="Distil a teacher artifact into a smaller student (recipes/distill/).")
def _distill(cfg: Any, *, out: Path | None, inputs: dict[str, Any], data: Path | None, force: bool, resume: bool,
             progress: Any) -> Path:
    from .compress.distill import run_distill

    paths = {"teacher.artifact": inputs["teacher"]} if "teacher" in inputs else {}
    return run_distill(with_paths(cfg, out, data, paths), resume=resume, force=force, progress=progress)


@register_stage("prune", "tbps_compress.compress.prune:PruneRecipe", inputs=("teacher", "source"),
                required=("teacher",), recipe=True,
                help="Prune widths, heads and layers with recovery (recipes/prune/).")
def _prune(cfg: Any, *, out: Path | None, inputs: dict[str, Any], data: Path | None, force: bool, resume: bool,
           progress: Any) -> Path:
    from .compress.prune import run_prune

    paths = {}
    if "teacher" in inputs:
        paths["teacher.artifact"] = inputs["teacher"]
    if "source" in inputs:
        paths["source"] = inputs["source"]
    return run_prune(with_paths(cfg, out, data, paths), resume=resume, force=force, progress=progress)


def _need(kind: str, inputs: dict[str, Any], role: str) -> Any:
    if role not in inputs:
        raise ConfigError(f"stage '{kind}' needs its '{role}' artifact")
    return inputs[role]


@register_stage("export", "tbps_compress.export.onnx_export:ExportCfg", inputs=("source",),
                help="Export a PyTorch artifact to ONNX and prove parity.")
def _export(cfg: Any, *, out: Path | None, inputs: dict[str, Any], data: Path | None, force: bool, resume: bool,
            progress: Any) -> dict:
    from .export.onnx_export import export_onnx

    return export_onnx(Path(_need("export", inputs, "source")), Path(out), force=force, parity_data=data,
                       **cfg.model_dump())


@register_stage("quantize", "tbps_compress.export.quantize:QuantizeCfg", inputs=("source",),
                help="Quantise an ONNX artifact (dynamic / static int8, fp16).")
def _quantize(cfg: Any, *, out: Path | None, inputs: dict[str, Any], data: Path | None, force: bool, resume: bool,
              progress: Any) -> dict:
    from .export.quantize import quantize_artifact

    opts = cfg.model_dump()
    calib = opts.pop("calib_data")
    if calib is None and opts["mode"] == "static":
        calib = data  # static calibration reads the stage's dataset unless told otherwise
    opts["calib_data"] = Path(calib) if calib is not None else None
    return quantize_artifact(Path(_need("quantize", inputs, "source")), Path(out), force=force, eval_data=data,
                             **opts)


@register_stage("bench", "tbps_compress.bench.runner:BenchCfg", inputs=("artifacts",),
                help="Accuracy against latency of artifacts x runtimes x precisions.")
def _bench(cfg: Any, *, out: Path | None, inputs: dict[str, Any], data: Path | None, force: bool, resume: bool,
           progress: Any) -> list[dict[str, Any]]:
    from .bench.runner import run_bench

    arts = [Path(a) for a in _need("bench", inputs, "artifacts")]
    return run_bench(arts, data, out=out, force=force, **cfg.model_dump())
