"""SynthPedes cameras (ground, light, colour cast) and the per-image plans (view, pose, camera, occluder)."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from .attributes import VIEWS, _choice

logger = logging.getLogger(__name__)

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
