"""Random-weight artifacts of registered model configs, for latency: the same measured path as trained ones.

As timm's ``benchmark.py`` builds any model by name, :func:`random_artifacts` writes a PyTorch artifact with seeded
random weights for each registered config (``tbps-compress list models``) and, when asked, its ONNX export and a
dynamic int8 quantisation, so ``run_bench`` (or any timing loop) measures a shape exactly as it measures a trained
artifact of that shape. Existing folders under ``work`` are reused, so repeated measurements skip the exports.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

log = logging.getLogger(__name__)

FORMS = ("torch", "onnx", "int8")


def random_artifact(name: str, folder: Path, seed: int = 0) -> Path:
    """A PyTorch artifact of config ``name`` with ``torch.manual_seed(seed)`` weights (kept when it exists)."""
    import torch

    from ..artifacts import write_artifact
    from ..models.factory import build_model
    from ..models.io import save_model

    folder = Path(folder)
    if not folder.exists():
        torch.manual_seed(seed)
        with write_artifact(folder, stage="random-init", extra_lineage={"note": "random weights for latency",
                                                                        "seed": seed}) as tmp:
            save_model(build_model(name), tmp)
    return folder


def random_artifacts(work: Path, names: list[str], forms: tuple[str, ...] = ("torch",), seed: int = 0,
                     optimize: bool = False) -> dict[str, dict[str, Path]]:
    """``{name: {form: artifact}}`` for ``forms`` among ``torch``, ``onnx`` (export, fused when ``optimize``) and
    ``int8`` (dynamic quantisation of that export), written under ``work/NAME[-onnx|-int8]``."""
    bad = sorted(set(forms) - set(FORMS))
    if bad:
        raise ValueError(f"unknown artifact form(s) {bad}; choose from {FORMS}")
    work = Path(work)
    out: dict[str, dict[str, Path]] = {}
    for name in names:
        arts = {"torch": random_artifact(name, work / name, seed)}
        if "onnx" in forms or "int8" in forms:
            onnx = work / f"{name}-onnx"
            if not onnx.exists():
                from ..export.onnx_export import export_onnx

                t0 = time.perf_counter()
                export_onnx(arts["torch"], onnx, optimize=optimize)
                log.info("exported %s in %.0f s", name, time.perf_counter() - t0)
            arts["onnx"] = onnx
        if "int8" in forms:
            int8 = work / f"{name}-int8"
            if not int8.exists():
                from ..export.quantize import quantize_artifact

                t0 = time.perf_counter()
                quantize_artifact(arts["onnx"], int8, mode="dynamic")
                log.info("quantised %s in %.0f s", name, time.perf_counter() - t0)
            arts["int8"] = int8
        out[name] = {f: p for f, p in arts.items() if f in forms}
    return out
