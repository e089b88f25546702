"""A gallery index: the image embeddings of a folder of person crops in FAISS, their metadata in SQLite, kept up to
date incrementally.

Layout (default ``GALLERY/.tbps_index/<artifact content hash[:16]>/``)::

    manifest.json                    the commit record (below); written last
    vectors-<epoch>-<gen>.faiss      the FAISS index (``faiss.write_index``), ids = the ``files.id`` of SQLite
    metadata-<epoch>.sqlite          SQLite (WAL mode): one row per indexed file
    .lock                            held (``flock``) while an index is loaded, updated and saved

``manifest.json`` (format 2)::

    {"format": 2, "artifact_hash": ..., "gallery": ..., "dim": D, "rows": N, "generation": G, "epoch": "1a2b3c4d",
     "next_id": ..., "index": {"kind": "flat" | "flat16" | "hnsw" | "ivfpq" | "ivfsq8", "params": {...}},
     "vectors_file": ..., "vectors_sha256": ..., "vectors_bytes": ..., "ntotal": ..., "tombstones": ...,
     "metadata_file": ..., "unreadable": [{"path", "size", "mtime_ns", "error"}, ...], "updated_at": ...}

SQLite schema (table ``files``; ``meta`` holds the schema version, the artifact hash and the epoch)::

    id INTEGER PRIMARY KEY   -- the FAISS id of the file's vector
    path TEXT                -- relative to the gallery, POSIX
    size INTEGER, mtime_ns INTEGER
    identity INTEGER, camera INTEGER   -- NULL when unknown (from the dataset annotation / synth_meta.json)
    indexed_at TEXT          -- UTC, ISO 8601: when the file was embedded
    added_gen INTEGER, removed_gen INTEGER   -- the row is part of generation g iff added_gen <= g and
                                             -- (removed_gen IS NULL or removed_gen > g)

Index kinds (``kind`` / ``--index``; parameters / ``--index-param KEY=VALUE``, all recorded in the manifest):

- ``flat`` (default): ``IndexIDMap2(IndexFlatIP)``, exact inner product (= cosine: vectors are L2-normalised).
- ``flat16``: ``IndexIDMap2(IndexScalarQuantizer(QT_fp16))``, every vector compared as with ``flat`` but stored in
  float16: half the memory and, since a single-query scan is bound by memory bandwidth, about half the time;
  scores differ from ``flat``'s by float16 rounding (below 1e-3 for unit vectors), so only near-ties can swap.
- ``hnsw``: ``IndexIDMap2(IndexHNSWFlat)``, approximate; ``M``, ``ef_construction``, ``ef_search``. HNSW cannot
  delete: removed and changed files become *tombstones* (ids left in the FAISS index, absent from SQLite, excluded
  from every search with an ``IDSelectorNot``); when they exceed :data:`HNSW_COMPACT_FRACTION` of the index it is
  rebuilt from its own stored (exact) vectors, without re-embedding.
- ``ivfpq``: ``IndexIVFPQ``, approximate and compressed; ``nlist`` (0 = about 4 * sqrt(N)), ``m`` sub-quantizers
  (0 = dim / 4), ``nbits``, ``nprobe``. ``ivfsq8``: ``IndexIVFScalarQuantizer`` with 8-bit codes; ``nlist``,
  ``nprobe``. Both are trained once, on the vectors of the first build (at least ``max(nlist, 2**nbits)`` for
  ivfpq, ``nlist`` for ivfsq8; fewer is a :class:`~tbps_compress.errors.UserError` that suggests ``--index flat``);
  later files are added with the trained codebooks. Their scores are approximate.

``ef_search`` and ``nprobe`` are search-time settings: changing them rewrites the manifest only. Changing the kind
or a build parameter converts the index: from the exact vectors a flat or hnsw index stores (no re-embedding), or by
re-embedding every image when the old index is an ivf one (it keeps compressed codes only).

What happens on each change (by relative path, size and mtime_ns, as before): new files are embedded and added
(``add_with_ids``, new ids), changed ones get a new id and their old id removed (``remove_ids``; a tombstone for
hnsw), removed ones are removed, the rest are reused untouched. Unreadable images are skipped with a warning,
recorded in the manifest (not retried until they change) and counted. Identity / camera of a known file are updated
in place in SQLite when the annotations give other values. An index with no usable predecessor (first build,
another artifact, a corrupt or truncated file, an unknown format) is rebuilt in a new *epoch* (new file names); a
format-1 index (``embeddings.npy``) is converted without re-embedding.

Crash safety: a save writes the new FAISS file under a new name (temporary file in the same folder, fsync,
``os.replace``), then commits the SQLite rows of the new generation in one transaction, then replaces
``manifest.json`` (which names both files and holds the FAISS file's SHA-256, size and row count); only then are
superseded files and rows deleted. A crash at any point leaves the previous manifest, whose FAISS file and SQLite
generation are still there (rows of an unfinished generation are invisible to it and dropped by the next save), or
the new one. On load the FAISS file's size and SHA-256 and the SQLite rows are checked against the manifest; a
mismatch is warned about on one line and the index rebuilt (``load(strict=True)`` raises a one-line
:class:`IndexFileError` instead).

Filtered search (``where={"camera": 3}``, ``--where camera=3``): the candidate ids come from SQLite; with an exact
index (flat, or hnsw, whose vectors are exact) and at most :data:`EXACT_SUBSET_MAX` candidates, only those
candidates' vectors are scored (exact); otherwise FAISS searches with ``SearchParameters(sel=IDSelectorBatch)``
(exact for flat, approximate for hnsw / ivf).

This module imports neither torch nor open_clip (encoders are passed in, see :class:`Encoder`), and imports faiss
only inside the functions that need it.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import math
import os
import secrets
import sqlite3
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import numpy as np
from PIL import Image

from ..artifacts import sha256_file
from ..errors import DataError, UserError
from ..runtime.encoder import l2_normalize

log = logging.getLogger(__name__)

__all__ = ["EXACT_SUBSET_MAX", "HNSW_COMPACT_FRACTION", "IMAGE_EXTENSIONS", "INDEX_DIRNAME", "INDEX_KINDS",
           "KIND_PARAMS", "WHERE_COLUMNS", "Encoder", "FileEntry", "GalleryIndex", "IndexFileError", "IndexSpec",
           "IndexStats", "Row", "VectorStore", "default_index_dir", "normalize_where", "scan_images",
           "training_size"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
INDEX_DIRNAME = ".tbps_index"
MANIFEST_FILE = "manifest.json"
LEGACY_EMBEDDINGS_FILE = "embeddings.npy"
LOCK_FILE = ".lock"
FORMAT_VERSION = 2
LEGACY_FORMAT_VERSION = 1
SCHEMA_VERSION = 1
_QUERY_BATCH = 1024

INDEX_KINDS: tuple[str, ...] = ("flat", "flat16", "hnsw", "ivfpq", "ivfsq8")
# Defaults of each kind's parameters; 0 means "chosen from the gallery" (nlist, m).
KIND_PARAMS: dict[str, dict[str, int]] = {
    "flat": {},
    "flat16": {},
    "hnsw": {"M": 32, "ef_construction": 200, "ef_search": 128},
    "ivfpq": {"nlist": 0, "m": 0, "nbits": 8, "nprobe": 32},
    "ivfsq8": {"nlist": 0, "nprobe": 32},
}
SEARCH_PARAMS = frozenset({"ef_search", "nprobe"})  # search-time: changed without a rebuild
_AUTO_PARAMS = frozenset({"nlist", "m"})
_MIN_PARAM = {"M": 2, "nbits": 1}
_MAX_PARAM = {"nbits": 16}
HNSW_COMPACT_FRACTION = 0.25  # hnsw: rebuild from the stored vectors when tombstones exceed this share of the index
EXACT_SUBSET_MAX = 65_536  # filtered search on exact vectors: score the candidates directly up to this many
WHERE_COLUMNS: dict[str, type] = {"camera": int, "identity": int, "mtime_ns": int, "path": str, "size": int}
_ANNOTATION_SOURCES = {"camera": "the dataset's synth_meta.json", "identity": "the dataset annotation"}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id INTEGER PRIMARY KEY,
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    identity INTEGER,
    camera INTEGER,
    indexed_at TEXT NOT NULL,
    added_gen INTEGER NOT NULL,
    removed_gen INTEGER
);
CREATE INDEX IF NOT EXISTS files_path ON files(path);
CREATE INDEX IF NOT EXISTS files_camera ON files(camera);
CREATE INDEX IF NOT EXISTS files_identity ON files(identity);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
_VISIBLE = "added_gen <= ? AND (removed_gen IS NULL OR removed_gen > ?)"


class IndexFileError(DataError):
    """A saved index is unusable (truncated, corrupt, of another artifact); raised by ``load(strict=True)``."""


class Encoder(Protocol):
    """What the index needs from a model: L2-normalised float32 embeddings, one row per input."""

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray: ...

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray: ...


@dataclass(frozen=True)
class FileEntry:
    """One gallery file as seen on disk: path relative to the gallery root (POSIX), size, mtime in ns."""

    path: str
    size: int
    mtime_ns: int

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, "mtime_ns": self.mtime_ns}


@dataclass
class Row:
    """One indexed file: its FAISS id, what it was on disk when embedded, and its metadata."""

    id: int
    entry: FileEntry
    identity: int | None = None
    camera: int | None = None
    indexed_at: str = ""


@dataclass
class IndexStats:
    """What the last :meth:`GalleryIndex.update` did."""

    files: int = 0  # image files found
    indexed: int = 0  # rows in the index after the update
    reused: int = 0
    added: int = 0
    changed: int = 0
    removed: int = 0
    embedded: int = 0  # images run through the encoder
    unreadable: int = 0  # image files that could not be read (new and remembered ones)
    new_unreadable: list[str] = field(default_factory=list)
    rebuilt: bool = False  # no usable previous index (first build, other artifact, corrupt files)
    kind: str = "flat"
    converted: bool = False  # the index kind or a build parameter changed: rebuilt from the stored vectors
    compacted: bool = False  # hnsw tombstones dropped by a rebuild from the stored vectors
    tombstones: int = 0  # hnsw: ids of removed / changed files still in the FAISS index
    metadata_updated: int = 0  # rows whose identity / camera changed


def default_index_dir(gallery: Path, artifact_hash: str, tag: str | None = None) -> Path:
    """``GALLERY/.tbps_index/<hash[:16]>`` (``-<tag>`` appended when given, for indexes over a file subset)."""
    name = artifact_hash[:16] + (f"-{tag}" if tag else "")
    return Path(gallery) / INDEX_DIRNAME / name


def scan_images(root: Path, skip: Sequence[Path] = ()) -> list[Path]:
    """Image files under ``root`` (recursive, hidden entries skipped), sorted by relative POSIX path."""
    root = Path(root)
    skip_resolved = {Path(p).resolve() for p in skip}
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames
                       if not d.startswith(".") and (here / d).resolve() not in skip_resolved]
        for name in filenames:
            if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(here / name)
    found.sort(key=lambda p: p.relative_to(root).as_posix())
    return found


def _read_image(path: Path) -> Image.Image:
    with Image.open(path) as img:
        return img.convert("RGB")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_replace(path: Path, fill: Callable[[str], None]) -> None:
    """``fill(tmp)`` writes a temporary file beside ``path`` (by name: FAISS writes to paths); it is fsynced and
    renamed onto ``path``, or removed when anything fails."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        fill(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    def fill(tmp: str) -> None:
        with open(tmp, "wb") as f:
            write(f)

    _atomic_replace(path, fill)


def _faiss() -> Any:
    try:
        import faiss
    except ImportError as exc:
        raise UserError("the gallery index needs FAISS, which is not installed; run `pip install faiss-cpu` "
                        "(or faiss-gpu)") from exc
    return faiss


# ---------------------------------------------------------------------------------------------------------------------
# index kinds and parameters
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IndexSpec:
    """The index asked for: ``kind`` (None: keep the saved index's kind, flat for a new one) and the parameters
    given explicitly (the rest keep their saved or default values, see :data:`KIND_PARAMS`)."""

    kind: str | None = None
    params: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind is not None and self.kind not in INDEX_KINDS:
            raise UserError(f"--index {self.kind}: unknown index kind; choose one of {', '.join(INDEX_KINDS)} "
                            "(the index folder is given with --index-dir)")
        for key, value in self.params.items():
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise UserError(f"--index-param {key}={value!r}: expected an integer value")
            low = 0 if key in _AUTO_PARAMS else _MIN_PARAM.get(key, 1)
            high = _MAX_PARAM.get(key)
            if value < low or (high is not None and value > high):
                span = f"between {low} and {high}" if high is not None else f"at least {low}"
                auto = " (0 = chosen from the gallery)" if key in _AUTO_PARAMS else ""
                raise UserError(f"--index-param {key}={value}: must be {span}{auto}")
        if self.kind is not None:
            self.check(self.kind)

    @classmethod
    def parse(cls, kind: str | None = None, params: Sequence[str] | Mapping[str, int] | None = None) -> IndexSpec:
        """From the CLI: ``kind`` and ``KEY=VALUE`` strings (or a mapping)."""
        if params is None:
            return cls(kind, {})
        if isinstance(params, Mapping):
            return cls(kind, dict(params))
        out: dict[str, int] = {}
        for item in params:
            key, sep, value = str(item).partition("=")
            key, value = key.strip(), value.strip()
            if not sep or not key or not value:
                raise UserError(f"--index-param {item!r}: expected KEY=VALUE, e.g. --index-param ef_search=64")
            try:
                out[key] = int(value)
            except ValueError:
                raise UserError(f"--index-param {item}: {key} takes an integer value, e.g. {key}=64") from None
        return cls(kind, out)

    def check(self, kind: str) -> None:
        """Every explicit parameter is one of ``kind``'s."""
        valid = KIND_PARAMS[kind]
        for key in self.params:
            if key not in valid:
                names = ", ".join(valid) if valid else "none (it has no parameters)"
                raise UserError(f"--index-param {key}: not a parameter of --index {kind}; valid: {names}")

    def given_params(self) -> dict[str, int]:
        """Explicit parameters, 0 = auto left out."""
        return {k: int(v) for k, v in self.params.items() if not (k in _AUTO_PARAMS and v == 0)}

    def build_params(self) -> dict[str, int]:
        """Explicit build-time parameters (search-time ones and 0 = auto left out)."""
        return {k: int(v) for k, v in self.params.items()
                if k not in SEARCH_PARAMS and not (k in _AUTO_PARAMS and v == 0)}


def _auto_nlist(n: int) -> int:
    return max(1, min(int(round(4 * math.sqrt(n))), n // 39)) if n > 0 else 1


def _auto_pq_m(dim: int) -> int:
    target = max(1, dim // 4)
    return max(m for m in range(1, target + 1) if dim % m == 0)


def resolve_params(kind: str, explicit: Mapping[str, int], n: int, dim: int) -> dict[str, int]:
    """The full parameters of a ``kind`` index over ``n`` vectors of ``dim`` (auto values chosen)."""
    params = {**KIND_PARAMS[kind], **{k: int(v) for k, v in explicit.items()}}
    if kind in ("ivfpq", "ivfsq8") and params["nlist"] == 0:
        params["nlist"] = _auto_nlist(n)
    if kind == "ivfpq":
        if params["m"] == 0:
            params["m"] = _auto_pq_m(dim)
        elif dim and dim % params["m"]:
            divisors = [m for m in (8, 16, 32, 64, 128) if dim % m == 0] or [_auto_pq_m(dim)]
            raise UserError(f"--index-param m={params['m']}: the {dim}-d embeddings do not split into "
                            f"{params['m']} sub-vectors; use a divisor of {dim} such as "
                            f"{' or '.join(map(str, divisors[-2:]))}")
    return params


def training_size(kind: str, params: Mapping[str, int]) -> int:
    """The fewest vectors a ``kind`` index can be trained on (0: no training)."""
    if kind == "ivfpq":
        return max(int(params["nlist"]), 2 ** int(params["nbits"]))
    if kind == "ivfsq8":
        return int(params["nlist"])
    return 0


def _check_training(kind: str, explicit: Mapping[str, int], n: int) -> None:
    params = resolve_params(kind, {k: v for k, v in explicit.items() if k != "m"}, n, 0)
    need = training_size(kind, params)
    if 0 < n < need:
        nbits_need = 2 ** params["nbits"] if kind == "ivfpq" else 0
        why = (f"{params['nlist']} lists" if params["nlist"] >= nbits_need
               else f"{nbits_need} codewords per sub-quantizer with nbits={params['nbits']}")
        knob = "nlist" if params["nlist"] >= nbits_need else "nbits"
        raise UserError(f"--index {kind}: training needs at least {need} vectors ({why}) but the gallery has {n} "
                        f"images; use --index flat (exact, and fast at this size) or lower --index-param {knob}")


# ---------------------------------------------------------------------------------------------------------------------
# vectors (FAISS)
# ---------------------------------------------------------------------------------------------------------------------


class VectorStore:
    """L2-normalised float32 vectors with int64 ids in a FAISS index; inner product = cosine similarity.

    ``tombstones`` (hnsw only): ids still in the FAISS index that no search may return.
    """

    def __init__(self, index: Any, kind: str, params: Mapping[str, int], dim: int) -> None:
        self.index = index
        self.kind = kind
        self.params = dict(params)
        self.dim = int(dim)
        self.tombstones = np.zeros(0, dtype=np.int64)

    @classmethod
    def create(cls, kind: str, dim: int, params: Mapping[str, int]) -> VectorStore:
        """An empty index (untrained for ivf kinds); ``params`` as :func:`resolve_params` gives them."""
        faiss = _faiss()
        ip = faiss.METRIC_INNER_PRODUCT
        if kind == "flat":
            index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        elif kind == "flat16":
            index = faiss.IndexIDMap2(faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_fp16, ip))
        elif kind == "hnsw":
            inner = faiss.IndexHNSWFlat(dim, int(params["M"]), ip)
            inner.hnsw.efConstruction = int(params["ef_construction"])
            inner.hnsw.efSearch = int(params["ef_search"])
            index = faiss.IndexIDMap2(inner)
        elif kind == "ivfpq":
            # "np": no polysemous training (the factory's default; slow, and only for Hamming pre-filtering)
            spec = f"IVF{int(params['nlist'])},PQ{int(params['m'])}x{int(params['nbits'])}np"
            index = faiss.index_factory(dim, spec, ip)
            index.do_polysemous_training = False
            index.pq.cp.min_points_per_centroid = 1  # we warn through logging instead of faiss's stderr
        elif kind == "ivfsq8":
            index = faiss.index_factory(dim, f"IVF{int(params['nlist'])},SQ8", ip)
        else:
            raise ValueError(f"unknown index kind {kind!r}")
        if kind in ("ivfpq", "ivfsq8"):
            index.cp.min_points_per_centroid = 1
            index.nprobe = int(params["nprobe"])
        return cls(index, kind, params, dim)

    @classmethod
    def build(cls, kind: str, ids: np.ndarray, vectors: np.ndarray, explicit: Mapping[str, int] | None = None,
              ) -> VectorStore:
        """A ``kind`` index of ``vectors`` (trained on them when the kind needs it)."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        n, dim = vectors.shape
        _check_training(kind, explicit or {}, n)
        params = resolve_params(kind, explicit or {}, n, dim)
        store = cls.create(kind, dim, params)
        store.train(vectors)
        store.add(ids, vectors)
        return store

    # -- contents -----------------------------------------------------------------------------------------------------

    @property
    def exact(self) -> bool:
        """Whether the index keeps the vectors themselves (flat, hnsw; flat16 to float16 precision), so that it can
        be rebuilt from them without re-embedding."""
        return self.kind in ("flat", "flat16", "hnsw")

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def __len__(self) -> int:
        return self.ntotal - len(self.tombstones)

    def train(self, vectors: np.ndarray) -> None:
        if self.index.is_trained:
            return
        need = training_size(self.kind, self.params)
        if len(vectors) < 39 * need:
            log.info("training the %s index on %d vectors (%d+ recommended for %s)", self.kind, len(vectors),
                     39 * need, ", ".join(f"{k}={v}" for k, v in self.params.items()))
        self.index.train(np.ascontiguousarray(vectors, dtype=np.float32))

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim or len(ids) != len(vectors):
            raise ValueError(f"expected ({len(ids)}, {self.dim}) vectors, got {vectors.shape}")
        if len(ids):
            self.index.add_with_ids(vectors, ids)

    def remove(self, ids: Sequence[int] | np.ndarray) -> None:
        """Remove ``ids``; for hnsw, which cannot delete, they become tombstones."""
        ids = np.unique(np.asarray(ids, dtype=np.int64))
        if not len(ids):
            return
        if self.kind == "hnsw":
            self.tombstones = np.union1d(self.tombstones, ids)
            return
        removed = int(self.index.remove_ids(ids))
        if removed != len(ids):
            raise RuntimeError(f"FAISS removed {removed} of {len(ids)} ids")

    def ids(self) -> np.ndarray:
        """Every id in the FAISS index (tombstones included), unordered."""
        faiss = _faiss()
        if hasattr(self.index, "id_map"):
            return faiss.vector_to_array(self.index.id_map).astype(np.int64)
        ivf = faiss.extract_index_ivf(self.index)
        inv = ivf.invlists
        parts = [faiss.rev_swig_ptr(inv.get_ids(i), inv.list_size(i)).copy()
                 for i in range(ivf.nlist) if inv.list_size(i)]
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)

    def reconstruct(self, ids: np.ndarray) -> np.ndarray:
        """The stored vectors of ``ids`` (exact for flat / hnsw, decoded from the codes for ivf kinds)."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if not len(ids):
            return np.zeros((0, self.dim), dtype=np.float32)
        if not self.exact:
            faiss = _faiss()
            ivf = faiss.extract_index_ivf(self.index)
            if ivf.direct_map.type != faiss.DirectMap.Hashtable:
                ivf.set_direct_map_type(faiss.DirectMap.Hashtable)
        return np.asarray(self.index.reconstruct_batch(ids), dtype=np.float32)

    # -- searching ----------------------------------------------------------------------------------------------------

    def search(self, queries: np.ndarray, k: int, subset: np.ndarray | None = None,
               ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` ids per query (``(scores, ids)``, each ``(Q, min(k, candidates))``, best first; approximate
        kinds may pad with id -1). ``subset``: search only these ids (see the module doc for how)."""
        faiss = _faiss()
        q = np.asarray(queries, dtype=np.float32)
        if q.ndim == 1:
            q = q[None, :]
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"queries must be (Q, {self.dim}), got {q.shape}")
        q = np.ascontiguousarray(l2_normalize(q))
        candidates = len(self) if subset is None else len(subset)
        kk = min(int(k), candidates)
        if kk <= 0:
            return np.zeros((len(q), 0), dtype=np.float32), np.zeros((len(q), 0), dtype=np.int64)
        if subset is not None and self.exact and len(subset) <= EXACT_SUBSET_MAX:
            return self._search_dense(q, np.sort(np.asarray(subset, dtype=np.int64)), kk)
        keep: list[Any] = []  # selectors referenced by a pointer must outlive the search
        sel = None
        if subset is not None:
            sel = faiss.IDSelectorBatch(np.ascontiguousarray(subset, dtype=np.int64))
        elif len(self.tombstones):
            keep.append(faiss.IDSelectorBatch(self.tombstones))
            sel = faiss.IDSelectorNot(keep[-1])
        if self.kind == "hnsw":
            params = faiss.SearchParametersHNSW()
            params.efSearch = max(int(self.params["ef_search"]), kk)
        elif self.kind in ("ivfpq", "ivfsq8"):
            params = faiss.SearchParametersIVF()
            params.nprobe = min(int(self.params["nprobe"]), int(self.params["nlist"]))
        else:
            params = faiss.SearchParameters() if sel is not None else None
        if sel is not None:
            params.sel = sel
        scores, ids = self.index.search(q, kk, params=params)
        del keep
        return scores, ids

    def _search_dense(self, q: np.ndarray, subset: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        vecs = self.reconstruct(subset)
        sims = q @ vecs.T
        order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(sims, order, axis=1).astype(np.float32), subset[order]

    # -- files --------------------------------------------------------------------------------------------------------

    def write(self, path: Path) -> None:
        """``faiss.write_index`` to a temporary file beside ``path``, fsync, ``os.replace``."""
        faiss = _faiss()
        _atomic_replace(Path(path), lambda tmp: faiss.write_index(self.index, tmp))

    @classmethod
    def read(cls, path: Path, kind: str, params: Mapping[str, int], dim: int) -> VectorStore:
        """Read a FAISS file written by :meth:`write`; ``ValueError`` when it is not a ``kind`` index of ``dim``."""
        faiss = _faiss()
        try:
            index = faiss.read_index(str(path))
        except RuntimeError as exc:
            raise ValueError(f"FAISS cannot read it ({_first_line(exc)})") from exc
        inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap2) else index
        expected = {"flat": faiss.IndexFlat, "flat16": faiss.IndexScalarQuantizer, "hnsw": faiss.IndexHNSWFlat,
                    "ivfpq": faiss.IndexIVFPQ, "ivfsq8": faiss.IndexIVFScalarQuantizer}[kind]
        mapped = kind in ("flat", "flat16", "hnsw")
        if not isinstance(inner, expected) or mapped != isinstance(index, faiss.IndexIDMap2):
            raise ValueError(f"it holds a {type(inner).__name__}, the manifest says {kind}")
        if int(index.metric_type) != int(faiss.METRIC_INNER_PRODUCT):
            raise ValueError("it does not use the inner-product metric")
        if int(index.d) != int(dim):
            raise ValueError(f"it holds {index.d}-d vectors, the manifest says {dim}")
        return cls(index, kind, params, dim)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    last = text[-1] if text else type(exc).__name__
    return last[:200]


# ---------------------------------------------------------------------------------------------------------------------
# metadata (SQLite)
# ---------------------------------------------------------------------------------------------------------------------


def normalize_where(where: Mapping[str, Any] | Sequence[str] | None) -> list[tuple[str, tuple[Any, ...]]]:
    """Filter conditions as ``[(column, allowed values), ...]`` (ANDed).

    ``where``: a mapping (``{"camera": 3}``, a list value means any of) or ``KEY=VALUE`` strings (``--where``,
    repeatable; ``camera=1,3`` means camera 1 or 3; ``path=sub/*`` is a glob). Columns: :data:`WHERE_COLUMNS`.
    """
    if not where:
        return []
    items: list[tuple[str, Any, str]] = []
    if isinstance(where, Mapping):
        for key, value in where.items():
            values = list(value) if isinstance(value, (list, tuple, set, frozenset)) else [value]
            items.append((str(key), values, f"{key}={value}"))
    else:
        for item in where:
            key, sep, value = str(item).partition("=")
            key, value = key.strip(), value.strip()
            if not sep or not key or not value:
                raise UserError(f"--where {item!r}: expected KEY=VALUE, e.g. --where camera=3 (valid keys: "
                                f"{', '.join(WHERE_COLUMNS)})")
            items.append((key, [value], str(item)))
    out: list[tuple[str, tuple[Any, ...]]] = []
    for key, values, text in items:
        kind = WHERE_COLUMNS.get(key)
        if kind is None:
            raise UserError(f"--where {text}: unknown column {key!r}; valid columns: {', '.join(WHERE_COLUMNS)}")
        parsed: list[Any] = []
        for v in values:
            if kind is int:
                parts = v.split(",") if isinstance(v, str) else [v]
                for p in parts:
                    try:
                        if isinstance(p, bool) or (isinstance(p, float) and not float(p).is_integer()):
                            raise ValueError
                        parsed.append(int(p.strip()) if isinstance(p, str) else int(p))
                    except (TypeError, ValueError):
                        raise UserError(f"--where {text}: {key} takes an integer value, e.g. {key}=3") from None
            else:
                if not isinstance(v, str) or not v:
                    raise UserError(f"--where {text}: {key} takes a text value (a glob such as sub/*.jpg)")
                parsed.append(v)
        if not parsed:
            raise UserError(f"--where {text}: no value given; expected KEY=VALUE")
        out.append((key, tuple(parsed)))
    return out


def _describe_where(conds: Sequence[tuple[str, tuple[Any, ...]]]) -> str:
    return " ".join(f"{k}={','.join(map(str, v))}" for k, v in conds)


class MetadataDB:
    """The SQLite file of an index epoch (WAL mode). Rows are versioned by generation (see the module doc)."""

    def __init__(self, path: Path, *, create: bool = False) -> None:
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise FileNotFoundError(str(self.path))
        self.conn = sqlite3.connect(str(self.path), isolation_level=None, timeout=60)
        try:
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=FULL")
            if create:
                self.conn.executescript(_SCHEMA)
                self.conn.execute("INSERT OR REPLACE INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
            version = self.conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
            if version is None or version[0] != str(SCHEMA_VERSION):
                raise sqlite3.DatabaseError(f"schema version {version[0] if version else None}, "
                                            f"expected {SCHEMA_VERSION}")
        except BaseException:
            self.conn.close()
            raise

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self.conn.close()

    def rows(self, gen: int) -> list[Row]:
        cur = self.conn.execute(f"SELECT id, path, size, mtime_ns, identity, camera, indexed_at FROM files "
                                f"WHERE {_VISIBLE} ORDER BY path", (gen, gen))
        return [Row(int(i), FileEntry(p, int(s), int(m)), ident, cam, at) for i, p, s, m, ident, cam, at in cur]

    def commit(self, gen: int, committed: int, inserts: Sequence[Row], removes: Sequence[int],
               updates: Sequence[tuple[int, int | None, int | None]], meta: Mapping[str, str]) -> None:
        """One transaction: drop what an unfinished save left (generations > ``committed``), add ``inserts`` and
        remove ``removes`` as of generation ``gen``, apply metadata ``updates`` (id, identity, camera)."""
        c = self.conn
        c.execute("BEGIN IMMEDIATE")
        try:
            c.execute("DELETE FROM files WHERE added_gen > ?", (committed,))
            c.execute("UPDATE files SET removed_gen = NULL WHERE removed_gen > ?", (committed,))
            c.executemany("INSERT INTO files (id, path, size, mtime_ns, identity, camera, indexed_at, added_gen) "
                          "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                          ((r.id, r.entry.path, r.entry.size, r.entry.mtime_ns, r.identity, r.camera, r.indexed_at,
                            gen) for r in inserts))
            c.executemany("UPDATE files SET removed_gen = ? WHERE id = ? AND removed_gen IS NULL",
                          ((gen, int(i)) for i in removes))
            c.executemany("UPDATE files SET identity = ?, camera = ? WHERE id = ?",
                          ((ident, cam, int(i)) for i, ident, cam in updates))
            c.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", meta.items())
            c.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                c.execute("ROLLBACK")
            raise

    def collect(self, gen: int, *, pending: bool = False) -> None:
        """Delete the rows no generation >= ``gen`` can see (after the manifest of ``gen`` is in place); with
        ``pending``, also undo what an unfinished save of a later generation left (only under the folder's lock)."""
        c = self.conn
        c.execute("BEGIN IMMEDIATE")
        try:
            c.execute("DELETE FROM files WHERE removed_gen IS NOT NULL AND removed_gen <= ?", (gen,))
            if pending:
                c.execute("DELETE FROM files WHERE added_gen > ?", (gen,))
                c.execute("UPDATE files SET removed_gen = NULL WHERE removed_gen > ?", (gen,))
            c.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                c.execute("ROLLBACK")
            raise

    def select_ids(self, gen: int, conds: Sequence[tuple[str, tuple[Any, ...]]]) -> np.ndarray:
        sql, args = [_VISIBLE], [gen, gen]
        for col, values in conds:
            if col == "path":
                sql.append("(" + " OR ".join("path GLOB ?" for _ in values) + ")")
            else:
                sql.append(f"{col} IN ({', '.join('?' for _ in values)})")
            args.extend(values)
        cur = self.conn.execute(f"SELECT id FROM files WHERE {' AND '.join(sql)}", args)
        return np.fromiter((r[0] for r in cur), dtype=np.int64)

    def distinct(self, gen: int, column: str, limit: int = 12) -> list[Any]:
        cur = self.conn.execute(f"SELECT DISTINCT {column} FROM files WHERE {_VISIBLE} AND {column} IS NOT NULL "
                                f"ORDER BY {column} LIMIT ?", (gen, gen, limit + 1))
        return [r[0] for r in cur]


# ---------------------------------------------------------------------------------------------------------------------
# the gallery index
# ---------------------------------------------------------------------------------------------------------------------


class GalleryIndex:
    """Embeddings of the images of a gallery folder for one artifact, in FAISS, with their metadata in SQLite.

    Args:
        gallery: the gallery folder (paths in the index are relative to it).
        encoder: the artifact's encoder (:class:`Encoder`).
        artifact_hash: the artifact's lineage ``content_hash``; the index is only reused by the same artifact.
        index_dir: where the index files live (default :func:`default_index_dir`).
        files: index exactly these image files (each inside ``gallery``) instead of scanning the folder.
        tag: appended to the default index folder name (use it with ``files`` so subsets do not share an index).
        batch_size: images decoded and embedded at a time.
        progress: ``progress(done, total)`` called while embedding.
        spec: the index kind and parameters (:class:`IndexSpec`, or a kind name); default: keep the saved kind,
            flat for a new index.
        annotations: resolved image path -> ``{"identity": ..., "camera": ...}`` (either may be missing): stored
            in SQLite for new files and updated for known ones; ``None`` keeps what is stored.

    Typical use: ``GalleryIndex(...).refresh()`` (load, update, save), then :meth:`search`.
    """

    def __init__(self, gallery: Path, encoder: Encoder, artifact_hash: str, *, index_dir: Path | None = None,
                 files: Sequence[Path] | None = None, tag: str | None = None, batch_size: int = 32,
                 progress: Callable[[int, int], None] | None = None, spec: IndexSpec | str | None = None,
                 annotations: Mapping[Path, Mapping[str, int | None]] | None = None) -> None:
        if not artifact_hash:
            raise ValueError("artifact_hash must be the artifact's non-empty lineage content hash")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.gallery = Path(gallery)
        self.encoder = encoder
        self.artifact_hash = artifact_hash
        self.index_dir = Path(index_dir) if index_dir is not None else default_index_dir(self.gallery, artifact_hash,
                                                                                        tag)
        self._files_arg = [Path(f) for f in files] if files is not None else None
        self.batch_size = batch_size
        self.progress = progress
        self.spec = spec if isinstance(spec, IndexSpec) else IndexSpec(spec)
        self.annotations = annotations
        self.stats = IndexStats()
        self._reset()

    def _reset(self) -> None:
        self._rows: dict[str, Row] = {}
        self.unreadable: dict[str, tuple[FileEntry, str]] = {}
        self._store: VectorStore | None = None
        self._db: MetadataDB | None = None
        self._manifest: dict[str, Any] | None = None  # the committed one
        self._reuse_rows: dict[str, Row] = {}  # a format-1 index being converted
        self._reuse_vectors: Callable[[np.ndarray], np.ndarray] | None = None
        self._fresh = True  # the next save starts a new epoch (new files)
        self._inserts: list[Row] = []
        self._removes: list[int] = []
        self._meta_updates: list[tuple[int, int | None, int | None]] = []
        self._vectors_dirty = False
        self._manifest_dirty = False
        self._next_id = 1
        self._by_id: dict[int, Row] | None = None

    def close(self) -> None:
        """Close the SQLite connection (the index stays usable for reading what is in memory)."""
        if self._db is not None:
            self._db.close()
            self._db = None

    def __enter__(self) -> GalleryIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- properties ---------------------------------------------------------------------------------------------------

    @property
    def entries(self) -> list[FileEntry]:
        """The indexed files, sorted by relative path."""
        return [self._rows[p].entry for p in sorted(self._rows)]

    @property
    def rows(self) -> list[Row]:
        """The indexed files with their ids and metadata, sorted by relative path."""
        return [self._rows[p] for p in sorted(self._rows)]

    @property
    def paths(self) -> list[Path]:
        """Absolute-or-as-given paths of the indexed files, sorted by relative path."""
        return [self.gallery / p for p in sorted(self._rows)]

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def kind(self) -> str:
        return self._store.kind if self._store is not None else (self.spec.kind or "flat")

    @property
    def params(self) -> dict[str, int]:
        """The index parameters in use (as recorded in the manifest)."""
        return dict(self._store.params) if self._store is not None else {}

    @property
    def embeddings(self) -> np.ndarray:
        """``(N, D)`` float32, the stored vectors in :attr:`paths` order (decoded, so approximate, for ivf kinds)."""
        if self._store is None:
            return np.zeros((0, 0), dtype=np.float32)
        return self._store.reconstruct(np.array([r.id for r in self.rows], dtype=np.int64))

    @property
    def manifest_path(self) -> Path:
        return self.index_dir / MANIFEST_FILE

    @property
    def vectors_path(self) -> Path | None:
        name = (self._manifest or {}).get("vectors_file")
        return self.index_dir / name if name else None

    @property
    def metadata_path(self) -> Path | None:
        name = (self._manifest or {}).get("metadata_file")
        return self.index_dir / name if name else None

    @property
    def generation(self) -> int:
        return int((self._manifest or {}).get("generation", 0))

    # -- persistence --------------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the index folder's lock (one writer at a time; no-op where ``fcntl`` is missing). When the work
        under it fails and this call created the index folder, the folders it created are removed again (a failed
        first search leaves nothing behind)."""
        created = [p for p in (self.index_dir, *self.index_dir.parents) if not p.exists()]
        self._mkdir()
        try:
            with self._flock():
                yield
        except BaseException:
            if created:
                self._remove_created(created)
            raise

    @contextlib.contextmanager
    def _flock(self) -> Iterator[None]:
        try:
            import fcntl
        except ImportError:  # Windows
            yield
            return
        try:
            f = open(self.index_dir / LOCK_FILE, "a+b")  # closed by the with below
        except OSError as exc:  # a read-only folder: nothing else can write it either
            log.debug("%s: cannot open the lock file (%s); not locking", self.index_dir, exc.strerror)
            yield
            return
        with f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def _remove_created(self, created: list[Path]) -> None:
        """Remove the folders of ``created`` (deepest first) that hold nothing but the lock file."""
        for folder in created:
            try:
                names = {p.name for p in folder.iterdir()}
                if names <= {LOCK_FILE}:
                    (folder / LOCK_FILE).unlink(missing_ok=True)
                    folder.rmdir()
            except OSError:
                return

    def _mkdir(self) -> None:
        try:
            self.index_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"{self.index_dir}: cannot create the index folder ({exc.strerror}); "
                            "pass --index-dir with a writable folder") from exc

    def load(self, strict: bool = False) -> bool:
        """Read the saved index of this artifact; ``False`` (and an empty index) when there is none usable.

        An unusable one (unreadable or truncated file, another artifact's, rows that do not match) is reported on
        one warning line and ``False`` returned, so that :meth:`refresh` rebuilds it; with ``strict`` an
        :class:`IndexFileError` is raised instead. Nothing on disk is changed either way.
        """
        self.close()
        self._reset()
        if not self.manifest_path.is_file():
            if strict:
                raise IndexFileError(f"{self.index_dir}: no index here (no {MANIFEST_FILE}); run a search to build it")
            return False
        try:
            return self._load()
        except _Unusable as exc:
            self.close()
            self._reset()
            if strict:
                raise IndexFileError(f"{exc}; delete {self.index_dir} or search again to rebuild it") from None
            log.warning("%s; rebuilding the index", exc)
            return False

    def _load(self) -> bool:
        mpath = self.manifest_path
        try:
            manifest = json.loads(mpath.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise _Unusable(f"{mpath}: unreadable index manifest ({exc})") from None
        if not isinstance(manifest, dict) or manifest.get("format") not in (FORMAT_VERSION, LEGACY_FORMAT_VERSION):
            fmt = manifest.get("format") if isinstance(manifest, dict) else None
            raise _Unusable(f"{mpath}: unknown index format {fmt!r}")
        if manifest.get("artifact_hash") != self.artifact_hash:
            raise _Unusable(f"{self.index_dir}: index was built by another artifact (content hash "
                            f"{str(manifest.get('artifact_hash'))[:16]}, this one {self.artifact_hash[:16]}); "
                            "not reusing it")
        if manifest["format"] == LEGACY_FORMAT_VERSION:
            return self._load_legacy(manifest)
        try:
            gen, rows, dim = int(manifest["generation"]), int(manifest["rows"]), int(manifest["dim"])
            kind, params = str(manifest["index"]["kind"]), {k: int(v) for k, v in manifest["index"]["params"].items()}
            vname, mname = manifest["vectors_file"], str(manifest["metadata_file"])
            ntotal, tomb = int(manifest["ntotal"]), int(manifest["tombstones"])
            next_id = int(manifest["next_id"])
            unreadable = {str(f["path"]): (FileEntry(str(f["path"]), int(f["size"]), int(f["mtime_ns"])),
                                           str(f.get("error", ""))) for f in manifest.get("unreadable", [])}
            if kind not in INDEX_KINDS or set(params) != set(KIND_PARAMS[kind]):
                raise ValueError(f"index kind {kind!r} with parameters {sorted(params)}")
            for name in (vname, mname):
                if name is not None and (not isinstance(name, str) or Path(name).name != name or name.startswith(".")):
                    raise ValueError(f"bad file name {name!r}")
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise _Unusable(f"{mpath}: malformed index manifest ({exc})") from None
        store = None
        if vname is not None:
            vpath = self.index_dir / vname
            if not vpath.is_file():
                raise _Unusable(f"{vpath}: FAISS index file missing (interrupted write?)")
            size = vpath.stat().st_size
            if size != int(manifest.get("vectors_bytes", -1)) or sha256_file(vpath) != manifest.get("vectors_sha256"):
                raise _Unusable(f"{vpath}: FAISS index file does not match the manifest ({size} bytes, "
                                f"{manifest.get('vectors_bytes')} expected: truncated or interrupted write?)")
            try:
                store = VectorStore.read(vpath, kind, params, dim)
            except ValueError as exc:
                raise _Unusable(f"{vpath}: unusable FAISS index: {exc}") from None
            if store.ntotal != ntotal:
                raise _Unusable(f"{vpath}: FAISS index holds {store.ntotal} vectors, the manifest says {ntotal}")
        elif rows:
            raise _Unusable(f"{mpath}: malformed index manifest ({rows} rows but no vectors file)")
        try:
            db = MetadataDB(self.index_dir / mname)
        except (OSError, sqlite3.Error) as exc:
            raise _Unusable(f"{self.index_dir / mname}: unusable metadata database ({_first_line(exc)})") from None
        self._db = db
        try:
            found = db.rows(gen)
        except sqlite3.Error as exc:
            raise _Unusable(f"{db.path}: unusable metadata database ({_first_line(exc)})") from None
        if len(found) != rows:
            raise _Unusable(f"{db.path}: {len(found)} rows for generation {gen}, the manifest says {rows}")
        if store is not None:
            db_ids = np.array([r.id for r in found], dtype=np.int64)
            faiss_ids = store.ids()
            missing = np.setdiff1d(db_ids, faiss_ids)
            extra = np.setdiff1d(faiss_ids, db_ids)
            if len(missing) or (kind != "hnsw" and len(extra)) or len(extra) != tomb:
                raise _Unusable(f"{db.path}: metadata rows do not match the FAISS ids ({len(missing)} missing, "
                                f"{len(extra)} extra)")
            store.tombstones = extra
        self._manifest = manifest
        self._store = store
        self._rows = {r.entry.path: r for r in found}
        self.unreadable = unreadable
        self._next_id = next_id
        self._fresh = False
        return True

    def _load_legacy(self, manifest: dict[str, Any]) -> bool:
        """A format-1 index (``embeddings.npy``): its vectors are reused by the next update (no re-embedding)."""
        epath = self.index_dir / LEGACY_EMBEDDINGS_FILE
        try:
            entries = [FileEntry(str(f["path"]), int(f["size"]), int(f["mtime_ns"])) for f in manifest["files"]]
            unreadable = {str(f["path"]): (FileEntry(str(f["path"]), int(f["size"]), int(f["mtime_ns"])),
                                           str(f.get("error", ""))) for f in manifest.get("unreadable", [])}
            rows, dim, digest = int(manifest["rows"]), int(manifest["dim"]), str(manifest["embeddings_sha256"])
        except (KeyError, TypeError, ValueError) as exc:
            raise _Unusable(f"{self.manifest_path}: malformed index manifest ({exc})") from None
        if rows != len(entries) or not epath.is_file() or sha256_file(epath) != digest:
            raise _Unusable(f"{epath}: embeddings do not match the manifest (interrupted write?)")
        try:
            emb = np.load(epath, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise _Unusable(f"{epath}: unreadable embeddings ({exc})") from None
        if emb.dtype != np.float32 or emb.shape != (rows, dim):
            raise _Unusable(f"{epath}: embeddings have shape {emb.shape} {emb.dtype}, manifest says ({rows}, {dim})")
        log.info("%s: converting a format-1 index (embeddings.npy) to FAISS; its %d vectors are reused",
                 self.index_dir, rows)
        self._reuse_rows = {e.path: Row(i, e) for i, e in enumerate(entries)}
        self._reuse_vectors = lambda ids: np.asarray(emb[ids], dtype=np.float32)
        self.unreadable = unreadable
        self._fresh = True
        return True

    def save(self) -> None:
        """Write the FAISS file, commit the SQLite rows, then replace the manifest (skipped when nothing changed).

        Hold :meth:`locked` around load / update / save when other processes may write the same index (as
        :meth:`refresh` does).
        """
        pending = self._vectors_dirty or self._inserts or self._removes or self._fresh
        if not (pending or self._manifest_dirty or self._meta_updates) and self.manifest_path.is_file():
            return
        self._mkdir()
        committed = self.generation
        old = self._manifest or {}
        if not pending and not self._manifest_dirty:  # identity / camera only: one transaction, no new generation
            assert self._db is not None
            self._db.commit(committed, committed, [], [], self._meta_updates, {})
            self._meta_updates = []
            return
        gen = committed + 1 if pending else committed
        epoch = secrets.token_hex(4) if self._fresh else str(old["epoch"])
        vname = old.get("vectors_file")
        if self._fresh or self._vectors_dirty:
            vname = f"vectors-{epoch}-{gen}.faiss" if self._store is not None else None
        mname = f"metadata-{epoch}.sqlite" if self._fresh else str(old["metadata_file"])
        # 1. the FAISS file, under a new name: the committed manifest still names the old one
        if vname is not None and vname != old.get("vectors_file"):
            assert self._store is not None
            self._store.write(self.index_dir / vname)
        # 2. the SQLite rows of the new generation, in one transaction
        old_db = self._db
        if self._fresh:
            db_path = self.index_dir / mname
            for suffix in ("", "-wal", "-shm"):
                Path(f"{db_path}{suffix}").unlink(missing_ok=True)
            self._db = MetadataDB(db_path, create=True)
            inserts, removes = list(self._rows.values()), []
        else:
            inserts, removes = self._inserts, self._removes
        assert self._db is not None
        self._db.commit(gen, 0 if self._fresh else committed, inserts, removes, self._meta_updates,
                        {"artifact_hash": self.artifact_hash, "epoch": epoch})
        # 3. the manifest: the commit point
        vpath = self.index_dir / vname if vname is not None else None
        store = self._store
        manifest = {
            "format": FORMAT_VERSION,
            "artifact_hash": self.artifact_hash,
            "gallery": str(self.gallery.resolve()),
            "dim": store.dim if store is not None else 0,
            "rows": len(self._rows),
            "generation": gen,
            "epoch": epoch,
            "next_id": self._next_id,
            "index": {"kind": store.kind if store is not None else self.kind,
                      "params": dict(store.params) if store is not None else {}},
            "vectors_file": vname,
            "vectors_sha256": sha256_file(vpath) if vpath is not None else None,
            "vectors_bytes": vpath.stat().st_size if vpath is not None else 0,
            "ntotal": store.ntotal if store is not None else 0,
            "tombstones": len(store.tombstones) if store is not None else 0,
            "metadata_file": mname,
            "unreadable": [{**e.to_dict(), "error": err} for e, err in self.unreadable.values()],
            "updated_at": _now(),
        }
        if store is None and self._rows:
            raise RuntimeError("index rows without vectors")
        data = (json.dumps(manifest, indent=1) + "\n").encode("utf-8")
        _atomic_write(self.manifest_path, lambda f: f.write(data))
        self._manifest = manifest
        if old_db is not None and old_db is not self._db:
            old_db.close()
        self._fresh = False
        self._inserts, self._removes, self._meta_updates = [], [], []
        self._vectors_dirty = self._manifest_dirty = False
        self._reuse_rows, self._reuse_vectors = {}, None
        # 4. what no committed generation needs any more
        with contextlib.suppress(sqlite3.Error):
            self._db.collect(gen)
        self._remove_stale_files(keep={vname, mname})
        log.debug("saved index %s (generation %d, %d rows, %s)", self.index_dir, gen, len(self._rows), self.kind)

    def _remove_stale_files(self, keep: set[str | None]) -> None:
        keep_all = {n for n in keep if n} | {f"{n}{s}" for n in keep if n for s in ("-wal", "-shm")}
        for p in self.index_dir.iterdir():
            name = p.name
            stale = ((name.startswith("vectors-") and name.endswith(".faiss"))
                     or (name.startswith("metadata-") and (name.endswith((".sqlite", ".sqlite-wal", ".sqlite-shm"))))
                     or name == LEGACY_EMBEDDINGS_FILE
                     or (name.startswith(".") and name.endswith(".tmp")))
            if stale and name not in keep_all:
                with contextlib.suppress(OSError):
                    p.unlink()

    # -- updating -----------------------------------------------------------------------------------------------------

    def _check_gallery(self) -> None:
        if not self.gallery.is_dir():
            what = "does not exist" if not self.gallery.exists() else "is not a folder"
            raise UserError(f"{self.gallery}: gallery folder {what}; pass --gallery with a folder of images")

    def _current_files(self) -> list[FileEntry]:
        self._check_gallery()
        if self._files_arg is not None:
            paths = sorted(self._files_arg, key=lambda p: self._relative(p))
        else:
            paths = scan_images(self.gallery, skip=[self.index_dir])
        out = []
        for p in paths:
            try:
                st = p.stat()
            except OSError as exc:
                raise UserError(f"{p}: cannot read gallery file ({exc.strerror})") from exc
            out.append(FileEntry(self._relative(p), int(st.st_size), int(st.st_mtime_ns)))
        return out

    def _relative(self, path: Path) -> str:
        try:
            return Path(path).relative_to(self.gallery).as_posix()
        except ValueError:
            try:
                return Path(path).resolve().relative_to(self.gallery.resolve()).as_posix()
            except ValueError:
                raise UserError(f"{path}: gallery file is outside the gallery folder {self.gallery}") from None

    def _annotation(self, rel: str, base: Path) -> tuple[int | None, int | None]:
        """(identity, camera) of a file from :attr:`annotations` (``base``: the resolved gallery folder)."""
        if self.annotations is None:
            return None, None
        ann = self.annotations.get(base / rel)
        if ann is None:
            ann = self.annotations.get((self.gallery / rel).resolve())
        if ann is None:
            return None, None
        ident, cam = ann.get("identity"), ann.get("camera")
        return None if ident is None else int(ident), None if cam is None else int(cam)

    def offer_vectors(self, rows: Sequence[Row], vectors: np.ndarray) -> None:
        """Offer embeddings computed elsewhere (e.g. by shard processes, see :mod:`.shards`) for files of this
        gallery: the next :meth:`update` starts a new index and reuses each offered vector whose file still has the
        recorded size and modification time, embedding only the rest. ``rows[i]`` describes ``vectors[i]``."""
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or len(rows) != vectors.shape[0]:
            raise ValueError(f"offer_vectors: {len(rows)} rows for vectors of shape {tuple(vectors.shape)}")
        offered = {r.entry.path: Row(i, r.entry, r.identity, r.camera, r.indexed_at) for i, r in enumerate(rows)}
        if len(offered) != len(rows):
            raise ValueError("offer_vectors: a file is offered twice")
        self._store = None
        self._rows = {}
        self._reuse_rows = offered
        self._reuse_vectors = lambda ids: vectors[ids]
        self._fresh = True

    def update(self) -> IndexStats:
        """Bring the index in line with the folder: embed new and changed files, drop removed ones, convert or
        compact the FAISS index when needed (see the module doc)."""
        current = self._current_files()
        if self._store is None and not self._fresh:  # a saved index without vectors: nothing to keep
            self._fresh = True
        store = self._store
        kind = self.spec.kind or (store.kind if store is not None else "flat")
        self.spec.check(kind)
        explicit = self.spec.build_params()
        convert = store is not None and (kind != store.kind or any(store.params.get(k) != v
                                                                   for k, v in explicit.items()))
        if convert and store is not None and not store.exact:
            log.warning("%s: the %s index keeps compressed codes only; re-embedding every image for the %s index",
                        self.index_dir, store.kind, kind)
            self._reuse_rows = {}
            self._store = store = None
            self._fresh, convert = True, False
        fresh = self._fresh
        base = self._reuse_rows if fresh else self._rows
        stats = IndexStats(files=len(current), rebuilt=fresh and not base, kind=kind)
        current_paths = {e.path for e in current}
        removed = [p for p in base if p not in current_paths]
        stats.removed = len(removed)
        stale_unreadable = [p for p in self.unreadable if p not in current_paths]
        for p in stale_unreadable:
            del self.unreadable[p]
        drop_ids = [base[p].id for p in removed]
        keep: list[Row] = []
        todo: list[FileEntry] = []
        for e in current:
            old = base.get(e.path)
            bad = self.unreadable.get(e.path)
            if old is not None and old.entry == e:
                keep.append(old)
            elif bad is not None and bad[0] == e:
                stats.unreadable += 1  # unchanged and still unreadable: not retried
            else:
                if old is not None or bad is not None:
                    stats.changed += 1
                else:
                    stats.added += 1
                if old is not None:
                    drop_ids.append(old.id)
                self.unreadable.pop(e.path, None)
                todo.append(e)
        stats.reused = len(keep)
        if (fresh or convert) and kind in ("ivfpq", "ivfsq8"):
            _check_training(kind, explicit, len(keep) + len(todo))  # before embedding anything

        new_vecs = self._embed(todo, stats) if todo else {}
        base_dir = self.gallery.resolve() if self.annotations is not None else self.gallery
        now = _now()
        new_rows: list[Row] = []
        for e in todo:
            if e.path in new_vecs:
                ident, cam = self._annotation(e.path, base_dir)
                new_rows.append(Row(self._next_id, e, ident, cam, now))
                self._next_id += 1
        meta_updates: list[tuple[int, int | None, int | None]] = []
        if self.annotations is not None:
            for r in keep:
                ident, cam = self._annotation(r.entry.path, base_dir)
                if (ident, cam) != (r.identity, r.camera):
                    r.identity, r.camera = ident, cam
                    meta_updates.append((r.id, ident, cam))
            stats.metadata_updated = len(meta_updates)
        given = self.spec.given_params()
        if fresh:
            self._build_fresh(kind, given, keep, new_rows, new_vecs)
        else:
            assert store is not None
            if drop_ids:
                store.remove(drop_ids)
            if new_rows:
                store.add(np.array([r.id for r in new_rows], dtype=np.int64),
                          np.stack([new_vecs[r.entry.path] for r in new_rows]))
            for p in removed:
                del self._rows[p]
            for r in new_rows:
                self._rows[r.entry.path] = r
            self._inserts.extend(new_rows)
            self._removes.extend(drop_ids)
            self._meta_updates.extend(meta_updates)
            if drop_ids or new_rows:
                self._vectors_dirty = True
            if (not convert and store.kind == "hnsw"
                    and len(store.tombstones) > HNSW_COMPACT_FRACTION * max(store.ntotal, 1)):
                stats.compacted = True
            if convert or stats.compacted:
                live = np.array(sorted(r.id for r in self._rows.values()), dtype=np.int64)
                params = {**(store.params if kind == store.kind else {}), **given}
                self._store = VectorStore.build(kind, live, store.reconstruct(live), params)
                self._vectors_dirty = True
                stats.converted = convert
                log.info("%s: rebuilt the %s index from its %d stored vectors (%s)", self.index_dir, kind, len(live),
                         "kind or parameters changed" if convert else "tombstones dropped")
        store = self._store
        if store is not None:
            for key in SEARCH_PARAMS & set(self.spec.params) & set(store.params):
                if store.params[key] != int(self.spec.params[key]):
                    store.params[key] = int(self.spec.params[key])
                    if store.kind in ("ivfpq", "ivfsq8"):
                        store.index.nprobe = store.params["nprobe"]
                    self._manifest_dirty = True
            stats.tombstones = len(store.tombstones)
        if stale_unreadable or stats.new_unreadable:
            self._manifest_dirty = True
        self._by_id = None
        stats.indexed = len(self._rows)
        self.stats = stats
        if stats.new_unreadable:
            shown = ", ".join(stats.new_unreadable[:5]) + (" ..." if len(stats.new_unreadable) > 5 else "")
            log.warning("%d unreadable image(s) skipped in %s: %s", len(stats.new_unreadable), self.gallery, shown)
        log.info("gallery index %s (%s): %d images (%d reused, %d added, %d changed, %d removed, %d unreadable)",
                 self.index_dir, kind, stats.indexed, stats.reused, stats.added, stats.changed, stats.removed,
                 stats.unreadable)
        return stats

    def _build_fresh(self, kind: str, params: Mapping[str, int], keep: list[Row], new_rows: list[Row],
                     new_vecs: dict[str, np.ndarray]) -> None:
        """A new epoch: ids renumbered from 1, vectors reused from a format-1 index where they match."""
        parts = []
        if keep:
            assert self._reuse_vectors is not None
            parts.append(self._reuse_vectors(np.array([r.id for r in keep], dtype=np.int64)))
        if new_rows:
            parts.append(np.stack([new_vecs[r.entry.path] for r in new_rows]))
        rows = [Row(i, r.entry, r.identity, r.camera, r.indexed_at or _now())
                for i, r in enumerate(keep + new_rows, start=1)]
        self._next_id = len(rows) + 1
        self._rows = {r.entry.path: r for r in rows}
        if rows:
            vectors = l2_normalize(np.concatenate(parts).astype(np.float32))
            self._store = VectorStore.build(kind, np.array([r.id for r in rows], dtype=np.int64), vectors, params)
        else:
            self._store = None
        self._vectors_dirty = True

    def _embed(self, todo: list[FileEntry], stats: IndexStats) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        dim = self._store.dim if self._store is not None else None
        done = 0
        for start in range(0, len(todo), self.batch_size):
            batch = todo[start:start + self.batch_size]
            images, names = [], []
            for e in batch:
                try:
                    images.append(_read_image(self.gallery / e.path))
                    names.append(e.path)
                except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
                    self.unreadable[e.path] = (e, f"{type(exc).__name__}: {exc}")
                    stats.unreadable += 1
                    stats.new_unreadable.append(e.path)
            if images:
                vecs = l2_normalize(np.asarray(self.encoder.encode_images(images), dtype=np.float32))
                if vecs.ndim != 2 or vecs.shape[0] != len(images):
                    raise RuntimeError(f"encoder returned {vecs.shape[0]} embeddings for {len(images)} images")
                if dim is not None and vecs.shape[1] != dim:
                    raise RuntimeError(f"encoder returned {vecs.shape[1]}-d embeddings; the index holds {dim}-d ones")
                dim = vecs.shape[1]
                out.update(zip(names, vecs, strict=True))
                stats.embedded += len(images)
            done += len(batch)
            if self.progress is not None:
                self.progress(done, len(todo))
        return out

    def refresh(self, require_images: bool = False) -> IndexStats:
        """:meth:`load`, :meth:`update`, :meth:`save` under the folder's lock: the index is current and on disk.
        With ``require_images``, a gallery without one readable image is a :class:`UserError` raised before the save,
        so a first search of such a folder leaves no index behind."""
        self._check_gallery()
        with self.locked():
            loaded = self.load()
            stats = self.update()
            stats.rebuilt = not loaded
            if require_images and stats.files == 0:
                raise UserError(f"{self.gallery}: no image files ({', '.join(IMAGE_EXTENSIONS)}) found; pass a "
                                "folder of person crops")
            if require_images and len(self) == 0:
                raise UserError(f"{self.gallery}: none of the {stats.files} image files could be read; see the "
                                "warnings above")
            self.save()
            self._tidy()
        return stats

    def _tidy(self) -> None:
        """Drop what an interrupted save left behind (rows and files no committed generation uses)."""
        if self._manifest is None:
            return
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):
                self._db.collect(self.generation, pending=True)
        self._remove_stale_files(keep={self._manifest.get("vectors_file"), self._manifest.get("metadata_file")})

    # -- searching ----------------------------------------------------------------------------------------------------

    def where_ids(self, where: Mapping[str, Any] | Sequence[str]) -> np.ndarray:
        """The ids of the indexed files that match ``where`` (see :func:`normalize_where`), from SQLite."""
        conds = normalize_where(where)
        if self._db is None or self._inserts or self._removes or self._fresh:
            raise RuntimeError("save() the index before a filtered search")
        ids = self._db.select_ids(self.generation, conds)
        if len(ids):
            return ids
        for col, _ in conds:
            if col in _ANNOTATION_SOURCES and not self._db.distinct(self.generation, col, 1):
                raise UserError(f"--where {_describe_where(conds)}: no indexed image has a known {col} ({col}s come "
                                f"from {_ANNOTATION_SOURCES[col]}: pass --data ROOT or a gallery that is a dataset "
                                "root)")
        hints = []
        for col, _ in conds:
            if col in ("camera", "identity"):
                present = self._db.distinct(self.generation, col)
                shown = ", ".join(map(str, present[:12])) + (", ..." if len(present) > 12 else "")
                hints.append(f"{col} values present: {shown}")
        hint = f" ({'; '.join(hints)})" if hints else ""
        raise UserError(f"--where {_describe_where(conds)}: no indexed image matches{hint}; check the values")

    def search_vectors(self, queries: np.ndarray, k: int, where: Mapping[str, Any] | Sequence[str] | None = None,
                       ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` files per query embedding: ``(scores, ids)``, each ``(Q, min(k, matches))``, best first (ids
        -1 where an approximate index found fewer). Map ids to files with :meth:`row_of`."""
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
            raise UserError(f"top-k must be a positive integer, got {k!r}")
        if len(self._rows) == 0 or self._store is None:
            raise UserError(f"{self.gallery}: the gallery has no readable images to search "
                            f"({self.stats.unreadable} unreadable); add .jpg/.jpeg/.png/.bmp/.webp files")
        subset = self.where_ids(where) if where else None
        q = np.asarray(queries, dtype=np.float32)
        if q.ndim == 1:
            q = q[None, :]
        parts = [self._store.search(q[s:s + _QUERY_BATCH], int(k), subset) for s in range(0, len(q), _QUERY_BATCH)]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def row_of(self, file_id: int) -> Row:
        """The indexed file with FAISS id ``file_id``."""
        if self._by_id is None:
            self._by_id = {r.id: r for r in self._rows.values()}
        return self._by_id[int(file_id)]

    def search(self, query_texts: Sequence[str] | str, k: int,
               where: Mapping[str, Any] | Sequence[str] | None = None) -> list[list[tuple[Path, float]]]:
        """For each query text, the ``k`` best gallery files as ``(path, cosine score)``, best first; ``where``
        restricts the search to files whose metadata match (e.g. ``{"camera": 3}``)."""
        if isinstance(query_texts, str):
            query_texts = [query_texts]
        if where:
            normalize_where(where)  # malformed filters fail before any encoding
        if len(self._rows) == 0:
            self.search_vectors(np.zeros((1, 1), dtype=np.float32), k)  # raises the empty-gallery error
        out: list[list[tuple[Path, float]]] = []
        for s in range(0, len(query_texts), _QUERY_BATCH):
            q = self.encoder.encode_texts(list(query_texts[s:s + _QUERY_BATCH]))
            scores, ids = self.search_vectors(q, k, where)
            out.extend([(self.gallery / self.row_of(i).entry.path, float(v))
                        for v, i in zip(sc, rw, strict=True) if i >= 0]
                       for sc, rw in zip(scores, ids, strict=True))
        return out


class _Unusable(Exception):
    """Internal: the saved index cannot be used (message: one line, naming the file)."""
