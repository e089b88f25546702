"""Image and text augmentation of TBPS-CLIP.

Main view: two operations drawn with replacement from a pool of six (colour jitter, rotation, resized crop,
grayscale, horizontal flip, random erasing), applied to the image already resized to the model input; a second
independent draw makes the MVS-I view; two SimCLR-style views serve SS-I. Text: back-translation swap, random word
deletion, and the other EDA operations (off by default).

Augmentations run on uint8 tensors with torchvision's v2 transforms. Randomness comes from a per-sample seed, so
results do not depend on the number of loader workers.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

from ..recipes import ImageAugCfg, TextAugCfg
from ..runtime.preprocess import OPENAI_CLIP_MEAN as OPENAI_MEAN
from ..runtime.preprocess import OPENAI_CLIP_STD as OPENAI_STD


def _pool_ops(cfg: ImageAugCfg, size: tuple[int, int]) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    cj = cfg.color_jitter
    return {
        "color_jitter": T.ColorJitter(cj.brightness, cj.contrast, cj.saturation, cj.hue),
        "rotation": T.RandomRotation(cfg.rotation_degrees),
        "resized_crop": T.RandomResizedCrop(size, scale=cfg.crop_scale, antialias=True),
        "grayscale": T.RandomGrayscale(cfg.grayscale_p),
        "hflip": T.RandomHorizontalFlip(cfg.hflip_p),
        "erasing": T.RandomErasing(cfg.erasing.p, scale=cfg.erasing.scale, value=cfg.erasing.value),
    }


class ImageAugment:
    """Callable views of a resized uint8 (3,H,W) image; returns float tensors normalised with CLIP's statistics."""

    def __init__(self, cfg: ImageAugCfg, size: tuple[int, int]) -> None:
        self.cfg = cfg
        self.size = size
        self.ops = _pool_ops(cfg, size)
        self.names = list(cfg.pool)
        self.normalize = T.Compose([T.ToDtype(torch.float32, scale=True), T.Normalize(OPENAI_MEAN, OPENAI_STD)])
        self.ssl = T.Compose([
            T.RandomResizedCrop(size, scale=cfg.ssl_crop_scale, antialias=True),
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            T.RandomGrayscale(0.2),
            T.RandomApply([T.GaussianBlur(kernel_size=_odd(size[1] // 10), sigma=(0.1, 2.0))], p=0.5),
            T.RandomHorizontalFlip(),
        ])

    def main_view(self, img: torch.Tensor, rng: random.Random) -> torch.Tensor:
        return self.main_view_flipped(img, rng)[0]

    def main_view_flipped(self, img: torch.Tensor, rng: random.Random) -> tuple[torch.Tensor, bool]:
        """The main view and whether it ended up mirrored (an odd number of horizontal flips)."""
        out = img
        flipped = False
        if self.names and self.cfg.num_ops:
            for name in rng.choices(self.names, k=self.cfg.num_ops):
                if name == "hflip":  # drawn from ``rng`` so the caller knows whether the image was mirrored
                    if rng.random() < self.cfg.hflip_p:
                        out = T.functional.horizontal_flip(out)
                        flipped = not flipped
                else:
                    out = self.ops[name](out)
        return self.normalize(out), flipped

    def ssl_view(self, img: torch.Tensor) -> torch.Tensor:
        return self.normalize(self.ssl(img))

    def eval_view(self, img: torch.Tensor) -> torch.Tensor:
        return self.normalize(img)


_LEFT_RIGHT = re.compile(r"\b(left|right)\b")


def swap_left_right(text: str) -> str:
    """``left`` <-> ``right`` (whole words): the caption of a mirrored image."""
    return _LEFT_RIGHT.sub(lambda m: "right" if m.group(1) == "left" else "left", text)


def _odd(n: int) -> int:
    n = max(3, n)
    return n if n % 2 else n + 1


def resize_uint8(img: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic resize of a uint8 (3,h,w) tensor to ``size`` (height, width)."""
    if tuple(img.shape[-2:]) == tuple(size):
        return img
    return T.functional.resize(img, list(size), interpolation=InterpolationMode.BICUBIC, antialias=True)


_SYNONYMS = {
    "man": ["guy", "male"], "woman": ["lady", "female"], "shirt": ["top"], "trousers": ["pants"],
    "pants": ["trousers"], "jacket": ["coat"], "bag": ["purse"], "shoes": ["sneakers"], "grey": ["gray"],
    "gray": ["grey"], "wearing": ["dressed in"], "carrying": ["holding"], "black": ["dark"], "hair": ["locks"],
}


class TextAugment:
    """Back-translation swap, random deletion and (off by default) EDA swap / insertion / synonym replacement."""

    def __init__(self, cfg: TextAugCfg) -> None:
        self.cfg = cfg

    def __call__(self, caption: str, paraphrase: str | None, rng: random.Random) -> str:
        c = self.cfg
        text = caption
        if paraphrase and c.back_translation_p and rng.random() < c.back_translation_p:
            text = paraphrase
        words = text.split()
        if c.synonym_p:
            words = [rng.choice(_SYNONYMS[w]) if w in _SYNONYMS and rng.random() < c.synonym_p else w for w in words]
        if c.insertion_p and words:
            for _ in range(sum(rng.random() < c.insertion_p for _ in words)):
                words.insert(rng.randrange(len(words) + 1), rng.choice(words))
        if c.swap_p and len(words) > 1:
            for _ in range(sum(rng.random() < c.swap_p for _ in words)):
                i, j = rng.randrange(len(words)), rng.randrange(len(words))
                words[i], words[j] = words[j], words[i]
        if c.deletion_p and len(words) > 1:
            kept = [w for w in words if rng.random() >= c.deletion_p]
            words = kept or [rng.choice(words)]
        return " ".join(words)
