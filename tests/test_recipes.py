"""Every committed recipe loads with its stage's schema, names registered model configs and survives dump/load.

The schema of a recipe is picked by its folder under ``recipes/``; extend ``SCHEMAS`` when a stage gets one.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import pytest

from tbps_compress.config import dump_recipe, load_recipe
from tbps_compress.models.config import get_model_config

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"

# folder under recipes/ -> "module:Class" of the pydantic schema its YAML files must load with
SCHEMAS = {
    "teacher": "tbps_compress.recipes:TrainRecipe",
    "distill": "tbps_compress.compress.distill:DistillRecipe",
    "prune": "tbps_compress.compress.prune:PruneRecipe",
    "pipeline": "tbps_compress.pipeline:PipelineRecipe",
}
# pipeline stage kind -> recipes/ folder whose schema its stage recipe uses
STAGE_FOLDERS = {"train": "teacher", "distill": "distill", "prune": "prune"}


def _schema(folder: str) -> type:
    if folder not in SCHEMAS:
        pytest.fail(f"recipes/{folder}/ has no entry in SCHEMAS (tests/test_recipes.py); add its schema")
    module_name, cls_name = SCHEMAS[folder].split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and module_name.startswith(exc.name):
            pytest.skip(f"no schema yet: {module_name} does not exist")
        raise
    if not hasattr(module, cls_name):
        pytest.skip(f"no schema yet: {module_name} has no {cls_name}")
    return getattr(module, cls_name)


def _recipe_files() -> list[Path]:
    return sorted(p for p in RECIPES.rglob("*") if p.suffix in (".yaml", ".yml"))


def _model_configs(recipe: Any) -> list[str]:
    names = []
    for section in ("model", "student"):
        name = getattr(getattr(recipe, section, None), "config", None)
        if isinstance(name, str):
            names.append(name)
    return names


def test_recipes_exist() -> None:
    files = _recipe_files()
    assert any(p.parent.name == "teacher" for p in files)
    assert {p.relative_to(RECIPES).parts[0] for p in files} <= set(SCHEMAS)


@pytest.mark.parametrize("path", _recipe_files(), ids=lambda p: str(p.relative_to(RECIPES)))
def test_recipe_loads_and_round_trips(path: Path, tmp_path: Path) -> None:
    folder = path.relative_to(RECIPES).parts[0]
    schema = _schema(folder)
    recipe = load_recipe(path, schema)
    for name in _model_configs(recipe):
        get_model_config(name if not name.endswith(".json") else ROOT / name)
    dumped = tmp_path / "resolved.yaml"
    dump_recipe(recipe, dumped)
    assert load_recipe(dumped, schema).model_dump() == recipe.model_dump()


@pytest.mark.parametrize(
    "path", [p for p in _recipe_files() if p.parent.name == "pipeline"],
    ids=lambda p: str(p.relative_to(RECIPES)),
)
def test_pipeline_stage_recipes_load(path: Path) -> None:
    pipeline = load_recipe(path, _schema("pipeline"))
    for stage in pipeline.stages:
        if stage.recipe is None:
            continue
        stage_path = ROOT / stage.recipe
        assert stage_path.is_file(), f"{path}: stage '{stage.name}' names a missing recipe {stage.recipe}"
        schema = _schema(STAGE_FOLDERS[stage.kind])
        load_recipe(stage_path, schema, stage.set)
