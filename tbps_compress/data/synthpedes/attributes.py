"""SynthPedes identities: the attribute families, their colours and priors, and the seeded sampling of
identities and near-copies per split."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from .captions import (
    COLOURS,
)

logger = logging.getLogger(__name__)

SPLIT_ORDER = ("test", "val", "train")  # identity numbering order
_SPLIT_CODE = {"test": 1, "val": 2, "train": 3}
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
