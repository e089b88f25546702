"""Embedding a gallery in shards: several processes (or machines) each embed a slice of the files, then one index.

A gallery too large for one process's time is split by position in the sorted file list (file ``i`` goes to shard
``i % world``). Each shard process builds an ordinary exact index over its files only, in its own folder
(``GALLERY/.tbps_index/<hash>-shard-<rank>-of-<world>``, or under ``--shard-dir``); when all are done, rank 0 merges
them: the gallery's main index (any kind: flat, hnsw, ivfpq, ivfsq8) is built from the shards' vectors, re-embedding
only files that changed since their shard saw them, and the shard folders are removed. Afterwards the main index is
an ordinary one (incremental updates, SQLite metadata, ``--where`` filters).

Run under torchrun, which the training stages use already; the processes meet at a barrier of a gloo process group::

    torchrun --nproc_per_node 2 -m tbps_compress.retrieval.shards ARTIFACT --gallery DIR [--index hnsw]

Across machines, point ``--shard-dir`` at a shared folder and start torchrun with ``--nnodes``. A single process
(no torchrun) builds the index in one shard and merges it, which is the plain search path.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .index import GalleryIndex, IndexSpec, Row, default_index_dir, scan_images

log = logging.getLogger(__name__)

__all__ = ["build_shard", "merge_shards", "shard_dir", "sharded_index"]


def shard_dir(gallery: Path, artifact_hash: str, rank: int, world: int, root: Path | None = None) -> Path:
    """The folder of shard ``rank`` of ``world``: under ``root`` when given, else beside the main index."""
    tag = f"shard-{rank}-of-{world}"
    if root is not None:
        return Path(root) / f"{artifact_hash[:16]}-{tag}"
    return default_index_dir(gallery, artifact_hash, tag)


def build_shard(gallery: Path, encoder: Any, artifact_hash: str, rank: int, world: int, *,
                root: Path | None = None, batch_size: int = 32,
                progress: Callable[[int, int], None] | None = None) -> Path:
    """Embed files ``rank, rank + world, ...`` of the sorted gallery into an exact index; returns its folder."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in 0..{world - 1}")
    files = scan_images(Path(gallery))[rank::world]
    out = shard_dir(Path(gallery), artifact_hash, rank, world, root)
    shard = GalleryIndex(Path(gallery), encoder, artifact_hash, index_dir=out, files=files, spec=IndexSpec("flat"),
                         batch_size=batch_size, progress=progress)
    with shard:
        stats = shard.refresh()
    log.info("shard %d/%d: %d files (%d embedded)", rank, world, stats.files, stats.embedded)
    return out


def merge_shards(gallery: Path, encoder: Any, artifact_hash: str, shards: Sequence[Path], *,
                 index_dir: Path | None = None, spec: IndexSpec | str | None = None, batch_size: int = 32,
                 remove_shards: bool = True) -> GalleryIndex:
    """Build the gallery's main index from the shard indexes' vectors (files changed since are re-embedded)."""
    rows: list[Row] = []
    parts: list[np.ndarray] = []
    for folder in shards:
        with GalleryIndex(Path(gallery), encoder, artifact_hash, index_dir=folder) as shard:
            shard.load(strict=True)
            rows += shard.rows
            parts.append(shard.embeddings)
    vectors = np.concatenate([p for p in parts if p.size]) if any(p.size for p in parts) else np.zeros((0, 0))
    main = GalleryIndex(Path(gallery), encoder, artifact_hash, index_dir=index_dir, spec=spec, batch_size=batch_size)
    with main.locked():
        main.offer_vectors(rows, vectors)
        stats = main.update()
        main.save()
    log.info("merged %d shard(s): %d files indexed, %d re-embedded", len(shards), stats.indexed, stats.embedded)
    if remove_shards:
        for folder in shards:
            shutil.rmtree(folder, ignore_errors=True)
    return main


def sharded_index(gallery: Path, encoder: Any, artifact_hash: str, *, spec: IndexSpec | str | None = None,
                  root: Path | None = None, batch_size: int = 32) -> GalleryIndex | None:
    """This process's part of a sharded build under torchrun (rank and world from its environment): embed the
    shard, wait for the others, and on rank 0 merge. Returns the merged index on rank 0, ``None`` elsewhere."""
    from .. import distributed as dist

    started = dist.setup_from_env(backend="gloo")
    try:
        rank, world = dist.rank(), dist.world_size()
        build_shard(gallery, encoder, artifact_hash, rank, world, root=root, batch_size=batch_size)
        dist.barrier()
        merged = None
        if rank == 0:
            folders = [shard_dir(Path(gallery), artifact_hash, r, world, root) for r in range(world)]
            merged = merge_shards(gallery, encoder, artifact_hash, folders, spec=spec, batch_size=batch_size)
        dist.barrier()
        return merged
    finally:
        if started:
            dist.cleanup()


def main(argv: list[str] | None = None) -> int:
    from ..errors import UserError
    from .search import artifact_hash, open_artifact, open_encoder

    ap = argparse.ArgumentParser(prog="python -m tbps_compress.retrieval.shards", description=__doc__.splitlines()[0])
    ap.add_argument("artifact", type=Path, help="torch or ONNX artifact whose image encoder embeds the gallery")
    ap.add_argument("--gallery", type=Path, required=True)
    ap.add_argument("--index", default=None, help="main index kind: flat (default), hnsw, ivfpq, ivfsq8")
    ap.add_argument("--index-param", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--shard-dir", type=Path, help="folder for the shard indexes (shared between machines)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if not args.gallery.is_dir():
            raise UserError(f"{args.gallery}: gallery folder does not exist; pass --gallery with a folder of images")
        spec = IndexSpec.parse(args.index, args.index_param)
        art = open_artifact(args.artifact)
        merged = sharded_index(args.gallery, open_encoder(art, device=args.device), artifact_hash(art), spec=spec,
                               root=args.shard_dir, batch_size=args.batch_size)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if merged is not None:
        print(f"{merged.index_dir}: {len(merged)} images ({merged.kind})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
