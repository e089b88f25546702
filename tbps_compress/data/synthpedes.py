"""SynthPedes: a procedural generator of pedestrian crops with captions in the CUHK-PEDES format.

Every identity is a set of discrete attributes (see :data:`ATTRIBUTE_FAMILIES`) plus a few hidden continuous
ones (skin tone, build, exact shade of each colour). Each image of an identity picks a viewpoint (front, back,
side), a pose, a camera (colour cast, exposure, blur, noise) and a cluttered scene, and draws the person with
Pillow. Captions describe only what that image shows (see :mod:`tbps_compress.data.synth_text`). About 30% of the
identities are near-copies of another identity of the same split that differ in one or two attributes, so that
retrieval needs fine detail.

Output (all paths relative to ``OUT``; the layout of CUHK-PEDES, whose loaders join ``OUT/imgs/<file_path>``)::

    reid_raw.json      CUHK-PEDES schema: split, captions, file_path, processed_tokens, id (+ captions_bt);
                       file_path is relative to imgs/, e.g. test/0001/0001_01.jpg
    synth_truth.json   ground truth, one entry per reid_raw.json entry: what each image shows and what each
                       caption states (see :func:`load_truth`)
    synth_meta.json    per-split counts, per-identity attributes, per-image view/camera/occluder, the families
    imgs/<split>/<id>/<id>_<k>.jpg

Identities are numbered test first (1..test_ids), then val, then train, and each split draws its identities and
near-copies from its own random stream; images and captions draw from streams keyed on the identity. So the val
and test splits (their reid_raw.json entries and image bytes) do not change with the number of training
identities. Everything is a pure function of the arguments and the seed: the same call writes the same bytes
whatever the number of worker processes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import multiprocessing
import os
import shutil
import textwrap
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageEnhance, ImageFilter, ImageFont

from tbps_compress.data.synth_text import (
    COARSE_FAMILIES,
    COLOURS,
    TRUTH_FAMILIES,
    flatten_stated,
    flatten_visible,
    tokenize,
    visible_facts,
    write_captions,
)
from tbps_compress.errors import DataError, UserError

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
META_FILE = "synth_meta.json"
ANNOTATION_FILE = "reid_raw.json"
TRUTH_FILE = "synth_truth.json"
TRUTH_FORMAT = "synthpedes-truth"
TRUTH_VERSION = 1
SPLIT_ORDER = ("test", "val", "train")  # identity numbering order
_SPLIT_CODE = {"test": 1, "val": 2, "train": 3}
DEFAULT_IDENTITIES = 200
MIN_IDENTITIES = 5  # --identities N: 2 test + 2 val + 1 train at least
MIN_TEST_IDS = 2
PRESETS: dict[str, dict[str, int]] = {
    # what `tbps-compress synth OUT` writes without flags (--identities 200)
    "demo": {"train_ids": 160, "val_ids": 20, "test_ids": 20, "images_per_id": 4, "captions_per_image": 2},
    # a test split of CUHK-PEDES scale: 1,000 identities, 3,000 images, 6,000 captions
    "benchmark": {"train_ids": 10_000, "val_ids": 200, "test_ids": 1_000, "images_per_id": 4,
                  "eval_images_per_id": 3, "captions_per_image": 2},
}
VIEWS = ("front", "back", "side")
NEAR_COPY_FRACTION = 0.3

ATTRIBUTE_FAMILIES: dict[str, list[str]] = {
    "body": ["slim male", "average male", "heavy male", "slim female", "average female", "heavy female"],
    "hair_style": ["bald", "short", "medium", "long", "ponytail", "bun"],
    "hair_color": ["black", "brown", "blonde", "grey", "red"],
    "hat": ["none", "cap", "beanie", "sun hat"],
    "hat_color": list(COLOURS),
    "face_accessory": ["none", "glasses", "sunglasses", "face mask"],
    "upper_type": ["t-shirt", "tank top", "shirt", "sweater", "hoodie", "jacket", "coat", "dress"],
    "upper_color": list(COLOURS),
    "upper_pattern": ["plain", "striped", "checked", "logo", "two-tone"],
    "upper_color2": list(COLOURS),
    "lower_type": ["trousers", "jeans", "shorts", "skirt", "long skirt"],
    "lower_color": list(COLOURS),
    "shoe_type": ["sneakers", "boots", "sandals", "leather shoes"],
    "shoe_color": list(COLOURS),
    "bag": ["none", "backpack", "shoulder bag", "handbag"],
    "bag_color": list(COLOURS),
    "held": ["none", "phone", "umbrella", "cup", "bottle"],
}

_RGB: dict[str, tuple[int, int, int]] = {
    "black": (30, 30, 33), "white": (236, 236, 230), "grey": (128, 128, 131), "navy": (30, 40, 92),
    "blue": (44, 96, 192), "green": (48, 124, 62), "red": (192, 34, 40), "pink": (232, 138, 172),
    "orange": (236, 124, 34), "yellow": (230, 204, 54), "purple": (112, 54, 140), "brown": (104, 66, 38),
    "beige": (206, 186, 146),
}  # fmt: skip
_HAIR_RGB = {"black": (24, 21, 20), "brown": (92, 58, 34), "blonde": (212, 180, 116), "grey": (172, 170, 166),
             "red": (148, 58, 28)}
_COLOUR_P = {
    "black": 0.15, "white": 0.12, "grey": 0.1, "navy": 0.08, "blue": 0.09, "green": 0.06, "red": 0.08,
    "pink": 0.05, "orange": 0.04, "yellow": 0.05, "purple": 0.05, "brown": 0.06, "beige": 0.07,
}  # fmt: skip
_JEANS_P = {"blue": 0.4, "navy": 0.22, "black": 0.2, "grey": 0.1, "white": 0.04, "beige": 0.04}
_UPPER_P = {
    "male": {"t-shirt": 0.25, "tank top": 0.04, "shirt": 0.18, "sweater": 0.13, "hoodie": 0.13, "jacket": 0.17,
             "coat": 0.1},
    "female": {"t-shirt": 0.2, "tank top": 0.06, "shirt": 0.14, "sweater": 0.12, "hoodie": 0.1, "jacket": 0.12,
               "coat": 0.1, "dress": 0.16},
}
_LOWER_P = {
    "male": {"trousers": 0.45, "jeans": 0.35, "shorts": 0.2},
    "female": {"trousers": 0.25, "jeans": 0.3, "shorts": 0.13, "skirt": 0.2, "long skirt": 0.12},
}
_HAIR_P = {
    "male": {"bald": 0.07, "short": 0.6, "medium": 0.2, "long": 0.05, "ponytail": 0.05, "bun": 0.03},
    "female": {"bald": 0.01, "short": 0.12, "medium": 0.22, "long": 0.35, "ponytail": 0.18, "bun": 0.12},
}
_UMBRELLA_COLOURS = ("black", "navy", "red", "blue", "green", "purple", "grey")
_MUTABLE = ("upper_color", "upper_pattern", "upper_type", "lower_color", "lower_type", "shoe_color", "shoe_type",
            "bag", "bag_color", "hat", "hat_color", "face_accessory", "held", "hair_color")


# ================================================================================================================
# Identities
# ================================================================================================================


def _choice(rng: np.random.Generator, probs: dict[str, float], exclude: Sequence[str] = ()) -> str:
    keys = [k for k in probs if k not in exclude]
    p = np.array([probs[k] for k in keys], dtype=np.float64)
    return keys[int(rng.choice(len(keys), p=p / p.sum()))]


def _colour(rng: np.random.Generator, exclude: Sequence[str] = ()) -> str:
    return _choice(rng, _COLOUR_P, exclude)


def _fix(attrs: dict[str, str], extras: dict[str, Any], rng: np.random.Generator) -> None:
    """Make an attribute set consistent (a dress has no separate lower garment, no logo on coats...)."""
    if attrs["upper_type"] == "dress":
        attrs["lower_type"] = "skirt"
        attrs["lower_color"] = attrs["upper_color"]
    if attrs["upper_pattern"] == "logo" and attrs["upper_type"] in ("jacket", "coat", "dress"):
        attrs["upper_pattern"] = "plain"
    if attrs["upper_color2"] == attrs["upper_color"]:
        attrs["upper_color2"] = _colour(rng, exclude=[attrs["upper_color"]])
    if attrs["bag"] == "handbag" and extras["held_side"] == extras["bag_side"]:
        extras["held_side"] = "left" if extras["bag_side"] == "right" else "right"


def _colour_rgb(name: str, rng: np.random.Generator, spread: int = 14) -> list[int]:
    base = np.array(_RGB[name], dtype=np.int64)
    jit = rng.integers(-spread, spread + 1, 3) + int(rng.integers(-spread, spread + 1))
    return [int(v) for v in np.clip(base + jit, 0, 255)]


def _slot_rgbs(attrs: dict[str, str], rng: np.random.Generator) -> dict[str, list[int]]:
    return {
        "upper": _colour_rgb(attrs["upper_color"], rng), "upper2": _colour_rgb(attrs["upper_color2"], rng),
        "lower": _colour_rgb(attrs["lower_color"], rng), "shoe": _colour_rgb(attrs["shoe_color"], rng),
        "bag": _colour_rgb(attrs["bag_color"], rng), "hat": _colour_rgb(attrs["hat_color"], rng),
    }  # fmt: skip


def sample_identity(rng: np.random.Generator) -> tuple[dict[str, str], dict[str, Any]]:
    """Draw one random identity: discrete attributes (one value per family) and hidden extras."""
    gender = "male" if rng.random() < 0.5 else "female"
    build = _choice(rng, {"slim": 0.35, "average": 0.45, "heavy": 0.2})
    upper_type = _choice(rng, _UPPER_P[gender])
    lower_type = _choice(rng, _LOWER_P[gender])
    bag_p = {"none": 0.35, "backpack": 0.3, "shoulder bag": 0.2, "handbag": 0.15 if gender == "female" else 0.05}
    attrs = {
        "body": f"{build} {gender}",
        "hair_style": _choice(rng, _HAIR_P[gender]),
        "hair_color": _choice(rng, {"black": 0.45, "brown": 0.3, "blonde": 0.12, "grey": 0.08, "red": 0.05}),
        "hat": _choice(rng, {"none": 0.7, "cap": 0.12, "beanie": 0.1, "sun hat": 0.08}),
        "hat_color": _colour(rng),
        "face_accessory": _choice(rng, {"none": 0.62, "glasses": 0.2, "sunglasses": 0.1, "face mask": 0.08}),
        "upper_type": upper_type,
        "upper_color": _colour(rng),
        "upper_pattern": _choice(rng, {"plain": 0.5, "striped": 0.14, "checked": 0.12, "logo": 0.14,
                                       "two-tone": 0.1}),
        "upper_color2": _colour(rng),
        "lower_type": lower_type,
        "lower_color": _choice(rng, _JEANS_P) if lower_type == "jeans" else _colour(rng),
        "shoe_type": _choice(rng, {"sneakers": 0.45, "boots": 0.15, "sandals": 0.12, "leather shoes": 0.28}),
        "shoe_color": _choice(rng, {**_COLOUR_P, "black": 0.3, "white": 0.25}),
        "bag": _choice(rng, bag_p),
        "bag_color": _colour(rng),
        "held": _choice(rng, {"none": 0.6, "phone": 0.14, "umbrella": 0.1, "cup": 0.08, "bottle": 0.08}),
    }
    tone = float(rng.beta(2.0, 2.2))
    light, dark = np.array([238, 204, 178]), np.array([104, 70, 50])
    skin = np.clip(light + (dark - light) * tone + rng.integers(-8, 9, 3), 0, 255)
    extras: dict[str, Any] = {
        "skin": [int(v) for v in skin],
        "hair_rgb": [int(v) for v in np.clip(np.array(_HAIR_RGB[attrs["hair_color"]]) + rng.integers(-10, 11, 3),
                                             0, 255)],
        "height": round(float(rng.uniform(0.9, 1.04)), 4),
        "width": round(float(rng.uniform(0.94, 1.06)), 4),
        "bag_side": "left" if rng.random() < 0.5 else "right",
        "held_side": "left" if rng.random() < 0.5 else "right",
        "held_color": str(_UMBRELLA_COLOURS[int(rng.integers(len(_UMBRELLA_COLOURS)))]),
        "mask_rgb": [[236, 236, 236], [150, 196, 226], [34, 34, 38]][int(rng.integers(3))],
        "logo": int(rng.integers(4)),
        "stripe": round(float(rng.uniform(0.018, 0.034)), 4),
    }
    _fix(attrs, extras, rng)
    extras["rgb"] = _slot_rgbs(attrs, rng)
    return attrs, extras


def _mutate(attrs: dict[str, str], extras: dict[str, Any], rng: np.random.Generator) -> tuple[dict, dict, list]:
    """A near-copy: the same person with one or two attributes changed."""
    gender = attrs["body"].split()[1]
    for _ in range(50):
        new = dict(attrs)
        ext = json.loads(json.dumps(extras))
        n_change = 1 if rng.random() < 0.6 else 2
        options = [f for f in _MUTABLE if not (
            (f == "bag_color" and attrs["bag"] == "none") or (f == "hat_color" and attrs["hat"] == "none")
            or (f in ("lower_type", "lower_color") and attrs["upper_type"] == "dress")
            or (f == "hair_color" and attrs["hair_style"] == "bald")
        )]
        picked = [options[i] for i in rng.choice(len(options), size=n_change, replace=False)]
        for fam in picked:
            current = new[fam]
            if fam == "upper_type":
                probs = {k: v for k, v in _UPPER_P[gender].items() if k != "dress"}
                if current == "dress":
                    continue
                new[fam] = _choice(rng, probs, exclude=[current])
            elif fam == "lower_type":
                new[fam] = _choice(rng, _LOWER_P[gender], exclude=[current])
            elif fam.endswith("_color") or fam == "upper_color2":
                if fam == "hair_color":
                    new[fam] = _choice(rng, {k: 1.0 for k in _HAIR_RGB}, exclude=[current])
                else:
                    new[fam] = _colour(rng, exclude=[current])
            else:
                values = [v for v in ATTRIBUTE_FAMILIES[fam] if v != current]
                new[fam] = values[int(rng.integers(len(values)))]
        _fix(new, ext, rng)
        changed = [f for f in ATTRIBUTE_FAMILIES if new[f] != attrs[f]]
        if not 1 <= len(changed) <= 2:
            continue
        # recolour only the slots whose colour name changed; keep the rest pixel-identical
        fresh = _slot_rgbs(new, rng)
        slot_of = {"upper_color": "upper", "upper_color2": "upper2", "lower_color": "lower", "shoe_color": "shoe",
                   "bag_color": "bag", "hat_color": "hat"}
        for fam, slot in slot_of.items():
            if new[fam] != attrs[fam]:
                ext["rgb"][slot] = fresh[slot]
        if new["hair_color"] != attrs["hair_color"]:
            ext["hair_rgb"] = list(_HAIR_RGB[new["hair_color"]])
        return new, ext, changed
    return dict(attrs), json.loads(json.dumps(extras)), []


def split_counts(identities: int) -> tuple[int, int, int]:
    """``(train, val, test)`` identity counts of ``--identities N``: 80/10/10, at least 2 val and 2 test."""
    if identities < MIN_IDENTITIES:
        raise UserError(f"synth: --identities must be at least {MIN_IDENTITIES} (got {identities}): it is split "
                        f"80/10/10 and val and test need 2 identities each; or set --train-ids, --val-ids and "
                        f"--test-ids")
    n_val = n_test = max(2, round(identities * 0.1))
    return identities - n_val - n_test, n_val, n_test


def make_identities(seed: int, train_ids: int, val_ids: int = 0, test_ids: int = 0) -> list[dict[str, Any]]:
    """All identities with their split, attributes and (for near-copies) which identity they copy.

    Numbered test first (ids 1..test_ids), then val, then train. Each split decides its near-copies with its own
    stream and every identity draws from a stream keyed on its id, so a split does not depend on the sizes of the
    splits numbered after it.
    """
    counts = {"test": test_ids, "val": val_ids, "train": train_ids}
    out: list[dict[str, Any]] = []
    pid = 0
    for split in SPLIT_ORDER:
        rng_struct = np.random.default_rng([seed, 5, _SPLIT_CODE[split]])
        same_split: list[dict[str, Any]] = []
        for _ in range(counts[split]):
            pid += 1
            rng = np.random.default_rng([seed, 7, pid])
            copy = rng_struct.random() < NEAR_COPY_FRACTION and len(same_split) > 0
            base = same_split[int(rng_struct.integers(len(same_split)))] if copy else None
            if base is not None:
                attrs, extras, changed = _mutate(base["attributes"], base["extras"], rng)
                if not changed:
                    base = None
            if base is None:
                attrs, extras = sample_identity(rng)
                changed = []
            out.append({"id": pid, "split": split, "attributes": attrs, "extras": extras,
                        "near_copy_of": base["id"] if base is not None else None, "changed": changed})
            same_split.append(out[-1])
    return out


# ================================================================================================================
# Cameras and per-image plans
# ================================================================================================================

_GROUNDS = {"asphalt": (92, 92, 96), "tiles": (170, 160, 148), "pavers": (150, 120, 104), "grass": (96, 130, 70),
            "indoor": (190, 184, 172), "concrete": (156, 156, 150)}


def make_cameras(seed: int, n: int = 12) -> list[dict[str, Any]]:
    """A pool of cameras: each has its own colour cast, exposure, sharpness and scene style."""
    rng = np.random.default_rng([seed, 3])
    cams = []
    for _ in range(n):
        gains = rng.uniform(0.84, 1.16, 3)
        gains = gains / gains.mean()
        ground = list(_GROUNDS)[int(rng.integers(len(_GROUNDS)))]
        walls = [[int(v) for v in rng.integers(60, 225, 3)] for _ in range(3)]
        cams.append({
            "gains": [round(float(g), 4) for g in gains],
            "gamma": round(float(rng.uniform(0.8, 1.25)), 4),
            "contrast": round(float(rng.uniform(0.72, 1.12)), 4),
            "brightness": round(float(rng.uniform(-0.08, 0.07)), 4),
            "saturation": round(float(rng.uniform(0.6, 1.12)), 4),
            "noise": round(float(rng.uniform(0.006, 0.035)), 4),
            "blur": round(float(rng.uniform(0.0, 0.9)), 4),
            "lowres": round(float(rng.uniform(0.45, 1.0)), 4),
            "horizon": round(float(rng.uniform(0.35, 0.62)), 4),
            "ground": ground,
            "walls": walls,
        })
    return cams


_OCCLUDERS = {"none": 0.7, "pole": 0.08, "car": 0.06, "bin": 0.05, "bush": 0.04, "person": 0.07}


def plan_images(ident: dict[str, Any], images_per_id: int, seed: int, n_cameras: int) -> list[dict[str, Any]]:
    """Viewpoint, camera and occluder of every image of one identity (first three views are all different)."""
    pid = ident["id"]
    rng = np.random.default_rng([seed, 13, pid])
    views = [VIEWS[i] for i in rng.permutation(3)]
    while len(views) < images_per_id:
        views.append(VIEWS[int(rng.choice(3, p=[0.4, 0.3, 0.3]))])
    plans = []
    for k in range(images_per_id):
        view = views[k]
        occ = _choice(rng, _OCCLUDERS)
        plans.append({"k": k + 1, "view": view,
                      "facing": ("left" if rng.random() < 0.5 else "right") if view == "side" else "",
                      "camera": int(rng.integers(n_cameras)), "occluder": occ,
                      "hidden": ["shoes"] if occ in ("car", "bush") else []})
    return plans


# ================================================================================================================
# Drawing
# ================================================================================================================

RGB = tuple[int, int, int]


def _mul(rgb: Sequence[int], f: float) -> RGB:
    return (min(255, max(0, int(rgb[0] * f))), min(255, max(0, int(rgb[1] * f))), min(255, max(0, int(rgb[2] * f))))


def _mix(a: Sequence[int], b: Sequence[int], t: float) -> RGB:
    return (int(a[0] + (b[0] - a[0]) * t), int(a[1] + (b[1] - a[1]) * t), int(a[2] + (b[2] - a[2]) * t))


class _Pen:
    """Draws in person units (person height = 1, u to the right of the body axis, v down from the head top)."""

    def __init__(self, img: Image.Image, cx: float, top: float, scale: float) -> None:
        self.img = img
        self.draw = ImageDraw.Draw(img)
        self.cx, self.top, self.s = cx, top, scale
        self.mask: ImageDraw.ImageDraw | None = None
        self.tilt = 0.0
        self._cos, self._sin = 1.0, 0.0

    def set_tilt(self, degrees: float) -> None:
        """Rotate everything drawn afterwards by ``degrees`` (clockwise) about the soles."""
        self.tilt = degrees
        self._cos, self._sin = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))

    def xy(self, u: float, v: float) -> tuple[float, float]:
        x, y = u * self.s, (v - 1.0) * self.s
        return (self.cx + x * self._cos - y * self._sin, self.top + self.s + x * self._sin + y * self._cos)

    @staticmethod
    def _c(fill: Sequence[int]) -> tuple[int, int, int, int]:
        return (int(fill[0]), int(fill[1]), int(fill[2]), 255)

    def poly(self, pts: Sequence[tuple[float, float]], fill: Sequence[int], mask: bool = False) -> None:
        xy = [self.xy(u, v) for u, v in pts]
        self.draw.polygon(xy, fill=self._c(fill))
        if mask and self.mask is not None:
            self.mask.polygon(xy, fill=255)

    def _box(self, u: float, v: float, ru: float, rv: float) -> list[float]:
        x, y = self.xy(u, v)
        rx, ry = abs(ru) * self.s, abs(rv) * self.s
        return [x - rx, y - ry, x + rx, y + ry]

    def ellipse(self, u: float, v: float, ru: float, rv: float, fill: Sequence[int] | None,
                outline: Sequence[int] | None = None, width: float = 0.0, mask: bool = False) -> None:
        box = self._box(u, v, ru, rv)
        w = max(1, int(round(width * self.s))) if outline is not None else 0
        self.draw.ellipse(box, fill=None if fill is None else self._c(fill),
                          outline=None if outline is None else self._c(outline), width=w)
        if mask and self.mask is not None and fill is not None:
            self.mask.ellipse(box, fill=255)

    def chord(self, u: float, v: float, ru: float, rv: float, start: float, end: float,
              fill: Sequence[int]) -> None:
        start, end = start + self.tilt, end + self.tilt
        self.draw.chord(self._box(u, v, ru, rv), start, end, fill=self._c(fill))

    def rect(self, u0: float, v0: float, u1: float, v1: float, fill: Sequence[int], mask: bool = False) -> None:
        self.poly([(u0, v0), (u1, v0), (u1, v1), (u0, v1)], fill, mask)

    def line(self, pts: Sequence[tuple[float, float]], fill: Sequence[int], width: float) -> None:
        self.draw.line([self.xy(u, v) for u, v in pts], fill=self._c(fill), width=max(1, int(round(width * self.s))))

    def limb(self, pts: Sequence[tuple[float, float]], widths: Sequence[float], fill: Sequence[int],
             mask: bool = False) -> None:
        """A thick polyline with a width per joint and rounded joints."""
        for (u0, v0), (u1, v1), w0, w1 in zip(pts[:-1], pts[1:], widths[:-1], widths[1:], strict=False):
            du, dv = u1 - u0, v1 - v0
            n = math.hypot(du, dv) or 1e-6
            nu, nv = -dv / n, du / n
            self.poly([(u0 + nu * w0 / 2, v0 + nv * w0 / 2), (u1 + nu * w1 / 2, v1 + nv * w1 / 2),
                       (u1 - nu * w1 / 2, v1 - nv * w1 / 2), (u0 - nu * w0 / 2, v0 - nv * w0 / 2)], fill, mask)
        for (u, v), w in zip(pts, widths, strict=False):
            self.ellipse(u, v, w / 2, w / 2, fill, mask=mask)


def _arm_points(shoulder: tuple[float, float], angle: float, bend: float, side: float,
                upper: float = 0.165, fore: float = 0.15) -> list[tuple[float, float]]:
    su, sv = shoulder
    eu, ev = su + side * upper * math.sin(angle), sv + upper * math.cos(angle)
    hu, hv = eu + side * fore * math.sin(angle + bend), ev + fore * math.cos(angle + bend)
    return [(su, sv), (eu, ev), (hu, hv)]


def _along(pts: Sequence[tuple[float, float]], frac: float) -> list[tuple[float, float]]:
    """The first ``frac`` of a polyline (by length)."""
    lengths = [math.dist(a, b) for a, b in zip(pts[:-1], pts[1:], strict=False)]
    target = frac * sum(lengths)
    out = [pts[0]]
    for (a, b), seg in zip(zip(pts[:-1], pts[1:], strict=False), lengths, strict=False):
        if target <= seg:
            t = target / seg if seg else 0.0
            out.append((a[0] + (b[0] - a[0]) * t, a[1] + (b[1] - a[1]) * t))
            return out
        out.append(b)
        target -= seg
    return out


class _Person:
    """Everything needed to draw one identity in one image."""

    def __init__(self, attrs: dict[str, str], extras: dict[str, Any], view: str, facing: str,
                 rng: np.random.Generator) -> None:
        self.a, self.e, self.view, self.facing, self.rng = attrs, extras, view, facing, rng
        build, gender = attrs["body"].split()
        self.female = gender == "female"
        bw = {"slim": 0.88, "average": 1.0, "heavy": 1.2}[build] * extras["width"]
        self.bw = bw
        self.sw = (0.1 if self.female else 0.115) * (0.5 + 0.5 * bw)
        self.ww = (0.07 if self.female else 0.083) * bw
        self.hw = (0.097 if self.female else 0.09) * bw
        self.leg_w = (0.07 if self.female else 0.076) * (0.55 + 0.45 * bw)
        rgb = extras["rgb"]
        self.skin = tuple(extras["skin"])
        self.hair = tuple(extras["hair_rgb"])
        self.c1, self.c2 = tuple(rgb["upper"]), tuple(rgb["upper2"])
        self.lower, self.shoe = tuple(rgb["lower"]), tuple(rgb["shoe"])
        self.bag, self.hat = tuple(rgb["bag"]), tuple(rgb["hat"])
        self.held_rgb = _RGB[extras["held_color"]]
        self.stride = float(rng.uniform(0.0, 1.0))
        self.spread = float(rng.uniform(0.0, 0.05))
        self.arm_out = math.radians(float(rng.uniform(3, 13)))
        self.swing = float(rng.uniform(-1, 1))
        hem = {"t-shirt": 0.51, "tank top": 0.5, "shirt": 0.52, "sweater": 0.51, "hoodie": 0.525, "jacket": 0.52,
               "coat": 0.8, "dress": 0.7}
        self.hem = hem[attrs["upper_type"]]
        if attrs["upper_type"] == "coat" and attrs["lower_type"] in ("long skirt",):
            self.hem = 0.78

    # which image side (+1 right / -1 left, in drawing units) a body side appears on
    def side_sign(self, body_side: str) -> float:
        s = -1.0 if body_side == "right" else 1.0
        return s if self.view == "front" else -s

    # ------------------------------------------------------------------------------------------------------------
    def draw(self, pen: _Pen) -> None:
        if self.view == "side":
            self._draw_side(pen)
        else:
            self._draw_frontal(pen)

    # ---- shared pieces -----------------------------------------------------------------------------------------
    def _shoe(self, pen: _Pen, u: float, v: float, forward: float) -> None:
        """A shoe whose sole is at v; ``forward`` is 0 for frontal views, +1 facing right in side views."""
        kind, c = self.a["shoe_type"], self.shoe
        length = 0.034 if forward == 0 else 0.055
        off = forward * 0.022
        if kind == "boots":
            pen.rect(u - 0.027, v - 0.12, u + 0.027, v - 0.02, c)
        if kind == "sandals":
            pen.ellipse(u + off, v - 0.018, length, 0.016, self.skin)
            for dv in (0.028, 0.012):
                pen.line([(u + off - length * 0.8, v - dv), (u + off + length * 0.8, v - dv)], c, 0.007)
            pen.rect(u + off - length, v - 0.005, u + off + length, v, _mul(c, 0.7))
            return
        pen.ellipse(u + off, v - 0.02, length, 0.021, c)
        if kind == "sneakers":
            sole = (235, 235, 230) if sum(c) < 600 else (150, 150, 150)
            pen.rect(u + off - length * 0.95, v - 0.009, u + off + length * 0.95, v, sole)
        elif kind == "leather shoes":
            pen.ellipse(u + off + length * 0.3 * (forward or 0.5), v - 0.027, length * 0.35, 0.006, _mix(c, (255,) * 3,
                                                                                                        0.45))
            pen.rect(u + off - length * 0.9, v - 0.006, u + off + length * 0.9, v, _mul(c, 0.55))
        else:  # boots
            pen.rect(u + off - length, v - 0.008, u + off + length, v, _mul(c, 0.6))

    def _lower_legs(self, pen: _Pen, legs: list[list[tuple[float, float]]], shades: list[float],
                    forward: float) -> None:
        """Skin, lower garment and shoes on each leg (drawn far leg first)."""
        kind, c = self.a["lower_type"], self.lower
        lw = self.leg_w
        dress = self.a["upper_type"] == "dress"
        for pts, sh in zip(legs, shades, strict=False):
            skin = _mul(self.skin, sh)
            pen.limb(pts, [lw, lw * 0.72, lw * 0.55], skin)
            if not dress:
                if kind in ("trousers", "jeans"):
                    extra = 0.012 if kind == "trousers" else 0.004
                    col = _mul(c, sh)
                    pen.limb(pts, [lw + extra + 0.006, lw * 0.74 + extra, lw * 0.58 + extra], col)
                    if kind == "jeans":
                        pen.limb(_along(pts, 0.55), [lw * 0.35, lw * 0.25], _mix(col, (255, 255, 255), 0.16))
                        pen.line(pts, _mix(col, (230, 190, 120), 0.35), 0.004)
                    else:
                        pen.line(_along(pts, 0.98), _mul(col, 0.82), 0.003)
                elif kind == "shorts":
                    pen.limb(_along(pts, 0.42), [lw + 0.02, lw + 0.016], _mul(c, sh))
            ankle = pts[-1]
            self._shoe(pen, ankle[0], ankle[1] + 0.045, forward)

    def _pelvis(self, pen: _Pen, width: float, front: float = 0.0, back: float = 0.0) -> None:
        kind, c = self.a["lower_type"], self.lower
        if self.a["upper_type"] == "dress":
            return
        if kind in ("trousers", "jeans", "shorts"):
            if self.view == "side":
                pen.poly([(back, 0.44), (front, 0.44), (front + 0.005, 0.56), (back - 0.005, 0.56)], c)
            else:
                pen.poly([(-width, 0.44), (width, 0.44), (width * 1.02, 0.56), (0.0, 0.57), (-width * 1.02, 0.56)], c)
            if kind == "jeans" and self.view != "side":
                pen.line([(-width * 0.95, 0.47), (width * 0.95, 0.47)], _mul(c, 0.75), 0.004)

    def _skirt(self, pen: _Pen, top_w: tuple[float, float], bottom: float, bottom_w: tuple[float, float],
               fill: RGB, mask: bool = False) -> None:
        (t0, t1), (b0, b1) = top_w, bottom_w
        pen.poly([(t0, 0.43), (t1, 0.43), (b1, bottom), ((b0 + b1) / 2, bottom + 0.012), (b0, bottom)], fill, mask)

    def _hand_item(self, pen: _Pen, hand: tuple[float, float], item: str, outward: float) -> None:
        u, v = hand
        if item == "handbag":
            c = self.bag
            pen.line([(u - 0.02, v + 0.03), (u, v - 0.005), (u + 0.02, v + 0.03)], _mul(c, 0.7), 0.006)
            pen.poly([(u - 0.045, v + 0.03), (u + 0.045, v + 0.03), (u + 0.055, v + 0.1), (u - 0.055, v + 0.1)], c)
            pen.line([(u - 0.045, v + 0.045), (u + 0.045, v + 0.045)], _mul(c, 0.75), 0.004)
        elif item == "umbrella":
            c = self.held_rgb
            pen.line([(u, v + 0.01), (u, v - 0.03), (u + outward * 0.02, v - 0.045)], (40, 30, 25), 0.008)
            pen.poly([(u - 0.018, v + 0.02), (u + 0.018, v + 0.02), (u + 0.006, v + 0.36), (u - 0.006, v + 0.36)], c)
            pen.line([(u, v + 0.36), (u, v + 0.4)], (60, 60, 60), 0.005)
        elif item == "cup":
            lid = (240, 240, 240) if self.rng.random() < 0.5 else (60, 40, 30)
            pen.poly([(u - 0.016, v - 0.022), (u + 0.016, v - 0.022), (u + 0.012, v + 0.022), (u - 0.012, v + 0.022)],
                     (236, 232, 222) if lid[0] < 100 else (150, 100, 60))
            pen.rect(u - 0.018, v - 0.03, u + 0.018, v - 0.02, lid)
        elif item == "bottle":
            pen.rect(u - 0.012, v - 0.04, u + 0.012, v + 0.035, (170, 210, 235))
            pen.rect(u - 0.006, v - 0.052, u + 0.006, v - 0.04, (40, 90, 190))
        elif item == "phone":
            pen.rect(u - 0.014, v - 0.03, u + 0.014, v + 0.012, (20, 20, 24))
            pen.rect(u - 0.01, v - 0.026, u + 0.01, v + 0.008, (70, 90, 120))

    def _pattern(self, pen: _Pen, mask_img: Image.Image, view: str) -> None:
        """Stripes / checks / colour blocks over the upper garment (mask_img holds its silhouette)."""
        pattern = self.a["upper_pattern"]
        if pattern not in ("striped", "checked", "two-tone"):
            return
        m = np.asarray(mask_img) > 0
        if not m.any():
            return
        h, w = m.shape
        period = max(2, int(self.e["stripe"] * pen.s))
        yy = np.arange(h)[:, None] - int(pen.top)
        xx = np.arange(w)[None, :]
        if pattern == "striped":
            sel = ((yy // period) % 2 == 0) & np.ones((1, w), bool)
        elif pattern == "checked":
            p = max(3, int(period * 1.3))
            sel = ((yy // p) % 3 == 0) | ((xx // p) % 3 == 0)
        else:
            split = int(pen.top + 0.3 * pen.s)
            sel = (yy + int(pen.top) < split) & np.ones((1, w), bool)
        sel = sel & m
        pen.img.paste(Image.new("RGBA", (w, h), pen._c(self.c2)), (0, 0), Image.fromarray(sel.astype(np.uint8) * 255))

    # ---- frontal views -------------------------------------------------------------------------------------
    def _draw_frontal(self, pen: _Pen) -> None:
        a, front = self.a, self.view == "front"
        sw, ww, hw = self.sw, self.ww, self.hw
        up = a["upper_type"]
        hair_style = a["hair_style"]
        mask_img = Image.new("L", pen.img.size, 0)

        # things behind the body
        if front and hair_style in ("long", "medium"):
            bottom = 0.3 if hair_style == "long" else 0.165
            pen.ellipse(0, 0.06, 0.064, 0.058, self.hair)
            pen.rect(-0.064, 0.06, 0.064, bottom, self.hair)
        if front and a["bag"] == "backpack":
            pen.rect(-(sw + 0.012), 0.21, sw + 0.012, 0.44, _mul(self.bag, 0.8))

        # legs
        step = self.stride * 0.02
        hip_u = 0.045 * self.bw
        legs = []
        for s, lift in ((-1, step), (1, 0.0)):
            legs.append([(s * hip_u, 0.52), (s * (hip_u + self.spread * 0.4), 0.735 - lift / 2),
                         (s * (hip_u + self.spread), 0.955 - lift)])
        if self.rng.random() < 0.5:
            legs.reverse()
        self._lower_legs(pen, legs, [1.0, 1.0], 0.0)
        self._pelvis(pen, hw * 1.04)
        if up != "dress" and a["lower_type"] == "skirt":
            self._skirt(pen, (-ww * 1.1, ww * 1.1), 0.67, (-(hw * 1.35 + self.spread), hw * 1.35 + self.spread),
                        self.lower)
        if up != "dress" and a["lower_type"] == "long skirt":
            self._skirt(pen, (-ww * 1.1, ww * 1.1), 0.93, (-(hw * 1.55 + self.spread), hw * 1.55 + self.spread),
                        self.lower)

        # arms: decide poses first (the phone arm is bent up to the chest)
        held, bag = a["held"], a["bag"]
        held_s = self.side_sign(self.e["held_side"])
        bag_s = self.side_sign(self.e["bag_side"])
        arms: dict[float, list[tuple[float, float]]] = {}
        for s in (-1.0, 1.0):
            shoulder = (s * (sw - 0.018), 0.195)
            angle = self.arm_out + 0.06 * self.swing * s
            if held == "phone" and s == held_s:
                elbow = (s * (sw + 0.015), 0.34)
                hand = (s * sw * 0.35, 0.3) if front else (s * sw * 0.6, 0.33)
                arms[s] = [shoulder, elbow, hand]
            else:
                bend = 0.05 if (bag == "handbag" and s == bag_s) else float(self.rng.uniform(-0.1, 0.15))
                arms[s] = _arm_points(shoulder, angle, bend, s)

        # torso garment
        neck_bottom = 0.175
        garment = self.c1
        pen.mask = ImageDraw.Draw(mask_img)
        if up == "tank top":
            pen.limb([(0, 0.2), (0, 0.2)], [0.02, 0.02], self.skin)
            pen.poly([(-sw + 0.005, 0.18), (sw - 0.005, 0.18), (sw - 0.012, 0.24), (ww + 0.006, 0.34),
                      (hw + 0.004, self.hem), (-hw - 0.004, self.hem), (-ww - 0.006, 0.34), (-sw + 0.012, 0.24)],
                     self.skin)
            pen.poly([(-sw + 0.035, 0.2), (sw - 0.035, 0.2), (ww + 0.01, 0.3), (ww + 0.006, 0.36),
                      (hw + 0.006, self.hem), (-hw - 0.006, self.hem), (-ww - 0.006, 0.36), (-ww - 0.01, 0.3)],
                     garment, mask=True)
            for s in (-1, 1):
                pen.line([(s * (sw - 0.045), 0.175), (s * (sw - 0.03), 0.215)], garment, 0.012)
        else:
            hem_main = min(self.hem, 0.525)
            pen.poly([(-sw + 0.03, neck_bottom), (sw - 0.03, neck_bottom), (sw, 0.2), (ww + 0.012, 0.33), (ww, 0.42),
                      (hw + 0.008, hem_main), (0, hem_main + 0.006), (-hw - 0.008, hem_main), (-ww, 0.42),
                      (-ww - 0.012, 0.33), (-sw, 0.2)], garment, mask=True)
            for s in (-1, 1):
                pen.ellipse(s * (sw - 0.025), 0.205, 0.03, 0.03, garment, mask=True)
            if up == "coat":
                self._skirt(pen, (-hw - 0.01, hw + 0.01), self.hem,
                            (-(hw * 1.3 + self.spread * 0.6), hw * 1.3 + self.spread * 0.6), garment, mask=True)
            elif up == "dress":
                self._skirt(pen, (-ww - 0.005, ww + 0.005), self.hem,
                            (-(hw * 1.5 + self.spread), hw * 1.5 + self.spread), garment, mask=True)
        # sleeves and arms (arms drawn after the torso, hanging beside it)
        sleeve_frac = {"t-shirt": 0.38, "tank top": 0.0, "dress": 0.2 if self.e["logo"] % 2 else 0.0}.get(up, 1.0)
        sleeve_col = self.c2 if self.a["upper_pattern"] == "two-tone" else garment
        hidden_phone_arm = (not front) and held == "phone"
        for s, pts in arms.items():
            arm_pts = pts if not (hidden_phone_arm and s == held_s) else _along(pts, 0.55)
            pen.limb(arm_pts, [0.05, 0.042, 0.036][: len(arm_pts)], self.skin)
            if sleeve_frac > 0:
                sl = _along(arm_pts, min(1.0, sleeve_frac + (0.0 if arm_pts is pts else 0.4)))
                pen.limb(sl, [0.064, 0.056, 0.05][: len(sl)], sleeve_col,
                         mask=self.a["upper_pattern"] != "two-tone")
                if up == "sweater" and sleeve_frac >= 1.0 and arm_pts is pts:
                    cuff = _along(pts, 0.97)[-1]
                    pen.ellipse(cuff[0], cuff[1], 0.024, 0.016, _mul(sleeve_col, 0.82))
            if arm_pts is pts:
                pen.ellipse(pts[-1][0], pts[-1][1] + 0.012, 0.02, 0.024, self.skin)
        pen.mask = None
        self._pattern(pen, mask_img, self.view)

        # garment details
        dark = _mul(garment, 0.72)
        if front:
            if up == "t-shirt" or up == "dress":
                pen.chord(0, neck_bottom - 0.004, 0.032, 0.022, 0, 180, self.skin)
            elif up == "shirt":
                pen.poly([(-0.035, 0.17), (0, 0.2), (-0.012, 0.215), (-0.04, 0.18)], _mix(garment, (255,) * 3, 0.2))
                pen.poly([(0.035, 0.17), (0, 0.2), (0.012, 0.215), (0.04, 0.18)], _mix(garment, (255,) * 3, 0.2))
                for i in range(5):
                    pen.ellipse(0, 0.23 + i * 0.06, 0.005, 0.005, dark)
            elif up == "sweater":
                pen.chord(0, neck_bottom - 0.004, 0.034, 0.024, 0, 180, dark)
                pen.rect(-hw - 0.006, self.hem - 0.03, hw + 0.006, self.hem, dark)
            elif up == "hoodie":
                pen.ellipse(0, 0.175, 0.06, 0.025, dark)
                for s in (-1, 1):
                    pen.line([(s * 0.018, 0.185), (s * 0.02, 0.27)], (230, 230, 230), 0.004)
                pen.poly([(-0.06, 0.4), (0.06, 0.4), (0.075, 0.49), (-0.075, 0.49)], _mul(garment, 0.85))
            elif up in ("jacket", "coat"):
                bottom = 0.5 if up == "jacket" else 0.45
                pen.poly([(-0.03, 0.175), (0.03, 0.175), (0.022, bottom), (-0.022, bottom)], self.c2)
                pen.line([(-0.024, 0.2), (-0.024, self.hem - 0.005)], dark, 0.006)
                pen.line([(0.024, 0.2), (0.024, self.hem - 0.005)], dark, 0.006)
                pen.poly([(-0.045, 0.17), (-0.012, 0.2), (-0.03, 0.28)], dark)
                pen.poly([(0.045, 0.17), (0.012, 0.2), (0.03, 0.28)], dark)
                if up == "coat":
                    for i in range(3):
                        pen.ellipse(-0.04, 0.32 + i * 0.08, 0.006, 0.006, dark)
                        pen.ellipse(0.04, 0.32 + i * 0.08, 0.006, 0.006, dark)
                    pen.rect(-hw - 0.01, 0.44, hw + 0.01, 0.46, dark)
            if a["upper_pattern"] == "logo":
                self._logo(pen, 0.0, 0.28)
        else:
            if up == "hoodie":
                pen.poly([(-0.07, 0.17), (0.07, 0.17), (0.05, 0.27), (0, 0.295), (-0.05, 0.27)], dark)
            elif up in ("shirt", "jacket", "coat"):
                pen.line([(-sw + 0.02, 0.24), (sw - 0.02, 0.24)], dark, 0.004)
                if up == "coat":
                    pen.line([(0, 0.5), (0, self.hem)], dark, 0.005)
            elif up == "sweater":
                pen.rect(-hw - 0.006, self.hem - 0.03, hw + 0.006, self.hem, dark)

        # neck and head
        pen.rect(-0.022, 0.11, 0.022, 0.18 if up not in ("hoodie", "coat", "jacket") else 0.172, self.skin)
        self._head_frontal(pen, front)
        if not front and a["bag"] == "backpack":
            c = self.bag
            pen.poly([(-(sw - 0.015), 0.22), (sw - 0.015, 0.22), (sw - 0.005, 0.47), (-(sw - 0.005), 0.47)], c)
            pen.ellipse(0, 0.22, sw - 0.015, 0.03, c)
            pen.rect(-0.055, 0.35, 0.055, 0.45, _mul(c, 0.78))
            pen.line([(-0.055, 0.35), (0.055, 0.35)], _mul(c, 0.55), 0.004)

        # straps and bags over the body
        if front and a["bag"] == "backpack":
            for s in (-1, 1):
                pen.limb([(s * (sw - 0.045), 0.175), (s * (sw - 0.035), 0.3), (s * (sw - 0.03), 0.42)],
                         [0.022, 0.02, 0.018], self.bag)
        if a["bag"] == "shoulder bag":
            s = bag_s
            pen.line([(-s * (sw - 0.04), 0.175), (s * (hw + 0.02), 0.49)], _mul(self.bag, 0.75), 0.012)
            pen.poly([(s * (hw - 0.01), 0.47), (s * (hw + 0.09), 0.47), (s * (hw + 0.095), 0.585),
                      (s * (hw - 0.015), 0.585)], self.bag)
            pen.rect(s * (hw - 0.01), 0.47, s * (hw + 0.09), 0.505, _mul(self.bag, 0.8))
        for s, pts in arms.items():
            hand = (pts[-1][0], pts[-1][1] + 0.012)
            if a["bag"] == "handbag" and s == bag_s:
                self._hand_item(pen, hand, "handbag", s)
            if held != "none" and s == held_s and not (held == "phone" and not front):
                self._hand_item(pen, hand, held, s)
                pen.ellipse(hand[0], hand[1], 0.018, 0.02, self.skin)

    def _logo(self, pen: _Pen, u: float, v: float) -> None:
        kind, c = self.e["logo"], self.c2
        if kind == 0:
            pen.ellipse(u, v, 0.032, 0.032, c)
        elif kind == 1:
            pts = []
            for i in range(10):
                r = 0.038 if i % 2 == 0 else 0.016
                ang = math.pi * i / 5 - math.pi / 2
                pts.append((u + r * math.cos(ang), v + r * math.sin(ang)))
            pen.poly(pts, c)
        elif kind == 2:
            pen.rect(u - 0.045, v - 0.02, u + 0.045, v - 0.004, c)
            pen.rect(u - 0.03, v + 0.006, u + 0.03, v + 0.02, c)
        else:
            pen.poly([(u, v - 0.035), (u + 0.038, v + 0.028), (u - 0.038, v + 0.028)], c)

    def _head_frontal(self, pen: _Pen, front: bool) -> None:
        a = self.a
        style = a["hair_style"]
        hc, skin = self.hair, self.skin
        hr = 0.047 if self.female else 0.05
        if front:
            if style != "bald":
                pen.ellipse(0, 0.058, hr + 0.007, 0.062, hc)
                if style == "bun":
                    pen.ellipse(0, 0.0, 0.026, 0.022, hc)
            pen.ellipse(-hr, 0.075, 0.01, 0.016, _mul(skin, 0.92))
            pen.ellipse(hr, 0.075, 0.01, 0.016, _mul(skin, 0.92))
            pen.ellipse(0, 0.076, hr - 0.002, 0.056, skin)
            if style in ("short", "medium", "long", "ponytail", "bun"):
                pen.chord(0, 0.058, hr + 0.004, 0.052, 180, 360, hc)
            if style in ("medium", "long"):
                for s in (-1, 1):
                    pen.rect(s * (hr - 0.008), 0.06, s * (hr + 0.008), 0.13 if style == "medium" else 0.28, hc)
            eye = (40, 30, 30)
            if a["face_accessory"] != "sunglasses":
                pen.ellipse(-0.018, 0.074, 0.006, 0.004, eye)
                pen.ellipse(0.018, 0.074, 0.006, 0.004, eye)
            pen.line([(-0.012, 0.106), (0.012, 0.106)], _mul(skin, 0.65), 0.004)
            pen.line([(0, 0.08), (0.003, 0.093)], _mul(skin, 0.8), 0.003)
            acc = a["face_accessory"]
            if acc == "glasses":
                for s in (-1, 1):
                    pen.ellipse(s * 0.019, 0.074, 0.014, 0.011, None, outline=(25, 25, 25), width=0.004)
                pen.line([(-0.006, 0.073), (0.006, 0.073)], (25, 25, 25), 0.003)
            elif acc == "sunglasses":
                for s in (-1, 1):
                    pen.ellipse(s * 0.019, 0.075, 0.016, 0.012, (15, 15, 18))
                pen.line([(-0.008, 0.073), (0.008, 0.073)], (15, 15, 18), 0.004)
            elif acc == "face mask":
                m = self.e["mask_rgb"]
                pen.poly([(-0.04, 0.085), (0.04, 0.085), (0.034, 0.118), (0, 0.126), (-0.034, 0.118)], m)
                for s in (-1, 1):
                    pen.line([(s * 0.04, 0.088), (s * hr, 0.078)], _mul(m, 0.85), 0.003)
        else:
            if style == "bald":
                pen.ellipse(0, 0.068, hr, 0.066, skin)
            else:
                pen.ellipse(-hr, 0.078, 0.01, 0.016, _mul(skin, 0.92))
                pen.ellipse(hr, 0.078, 0.01, 0.016, _mul(skin, 0.92))
                pen.ellipse(0, 0.066, hr + 0.004, 0.064, hc)
                if style == "medium":
                    pen.rect(-hr - 0.006, 0.06, hr + 0.006, 0.16, hc)
                elif style == "long":
                    pen.rect(-hr - 0.01, 0.06, hr + 0.01, 0.3, hc)
                    pen.ellipse(0, 0.3, hr + 0.01, 0.02, hc)
                elif style == "ponytail":
                    pen.limb([(0, 0.08), (0.004, 0.17), (0, 0.24)], [0.03, 0.026, 0.012], _mul(hc, 0.92))
                elif style == "bun":
                    pen.ellipse(0, 0.03, 0.027, 0.024, _mul(hc, 0.92))
            if a["face_accessory"] == "face mask":
                pen.line([(-hr, 0.09), (hr, 0.09)], self.e["mask_rgb"], 0.004)
        self._hat(pen, 0.0, hr)

    def _hat(self, pen: _Pen, u: float, hr: float) -> None:
        hat, c = self.a["hat"], self.hat
        side = self.view == "side"
        if hat == "cap":
            pen.chord(u, 0.05, hr + 0.008, 0.046, 180, 360, c)
            if side:
                pen.poly([(u + 0.02, 0.045), (u + hr + 0.05, 0.05), (u + hr + 0.045, 0.058), (u + 0.02, 0.056)],
                         _mul(c, 0.8))
            elif self.view == "front":
                pen.ellipse(u, 0.05, hr + 0.004, 0.012, _mul(c, 0.8))
            else:
                pen.rect(u - 0.014, 0.04, u + 0.014, 0.05, _mul(self.skin, 0.9))
        elif hat == "beanie":
            pen.chord(u, 0.058, hr + 0.01, 0.058, 180, 360, c)
            pen.rect(u - hr - 0.01, 0.045, u + hr + 0.01, 0.064, _mul(c, 0.82))
        elif hat == "sun hat":
            pen.chord(u, 0.045, hr + 0.006, 0.044, 180, 360, c)
            pen.ellipse(u, 0.045, hr + 0.055, 0.016 if not side else 0.01, _mul(c, 0.9))
            pen.rect(u - hr - 0.004, 0.03, u + hr + 0.004, 0.04, _mul(c, 0.65))

    # ---- side view (drawn facing +u; the caller mirrors for facing left) -----------------------------------
    def _draw_side(self, pen: _Pen) -> None:
        a = self.a
        up = a["upper_type"]
        chest = 0.07 * self.bw
        back = -0.068 * self.bw
        belly = 0.012 * (self.bw - 1.0) * 5
        near_side = self.facing  # the body side that faces the camera
        bag_near = self.e["bag_side"] == near_side
        held_near = self.e["held_side"] == near_side
        held, bag = a["held"], a["bag"]

        # far arm and far-hand items behind the body
        stride = 0.12 + 0.3 * self.stride
        swing = 0.15 + 0.35 * abs(self.swing)
        far_arm = _arm_points((0.0, 0.195), -swing, -0.1, 1.0)
        near_arm = _arm_points((0.0, 0.195), swing, float(self.rng.uniform(0.05, 0.5)), 1.0)
        if held == "phone" and held_near:
            near_arm = [(0.0, 0.195), (0.03, 0.34), (0.11, 0.29)]
        far_shade = 0.78
        sleeve_frac = {"t-shirt": 0.38, "tank top": 0.0, "dress": 0.2 if self.e["logo"] % 2 else 0.0}.get(up, 1.0)
        sleeve_col = self.c2 if a["upper_pattern"] == "two-tone" else self.c1
        if a["hair_style"] == "long":
            pen.rect(-0.055, 0.06, 0.0, 0.3, self.hair)
        pen.limb(far_arm, [0.046, 0.04, 0.034], _mul(self.skin, far_shade))
        if sleeve_frac > 0:
            pen.limb(_along(far_arm, sleeve_frac), [0.06, 0.052, 0.046], _mul(sleeve_col, far_shade))
        fh = (far_arm[-1][0], far_arm[-1][1] + 0.012)
        if held == "umbrella" and not held_near:
            self._hand_item(pen, fh, "umbrella", 1.0)
        if bag == "backpack":
            pen.poly([(back - 0.075, 0.22), (back + 0.01, 0.2), (back + 0.01, 0.47), (back - 0.08, 0.46)], self.bag)
            pen.rect(back - 0.1, 0.34, back - 0.07, 0.44, _mul(self.bag, 0.8))

        # legs: far leg first
        hip = (0.0, 0.52)
        legs = []
        for s in (-1.0, 1.0):
            ang = s * stride
            knee = (hip[0] + 0.215 * math.sin(ang) + (0.03 if s < 0 else 0.0), hip[1] + 0.215 * math.cos(ang))
            ankle = (knee[0] + 0.22 * math.sin(ang * (1.5 if s < 0 else 0.8)), knee[1] + 0.22 * math.cos(ang))
            legs.append([hip, knee, ankle])
        self._lower_legs(pen, legs, [far_shade, 1.0], 1.0)
        self._pelvis(pen, 0.0, front=chest - 0.005 + belly, back=back + 0.005)
        low_reach = max(p[-1][0] for p in legs)
        low_back = min(p[-1][0] for p in legs)
        if up != "dress" and a["lower_type"] in ("skirt", "long skirt"):
            bottom = 0.67 if a["lower_type"] == "skirt" else 0.93
            f = 0.45 if bottom < 0.7 else 1.0
            self._skirt(pen, (back, chest + belly), bottom, (back - 0.03 + low_back * f * 0.6,
                                                            chest + 0.02 + low_reach * f * 0.6), self.lower)

        # torso
        mask_img = Image.new("L", pen.img.size, 0)
        pen.mask = ImageDraw.Draw(mask_img)
        g = self.c1
        top_back = back + 0.012
        if up == "tank top":
            pen.poly([(top_back, 0.17), (chest - 0.015, 0.17), (chest, 0.25), (chest + belly, 0.42), (chest, 0.5),
                      (back, 0.5), (back + 0.004, 0.3)], self.skin)
            pen.poly([(top_back + 0.01, 0.2), (chest - 0.012, 0.2), (chest, 0.26), (chest + belly + 0.004, 0.42),
                      (chest + 0.004, self.hem), (back - 0.004, self.hem), (back + 0.004, 0.3)], g, mask=True)
        else:
            hem_main = min(self.hem, 0.525)
            pen.poly([(top_back, 0.17), (chest - 0.02, 0.17), (chest + 0.004, 0.24), (chest + belly + 0.006, 0.42),
                      (chest + 0.006, hem_main), (back - 0.006, hem_main), (back - 0.002, 0.3)], g, mask=True)
            if up in ("coat", "dress"):
                w_f = chest + 0.02 + low_reach * 0.35
                w_b = back - 0.02 + low_back * 0.35
                self._skirt(pen, (back - 0.004, chest + belly + 0.004), self.hem, (w_b, w_f), g, mask=True)
        if sleeve_frac > 0:
            pen.limb(_along(near_arm, sleeve_frac), [0.064, 0.056, 0.05], sleeve_col,
                     mask=a["upper_pattern"] != "two-tone")
        pen.mask = None
        # near arm skin under/over sleeve: draw skin then redraw sleeve on top
        pen.limb(near_arm, [0.05, 0.042, 0.036], self.skin)
        if sleeve_frac > 0:
            pen.limb(_along(near_arm, sleeve_frac), [0.064, 0.056, 0.05], sleeve_col)
        self._pattern(pen, mask_img, "side")
        dark = _mul(g, 0.72)
        if up == "hoodie":
            pen.poly([(back - 0.01, 0.17), (back + 0.045, 0.16), (back + 0.03, 0.27), (back - 0.005, 0.28)], dark)
        elif up in ("jacket", "coat"):
            pen.line([(chest - 0.004, 0.2), (chest + belly, 0.42), (chest, self.hem - 0.01)], dark, 0.005)
        elif up == "sweater":
            pen.rect(back - 0.006, self.hem - 0.03, chest + 0.006, self.hem, dark)

        # straps / bags on the near side
        if bag == "backpack":
            pen.limb([(back + 0.02, 0.19), (chest - 0.02, 0.21), (chest - 0.02, 0.3), (back + 0.03, 0.42)],
                     [0.018, 0.018, 0.016, 0.016], _mul(self.bag, 0.85))
        if bag == "shoulder bag" and bag_near:
            pen.line([(-0.01, 0.175), (0.0, 0.48)], _mul(self.bag, 0.75), 0.012)
            pen.rect(-0.06, 0.47, 0.05, 0.58, self.bag)
            pen.rect(-0.06, 0.47, 0.05, 0.5, _mul(self.bag, 0.8))

        # head
        pen.rect(-0.018, 0.1, 0.026, 0.18, self.skin)
        self._head_side(pen)

        # near hand and its items
        nh = (near_arm[-1][0], near_arm[-1][1] + 0.012)
        if bag == "handbag" and bag_near:
            self._hand_item(pen, nh, "handbag", 1.0)
        if held != "none" and held_near:
            self._hand_item(pen, nh, held, 1.0)
        pen.ellipse(nh[0], nh[1], 0.019, 0.021, self.skin)

    def _head_side(self, pen: _Pen) -> None:
        a = self.a
        style, hc, skin = a["hair_style"], self.hair, self.skin
        hr = 0.047 if self.female else 0.05
        hu = 0.006
        pen.ellipse(hu, 0.068, hr, 0.064, skin)
        pen.poly([(hu + hr - 0.006, 0.07), (hu + hr + 0.012, 0.086), (hu + hr - 0.002, 0.094)], skin)
        if style != "bald":
            pen.chord(hu, 0.066, hr + 0.004, 0.066, 170, 330, hc)
            pen.poly([(hu - hr - 0.004, 0.07), (hu - 0.01, 0.04), (hu + 0.005, 0.125), (hu - hr + 0.01, 0.125)]
                     if style != "short" else [(hu - hr - 0.003, 0.07), (hu - 0.01, 0.04), (hu - 0.005, 0.1),
                                                (hu - hr + 0.01, 0.11)], hc)
            if style == "medium":
                pen.rect(hu - hr - 0.004, 0.07, hu - 0.005, 0.16, hc)
            elif style == "long":
                pen.rect(hu - hr - 0.006, 0.07, hu - 0.004, 0.3, hc)
            elif style == "ponytail":
                pen.limb([(hu - hr, 0.06), (hu - hr - 0.025, 0.12), (hu - hr - 0.02, 0.22)], [0.026, 0.022, 0.01],
                         _mul(hc, 0.92))
            elif style == "bun":
                pen.ellipse(hu - hr + 0.004, 0.035, 0.026, 0.024, _mul(hc, 0.92))
        pen.ellipse(hu - 0.004, 0.076, 0.009, 0.015, _mul(skin, 0.9))
        acc = a["face_accessory"]
        eye = (hu + hr - 0.016, 0.072)
        if acc != "sunglasses":
            pen.ellipse(eye[0], eye[1], 0.004, 0.004, (40, 30, 30))
        if acc == "glasses":
            pen.ellipse(eye[0] + 0.004, eye[1], 0.01, 0.01, None, outline=(25, 25, 25), width=0.004)
            pen.line([(eye[0] - 0.006, eye[1]), (hu - 0.004, 0.074)], (25, 25, 25), 0.003)
        elif acc == "sunglasses":
            pen.ellipse(eye[0] + 0.004, eye[1], 0.012, 0.011, (15, 15, 18))
            pen.line([(eye[0] - 0.006, eye[1]), (hu - 0.004, 0.074)], (15, 15, 18), 0.004)
        elif acc == "face mask":
            m = self.e["mask_rgb"]
            pen.poly([(hu + 0.01, 0.085), (hu + hr + 0.012, 0.088), (hu + hr + 0.006, 0.118), (hu + 0.012, 0.122)], m)
            pen.line([(hu + 0.01, 0.088), (hu - 0.004, 0.076)], _mul(m, 0.85), 0.003)
        self._hat(pen, hu, hr)


def render_person(attrs: dict[str, str], extras: dict[str, Any], view: str, facing: str, height_px: float,
                  rng: np.random.Generator, supersample: int = 2) -> Image.Image:
    """One person on a transparent RGBA layer; the body axis is the layer's centre column, the soles its bottom."""
    s = height_px * supersample
    w, h = int(0.7 * s) + 2, int(1.07 * s) + 2
    layer = Image.new("RGBA", (w, h), (0, 0, 0, 0))
    pen = _Pen(layer, w / 2, 0.05 * s, s)
    pen.set_tilt(float(rng.uniform(-4.0, 4.0)))
    person = _Person(attrs, extras, view, facing, rng)
    person.draw(pen)
    if view == "side" and facing == "left":
        layer = layer.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if supersample > 1:
        layer = layer.reduce(supersample)
    # soft shading: light from one side, darker toward the silhouette edges and the feet
    w, h = layer.size
    sc = s / supersample
    xs = (np.arange(w, dtype=np.float32) - w / 2 - float(rng.uniform(-0.05, 0.05)) * sc) / (0.16 * sc)
    prof = np.clip(1.06 - 0.22 * xs * xs, 0.74, 1.08)
    vert = 1.03 - 0.1 * np.arange(h, dtype=np.float32) / h
    arr = np.asarray(layer)
    rgb = arr[..., :3] * (vert[:, None] * prof[None, :])[..., None]
    out = np.empty_like(arr)
    out[..., :3] = np.minimum(rgb, 255.0)
    out[..., 3] = arr[..., 3]
    return Image.fromarray(out, "RGBA")


# ---- scenes -------------------------------------------------------------------------------------------------


def _rand_rgb(rng: np.random.Generator, lo: int = 30, hi: int = 230) -> RGB:
    v = rng.integers(lo, hi, 3)
    return (int(v[0]), int(v[1]), int(v[2]))


def _jit(rgb: Sequence[int], rng: np.random.Generator, amount: int = 18) -> RGB:
    v = np.clip(np.array(rgb[:3]) + rng.integers(-amount, amount + 1, 3), 0, 255)
    return (int(v[0]), int(v[1]), int(v[2]))


def _background(rng: np.random.Generator, cam: dict[str, Any], h: int, w: int) -> tuple[Image.Image, int]:
    img = Image.new("RGB", (w, h), _jit(cam["walls"][0], rng))
    d = ImageDraw.Draw(img)
    hy = int(h * (cam["horizon"] + rng.uniform(-0.07, 0.07)))
    x = -float(rng.uniform(0, 0.5)) * w
    while x < w:
        pw = float(rng.uniform(0.3, 1.3)) * w
        col = _jit(cam["walls"][int(rng.integers(len(cam["walls"])))], rng, 25)
        d.rectangle([x, 0, x + pw, hy], fill=col)
        kind = int(rng.integers(5))
        if kind == 0:  # windows
            ww, wh = float(rng.uniform(0.12, 0.3)) * w, float(rng.uniform(0.06, 0.14)) * h
            gx, gy = ww * float(rng.uniform(1.3, 2.0)), wh * float(rng.uniform(1.3, 1.8))
            wc = _jit((60, 75, 95), rng, 30)
            yy = float(rng.uniform(0.02, 0.1)) * h
            while yy + wh < hy - 4:
                xx = x + float(rng.uniform(0.05, 0.3)) * ww
                while xx + ww < x + pw:
                    d.rectangle([xx, yy, xx + ww, yy + wh], fill=wc, outline=_mul(col, 0.7))
                    xx += gx
                yy += gy
        elif kind == 1:  # shop front with goods behind glass
            top = hy - float(rng.uniform(0.15, 0.35)) * h
            d.rectangle([x + 2, top, x + pw - 2, hy], fill=_jit((110, 125, 135), rng, 30))
            for _ in range(int(rng.integers(3, 9))):
                bx, by = x + float(rng.uniform(0, pw)), top + float(rng.uniform(0, hy - top))
                d.rectangle([bx, by, bx + float(rng.uniform(3, 0.25 * w)), by + float(rng.uniform(3, 0.1 * h))],
                            fill=_rand_rgb(rng))
            d.rectangle([x, top - 0.05 * h, x + pw, top], fill=_rand_rgb(rng))
        elif kind == 2:  # siding
            step = float(rng.uniform(0.015, 0.04)) * h
            yy = 0.0
            while yy < hy:
                d.line([(x, yy), (x + pw, yy)], fill=_mul(col, 0.82), width=1)
                yy += step
        elif kind == 3:  # bricks
            bh = max(2.0, float(rng.uniform(0.015, 0.03)) * h)
            bwid = bh * 2.5
            yy, row = 0.0, 0
            while yy < hy:
                d.line([(x, yy), (x + pw, yy)], fill=_mul(col, 0.7), width=1)
                xx = x + (bwid / 2 if row % 2 else 0)
                while xx < x + pw:
                    d.line([(xx, yy), (xx, min(hy, yy + bh))], fill=_mul(col, 0.7), width=1)
                    xx += bwid
                yy += bh
                row += 1
        else:  # tree or sky patch
            if rng.random() < 0.5:
                d.rectangle([x, 0, x + pw, hy * float(rng.uniform(0.2, 0.6))], fill=_jit((170, 195, 220), rng, 25))
            tx = x + float(rng.uniform(0.2, 0.8)) * pw
            d.rectangle([tx - 0.03 * w, hy * 0.4, tx + 0.03 * w, hy], fill=_jit((80, 60, 45), rng))
            for _ in range(4):
                r = float(rng.uniform(0.12, 0.3)) * w
                cy = hy * float(rng.uniform(0.1, 0.45))
                cx = tx + float(rng.uniform(-0.15, 0.15)) * w
                d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=_jit((60, 110, 55), rng, 25))
        x += pw
    # ground
    gcol = _jit(_GROUNDS[cam["ground"]], rng, 14)
    d.rectangle([0, hy, w, h], fill=gcol)
    d.rectangle([0, hy, w, hy + max(2, int(0.012 * h))], fill=_mix(gcol, (230, 230, 225), 0.4))
    if cam["ground"] in ("tiles", "pavers", "indoor", "concrete"):
        n = int(rng.integers(4, 9))
        line = _mul(gcol, 0.78)
        for i in range(1, n + 1):
            yy = hy + (h - hy) * (i / n) ** 1.5
            d.line([(0, yy), (w, yy)], fill=line, width=1)
        vx = float(rng.uniform(-0.5, 1.5)) * w
        for i in range(-6, 7):
            d.line([(vx + i * 0.05 * w, hy), (vx + i * 0.45 * w, h)], fill=line, width=1)
    elif cam["ground"] == "asphalt" and rng.random() < 0.5:
        yy = hy + (h - hy) * float(rng.uniform(0.3, 0.8))
        d.rectangle([0, yy, w, yy + 0.01 * h], fill=(225, 220, 200))
    # clutter
    for _ in range(int(rng.integers(2, 8))):
        kind = int(rng.integers(5))
        cx = float(rng.uniform(-0.1, 1.1)) * w
        base = hy + float(rng.uniform(0, 0.12)) * h
        c = _rand_rgb(rng)
        if kind == 0:  # sign on a post
            d.rectangle([cx - 1, base - 0.3 * h, cx + 1, base], fill=(90, 90, 95))
            sw, sh = float(rng.uniform(0.1, 0.3)) * w, float(rng.uniform(0.04, 0.1)) * h
            d.rectangle([cx - sw / 2, base - 0.3 * h, cx + sw / 2, base - 0.3 * h + sh], fill=c)
        elif kind == 1:  # planter / box
            bw_, bh_ = float(rng.uniform(0.1, 0.4)) * w, float(rng.uniform(0.03, 0.1)) * h
            d.rectangle([cx, base - bh_, cx + bw_, base], fill=c, outline=_mul(c, 0.7))
        elif kind == 2:  # lamp post
            d.rectangle([cx - 1.5, 0, cx + 1.5, base], fill=(50, 55, 60))
        elif kind == 3:  # random blob
            r = float(rng.uniform(0.03, 0.15)) * w
            cy = float(rng.uniform(0.05, 0.95)) * h
            d.ellipse([cx - r, cy - r * 0.6, cx + r, cy + r * 0.6], fill=c)
        else:  # bicycle-ish
            r = float(rng.uniform(0.06, 0.12)) * w
            for dx in (-r * 1.2, r * 1.2):
                d.ellipse([cx + dx - r, base - 2 * r, cx + dx + r, base], outline=(30, 30, 30), width=1)
            d.line([(cx - r * 1.2, base - r), (cx, base - 1.8 * r), (cx + r * 1.2, base - r)], fill=c, width=2)
    # people far away
    for _ in range(int(rng.integers(0, 3))):
        attrs, extras = sample_identity(rng)
        ph = float(rng.uniform(0.25, 0.55)) * h
        view = VIEWS[int(rng.integers(3))]
        layer = render_person(attrs, extras, view, "left" if rng.random() < 0.5 else "right", ph, rng, 1)
        fy = hy + float(rng.uniform(0.0, 0.15)) * h
        fx = float(rng.uniform(-0.1, 1.1)) * w
        img.paste(layer, (int(fx - layer.width / 2), int(fy - layer.height * 1.05 / 1.07)), layer)
    return img, hy


def _occlude(img: Image.Image, kind: str, rng: np.random.Generator, person_x: float, h: int, w: int) -> None:
    d = ImageDraw.Draw(img)
    if kind == "pole":
        pw = float(rng.uniform(0.05, 0.12)) * w
        px = person_x + float(rng.uniform(-0.3, 0.3)) * w
        c = _jit([(110, 112, 118), (40, 60, 45), (30, 30, 34), (170, 150, 60)][int(rng.integers(4))], rng)
        d.rectangle([px - pw / 2, -1, px + pw / 2, h], fill=c)
        d.rectangle([px - pw / 6, -1, px, h], fill=_mix(c, (255, 255, 255), 0.25))
    elif kind == "car":
        top = float(rng.uniform(0.64, 0.8)) * h
        c = _jit(_RGB[COLOURS[int(rng.integers(len(COLOURS)))]], rng)
        d.rounded_rectangle([-0.3 * w, top, 1.3 * w, h + 0.1 * h], radius=int(0.08 * h), fill=c)
        d.rectangle([-0.3 * w, top + 0.02 * h, 1.3 * w, top + 0.07 * h], fill=_mul(c, 0.6))
        d.line([(-0.3 * w, top + 0.12 * h), (1.3 * w, top + 0.11 * h)], fill=_mul(c, 0.75), width=2)
        wx = float(rng.uniform(0, 1)) * w
        d.ellipse([wx - 0.12 * h, h - 0.06 * h, wx + 0.12 * h, h + 0.18 * h], fill=(25, 25, 25))
    elif kind == "bin":
        bw_ = float(rng.uniform(0.25, 0.45)) * w
        bx = person_x + (1 if rng.random() < 0.5 else -1) * float(rng.uniform(0.1, 0.3)) * w
        top = float(rng.uniform(0.72, 0.84)) * h
        c = _jit([(50, 90, 60), (60, 60, 64), (40, 70, 140), (150, 110, 60)][int(rng.integers(4))], rng)
        d.rectangle([bx - bw_ / 2, top, bx + bw_ / 2, h], fill=c)
        d.rectangle([bx - bw_ / 2 - 2, top - 0.02 * h, bx + bw_ / 2 + 2, top + 0.01 * h], fill=_mul(c, 0.7))
    elif kind == "bush":
        top = float(rng.uniform(0.72, 0.84)) * h
        for _ in range(9):
            r = float(rng.uniform(0.2, 0.45)) * w
            cx = float(rng.uniform(-0.1, 1.1)) * w
            cy = top + float(rng.uniform(0.0, 0.12)) * h + r * 0.3
            d.ellipse([cx - r, cy - r * 0.6, cx + r, cy + r * 0.8], fill=_jit((55, 105, 50), rng, 25))
        d.rectangle([-1, top + 0.12 * h, w, h], fill=_jit((55, 100, 48), rng, 15))


def _camera(img: Image.Image, cam: dict[str, Any], rng: np.random.Generator) -> Image.Image:
    """Camera look: resolution loss, blur, uneven light, white balance, saturation, tone curve, sensor noise."""
    h, w = img.height, img.width
    blur = (cam["blur"] + float(rng.uniform(0, 0.4))) * h / 384
    if cam["lowres"] < 0.8 or rng.random() < 0.2:
        f = min(1.0, cam["lowres"] * float(rng.uniform(0.85, 1.15)))
        small = img.resize((max(8, int(w * f)), max(8, int(h * f))), Image.Resampling.BILINEAR)
        img = small.resize((w, h), Image.Resampling.BILINEAR)
    if blur > 0.15:
        img = img.filter(ImageFilter.GaussianBlur(blur))
    img = ImageEnhance.Color(img).enhance(float(cam["saturation"]))
    # uneven illumination: a smooth random field in [0.72, 1.0], compensated by the tone curve below
    field = Image.fromarray(rng.integers(184, 256, (4, 3)).astype(np.uint8), "L").resize(
        (w, h), Image.Resampling.BICUBIC)
    img = ImageChops.multiply(img, Image.merge("RGB", (field, field, field)))
    gains = np.array(cam["gains"], dtype=np.float64) * rng.uniform(0.95, 1.05, 3) * 1.16
    x = np.arange(256, dtype=np.float64) / 255.0
    bright = cam["brightness"] + float(rng.uniform(-0.04, 0.04))
    y = np.clip((x[None, :] * gains[:, None] - 0.5) * cam["contrast"] + 0.5 + bright, 0.0, 1.0) ** cam["gamma"]
    img = img.point(np.clip(y * 255.0 + 0.5, 0, 255).astype(np.int64).ravel().tolist())
    sigma = cam["noise"] * float(rng.uniform(0.7, 1.3)) * 255.0
    noise = rng.standard_normal((h, w, 3), dtype=np.float32) * np.float32(sigma)
    arr = np.asarray(img).astype(np.float32) + noise
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def render_image(ident: dict[str, Any], plan: dict[str, Any], cam: dict[str, Any], seed: int,
                 size: tuple[int, int]) -> Image.Image:
    """Draw one image of one identity (pure function of its arguments)."""
    h, w = size
    rng = np.random.default_rng([seed, 11, ident["id"], plan["k"]])
    img, hy = _background(rng, cam, h, w)
    ph = h * float(rng.uniform(0.72, 0.97)) * min(1.0, ident["extras"]["height"])
    layer = render_person(ident["attributes"], ident["extras"], plan["view"], plan["facing"], ph, rng)
    px = w / 2 + float(rng.uniform(-0.12, 0.12)) * w
    foot = h * float(rng.uniform(0.96, 1.02))
    img.paste(layer, (int(round(px - layer.width / 2)), int(round(foot - layer.height * 1.05 / 1.07))), layer)
    occ = plan["occluder"]
    if occ == "person":
        attrs, extras = sample_identity(rng)
        layer2 = render_person(attrs, extras, VIEWS[int(rng.integers(3))], "left" if rng.random() < 0.5 else "right",
                               h * float(rng.uniform(0.8, 1.0)), rng)
        side = 1 if rng.random() < 0.5 else -1
        ox = w / 2 + side * w * float(rng.uniform(0.5, 0.75))
        img.paste(layer2, (int(ox - layer2.width / 2), int(h * 1.03 - layer2.height * 1.05 / 1.07)), layer2)
    elif occ != "none":
        _occlude(img, occ, rng, px, h, w)
    return _camera(img, cam, rng)


def _render_job(job: tuple[str, dict[str, Any], dict[str, Any], dict[str, Any], int, tuple[int, int]]) -> int:
    path, ident, plan, cam, seed, size = job
    img = render_image(ident, plan, cam, seed, size)
    img.save(path, format="JPEG", quality=90)
    return 1


# ================================================================================================================
# Dataset
# ================================================================================================================


def _check_args(images_per_id: int, eval_images_per_id: int, captions_per_image: int, size: tuple[int, int],
                workers: int | None) -> None:
    if images_per_id < 1:
        raise UserError(f"synth: --images-per-id must be at least 1 (got {images_per_id})")
    if eval_images_per_id < 1:
        raise UserError(f"synth: --eval-images-per-id must be at least 1 (got {eval_images_per_id})")
    if captions_per_image < 1:
        raise UserError(f"synth: --captions-per-image must be at least 1 (got {captions_per_image})")
    if len(size) != 2 or size[0] < 48 or size[1] < 16:
        raise UserError(f"synth: --size must be HEIGHTxWIDTH with height >= 48 and width >= 16 (got {size})")
    if workers is not None and workers < 1:
        raise UserError(f"synth: --workers must be at least 1 (got {workers})")


def _check_counts(train_ids: int, val_ids: int, test_ids: int) -> None:
    if train_ids < 1:
        raise UserError(f"synth: --train-ids must be at least 1 (got {train_ids})")
    if test_ids < MIN_TEST_IDS:
        raise UserError(f"synth: --test-ids must be at least {MIN_TEST_IDS} (got {test_ids}): retrieval among "
                        f"fewer than 2 test identities is meaningless (with 1, any model scores R@1 100)")
    if val_ids < 0 or val_ids == 1:
        raise UserError(f"synth: --val-ids must be 0 (no val split) or at least 2 (got {val_ids}): with 1 val "
                        f"identity any model scores R@1 100, so validation could not pick a checkpoint")


def resolve_counts(identities: int | None = None, train_ids: int | None = None, val_ids: int | None = None,
                   test_ids: int | None = None) -> tuple[int, int, int]:
    """``(train, val, test)`` identity counts: the explicit per-split counts, the others from ``identities``
    (80/10/10, default :data:`DEFAULT_IDENTITIES`). Raises :class:`UserError` for counts that cannot work."""
    if train_ids is None or val_ids is None or test_ids is None:
        base = split_counts(DEFAULT_IDENTITIES if identities is None else identities)
        train_ids = base[0] if train_ids is None else train_ids
        val_ids = base[1] if val_ids is None else val_ids
        test_ids = base[2] if test_ids is None else test_ids
    _check_counts(train_ids, val_ids, test_ids)
    return train_ids, val_ids, test_ids


def preset_settings(preset: str | None = None, identities: int | None = None, **flags: int | None) -> dict[str, int]:
    """The keyword arguments of :func:`generate` for ``tbps-compress synth``: the preset's values (default
    ``demo``), then ``identities`` (replacing the preset's split counts), then every flag that is not ``None``
    (``train_ids``, ``val_ids``, ``test_ids``, ``images_per_id``, ``eval_images_per_id``, ``captions_per_image``).
    Without a preset or flag value for ``eval_images_per_id``, val and test get ``images_per_id`` images.
    """
    name = "demo" if preset is None else preset
    if name not in PRESETS:
        raise UserError(f"synth: --preset must be one of {', '.join(PRESETS)} (got {preset!r})")
    unknown = sorted(set(flags) - {"train_ids", "val_ids", "test_ids", "images_per_id", "eval_images_per_id",
                                   "captions_per_image"})
    if unknown:
        raise TypeError(f"preset_settings: unknown setting(s) {', '.join(unknown)}")
    out = dict(PRESETS[name])
    if identities is not None:  # generate() splits it (and checks it together with the other arguments)
        for key in ("train_ids", "val_ids", "test_ids"):
            del out[key]
        out["identities"] = identities
    out.update({k: v for k, v in flags.items() if v is not None})
    return out


def generate(out: Path, identities: int | None = None, images_per_id: int = 4, captions_per_image: int = 2,
             size: tuple[int, int] = (384, 128), seed: int = 0, workers: int | None = None, force: bool = False,
             progress: Callable[[int, int], None] | None = None, *, train_ids: int | None = None,
             val_ids: int | None = None, test_ids: int | None = None,
             eval_images_per_id: int | None = None) -> dict[str, Any]:
    """Write a SynthPedes dataset to ``out`` (CUHK-PEDES layout) and return a summary.

    Split sizes: ``train_ids``, ``val_ids`` and ``test_ids`` identities; those not given come from ``identities``
    split 80/10/10 (default 200: 160/20/20). The test split needs at least 2 identities, val 0 or at least 2.
    ``images_per_id`` applies to train, ``eval_images_per_id`` (default: ``images_per_id``) to val and test.
    ``size`` is (height, width). The dataset is built in a temporary sibling folder and renamed into place, so
    ``out`` never holds a partial dataset. A non-empty ``out`` is replaced only with ``force=True``.
    """
    t0 = time.perf_counter()
    out = Path(out)
    size = (int(size[0]), int(size[1]))
    eval_images = images_per_id if eval_images_per_id is None else eval_images_per_id
    _check_args(images_per_id, eval_images, captions_per_image, size, workers)
    counts = resolve_counts(identities, train_ids, val_ids, test_ids)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder; choose another output path")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserError(f"{out}: folder is not empty; pass --force to replace it or choose another output path")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    n_workers = workers if workers is not None else min(2, os.cpu_count() or 1)
    per_split = {"train": (counts[0], images_per_id), "val": (counts[1], eval_images),
                 "test": (counts[2], eval_images)}
    try:
        summary = _build(tmp, per_split, captions_per_image, size, seed, n_workers, progress)
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    summary["images_per_s"] = round(summary["images"] / max(summary["seconds"], 1e-9), 1)
    logger.info("SynthPedes: wrote %d images of %d identities (train %d, val %d, test %d) to %s in %.1f s "
                "(%.1f images/s)", summary["images"], sum(counts), *counts, out, summary["seconds"],
                summary["images_per_s"])
    return summary


def _build(root: Path, per_split: dict[str, tuple[int, int]], captions_per_image: int, size: tuple[int, int],
           seed: int, workers: int, progress: Callable[[int, int], None] | None) -> dict[str, Any]:
    """``per_split``: split -> (identities, images per identity)."""
    idents = make_identities(seed, train_ids=per_split["train"][0], val_ids=per_split["val"][0],
                             test_ids=per_split["test"][0])
    cams = make_cameras(seed)
    images: list[tuple[dict[str, Any], dict[str, Any], str]] = []
    jobs = []
    for ident in idents:
        pid, split = ident["id"], ident["split"]
        (root / "imgs" / split / f"{pid:04d}").mkdir(parents=True, exist_ok=True)
        for plan in plan_images(ident, per_split[split][1], seed, len(cams)):
            rel = f"{split}/{pid:04d}/{pid:04d}_{plan['k']:02d}.jpg"  # relative to imgs/, as in CUHK-PEDES
            images.append((ident, plan, rel))
            jobs.append((str(root / "imgs" / rel), ident, plan, cams[plan["camera"]], seed, size))
    total = len(jobs)

    def annotate() -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
        entries, metas, truths = [], [], []
        for ident, plan, rel in images:
            pid = ident["id"]
            facts = visible_facts(ident["attributes"], ident["extras"], plan["view"], plan["facing"], plan["hidden"])
            caps, bts, contents = write_captions(facts, captions_per_image,
                                                 np.random.default_rng([seed, 17, pid, plan["k"]]))
            entries.append({"split": ident["split"], "captions": caps, "file_path": rel,
                            "processed_tokens": [tokenize(c) for c in caps], "id": pid, "captions_bt": bts})
            metas.append({"file_path": rel, "id": pid, "view": plan["view"], "facing": plan["facing"],
                          "camera": plan["camera"], "occluder": plan["occluder"]})
            truths.append({"file_path": rel, "id": pid, "split": ident["split"], "visible": flatten_visible(facts),
                           "stated": [flatten_stated(c) for c in contents]})
        return entries, metas, truths

    done = 0
    if workers <= 1 or total < 8:
        entries, images_meta, truths = annotate()
        for job in jobs:
            done += _render_job(job)
            if progress is not None:
                progress(done, total)
    else:
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(processes=workers) as pool:
            results = pool.imap_unordered(_render_job, jobs, chunksize=max(1, min(16, total // (workers * 8))))
            entries, images_meta, truths = annotate()  # captions are written while the workers draw
            for n in results:
                done += n
                if progress is not None:
                    progress(done, total)
    split_info: dict[str, dict[str, int]] = {}
    for split in ("train", "val", "test"):
        n_ids, per_id = per_split[split]
        recs = [e for e in entries if e["split"] == split]
        split_info[split] = {"identities": n_ids, "images_per_id": per_id, "images": len(recs),
                             "captions": sum(len(e["captions"]) for e in recs)}
    meta = {
        "format": "synthpedes", "version": FORMAT_VERSION, "seed": seed, "size": list(size),
        "images_per_id": per_split["train"][1], "eval_images_per_id": per_split["test"][1],
        "captions_per_image": captions_per_image, "file_path_root": "imgs", "splits": split_info,
        "attribute_families": ATTRIBUTE_FAMILIES,
        "identities": [{k: i[k] for k in ("id", "split", "near_copy_of", "changed", "attributes", "extras")}
                       for i in idents],
        "images": images_meta, "cameras": cams,
    }
    annotation = json.dumps(entries).encode("utf-8")
    (root / ANNOTATION_FILE).write_bytes(annotation)
    truth = {"format": TRUTH_FORMAT, "version": TRUTH_VERSION,
             "annotation_sha256": hashlib.sha256(annotation).hexdigest(),
             "families": list(TRUTH_FAMILIES), "coarse": list(COARSE_FAMILIES), "entries": truths}
    (root / TRUTH_FILE).write_text(json.dumps(truth, separators=(",", ":")), encoding="utf-8")
    (root / META_FILE).write_text(json.dumps(meta, indent=1), encoding="utf-8")
    return {"identities": len(idents), "images": total, "captions": total * captions_per_image,
            "splits": {k: {f: v[f] for f in ("identities", "images", "captions")}
                       for k, v in split_info.items() if v["identities"]}}


def _image_file(root: Path, file_path: str) -> Path:
    """``ROOT/imgs/<file_path>`` (this layout), or ``ROOT/<file_path>`` for folders whose paths start with imgs/
    (written by older versions)."""
    under = root / "imgs" / file_path
    return root / file_path if not under.is_file() and (root / file_path).is_file() else under


def save_preview(root: Path, out_png: Path, identities: int = 6) -> Path:
    """A contact sheet: the first few identities, one row each, every view with its first caption underneath."""
    root, out_png = Path(root), Path(out_png)
    ann = root / ANNOTATION_FILE
    if not ann.is_file():
        raise DataError(f"{ann}: not found; run `tbps-compress synth {root}` first or point at a SynthPedes folder")
    try:
        entries = json.loads(ann.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{ann}: not valid JSON ({exc.msg} at line {exc.lineno}); regenerate the dataset") from exc
    by_id: dict[int, list[dict[str, Any]]] = {}
    for e in entries:
        by_id.setdefault(int(e["id"]), []).append(e)
    ids = sorted(by_id)[: max(1, identities)]
    if not ids:
        raise DataError(f"{ann}: has no entries; regenerate the dataset")
    first = Image.open(_image_file(root, by_id[ids[0]][0]["file_path"]))
    iw, ih = first.width, first.height
    scale = min(1.0, 256 / ih)
    cw, chh = max(int(iw * scale), 150), int(ih * scale)
    try:
        font: ImageFont.ImageFont | ImageFont.FreeTypeFont = ImageFont.load_default(size=10)
    except TypeError:  # Pillow without FreeType sizes
        font = ImageFont.load_default()
    chars = max(16, cw // 6)
    cols = max(len(by_id[i]) for i in ids)
    text_h = 12 * 12
    sheet = Image.new("RGB", (cols * (cw + 6) + 6, len(ids) * (chh + text_h + 24) + 6), (255, 255, 255))
    d = ImageDraw.Draw(sheet)
    y = 6
    for pid in ids:
        d.text((6, y), f"id {pid} ({by_id[pid][0]['split']})", fill=(0, 0, 0), font=font)
        y += 14
        for j, e in enumerate(by_id[pid]):
            x = 6 + j * (cw + 6)
            im = Image.open(_image_file(root, e["file_path"])).convert("RGB")
            im = im.resize((int(im.width * scale), chh), Image.Resampling.BILINEAR)
            sheet.paste(im, (x + (cw - im.width) // 2, y))
            lines = textwrap.wrap(e["captions"][0], chars)[:12]
            d.multiline_text((x, y + chh + 2), "\n".join(lines), fill=(20, 20, 20), font=font, spacing=1)
        y += chh + text_h + 10
    out_png.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out_png)
    return out_png


def load_truth(root: Path) -> dict[str, Any]:
    """The ground-truth sidecar ``ROOT/synth_truth.json`` of a SynthPedes folder, checked against its annotations.

    Format (version 1)::

        {"format": "synthpedes-truth", "version": 1, "annotation_sha256": <sha256 hex of reid_raw.json's bytes>,
         "families": [... TRUTH_FAMILIES], "coarse": [... COARSE_FAMILIES],
         "entries": [{"file_path", "id", "split", "visible": {family: value or null, every family},
                      "stated": [{family: value, only the families the caption states}, one per caption]}, ...]}

    ``entries`` line up with the reid_raw.json entries (same order, file_path, id and number of captions);
    ``visible`` is :func:`~tbps_compress.data.synth_text.flatten_visible`, ``stated`` is
    :func:`~tbps_compress.data.synth_text.flatten_stated` (a caption's ``captions_bt`` paraphrase states the
    same). Raises :class:`DataError` (one line) when the file is missing, not JSON, of another format or version,
    or does not describe the current reid_raw.json.
    """
    root = Path(root)
    path, ann = root / TRUTH_FILE, root / ANNOTATION_FILE
    regen = "regenerate with `tbps-compress synth`"
    if not path.is_file():
        raise DataError(f"{path}: not found; this dataset has no ground truth (only SynthPedes folders written by "
                        f"`tbps-compress synth` have one)")
    try:
        truth = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 (byte {exc.start}); {regen}") from exc
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}); {regen}") from exc
    fmt = truth.get("format") if isinstance(truth, dict) else None
    version = truth.get("version") if isinstance(truth, dict) else None
    if fmt != TRUTH_FORMAT or version != TRUTH_VERSION:
        raise DataError(f"{path}: format {fmt!r} version {version!r}, expected {TRUTH_FORMAT!r} version "
                        f"{TRUTH_VERSION}; {regen}")
    if truth.get("families") != list(TRUTH_FAMILIES) or not isinstance(truth.get("entries"), list):
        raise DataError(f"{path}: 'families' or 'entries' is not what {TRUTH_FORMAT} version {TRUTH_VERSION} holds; "
                        f"{regen}")
    if not ann.is_file():
        raise DataError(f"{ann}: not found; the ground truth in {path.name} describes it, so {regen}")
    raw = ann.read_bytes()
    if truth.get("annotation_sha256") != hashlib.sha256(raw).hexdigest():
        raise DataError(f"{path}: does not match reid_raw.json (the annotations were changed or the sidecar belongs "
                        f"to another dataset); {regen}")
    entries = json.loads(raw.decode("utf-8"))  # the hash matched, so these are the bytes that were written
    if len(entries) != len(truth["entries"]):
        raise DataError(f"{path}: {len(truth['entries'])} entries but reid_raw.json has {len(entries)}; the "
                        f"sidecar was edited; {regen}")
    for i, (e, t) in enumerate(zip(entries, truth["entries"], strict=True)):
        if not (isinstance(t, dict) and t.get("file_path") == e.get("file_path") and t.get("id") == e.get("id")
                and isinstance(t.get("stated"), list) and len(t["stated"]) == len(e.get("captions", []))
                and isinstance(t.get("visible"), dict)):
            raise DataError(f"{path}: entry {i} does not line up with reid_raw.json entry {i} (file_path, id, "
                            f"visible or one 'stated' per caption); the sidecar was edited; {regen}")
    return truth
