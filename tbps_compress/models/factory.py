"""Build CLIP models from configs: open_clip's towers with :class:`PrunableAttention` swapped in.

Outputs equal open_clip's own forward for the same weights (the swap copies the packed projection). Pruned
models carry per-block sizes in their config and are rebuilt from it alone, without pickle.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from .attention import PrunableAttention
from .config import block_sizes, family_module, get_model_config, image_size_hw, model_family, validate_model_config
from .meta import meta_of, set_meta
from .stem import ConvStem, stem_macs

log = logging.getLogger(__name__)

SOT_TOKEN = 49406
EOT_TOKEN = 49407


def _open_clip_model(cfg: dict[str, Any]) -> nn.Module:
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    v = dict(cfg["vision_cfg"])
    t = dict(cfg["text_cfg"])
    v["image_size"] = tuple(v["image_size"])
    stem = v.pop("stem_channels", None)
    stem_blocks = int(v.pop("stem_blocks", 0) or 0)
    # Per-block sizes are applied after construction; build with head counts that always divide the width.
    if cfg.get("vision_blocks"):
        v["head_width"] = v["width"]
    if cfg.get("text_blocks"):
        t["heads"] = 1
    model = CLIP(
        embed_dim=cfg["embed_dim"],
        vision_cfg=CLIPVisionCfg(**v),
        text_cfg=CLIPTextCfg(**t),
        quick_gelu=bool(cfg.get("quick_gelu", False)),
    )
    if stem:
        model.visual.conv1 = ConvStem(stem, v["width"], v["patch_size"], stem_blocks)
    return model


def is_blockwise(model: nn.Module) -> bool:
    """Whether ``model`` has transformer blocks (an open_clip CLIP) that block-level operations can act on."""
    return model_family(meta_of(model).config or {}) == "clip"


def require_blocks(model: nn.Module, operation: str) -> None:
    """Raise a ConfigError when ``operation`` (pruning, layer inheritance, ...) meets a model without blocks."""
    if not is_blockwise(model):
        family = model_family(meta_of(model).config or {})
        raise ConfigError(f"{operation} works on transformer blocks, and model family '{family}' has none; "
                          "use an open_clip (ViT) config for it")


def context_length(model: nn.Module) -> int:
    """The number of token positions a model's text tower takes (a CLIP's position table; else its attribute)."""
    table = getattr(model, "positional_embedding", None)
    return int(table.shape[0]) if table is not None else int(model.context_length)


def tower_blocks(model: nn.Module, tower: str) -> nn.ModuleList:
    """The residual blocks of the 'vision' or 'text' tower."""
    require_blocks(model, f"reading the {tower} tower's blocks")
    if tower == "vision":
        return model.visual.transformer.resblocks
    if tower == "text":
        return model.transformer.resblocks
    raise ValueError(f"tower must be 'vision' or 'text', got {tower!r}")


def _apply_blocks(model: nn.Module, cfg: dict[str, Any], tower: str) -> None:
    sizes = block_sizes(cfg, tower)
    for blk, size in zip(tower_blocks(model, tower), sizes, strict=True):
        attn = blk.attn
        if isinstance(attn, nn.MultiheadAttention):
            width = attn.embed_dim
            if attn.num_heads == size["heads"] and attn.head_dim == size["head_dim"]:
                blk.attn = PrunableAttention.from_mha(attn)
            else:
                blk.attn = PrunableAttention(width, size["heads"], size["head_dim"])
        fc = blk.mlp.c_fc
        if fc.out_features != size["mlp_dim"]:
            blk.mlp.c_fc = nn.Linear(fc.in_features, size["mlp_dim"])
            blk.mlp.c_proj = nn.Linear(size["mlp_dim"], fc.in_features)


def build_model(cfg: dict[str, Any] | str) -> nn.Module:
    """An open_clip ``CLIP`` for a config (dict, registered name or JSON path), with prunable attention.

    The returned module carries its :class:`~tbps_compress.models.meta.ModelMeta` (``meta_of(model).config``: the
    validated config dict).
    """
    if not isinstance(cfg, dict):
        cfg = get_model_config(cfg)
    cfg = validate_model_config(cfg)
    module = family_module(cfg)
    if module is not None:
        model = module.build(cfg)
        set_meta(model, config=cfg)
        return model
    model = _open_clip_model(cfg)
    for tower in ("vision", "text"):
        _apply_blocks(model, cfg, tower)
    set_meta(model, config=cfg)
    return model


def set_text_attn_dropout(model: nn.Module, p: float) -> None:
    """Dropout on the attention weights of the text tower only (a TBPS-CLIP trick); a model without attention
    blocks has nothing to apply it to (logged when ``p`` is not 0)."""
    if not is_blockwise(model):
        if p:
            log.info("tricks.text_attn_dropout %.3g not applied: model family '%s' has no attention blocks", p,
                     model_family(meta_of(model).config or {}))
        return
    for blk in tower_blocks(model, "text"):
        blk.attn.attn_dropout = float(p)


def config_from_model(model: nn.Module, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """Read the current architecture (after pruning) back into a config with per-block sizes."""
    base = copy.deepcopy(base if base is not None else meta_of(model).config)
    module = family_module(base)
    if module is not None:
        return module.config_from_model(model, base)
    cfg = {k: v for k, v in base.items() if k not in ("vision_blocks", "text_blocks")}
    v, t = dict(cfg["vision_cfg"]), dict(cfg["text_cfg"])
    v["width"] = int(model.visual.conv1.out_channels)
    v["layers"] = len(tower_blocks(model, "vision"))
    t["width"] = int(model.token_embedding.embedding_dim)
    t["vocab_size"] = int(model.token_embedding.num_embeddings)
    t["layers"] = len(tower_blocks(model, "text"))
    t["context_length"] = int(model.positional_embedding.shape[0])
    cfg["embed_dim"] = int(model.visual.proj.shape[1])
    for tower in ("vision", "text"):
        sizes = []
        for blk in tower_blocks(model, tower):
            heads = int(blk.attn.num_heads)
            inner = int(blk.attn.qkv.out_features) // 3
            sizes.append({"heads": heads, "head_dim": inner // heads, "mlp_dim": int(blk.mlp.c_fc.out_features)})
        cfg[f"{tower}_blocks"] = sizes
    cfg["vision_cfg"], cfg["text_cfg"] = v, t
    uniform_v = block_sizes({**cfg, "vision_blocks": None}, "vision") if v["width"] % v["head_width"] == 0 else None
    uniform_t = block_sizes({**cfg, "text_blocks": None}, "text") if t["width"] % t["heads"] == 0 else None
    if uniform_v == cfg["vision_blocks"]:
        del cfg["vision_blocks"]
    if uniform_t == cfg["text_blocks"]:
        del cfg["text_blocks"]
    return validate_model_config(cfg)


def encode_image(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """L2-normalised image embeddings."""
    return model.encode_image(images, normalize=True)


def encode_text(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """L2-normalised text embeddings (pooled at the end-of-text token: the highest id)."""
    return model.encode_text(tokens, normalize=True)


_EMBEDDING_PARAMS = ("token_embedding.weight", "positional_embedding", "visual.positional_embedding",
                     "visual.class_embedding")


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Parameter counts: total, non-embedding (no token/position/class embeddings), and per tower."""
    out = {"total": 0, "non_embedding": 0, "vision": 0, "text": 0}
    for name, p in model.named_parameters():
        n = p.numel()
        out["total"] += n
        if name not in _EMBEDDING_PARAMS:
            out["non_embedding"] += n
        if name.startswith("visual."):
            out["vision"] += n
        elif name != "logit_scale":
            out["text"] += n
    return out


def count_macs(cfg: dict[str, Any]) -> dict[str, int]:
    """Multiply-accumulates of one image and one caption forward pass, counted from the config's matrix products
    (linear layers, attention scores and values, patch embedding, projections)."""
    module = family_module(cfg)
    if module is not None:
        return module.count_macs(cfg)
    out: dict[str, int] = {}
    h, w = image_size_hw(cfg)
    v = cfg["vision_cfg"]
    t = cfg["text_cfg"]
    for tower, tokens, width in (
        ("vision", (h // v["patch_size"]) * (w // v["patch_size"]) + 1, v["width"]),
        ("text", t["context_length"], t["width"]),
    ):
        macs = 0
        for blk in block_sizes(cfg, tower):
            inner = blk["heads"] * blk["head_dim"]
            macs += tokens * (width * 3 * inner + inner * width)  # qkv and output projections
            macs += 2 * tokens * tokens * inner  # scores and weighted values
            macs += 2 * tokens * width * blk["mlp_dim"]  # MLP
        if tower == "vision" and v.get("stem_channels"):
            macs += stem_macs(v["stem_channels"], width, v["patch_size"], (h, w),
                               v.get("stem_blocks", 0)) + width * cfg["embed_dim"]
        elif tower == "vision":
            macs += (tokens - 1) * 3 * v["patch_size"] ** 2 * width + width * cfg["embed_dim"]
        else:
            macs += width * cfg["embed_dim"]
        out[tower] = int(macs)
    return out
