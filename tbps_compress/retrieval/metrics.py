"""Retrieval metrics: R@K, mAP and mINP, computed chunk by chunk so large galleries never need a Q x G matrix.

Conventions
-----------
- Rows are queries, columns gallery items. Text-to-image: rows = captions, columns = images
  (``metrics(sim, caption_ids, image_ids)``). Image-to-text: transpose and swap the ids
  (``metrics(sim.T, image_ids, caption_ids)``, or ``metrics_from_embeddings(image_emb, text_emb, image_ids,
  caption_ids)``).
- A gallery item is correct for a query when their ids are equal.
- Ranking: descending score; ties are broken by ascending gallery index (a stable sort), so the result is
  deterministic and identical on CPU and CUDA.
- R@K: percent of queries with at least one correct item in the top K.
  AP: mean, over the query's correct items, of the precision at each one's rank; mAP is the mean AP.
  INP: (number of correct items) / (rank of the last correct item); mINP is the mean INP.
- Queries with no correct gallery item are excluded from every metric (a warning logs how many).
- All values are returned in percent; sums are accumulated in float64.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import DataError

log = logging.getLogger(__name__)

# Fewer gallery identities than this and retrieval metrics are mostly chance (1 identity: R@1 is 100 for any model).
MIN_MEASURABLE_IDENTITIES = 10

ArrayLike = torch.Tensor | np.ndarray
#: ``provider(start, stop)`` returns the similarity rows ``start:stop`` as a ``(stop - start, G)`` array.
ChunkProvider = Callable[[int, int], ArrayLike]

#: Upper bound on the elements of one similarity chunk (rows x gallery size): the effective chunk is
#: ``min(chunk_size, MAX_CHUNK_ELEMENTS // G)`` rows (at least 1). Peak extra memory per chunk is about
#: 18 bytes per element (scores, sorted scores, int64 order, two bool match matrices), ~600 MB at this bound.
MAX_CHUNK_ELEMENTS = 1 << 25


def _as_tensor(x: ArrayLike | Sequence[float]) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    return torch.from_numpy(np.ascontiguousarray(x))


def _as_ids(ids: ArrayLike | Sequence[int], name: str) -> torch.Tensor:
    t = _as_tensor(ids) if isinstance(ids, (torch.Tensor, np.ndarray)) else torch.as_tensor(list(ids))
    if t.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise ValueError(f"{name} must hold integer ids, got dtype {t.dtype}")
    return t.to(torch.int64)


class _Totals:
    """Float64 / integer accumulators over chunks."""

    def __init__(self, ks: tuple[int, ...]) -> None:
        self.ks = ks
        self.hits = [0] * len(ks)
        self.ap = 0.0
        self.inp = 0.0
        self.valid = 0
        self.excluded = 0

    def add(self, sim: torch.Tensor, qid: torch.Tensor, gid: torch.Tensor) -> None:
        match = qid[:, None] == gid[None, :]  # (r, G) bool, unsorted
        npos = match.sum(dim=1)
        keep = npos > 0
        n_keep = int(keep.sum())
        self.excluded += int(keep.numel()) - n_keep
        if n_keep == 0:
            return
        if n_keep != keep.numel():
            sim, match, npos = sim[keep], match[keep], npos[keep]
        if not sim.is_floating_point() or sim.dtype in (torch.float16, torch.bfloat16):
            sim = sim.float()  # exact up-cast: the ranking is unchanged
        if bool(torch.isnan(sim).any()):
            raise ValueError("similarity contains NaN; check the embeddings (NaN features give NaN scores)")
        order = torch.sort(sim, dim=1, descending=True, stable=True).indices
        sorted_match = torch.gather(match, 1, order)  # (r, G) bool in rank order
        del order, match
        rows, cols = sorted_match.nonzero(as_tuple=True)  # row-major: per row, positives in rank order
        del sorted_match
        rank = cols.to(torch.float64) + 1.0
        start = torch.cumsum(npos, 0) - npos  # offset of each row's first positive in the flat list
        kth = torch.arange(rows.numel(), device=rows.device, dtype=torch.float64) - start[rows].to(torch.float64) + 1.0
        npos64 = npos.to(torch.float64)
        ap = torch.zeros(n_keep, dtype=torch.float64, device=rank.device).index_add_(0, rows, kth / rank) / npos64
        first_rank = rank[start]
        last_rank = rank[start + npos - 1]
        self.ap += float(ap.sum())
        self.inp += float((npos64 / last_rank).sum())
        for i, k in enumerate(self.ks):
            self.hits[i] += int((first_rank <= k).sum())
        self.valid += n_keep


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    out = tuple(ks)
    if not out or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in out):
        raise ValueError(f"ks must be positive integers, got {ks!r}")
    return out


def metrics(
    similarity: ArrayLike | ChunkProvider,
    query_ids: ArrayLike | Sequence[int],
    gallery_ids: ArrayLike | Sequence[int],
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 1024,
) -> dict[str, float]:
    """Retrieval metrics for a (Q, G) similarity, in percent: ``{"R1", "R5", "R10", "mAP", "mINP"}``
    (one ``R{k}`` per entry of ``ks``).

    ``similarity``: a ``(Q, G)`` torch tensor (CPU or CUDA) or numpy array, or a callable ``provider(start,
    stop)`` returning rows ``start:stop`` (Q is then ``len(query_ids)``). Rows are processed ``chunk_size`` at a
    time (capped so a chunk holds at most :data:`MAX_CHUNK_ELEMENTS` scores) on the similarity's device.
    ``query_ids`` / ``gallery_ids``: integer identity labels, length Q and G.
    Raises :class:`DataError` when no query has a correct gallery item.
    """
    ks = _check_ks(ks)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    qids = _as_ids(query_ids, "query_ids")
    gids = _as_ids(gallery_ids, "gallery_ids")
    n_query, n_gallery = qids.numel(), gids.numel()
    if n_query == 0 or n_gallery == 0:
        raise ValueError(f"need at least one query and one gallery item, got Q={n_query}, G={n_gallery}")
    n_ids = int(torch.unique(gids).numel())
    if n_ids < MIN_MEASURABLE_IDENTITIES:
        log.warning("the gallery holds %d identit%s: with fewer than %d, R@k and mAP measure nothing (a model that "
                    "knows nothing scores R@1 >= %.0f%%); evaluate on a larger split", n_ids,
                    "y" if n_ids == 1 else "ies", MIN_MEASURABLE_IDENTITIES, 100.0 / n_ids)
    if callable(similarity):
        provider = similarity
    else:
        if tuple(similarity.shape) != (n_query, n_gallery):
            raise ValueError(f"similarity has shape {tuple(similarity.shape)}, expected (Q, G) = "
                             f"({n_query}, {n_gallery}) from the id lists")
        matrix = similarity

        def provider(start: int, stop: int) -> ArrayLike:
            return matrix[start:stop]

    rows = max(1, min(chunk_size, MAX_CHUNK_ELEMENTS // n_gallery))
    totals = _Totals(ks)
    ids_on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
    for start in range(0, n_query, rows):
        stop = min(start + rows, n_query)
        sim = _as_tensor(provider(start, stop))
        if tuple(sim.shape) != (stop - start, n_gallery):
            raise ValueError(f"similarity rows {start}:{stop} have shape {tuple(sim.shape)}, expected "
                             f"({stop - start}, {n_gallery})")
        if sim.device not in ids_on:
            ids_on[sim.device] = (qids.to(sim.device), gids.to(sim.device))
        q_dev, g_dev = ids_on[sim.device]
        totals.add(sim, q_dev[start:stop], g_dev)
        del sim

    if totals.excluded:
        log.warning("%d of %d queries have no correct gallery item; they are excluded from all metrics",
                    totals.excluded, n_query)
    if totals.valid == 0:
        raise DataError(f"none of the {n_query} queries has a correct gallery item (no shared ids between "
                        "queries and gallery); check that both come from the same split")
    n = float(totals.valid)
    out = {f"R{k}": 100.0 * h / n for k, h in zip(ks, totals.hits, strict=True)}
    out["mAP"] = 100.0 * totals.ap / n
    out["mINP"] = 100.0 * totals.inp / n
    return out


def metrics_from_embeddings(
    query_emb: ArrayLike,
    gallery_emb: ArrayLike,
    query_ids: ArrayLike | Sequence[int],
    gallery_ids: ArrayLike | Sequence[int],
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 1024,
    *,
    normalize: bool = True,
) -> dict[str, float]:
    """:func:`metrics` of the cosine similarity ``query_emb @ gallery_emb.T``, computed one query chunk at a time
    against the whole gallery, so memory is bounded by the chunk (rows x G), never Q x G.

    ``query_emb`` (Q, D) and ``gallery_emb`` (G, D): torch tensors (CPU or CUDA; work happens on the gallery's
    device) or numpy arrays. ``normalize``: L2-normalise both first (set False if they already are and you want
    the exact dot products). Text-to-image: captions as queries, images as gallery; image-to-text: swap them.
    """
    gallery = _as_tensor(gallery_emb)
    query = _as_tensor(query_emb)
    if gallery.ndim != 2 or query.ndim != 2 or gallery.shape[1] != query.shape[1]:
        raise ValueError(f"embeddings must be (Q, D) and (G, D) with the same D, got {tuple(query.shape)} and "
                         f"{tuple(gallery.shape)}")
    if gallery.device.type == "cpu" and gallery.dtype in (torch.float16, torch.bfloat16):
        gallery = gallery.float()
    if not gallery.is_floating_point():
        gallery = gallery.float()
    if normalize:
        gallery = F.normalize(gallery, dim=1)
    gallery_t = gallery.T

    def provider(start: int, stop: int) -> torch.Tensor:
        chunk = query[start:stop].to(device=gallery.device, dtype=gallery.dtype)
        if normalize:
            chunk = F.normalize(chunk, dim=1)
        return chunk @ gallery_t

    if query.shape[0] != len(query_ids):
        raise ValueError(f"query_emb has {query.shape[0]} rows but query_ids has {len(query_ids)}")
    return metrics(provider, query_ids, gallery_ids, ks=ks, chunk_size=chunk_size)
