"""Pydantic models of the stage recipes. Every field is documented; unknown keys are errors.

A train recipe drives the teacher trainer; a distill recipe is a train recipe plus ``teacher`` and ``student``
sections (the same loop with a frozen teacher); the prune recipe adds ``prune``. See ``recipes/`` for examples.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from .config import Strict

IMAGE_OPS = ("color_jitter", "rotation", "resized_crop", "grayscale", "hflip", "erasing")


class DataCfg(Strict):
    root: str = Field("data/synthpedes", description="Dataset root folder (holding the annotation file).")
    format: str | None = Field(None, description="cuhk-pedes | icfg-pedes | rstpreid | tbps-clip; None = detect.")
    train_fraction: float = Field(1.0, gt=0, le=1, description="Fraction of training identities used.")
    val_fraction: float = Field(0.1, gt=0, lt=1, description="Identities carved from train when there is no val.")
    cache_images: bool = Field(True, description="Decode and resize training images once, keep them in memory.")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes (0 = main process).")
    on_error: Literal["raise", "skip"] = Field("raise", description="Bad annotation entries: fail or skip+count.")
    hard_batches: float = Field(0.0, ge=0, le=1, description="Share of training batches built from groups of "
                                                           "people described alike (TF-IDF nearest captions of "
                                                           "other identities: hard negatives); the rest uniform.")
    hard_batch_group: int = Field(8, ge=2, description="Samples per group in a hard batch (a seed and its nearest).")


class ColorJitterCfg(Strict):
    brightness: float = Field(0.1, ge=0)
    contrast: float = Field(0.1, ge=0)
    saturation: float = Field(0.1, ge=0)
    hue: float = Field(0.0, ge=0, le=0.5)


class ErasingCfg(Strict):
    p: float = Field(0.5, ge=0, le=1)
    scale: tuple[float, float] = (0.10, 0.20)
    value: float = 0.0


class ImageAugCfg(Strict):
    pool: list[str] = Field(default_factory=lambda: list(IMAGE_OPS), description=f"Operations from {IMAGE_OPS}.")
    num_ops: int = Field(2, ge=0, description="Operations drawn per sample, with replacement.")
    color_jitter: ColorJitterCfg = Field(default_factory=ColorJitterCfg)
    rotation_degrees: float = Field(15.0, ge=0, le=180)
    crop_scale: tuple[float, float] = (0.9, 1.0)
    grayscale_p: float = Field(0.1, ge=0, le=1)
    hflip_p: float = Field(0.5, ge=0, le=1)
    hflip_swaps_left_right: bool = Field(False, description="A mirrored main view swaps the words 'left' and "
                                                            "'right' in its caption (captions that say which hand "
                                                            "holds what stay true).")
    erasing: ErasingCfg = Field(default_factory=ErasingCfg)
    ssl_crop_scale: tuple[float, float] = Field((0.2, 1.0), description="SimCLR views (SS-I): crop scale.")

    @field_validator("pool")
    @classmethod
    def _known_ops(cls, v: list[str]) -> list[str]:
        bad = [op for op in v if op not in IMAGE_OPS]
        if bad:
            raise ValueError(f"unknown augmentation(s) {bad}; valid: {', '.join(IMAGE_OPS)}")
        return v


class TextAugCfg(Strict):
    back_translation_p: float = Field(0.1, ge=0, le=1, description="Swap in the caption's captions_bt paraphrase.")
    deletion_p: float = Field(0.05, ge=0, lt=1, description="Drop each word with this probability.")
    swap_p: float = Field(0.0, ge=0, le=1, description="EDA random swap (off in the paper).")
    insertion_p: float = Field(0.0, ge=0, le=1, description="EDA random insertion of a caption word (off).")
    synonym_p: float = Field(0.0, ge=0, le=1, description="EDA synonym replacement from a small list (off).")


class AugmentCfg(Strict):
    image: ImageAugCfg = Field(default_factory=ImageAugCfg)
    text: TextAugCfg = Field(default_factory=TextAugCfg)


class ModelCfg(Strict):
    config: str = Field("test-tiny", description="Registered model config name or path to a JSON config.")
    checkpoint: str | None = Field(None, description="Local OpenAI / open_clip checkpoint to initialise from.")
    init_artifact: str | None = Field(None, description="Initialise from another artifact's weights.")
    vocab_prune: bool = Field(False, description="Shrink the token table to the training captions' tokens before "
                                                 "training (a from-scratch model on one dataset; AdamW then skips "
                                                 "~49k unused rows every step).")

    @field_validator("config")
    @classmethod
    def _known_config(cls, v: str) -> str:
        from .models.config import list_models

        if v not in list_models() and not v.endswith(".json"):
            raise ValueError(f"unknown model config {v!r}; registered: {', '.join(list_models())} "
                             "(or give a path to a .json file)")
        return v


class TricksCfg(Strict):
    global_gradients: bool = Field(True, description="All-gather features WITH gradient across ranks.")
    text_attn_dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on text-tower attention weights.")
    freeze_patch_embed: bool = Field(True, description="Lock the patch-embedding convolution.")
    temperature: float | None = Field(None, gt=0, le=1, description="Start the contrastive temperature here "
                                      "(logit_scale = ln(1/t)); null keeps the model's (0.07 for a new model).")
    learn_temperature: bool = Field(True, description="Train the temperature (false: keep it fixed).")


class OptimCfg(Strict):
    epochs: int = Field(5, ge=1)
    batch_size: int = Field(80, ge=2, description="Per process; the global batch is batch_size x world size.")
    lr: float = Field(1e-4, gt=0)
    min_lr: float = Field(5e-6, ge=0)
    warmup_epochs: float = Field(1.0, ge=0)
    warmup_start_lr: float = Field(1e-6, ge=0)
    weight_decay: float = Field(0.02, ge=0)
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = Field(1e-8, gt=0)
    grad_cache_chunk: int | None = Field(None, ge=1, description="Gradient caching chunk size (None = off).")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description="auto = bf16 on CUDA, fp32 CPU.")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimiser steps (budgets, tests).")
    time_budget_s: float | None = Field(None, gt=0, description="Stop after this many seconds of training.")


class EvalCfg(Strict):
    batch_size: int = Field(128, ge=1)
    every_epochs: int = Field(1, ge=1)
    val_split: str = "val"
    test_split: str = "test"
    curve_every_steps: int | None = Field(None, ge=1, description="Also evaluate curve_split every this many "
                                          "steps into curve.csv (a learning curve; never used to pick weights; "
                                          "its time is not counted in time_budget_s).")
    curve_split: str = Field("test", description="The split of the learning curve.")


class TrainRecipe(Strict):
    """``tbps-compress train``: the TBPS-CLIP teacher trainer."""

    stage: Literal["train"] = "train"
    output: str = Field("runs/teacher", description="Artifact folder to write.")
    seed: int = 0
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    data: DataCfg = Field(default_factory=DataCfg)
    model: ModelCfg = Field(default_factory=ModelCfg)
    augment: AugmentCfg = Field(default_factory=AugmentCfg)
    losses: dict[str, dict[str, Any] | None] = Field(
        default_factory=lambda: {"n_itc": {"weight": 1.0}, "r_itc": {"weight": 1.0}},
        description="Loss name -> {weight, params}; see `tbps-compress list losses`.",
    )
    tricks: TricksCfg = Field(default_factory=TricksCfg)
    optim: OptimCfg = Field(default_factory=OptimCfg)
    eval: EvalCfg = Field(default_factory=EvalCfg)
    checkpoint_every_steps: int | None = Field(None, ge=1, description="Also checkpoint every N steps.")

    @field_validator("losses")
    @classmethod
    def _losses_valid(cls, v: dict[str, Any]) -> dict[str, Any]:
        from .errors import ConfigError
        from .losses import LossSet

        if not v:
            raise ValueError("at least one loss is needed")
        try:
            LossSet({k: (dict(p) if p else {}) for k, p in v.items()})
        except ConfigError as exc:  # re-raised as ValueError so the message names the recipe file and key
            raise ValueError(str(exc)) from None
        return v

    @model_validator(mode="after")
    def _lr_order(self) -> TrainRecipe:
        if self.optim.min_lr > self.optim.lr:
            raise ValueError(f"optim.min_lr ({self.optim.min_lr}) must not exceed optim.lr ({self.optim.lr})")
        return self
