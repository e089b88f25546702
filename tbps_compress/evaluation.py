"""Evaluate any artifact (PyTorch or ONNX) on a dataset split: the shared path of ``eval``, ``bench`` and stages."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .devices import check_device
from .errors import UserError
from .io_utils import open_image_rgb

log = logging.getLogger(__name__)


def _records(data: Path, split: str, format: str | None):
    from .data.readers import load_dataset

    ds = load_dataset(Path(data), format)
    recs = ds.split(split)
    if not recs:
        raise UserError(f"{ds.annotation}: no records in split '{split}' (splits present: {', '.join(ds.splits())})")
    return ds, recs


def encode_image_files(enc: Any, paths: Sequence[Path], batch_size: int = 128) -> np.ndarray:
    """Embed image files with an :class:`~tbps_compress.runtime.OnnxEncoder`, decoding them batch by batch with
    :func:`~tbps_compress.io_utils.open_image_rgb` (a file that does not decode is one ``DataError`` line)."""
    if not paths:
        return enc.encode_images([], batch_size=batch_size)
    out = [enc.encode_images([open_image_rgb(p) for p in paths[s:s + batch_size]], batch_size=batch_size)
           for s in range(0, len(paths), batch_size)]
    return np.concatenate(out, axis=0)


def embed_with_artifact(artifact: Path, ds, records, *, device: str = "auto", batch_size: int = 128,
                        providers: list[str] | None = None):
    """(text_emb, text_pids, image_emb, image_pids) as numpy arrays for the records, with the artifact's runtime."""
    from .artifacts import open_artifact

    check_device(device)
    art = open_artifact(Path(artifact))
    image_pids = np.array([r.pid for r in records])
    text_pids = np.array([r.pid for r in records for _ in r.captions])
    paths = [ds.image_path(r) for r in records]
    if art.kind == "onnx":
        from .runtime import OnnxEncoder

        enc = OnnxEncoder(art.path, providers=providers)
        img = encode_image_files(enc, paths, batch_size=batch_size)
        txt = enc.encode_texts([c for r in records for c in r.captions], batch_size=batch_size)
        return txt, text_pids, img, image_pids
    from .devices import resolve_device
    from .engine.evaluate import embed_split
    from .models.io import load_model
    from .models.tokenizer import model_tokenizer
    from .runtime.tokenizer import clean_caption

    dev = resolve_device(device)
    model = load_model(art, device=dev, verify=False)
    tok = model_tokenizer(model)
    emb = embed_split(model, records, paths, tok, clean_caption, batch_size=batch_size, device=dev)
    return emb.text.numpy(), text_pids, emb.image.numpy(), image_pids


def evaluate_artifact(artifact: Path, data: Path, *, split: str = "test", format: str | None = None,
                      device: str = "auto", batch_size: int = 128) -> dict[str, float]:
    """Text-to-image R@1/5/10, mAP and mINP of an artifact on a split. ``device`` is checked (auto, cpu, cuda,
    cuda:N) before anything is loaded."""
    from .retrieval.metrics import metrics_from_embeddings

    check_device(device)
    ds, recs = _records(data, split, format)
    txt, tp, img, ip = embed_with_artifact(artifact, ds, recs, device=device, batch_size=batch_size)
    return metrics_from_embeddings(txt, img, tp, ip)
