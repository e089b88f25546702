"""Torch-free image preprocessing (numpy + Pillow).

``preprocess_images`` reproduces torchvision's
``Compose([Resize((H, W), interpolation=BICUBIC), ToTensor(), Normalize(mean, std)])`` on PIL images: a resize to
exactly ``(H, W)`` with Pillow (which is what torchvision calls for PIL input), ``/ 255`` in float32, then
``(x - mean) / std`` per channel in float32.

``preprocess.json`` of an export (format 2) is a document for clients with ``image``, ``text`` and ``output``
sections (see :func:`tbps_compress.export.onnx_export.preprocess_document`); :meth:`PreprocessConfig.from_dict`
reads its ``image`` section, or the flat ``{"image_size", "mean", "std", "resize"}`` of earlier exports.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

__all__ = [
    "PREPROCESS_FORMAT",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "RESAMPLING",
    "PreprocessConfig",
    "load_image",
    "preprocess_images",
]

OPENAI_CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

# Names accepted in ``PreprocessConfig.resize`` -> Pillow resampling filter (same names as torchvision's
# InterpolationMode values).
RESAMPLING: dict[str, int] = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}

_KEYS = ("image_size", "mean", "std", "resize")
PREPROCESS_FORMAT = 2  # the "format" of preprocess.json documents this version writes and reads
# Keys of a format-2 "image" section, and the values the runtime (and the exported graph) expects for the fixed ones.
_IMAGE_KEYS = ("input", "image_size_hw", "resize", "resize_rule", "channel_order", "layout", "dtype", "scale", "mean",
               "std")
_IMAGE_FIXED = {"input": "image", "channel_order": "RGB", "layout": "NCHW", "dtype": "float32"}


def _int_pair(value: Any, key: str) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    if (
        not isinstance(value, (list, tuple))
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        raise ValueError(f"preprocess config '{key}': expected [height, width] of positive ints, got {value!r}")
    return int(value[0]), int(value[1])


def _float_triple(value: Any, key: str, positive: bool) -> tuple[float, float, float]:
    ok = isinstance(value, (list, tuple)) and len(value) == 3
    if ok:
        try:
            floats = tuple(float(v) for v in value if not isinstance(v, (bool, str)))
        except (TypeError, ValueError):
            floats = ()
        ok = len(floats) == 3 and all(math.isfinite(v) and (v > 0 or not positive) for v in floats)
    if not ok:
        what = "positive finite numbers" if positive else "finite numbers"
        raise ValueError(f"preprocess config '{key}': expected 3 {what} (one per RGB channel), got {value!r}")
    return floats  # type: ignore[return-value]


@dataclass
class PreprocessConfig:
    """Image preprocessing of a model; saved as ``preprocess.json`` in exported artifacts.

    Attributes:
        image_size: ``(height, width)`` the image is resized to (aspect ratio not kept, no crop).
        mean: per-channel RGB mean, on the [0, 1] scale.
        std: per-channel RGB standard deviation, on the [0, 1] scale.
        resize: Pillow resampling filter name, one of :data:`RESAMPLING`.
    """

    image_size: tuple[int, int]
    mean: tuple[float, float, float] = field(default=OPENAI_CLIP_MEAN)
    std: tuple[float, float, float] = field(default=OPENAI_CLIP_STD)
    resize: str = "bicubic"

    def __post_init__(self) -> None:
        self.image_size = _int_pair(self.image_size, "image_size")
        self.mean = _float_triple(self.mean, "mean", positive=False)
        self.std = _float_triple(self.std, "std", positive=True)
        if self.resize not in RESAMPLING:
            raise ValueError(
                f"preprocess config 'resize': got {self.resize!r}, expected one of {sorted(RESAMPLING)}"
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (lists instead of tuples)."""
        return {
            "image_size": list(self.image_size),
            "mean": list(self.mean),
            "std": list(self.std),
            "resize": self.resize,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PreprocessConfig:
        """Build from a dict such as ``to_dict()`` wrote, or from a format-2 ``preprocess.json`` document (its
        ``image`` section); unknown or missing keys are a ``ValueError``."""
        if not isinstance(data, Mapping):
            raise ValueError(f"preprocess config: expected a JSON object, got {type(data).__name__}")
        if "image" in data or "format" in data:
            return cls._from_document(data)
        unknown = sorted(set(data) - set(_KEYS))
        if unknown:
            raise ValueError(f"preprocess config: unknown key(s) {unknown}; allowed keys are {list(_KEYS)}")
        if "image_size" not in data:
            raise ValueError("preprocess config 'image_size': missing (expected [height, width])")
        return cls(**dict(data))

    @classmethod
    def _from_document(cls, data: Mapping[str, Any]) -> PreprocessConfig:
        fmt = data.get("format")
        if not isinstance(fmt, int) or isinstance(fmt, bool) or not 1 < fmt <= PREPROCESS_FORMAT:
            raise ValueError(f"preprocess config 'format': got {fmt!r}, this version reads format "
                             f"{PREPROCESS_FORMAT} (a newer tbps-compress wrote it, or the file was edited)")
        section = data.get("image")
        if not isinstance(section, Mapping):
            raise ValueError("preprocess config 'image': missing or not an object (expected the image section)")
        unknown = sorted(set(section) - set(_IMAGE_KEYS))
        if unknown:
            raise ValueError(f"preprocess config 'image': unknown key(s) {unknown}; allowed keys are "
                             f"{list(_IMAGE_KEYS)}")
        for key, expected in _IMAGE_FIXED.items():
            if key in section and section[key] != expected:
                raise ValueError(f"preprocess config 'image.{key}': got {section[key]!r}, the runtime supports "
                                 f"{expected!r} only")
        if "image_size_hw" not in section:
            raise ValueError("preprocess config 'image.image_size_hw': missing (expected [height, width])")
        kwargs = {k: section[k] for k in ("mean", "std", "resize") if k in section}
        try:
            return cls(image_size=section["image_size_hw"], **kwargs)
        except ValueError as exc:
            msg = str(exc).replace("preprocess config '", "preprocess config 'image.", 1)
            raise ValueError(msg.replace("'image.image_size'", "'image.image_size_hw'", 1)) from None

    @property
    def height(self) -> int:
        return self.image_size[0]

    @property
    def width(self) -> int:
        return self.image_size[1]


def load_image(path: str | Path) -> Image.Image:
    """Open an image file and return it decoded as RGB."""
    with Image.open(path) as img:
        return img.convert("RGB")


def _to_rgb(image: Image.Image | str | Path, index: int) -> Image.Image:
    if isinstance(image, (str, Path)):
        return load_image(image)
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    raise TypeError(f"images[{index}] is {type(image).__name__}; expected a PIL image or an image path")


def preprocess_images(images: Sequence[Image.Image | str | Path], cfg: PreprocessConfig) -> np.ndarray:
    """Resize, scale to [0, 1] and normalise images into an ``(N, 3, H, W)`` float32 array."""
    if isinstance(images, (str, Path, Image.Image)):
        images = [images]
    height, width = cfg.image_size
    resample = RESAMPLING[cfg.resize]
    mean = np.asarray(cfg.mean, dtype=np.float32).reshape(3, 1, 1)
    std = np.asarray(cfg.std, dtype=np.float32).reshape(3, 1, 1)
    out = np.empty((len(images), 3, height, width), dtype=np.float32)
    for i, image in enumerate(images):
        img = _to_rgb(image, i)
        if img.size != (width, height):
            img = img.resize((width, height), resample=resample)
        chw = np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).astype(np.float32) / np.float32(255.0)
        out[i] = (chw - mean) / std
    return out
