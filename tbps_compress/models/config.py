"""Model configurations: open_clip's JSON schema plus optional per-block sizes for pruned models.

A config is a plain dict (JSON-serialisable) with ``embed_dim``, ``quick_gelu``, ``vision_cfg``, ``text_cfg`` as in
open_clip, and optionally ``vision_blocks`` / ``text_blocks``: one ``{"heads", "head_dim", "mlp_dim"}`` entry per
transformer block. Absent block lists mean uniform blocks derived from the tower config. Registered configs live in
``models/configs/*.json``; ``list_models()`` names them.
"""

from __future__ import annotations

import copy
import json
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import ConfigError

_CONFIG_PACKAGE = "tbps_compress.models.configs"
_REQUIRED = ("embed_dim", "vision_cfg", "text_cfg")
_ALLOWED_TOP = {"description", "embed_dim", "quick_gelu", "vision_cfg", "text_cfg", "vision_blocks", "text_blocks",
                "name"}
_VISION_KEYS = {"image_size", "layers", "width", "patch_size", "head_width", "mlp_ratio", "stem_channels",
                "stem_blocks"}
_TEXT_KEYS = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio"}


def list_models() -> list[str]:
    """Names of the registered model configs."""
    files = resources.files(_CONFIG_PACKAGE).iterdir()
    return sorted(f.name[:-5] for f in files if f.name.endswith(".json"))


def get_model_config(name_or_path: str | Path) -> dict[str, Any]:
    """A registered config by name, or a JSON file by path, validated and with ``name`` set."""
    path = Path(str(name_or_path))
    if path.suffix == ".json" and path.exists():
        try:
            cfg = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{path}: not a readable JSON model config ({exc})") from exc
        cfg.setdefault("name", path.stem)
        return validate_model_config(cfg, source=str(path))
    name = str(name_or_path)
    if name not in list_models():
        raise ConfigError(
            f"unknown model config '{name}'; registered: {', '.join(list_models())} (or give a path to a .json file)"
        )
    text = resources.files(_CONFIG_PACKAGE).joinpath(f"{name}.json").read_text(encoding="utf-8")
    cfg = json.loads(text)
    cfg["name"] = name
    return validate_model_config(cfg, source=name)


def positive_int(value: Any, key: str, source: str) -> int:
    """``value`` if it is a positive int (not a bool), else a ConfigError naming ``key`` in ``source``."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{source}: '{key}' must be a positive integer, got {value!r}")
    return value


def image_size_hw(cfg: dict[str, Any]) -> tuple[int, int]:
    """(height, width) of the image tower input."""
    size = cfg["vision_cfg"]["image_size"]
    if isinstance(size, int):
        return size, size
    return int(size[0]), int(size[1])


def validate_model_config(cfg: dict[str, Any], source: str = "model config") -> dict[str, Any]:
    """Check keys, types and divisibility; fill defaults; return a deep copy."""
    if not isinstance(cfg, dict):
        raise ConfigError(f"{source}: a model config must be a JSON object")
    module = family_module(cfg, source)
    if module is not None:
        return module.validate(cfg, source)
    cfg = copy.deepcopy(cfg)
    cfg.pop("family", None)
    for key in _REQUIRED:
        if key not in cfg:
            raise ConfigError(f"{source}: missing key '{key}'")
    unknown = set(cfg) - _ALLOWED_TOP
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {sorted(unknown)}; allowed: {sorted(_ALLOWED_TOP)}")
    positive_int(cfg["embed_dim"], "embed_dim", source)
    cfg.setdefault("quick_gelu", False)
    v, t = cfg["vision_cfg"], cfg["text_cfg"]
    for tower, keys, allowed in (("vision_cfg", v, _VISION_KEYS), ("text_cfg", t, _TEXT_KEYS)):
        if not isinstance(keys, dict):
            raise ConfigError(f"{source}: '{tower}' must be an object")
        extra = set(keys) - allowed
        if extra:
            raise ConfigError(f"{source}: unknown key(s) {sorted(extra)} in '{tower}'; allowed: {sorted(allowed)}")
    for key in ("layers", "width", "patch_size"):
        positive_int(v.get(key), f"vision_cfg.{key}", source)
    v.setdefault("head_width", 64)
    v.setdefault("mlp_ratio", 4.0)
    positive_int(v["head_width"], "vision_cfg.head_width", source)
    size = v.get("image_size", 224)
    hw = (size, size) if isinstance(size, int) else tuple(size)
    if len(hw) != 2 or any(isinstance(s, bool) or not isinstance(s, int) or s <= 0 for s in hw):
        raise ConfigError(f"{source}: 'vision_cfg.image_size' must be an int or [height, width], got {size!r}")
    if hw[0] % v["patch_size"] or hw[1] % v["patch_size"]:
        raise ConfigError(
            f"{source}: 'vision_cfg.image_size' {list(hw)} is not divisible by patch_size {v['patch_size']}"
        )
    v["image_size"] = list(hw)
    stem = v.get("stem_channels")
    if stem:
        if not isinstance(stem, list) or any(isinstance(c, bool) or not isinstance(c, int) or c <= 0 for c in stem):
            raise ConfigError(f"{source}: 'vision_cfg.stem_channels' must be a list of positive integers, got {stem!r}")
        if v["patch_size"] % 2 ** len(stem):
            raise ConfigError(
                f"{source}: 'vision_cfg.stem_channels' has {len(stem)} stride-2 layers, so patch_size "
                f"{v['patch_size']} must be divisible by {2 ** len(stem)}; use fewer stem layers or a larger patch"
            )
        blocks = v.get("stem_blocks", 0)
        if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 0:
            raise ConfigError(f"{source}: 'vision_cfg.stem_blocks' must be a non-negative integer, got {blocks!r}")
        if not blocks:
            v.pop("stem_blocks", None)
    else:
        if v.get("stem_blocks"):
            raise ConfigError(f"{source}: 'vision_cfg.stem_blocks' needs 'vision_cfg.stem_channels' (the stages "
                              "the residual blocks follow); add stem_channels or remove stem_blocks")
        v.pop("stem_channels", None)
        v.pop("stem_blocks", None)
    if not cfg.get("vision_blocks") and v["width"] % v["head_width"]:
        raise ConfigError(
            f"{source}: vision width {v['width']} is not divisible by head_width {v['head_width']}; "
            "choose a head_width that divides the width"
        )
    for key in ("layers", "width", "heads", "context_length", "vocab_size"):
        positive_int(t.get(key), f"text_cfg.{key}", source)
    t.setdefault("mlp_ratio", 4.0)
    if not cfg.get("text_blocks") and t["width"] % t["heads"]:
        raise ConfigError(
            f"{source}: text width {t['width']} is not divisible by heads {t['heads']}; choose heads that divide it"
        )
    for tower in ("vision", "text"):
        key = f"{tower}_blocks"
        if key in cfg and cfg[key] is not None:
            blocks = cfg[key]
            layers = cfg[f"{tower}_cfg"]["layers"]
            if not isinstance(blocks, list) or len(blocks) != layers:
                raise ConfigError(f"{source}: '{key}' must list one entry per layer ({layers})")
            for i, blk in enumerate(blocks):
                if not isinstance(blk, dict) or set(blk) != {"heads", "head_dim", "mlp_dim"}:
                    raise ConfigError(f"{source}: '{key}[{i}]' must be {{heads, head_dim, mlp_dim}}, got {blk!r}")
                for k in ("heads", "head_dim", "mlp_dim"):
                    positive_int(blk[k], f"{key}[{i}].{k}", source)
    return cfg


# Model families other than open_clip's CLIP: family name -> the module that implements it. A family module provides
# validate(cfg, source), build(cfg), config_from_model(model, base) and count_macs(cfg); validation, the factory,
# saving and the MAC count dispatch through it.
FAMILIES = {"stripe-gru": "tbps_compress.models.stripe_gru"}


def model_family(cfg: dict[str, Any]) -> str:
    """'clip' (open_clip towers with transformer blocks, the default) or a name in :data:`FAMILIES`."""
    return str(cfg.get("family", "clip"))


def family_module(cfg: dict[str, Any], source: str = "model config") -> Any:
    """The module of a config's family, or ``None`` for 'clip'; an unknown family is a ConfigError."""
    family = model_family(cfg)
    if family == "clip":
        return None
    if family not in FAMILIES:
        raise ConfigError(f"{source}: 'family' must be 'clip' (open_clip towers, the default) or one of "
                          f"{', '.join(sorted(FAMILIES))}, got {family!r}")
    import importlib

    return importlib.import_module(FAMILIES[family])


def block_sizes(cfg: dict[str, Any], tower: str) -> list[dict[str, int]]:
    """Per-block ``heads``, ``head_dim`` and ``mlp_dim`` of a tower ('vision' or 'text')."""
    blocks = cfg.get(f"{tower}_blocks")
    if blocks:
        return [dict(b) for b in blocks]
    tcfg = cfg[f"{tower}_cfg"]
    width = tcfg["width"]
    if tower == "vision":
        heads = width // tcfg["head_width"]
    else:
        heads = tcfg["heads"]
    mlp = int(width * float(tcfg.get("mlp_ratio", 4.0)))
    return [{"heads": heads, "head_dim": width // heads, "mlp_dim": mlp} for _ in range(tcfg["layers"])]


def dump_model_config(cfg: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
