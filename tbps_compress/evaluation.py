"""Evaluate any artifact (PyTorch or ONNX) on a dataset split: the shared path of ``eval``, ``bench`` and stages."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from .errors import UserError

log = logging.getLogger(__name__)


def _records(data: Path, split: str, format: str | None):
    from .data.readers import load_dataset

    ds = load_dataset(Path(data), format)
    recs = ds.split(split)
    if not recs:
        raise UserError(f"{ds.annotation}: no records in split '{split}' (splits present: {', '.join(ds.splits())})")
    return ds, recs


def embed_with_artifact(artifact: Path, ds, records, *, device: str = "auto", batch_size: int = 128,
                        providers: list[str] | None = None):
    """(text_emb, text_pids, image_emb, image_pids) as numpy arrays for the records, with the artifact's runtime."""
    from .artifacts import open_artifact

    art = open_artifact(Path(artifact))
    image_pids = np.array([r.pid for r in records])
    text_pids = np.array([r.pid for r in records for _ in r.captions])
    paths = [ds.image_path(r) for r in records]
    if art.kind == "onnx":
        from .runtime import OnnxEncoder

        enc = OnnxEncoder(art.path, providers=providers)
        img = enc.encode_images(paths, batch_size=batch_size)
        txt = enc.encode_texts([c for r in records for c in r.captions], batch_size=batch_size)
        return txt, text_pids, img, image_pids
    from .data.readers import clean_caption
    from .engine.evaluate import embed_split
    from .engine.train import resolve_device
    from .models.io import load_model
    from .models.tokenizer import model_tokenizer

    dev = resolve_device(device)
    model = load_model(art, device=dev, verify=False)
    tok = model_tokenizer(model)
    emb = embed_split(model, records, paths, tok, clean_caption, batch_size=batch_size, device=dev)
    return emb.text.numpy(), text_pids, emb.image.numpy(), image_pids


def evaluate_artifact(artifact: Path, data: Path, *, split: str = "test", format: str | None = None,
                      device: str = "auto", batch_size: int = 128) -> dict[str, float]:
    """Text-to-image R@1/5/10, mAP and mINP of an artifact on a split."""
    from .retrieval.metrics import metrics_from_embeddings

    ds, recs = _records(data, split, format)
    txt, tp, img, ip = embed_with_artifact(artifact, ds, recs, device=device, batch_size=batch_size)
    return metrics_from_embeddings(txt, img, tp, ip)
