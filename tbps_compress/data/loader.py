"""Training and evaluation data: captions paired with (cached, resized) images, deterministic sampling."""

from __future__ import annotations

import hashlib
import logging
import math
import random
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


class EpochBatchSampler(Sampler[list[int]]):
    """Seeded permutation per epoch cut into global batches; each rank takes its slice of every global batch.
    ``start`` skips batches already done (resume mid-epoch)."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> None:
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return max(0, self.n // (self.batch_size * self.world) - self.start)

    def __iter__(self) -> Iterator[list[int]]:
        g = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, -1))
        perm = torch.randperm(self.n, generator=g).tolist()
        gb = self.batch_size * self.world
        for b in range(self.start, self.n // gb):
            chunk = perm[b * gb:(b + 1) * gb]
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
