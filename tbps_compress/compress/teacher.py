"""The frozen teacher of distillation and pruning recovery, as a loss-input provider of the shared trainer.

:class:`Teacher` owns everything the training loop needs from a teacher: the model (loaded from its artifact on
first use when only the path is given), the adapter from the student's inputs to the teacher's
(:func:`teacher_adapter`: vocabulary maps, context length, image size), an optional cache of its embeddings, and the
hooks that capture the last hidden state of each tower, of the teacher and of the student, for ``kd_hidden``.

It plugs into :class:`tbps_compress.engine.train.Trainer` through the trainer's one extension point,
:class:`~tbps_compress.engine.train.LossInputProvider`: per batch it returns typed fields of
:class:`tbps_compress.losses.LossInputs` (``teacher_image``, ``teacher_text``, their gathered copies
``all_teacher_*`` across processes, ``teacher_hidden``) and, on the student's forward pass, hooks that fill
``student_hidden``. It also tells the trainer how wide the teacher is, for the KD projection heads
(``teacher_dim``, ``hidden_widths`` of :func:`tbps_compress.losses.make_modules`). The trainer itself knows
nothing about teachers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import distributed as dist
from ..engine.train import LossInputProvider
from ..errors import UserError
from ..models.factory import EOT_TOKEN, context_length, tower_blocks
from ..models.meta import meta_of

if TYPE_CHECKING:
    from torch.utils.hooks import RemovableHandle

    from ..engine.train import Trainer

Adapter = Callable[[dict[str, Tensor]], dict[str, Tensor]]
HIDDEN_STATES = ("vision.last", "text.last")  # the hidden states captured for kd_hidden: each tower's last block


def load_teacher(path: Path) -> tuple[nn.Module, str]:
    """A teacher artifact's model (every file verified against its lineage), frozen, and its content hash."""
    from ..artifacts import open_artifact
    from ..models.io import load_model

    art = open_artifact(path)  # verifies every file against lineage.json
    if art.kind != "torch":
        raise UserError(f"teacher.artifact {path}: an ONNX artifact; distillation needs a PyTorch artifact")
    teacher = load_model(art, verify=False)
    teacher.eval().requires_grad_(False)
    return teacher, str(art.lineage.get("content_hash", ""))


def teacher_adapter(student: nn.Module, teacher: nn.Module) -> Adapter | None:
    """A function mapping the student's inputs {"image", "text"} to the teacher's: token ids through both
    vocabulary maps, padding/truncation to the teacher's context length, images resized to its input size.
    ``None`` when the two take the same inputs."""
    from ..models.config import image_size_hw

    s_vm = meta_of(student).vocab_map or None
    t_vm = meta_of(teacher).vocab_map or None
    t_unk = meta_of(teacher).unk_id
    s_ctx, t_ctx = context_length(student), context_length(teacher)
    s_hw, t_hw = image_size_hw(meta_of(student).config), image_size_hw(meta_of(teacher).config)
    lut: Tensor | None = None
    if s_vm or t_vm:
        n_s = int(student.token_embedding.num_embeddings)
        orig = torch.arange(n_s) if s_vm is None else torch.full((n_s,), -1, dtype=torch.long)
        if s_vm is not None:
            for o, n in s_vm.items():
                orig[n] = o
        if t_vm is not None:
            t_lut = torch.full((max(max(t_vm), EOT_TOKEN) + 1,), -1 if t_unk is None else t_unk, dtype=torch.long)
            for o, n in t_vm.items():
                t_lut[o] = n
            lut = torch.where(orig >= 0, t_lut[orig.clamp_min(0)], torch.full_like(orig, -1))
        else:
            lut = orig
        # ids with no teacher counterpart (the student's unk): the teacher's unk, else padding
        lut = torch.where(lut >= 0, lut, torch.full_like(lut, t_unk if t_unk is not None else 0))
        lut[0] = 0
    t_eot = t_vm[EOT_TOKEN] if t_vm else EOT_TOKEN
    if lut is None and s_ctx == t_ctx and s_hw == t_hw:
        return None

    def adapt(inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        text, image = inputs["text"], inputs["image"]
        if lut is not None:
            text = lut.to(text.device)[text]
        if t_ctx > s_ctx:
            text = F.pad(text, (0, t_ctx - s_ctx))
        elif t_ctx < s_ctx:
            lost = (text[:, :t_ctx] == t_eot).sum(dim=1) == 0
            text = text[:, :t_ctx].clone()
            text[lost, -1] = t_eot
        if s_hw != t_hw:
            image = F.interpolate(image, size=t_hw, mode="bilinear", align_corners=False)
        return {"image": image, "text": text}

    return adapt


def hidden_state_hooks(model: nn.Module, into: dict[str, Tensor]) -> list[RemovableHandle]:
    """Forward hooks on the last block of each tower that store its output (as float32) in ``into`` under
    ``"vision.last"`` / ``"text.last"``; the caller removes them."""
    hooks = []
    for tower, name in zip(("vision", "text"), HIDDEN_STATES, strict=True):
        def hook(_m, _i, o, name=name):
            into[name] = o.float()

        hooks.append(tower_blocks(model, tower)[-1].register_forward_hook(hook))
    return hooks


def hidden_widths(model: nn.Module) -> dict[str, int]:
    """The width of each captured hidden state of ``model``."""
    return {"vision.last": int(model.visual.conv1.out_channels), "text.last": int(model.token_embedding.embedding_dim)}


class Teacher(LossInputProvider):
    """A frozen teacher giving the student's loss inputs its embeddings (and hidden states) of every batch.

    ``model``: the teacher, or ``None`` to load ``artifact`` (hash-verified) on first use of :attr:`model`.
    ``cache``: ``None`` (computed online), ``{"text": (N, D)}`` per caption sample, or an object with
    ``lookup(epoch, index) -> {"text"?, "image"?}`` (:class:`tbps_compress.compress.distill.TeacherCache`); what
    it lacks is computed online. ``hidden``: capture the last hidden state of each tower, of the teacher and of the
    student (``kd_hidden``; computes the teacher online, cache or not). ``adapt``: maps the student's inputs to the
    teacher's; ``"auto"`` derives it from the trainer's student at :meth:`setup` (:func:`teacher_adapter`).
    """

    def __init__(self, model: nn.Module | None = None, *, artifact: Path | str | None = None, cache: Any = None,
                 hidden: bool = False, adapt: Adapter | str | None = "auto") -> None:
        if model is None and artifact is None:
            raise ValueError("Teacher needs a model or an artifact to load it from")
        self._model = model
        self.artifact = Path(artifact) if artifact is not None else None
        self.content_hash: str | None = None
        self.cache = cache
        self.hidden = hidden
        self._adapt_spec = adapt
        self.adapt: Adapter | None = None if adapt == "auto" else adapt  # type: ignore[assignment]
        self.device = torch.device("cpu")
        self._autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
        self._module_args: dict[str, Any] = {}

    @property
    def model(self) -> nn.Module:
        """The teacher model (loaded from :attr:`artifact` on first use)."""
        if self._model is None:
            assert self.artifact is not None
            self._model, self.content_hash = load_teacher(self.artifact)
        return self._model

    @property
    def embed_dim(self) -> int:
        return int(self.model.visual.proj.shape[1])

    @property
    def student_capture(self) -> str | None:  # type: ignore[override]
        return "the kd_hidden loss" if self.hidden else None

    # ------------------------------------------------------------------------------------------- provider
    def setup(self, trainer: Trainer) -> None:
        """Move the frozen teacher to the trainer's device, take its precision, adapt to its student and size the
        KD heads (``kd_hidden`` projections only when the recipe has that loss)."""
        student = trainer.model
        self.device = trainer.device
        self._autocast = trainer.autocast
        self.model.to(self.device).eval().requires_grad_(False)
        if self._adapt_spec == "auto":
            self.adapt = teacher_adapter(student, self.model)
        widths = None
        if "kd_hidden" in trainer.losses:
            s, t = hidden_widths(student), hidden_widths(self.model)
            widths = {k: (s[k], t[k]) for k in s}
        self._module_args = {"teacher_dim": self.embed_dim, "hidden_widths": widths}

    def loss_module_args(self) -> dict[str, Any]:
        return dict(self._module_args)

    def batch_inputs(self, batch: dict[str, Tensor], epoch: int) -> dict[str, Any]:
        """The teacher's fields of the loss inputs for ``batch`` (sample views of ``epoch``): ``teacher_image``,
        ``teacher_text`` (L2-normalised), ``teacher_hidden`` when capturing, ``all_teacher_*`` across processes."""
        out = self.outputs(batch, epoch)
        if dist.world_size() > 1:
            out["all_teacher_image"] = dist.all_gather_nograd(out["teacher_image"])
            out["all_teacher_text"] = dist.all_gather_nograd(out["teacher_text"])
        return out

    def hook_student(self, model: nn.Module, fields: dict[str, Any]) -> list[RemovableHandle]:
        if not self.hidden:
            return []
        captured: dict[str, Tensor] = {}
        fields["student_hidden"] = captured
        return hidden_state_hooks(model, captured)

    # ------------------------------------------------------------------------------------------- outputs
    @torch.no_grad()
    def outputs(self, batch: dict[str, Tensor], epoch: int) -> dict[str, Any]:
        """The teacher's embeddings of ``batch`` (cached ones where the cache has them) and, when capturing, its
        hidden states; keys are :class:`~tbps_compress.losses.LossInputs` fields."""
        model = self.model
        out: dict[str, Any] = {}
        if self.cache is not None and "index" in batch:
            idx = batch["index"].cpu()
            if hasattr(self.cache, "lookup"):
                hit = self.cache.lookup(epoch, idx)
            else:
                hit = {"text": self.cache["text"][idx]}
            for k, v in hit.items():
                out[f"teacher_{k}"] = v.to(self.device).float()
        if "teacher_image" in out and "teacher_text" in out and not self.hidden:
            return out
        inputs = {"image": batch["image"], "text": batch.get("teacher_text_tokens", batch["text"])}
        if self.adapt is not None:
            inputs = self.adapt(inputs)
        captured: dict[str, Tensor] = {}
        hooks = hidden_state_hooks(model, captured) if self.hidden else []
        try:
            with self._autocast():
                if "teacher_image" not in out or self.hidden:
                    out["teacher_image"] = F.normalize(model.encode_image(inputs["image"]).float(), dim=-1)
                if "teacher_text" not in out or self.hidden:
                    out["teacher_text"] = F.normalize(model.encode_text(inputs["text"]).float(), dim=-1)
        finally:
            for h in hooks:
                h.remove()
        if self.hidden:
            out["teacher_hidden"] = captured
        return out
