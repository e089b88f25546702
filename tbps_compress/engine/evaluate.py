"""Text-to-image retrieval evaluation of a PyTorch model on a dataset split."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..data.loader import ImageStore
from ..data.records import Record
from ..data.transforms import OPENAI_MEAN, OPENAI_STD
from ..models.config import image_size_hw

log = logging.getLogger(__name__)


@dataclass
class SplitEmbeddings:
    image: torch.Tensor  # (G, D) normalised
    image_pids: torch.Tensor
    text: torch.Tensor  # (Q, D) normalised
    text_pids: torch.Tensor


def _normalize(batch: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_STD).view(1, 3, 1, 1)
    return (batch.float() / 255.0 - mean) / std


@torch.no_grad()
def embed_split(
    model: nn.Module,
    records: Sequence[Record],
    image_paths: Sequence,
    tokenizer: Callable,
    clean: Callable[[str], str],
    batch_size: int = 128,
    device: str | torch.device = "cpu",
    images: ImageStore | None = None,
) -> SplitEmbeddings:
    """Embed every image and every caption of ``records`` (eval transform: bicubic resize, normalise)."""
    was_training = model.training
    model.eval()
    size = image_size_hw(model.tbps_config)
    store = images if images is not None else ImageStore(image_paths, size, cache=False)
    img_embs = []
    for s in range(0, len(store), batch_size):
        batch = torch.stack([store[i] for i in range(s, min(len(store), s + batch_size))])
        img_embs.append(model.encode_image(_normalize(batch).to(device), normalize=True).float().cpu())
    captions = [clean(c) for r in records for c in r.captions]
    text_pids = [r.pid for r in records for _ in r.captions]
    txt_embs = []
    for s in range(0, len(captions), batch_size):
        tokens = tokenizer(captions[s:s + batch_size]).to(device)
        txt_embs.append(model.encode_text(tokens, normalize=True).float().cpu())
    model.train(was_training)
    return SplitEmbeddings(
        image=torch.cat(img_embs) if img_embs else torch.empty(0),
        image_pids=torch.tensor([r.pid for r in records]),
        text=torch.cat(txt_embs) if txt_embs else torch.empty(0),
        text_pids=torch.tensor(text_pids),
    )


def retrieval_metrics(emb: SplitEmbeddings) -> dict[str, float]:
    """R@1/5/10, mAP, mINP (percent) for text-to-image retrieval."""
    from ..retrieval.metrics import metrics_from_embeddings

    return metrics_from_embeddings(emb.text, emb.image, emb.text_pids, emb.image_pids)
