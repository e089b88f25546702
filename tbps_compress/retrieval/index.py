"""A gallery index: the image embeddings of a folder of person crops, kept up to date incrementally.

Layout (default ``GALLERY/.tbps_index/<artifact content hash[:16]>/``)::

    embeddings.npy   (N, D) float32, L2-normalised, one row per indexed file, in manifest order
    manifest.json    {"format": 1, "artifact_hash": ..., "gallery": ..., "dim": D, "rows": N,
                      "embeddings_sha256": ..., "files": [{"path", "size", "mtime_ns"}, ...],
                      "unreadable": [{"path", "size", "mtime_ns", "error"}, ...]}

- Image files: ``.jpg .jpeg .png .bmp .webp`` (any case), found recursively, sorted by relative POSIX path.
  Hidden files and folders (name starting with ``.``) are not scanned, so the index never indexes itself.
- :meth:`GalleryIndex.update` compares the folder with the manifest by (relative path, size, mtime_ns): new and
  changed files are embedded, removed ones dropped, the rest reused. Unreadable images are skipped with a warning,
  recorded (so they are not retried until they change) and counted.
- Both files are written to temporary names and moved into place with ``os.replace``; the manifest goes last and
  holds the SHA-256 of ``embeddings.npy``, so a crash between the two moves is detected on load (the index is then
  rebuilt rather than trusted).
- An index is tied to one artifact by its lineage ``content_hash``: one written by another artifact is never
  reused (it is rebuilt from scratch).
- Search is chunked over the gallery (:func:`tbps_compress.runtime.cosine_topk`) and batched over queries, so
  memory stays bounded for large galleries; the embeddings are memory-mapped when loaded.

This module imports neither torch nor open_clip: encoders are passed in (see :class:`Encoder`).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import numpy as np
from PIL import Image

from ..artifacts import sha256_file
from ..errors import UserError
from ..runtime.encoder import cosine_topk, l2_normalize

log = logging.getLogger(__name__)

__all__ = ["IMAGE_EXTENSIONS", "INDEX_DIRNAME", "Encoder", "FileEntry", "GalleryIndex", "IndexStats",
           "default_index_dir", "scan_images"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
INDEX_DIRNAME = ".tbps_index"
EMBEDDINGS_FILE = "embeddings.npy"
MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 1
_QUERY_BATCH = 1024
_SEARCH_CHUNK = 4096


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


def _atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class GalleryIndex:
    """Embeddings of the images of a gallery folder for one artifact.

    Args:
        gallery: the gallery folder (paths in the manifest are relative to it).
        encoder: the artifact's encoder (:class:`Encoder`).
        artifact_hash: the artifact's lineage ``content_hash``; the index is only reused by the same artifact.
        index_dir: where ``embeddings.npy`` and ``manifest.json`` live (default :func:`default_index_dir`).
        files: index exactly these image files (each inside ``gallery``) instead of scanning the folder.
        tag: appended to the default index folder name (use it with ``files`` so subsets do not share an index).
        batch_size: images decoded and embedded at a time.
        progress: ``progress(done, total)`` called while embedding.

    Typical use: ``GalleryIndex(...).refresh()`` (load, update, save), then :meth:`search`.
    """

    def __init__(self, gallery: Path, encoder: Encoder, artifact_hash: str, *, index_dir: Path | None = None,
                 files: Sequence[Path] | None = None, tag: str | None = None, batch_size: int = 32,
                 progress: Callable[[int, int], None] | None = None) -> None:
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
        self.entries: list[FileEntry] = []
        self.unreadable: dict[str, tuple[FileEntry, str]] = {}
        self.embeddings: np.ndarray = np.zeros((0, 0), dtype=np.float32)
        self.stats = IndexStats()
        self._dirty = False

    # -- properties ---------------------------------------------------------------------------------------------------

    @property
    def paths(self) -> list[Path]:
        """Absolute-or-as-given paths of the indexed files, in row order."""
        return [self.gallery / e.path for e in self.entries]

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def manifest_path(self) -> Path:
        return self.index_dir / MANIFEST_FILE

    @property
    def embeddings_path(self) -> Path:
        return self.index_dir / EMBEDDINGS_FILE

    # -- persistence --------------------------------------------------------------------------------------------------

    def load(self) -> bool:
        """Read a saved index for this artifact; ``False`` (and an empty index) when there is none usable."""
        self.entries, self.unreadable = [], {}
        self.embeddings = np.zeros((0, 0), dtype=np.float32)
        if not self.manifest_path.is_file():
            return False
        try:
            manifest = json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            log.warning("%s: unreadable index manifest (%s); rebuilding the index", self.manifest_path, exc)
            return False
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION:
            log.warning("%s: unknown index format; rebuilding the index", self.manifest_path)
            return False
        if manifest.get("artifact_hash") != self.artifact_hash:
            log.warning("%s: index was built by another artifact (content hash %s, this one %s); not reusing it, "
                        "rebuilding", self.index_dir, str(manifest.get("artifact_hash"))[:16], self.artifact_hash[:16])
            return False
        try:
            entries = [FileEntry(str(f["path"]), int(f["size"]), int(f["mtime_ns"])) for f in manifest["files"]]
            unreadable = {str(f["path"]): (FileEntry(str(f["path"]), int(f["size"]), int(f["mtime_ns"])),
                                           str(f.get("error", "")))
                          for f in manifest.get("unreadable", [])}
            rows, dim, digest = int(manifest["rows"]), int(manifest["dim"]), str(manifest["embeddings_sha256"])
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("%s: malformed index manifest (%s); rebuilding the index", self.manifest_path, exc)
            return False
        if rows != len(entries) or not self.embeddings_path.is_file() or sha256_file(self.embeddings_path) != digest:
            log.warning("%s: embeddings do not match the manifest (interrupted write?); rebuilding the index",
                        self.index_dir)
            return False
        try:
            emb = np.load(self.embeddings_path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            log.warning("%s: unreadable embeddings (%s); rebuilding the index", self.embeddings_path, exc)
            return False
        if emb.dtype != np.float32 or emb.shape != (rows, dim):
            log.warning("%s: embeddings have shape %s %s, manifest says (%d, %d) float32; rebuilding the index",
                        self.embeddings_path, emb.shape, emb.dtype, rows, dim)
            return False
        self.entries, self.unreadable, self.embeddings = entries, unreadable, emb
        return True

    def save(self) -> None:
        """Write ``embeddings.npy`` then ``manifest.json`` atomically (skipped when nothing changed)."""
        if not self._dirty and self.manifest_path.is_file():
            return
        try:
            self.index_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"{self.index_dir}: cannot create the index folder ({exc.strerror}); "
                            "pass --index with a writable folder") from exc
        emb = np.ascontiguousarray(self.embeddings, dtype=np.float32)
        _atomic_write(self.embeddings_path, lambda f: np.save(f, emb, allow_pickle=False))
        manifest = {
            "format": FORMAT_VERSION,
            "artifact_hash": self.artifact_hash,
            "gallery": str(self.gallery.resolve()),
            "rows": int(emb.shape[0]),
            "dim": int(emb.shape[1]),
            "embeddings_sha256": sha256_file(self.embeddings_path),
            "files": [e.to_dict() for e in self.entries],
            "unreadable": [{**e.to_dict(), "error": err} for e, err in self.unreadable.values()],
        }
        data = (json.dumps(manifest, indent=1) + "\n").encode("utf-8")
        _atomic_write(self.manifest_path, lambda f: f.write(data))
        self._dirty = False
        log.debug("saved index %s (%d rows)", self.index_dir, emb.shape[0])

    # -- updating -----------------------------------------------------------------------------------------------------

    def _current_files(self) -> list[FileEntry]:
        if not self.gallery.is_dir():
            what = "does not exist" if not self.gallery.exists() else "is not a folder"
            raise UserError(f"{self.gallery}: gallery folder {what}; pass --gallery with a folder of images")
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

    def update(self) -> IndexStats:
        """Bring the index in line with the folder: embed new and changed files, drop removed ones."""
        current = self._current_files()
        old_rows = {e.path: i for i, e in enumerate(self.entries)}
        old_entries = {e.path: e for e in self.entries}
        stats = IndexStats(files=len(current), rebuilt=not self.entries and not self.unreadable)
        current_paths = {e.path for e in current}
        stats.removed = sum(1 for p in old_entries if p not in current_paths)
        removed_unreadable = [p for p in self.unreadable if p not in current_paths]
        for p in removed_unreadable:
            del self.unreadable[p]

        keep: list[tuple[FileEntry, int]] = []  # (entry, old row)
        todo: list[FileEntry] = []
        for e in current:
            old = old_entries.get(e.path)
            bad = self.unreadable.get(e.path)
            if old == e:
                keep.append((e, old_rows[e.path]))
            elif bad is not None and bad[0] == e:
                stats.unreadable += 1  # unchanged and still unreadable: not retried
            else:
                if old is not None or bad is not None:
                    stats.changed += 1
                else:
                    stats.added += 1
                self.unreadable.pop(e.path, None)
                todo.append(e)
        stats.reused = len(keep)

        new_vecs: dict[str, np.ndarray] = {}
        if todo:
            new_vecs = self._embed(todo, stats)
        dim = self._dim(new_vecs)
        final: list[FileEntry] = []
        emb = np.empty((len(keep) + len(new_vecs), dim), dtype=np.float32)
        kept_rows = {e.path: r for e, r in keep}
        for e in current:
            if e.path in kept_rows:
                emb[len(final)] = self.embeddings[kept_rows[e.path]]
            elif e.path in new_vecs:
                emb[len(final)] = new_vecs[e.path]
            else:
                continue
            final.append(e)
        if todo or stats.removed or removed_unreadable or len(final) != len(self.entries):
            self.entries, self.embeddings = final, emb
            self._dirty = True
        stats.indexed = len(self.entries)
        self.stats = stats
        if stats.new_unreadable:
            shown = ", ".join(stats.new_unreadable[:5]) + (" ..." if len(stats.new_unreadable) > 5 else "")
            log.warning("%d unreadable image(s) skipped in %s: %s", len(stats.new_unreadable), self.gallery, shown)
        log.info("gallery index %s: %d images (%d reused, %d added, %d changed, %d removed, %d unreadable)",
                 self.index_dir, stats.indexed, stats.reused, stats.added, stats.changed, stats.removed,
                 stats.unreadable)
        return stats

    def _dim(self, new_vecs: dict[str, np.ndarray]) -> int:
        if new_vecs:
            return int(next(iter(new_vecs.values())).shape[0])
        return int(self.embeddings.shape[1]) if self.embeddings.ndim == 2 else 0

    def _embed(self, todo: list[FileEntry], stats: IndexStats) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
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
                if vecs.shape[0] != len(images):
                    raise RuntimeError(f"encoder returned {vecs.shape[0]} embeddings for {len(images)} images")
                if self.embeddings.shape[0] and vecs.shape[1] != self.embeddings.shape[1]:
                    raise RuntimeError(f"encoder returned {vecs.shape[1]}-d embeddings; the index holds "
                                       f"{self.embeddings.shape[1]}-d ones")
                out.update(zip(names, vecs, strict=True))
                stats.embedded += len(images)
            done += len(batch)
            if self.progress is not None:
                self.progress(done, len(todo))
        return out

    def refresh(self) -> IndexStats:
        """:meth:`load`, :meth:`update`, :meth:`save`: the index is current and on disk afterwards."""
        loaded = self.load()
        stats = self.update()
        stats.rebuilt = not loaded
        self.save()
        return stats

    # -- searching ----------------------------------------------------------------------------------------------------

    def search_embeddings(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` rows per query embedding: ``(scores, row indices)``, each ``(Q, min(k, N))``, best first."""
        if not isinstance(k, (int, np.integer)) or k < 1:
            raise UserError(f"top-k must be a positive integer, got {k!r}")
        if len(self.entries) == 0:
            raise UserError(f"{self.gallery}: the gallery has no readable images to search "
                            f"({self.stats.unreadable} unreadable); add .jpg/.jpeg/.png/.bmp/.webp files")
        q = np.asarray(queries, dtype=np.float32)
        if q.ndim == 1:
            q = q[None, :]
        kk = min(int(k), len(self.entries))
        scores = np.empty((q.shape[0], kk), dtype=np.float32)
        rows = np.empty((q.shape[0], kk), dtype=np.int64)
        for s in range(0, q.shape[0], _QUERY_BATCH):
            scores[s:s + _QUERY_BATCH], rows[s:s + _QUERY_BATCH] = cosine_topk(
                q[s:s + _QUERY_BATCH], self.embeddings, kk, chunk=_SEARCH_CHUNK)
        return scores, rows

    def search(self, query_texts: Sequence[str] | str, k: int) -> list[list[tuple[Path, float]]]:
        """For each query text, the ``k`` best gallery files as ``(path, cosine score)``, best first."""
        if isinstance(query_texts, str):
            query_texts = [query_texts]
        if len(self.entries) == 0:
            self.search_embeddings(np.zeros((1, 1), dtype=np.float32), k)  # raises the empty-gallery error
        paths = self.paths
        out: list[list[tuple[Path, float]]] = []
        for s in range(0, len(query_texts), _QUERY_BATCH):
            q = self.encoder.encode_texts(list(query_texts[s:s + _QUERY_BATCH]))
            scores, rows = self.search_embeddings(q, k)
            out.extend([(paths[int(r)], float(v)) for v, r in zip(sc, rw, strict=True)]
                       for sc, rw in zip(scores, rows, strict=True))
        return out
