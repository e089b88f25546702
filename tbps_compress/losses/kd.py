"""Knowledge-distillation losses (student <- frozen teacher), in the same registry as the task losses.

Teacher embeddings arrive L2-normalised, computed on the same samples and views as the student's
(``LossInputs.teacher_image`` / ``teacher_text``, gathered copies in ``all_teacher_*``). When the student's
embedding width differs from the teacher's, the student embedding goes through the learned projection
``modules["kd_image_proj"]`` / ``modules["kd_text_proj"]`` (Linear, no bias; see ``make_modules``) and is
re-normalised.
"""

from __future__ import annotations

import pydantic
import torch.nn.functional as F
from torch import Tensor

from tbps_compress.errors import ConfigError
from tbps_compress.losses.registry import LossInputs, LossParams, ensure_float, hidden_proj_key, register_loss
from tbps_compress.losses.tbps import identity_targets, scale_from_logit, soft_cross_entropy


def project_to_teacher(inputs: LossInputs, student: Tensor, teacher_dim: int, key: str) -> Tensor:
    """The student embedding in the teacher's space, L2-normalised (projection only when the widths differ)."""
    if student.shape[-1] != teacher_dim:
        proj = inputs.modules.get(key)
        if proj is None:
            raise RuntimeError(
                f"student width {student.shape[-1]} != teacher width {teacher_dim} and no module {key!r}; "
                "build the loss heads with losses.make_modules(..., teacher_dim=...)"
            )
        student = proj(student)
    return F.normalize(ensure_float(student), dim=-1)


def _teacher(inputs: LossInputs) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    assert inputs.teacher_image is not None and inputs.teacher_text is not None
    t_img = ensure_float(inputs.teacher_image).detach()
    t_txt = ensure_float(inputs.teacher_text).detach()
    all_t_img = t_img if inputs.all_teacher_image is None else ensure_float(inputs.all_teacher_image).detach()
    all_t_txt = t_txt if inputs.all_teacher_text is None else ensure_float(inputs.all_teacher_text).detach()
    return t_img, t_txt, all_t_img, all_t_txt


@register_loss("kd_feature", needs=("teacher",))
def kd_feature(inputs: LossInputs) -> dict[str, Tensor]:
    """Feature KD: squared L2 distance between normalised student (projected) and teacher embeddings.

    Per sample ``||s - t||^2 = 2 - 2 cos(s, t)`` (the MSE summed over the feature dimension), averaged over the
    batch and over the two towers. 0 when the student reproduces the teacher.
    """
    t_img, t_txt, _, _ = _teacher(inputs)
    s_img = project_to_teacher(inputs, inputs.image, t_img.shape[-1], "kd_image_proj")
    s_txt = project_to_teacher(inputs, inputs.text, t_txt.shape[-1], "kd_text_proj")
    loss_i = (s_img - t_img).square().sum(dim=-1).mean()
    loss_t = (s_txt - t_txt).square().sum(dim=-1).mean()
    return {"kd_feature_loss": 0.5 * (loss_i + loss_t)}


class KdAffinityParams(LossParams):
    temperature: float = pydantic.Field(
        0.05, gt=0.0, description="temperature of both the teacher's and the student's similarity softmax"
    )


def _kl_rows(teacher_logits: Tensor, student_logits: Tensor) -> Tensor:
    """Mean over rows of KL(softmax(teacher) || softmax(student))."""
    log_t = F.log_softmax(teacher_logits, dim=1)
    log_s = F.log_softmax(student_logits, dim=1)
    return (log_t.exp() * (log_t - log_s)).sum(dim=1).mean()


@register_loss("kd_affinity", needs=("teacher",), params=KdAffinityParams)
def kd_affinity(inputs: LossInputs, temperature: float = 0.05) -> dict[str, Tensor]:
    """Affinity KD: KL(teacher's in-batch similarity distribution || student's), image->text and text->image.

    Rows local, columns the gathered batch (student ``all_text`` / ``all_image``, teacher ``all_teacher_*``, in
    the same order). Similarities are cosines in each model's own space, so no projection is needed.
    """
    t_img, t_txt, all_t_img, all_t_txt = _teacher(inputs)
    s_img, s_txt = ensure_float(inputs.image), ensure_float(inputs.text)
    all_s_img = s_img if inputs.all_image is None else ensure_float(inputs.all_image)
    all_s_txt = s_txt if inputs.all_text is None else ensure_float(inputs.all_text)
    if all_s_txt.shape[0] != all_t_txt.shape[0] or all_s_img.shape[0] != all_t_img.shape[0]:
        raise ValueError("kd_affinity: student and teacher columns differ in size; gather both the same way")
    i2t = _kl_rows(t_img @ all_t_txt.t() / temperature, s_img @ all_s_txt.t() / temperature)
    t2i = _kl_rows(t_txt @ all_t_img.t() / temperature, s_txt @ all_s_img.t() / temperature)
    return {"kd_affinity_loss": 0.5 * (i2t + t2i)}


@register_loss("kd_interactive", needs=("teacher",))
def kd_interactive(inputs: LossInputs) -> dict[str, Tensor]:
    """Interactive KD: identity-aware contrastive CE of student image vs teacher text and student text vs teacher
    image (student projected to the teacher's width when needed), with the student's logit scale. Averaged.
    """
    _, _, all_t_img, all_t_txt = _teacher(inputs)
    s_img = project_to_teacher(inputs, inputs.image, all_t_img.shape[-1], "kd_image_proj")
    s_txt = project_to_teacher(inputs, inputs.text, all_t_txt.shape[-1], "kd_text_proj")
    all_pids = inputs.pids if inputs.all_pids is None else inputs.all_pids
    if all_pids.shape[0] != all_t_txt.shape[0]:
        raise ValueError("kd_interactive: all_pids and all_teacher_* must cover the same gathered batch")
    target = identity_targets(inputs.pids, all_pids)
    scale = scale_from_logit(inputs.logit_scale)
    loss_i2t = soft_cross_entropy(scale * s_img @ all_t_txt.t(), target)
    loss_t2i = soft_cross_entropy(scale * s_txt @ all_t_img.t(), target)
    return {"kd_interactive_loss": 0.5 * (loss_i2t + loss_t2i)}


class KdHiddenParams(LossParams):
    layers: list[str] | None = pydantic.Field(
        None, description="names of the hidden states to match; default: every name both models provide"
    )
    normalize: bool = pydantic.Field(
        False, description="layer-normalise (no affine) both states over the width before the MSE"
    )


@register_loss("kd_hidden", needs=("student_hidden", "teacher_hidden"), params=KdHiddenParams)
def kd_hidden(inputs: LossInputs, layers: list[str] | None = None, normalize: bool = False) -> dict[str, Tensor]:
    """Hidden-state KD: MSE (mean over all elements) between student and teacher hidden states of the same name,
    averaged over names. A student state narrower or wider than the teacher's goes through the learned Linear
    ``modules[hidden_proj_key(name)]``. Token counts must match.
    """
    student, teacher = inputs.student_hidden or {}, inputs.teacher_hidden or {}
    names = list(layers) if layers is not None else [k for k in student if k in teacher]
    if not names:
        raise ConfigError(
            f"losses.kd_hidden: no hidden state shared by student ({sorted(student)}) and teacher ({sorted(teacher)})"
        )
    missing = [k for k in names if k not in student or k not in teacher]
    if missing:
        raise ConfigError(
            f"losses.kd_hidden.layers: {missing} not provided by both models; "
            f"student has {sorted(student)}, teacher has {sorted(teacher)}"
        )
    total: Tensor | None = None
    for name in names:
        s, t = student[name], ensure_float(teacher[name]).detach()
        if s.shape[:-1] != t.shape[:-1]:
            raise ConfigError(
                f"losses.kd_hidden: hidden state {name!r} has shape {tuple(s.shape)} in the student and "
                f"{tuple(t.shape)} in the teacher; batch and token counts must match"
            )
        if s.shape[-1] != t.shape[-1]:
            key = hidden_proj_key(name)
            if key not in inputs.modules:
                raise RuntimeError(
                    f"kd_hidden: widths differ for {name!r} ({s.shape[-1]} vs {t.shape[-1]}) and no module {key!r}; "
                    "pass hidden_widths to losses.make_modules"
                )
            s = inputs.modules[key](s)
        s = ensure_float(s)
        if normalize:
            s, t = F.layer_norm(s, s.shape[-1:]), F.layer_norm(t, t.shape[-1:])
        term = F.mse_loss(s, t)
        total = term if total is None else total + term
    assert total is not None
    return {"kd_hidden_loss": total / len(names)}
