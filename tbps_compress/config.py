"""Recipe loading: YAML (safe) -> pydantic stage models with strict keys, ``--set key.path=value`` overrides,
and error messages that name the file, the key path, the value received and what is allowed."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import ConfigError, UserError

M = TypeVar("M", bound=BaseModel)


class Strict(BaseModel):
    """Base for recipe sections: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def read_yaml(path: Path) -> dict[str, Any]:
    """Safely parse a YAML mapping; a clear error for missing, empty, non-UTF-8 or malformed files."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: recipe file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}); save the recipe as UTF-8") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: YAML syntax error{at}: {problem}") from exc
    if data is None:
        raise ConfigError(f"{path}: the recipe is empty; see recipes/ for examples")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a YAML mapping of keys to values, got {type(data).__name__}")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str] | None, source: str = "--set") -> dict[str, Any]:
    """Apply ``key.path=value`` overrides (values parsed as YAML scalars/lists) to a nested mapping."""
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"{source} {item!r}: expected key.path=value")
        key, raw = item.split("=", 1)
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise ConfigError(f"{source} {item!r}: empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:  # one line: the problem without PyYAML's multi-line context
            problem = getattr(exc, "problem", None) or (str(exc).splitlines() or ["?"])[0]
            raise ConfigError(f"{source} {item!r}: value is not valid YAML ({problem})") from exc
        node = data
        for p in parts[:-1]:
            child = node.get(p)
            if child is None:
                child = node[p] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"{source} {item!r}: '{p}' is not a section")
            node = child
        node[parts[-1]] = value
    return data


def format_validation_error(exc: ValidationError, source: str) -> str:
    parts = []
    for err in exc.errors()[:3]:
        loc = ".".join(str(x) for x in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            parts.append(f"unknown key '{loc}' (check the spelling; see the recipe reference in README)")
        elif err["type"] == "missing":
            parts.append(f"missing key '{loc}'")
        else:
            value = err.get("input")
            shown = repr(value) if not isinstance(value, dict | list) else type(value).__name__
            if len(shown) > 60:
                shown = shown[:57] + "..."
            parts.append(f"key '{loc}': {msg} (got {shown})")
    more = len(exc.errors()) - 3
    tail = f" (+{more} more)" if more > 0 else ""
    return f"{source}: " + "; ".join(parts) + tail


def validate(model_cls: type[M], data: dict[str, Any], source: str) -> M:
    try:
        return model_cls.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from exc


def load_recipe(path: Path, model_cls: type[M], overrides: list[str] | None = None, section: str | None = None) -> M:
    """Load a recipe file into ``model_cls``; ``section`` picks a sub-mapping (a stage of a pipeline recipe)."""
    data = read_yaml(Path(path))
    if section is not None:
        if section not in data:
            raise ConfigError(f"{path}: no '{section}' section")
        data = data[section]
    data = apply_overrides(data, overrides)
    return validate(model_cls, data, str(path))


def dump_recipe(recipe: BaseModel, path: Path) -> None:
    """Write the fully resolved recipe (every default filled in) as YAML."""
    data = recipe.model_dump(mode="json")
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")


def parsed_or_value_error(parse: Callable[[Any], Any], value: Any) -> Any:
    """``parse(value)``, with a :class:`UserError` re-raised as ``ValueError`` (so a pydantic validator that reuses a
    stage's own parser reports its one-line message under the key it validates)."""
    try:
        return parse(value)
    except UserError as exc:
        raise ValueError(str(exc)) from None
