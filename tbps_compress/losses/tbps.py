"""TBPS-CLIP task losses: N-ITC, MVS-I, R-ITC, C-ITC, SS-I, plus IRRA's SDM, ID and plain CLIP ITC.

Notation: ``s = exp(logit_scale).clamp(max=100)``; embeddings are L2-normalised, so ``s * a @ b.T`` are scaled
cosine similarities. Rows are the local batch, columns the batch gathered across ranks (``LossInputs.all_*``).
The identity-aware target ``T[i, j] = 1`` where ``pid_i == all_pid_j``, each row normalised to sum 1.

All losses are means over the local rows, so under DDP (columns gathered with gradient, parameter gradients
averaged) training matches single-process training on the global batch.
"""

from __future__ import annotations

import pydantic
import torch
import torch.nn.functional as F
from torch import Tensor

from tbps_compress.losses.registry import LossInputs, LossParams, ensure_float, register_loss

from .. import distributed as dist

MAX_SCALE = 100.0


# --------------------------------------------------------------------------------------------------- helpers


def scale_from_logit(logit_scale: Tensor) -> Tensor:
    """``exp(logit_scale)`` clamped at 100, in float32."""
    return ensure_float(logit_scale).exp().clamp(max=MAX_SCALE)


def identity_targets(pids: Tensor, all_pids: Tensor) -> Tensor:
    """(b, B) float target: 1 where identities match, each row normalised to sum 1."""
    match = (pids.view(-1, 1) == all_pids.view(1, -1)).float()
    return match / match.sum(dim=1, keepdim=True).clamp(min=1.0)


def soft_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Mean over rows of ``-sum_j target_ij * log_softmax(logits)_ij``."""
    return -(target * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def ramp_alpha(alpha: float, progress: float, ramp_epochs: float) -> float:
    """``alpha * min(1, progress / ramp_epochs)``: linear from 0 over the first ``ramp_epochs`` epochs."""
    if ramp_epochs <= 0:
        return alpha
    return alpha * min(1.0, max(0.0, progress) / ramp_epochs)


def _columns(local: Tensor, gathered: Tensor | None) -> Tensor:
    return ensure_float(local if gathered is None else gathered)


def _column_pids(inputs: LossInputs, n_cols: int) -> Tensor:
    all_pids = inputs.pids if inputs.all_pids is None else inputs.all_pids
    if all_pids.shape[0] != n_cols:
        raise ValueError(
            f"identity labels for {all_pids.shape[0]} columns but the similarity has {n_cols}; "
            "pass all_pids gathered like all_image / all_text"
        )
    return all_pids


def n_itc_core(
    image: Tensor,
    text: Tensor,
    all_image: Tensor,
    all_text: Tensor,
    pids: Tensor,
    all_pids: Tensor,
    scale: Tensor,
    alpha: float,
) -> Tensor:
    """Soft-target ITC, mean of image->text and text->image.

    target = alpha * softmax(logits without gradient) + (1 - alpha) * T.
    """
    logits_i2t = scale * image @ all_text.t()
    logits_t2i = scale * text @ all_image.t()
    target = identity_targets(pids, all_pids)
    if alpha > 0:
        with torch.no_grad():
            target_i2t = alpha * F.softmax(logits_i2t, dim=1) + (1.0 - alpha) * target
            target_t2i = alpha * F.softmax(logits_t2i, dim=1) + (1.0 - alpha) * target
    else:
        target_i2t = target_t2i = target
    return 0.5 * (soft_cross_entropy(logits_i2t, target_i2t) + soft_cross_entropy(logits_t2i, target_t2i))


def kl_to_identity(logits: Tensor, target: Tensor, eps: float) -> Tensor:
    """Mean over rows of ``sum_j p_ij * (log p_ij - log(T_ij + eps))`` with ``p = softmax(logits)``.

    This is IRRA's SDM form of KL(p || T): ``T + eps`` is not renormalised, so the minimum (p = T, one match
    per row) is ``-log(1 + eps)``, slightly below zero.
    """
    log_p = F.log_softmax(logits, dim=1)
    return (log_p.exp() * (log_p - torch.log(target + eps))).sum(dim=1).mean()


def _r_itc_pair(inputs: LossInputs, scale: Tensor, eps: float) -> Tensor:
    image, text = ensure_float(inputs.image), ensure_float(inputs.text)
    all_image, all_text = _columns(inputs.image, inputs.all_image), _columns(inputs.text, inputs.all_text)
    target = identity_targets(inputs.pids, _column_pids(inputs, all_text.shape[0]))
    i2t = kl_to_identity(scale * image @ all_text.t(), target, eps)
    t2i = kl_to_identity(scale * text @ all_image.t(), target, eps)
    return 0.5 * (i2t + t2i)


# --------------------------------------------------------------------------------------------------- N-ITC / MVS-I


class NItcParams(LossParams):
    alpha: float = pydantic.Field(0.5, ge=0.0, le=1.0, description="weight of the model's own soft labels")
    ramp_epochs: float = pydantic.Field(1.0, ge=0.0, description="alpha ramps linearly from 0 over these epochs")
    soft_labels: bool = pydantic.Field(True, description="False: target is the identity target T only")


@register_loss("n_itc", params=NItcParams)
def n_itc(
    inputs: LossInputs, alpha: float = 0.5, ramp_epochs: float = 1.0, soft_labels: bool = True
) -> dict[str, Tensor]:
    """N-ITC: identity-aware soft-target cross-entropy, both directions averaged."""
    a = ramp_alpha(alpha, inputs.progress, ramp_epochs) if soft_labels else 0.0
    all_image, all_text = _columns(inputs.image, inputs.all_image), _columns(inputs.text, inputs.all_text)
    loss = n_itc_core(
        ensure_float(inputs.image),
        ensure_float(inputs.text),
        all_image,
        all_text,
        inputs.pids,
        _column_pids(inputs, all_text.shape[0]),
        scale_from_logit(inputs.logit_scale),
        a,
    )
    return {"n_itc_loss": loss}


@register_loss("mvs_i", needs=("image_mvs",), params=NItcParams)
def mvs_i(
    inputs: LossInputs, alpha: float = 0.5, ramp_epochs: float = 1.0, soft_labels: bool = True
) -> dict[str, Tensor]:
    """MVS-I: N-ITC computed on the SECOND augmented image view (``image_mvs`` / ``all_image_mvs``) vs the text.

    Only the second view's term is returned. TBPS-CLIP averages the two views' N-ITC terms, which the full recipe
    gets with ``n_itc: {weight: 0.5}`` and ``mvs_i: {weight: 0.5}``.
    """
    assert inputs.image_mvs is not None
    a = ramp_alpha(alpha, inputs.progress, ramp_epochs) if soft_labels else 0.0
    all_image = _columns(inputs.image_mvs, inputs.all_image_mvs)
    all_text = _columns(inputs.text, inputs.all_text)
    if inputs.all_image is not None and inputs.all_image_mvs is None:
        raise ValueError("mvs_i: all_image is gathered but all_image_mvs is not; gather the second view too")
    loss = n_itc_core(
        ensure_float(inputs.image_mvs),
        ensure_float(inputs.text),
        all_image,
        all_text,
        inputs.pids,
        _column_pids(inputs, all_text.shape[0]),
        scale_from_logit(inputs.logit_scale),
        a,
    )
    return {"mvs_i_loss": loss}


# --------------------------------------------------------------------------------------------------- R-ITC / SDM


class RItcParams(LossParams):
    eps: float = pydantic.Field(0.01, gt=0.0, description="smoothing added to the identity target inside the log")


@register_loss("r_itc", params=RItcParams)
def r_itc(inputs: LossInputs, eps: float = 0.01) -> dict[str, Tensor]:
    """R-ITC: KL(softmax(s) || T + eps) with the learnable scale, both directions averaged."""
    return {"r_itc_loss": _r_itc_pair(inputs, scale_from_logit(inputs.logit_scale), eps)}


class SdmParams(LossParams):
    eps: float = pydantic.Field(1e-8, gt=0.0, description="smoothing added to the identity target inside the log")
    temperature: float = pydantic.Field(0.02, gt=0.0, description="fixed temperature (IRRA: 0.02, i.e. scale 50)")


@register_loss("sdm", params=SdmParams)
def sdm(inputs: LossInputs, eps: float = 1e-8, temperature: float = 0.02) -> dict[str, Tensor]:
    """IRRA's SDM: the R-ITC form with a fixed temperature, both directions AVERAGED.

    IRRA sums the two directions; use weight 2 to reproduce it exactly.
    """
    scale = torch.tensor(1.0 / temperature, device=inputs.image.device)
    return {"sdm_loss": _r_itc_pair(inputs, scale, eps)}


# --------------------------------------------------------------------------------------------------- C-ITC


class CItcParams(LossParams):
    in_modal: float = pydantic.Field(0.25, ge=0.0, description="weight of mean((S_II - S_TT)^2) / s^2")
    cross_modal: float = pydantic.Field(0.25, ge=0.0, description="weight of mean((S_IT - S_TI)^2) / s^2")


@register_loss("c_itc", params=CItcParams)
def c_itc(inputs: LossInputs, in_modal: float = 0.25, cross_modal: float = 0.25) -> dict[str, Tensor]:
    """C-ITC (CyCLIP's cyclic consistency).

    Dividing the scaled similarities by s^2 leaves plain cosines, so the terms are computed on cosines:
    in-modal ``mean((I @ all_I.T - T @ all_T.T)^2)``, cross-modal ``mean((I @ all_T.T - T @ all_I.T)^2)`` (with
    rows local, ``T @ all_I.T`` is the transpose of ``S_IT`` restricted to these rows).
    """
    image, text = ensure_float(inputs.image), ensure_float(inputs.text)
    all_image, all_text = _columns(inputs.image, inputs.all_image), _columns(inputs.text, inputs.all_text)
    loss_in = (image @ all_image.t() - text @ all_text.t()).square().mean()
    loss_cross = (image @ all_text.t() - text @ all_image.t()).square().mean()
    return {"c_itc_loss": in_modal * loss_in + cross_modal * loss_cross}


# --------------------------------------------------------------------------------------------------- SS-I


class SsiParams(LossParams):
    temperature: float = pydantic.Field(0.1, gt=0.0, description="NT-Xent temperature")
    head_hidden: int | None = pydantic.Field(
        None, ge=1, description="hidden width of the MLP head (d -> h -> d); default embed_dim // 4 (512-128-512)"
    )


def nt_xent(z_a: Tensor, z_b: Tensor, temperature: float) -> Tensor:
    """SimCLR's NT-Xent over the 2n views of the local batch (positives: the other view of the same image)."""
    n = z_a.shape[0]
    z = F.normalize(torch.cat([z_a, z_b], dim=0), dim=-1)
    sim = z @ z.t() / temperature
    self_mask = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    sim = sim.masked_fill(self_mask, float("-inf"))
    idx = torch.arange(n, device=z.device)
    targets = torch.cat([idx + n, idx])
    return F.cross_entropy(sim, targets)


@register_loss("ss_i", needs=("ssl_a", "ssl_b", "modules.ssl_head"), params=SsiParams)
def ss_i(inputs: LossInputs, temperature: float = 0.1, head_hidden: int | None = None) -> dict[str, Tensor]:
    """SS-I: NT-Xent between the MLP-head projections of two SimCLR views (local batch only).

    ``head_hidden`` is read by ``make_modules`` only.
    """
    assert inputs.ssl_a is not None and inputs.ssl_b is not None
    head = inputs.modules["ssl_head"]
    z_a = ensure_float(head(inputs.ssl_a))
    z_b = ensure_float(head(inputs.ssl_b))
    return {"ss_i_loss": nt_xent(z_a, z_b, temperature)}


# --------------------------------------------------------------------------------------------------- ID / ITC


@register_loss("id", needs=("modules.id_classifier",))
def id_loss(inputs: LossInputs) -> dict[str, Tensor]:
    """Identity classification: cross-entropy of the ID classifier on image and text embeddings, averaged."""
    cls = inputs.modules["id_classifier"]
    loss_i = F.cross_entropy(ensure_float(cls(inputs.image)), inputs.pids)
    loss_t = F.cross_entropy(ensure_float(cls(inputs.text)), inputs.pids)
    return {"id_loss": 0.5 * (loss_i + loss_t)}


def _diagonal_offset(b: int, n_cols: int) -> int:
    if n_cols == b:
        return 0
    if n_cols != b * dist.world_size():
        raise ValueError(
            f"itc: {n_cols} gathered columns for a local batch of {b} on {dist.world_size()} ranks; "
            "plain ITC needs equal local batch sizes (drop_last)"
        )
    return dist.rank() * b


@register_loss("itc")
def itc(inputs: LossInputs) -> dict[str, Tensor]:
    """Plain CLIP InfoNCE: the matching pair (the diagonal of the global batch) is the only positive."""
    image, text = ensure_float(inputs.image), ensure_float(inputs.text)
    all_image, all_text = _columns(inputs.image, inputs.all_image), _columns(inputs.text, inputs.all_text)
    scale = scale_from_logit(inputs.logit_scale)
    b = image.shape[0]
    targets = torch.arange(b, device=image.device) + _diagonal_offset(b, all_text.shape[0])
    loss_i2t = F.cross_entropy(scale * image @ all_text.t(), targets)
    loss_t2i = F.cross_entropy(scale * text @ all_image.t(), targets)
    return {"itc_loss": 0.5 * (loss_i2t + loss_t2i)}
