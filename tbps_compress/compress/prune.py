"""Structured pruning of both towers (widths, MLP hidden sizes, attention heads, whole blocks) with recovery by
distillation from a frozen teacher.

What is pruned, per tower (``prune.vision`` / ``prune.text``):

- ``width_ratio``: residual-stream channels (patch embedding / token embedding, class and position embeddings, every
  LayerNorm, every block's qkv input, attention-output and MLP-output channels, and the rows of the final
  projection). The joint embedding (the projection's output) is never pruned, so the towers still match.
- ``mlp_ratio``: hidden units of each block's MLP.
- ``head_ratio``: whole attention heads of :class:`~tbps_compress.models.attention.PrunableAttention` (head size
  unchanged); the fraction must remove whole heads.
- ``drop_layers``: whole blocks, either explicit indices or a count; a count drops the blocks the paper's probe
  (:mod:`tbps_compress.compress.probe`) finds least important (C1, then C2), from the ``prune.probe`` table or,
  without one, from C1 measured on the validation split.

Model families without transformer blocks bring their own pruner (``FAMILY_PRUNERS``: a module with ``check``,
``sizes`` and ``prune_tower``); the schedule, recovery and artifacts below are shared. The ``stripe-gru`` family
(:mod:`tbps_compress.compress.prune_stripe`) prunes its CNN's stage widths (``width_ratio``) and residual blocks'
inner widths (``mlp_ratio``), and its text tower's token width (``width_ratio``) and GRU hidden units
(``mlp_ratio``).

Mechanics: torch-pruning's ``BasePruner`` (a.k.a. ``MetaPruner``) builds a dependency graph on each tower
separately (the vision tower with an example image, a text wrapper from the token embedding to the text projection
with example tokens), with open_clip's bare parameters declared with their pruning dimension (class/position
embeddings: channel dim; ``proj`` / ``text_projection``: input dim 0). Ratios are per tower and per structure
(``pruning_ratio_dict`` keyed by the patch/token embedding for the width and by each MLP input layer for the MLP),
heads go through ``num_heads`` with ``prune_num_heads`` and ``prune_head_dims=False``; ``global_pruning`` ranks MLP
units and heads across the blocks of a tower instead of per block. Importance criteria are picked by name
(:func:`list_criteria`). ``round_to`` rounds kept widths down to a multiple.

Schedule: depth first (step 1), then ``iterative_steps`` rounds, each pruning a linear share of the final targets
(fresh dependency graph each round, targets relative to the model after depth pruning) followed by a recovery phase:
the shared :class:`~tbps_compress.engine.train.Trainer` with the teacher artifact as a frozen
:class:`~tbps_compress.compress.teacher.Teacher` (default losses kd_feature + kd_affinity + n_itc). Intermediate
steps are artifacts under ``<output>.steps/`` (removed at the end), so ``--resume`` continues after the last
finished step (and inside a step from the trainer's checkpoint).

The result is an ordinary artifact whose ``model_config.json`` carries per-block sizes; ``metrics.json`` gains a
``prune`` section with parameters and MACs before and after, per tower.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import shutil
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator
from torch import nn

from ..config import Strict
from ..errors import ConfigError, UserError
from ..models.meta import meta_of, set_meta
from ..recipes import ModelCfg, TrainRecipe

log = logging.getLogger(__name__)

TOWERS = ("vision", "text")
STATE_FILE = "prune_state.json"
# model family -> module pruning it (check / sizes / prune_tower), for families without transformer blocks
FAMILY_PRUNERS = {"stripe-gru": "tbps_compress.compress.prune_stripe"}


def family_pruner(model: nn.Module) -> Any:
    """The pruning module of a model family without transformer blocks; None for an open_clip CLIP. A family
    with neither raises the one-line error of :func:`~tbps_compress.models.factory.require_blocks`."""
    import importlib

    from ..models.config import model_family
    from ..models.factory import is_blockwise, require_blocks

    if is_blockwise(model):
        return None
    name = FAMILY_PRUNERS.get(model_family(meta_of(model).config or {}))
    if name is None:
        require_blocks(model, "structured pruning (tbps-compress prune)")
    return importlib.import_module(name)

# name -> (torch-pruning importance class name, kwargs, description)
_CRITERIA: dict[str, tuple[str, dict[str, Any], str]] = {
    "magnitude": ("MagnitudeImportance", {"p": 2}, "L2 norm of the weights of the group (same as l2)"),
    "l1": ("MagnitudeImportance", {"p": 1}, "L1 norm of the weights of the group"),
    "l2": ("MagnitudeImportance", {"p": 2}, "L2 norm of the weights of the group"),
    "taylor": ("TaylorImportance", {}, "first-order Taylor |w * dL/dw| on a contrastive loss of a training batch"),
    "lamp": ("LAMPImportance", {"p": 2}, "layer-adaptive magnitude (LAMP) scores"),
    "random": ("RandomImportance", {}, "random scores (a baseline)"),
    "bn_scale": ("BNScaleImportance", {}, "|gamma| of the group's BatchNorm layers (network slimming); stripe-gru "
                                          "only (its GRU, without BatchNorm, is scored by magnitude)"),
}


def list_criteria() -> list[str]:
    """Names of the importance criteria ``prune.criterion`` accepts."""
    return sorted(_CRITERIA)


def describe_criteria() -> dict[str, str]:
    return {k: v[2] for k, v in sorted(_CRITERIA.items())}


def make_importance(name: str) -> Any:
    """The torch-pruning importance object of a criterion name."""
    import torch_pruning as tp

    if name not in _CRITERIA:
        raise ConfigError(f"prune.criterion: unknown criterion {name!r}; valid: {', '.join(list_criteria())}")
    cls, kwargs, _ = _CRITERIA[name]
    return getattr(tp.importance, cls)(**kwargs)


# --------------------------------------------------------------------------------------------------- recipe
class TowerPruneCfg(Strict):
    width_ratio: float = Field(0.0, ge=0, lt=1, description="Fraction of the residual width (channels) removed.")
    mlp_ratio: float = Field(0.0, ge=0, lt=1, description="Fraction of each block's MLP hidden units removed "
                                                          "(stripe-gru: each residual block's inner channels; the "
                                                          "GRU's hidden units).")
    head_ratio: float = Field(0.0, ge=0, lt=1, description="Fraction of attention heads removed (whole heads).")
    drop_layers: int | list[int] = Field(
        0, description="Blocks removed: a count (the least important by the probe) or a list of block indices.")

    @field_validator("drop_layers")
    @classmethod
    def _drop_ok(cls, v: int | list[int]) -> int | list[int]:
        if isinstance(v, int) and v < 0:
            raise ValueError("a count must be >= 0")
        if isinstance(v, list):
            if any(i < 0 for i in v):
                raise ValueError("block indices must be >= 0")
            if len(set(v)) != len(v):
                raise ValueError("block indices must be distinct")
        return v

    def drop_count(self) -> int:
        return len(self.drop_layers) if isinstance(self.drop_layers, list) else int(self.drop_layers)


class PruneCfg(Strict):
    criterion: str = Field("magnitude", description=f"Importance criterion: {', '.join(list_criteria())}.")
    vision: TowerPruneCfg = Field(default_factory=TowerPruneCfg, description="Image tower ratios.")
    text: TowerPruneCfg = Field(default_factory=TowerPruneCfg, description="Text tower ratios.")
    global_pruning: bool = Field(False, description="Rank MLP units and heads across the blocks of a tower (uneven "
                                                    "per-block sizes) instead of pruning each block equally.")
    round_to: int | None = Field(None, ge=1, description="Round kept widths down to a multiple of this (None = off).")
    iterative_steps: int = Field(1, ge=1, description="Prune in this many rounds, each followed by recovery.")
    recovery_steps: int | None = Field(
        None, ge=0, description="Optimiser steps of recovery after each round (0 = none; None = the optim section's "
                                "epochs / max_steps).")
    probe: str | None = Field(None, description="Probe table (probe.json or its folder) ranking blocks for "
                                                "drop_layers counts; None = measure C1 on the val split.")
    taylor_batch: int = Field(32, ge=2, description="Training samples whose contrastive loss feeds Taylor scores.")
    bn_recalibration: int = Field(
        0, ge=0, description="Training images whose forward passes re-estimate every BatchNorm's running statistics "
                             "after each pruning round, before recovery (0 = off; models without BatchNorm ignore "
                             "it). Removing input channels shifts what each BatchNorm sees, and its stored "
                             "statistics no longer match.")

    @field_validator("criterion")
    @classmethod
    def _criterion_known(cls, v: str) -> str:
        if v not in _CRITERIA:
            raise ValueError(f"unknown criterion {v!r}; valid: {', '.join(list_criteria())}")
        return v


class TeacherRef(Strict):
    artifact: str = Field(..., description="Teacher artifact folder (frozen; distilled from during recovery).")


class PruneRecipe(TrainRecipe):
    """``tbps-compress prune``: prune an artifact and recover by distillation from a teacher."""

    stage: Literal["prune"] = "prune"  # type: ignore[assignment]
    output: str = Field("runs/pruned", description="Artifact folder to write.")
    teacher: TeacherRef = Field(..., description="The frozen teacher used for recovery.")
    source: str | None = Field(None, description="Artifact to prune (default: the teacher).")
    model: ModelCfg | None = Field(None, description="Unused: the model pruned is 'source' (else the teacher).")
    prune: PruneCfg = Field(default_factory=PruneCfg)
    losses: dict[str, dict[str, Any] | None] = Field(
        default_factory=lambda: {"kd_feature": {"weight": 1.0}, "kd_affinity": {"weight": 1.0},
                                 "n_itc": {"weight": 0.5}},
        description="Recovery losses: name -> {weight, params}; see `tbps-compress list losses`.",
    )

    @model_validator(mode="after")
    def _no_model(self) -> PruneRecipe:
        if self.model is not None:
            raise ValueError("a prune recipe prunes the artifact named by 'source' (else the teacher's); it has no "
                             "'model' section: remove it")
        return self


def load_prune_recipe(path: Path, overrides: list[str] | None = None) -> PruneRecipe:
    """Load and validate a prune recipe YAML (``--set`` overrides applied); errors are one-line ConfigErrors."""
    from ..config import load_recipe

    return load_recipe(Path(path), PruneRecipe, overrides)


# --------------------------------------------------------------------------------------------------- sizes
def tower_sizes(model: nn.Module, tower: str) -> dict[str, Any]:
    """Residual width and per-block heads / head_dim / mlp_dim of a tower of a (possibly pruned) model (a
    family pruner's own sizes for a model without transformer blocks)."""
    from ..models.factory import tower_blocks

    fam = family_pruner(model)
    if fam is not None:
        return fam.sizes(model, tower)

    width = int(model.visual.conv1.out_channels) if tower == "vision" else int(model.token_embedding.embedding_dim)
    blocks = [{"heads": int(b.attn.num_heads), "head_dim": int(b.attn.head_dim),
               "mlp_dim": int(b.mlp.c_fc.out_features)} for b in tower_blocks(model, tower)]
    return {"width": width, "blocks": blocks}


def _keep(n: int, ratio: float, round_to: int | None) -> int:
    """Channels kept of ``n`` after removing ``ratio`` (floor), rounded down to ``round_to``; ratio 0 keeps all.
    A product within 1e-3 of a whole number counts as that number, so a fraction typed rounded (0.1666667 of 192)
    keeps what it means (160), not one channel less."""
    if ratio <= 0:
        return n
    k = math.floor(n * (1.0 - ratio) + 1e-3)
    if round_to:
        k -= k % round_to
    return k


def _partial(start: int, final: int, step: int, steps: int, round_to: int | None = None) -> int:
    """Size after ``step`` of ``steps`` linear rounds from ``start`` to ``final`` (rounded down, never below)."""
    k = start - round((start - final) * step / steps)
    if round_to and k != start:
        k = max(final, k - k % round_to)
    return k


def check_prune_cfg(cfg: PruneCfg, model: nn.Module) -> None:
    """Check ``cfg`` against the model before any work; raise a one-line :class:`ConfigError` naming the key."""
    fam = family_pruner(model)
    if fam is not None:
        fam.check(cfg, model)
        return
    if cfg.criterion == "bn_scale":
        raise ConfigError("prune.criterion: bn_scale scores BatchNorm scales, and a transformer's pruned groups have "
                          "none (LayerNorm); use magnitude, taylor or lamp")
    for tower in TOWERS:
        t: TowerPruneCfg = getattr(cfg, tower)
        key = f"prune.{tower}"
        sizes = tower_sizes(model, tower)
        n_blocks = len(sizes["blocks"])
        if isinstance(t.drop_layers, list):
            bad = [i for i in t.drop_layers if i >= n_blocks]
            if bad:
                raise ConfigError(f"{key}.drop_layers: block index {bad[0]} is out of range; the {tower} tower has "
                                  f"{n_blocks} blocks (0..{n_blocks - 1})")
        if t.drop_count() >= n_blocks:
            raise ConfigError(f"{key}.drop_layers: dropping {t.drop_count()} of {n_blocks} {tower} blocks leaves none; "
                              "keep at least one")
        kept = [b for i, b in enumerate(sizes["blocks"])
                if not (isinstance(t.drop_layers, list) and i in t.drop_layers)][: n_blocks - t.drop_count()]
        rt = cfg.round_to
        if t.width_ratio > 0 and _keep(sizes["width"], t.width_ratio, rt) < max(1, rt or 1):
            rounded = f" once rounded to a multiple of round_to={rt}" if rt else ""
            raise ConfigError(f"{key}.width_ratio: {t.width_ratio} of width {sizes['width']} leaves no channels"
                              f"{rounded}; use a smaller ratio")
        if t.mlp_ratio > 0:
            for b in kept:
                if _keep(b["mlp_dim"], t.mlp_ratio, rt) < max(1, rt or 1):
                    raise ConfigError(f"{key}.mlp_ratio: {t.mlp_ratio} of MLP width {b['mlp_dim']} leaves no units"
                                      + (f" once rounded to round_to={rt}" if rt else "") + "; use a smaller ratio")
        if t.head_ratio > 0:
            if cfg.global_pruning:
                total = sum(b["heads"] for b in kept)
                _whole_heads(t.head_ratio, total, f"{key}.head_ratio", f"{total} heads of the tower")
                if round(t.head_ratio * total) > total - len(kept):
                    raise ConfigError(f"{key}.head_ratio: removing {round(t.head_ratio * total)} of {total} heads "
                                      f"cannot leave one head in each of the {len(kept)} blocks; use a smaller ratio")
            else:
                for h in sorted({b["heads"] for b in kept}):
                    _whole_heads(t.head_ratio, h, f"{key}.head_ratio", f"{h} heads per block")
                    if round(t.head_ratio * h) >= h:
                        raise ConfigError(f"{key}.head_ratio: {t.head_ratio} removes every one of {h} heads; "
                                          "keep at least one")


def _whole_heads(ratio: float, heads: int, key: str, what: str) -> None:
    n = ratio * heads
    if abs(n - round(n)) > 1e-6 or round(n) == 0:
        options = ", ".join(f"{k / heads:g}" for k in range(1, heads)) or "none"
        raise ConfigError(f"{key}: {ratio} of {what} is {n:g} heads; heads are removed whole, so the ratio times "
                          f"the head count must be a whole number >= 1 (choose from {options})")


# --------------------------------------------------------------------------------------------------- depth
def drop_layers(model: nn.Module, tower: str, indices: list[int]) -> nn.Module:
    """Remove blocks ``indices`` of ``tower`` in place (the config read back by ``config_from_model`` follows)."""
    from ..models.factory import config_from_model, tower_blocks

    if not indices:
        return model
    blocks = tower_blocks(model, tower)
    n = len(blocks)
    idx = sorted(set(int(i) for i in indices))
    if any(i < 0 or i >= n for i in idx):
        raise ConfigError(f"prune.{tower}.drop_layers: indices {idx} out of range for {n} blocks")
    if len(idx) >= n:
        raise ConfigError(f"prune.{tower}.drop_layers: cannot drop all {n} blocks")
    kept = nn.ModuleList([b for i, b in enumerate(blocks) if i not in idx])
    transformer = model.visual.transformer if tower == "vision" else model.transformer
    transformer.resblocks = kept
    transformer.layers = len(kept)
    set_meta(model, config=config_from_model(model))
    return model


def layers_to_drop(t: TowerPruneCfg, scores: list[float] | None, tower: str) -> list[int]:
    """Block indices to drop for a tower config: the explicit list, or the ``k`` lowest-scoring blocks."""
    if isinstance(t.drop_layers, list):
        return sorted(t.drop_layers)
    k = int(t.drop_layers)
    if k == 0:
        return []
    if scores is None:
        raise ConfigError(f"prune.{tower}.drop_layers: a count needs block importances (prune.probe or the "
                          "measurement on the val split); give explicit indices instead")
    order = sorted(range(len(scores)), key=lambda i: (scores[i], i))
    return sorted(order[:k])


# --------------------------------------------------------------------------------------------------- width
class _TextTower(nn.Module):
    """The text tower of an open_clip CLIP as a module (token embedding .. text projection) for graph tracing.

    Shares modules and parameters with the CLIP; torch-pruning replaces the bare parameters on this wrapper, so
    :meth:`sync` copies them back."""

    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        self.token_embedding = clip.token_embedding
        self.positional_embedding = clip.positional_embedding
        self.transformer = clip.transformer
        self.ln_final = clip.ln_final
        self.text_projection = clip.text_projection
        self._mask = (clip.attn_mask,)  # a tuple: not registered, not traced as a parameter
        self._pool = getattr(clip, "text_pool_type", "argmax")
        self._eos = getattr(clip, "text_eos_id", None)

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        from open_clip.transformer import text_global_pool

        x = self.token_embedding(text) + self.positional_embedding
        x = self.transformer(x, attn_mask=self._mask[0])
        x = self.ln_final(x)
        x = text_global_pool(x, text, self._pool, eos_token_id=self._eos)
        return x @ self.text_projection

    def sync(self, clip: nn.Module) -> None:
        clip.positional_embedding = self.positional_embedding
        clip.text_projection = self.text_projection


def _check_group_ignoring_output(dg: Any, group: Any) -> bool:
    """torch-pruning's ``check_pruning_group`` without the graph-output node: the output of ``x @ proj`` is traced
    as an 'output' with the EMBEDDING's channel count, which made any group pruning more residual channels than the
    embedding has rejected silently (the embedding itself is never pruned: proj's dim 1 is not in the group)."""
    import torch_pruning as tp

    for dep, idxs in group:
        if dep.target.type == tp.ops.OPTYPE.OUTPUT:
            continue
        if dg.is_out_channel_pruning_fn(dep.handler):
            n = dg.get_out_channels(dep.target.module)
        elif dg.is_in_channel_pruning_fn(dep.handler):
            n = dg.get_in_channels(dep.target.module)
        else:
            continue
        if n is not None and n <= len(idxs):
            return False
    return True


def _rel_ratio(keep: int, current: int) -> float:
    """A pruning ratio making torch-pruning keep exactly ``keep`` of ``current`` (it keeps int(current*(1-r)))."""
    if keep >= current:
        return 0.0
    return 1.0 - (keep + 0.5) / current


def _zero_grads(model: nn.Module) -> None:
    for p in model.parameters():
        p.grad = None


def taylor_gradients(model: nn.Module, batch: dict[str, torch.Tensor]) -> None:
    """Fill ``.grad`` of every parameter with the gradient of a symmetric contrastive loss (in-batch pairs,
    same-identity pairs as positives when ``batch['pid']`` is given) on ``batch``: what the Taylor criterion reads."""
    flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    model.eval()
    try:
        for p in model.parameters():
            p.requires_grad_(True)
        _zero_grads(model)
        img = F.normalize(model.encode_image(batch["image"]), dim=-1)
        txt = F.normalize(model.encode_text(batch["text"]), dim=-1)
        logits = model.logit_scale.exp().clamp(max=100) * img @ txt.t()
        if "pid" in batch:
            pid = batch["pid"].view(-1)
            target = (pid[:, None] == pid[None, :]).float()
            target = target / target.sum(1, keepdim=True)
        else:
            target = torch.eye(logits.shape[0], device=logits.device)
        loss = 0.5 * (torch.sum(-target * F.log_softmax(logits, 1), 1).mean()
                      + torch.sum(-target * F.log_softmax(logits.t(), 1), 1).mean())
        loss.backward()
    finally:
        for p, f in flags.items():
            p.requires_grad_(f)
        model.train(was_training)


def prune_tower(model: nn.Module, tower: str, cfg: PruneCfg, example: torch.Tensor, reference: dict[str, Any],
                step: int = 1, steps: int = 1, importance: Any = None) -> dict[str, Any]:
    """One round of width / MLP / head pruning of ``tower`` toward ``step``/``steps`` of the final targets, which
    are relative to ``reference`` (the tower's sizes before the first round). Returns the sizes after."""
    import torch_pruning as tp

    from ..models.factory import tower_blocks

    t: TowerPruneCfg = getattr(cfg, tower)
    cur = tower_sizes(model, tower)
    blocks = tower_blocks(model, tower)
    if len(cur["blocks"]) != len(reference["blocks"]):
        raise RuntimeError(f"{tower}: {len(cur['blocks'])} blocks but the reference has {len(reference['blocks'])}")
    rt = cfg.round_to
    ignored: list[nn.Module] = []
    if tower == "vision":
        stem = getattr(model.visual.conv1, "stem", None)  # models.stem.ConvStem: prune its projection only
        root: nn.Module = model.visual.conv1.proj if stem is not None else model.visual.conv1
        if stem is not None:
            ignored = [m for m in stem.modules() if isinstance(m, nn.Conv2d | nn.BatchNorm2d)]
        target = model.visual
        unwrapped = [(model.visual.class_embedding, 0), (model.visual.positional_embedding, 1),
                     (model.visual.proj, 0)]
        wrapper = None
    else:
        wrapper = _TextTower(model)
        root = model.token_embedding
        target = wrapper
        unwrapped = [(wrapper.positional_embedding, 1), (wrapper.text_projection, 0)]

    ratio_dict: dict[Any, float] = {}
    w_keep = _partial(reference["width"], _keep(reference["width"], t.width_ratio, rt), step, steps, rt)
    ratio_dict[root] = _rel_ratio(w_keep, cur["width"])
    fcs = [b.mlp.c_fc for b in blocks]
    if cfg.global_pruning:
        ref_total = sum(b["mlp_dim"] for b in reference["blocks"])
        keep = _partial(ref_total, _keep(ref_total, t.mlp_ratio, None), step, steps)
        ratio_dict[tuple(fcs)] = _rel_ratio(keep, sum(b["mlp_dim"] for b in cur["blocks"]))
    else:
        for fc, ref, now in zip(fcs, reference["blocks"], cur["blocks"], strict=True):
            keep = _partial(ref["mlp_dim"], _keep(ref["mlp_dim"], t.mlp_ratio, rt), step, steps, rt)
            ratio_dict[fc] = _rel_ratio(keep, now["mlp_dim"])
    num_heads = {b.attn.qkv: int(b.attn.num_heads) for b in blocks}
    head_dims = [int(b.attn.head_dim) for b in blocks]
    head_kwargs: dict[str, Any] = {}
    if cfg.global_pruning:
        ref_total = sum(b["heads"] for b in reference["blocks"])
        now_total = sum(b["heads"] for b in cur["blocks"])
        want = round(round(t.head_ratio * ref_total) * step / steps) - (ref_total - now_total)
        head_kwargs["head_pruning_ratio"] = _rel_ratio(now_total - want, now_total) if want > 0 else 0.0
    else:
        per_layer = {}
        for b, ref, now in zip(blocks, reference["blocks"], cur["blocks"], strict=True):
            want = round(round(t.head_ratio * ref["heads"]) * step / steps) - (ref["heads"] - now["heads"])
            per_layer[b.attn.qkv] = (want - 0.5) / now["heads"] if want > 0 else 0.0
        head_kwargs["head_pruning_ratio_dict"] = per_layer

    if not any(r > 0 for r in ratio_dict.values()) and not _any_head_work(head_kwargs):
        return cur
    imp = importance if importance is not None else make_importance(cfg.criterion)
    pruner = tp.pruner.BasePruner(
        target, example, imp,
        global_pruning=cfg.global_pruning,
        pruning_ratio=0.5,  # only the attention groups fall back to it; with prune_head_dims=False it just lets
        # head pruning run (a 0 ratio would skip heads too)
        pruning_ratio_dict=ratio_dict,
        round_to=rt,
        num_heads=num_heads,
        prune_num_heads=True,
        prune_head_dims=False,
        unwrapped_parameters=unwrapped,
        root_module_types=[nn.Conv2d, nn.Linear],
        ignored_layers=ignored,
        **head_kwargs,
    )
    dg = pruner.DG
    dg.check_pruning_group = lambda group: _check_group_ignoring_output(dg, group)
    allowed = {root, *fcs, *num_heads}
    for group in pruner.step(interactive=True):
        if not any(dep.target.module in allowed and dg.is_out_channel_pruning_fn(dep.handler) for dep, _ in group):
            raise RuntimeError(f"{tower}: unexpected pruning group rooted at {group[0].dep.target}; the traced graph "
                               "misses a layer (pruning it would break the model)")
        group.prune()
    if wrapper is not None:
        wrapper.sync(model)
    for b, hd in zip(blocks, head_dims, strict=True):
        inner = b.attn.qkv.out_features // 3
        b.attn.num_heads = inner // hd
        b.attn.dim = b.attn.qkv.in_features
    transformer = model.visual.transformer if tower == "vision" else model.transformer
    transformer.width = tower_sizes(model, tower)["width"]
    return tower_sizes(model, tower)


def _any_head_work(kw: dict[str, Any]) -> bool:
    if kw.get("head_pruning_ratio", 0) > 0:
        return True
    return any(r > 0 for r in kw.get("head_pruning_ratio_dict", {}).values())


def prune_widths(model: nn.Module, cfg: PruneCfg, example_batch: dict[str, torch.Tensor],
                 reference: dict[str, dict[str, Any]] | None = None, step: int = 1, steps: int = 1) -> nn.Module:
    """One round (``step`` of ``steps``) of width / MLP / head pruning of both towers, in place."""
    from ..models.factory import config_from_model

    reference = reference or {t: tower_sizes(model, t) for t in TOWERS}
    fam = family_pruner(model)
    prune_one = prune_tower if fam is None else fam.prune_tower
    model.eval()
    importance = make_importance(cfg.criterion)
    if cfg.criterion == "taylor":
        taylor_gradients(model, example_batch)
    # The graph is traced through autograd: a frozen parameter (e.g. the patch embedding under
    # tricks.freeze_patch_embed) would drop its layer from the graph and leave it unpruned.
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    for p in model.parameters():
        p.requires_grad_(True)
    try:
        for tower in TOWERS:
            ex = example_batch["image"][:2] if tower == "vision" else example_batch["text"][:2]
            with torch.enable_grad():
                sizes = prune_one(model, tower, cfg, ex, reference[tower], step, steps, importance)
            if fam is not None:
                log.info("%s tower after round %d/%d: %s", tower, step, steps, sizes)
            else:
                log.info("%s tower after round %d/%d: width %d, heads %s, mlp %s", tower, step, steps,
                         sizes["width"], [b["heads"] for b in sizes["blocks"]], [b["mlp_dim"] for b in sizes["blocks"]])
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(name not in frozen)
        _zero_grads(model)
    set_meta(model, config=config_from_model(model))
    return model


def prune_model(model: nn.Module, cfg: PruneCfg, example_batch: dict[str, torch.Tensor],
                layer_scores: dict[str, list[float]] | None = None) -> nn.Module:
    """One-shot structured pruning of ``model`` in place (and returned): drop blocks, then prune widths, MLP units
    and heads of both towers to the final ratios of ``cfg`` (no recovery).

    ``example_batch``: ``{"image": (B, 3, H, W) normalised float, "text": (B, L) tokens}`` (B >= 2; optional
    ``"pid"``), used to trace each tower and, for the Taylor criterion, for gradients. ``layer_scores``: per tower
    block importances (higher = keep; e.g. :func:`~tbps_compress.compress.probe.layer_ranking`) for
    ``drop_layers`` counts."""
    check_prune_cfg(cfg, model)
    for tower in TOWERS:
        idx = layers_to_drop(getattr(cfg, tower), (layer_scores or {}).get(tower), tower)
        drop_layers(model, tower, idx)
    return prune_widths(model, cfg, example_batch)


def recalibrate_batchnorm(model: nn.Module, images: torch.Tensor, batch_size: int = 64) -> int:
    """Re-estimate every BatchNorm's running mean and variance from ``images`` (a cumulative average over the
    batches, no gradients, the rest of the model in eval mode); return the number of BatchNorm layers reset."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns or len(images) == 0:
        return 0
    was_training = model.training
    momenta = [m.momentum for m in bns]
    model.eval()
    try:
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative moving average: every batch counts the same
            m.train()
        with torch.no_grad():
            for i in range(0, len(images), batch_size):
                model.encode_image(images[i:i + batch_size])
    finally:
        for m, mom in zip(bns, momenta, strict=True):
            m.momentum = mom
        model.train(was_training)
    return len(bns)


# --------------------------------------------------------------------------------------------------- reports
def model_report(model: nn.Module) -> dict[str, Any]:
    """Parameters (total, non-embedding, per tower) and MACs per tower of one image + one caption."""
    from ..models.factory import config_from_model, count_macs, count_parameters

    cfg = config_from_model(model)
    macs = count_macs(cfg)
    out = {"parameters": count_parameters(model), "macs": {**macs, "total": macs["vision"] + macs["text"]}}
    if family_pruner(model) is not None:
        return {**out, "sizes": {t: tower_sizes(model, t) for t in TOWERS}}
    return {**out, "vision_layers": cfg["vision_cfg"]["layers"], "text_layers": cfg["text_cfg"]["layers"],
            "vision_width": cfg["vision_cfg"]["width"], "text_width": cfg["text_cfg"]["width"]}


def compare_reports(before: dict[str, Any], after: dict[str, Any]) -> dict[str, float]:
    """Fraction removed of each parameter and MAC count."""
    out = {}
    for section in ("parameters", "macs"):
        for k, v in before[section].items():
            if v:
                out[f"{section}.{k}"] = round(1.0 - after[section][k] / v, 4)
    return out


# --------------------------------------------------------------------------------------------------- run
def _example_batch(model: nn.Module, ds: Any, n: int, seed: int) -> dict[str, torch.Tensor]:
    import random

    from ..data.loader import ImageStore
    from ..models.config import image_size_hw
    from ..models.tokenizer import model_tokenizer
    from ..retrieval.encoders import normalize_pixels
    from ..runtime.tokenizer import clean_caption

    recs = list(ds.split("train"))
    if len(recs) < 2:
        raise UserError(f"{ds.annotation}: the train split needs at least 2 images to trace and score the model")
    recs = random.Random(seed).sample(recs, min(n, len(recs)))
    cfg = meta_of(model).config
    store = ImageStore([ds.image_path(r) for r in recs], image_size_hw(cfg), cache=False)
    images = normalize_pixels(torch.stack([store[i] for i in range(len(recs))]))
    tok = model_tokenizer(model)
    text = tok([clean_caption(r.captions[0]) for r in recs])
    return {"image": images, "text": text, "pid": torch.tensor([r.pid for r in recs])}


def _recovery_recipe(recipe: PruneRecipe, output: Path, per_epoch: int) -> PruneRecipe:
    r = recipe.model_copy(deep=True)
    r.output = str(output)
    rs = recipe.prune.recovery_steps
    if rs:
        optim = r.optim.model_copy(update={"max_steps": rs, "epochs": max(1, math.ceil(rs / max(1, per_epoch)))})
        r.optim = optim
    return r


def _layer_scores(recipe: PruneRecipe, model: nn.Module, splits: Any, device: torch.device) -> dict[str, list[float]]:
    """Block importances for drop_layers counts: the probe table, else C1 measured on the val split."""
    from ..models.factory import tower_blocks
    from .probe import _normalised, layer_ranking, make_retrieval_probe, read_probe, removal_drops

    need = [t for t in TOWERS if isinstance(getattr(recipe.prune, t).drop_layers, int)
            and getattr(recipe.prune, t).drop_layers > 0]
    if not need:
        return {}
    if recipe.prune.probe:
        scores = layer_ranking(read_probe(Path(recipe.prune.probe)))
        for t in need:
            n = len(tower_blocks(model, t))
            if len(scores.get(t, [])) != n:
                raise ConfigError(f"prune.probe: the table has {len(scores.get(t, []))} {t} blocks, the source has "
                                  f"{n}; probe the source artifact")
        return scores
    recs = splits.val
    if not recs:
        raise UserError(f"{splits.dataset.annotation}: no records in split '{recipe.eval.val_split}' to rank "
                        "blocks on")
    rp = make_retrieval_probe(model, splits.dataset, recs, batch_size=recipe.eval.batch_size, device=device)
    drops = removal_drops(rp, need)
    log.info("block removal drops (R@1 points, val): %s", {t: [round(x, 2) for x in v] for t, v in drops.items()})
    return {t: _normalised(v) for t, v in drops.items()}


def run_prune(recipe: PruneRecipe, *, resume: bool = False, force: bool = False, progress: Any = None) -> Path:
    """Prune ``recipe.source`` (default: the teacher) and recover; write the artifact ``recipe.output``.

    Everything that can be checked is checked before any work (ratios vs. the model, heads, probe table, artifacts,
    output folder). ``resume`` continues an interrupted run (after its last finished round, and inside a round from
    the trainer's checkpoint); ``force`` replaces an existing output."""
    from .. import distributed as dist
    from ..artifacts import check_output_dir, open_artifact, write_json
    from ..data.splits import build_splits
    from ..devices import resolve_device
    from ..engine.train import Trainer
    from ..models.io import load_model
    from .teacher import Teacher

    out = Path(recipe.output)
    steps_dir = out.parent / f"{out.name}.steps"
    teacher_path = Path(recipe.teacher.artifact)
    source_path = Path(recipe.source) if recipe.source else teacher_path
    # ---- checks before work
    if not resume:
        check_output_dir(out, force)
        for leftover in (steps_dir, out.parent / f"{out.name}.ckpt" / "last.ckpt"):
            if leftover.exists() and not force:
                raise UserError(f"{leftover}: left by an earlier run; pass --resume to continue it or --force "
                                "to start over")
    elif (out / "lineage.json").exists() and not force:
        raise UserError(f"{out}: this run already finished; nothing to resume (use --force to redo it)")
    src_art = open_artifact(source_path)
    teacher_art = open_artifact(teacher_path)
    device = resolve_device(recipe.device)
    model = load_model(src_art, verify=False)
    check_prune_cfg(recipe.prune, model)
    if recipe.prune.probe:
        from .probe import read_probe

        read_probe(Path(recipe.prune.probe))
    splits = build_splits(recipe)
    ds = splits.dataset
    per_epoch = splits.steps_per_epoch(recipe.optim.batch_size, dist.world_size())
    teacher = load_model(teacher_art, verify=False).eval()
    # ---- work
    if force and not resume and steps_dir.exists():
        shutil.rmtree(steps_dir)
    steps_dir.mkdir(parents=True, exist_ok=True)
    n = recipe.prune.iterative_steps
    before = model_report(model)
    state_file = steps_dir / STATE_FILE
    start = 1
    state: dict[str, Any] = {}
    if resume and state_file.exists():
        state = json.loads(state_file.read_text())
        done = [i for i in range(1, n) if (steps_dir / f"step{i}" / "lineage.json").exists()]
        if done:
            start = max(done) + 1
            model = load_model(steps_dir / f"step{start - 1}", verify=True)
            log.info("resuming after round %d/%d", start - 1, n)
    torch.manual_seed(recipe.seed)
    example = _example_batch(model, ds, recipe.prune.taylor_batch, recipe.seed)
    calib = _example_batch(model, ds, recipe.prune.bn_recalibration, recipe.seed + 1)["image"] \
        if recipe.prune.bn_recalibration else None
    if not state:
        scores = _layer_scores(recipe, model, splits, torch.device("cpu"))
        dropped = {t: layers_to_drop(getattr(recipe.prune, t), scores.get(t), t) for t in TOWERS}
        state = {"dropped": dropped, "scores": scores}
    if start == 1:
        for t in TOWERS:
            drop_layers(model, t, state["dropped"][t])
        state["reference"] = {t: tower_sizes(model, t) for t in TOWERS}
        write_json(state_file, state)
    log.info("dropping blocks %s", state["dropped"])
    frozen = Teacher(teacher, artifact=teacher_path, hidden="kd_hidden" in recipe.losses)  # adapts to each round
    rounds: list[dict[str, Any]] = []
    for i in range(1, start):
        rounds.append({"step": i, **_round_summary(steps_dir / f"step{i}")})
    for i in range(start, n + 1):
        torch.manual_seed(recipe.seed + i)
        prune_widths(model, recipe.prune, example, state["reference"], step=i, steps=n)
        if calib is not None:
            reset = recalibrate_batchnorm(model, calib, recipe.eval.batch_size)
            log.info("round %d/%d: %d BatchNorm layers recalibrated on %d training images", i, n, reset, len(calib))
        meta_of(model).config["description"] = (f"pruned ({recipe.prune.criterion}, round {i}/{n}) from {source_path}; "
                                            f"source: {src_art.model_config.get('description', '')}")
        after = model_report(model)
        final = i == n
        target = out if final else steps_dir / f"step{i}"
        report = {"source": str(source_path), "teacher": str(teacher_path), "criterion": recipe.prune.criterion,
                  "before": before, "after": after, "removed": compare_reports(before, after),
                  "dropped_layers": state["dropped"], "rounds": rounds}
        if recipe.prune.recovery_steps == 0:
            if not final:  # nothing to recover between rounds: no intermediate artifact
                continue
            _write_unrecovered(recipe, model, target, source_path, splits, device, report, force)
        else:
            ckpt = target.parent / f"{target.name}.ckpt" / "last.ckpt"
            trainer = Trainer(
                _recovery_recipe(recipe, target, per_epoch), model=model, providers=[frozen],
                stage="prune", parent=source_path, progress=progress, dataset=splits,
                extra_files=(lambda _tmp, rep=report: {"prune": rep}) if final else None,
            )
            trainer.run(resume=resume and ckpt.exists(), force=force or (not final))
            model = trainer.model.cpu()
        rounds.append({"step": i, **_round_summary(target)})
        log.info("round %d/%d: %s", i, n, rounds[-1])
    shutil.rmtree(steps_dir, ignore_errors=True)
    return out


def _round_summary(folder: Path) -> dict[str, Any]:
    f = folder / "metrics.json"
    if not f.exists():
        return {}
    m = json.loads(f.read_text())
    return {"val_R1": (m.get("val_best") or {}).get("R1"), "test_R1": (m.get("test") or {}).get("R1"),
            "non_embedding_parameters": (m.get("parameters") or {}).get("non_embedding")}


def _write_unrecovered(recipe: PruneRecipe, model: nn.Module, out: Path, parent: Path, splits: Any,
                       device: torch.device, report: dict[str, Any], force: bool) -> None:
    """An artifact of the pruned model without recovery training (``recovery_steps: 0``)."""
    from ..artifacts import METRICS, RECIPE, write_artifact, write_json
    from ..config import dump_recipe
    from ..models.factory import count_parameters
    from ..models.io import save_model
    from ..retrieval.encoders import Split, TorchEncoder, evaluate

    model.to(device).eval()
    recs, ds = splits.test, splits.dataset
    test = {}
    if recs:
        test = evaluate(TorchEncoder(model, device=device, batch_size=recipe.eval.batch_size), Split.of(ds, recs))
    with write_artifact(out, stage="prune", parent=parent, force=force) as tmp:
        save_model(model, tmp)
        r = recipe.model_copy(deep=True)
        r.output = str(out)
        dump_recipe(r, tmp / RECIPE)
        metrics: dict[str, Any] = {"test": test, "val_best": {}, "split": recipe.eval.test_split,
                                   "dataset": str(Path(recipe.data.root)), "parameters": count_parameters(model),
                                   "steps": 0, "prune": report}
        write_json(tmp / METRICS, metrics)
    model.cpu()


def architecture_summary(model: nn.Module) -> dict[str, Any]:
    """Per-tower width, layers and per-block heads / MLP sizes (for logs and the study table)."""
    return {t: copy.deepcopy(tower_sizes(model, t)) for t in TOWERS}
