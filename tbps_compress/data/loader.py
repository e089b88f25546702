"""Training and evaluation data: captions paired with (cached, resized) images, deterministic sampling."""

from __future__ import annotations

import hashlib
import logging
import math
import random
import re
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from ..io_utils import open_image_rgb
from ..recipes import AugmentCfg
from .records import Record, caption_pairs
from .transforms import ImageAugment, TextAugment, swap_left_right

log = logging.getLogger(__name__)


def load_image_resized(path: Path, size: tuple[int, int]) -> torch.Tensor:
    """RGB uint8 (3,H,W) tensor, PIL bicubic resize to (height, width): the same as the ONNX runtime's. A file that
    does not decode (corrupt, truncated, a decompression bomb) is one :class:`DataError` line naming it."""
    im = open_image_rgb(path)
    if im.size != (size[1], size[0]):
        im = im.resize((size[1], size[0]), Image.BICUBIC)
    arr = np.asarray(im, dtype=np.uint8).copy()
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


class ImageStore:
    """Images of a list of records resized to the model input; decoded once and kept in memory when cached."""

    def __init__(self, paths: Sequence[Path], size: tuple[int, int], cache: bool = True, threads: int = 4) -> None:
        self.paths = list(paths)
        self.size = size
        self._cache: torch.Tensor | None = None
        if cache and self.paths:
            with ThreadPoolExecutor(threads) as pool:
                imgs = list(pool.map(lambda p: load_image_resized(p, size), self.paths))
            self._cache = torch.stack(imgs)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        if self._cache is not None:
            return self._cache[i]
        return load_image_resized(self.paths[i], self.size)


def sample_seed(*parts: int) -> int:
    digest = hashlib.blake2b(",".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFFFFFFFFFF


class TrainSet(Dataset):
    """One sample per caption: views of its image, augmented caption tokens and the contiguous identity label."""

    def __init__(
        self,
        records: Sequence[Record],
        images: ImageStore,
        labels: dict[int, int],
        tokenizer: Callable[[Sequence[str]], torch.Tensor],
        augment: AugmentCfg,
        views: Sequence[str] = ("image",),
        seed: int = 0,
        clean: Callable[[str], str] = lambda s: s,
    ) -> None:
        self.records = list(records)
        self.images = images
        self.labels = labels
        self.tokenizer = tokenizer
        self.pairs = caption_pairs(self.records)
        self.image_aug = ImageAugment(augment.image, images.size)
        self.text_aug = TextAugment(augment.text)
        self.views = tuple(views)
        self.seed = seed
        self.epoch = 0
        self.clean = clean

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        ri, ci = self.pairs[k]
        rec = self.records[ri]
        s = sample_seed(self.seed, self.epoch, k)
        rng = random.Random(s)
        torch.manual_seed(s)
        img = self.images[ri]
        main, flipped = self.image_aug.main_view_flipped(img, rng)
        out: dict[str, torch.Tensor] = {"image": main}
        if "image_mvs" in self.views:
            out["image_mvs"] = self.image_aug.main_view(img, rng)
        if "ssl_a" in self.views:
            out["ssl_a"] = self.image_aug.ssl_view(img)
            out["ssl_b"] = self.image_aug.ssl_view(img)
        para = rec.captions_bt[ci] if rec.captions_bt else None
        text = self.text_aug(self.clean(rec.captions[ci]), self.clean(para) if para else None, rng)
        if flipped and self.image_aug.cfg.hflip_swaps_left_right:
            text = swap_left_right(text)
        out["text"] = self.tokenizer([text])[0]
        out["pid"] = torch.tensor(self.labels[rec.pid], dtype=torch.long)
        out["index"] = torch.tensor(k, dtype=torch.long)
        return out


class CaptionNeighbours:
    """Nearest captions in TF-IDF bag-of-words space (cosine), never the same identity: the hard negatives of a
    contrastive batch. Measured on SynthPedes's training captions: a caption and its 7 nearest share 36% of their
    colour words (Jaccard) against 18% for random pairs (hashing the same vectors into 2**8..2**16 SimHash buckets
    reached only 20-21%, hence exact search: 225 words, one matrix product per chunk of seeds)."""

    def __init__(self, texts: Sequence[str], pids: Sequence[int]) -> None:
        docs = [set(re.findall(r"[a-z]+", t.lower())) for t in texts]
        vocab = {w: i for i, w in enumerate(sorted(set().union(*docs)))}
        x = np.zeros((len(docs), max(1, len(vocab))), dtype=np.float32)
        for i, d in enumerate(docs):
            x[i, [vocab[w] for w in d]] = 1.0
        x *= (np.log((1 + len(docs)) / (1 + x.sum(0))) + 1.0).astype(np.float32)
        x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        self.x, self.pids = x, np.asarray(pids)

    def __call__(self, seeds: Sequence[int], k: int, chunk: int = 256) -> np.ndarray:
        """(len(seeds), k) sample indices, nearest first."""
        seeds = np.asarray(seeds, dtype=np.int64)
        out = np.empty((len(seeds), k), dtype=np.int64)
        for a in range(0, len(seeds), chunk):
            s = seeds[a:a + chunk]
            sim = self.x[s] @ self.x.T
            sim[self.pids[s][:, None] == self.pids[None, :]] = -np.inf
            top = np.argpartition(-sim, k, axis=1)[:, :k]
            order = np.argsort(-np.take_along_axis(sim, top, axis=1), axis=1, kind="stable")
            out[a:a + chunk] = np.take_along_axis(top, order, axis=1)
        return out


class EpochBatchSampler(Sampler[list[int]]):
    """Seeded permutation per epoch cut into global batches; each rank takes its slice of every global batch.
    ``start`` skips batches already done (resume mid-epoch).

    With ``neighbours`` (e.g. :class:`CaptionNeighbours`) a share ``hard_fraction`` of the batches is built from
    seeds drawn from the permutation, each followed by its ``group - 1`` nearest samples (people described alike:
    negatives that a single attribute cannot tell apart); the rest stay uniform and all are shuffled together. A hard
    batch reuses samples, so an epoch then visits fewer distinct samples. The batch list is a function of
    (seed, epoch), so resuming mid-epoch is exact."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1,
                 neighbours: Callable[..., np.ndarray] | None = None, hard_fraction: float = 0.0,
                 group: int = 8) -> None:
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.neighbours, self.hard_fraction, self.group = neighbours, hard_fraction, group
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return max(0, self.n // (self.batch_size * self.world) - self.start)

    def _hard(self, seeds: list[int], candidates: np.ndarray, fill: Iterator[int]) -> list[int]:
        batch: list[int] = []
        taken: set[int] = set()
        for s, cand in zip(seeds, candidates, strict=True):
            members = [s] + [int(c) for c in cand if int(c) not in taken and int(c) != s][:self.group - 1]
            for m in members:
                if m not in taken:
                    batch.append(m)
                    taken.add(m)
        while len(batch) < len(seeds) * self.group:  # too few unseen neighbours: top up uniformly
            m = next(fill)
            if m not in taken:
                batch.append(m)
                taken.add(m)
        return batch

    def global_batches(self) -> list[list[int]]:
        g = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, -1))
        perm = torch.randperm(self.n, generator=g).tolist()
        gb = self.batch_size * self.world
        nb = self.n // gb
        n_hard = round(nb * self.hard_fraction) if self.neighbours is not None else 0
        if n_hard == 0:
            return [perm[b * gb:(b + 1) * gb] for b in range(nb)]
        per = max(1, gb // self.group)
        seeds = perm[:n_hard * per]
        rest = perm[n_hard * per:]
        candidates = self.neighbours(seeds, min(self.n - 1, 3 * self.group))
        fill = iter(rest[(nb - n_hard) * gb:] + perm)
        batches = [self._hard(seeds[b * per:(b + 1) * per], candidates[b * per:(b + 1) * per], fill)[:gb]
                   for b in range(n_hard)]
        batches += [rest[b * gb:(b + 1) * gb] for b in range(nb - n_hard)]
        shuffle = torch.randperm(nb, generator=g).tolist()
        return [batches[i] for i in shuffle]

    def __iter__(self) -> Iterator[list[int]]:
        for chunk in self.global_batches()[self.start:]:
            yield chunk[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]


def steps_per_epoch(n: int, batch_size: int, world: int = 1) -> int:
    return n // (batch_size * world)


def identity_subset(records: Sequence[Record], fraction: float, seed: int) -> list[Record]:
    """Records of a seeded random ``fraction`` of the identities (at least one)."""
    if fraction >= 1.0:
        return list(records)
    pids = sorted({r.pid for r in records})
    k = max(1, math.ceil(len(pids) * fraction))
    keep = set(random.Random(seed).sample(pids, k))
    return [r for r in records if r.pid in keep]
