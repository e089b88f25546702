"""The metadata a model carries: one object attached to the module, as open_clip and timm attach their configs.

:class:`ModelMeta` holds the model's validated config (``model_config.json``), and, for a model whose token table
was cut to a training vocabulary (``model.vocab_prune``), the map from CLIP token ids to rows of that table and the
row of unknown tokens. :func:`build_model` and :func:`load_model` attach it; readers use :func:`meta_of`, writers
:func:`set_meta`; nothing else is stored on the module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

ATTR = "tbps_meta"
_FIELDS = ("config", "vocab_map", "unk_id")


@dataclass
class ModelMeta:
    config: dict[str, Any] | None = None  # the validated model config (None: a module built elsewhere)
    vocab_map: dict[int, int] | None = None  # CLIP token id -> row of a pruned token table
    unk_id: int | None = None  # the row unknown tokens map to (pruned tables only)


def meta_of(model: Any) -> ModelMeta:
    """The model's :class:`ModelMeta` (an empty one, not attached, when the module carries none)."""
    meta = getattr(model, ATTR, None)
    return meta if isinstance(meta, ModelMeta) else ModelMeta()


def set_meta(model: Any, **fields: Any) -> ModelMeta:
    """Set the given fields of the model's metadata (attaching it first if needed); returns it."""
    bad = sorted(set(fields) - set(_FIELDS))
    if bad:
        raise TypeError(f"unknown model metadata field(s) {bad}; fields: {', '.join(_FIELDS)}")
    meta = getattr(model, ATTR, None)
    if not isinstance(meta, ModelMeta):
        meta = ModelMeta()
        setattr(model, ATTR, meta)
    for key, value in fields.items():
        setattr(meta, key, value)
    return meta
