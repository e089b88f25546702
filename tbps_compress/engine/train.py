"""The training loop shared by the teacher trainer, distillation and pruning recovery.

One optimiser step: embed the batch (all views the losses need), gather features across ranks (with gradient when
``tricks.global_gradients``), compute the weighted loss set, back-propagate. With ``optim.grad_cache_chunk`` the
batch is embedded without gradient in chunks, the loss is computed on the whole batch against cached embeddings,
and each chunk is re-embedded with gradient and back-propagated with its cached embedding gradient (random states
replayed so dropout matches): the same gradients as one big batch in the memory of one chunk.

Checkpoints (every epoch, every ``checkpoint_every_steps``, and on SIGTERM; written and read by
:mod:`tbps_compress.engine.checkpoint`) hold model, loss heads, optimiser, scaler, RNG states and the sampler
position; ``resume`` continues to the same final weights as an uninterrupted
run on CPU. The best epoch on the validation split is kept; the test split is evaluated once at the end.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import logging
import math
import os
import random
import signal
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.hooks import RemovableHandle

from .. import distributed as dist
from ..artifacts import METRICS, RECIPE, write_artifact, write_json
from ..config import dump_recipe
from ..data.loader import CaptionNeighbours, EpochBatchSampler, ImageStore, TrainSet
from ..data.records import TBPSDataset, remap_ids
from ..data.splits import Splits, build_splits
from ..devices import resolve_device
from ..errors import ConfigError, UserError
from ..losses import LossInputs, LossSet, make_modules
from ..models.config import image_size_hw
from ..models.factory import config_from_model, count_parameters, set_text_attn_dropout
from ..models.io import save_model
from ..models.meta import meta_of, set_meta
from ..models.tokenizer import model_tokenizer
from ..recipes import TrainRecipe
from ..retrieval.encoders import Split, TorchEncoder, evaluate
from .checkpoint import (
    CKPT_NAME,
    TrainState,
    check_checkpoint_fits,
    check_run_folders,
    read_checkpoint,
    recipe_hash,
    rng_state,
    set_rng_state,
    work_dir,
    write_checkpoint,
)

log = logging.getLogger(__name__)

CURVE_NAME = "curve.csv"  # learning curve (eval.curve_every_steps), copied into the artifact
__all__ = ["CKPT_NAME", "Interrupted", "LossInputProvider", "Progress", "TrainState", "Trainer", "lr_at",
           "param_groups", "train_views"]
LOSS_FIELDS = frozenset(f.name for f in dataclasses.fields(LossInputs))


class Interrupted(UserError):
    """Training stopped by SIGTERM/SIGINT after writing a checkpoint."""


class Progress:
    """Progress reporting hooks; the CLI passes a rich implementation, the default logs now and then."""

    def start(self, total: int, description: str) -> None:
        self._t0, self._total = time.time(), total

    def update(self, step: int, info: dict[str, float]) -> None:
        if step % 50 == 0:
            log.info("step %d/%d %s", step, self._total, " ".join(f"{k}={v:.4g}" for k, v in info.items()))

    def stop(self) -> None:
        pass


def param_groups(named: list[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no decay for tensors with ndim < 2 or names containing bias / ln / bn (TBPS-CLIP)."""
    decay, no_decay = [], []
    for name, p in named:
        if not p.requires_grad:
            continue
        parts = name.lower().split(".")
        if p.ndim < 2 or "bias" in name or any(part.startswith(("ln", "bn")) for part in parts):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, total: int, per_epoch: int, cfg) -> float:
    """Linear warm-up from ``warmup_start_lr`` over ``warmup_epochs``, then cosine to ``min_lr`` (per iteration)."""
    warm = int(round(cfg.warmup_epochs * per_epoch))
    if step < warm:
        return cfg.warmup_start_lr + (cfg.lr - cfg.warmup_start_lr) * step / max(1, warm)
    rest = max(1, total - warm)
    t = min(1.0, (step - warm) / rest)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * t))


def train_views(needs) -> tuple[str, ...]:
    """The image views a training sample carries for losses with these ``needs``."""
    views = ["image"]
    if "image_mvs" in needs:
        views.append("image_mvs")
    if "ssl_a" in needs or "ssl_b" in needs:
        views.append("ssl_a")
    return tuple(views)


class LossInputProvider:
    """The trainer's extension point: something that adds fields to the loss inputs of every step.

    A provider is set up once the trainer's device, data, losses and model are ready, may contribute keyword
    arguments for the loss heads (:func:`tbps_compress.losses.make_modules`), gives per batch fields of
    :class:`~tbps_compress.losses.LossInputs` computed before the student's forward pass, and may hook that pass
    (with gradient) to fill more fields. Every method has a do-nothing default; the trainer calls them in this
    order: :meth:`setup`, :meth:`loss_module_args`, then per step :meth:`batch_inputs` and :meth:`hook_student`.
    """

    #: What :meth:`hook_student` captures, for messages (``None``: it registers no hooks). Gradient caching
    #: (``optim.grad_cache_chunk``) re-runs the forward pass in chunks and refuses providers that capture.
    student_capture: str | None = None

    def setup(self, trainer: Trainer) -> None:
        """Called by :meth:`Trainer.prepare` after the model is on its device and before the loss heads are built.
        Runs with the random state saved and restored, so a provider never shifts the training's random draws."""

    def loss_module_args(self) -> dict[str, Any]:
        """Keyword arguments for :func:`tbps_compress.losses.make_modules` (after :meth:`setup`)."""
        return {}

    def batch_inputs(self, batch: dict[str, torch.Tensor], epoch: int) -> dict[str, Any]:
        """Fields of :class:`~tbps_compress.losses.LossInputs` for one local batch (on the device) of ``epoch``,
        computed before the student's forward pass."""
        return {}

    def hook_student(self, model: nn.Module, fields: dict[str, Any]) -> list[RemovableHandle]:
        """Forward hooks on the student for its forward pass with gradient; they write loss-input fields into
        ``fields``. The trainer removes them after the pass."""
        return []


class Trainer:
    """Trains ``model`` (or the recipe's model) on the recipe's data and writes an artifact folder.

    ``model`` is a module, a function building it from the prepared trainer (called once the data is loaded, with
    the random state saved and restored), or ``None`` for the recipe's ``model`` section. ``providers`` add fields
    to the loss inputs of every step (:class:`LossInputProvider`)."""

    def __init__(
        self,
        recipe: TrainRecipe,
        *,
        model: nn.Module | Callable[[Trainer], nn.Module] | None = None,
        providers: Sequence[LossInputProvider] = (),
        stage: str = "train",
        parent: Path | None = None,
        progress: Progress | None = None,
        extra_files: Callable[[Path], dict[str, Any]] | None = None,
        dataset: TBPSDataset | Splits | None = None,
    ) -> None:
        self.recipe = recipe
        self.stage = stage
        self.parent = parent
        self.providers = list(providers)
        self.progress = progress or Progress()
        self.extra_files = extra_files
        self._model_in = model
        self._dataset_in = dataset
        self._stop_signal: int | None = None

    # ----------------------------------------------------------------------------------------------- setup
    def _load_data(self) -> None:
        from ..runtime.tokenizer import clean_caption

        r = self.recipe
        self.splits = build_splits(r, self._dataset_in)
        ds = self.dataset = self.splits.dataset
        self.clean = clean_caption
        train = self.train_records = self.splits.train
        self.val_records = self.splits.val
        self.test_records = self.splits.test
        self.labels = remap_ids(train)
        has_bt = any(rec.captions_bt for rec in train)
        if r.augment.text.back_translation_p > 0 and not has_bt:
            log.info("back-translation augmentation is off: %s has no captions_bt", ds.annotation)

    def _build_model(self) -> nn.Module:
        from ..models.factory import build_model
        from ..models.io import import_checkpoint, load_model

        r = self.recipe
        if isinstance(self._model_in, nn.Module):
            return self._model_in
        if self._model_in is not None:
            with self._rng_kept():
                return self._model_in(self)
        if r.model.init_artifact:
            return load_model(Path(r.model.init_artifact))
        from ..models.config import get_model_config

        cfg = get_model_config(r.model.config)
        if r.model.checkpoint:
            return import_checkpoint(Path(r.model.checkpoint), cfg)
        torch.manual_seed(r.seed)
        return build_model(cfg)

    def _views(self) -> tuple[str, ...]:
        return train_views(self.losses.needs)

    @property
    def views(self) -> tuple[str, ...]:
        """The image views of a training sample (see :func:`train_views`)."""
        return self._views()

    @contextlib.contextmanager
    def _rng_kept(self):
        """Run a block (a model factory, a provider's set-up) without moving the training's random streams."""
        saved = rng_state(self.device)
        try:
            yield
        finally:
            set_rng_state(saved, self.device)

    # ----------------------------------------------------------------------------------------------- run
    def run(self, *, resume: bool = False, force: bool = False) -> Path:
        r = self.recipe
        out = Path(r.output)
        work = work_dir(out)
        started_dist = dist.setup_from_env()
        deterministic = (torch.are_deterministic_algorithms_enabled(),
                         torch.is_deterministic_algorithms_warn_only_enabled())
        try:
            if r.optim.batch_size < dist.world_size():
                raise ConfigError(
                    f"optim.batch_size: {r.optim.batch_size} is smaller than the number of processes "
                    f"({dist.world_size()}); use at least one sample per process"
                )
            check_run_folders(out, work, resume=resume, force=force)
            return self._run(out, work, resume, force)
        finally:
            torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])  # as the caller had it
            if started_dist:
                dist.cleanup()

    def prepare(self) -> None:
        """Set up everything the training loop needs, touching no files: device, seeds, losses, data, model, steps,
        precision, the loss-input providers, loss heads, tokenizer, ``trainset`` / ``sampler`` / ``loader``,
        optimiser and the validation images. :meth:`run` calls it; tools and tests call it to drive :meth:`step`
        directly."""
        r = self.recipe
        self.device = device = resolve_device(r.device)
        if device.type == "cuda":
            torch.cuda.set_device(device if device.index is not None else dist.local_rank())
        torch.manual_seed(r.seed)
        random.seed(r.seed)
        if device.type == "cpu":  # bit-identical resumes; run() restores the caller's setting when it returns
            torch.use_deterministic_algorithms(True, warn_only=True)
        self.losses = LossSet({k: (dict(v) if v else {}) for k, v in r.losses.items()})
        self._load_data()
        model = self._build_model()
        cfg = config_from_model(model) if meta_of(model).config is None else meta_of(model).config
        set_meta(model, config=cfg)
        if r.model is not None and r.model.vocab_prune and not meta_of(model).vocab_map:
            from ..models.tokenizer import get_tokenizer
            from ..models.vocab import prune_vocabulary, vocabulary_captions

            texts = vocabulary_captions(self.train_records, r.augment, self.clean)
            prune_vocabulary(model, texts, get_tokenizer(cfg))
            cfg = meta_of(model).config
        self.model = model.to(device)
        set_text_attn_dropout(model, r.tricks.text_attn_dropout)
        model.visual.conv1.weight.requires_grad_(not r.tricks.freeze_patch_embed)
        if r.tricks.temperature is not None:  # a resumed run's checkpoint restores the trained value afterwards
            with torch.no_grad():
                model.logit_scale.fill_(math.log(1.0 / r.tricks.temperature))
        model.logit_scale.requires_grad_(r.tricks.learn_temperature)
        rank, world = dist.rank(), dist.world_size()
        b = r.optim.batch_size
        per_epoch = self.per_epoch = self.splits.steps_per_epoch(b, world)
        total = per_epoch * r.optim.epochs
        if r.optim.max_steps:
            total = min(total, r.optim.max_steps)
        self.total_steps = total
        self.amp_dtype = self._amp_dtype()
        module_args: dict[str, Any] = {}
        for provider in self.providers:
            with self._rng_kept():
                provider.setup(self)
            module_args.update(provider.loss_module_args())
        embed_dim = int(model.visual.proj.shape[1])
        self.heads = make_modules(self.losses, embed_dim, len(self.labels), **module_args).to(device)
        self.tokenizer = model_tokenizer(model)
        size = image_size_hw(cfg)
        ds = self.dataset
        train_imgs = ImageStore([ds.image_path(x) for x in self.train_records], size, cache=r.data.cache_images)
        self.trainset = TrainSet(self.train_records, train_imgs, self.labels, self.tokenizer, r.augment,
                                 views=self._views(), seed=r.seed, clean=self.clean)
        neighbours = None
        if r.data.hard_batches > 0:
            pairs = self.trainset.pairs
            neighbours = CaptionNeighbours([self.train_records[ri].captions[ci] for ri, ci in pairs],
                                           [self.labels[self.train_records[ri].pid] for ri, _ in pairs])
        sampler = EpochBatchSampler(len(self.trainset), b, r.seed, rank, world, neighbours=neighbours,
                                    hard_fraction=r.data.hard_batches, group=r.data.hard_batch_group)
        loader = DataLoader(self.trainset, batch_sampler=sampler, num_workers=r.data.num_workers,
                            persistent_workers=False)
        named = list(model.named_parameters()) + [(f"heads.{n}", p) for n, p in self.heads.named_parameters()]
        self.optimizer = torch.optim.AdamW(param_groups(named, r.optim.weight_decay), lr=r.optim.lr,
                                           betas=r.optim.betas, eps=r.optim.eps)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.val_store = ImageStore([ds.image_path(x) for x in self.val_records], size, cache=r.data.cache_images)
        self.sampler, self.loader = sampler, loader

    def _run(self, out: Path, work: Path, resume: bool, force: bool) -> Path:
        self.prepare()
        r, model, sampler, loader = self.recipe, self.model, self.sampler, self.loader
        total, per_epoch = self.total_steps, self.per_epoch
        b, world = r.optim.batch_size, dist.world_size()
        state = TrainState()
        best_state: dict[str, torch.Tensor] | None = None
        try:
            work.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"{work}: cannot create the checkpoint folder ({exc.strerror or exc}); choose another "
                            "output") from exc
        log_path = work / "train_log.csv"
        if resume:
            state, best_state = self._load_checkpoint(work / CKPT_NAME)
        else:
            for stale in (log_path, work / CURVE_NAME):
                stale.unlink(missing_ok=True)
        self._trim_log(log_path, state.global_step)
        self._trim_log(work / CURVE_NAME, state.global_step)
        logger = _CsvLog(log_path)
        tb = _tensorboard(work) if dist.is_main() else None
        old_handlers = self._install_signal_handlers()
        self.progress.start(total, f"{self.stage} {out.name}")
        t_start = time.time() - state.elapsed_s
        stop = False
        try:
            while state.epoch < r.optim.epochs and not stop:
                self.trainset.epoch = state.epoch
                sampler.set_epoch(state.epoch, state.step_in_epoch)
                model.train()
                t_last = time.time()
                for batch in loader:
                    lr = lr_at(state.global_step, total, per_epoch, r.optim)
                    for g in self.optimizer.param_groups:
                        g["lr"] = lr
                    progress = state.epoch + state.step_in_epoch / per_epoch
                    terms = self.step(batch, progress)
                    state.step_in_epoch += 1
                    state.global_step += 1
                    now = time.time()
                    info = {"loss": terms.pop("loss"), **terms, "lr": lr,
                            "temperature": 1.0 / float(model.logit_scale.detach().exp().clamp(max=100)),
                            "samples_per_s": b * world / max(1e-9, now - t_last)}
                    t_last = now
                    if dist.is_main():
                        logger.write({"step": state.global_step, "epoch": progress, **info})
                        if tb is not None:
                            for k, v in info.items():
                                tb.add_scalar(k, v, state.global_step)
                    self.progress.update(state.global_step, info)
                    state.elapsed_s = time.time() - t_start
                    every = r.eval.curve_every_steps
                    if every and (state.global_step % every == 0 or state.global_step == total):
                        t_eval = time.time()
                        self._curve_point(work, state)
                        t_start += time.time() - t_eval  # the curve's evaluations are not training time
                        t_last = time.time()
                        model.train()
                    budget_hit = (r.optim.max_steps and state.global_step >= r.optim.max_steps) or (
                        r.optim.time_budget_s and state.elapsed_s >= r.optim.time_budget_s)
                    if budget_hit:
                        stop = True
                        break
                    if self._stop_signal is not None:
                        self._save_checkpoint(work / CKPT_NAME, state, best_state)
                        raise Interrupted(
                            f"stopped by signal {self._stop_signal}; checkpoint saved in {work}; "
                            "continue with --resume"
                        )
                    if r.checkpoint_every_steps and state.global_step % r.checkpoint_every_steps == 0:
                        self._save_checkpoint(work / CKPT_NAME, state, best_state)
                epoch_done = state.step_in_epoch >= per_epoch
                if epoch_done or stop:
                    if epoch_done:
                        state.epoch += 1
                        state.step_in_epoch = 0
                    if stop or state.epoch % r.eval.every_epochs == 0 or state.epoch >= r.optim.epochs:
                        val = self._evaluate(self.val_records, self.val_store)
                        log.info("epoch %d val %s", state.epoch, _fmt(val))
                        if not state.best or val["R1"] > state.best["R1"]:
                            state.best = {**val, "epoch": state.epoch, "step": state.global_step}
                            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
                    self._save_checkpoint(work / CKPT_NAME, state, best_state)
        finally:
            self.progress.stop()
            self._restore_signal_handlers(old_handlers)
            logger.close()
            if tb is not None:
                tb.close()
        if best_state is not None:
            model.load_state_dict(best_state)
        test = self._evaluate(self.test_records, None)
        log.info("test %s", _fmt(test))
        result = out
        if dist.is_main():
            result = self._write_artifact(out, work, state, test, force)
        dist.barrier()
        return result

    def _curve_point(self, work: Path, state: TrainState) -> None:
        """One learning-curve row: metrics on ``eval.curve_split`` after ``state.global_step`` steps."""
        split = self.recipe.eval.curve_split
        if not dist.is_main():
            return
        if not hasattr(self, "_curve_records"):
            self._curve_records = self.dataset.split(split)
            self._curve_store = ImageStore([self.dataset.image_path(x) for x in self._curve_records],
                                           image_size_hw(meta_of(self.model).config), cache=True)
        m = self._evaluate(self._curve_records, self._curve_store)
        path = work / CURVE_NAME
        new = not path.exists()
        with open(path, "a", encoding="utf-8", newline="") as f:
            w = csv.writer(f)
            if new:
                w.writerow(["step", "epoch", "train_seconds", "split", "R1", "R5", "R10", "mAP", "mINP"])
            w.writerow([state.global_step, round(state.epoch + state.step_in_epoch / self.per_epoch, 4),
                        round(state.elapsed_s, 1), split, *(round(m.get(k, float("nan")), 2)
                                                            for k in ("R1", "R5", "R10", "mAP", "mINP"))])
        log.info("curve: step %d (%.0f s of training) %s %s", state.global_step, state.elapsed_s, split, _fmt(m))

    # ----------------------------------------------------------------------------------------------- step
    def _amp_dtype(self) -> torch.dtype | None:
        p = self.recipe.optim.precision
        if self.device.type != "cuda" or p == "fp32":
            return None
        if p == "fp16":
            return torch.float16
        return torch.bfloat16

    def autocast(self) -> contextlib.AbstractContextManager:
        """The mixed-precision context of the recipe's ``optim.precision`` (nothing on CPU or with fp32)."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=self.amp_dtype)

    def _embed(self, batch: dict[str, torch.Tensor],
               capture: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
        """The student's embeddings of the batch's views; with ``capture``, the providers' student hooks are on
        during the pass and write their loss-input fields into it."""
        m = self.model
        hooks = [h for p in self.providers for h in p.hook_student(m, capture)] if capture is not None else []
        try:
            with self.autocast():
                out = {"image": F.normalize(m.encode_image(batch["image"]).float(), dim=-1),
                       "text": F.normalize(m.encode_text(batch["text"]).float(), dim=-1)}
                if "image_mvs" in batch:
                    out["image_mvs"] = F.normalize(m.encode_image(batch["image_mvs"]).float(), dim=-1)
                if "ssl_a" in batch:
                    out["ssl_a"] = m.encode_image(batch["ssl_a"]).float()
                    out["ssl_b"] = m.encode_image(batch["ssl_b"]).float()
        finally:
            for h in hooks:
                h.remove()
        return out

    def _loss(self, emb: dict[str, torch.Tensor], pids: torch.Tensor, fields: dict[str, Any],
              progress: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The weighted losses of the student's embeddings ``emb`` plus the providers' loss-input ``fields``."""
        glob = self.recipe.tricks.global_gradients

        def gather(x: torch.Tensor) -> torch.Tensor:
            if dist.world_size() == 1:
                return x
            if glob:
                return dist.all_gather_with_grad(x)
            full = dist.all_gather_nograd(x.detach())
            b = x.shape[0]
            r = dist.rank()
            return torch.cat([full[:r * b], x, full[(r + 1) * b:]])

        inputs = LossInputs(
            image=emb["image"], text=emb["text"], pids=pids, logit_scale=self.model.logit_scale,
            all_image=gather(emb["image"]), all_text=gather(emb["text"]),
            all_pids=dist.all_gather_nograd(pids) if dist.world_size() > 1 else pids,
            progress=progress, modules=dict(self.heads.items()),
        )
        if "image_mvs" in emb:
            inputs.image_mvs = emb["image_mvs"]
            inputs.all_image_mvs = gather(emb["image_mvs"])
        if "ssl_a" in emb:
            inputs.ssl_a, inputs.ssl_b = emb["ssl_a"], emb["ssl_b"]
        for name, value in fields.items():
            if name not in LOSS_FIELDS:
                raise TypeError(f"a loss input provider gave {name!r}, which is not a field of LossInputs")
            setattr(inputs, name, value)
        return self.losses(inputs)

    def step(self, batch: dict[str, torch.Tensor], progress: float) -> dict[str, float]:
        """One optimiser step on a local batch; returns the logged loss terms."""
        dev = self.device
        batch = {k: v.to(dev, non_blocking=True) for k, v in batch.items()}
        pids = batch["pid"]
        fields: dict[str, Any] = {}
        for provider in self.providers:
            fields.update(provider.batch_inputs(batch, self.trainset.epoch))
        chunk = self.recipe.optim.grad_cache_chunk
        self.optimizer.zero_grad(set_to_none=True)
        n = pids.shape[0]
        if chunk is None or chunk >= n:
            emb = self._embed(batch, capture=fields)
            loss, terms = self._loss(emb, pids, fields, progress)
            self.scaler.scale(loss).backward()
        else:
            for provider in self.providers:
                if provider.student_capture:
                    raise ConfigError(f"optim.grad_cache_chunk cannot be combined with {provider.student_capture}")
            loss, terms = self._cached_backward(batch, pids, fields, progress, chunk)
        self._reduce_grads()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, math.log(100))
        out = {k: float(v) for k, v in terms.items()}
        out["loss"] = float(loss.detach())
        return out

    def _cached_backward(self, batch, pids, fields, progress, chunk):
        keys = [k for k in ("image", "text", "image_mvs", "ssl_a", "ssl_b") if k in batch]
        n = pids.shape[0]
        slices = [slice(s, min(n, s + chunk)) for s in range(0, n, chunk)]
        states, parts = [], []
        with torch.no_grad():
            for sl in slices:
                states.append(rng_state(self.device))
                parts.append(self._embed({k: batch[k][sl] for k in keys}))
        cached = {k: torch.cat([p[k] for p in parts]).detach().requires_grad_(True) for k in parts[0]}
        loss, terms = self._loss(cached, pids, fields, progress)
        self.scaler.scale(loss).backward()
        end_state = rng_state(self.device)
        for sl, st in zip(slices, states, strict=True):
            set_rng_state(st, self.device)
            emb = self._embed({k: batch[k][sl] for k in keys})
            surrogate = sum((emb[k] * cached[k].grad[sl]).sum() for k in emb)
            surrogate.backward()
        set_rng_state(end_state, self.device)
        return loss, terms

    def _reduce_grads(self) -> None:
        if dist.world_size() == 1:
            return
        world = dist.world_size()
        params = [p for p in list(self.model.parameters()) + list(self.heads.parameters()) if p.requires_grad]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            torch.distributed.all_reduce(p.grad)
            p.grad.div_(world)

    # ----------------------------------------------------------------------------------------------- eval / io
    def _evaluate(self, records, store) -> dict[str, float]:
        if not records:
            return {}
        ds = self.dataset
        encoder = TorchEncoder(self.model, tokenizer=self.tokenizer, clean=self.clean, device=self.device,
                               batch_size=self.recipe.eval.batch_size)
        return evaluate(encoder, Split.of(ds, records, images=store))

    def _checkpoint_payload(self, state: TrainState, best_state) -> dict[str, Any]:
        return {
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "heads": {k: v.detach().cpu() for k, v in self.heads.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "state": state.as_dict(),
            "rng": rng_state(self.device),
            "best_state": best_state,
            "model_config": json.dumps(meta_of(self.model).config, sort_keys=True),
            "recipe_hash": recipe_hash(self.recipe),
        }

    def _save_checkpoint(self, path: Path, state: TrainState, best_state) -> None:
        """Write the training checkpoint (main process only; see :func:`checkpoint.write_checkpoint`)."""
        if dist.is_main():
            write_checkpoint(path, self._checkpoint_payload(state, best_state))

    def _load_checkpoint(self, path: Path) -> tuple[TrainState, dict | None]:
        """Restore model, heads, optimiser, scaler and random state from ``path``; the loop position and the best
        weights so far."""
        ck = read_checkpoint(path)
        check_checkpoint_fits(ck, path, model_config=json.dumps(meta_of(self.model).config, sort_keys=True),
                              recipe_digest=recipe_hash(self.recipe),
                              model_name=getattr(self.recipe.model, "config", f"of this {self.stage} recipe"))
        self.model.load_state_dict(ck["model"])
        self.heads.load_state_dict(ck["heads"])
        self.optimizer.load_state_dict(ck["optimizer"])
        self.scaler.load_state_dict(ck["scaler"])
        set_rng_state(ck["rng"], self.device)
        state = TrainState.from_dict(ck["state"])
        log.info("resumed from %s at epoch %d step %d", path, state.epoch, state.global_step)
        return state, ck.get("best_state")

    @staticmethod
    def _trim_log(path: Path, step: int) -> None:
        if not path.exists():
            return
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
        if not rows:
            return
        keep = [rows[0]] + [row for row in rows[1:] if row and int(row[0]) <= step]
        with open(path, "w", newline="") as f:
            csv.writer(f).writerows(keep)

    def _write_artifact(self, out: Path, work: Path, state: TrainState, test: dict, force: bool) -> Path:
        r = self.recipe
        params = count_parameters(self.model)
        with write_artifact(out, stage=self.stage, parent=self.parent, force=force) as tmp:
            save_model(self.model, tmp)
            dump_recipe(r, tmp / RECIPE)
            metrics = {"test": test, "val_best": state.best, "split": r.eval.test_split,
                       "dataset": str(Path(r.data.root)), "parameters": params,
                       "steps": state.global_step, "train_seconds": round(state.elapsed_s, 1)}
            if self.extra_files is not None:
                metrics.update(self.extra_files(tmp) or {})
            write_json(tmp / METRICS, metrics)
            if (work / "train_log.csv").exists():
                (tmp / "train_log.csv").write_bytes((work / "train_log.csv").read_bytes())
            if (work / CURVE_NAME).exists():
                (tmp / CURVE_NAME).write_bytes((work / CURVE_NAME).read_bytes())
        for f in work.glob("*"):
            if f.is_file():
                f.unlink()
        with contextlib.suppress(OSError):
            work.rmdir()
        return out

    def _install_signal_handlers(self):
        def handler(signum, _frame):
            self._stop_signal = signum

        old = {}
        try:
            for sig in (signal.SIGTERM, signal.SIGINT):
                old[sig] = signal.signal(sig, handler)
        except ValueError:  # not in the main thread
            return {}
        return old

    @staticmethod
    def _restore_signal_handlers(old) -> None:
        for sig, h in old.items():
            signal.signal(sig, h)


class _CsvLog:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._f = None
        self._fields: list[str] | None = None
        if path.exists() and path.stat().st_size:
            with open(path, newline="") as f:
                self._fields = next(csv.reader(f), None)

    def write(self, row: dict[str, Any]) -> None:
        """Append one row; a write that fails (a full disk) is cut back so the file never ends in half a row."""
        if self._f is None:
            self._f = open(self.path, "ab", buffering=0)  # noqa: SIM115 - kept open across steps
        fields = self._fields if self._fields is not None else list(row)
        lines = io.StringIO()
        if self._fields is None:
            csv.writer(lines).writerow(fields)
        csv.writer(lines).writerow([_cell(row.get(k)) for k in fields])
        data = lines.getvalue().encode("utf-8")
        start = self._f.seek(0, os.SEEK_END)
        try:
            view = memoryview(data)
            while view:
                view = view[self._f.write(view):]
        except OSError:
            with contextlib.suppress(OSError):
                self._f.truncate(start)
            raise
        self._fields = fields

    def close(self) -> None:
        if self._f is not None:
            self._f.close()


def _cell(v: Any) -> str:
    return f"{v:.6g}" if isinstance(v, float) else ("" if v is None else str(v))


def _tensorboard(work: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(work / "tb"))


def _fmt(m: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.2f}" for k, v in m.items())


