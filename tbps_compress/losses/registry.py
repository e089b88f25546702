"""Loss registry: losses are picked by name from a recipe and summed with weights.

A loss is a function ``fn(inputs: LossInputs, **params) -> {"<name>_loss": tensor}`` returning its UNWEIGHTED
value. It is registered with :func:`register_loss`, which also records which optional inputs it needs and the
pydantic model that validates its parameters. A recipe names losses as ``{name: {"weight": w, **params}}``;
:class:`LossSet` validates that mapping once and then, per step, returns ``(total, terms)`` where
``total = sum(weight * term)`` and ``terms`` holds each unweighted term (detached) for logging.

Heads owned by losses (the SS-I projection MLP, the ID classifier, KD projections) are built by
:func:`make_modules` so the trainer can put them in its optimiser; they reach the losses through
``LossInputs.modules``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pydantic
import torch
from torch import Tensor, nn

from tbps_compress.errors import ConfigError

logger = logging.getLogger(__name__)

LossFn = Callable[..., dict[str, Tensor]]

# Names of the optional inputs a loss may need (see ``LossInputs``). "teacher" means teacher_image and
# teacher_text; "modules.<key>" means ``LossInputs.modules[<key>]``.
NEED_FIELDS = ("image_mvs", "ssl_a", "ssl_b", "teacher", "student_hidden", "teacher_hidden")

# Ratio hidden/embed of the SS-I MLP head: 512 -> 128 -> 512 for CLIP ViT-B/16 (TBPS-CLIP).
SSL_HEAD_RATIO = 4


class LossParams(pydantic.BaseModel):
    """Base of the per-loss parameter models: unknown keys are rejected."""

    model_config = pydantic.ConfigDict(extra="forbid")


@dataclass
class LossInputs:
    """Everything a loss may read for one step.

    Rows of every similarity matrix are the local batch; columns are the ``all_*`` tensors (the batch gathered
    across ranks WITH gradient, see ``distributed.all_gather_with_grad``). An ``all_*`` left as ``None`` means
    "not distributed": the local tensor is used for the columns.
    """

    image: Tensor  # (b, d) L2-normalised image embeddings, main augmented view
    text: Tensor  # (b, d) L2-normalised text embeddings
    pids: Tensor  # (b,) long identity labels
    logit_scale: Tensor  # scalar: log of the scale, s = exp(logit_scale).clamp(max=100)
    all_image: Tensor | None = None  # (B, d) gathered with gradient
    all_text: Tensor | None = None
    all_pids: Tensor | None = None  # (B,)
    image_mvs: Tensor | None = None  # (b, d) normalised 2nd augmented view (MVS-I)
    all_image_mvs: Tensor | None = None
    ssl_a: Tensor | None = None  # (b, d) raw image embeddings of SimCLR view A (SS-I)
    ssl_b: Tensor | None = None
    progress: float = 1.0  # epochs elapsed as a float; ramps use it
    modules: dict[str, nn.Module] = field(default_factory=dict)
    teacher_image: Tensor | None = None  # (b, D_t) normalised teacher embeddings of the same samples
    teacher_text: Tensor | None = None
    all_teacher_image: Tensor | None = None  # (B, D_t) gathered (no gradient needed)
    all_teacher_text: Tensor | None = None
    student_hidden: dict[str, Tensor] | None = None  # name -> (b, tokens, w)
    teacher_hidden: dict[str, Tensor] | None = None


@dataclass(frozen=True)
class LossEntry:
    """A registered loss."""

    name: str
    fn: LossFn
    needs: tuple[str, ...]
    params: type[pydantic.BaseModel] | None


_REGISTRY: dict[str, LossEntry] = {}


def register_loss(
    name: str, *, needs: tuple[str, ...] = (), params: type[pydantic.BaseModel] | None = None
) -> Callable[[LossFn], LossFn]:
    """Decorator registering ``fn(inputs, **params) -> {"<name>_loss": tensor}`` under ``name``.

    ``needs`` lists the optional ``LossInputs`` it reads (``NEED_FIELDS`` or ``"modules.<key>"``); ``params`` is
    a pydantic model (use ``extra="forbid"``) whose fields are passed as keyword arguments.
    """
    for need in needs:
        if need not in NEED_FIELDS and not need.startswith("modules."):
            raise ValueError(f"loss {name!r}: unknown need {need!r}; expected one of {NEED_FIELDS} or 'modules.<key>'")

    def decorator(fn: LossFn) -> LossFn:
        if name in _REGISTRY:
            raise ValueError(f"loss {name!r} is already registered")
        _REGISTRY[name] = LossEntry(name=name, fn=fn, needs=tuple(needs), params=params)
        return fn

    return decorator


def list_losses() -> list[str]:
    """Names of all registered losses, sorted."""
    return sorted(_REGISTRY)


def get_loss(name: str) -> LossEntry:
    """The registry entry for ``name``; ``ConfigError`` listing the valid names when unknown."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown loss {name!r}; valid losses: {', '.join(list_losses())}") from None


def loss_needs(name: str) -> tuple[str, ...]:
    """Which optional inputs loss ``name`` needs, e.g. ``("image_mvs",)``, ``("ssl_a", "ssl_b", "modules.ssl_head")``.

    Values are ``LossInputs`` field names, ``"teacher"`` (teacher_image + teacher_text) or ``"modules.<key>"``.
    """
    return get_loss(name).needs


def _allowed(entry: LossEntry) -> str:
    fields = ["weight"] + (list(entry.params.model_fields) if entry.params is not None else [])
    return ", ".join(fields)


def _validate_params(entry: LossEntry, cfg: Mapping[str, Any]) -> dict[str, Any]:
    if entry.params is None:
        if cfg:
            key = next(iter(cfg))
            raise ConfigError(
                f"losses.{entry.name}.{key}: unknown parameter (got {cfg[key]!r}); allowed: {_allowed(entry)}"
            )
        return {}
    try:
        model = entry.params.model_validate(dict(cfg))
    except pydantic.ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(part) for part in err["loc"]) or "?"
        value = err.get("input")
        if err["type"] == "extra_forbidden":
            raise ConfigError(
                f"losses.{entry.name}.{key}: unknown parameter (got {value!r}); allowed: {_allowed(entry)}"
            ) from None
        raise ConfigError(f"losses.{entry.name}.{key}: {err['msg']} (got {value!r})") from None
    return model.model_dump()


@dataclass(frozen=True)
class _Term:
    name: str
    weight: float
    params: dict[str, Any]
    entry: LossEntry


def _check_needs(name: str, needs: Iterable[str], inputs: LossInputs) -> None:
    for need in needs:
        if need == "teacher":
            ok = inputs.teacher_image is not None and inputs.teacher_text is not None
            what = "teacher embeddings (teacher_image, teacher_text)"
        elif need.startswith("modules."):
            key = need.split(".", 1)[1]
            ok = key in inputs.modules
            what = f"the module {key!r} (build it with losses.make_modules)"
        else:
            ok = getattr(inputs, need) is not None
            what = f"the input {need!r}"
        if not ok:
            raise ConfigError(f"loss {name!r} needs {what}, which this stage does not provide")


class LossSet:
    """The weighted set of losses named by a recipe: ``{name: {"weight": float, **params}}``.

    ``weight`` defaults to 1.0. Calling it returns ``(total, terms)``: ``total`` is the plain weighted sum of the
    terms (with gradient); ``terms`` maps each ``"<name>_loss"`` to its unweighted, detached value.
    """

    def __init__(self, spec: Mapping[str, Mapping[str, Any] | None]) -> None:
        if not isinstance(spec, Mapping) or not spec:
            raise ConfigError(f"losses: expected a non-empty mapping of loss name to settings, got {spec!r}")
        terms: list[_Term] = []
        for name, raw in spec.items():
            entry = get_loss(name)
            if raw is None:
                raw = {}
            if not isinstance(raw, Mapping):
                raise ConfigError(f"losses.{name}: expected a mapping such as {{weight: 1.0}}, got {raw!r}")
            cfg = dict(raw)
            weight = cfg.pop("weight", 1.0)
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight != weight:
                raise ConfigError(f"losses.{name}.weight: expected a number, got {weight!r}")
            terms.append(_Term(name=name, weight=float(weight), params=_validate_params(entry, cfg), entry=entry))
        self._terms = tuple(terms)

    @property
    def names(self) -> list[str]:
        """Loss names in recipe order."""
        return [t.name for t in self._terms]

    @property
    def weights(self) -> dict[str, float]:
        return {t.name: t.weight for t in self._terms}

    @property
    def params(self) -> dict[str, dict[str, Any]]:
        """Validated parameters (defaults filled in) per loss, without the weight."""
        return {t.name: dict(t.params) for t in self._terms}

    @property
    def needs(self) -> tuple[str, ...]:
        """Union of the needs of all losses, in first-seen order."""
        seen: dict[str, None] = {}
        for t in self._terms:
            for need in t.entry.needs:
                seen.setdefault(need, None)
        return tuple(seen)

    def __contains__(self, name: object) -> bool:
        return any(t.name == name for t in self._terms)

    def __repr__(self) -> str:
        inner = ", ".join(f"{t.name}={t.weight:g}" for t in self._terms)
        return f"LossSet({inner})"

    def __call__(self, inputs: LossInputs) -> tuple[Tensor, dict[str, Tensor]]:
        total: Tensor | None = None
        logged: dict[str, Tensor] = {}
        for t in self._terms:
            _check_needs(t.name, t.entry.needs, inputs)
            out = t.entry.fn(inputs, **t.params)
            key = f"{t.name}_loss"
            if key not in out:
                raise RuntimeError(f"loss {t.name!r} returned {sorted(out)} without the key {key!r}")
            weighted = t.weight * out[key]
            total = weighted if total is None else total + weighted
            for k, v in out.items():
                logged[k] = v.detach()
        assert total is not None
        return total, logged


def hidden_proj_key(name: str) -> str:
    """Module key of the KD projection for the hidden state ``name`` (dots and other symbols become ``_``)."""
    return "kd_hidden_proj_" + re.sub(r"[^0-9A-Za-z_]", "_", name)


def ssl_head(embed_dim: int, hidden: int | None = None) -> nn.Sequential:
    """SS-I projection head: Linear(d, h) - ReLU - Linear(h, d), h = d // 4 by default (512-128-512)."""
    hidden = hidden or max(1, embed_dim // SSL_HEAD_RATIO)
    return nn.Sequential(nn.Linear(embed_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, embed_dim))


def make_modules(
    spec: Mapping[str, Mapping[str, Any] | None] | LossSet,
    embed_dim: int,
    num_classes: int,
    teacher_dim: int | None = None,
    hidden_widths: Mapping[str, tuple[int, int]] | None = None,
) -> nn.ModuleDict:
    """Build the trainable heads the losses in ``spec`` need.

    - ``ss_i``: ``"ssl_head"``, see :func:`ssl_head` (``head_hidden`` param, default ``embed_dim // 4``).
    - ``id``: ``"id_classifier"``, Linear(embed_dim, num_classes).
    - ``kd_feature`` / ``kd_interactive``: ``"kd_image_proj"`` and ``"kd_text_proj"``, Linear(embed_dim,
      teacher_dim, bias=False), only when the dimensions differ (shared by both losses).
    - ``kd_hidden``: ``hidden_proj_key(name)`` Linear(student_width, teacher_width) for each hidden state whose
      widths differ; ``hidden_widths`` maps name -> (student_width, teacher_width).
    """
    losses = spec if isinstance(spec, LossSet) else LossSet(spec)
    params = losses.params
    mods = nn.ModuleDict()
    if "ss_i" in losses:
        mods["ssl_head"] = ssl_head(embed_dim, params["ss_i"].get("head_hidden"))
    if "id" in losses:
        if num_classes < 1:
            raise ConfigError(f"losses.id: needs the number of training identities, got num_classes={num_classes}")
        mods["id_classifier"] = nn.Linear(embed_dim, num_classes)
    if "kd_feature" in losses or "kd_interactive" in losses:
        if teacher_dim is None:
            raise ConfigError("losses.kd_feature / kd_interactive: need a teacher (teacher_dim is unknown)")
        if teacher_dim != embed_dim:
            mods["kd_image_proj"] = nn.Linear(embed_dim, teacher_dim, bias=False)
            mods["kd_text_proj"] = nn.Linear(embed_dim, teacher_dim, bias=False)
    if "kd_hidden" in losses:
        layers = params["kd_hidden"].get("layers")
        for name, (s_w, t_w) in (hidden_widths or {}).items():
            if layers is not None and name not in layers:
                continue
            if s_w != t_w:
                mods[hidden_proj_key(name)] = nn.Linear(s_w, t_w)
    if len(mods):
        logger.debug("loss modules: %s", {k: sum(p.numel() for p in m.parameters()) for k, m in mods.items()})
    return mods


def ensure_float(x: Tensor) -> Tensor:
    """Losses are computed in float32 even under autocast."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
