"""Evaluate any artifact (PyTorch or ONNX) on a dataset split: the ``eval`` command's path, on top of the one
encoder mechanism of :mod:`tbps_compress.retrieval.encoders` (:func:`open_encoder`, :func:`evaluate`)."""

from __future__ import annotations

import logging
from pathlib import Path

from .devices import check_device
from .retrieval.encoders import Split, evaluate, load_split, open_encoder

log = logging.getLogger(__name__)

__all__ = ["embed_with_artifact", "evaluate_artifact"]


def embed_with_artifact(artifact: Path, ds, records, *, device: str = "auto", batch_size: int = 128,
                        providers: list[str] | None = None):
    """(text_emb, text_pids, image_emb, image_pids) as numpy arrays for the records, with the artifact's runtime."""
    check_device(device)
    enc = open_encoder(Path(artifact), device=device, providers=providers, batch_size=batch_size)
    emb = enc.encode_split(Split.of(ds, records))
    return emb.text, emb.text_pids, emb.image, emb.image_pids


def evaluate_artifact(artifact: Path, data: Path, *, split: str = "test", format: str | None = None,
                      device: str = "auto", batch_size: int = 128) -> dict[str, float]:
    """Text-to-image R@1/5/10, mAP and mINP of an artifact on a split. ``device`` is checked (auto, cpu, cuda,
    cuda:N) before anything is loaded."""
    check_device(device)
    _, records = load_split(data, split, format)
    return evaluate(open_encoder(Path(artifact), device=device, batch_size=batch_size), records)

