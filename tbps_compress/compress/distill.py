"""Knowledge distillation: a TBPS-CLIP teacher artifact -> a small student artifact.

``run_distill`` reads the teacher artifact (hash-verified), builds the student (a registered or inline config;
random init, another artifact's weights, or TinyCLIP-style weight inheritance from the teacher), optionally
shrinks its token table to the training vocabulary, and trains it with the shared loop
(:class:`tbps_compress.engine.train.Trainer`) against the frozen teacher (:class:`DistillTeacher`, a
:class:`tbps_compress.compress.teacher.Teacher` handed to the trainer as a loss-input provider): task losses plus the
registered KD losses of the recipe. Data, steps, precision, progress, logging, checkpoint/resume, DDP and validation
are the trainer's.

Weight inheritance (:func:`inherit_weights`): student layers are teacher layers picked at a uniform stride (first
and last kept) or by measured importance (relative residual update on training samples); residual channels, joint
embedding dimensions, attention heads, channels inside heads and MLP channels are the teacher's most important ones
by weight norm (:mod:`tbps_compress.compress.importance`), not the first ones. When heads get narrower the query
is rescaled by sqrt(new/old head width) so the kept part of every attention logit keeps its scale. A ``stripe-gru``
student (a CNN and a GRU, no blocks) inherits its teacher pruned to the student's widths by weight magnitude
(:mod:`tbps_compress.compress.prune_stripe`, the same pruners as ``tbps-compress prune``); it keeps every layer.

Teacher cache (:class:`TeacherCache`): the teacher's normalised embeddings of every training sample, keyed by
(epoch, sample index). Each training sample's views are a pure function of (seed, epoch, index)
(``data.loader.sample_seed``), so the cache holds exactly what the teacher would compute online for the student's
batch, for any augmentation setting. The parts that do not change between epochs are stored once: text when text
augmentation is off, images when image augmentation is off. The teacher tokenises the captions itself (its own
vocabulary and context length); images are the views generated at the student's input size (resized to the
teacher's when they differ). The file (safetensors, no pickle) records the teacher's content hash and a key of the
training data, augmentation, seed and views; a file built for another teacher or other data is refused (a path with
``{teacher}`` / ``{key}`` placeholders gives each teacher / data setting its own file instead). Epochs the file does
not cover (a longer run) are computed online. One cache serves every student distilled from the same
teacher with the same data settings, so a step costs only the student's forward and backward.

Vocabulary pruning (:func:`tbps_compress.models.vocab.prune_vocabulary`): the token table keeps the ids the
training captions use (plus back-translations and synonyms when those augmentations are on), id 0, SOT and EOT,
and one ``unk`` row (the mean embedding) for unseen tokens. New ids: 0, used ids in order, unk, SOT, EOT (EOT
stays the largest id: text pooling is the argmax over ids). The artifact carries ``vocab_map.json``
({original: new}) and ``tokenizer.json`` ({"unk_id"}); the config's ``text_cfg.vocab_size`` is the new size.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from pydantic import AliasChoices, Field, model_validator
from torch import Tensor, nn

from ..config import Strict
from ..errors import ConfigError, UserError
from ..models.config import model_family
from ..models.factory import tower_blocks
from ..models.meta import meta_of, set_meta
from ..models.vocab import prune_vocabulary, vocabulary_captions
from ..recipes import ModelCfg, TrainRecipe
from . import importance as imp
from .teacher import Teacher, load_teacher, teacher_adapter

if TYPE_CHECKING:
    from ..engine.train import Trainer

__all__ = ["DistillRecipe", "DistillTeacher", "InheritanceError", "TeacherCache", "TeacherCacheError",
           "build_student", "build_teacher_cache", "cache_key", "inherit_weights", "load_teacher",
           "load_teacher_cache", "resolve_cache_path", "run_distill", "student_config", "teacher_adapter"]

log = logging.getLogger(__name__)

CACHE_FORMAT = "tbps_compress.teacher_cache/1"
KD_NEEDS = ("teacher", "teacher_hidden")


class InheritanceError(ConfigError):
    """The student cannot inherit the teacher's weights (wider, deeper or otherwise incompatible)."""


class TeacherCacheError(UserError):
    """A teacher cache file is unreadable or was built for another teacher or other training data."""


# ------------------------------------------------------------------------------------------------- recipe


class TeacherCfg(Strict):
    artifact: str = Field(..., description="Teacher artifact folder (hash-verified on load).")
    cache: str | None = Field(None, description="Teacher cache file (.safetensors); built when missing, reused "
                                                "when present; None computes teacher outputs online. '{teacher}' "
                                                "and '{key}' in the path become short hashes of the teacher and of "
                                                "the data settings, so each teacher/data gets its own file.")
    cache_dtype: Literal["float16", "float32"] = Field("float16", description="Storage type of cached embeddings.")
    hidden: bool = Field(False, description="Capture the teacher's last hidden states (needed by kd_hidden).")


class TowerInline(Strict):
    layers: int | None = Field(None, ge=1, validation_alias=AliasChoices("layers", "depth"),
                               description="Transformer blocks (alias: depth).")
    width: int | None = Field(None, ge=1, description="Residual width.")
    heads: int | None = Field(None, ge=1, description="Attention heads (must divide the width).")
    mlp_ratio: float | None = Field(None, gt=0, description="MLP hidden width / residual width.")


class VisionInline(TowerInline):
    image_size: int | tuple[int, int] | None = Field(None, description="Input size, int or [height, width].")
    patch_size: int | None = Field(None, ge=1)


class TextInline(TowerInline):
    context_length: int | None = Field(None, ge=2)


class StudentInline(Strict):
    """Architecture overrides; unset values come from ``student.config`` or else from the teacher."""

    embed_dim: int | None = Field(None, ge=1, description="Joint embedding width.")
    vision: VisionInline = Field(default_factory=VisionInline)
    text: TextInline = Field(default_factory=TextInline)


class StudentCfg(Strict):
    config: str | None = Field(None, description="Registered model config name or path to a JSON config.")
    inline: StudentInline | None = Field(None, description="Inline architecture (on top of config, else teacher).")
    init: Literal["random", "inherit", "artifact"] = Field("inherit", description="Weight initialisation.")
    init_artifact: str | None = Field(None, description="Artifact to initialise from (init: artifact).")
    layer_selection: Literal["uniform", "importance"] = Field(
        "uniform", description="Inheritance: teacher layers at a uniform stride or the most important ones.")
    importance_samples: int = Field(64, ge=1, description="Training samples used to measure layer importance.")
    vocab_prune: bool = Field(False, description="Shrink the token table to the training captions' tokens.")

    @model_validator(mode="after")
    def _init_source(self) -> StudentCfg:
        if self.init == "artifact" and not self.init_artifact:
            raise ValueError("student.init is 'artifact' but student.init_artifact is not set")
        if self.init != "artifact" and self.init_artifact:
            raise ValueError(f"student.init_artifact is set but student.init is '{self.init}'; use init: artifact")
        if self.init != "artifact" and self.config is None and self.inline is None:
            raise ValueError("the student needs student.config (a model config) or student.inline")
        return self


class DistillRecipe(TrainRecipe):
    """``tbps-compress distill``: the shared training loop with a frozen teacher (task + KD losses)."""

    stage: Literal["distill"] = "distill"  # type: ignore[assignment]
    output: str = Field("runs/student", description="Artifact folder to write.")
    model: ModelCfg | None = Field(None, description="Unused: the 'student' section defines the model.")
    teacher: TeacherCfg
    student: StudentCfg
    losses: dict[str, dict[str, Any] | None] = Field(
        default_factory=lambda: {"n_itc": {"weight": 0.5}, "r_itc": {"weight": 1.0}, "kd_feature": {"weight": 1.0},
                                 "kd_affinity": {"weight": 1.0}, "kd_interactive": {"weight": 0.5}},
        description="Task and KD losses: name -> {weight, params}; see `tbps-compress list losses`.",
    )

    @model_validator(mode="after")
    def _distill_checks(self) -> DistillRecipe:
        if self.model is not None:
            raise ValueError("a distill recipe defines its model in 'student' (config / inline / init), not 'model'")
        if "kd_hidden" in self.losses and not self.teacher.hidden:
            raise ValueError("losses.kd_hidden needs the teacher's hidden states: set teacher.hidden: true")
        return self


# ------------------------------------------------------------------------------------------------- student config


def student_config(student: StudentCfg, teacher_cfg: dict[str, Any]) -> dict[str, Any]:
    """The student's model config: ``student.config`` (else the teacher's) with ``student.inline`` applied."""
    from ..models.config import get_model_config, validate_model_config

    if student.config is not None:
        try:
            cfg = get_model_config(student.config)
        except ConfigError as exc:
            raise ConfigError(f"student.config: {exc}") from exc
    else:
        cfg = copy.deepcopy(teacher_cfg)
        cfg["name"] = f"{teacher_cfg.get('name', 'teacher')}-student"
        cfg["description"] = "inline student"
    inl = student.inline
    if inl is not None:
        if inl.embed_dim is not None:
            cfg["embed_dim"] = inl.embed_dim
        for tower, sub in (("vision", inl.vision), ("text", inl.text)):
            given = sub.model_dump(exclude_none=True)
            if not given:
                continue
            cfg.pop(f"{tower}_blocks", None)
            tc = cfg[f"{tower}_cfg"]
            for key in ("layers", "width", "mlp_ratio", "patch_size", "context_length"):
                if key in given:
                    tc[key] = given[key]
            if "image_size" in given:
                size = given["image_size"]
                tc["image_size"] = [size, size] if isinstance(size, int) else list(size)
            if "heads" in given:
                if tc["width"] % given["heads"]:
                    raise ConfigError(f"student.inline.{tower}.heads: {given['heads']} does not divide the width "
                                      f"{tc['width']}; choose heads that divide it")
                if tower == "vision":
                    tc["head_width"] = tc["width"] // given["heads"]
                else:
                    tc["heads"] = given["heads"]
        cfg["name"] = f"{cfg.get('name', 'student')}-inline"
    try:
        return validate_model_config(cfg, source="student")
    except ConfigError as exc:
        raise ConfigError(f"{exc} (check student.config / student.inline)") from exc


# ------------------------------------------------------------------------------------------------- inheritance


def _grid(cfg: dict[str, Any]) -> tuple[int, int]:
    from ..models.config import image_size_hw

    h, w = image_size_hw(cfg)
    p = cfg["vision_cfg"]["patch_size"]
    return h // p, w // p


def _resize_visual_pos(pe: Tensor, src: tuple[int, int], dst: tuple[int, int]) -> Tensor:
    if src == dst:
        return pe
    grid = pe[1:].reshape(1, src[0], src[1], -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=dst, mode="bilinear", align_corners=False)
    return torch.cat([pe[:1], grid.permute(0, 2, 3, 1).reshape(dst[0] * dst[1], -1)], dim=0)


def _resize_text_pos(pe: Tensor, n: int) -> Tensor:
    if n <= pe.shape[0]:
        return pe[:n]
    seq = F.interpolate(pe.t().unsqueeze(0), size=n, mode="linear", align_corners=False)
    return seq[0].t().contiguous()


def _check_fits(s_cfg: dict[str, Any], t_cfg: dict[str, Any], teacher_name: str) -> None:
    def fail(key: str, s: Any, t: Any, what: str = "larger than") -> None:
        raise InheritanceError(
            f"student {key}: {s} is {what} the teacher's {t} ({teacher_name}); weight inheritance needs a student "
            "no wider or deeper than its teacher: shrink the student or use student.init: random")

    if model_family(s_cfg) != model_family(t_cfg):
        raise InheritanceError(
            f"student.config is of model family '{model_family(s_cfg)}' and the teacher ({teacher_name}) of "
            f"'{model_family(t_cfg)}'; weight inheritance needs one family: pick a student config of the teacher's "
            "family or use student.init: random (with the KD losses)")
    for who, cfg in (("student.config", s_cfg), (f"teacher ({teacher_name})", t_cfg)):
        if model_family(cfg) != "clip":
            raise InheritanceError(
                f"student.init: inherit has no rule for the {who}'s model family '{model_family(cfg)}'; use "
                "student.init: random (with the KD losses) for it")
    if bool(s_cfg.get("quick_gelu")) != bool(t_cfg.get("quick_gelu")):
        fail("quick_gelu", s_cfg.get("quick_gelu"), t_cfg.get("quick_gelu"), "different from")
    if s_cfg["embed_dim"] > t_cfg["embed_dim"]:
        fail("embed_dim", s_cfg["embed_dim"], t_cfg["embed_dim"])
    for tower in ("vision", "text"):
        s, t = s_cfg[f"{tower}_cfg"], t_cfg[f"{tower}_cfg"]
        for key in ("width", "layers"):
            if s[key] > t[key]:
                fail(f"{tower}_cfg.{key}", s[key], t[key])
    if s_cfg["vision_cfg"]["patch_size"] != t_cfg["vision_cfg"]["patch_size"]:
        fail("vision_cfg.patch_size", s_cfg["vision_cfg"]["patch_size"], t_cfg["vision_cfg"]["patch_size"],
             "different from")


def _select_layers(n_t: int, n_s: int, how: str, scores: Tensor | None) -> list[int]:
    if how == "uniform":
        return imp.uniform_layers(n_t, n_s)
    if how == "importance":
        if scores is None:
            raise ValueError("layer_selection 'importance' needs layer scores (importance.layer_scores)")
        return imp.top_k(scores, n_s)
    raise ConfigError(f"student.layer_selection: {how!r} is not one of uniform, importance")


def _stem_state(teacher: nn.Module, t_cfg: dict[str, Any], s_cfg: dict[str, Any], ri: Tensor) -> dict[str, Tensor]:
    """The image stem's state. A convolutional stem (models.stem) of the teacher's shape is copied whole; a narrower
    one (fewer channels per stage, same number of stages and of residual blocks) keeps, per stage, the teacher's
    channels whose stage-convolution filters have the largest L1 norm (the same channels through the stage's
    residual blocks, whose shortcuts add them). The projection is cut to those channels and to the kept residual
    channels ``ri``."""
    t_v, s_v = t_cfg["vision_cfg"], s_cfg["vision_cfg"]
    t_stem, s_stem = t_v.get("stem_channels"), s_v.get("stem_channels")
    if (t_stem is None) != (s_stem is None) or (t_stem and len(t_stem) != len(s_stem)) \
            or t_v.get("stem_blocks", 0) != s_v.get("stem_blocks", 0) \
            or (t_stem and any(s > t for s, t in zip(s_stem, t_stem, strict=True))):
        raise InheritanceError(
            f"student vision_cfg.stem_channels / stem_blocks: {s_stem} / {s_v.get('stem_blocks', 0)} do not fit "
            f"the teacher's {t_stem} / {t_v.get('stem_blocks', 0)}; weight inheritance takes the stem's channels "
            "from the teacher, so give the student as many stages and blocks, each stage at most as wide, or use "
            "student.init: random")
    conv = teacher.visual.conv1
    if not t_stem:
        return {"visual.conv1.weight": conv.weight[ri]}
    from ..models.stem import BasicBlock

    out: dict[str, Tensor] = {}
    keep_in = torch.arange(3)
    stage = -1
    keep = keep_in
    for idx, m in enumerate(conv.stem):
        key = f"visual.conv1.stem.{idx}"
        if isinstance(m, nn.Conv2d):  # a stage's stride-2 convolution
            stage += 1
            w = m.weight.detach()
            keep = torch.tensor(imp.top_k(w.abs().sum(dim=(1, 2, 3)), int(s_stem[stage])))
            out[f"{key}.weight"] = w[keep][:, keep_in]
            keep_in = keep
        elif isinstance(m, nn.BatchNorm2d):
            out.update(_bn_state(m, keep, key))
        elif isinstance(m, BasicBlock):
            for name in ("conv1", "conv2"):
                out[f"{key}.{name}.weight"] = getattr(m, name).weight.detach()[keep][:, keep]
            for name in ("bn1", "bn2"):
                out.update(_bn_state(getattr(m, name), keep, f"{key}.{name}"))
    out["visual.conv1.proj.weight"] = conv.proj.weight[ri][:, keep_in]
    out["visual.conv1.proj.bias"] = conv.proj.bias[ri]
    return out


def _bn_state(bn: nn.BatchNorm2d, keep: Tensor, key: str) -> dict[str, Tensor]:
    out = {f"{key}.{k}": getattr(bn, k).detach()[keep] for k in ("weight", "bias", "running_mean", "running_var")}
    out[f"{key}.num_batches_tracked"] = bn.num_batches_tracked.detach().clone()
    return out


def _block_state(tblk: nn.Module, size: dict[str, int], rs: list[int], prefix: str, key: str) -> dict[str, Tensor]:
    """The state of one student block taken from teacher block ``tblk`` (rs: kept residual channels)."""
    attn = tblk.attn
    h_t, hd_t = int(attn.num_heads), int(attn.head_dim)
    h_s, hd_s, m_s = size["heads"], size["head_dim"], size["mlp_dim"]
    mlp_t = int(tblk.mlp.c_fc.out_features)
    for what, s, t in (("heads", h_s, h_t), ("head_dim", hd_s, hd_t), ("mlp_dim", m_s, mlp_t)):
        if s > t:
            raise InheritanceError(
                f"student {key}.{what}: {s} is larger than the teacher's {t}; weight inheritance needs a student "
                "no wider than its teacher: shrink the student or use student.init: random")
    heads = imp.top_k(imp.head_scores(attn), h_s)
    qrows: list[int] = []
    vrows: list[int] = []
    for h in heads:
        qk, v = imp.head_channel_scores(attn, h)
        qrows += [h * hd_t + j for j in imp.top_k(qk, hd_s)]
        vrows += [h * hd_t + j for j in imp.top_k(v, hd_s)]
    inner = h_t * hd_t
    w, b = attn.qkv.weight.detach(), attn.qkv.bias.detach()
    qi = torch.tensor(qrows)
    vi = torch.tensor(vrows)
    ri = torch.tensor(rs)
    scale = math.sqrt(hd_s / hd_t)
    mlp = torch.tensor(imp.top_k(imp.mlp_scores(tblk.mlp), m_s))
    st = {
        "ln_1.weight": tblk.ln_1.weight[ri], "ln_1.bias": tblk.ln_1.bias[ri],
        "ln_2.weight": tblk.ln_2.weight[ri], "ln_2.bias": tblk.ln_2.bias[ri],
        "attn.qkv.weight": torch.cat([w[qi][:, ri] * scale, w[inner + qi][:, ri], w[2 * inner + vi][:, ri]]),
        "attn.qkv.bias": torch.cat([b[qi] * scale, b[inner + qi], b[2 * inner + vi]]),
        "attn.proj.weight": attn.proj.weight[ri][:, vi], "attn.proj.bias": attn.proj.bias[ri],
        "mlp.c_fc.weight": tblk.mlp.c_fc.weight[mlp][:, ri], "mlp.c_fc.bias": tblk.mlp.c_fc.bias[mlp],
        "mlp.c_proj.weight": tblk.mlp.c_proj.weight[ri][:, mlp], "mlp.c_proj.bias": tblk.mlp.c_proj.bias[ri],
    }
    return {f"{prefix}.{k}": v.detach().clone() for k, v in st.items()}


@dataclass
class InheritancePlan:
    """What a student took from its teacher (recorded in the artifact's metrics)."""

    layers: dict[str, list[int]] = field(default_factory=dict)
    layer_selection: str = "uniform"
    widths: dict[str, Any] | None = None  # stripe-gru: the teacher's sizes pruned to (each tower's)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"layers": self.layers, "layer_selection": self.layer_selection}
        if self.widths is not None:
            out["widths"] = self.widths
        return out


def _inherit_stripe(teacher: nn.Module, t_cfg: dict[str, Any], s_cfg: dict[str, Any], teacher_name: str,
                    plan: InheritancePlan, layer_selection: str) -> nn.Module:
    """A ``stripe-gru`` student inherited from a ``stripe-gru`` teacher: the teacher pruned, data-free, to the
    student's widths (:mod:`.prune_stripe`: stem and stage channels, each block's inner channels, the token width
    and the GRU's hidden units), keeping in every group the channels or units of the largest weight magnitude.
    Depth (blocks per stage, GRU layers), stripes and the joint embedding width must equal the teacher's; the
    input size and context length may differ (neither shapes a weight)."""
    from ..models.factory import config_from_model
    from ..models.stripe_gru import inner_widths
    from . import prune_stripe
    from .prune import make_importance

    if layer_selection != "uniform":
        raise InheritanceError(
            f"student.layer_selection: {layer_selection!r} ranks transformer blocks, and a stripe-gru student "
            "keeps every layer of its teacher (it inherits narrower widths); set it to uniform")
    sv, tv, st, tt = s_cfg["vision_cfg"], t_cfg["vision_cfg"], s_cfg["text_cfg"], t_cfg["text_cfg"]

    def fail(key: str, s: Any, t: Any, what: str) -> None:
        raise InheritanceError(
            f"student {key}: {s} is {what} the teacher's {t} ({teacher_name}); a stripe-gru student inherits its "
            "teacher pruned to narrower widths, so it needs the teacher's depth, stripes and embed_dim and widths "
            "no larger than the teacher's: change the student config or use student.init: random")

    for key, s, t in (("embed_dim", s_cfg["embed_dim"], t_cfg["embed_dim"]),
                      ("vision_cfg.blocks", list(sv["blocks"]), list(tv["blocks"])),
                      ("vision_cfg.stripes", sv["stripes"], tv["stripes"]),
                      ("text_cfg.layers", st["layers"], tt["layers"])):
        if s != t:
            fail(key, s, t, "different from")
    s_inner, t_inner = inner_widths(sv), inner_widths(tv)
    for key, s, t in (("vision_cfg.channels", list(sv["channels"]), list(tv["channels"])),
                      ("vision_cfg.inner", [w for x in s_inner for w in x], [w for x in t_inner for w in x]),
                      ("text_cfg.width", [st["width"]], [tt["width"]]),
                      ("text_cfg.hidden", [st["hidden"]], [tt["hidden"]])):
        if any(a > b for a, b in zip(s, t, strict=True)):
            fail(key, s if len(s) > 1 else s[0], t if len(t) > 1 else t[0], "wider than")
    student = copy.deepcopy(teacher).float().cpu()
    for p in student.parameters():
        p.requires_grad_(True)
        p.grad = None
    student.train()
    h, w = tv["image_size"]
    target = {"channels": list(sv["channels"]), "inner": s_inner}
    with torch.enable_grad():  # torch-pruning traces the trunk through autograd
        prune_stripe.prune_vision_to(student, target, torch.zeros(1, 3, h, w), make_importance("magnitude"))
    prune_stripe.prune_text_to(student, int(st["width"]), int(st["hidden"]), "magnitude")
    student.context_length = int(st["context_length"])
    cfg = config_from_model(student, s_cfg)
    if _architecture(cfg) != _architecture(s_cfg):  # the pruners' contract; a mismatch is a bug here
        raise RuntimeError(f"stripe-gru inheritance built {cfg} instead of the student config {s_cfg}")
    set_meta(student, config=cfg)
    plan.layer_selection = "all layers, widths by weight magnitude"
    plan.layers = {"vision": list(range(len(sv["blocks"]))), "text": list(range(int(st["layers"])))}
    plan.widths = {"vision": prune_stripe.sizes(student, "vision"), "text": prune_stripe.sizes(student, "text")}
    log.info("inherited %s from %s: the teacher pruned to vision %s, text %s (weight magnitude)",
             s_cfg.get("name"), teacher_name, plan.widths["vision"], plan.widths["text"])
    return student


@torch.no_grad()
def inherit_weights(
    teacher: nn.Module,
    student_cfg: dict[str, Any],
    *,
    layer_selection: str = "uniform",
    layer_scores: dict[str, Tensor] | None = None,
    teacher_name: str = "teacher",
    plan: InheritancePlan | None = None,
) -> nn.Module:
    """A student of architecture ``student_cfg`` initialised from ``teacher`` (TinyCLIP-style inheritance).

    Layers: ``layer_selection`` 'uniform' (stride, first and last kept) or 'importance' (top ``layer_scores``
    per tower, see :func:`importance.layer_scores`). Residual channels, embedding dimensions, heads, channels in
    heads and MLP channels: the teacher's most important by weight norm. The token table (and a vocabulary map of
    a vocabulary-pruned teacher) is the teacher's; the student's ``text_cfg.vocab_size`` is set to match.

    A ``stripe-gru`` teacher and student: the teacher pruned to the student's widths (see :func:`_inherit_stripe`).

    Raises :class:`InheritanceError` when the student is wider or deeper than the teacher, or differs in patch size,
    activation or model family.
    """
    from ..models.config import block_sizes, validate_model_config
    from ..models.factory import build_model, config_from_model
    from ..models.io import load_state_dict_checked

    t_cfg = meta_of(teacher).config or config_from_model(teacher)
    s_cfg = validate_model_config(student_cfg, source="student")
    vocab = int(teacher.token_embedding.num_embeddings)
    if s_cfg["text_cfg"]["vocab_size"] != vocab:
        log.info("student vocab_size %d -> %d (the teacher's token table)", s_cfg["text_cfg"]["vocab_size"], vocab)
        s_cfg["text_cfg"]["vocab_size"] = vocab
    plan = plan if plan is not None else InheritancePlan()
    if model_family(s_cfg) == model_family(t_cfg) == "stripe-gru":
        return _inherit_stripe(teacher, t_cfg, s_cfg, teacher_name, plan, layer_selection)
    _check_fits(s_cfg, t_cfg, teacher_name)
    plan.layer_selection = layer_selection
    state: dict[str, Tensor] = {}
    es = torch.tensor(imp.top_k(imp.embed_dim_scores(teacher), s_cfg["embed_dim"]))
    for tower in ("vision", "text"):
        n_t = len(tower_blocks(teacher, tower))
        n_s = s_cfg[f"{tower}_cfg"]["layers"]
        scores = layer_scores.get(tower) if layer_scores else None
        layers = _select_layers(n_t, n_s, layer_selection, scores)
        plan.layers[tower] = layers
        width = s_cfg[f"{tower}_cfg"]["width"]
        rs = imp.top_k(imp.residual_channel_scores(teacher, tower, layers), width)
        ri = torch.tensor(rs)
        t_blocks = tower_blocks(teacher, tower)
        prefix = "visual.transformer.resblocks" if tower == "vision" else "transformer.resblocks"
        for i, (li, size) in enumerate(zip(layers, block_sizes(s_cfg, tower), strict=True)):
            state.update(_block_state(t_blocks[li], size, rs, f"{prefix}.{i}", f"{tower}_blocks[{i}]"))
        if tower == "vision":
            v = teacher.visual
            pe = _resize_visual_pos(v.positional_embedding.detach()[:, ri], _grid(t_cfg), _grid(s_cfg))
            state.update({
                "visual.class_embedding": v.class_embedding[ri],
                "visual.positional_embedding": pe,
                "visual.ln_pre.weight": v.ln_pre.weight[ri], "visual.ln_pre.bias": v.ln_pre.bias[ri],
                "visual.ln_post.weight": v.ln_post.weight[ri], "visual.ln_post.bias": v.ln_post.bias[ri],
                "visual.proj": v.proj[ri][:, es],
            })
            state.update(_stem_state(teacher, t_cfg, s_cfg, ri))
        else:
            pe = _resize_text_pos(teacher.positional_embedding.detach()[:, ri], s_cfg["text_cfg"]["context_length"])
            state.update({
                "token_embedding.weight": teacher.token_embedding.weight[:, ri], "positional_embedding": pe,
                "ln_final.weight": teacher.ln_final.weight[ri], "ln_final.bias": teacher.ln_final.bias[ri],
                "text_projection": teacher.text_projection[ri][:, es],
            })
    state["logit_scale"] = teacher.logit_scale.detach()
    student = build_model(s_cfg)
    load_state_dict_checked(student, {k: v.detach().clone().float() for k, v in state.items()},
                            source=f"inheritance from {teacher_name}")
    vm = meta_of(teacher).vocab_map
    if vm:
        set_meta(student, vocab_map=dict(vm))
        set_meta(student, unk_id=meta_of(teacher).unk_id)
    set_meta(student, config=config_from_model(student, s_cfg))
    log.info("inherited %s from %s: vision layers %s, text layers %s", s_cfg.get("name"), teacher_name,
             plan.layers["vision"], plan.layers["text"])
    return student


# ------------------------------------------------------------------------------------------------- teacher cache


@dataclass
class TeacherCache:
    """Cached, L2-normalised teacher embeddings keyed by (epoch, training sample index).

    ``text`` / ``image``: (E, N, D) tensors; E == 1 with ``*_invariant`` set means "the same every epoch".
    """

    path: Path
    text: Tensor
    image: Tensor | None
    meta: dict[str, Any]

    @property
    def epochs(self) -> int:
        return int(self.meta["epochs"])

    def lookup(self, epoch: int, index: Tensor) -> dict[str, Tensor]:
        """Cached embeddings of samples ``index`` in ``epoch``: {"text"?, "image"?} (an uncovered epoch: none)."""
        out: dict[str, Tensor] = {}
        for name, table in (("text", self.text), ("image", self.image)):
            if table is None:
                continue
            e = 0 if self.meta.get(f"{name}_invariant") else epoch
            if e < table.shape[0]:
                out[name] = F.normalize(table[e][index].float(), dim=-1)
        return out


def _augment_invariant(augment: Any, has_bt: bool) -> tuple[bool, bool]:
    """(image views the same every epoch, text the same every epoch)."""
    image = not (augment.image.pool and augment.image.num_ops)
    t = augment.text
    text = not ((t.back_translation_p and has_bt) or t.deletion_p or t.swap_p or t.insertion_p or t.synonym_p)
    return image, text


def records_digest(records: Sequence[Any]) -> str:
    """A hash of training records (image, identity, captions, back-translations) in order."""
    h = hashlib.sha256()
    for r in records:
        h.update(json.dumps([r.image, r.pid, list(r.captions), list(r.captions_bt or ())]).encode())
    return h.hexdigest()


def cache_key(recipe: DistillRecipe, records: Sequence[Any], views: Sequence[str],
              image_size: tuple[int, int]) -> dict[str, Any]:
    """What a teacher cache depends on besides the teacher: data, augmentation, seed, views and input size."""
    return {
        "data": records_digest(records),
        "seed": recipe.seed,
        "augment": hashlib.sha256(json.dumps(recipe.augment.model_dump(mode="json"), sort_keys=True)
                                  .encode()).hexdigest()[:16],
        "image_mvs": "image_mvs" in views,
        "image_size": list(image_size),
    }


def resolve_cache_path(template: str, teacher_hash: str, key: dict[str, Any]) -> Path:
    """``teacher.cache`` with ``{teacher}`` / ``{key}`` replaced by short hashes of the teacher and the cache key."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return Path(template.replace("{teacher}", teacher_hash[:12]).replace("{key}", digest))


def load_teacher_cache(path: Path, teacher_hash: str, key: dict[str, Any] | None = None,
                       teacher_path: Path | None = None) -> TeacherCache:
    """Open a cache file and check that it was built for this teacher (content hash) and, when ``key`` is given,
    for the same training data / augmentation / seed / views; :class:`TeacherCacheError` otherwise."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            names = set(f.keys())
            tensors = {n: f.get_tensor(n) for n in names}
    except (SafetensorError, OSError, ValueError) as exc:
        raise TeacherCacheError(f"{path}: not a readable teacher cache ({exc}); delete it to rebuild") from exc
    if meta.get("format") != CACHE_FORMAT or "text" not in names:
        raise TeacherCacheError(f"{path}: not a teacher cache file (format {meta.get('format')!r}); "
                                "point teacher.cache at another path")
    built_for = meta.get("teacher", "")
    if built_for != teacher_hash:
        where = f" {teacher_path}" if teacher_path else ""
        raise TeacherCacheError(
            f"{path}: built for another teacher (content hash {built_for[:12]}), not teacher{where} "
            f"({teacher_hash[:12]}); delete the file or set teacher.cache to a new path")
    info = json.loads(meta.get("info", "{}"))
    if key is not None:
        theirs = info.get("key", {})
        for k, v in key.items():
            if theirs.get(k) != v:
                raise TeacherCacheError(
                    f"{path}: built with a different '{k}' ({theirs.get(k)!r}, this run {v!r}): the training "
                    "data, augmentation, seed or views differ; delete the file or set teacher.cache to a new path")
    return TeacherCache(path=path, text=tensors["text"], image=tensors.get("image"), meta=info)


@torch.no_grad()
def build_teacher_cache(
    path: Path,
    teacher: nn.Module,
    teacher_hash: str,
    records: Sequence[Any],
    image_paths: Sequence[Path],
    recipe: DistillRecipe,
    *,
    views: Sequence[str],
    image_size: tuple[int, int],
    epochs: int,
    device: torch.device,
    adapt_image: Callable[[Tensor], Tensor] | None = None,
    batch_size: int = 128,
    autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> TeacherCache:
    """Compute and write the teacher's embeddings of every training sample for ``epochs`` epochs.

    The samples are generated by the same :class:`data.loader.TrainSet` as training (same seed, augmentation and
    views, images at ``image_size``), text tokenised with the teacher's own tokenizer. ``autocast``: the training's
    mixed-precision context (the trainer's); by default the recipe's ``optim.precision`` on a CUDA device.
    """
    from safetensors.torch import save_file
    from torch.utils.data import DataLoader

    from ..data.loader import ImageStore, TrainSet
    from ..data.records import remap_ids
    from ..models.tokenizer import get_tokenizer
    from ..runtime.tokenizer import clean_caption

    path = Path(path)
    key = cache_key(recipe, records, views, image_size)
    has_bt = any(r.captions_bt for r in records)
    img_inv, txt_inv = _augment_invariant(recipe.augment, has_bt)
    tok = get_tokenizer(meta_of(teacher).config, meta_of(teacher).vocab_map or None,
                        meta_of(teacher).unk_id)
    store = ImageStore(list(image_paths), image_size, cache=recipe.data.cache_images)
    set_views = ("image", "image_mvs") if "image_mvs" in views else ("image",)
    ds = TrainSet(records, store, remap_ids(records), tok, recipe.augment, views=set_views, seed=recipe.seed,
                  clean=clean_caption)
    dtype = torch.float16 if recipe.teacher.cache_dtype == "float16" else torch.float32
    n_text = 1 if txt_inv else epochs
    n_image = 1 if img_inv else epochs
    was = teacher.training
    teacher.eval().to(device)
    if autocast is None:
        amp = device.type == "cuda" and recipe.optim.precision != "fp32"
        amp_dtype = torch.float16 if recipe.optim.precision == "fp16" else torch.bfloat16

        def autocast() -> contextlib.AbstractContextManager:
            return torch.autocast("cuda", dtype=amp_dtype) if amp else contextlib.nullcontext()
    text_out, image_out = [], []
    for epoch in range(max(n_text, n_image)):
        ds.epoch = epoch
        loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=recipe.data.num_workers)
        texts, images = [], []
        for batch in loader:
            with autocast():
                if epoch < n_image:
                    img = batch["image"].to(device)
                    if adapt_image is not None:
                        img = adapt_image(img)
                    images.append(F.normalize(teacher.encode_image(img).float(), dim=-1).cpu().to(dtype))
                if epoch < n_text:
                    txt = batch["text"].to(device)
                    texts.append(F.normalize(teacher.encode_text(txt).float(), dim=-1).cpu().to(dtype))
        if texts:
            text_out.append(torch.cat(texts))
        if images:
            image_out.append(torch.cat(images))
        log.info("teacher cache: epoch %d of %d done", epoch + 1, max(n_text, n_image))
    teacher.train(was)
    info = {"key": key, "epochs": epochs, "text_invariant": txt_inv, "image_invariant": img_inv,
            "samples": len(ds), "dtype": recipe.teacher.cache_dtype}
    tensors = {"text": torch.stack(text_out).contiguous(), "image": torch.stack(image_out).contiguous()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata={"format": CACHE_FORMAT, "teacher": teacher_hash,
                                               "info": json.dumps(info)})
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise UserError(f"{path}: cannot write the teacher cache ({exc.strerror or exc}); "
                        "fix the folder or set teacher.cache elsewhere") from exc
    log.info("teacher cache written to %s (%d samples, %d text / %d image epochs)", path, len(ds), n_text, n_image)
    return TeacherCache(path=path, text=tensors["text"], image=tensors["image"], meta=info)


# ------------------------------------------------------------------------------------------------- the stage


def _importance_batch(teacher: nn.Module, ds: Any, records: Sequence[Any], n: int) -> tuple[Tensor, Tensor]:
    from ..data.loader import load_image_resized
    from ..models.config import image_size_hw
    from ..models.tokenizer import get_tokenizer
    from ..retrieval.encoders import normalize_pixels
    from ..runtime.tokenizer import clean_caption

    recs = list(records)[:n]
    size = image_size_hw(meta_of(teacher).config)
    images = normalize_pixels(torch.stack([load_image_resized(ds.image_path(r), size) for r in recs]))
    tok = get_tokenizer(meta_of(teacher).config, meta_of(teacher).vocab_map or None,
                        meta_of(teacher).unk_id)
    return images, tok([clean_caption(r.captions[0]) for r in recs])


def _architecture(cfg: dict[str, Any]) -> str:
    from ..models.config import validate_model_config

    c = validate_model_config(cfg)
    for k in ("name", "description"):
        c.pop(k, None)
    return json.dumps(c, sort_keys=True)


def build_student(recipe: DistillRecipe, teacher: nn.Module, ds: Any, train_records: Sequence[Any],
                  plan: InheritancePlan | None = None) -> nn.Module:
    """The student model of a recipe, initialised as ``student.init`` says (before vocabulary pruning)."""
    from ..models.factory import build_model
    from ..models.io import load_model

    st = recipe.student
    t_cfg = meta_of(teacher).config
    if st.init == "artifact":
        src = Path(st.init_artifact or "")
        model = load_model(src)
        if st.config is not None or st.inline is not None:
            want = student_config(st, t_cfg)
            mine = dict(meta_of(model).config)
            mine["text_cfg"] = {**mine["text_cfg"], "vocab_size": want["text_cfg"]["vocab_size"]}
            if _architecture(want) != _architecture(mine):
                raise ConfigError(f"student.init_artifact {src}: its architecture differs from student.config / "
                                  "student.inline; drop those keys to use the artifact's architecture")
        return model
    cfg = student_config(st, t_cfg)
    if st.init == "random":
        torch.manual_seed(recipe.seed)
        return build_model(cfg)
    scores = None
    if st.layer_selection == "importance" and model_family(t_cfg) == "clip":
        images, tokens = _importance_batch(teacher, ds, train_records, st.importance_samples)
        scores = imp.layer_scores(teacher, images, tokens)
        log.info("layer importance: vision %s text %s", [round(float(x), 3) for x in scores["vision"]],
                 [round(float(x), 3) for x in scores["text"]])
    return inherit_weights(teacher, cfg, layer_selection=st.layer_selection, layer_scores=scores,
                           teacher_name=str(recipe.teacher.artifact), plan=plan)


class DistillTeacher(Teacher):
    """The teacher of a distill recipe: loaded from ``teacher.artifact`` on first use; at set-up it opens (or
    builds, on the main process) the recipe's ``teacher.cache`` for the trainer's data, views, student input size
    and number of epochs. :attr:`cache_info` describes the cache for the artifact's metrics."""

    def __init__(self, recipe: DistillRecipe) -> None:
        super().__init__(artifact=recipe.teacher.artifact, hidden=recipe.teacher.hidden)
        self.recipe = recipe
        self.cache_info: dict[str, Any] = {}

    def setup(self, trainer: Trainer) -> None:
        super().setup(trainer)
        if self.recipe.teacher.cache:
            self.cache, self.cache_info = self._open_cache(trainer)

    def _open_cache(self, trainer: Trainer) -> tuple[TeacherCache, dict[str, Any]]:
        from .. import distributed as dist
        from ..models.config import image_size_hw

        r, teacher = self.recipe, self.model
        assert self.artifact is not None and r.teacher.cache
        teacher_hash = self.content_hash or ""
        records, views = trainer.train_records, trainer.views
        size = image_size_hw(meta_of(trainer.model).config)
        key = cache_key(r, records, views, size)
        epochs = min(r.optim.epochs, math.ceil(trainer.total_steps / trainer.per_epoch))
        path = resolve_cache_path(r.teacher.cache, teacher_hash, key)
        built = False
        if not path.exists() and dist.is_main():
            t_hw = image_size_hw(meta_of(teacher).config)
            resize = None if t_hw == size else (
                lambda x: F.interpolate(x, size=t_hw, mode="bilinear", align_corners=False))
            build_teacher_cache(path, teacher, teacher_hash, records, [trainer.dataset.image_path(x) for x in records],
                                r, views=views, image_size=size, epochs=epochs, device=trainer.device,
                                adapt_image=resize, batch_size=r.eval.batch_size, autocast=trainer.autocast)
            built = True
        dist.barrier()
        cache = load_teacher_cache(path, teacher_hash, key, self.artifact)
        if cache.epochs < epochs and not (cache.meta.get("text_invariant") and cache.meta.get("image_invariant")):
            log.warning("%s covers %d of the %d epochs this run needs; later epochs run the teacher online",
                        path, cache.epochs, epochs)
        info = {"path": str(path), "built": built, "epochs": cache.epochs,
                "text_invariant": bool(cache.meta.get("text_invariant")),
                "image_invariant": bool(cache.meta.get("image_invariant"))}
        return cache, info


def run_distill(recipe: DistillRecipe, *, resume: bool = False, force: bool = False, progress: Any = None,
                dataset: Any = None) -> Path:
    """Distil ``recipe.teacher.artifact`` into the recipe's student; returns the new artifact folder.

    The shared :class:`~tbps_compress.engine.train.Trainer` does the run (folder and resume checks, processes,
    data, steps, precision, checkpoints); this adds the student (built from the trainer's training data) and the
    teacher as the trainer's loss-input provider (:class:`DistillTeacher`) when a loss needs it."""
    from ..artifacts import WEIGHTS
    from ..engine.train import Trainer
    from ..losses import LossSet
    from ..models.factory import count_macs, count_parameters
    from ..models.tokenizer import get_tokenizer
    from ..runtime.tokenizer import clean_caption

    r = recipe
    teacher_path = Path(r.teacher.artifact)
    losses = LossSet({k: (dict(v) if v else {}) for k, v in r.losses.items()})
    teacher = DistillTeacher(r)
    uses_teacher = any(n in KD_NEEDS for n in losses.needs) or r.teacher.hidden
    plan = InheritancePlan()
    vocab_info: dict[str, Any] | None = None

    def student(trainer: Trainer) -> nn.Module:
        nonlocal vocab_info
        model = build_student(r, teacher.model, trainer.dataset, trainer.train_records, plan)
        params_before = count_parameters(model)
        if r.student.vocab_prune:
            texts = vocabulary_captions(trainer.train_records, r.augment, clean_caption)
            rows_before = int(model.token_embedding.num_embeddings)
            prune_vocabulary(model, texts, get_tokenizer(meta_of(model).config))
            vocab_info = {"vocab_size_before": rows_before,
                          "vocab_size_after": int(model.token_embedding.num_embeddings),
                          "unk_id": meta_of(model).unk_id, "parameters_before": params_before["total"]}
        return model

    def extra(tmp: Path) -> dict[str, Any]:
        t_model, s_model = teacher.model, trainer.model
        teacher_params = count_parameters(t_model)
        teacher_macs = count_macs(meta_of(t_model).config)
        sp = count_parameters(s_model)
        macs = count_macs(meta_of(s_model).config)
        info: dict[str, Any] = {
            "teacher": str(teacher_path), "teacher_content_hash": teacher.content_hash or "",
            "init": r.student.init, "inheritance": plan.as_dict() if r.student.init == "inherit" else None,
            "teacher_parameters": teacher_params, "teacher_macs": teacher_macs, "macs": macs,
            "non_embedding_ratio": round(sp["non_embedding"] / max(1, teacher_params["non_embedding"]), 4),
            "macs_ratio": round(sum(macs.values()) / max(1, sum(teacher_macs.values())), 4),
            "teacher_test": _teacher_metrics(teacher_path), "cache": teacher.cache_info or None,
        }
        out: dict[str, Any] = {"distill": info}
        if vocab_info is not None:
            saved = vocab_info["parameters_before"] - sp["total"]
            elem = s_model.token_embedding.weight.element_size()
            size = (tmp / WEIGHTS).stat().st_size
            out["vocab_prune"] = {**vocab_info, "parameters_after": sp["total"], "parameters_saved": saved,
                                  "weights_file_bytes": size, "weights_file_bytes_unpruned": size + saved * elem,
                                  "file_saving": round(saved * elem / (size + saved * elem), 4)}
            log.info("vocabulary pruning saved %d parameters (%.1f%% of the weights file: %.2f MB -> %.2f MB)",
                     saved, 100 * out["vocab_prune"]["file_saving"], (size + saved * elem) / 1e6, size / 1e6)
        return out

    trainer = Trainer(r, model=student, providers=[teacher] if uses_teacher else [], stage="distill",
                      parent=teacher_path, progress=progress, extra_files=extra, dataset=dataset)
    return trainer.run(resume=resume, force=force)


def _teacher_metrics(path: Path) -> dict[str, Any] | None:
    f = Path(path) / "metrics.json"
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data.get("test") if isinstance(data, dict) else None
