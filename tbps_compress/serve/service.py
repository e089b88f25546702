"""The search service behind ``tbps-compress serve``: an ONNX encoder and a gallery index, safe to share between
request threads.

Concurrency model:

- One :class:`~tbps_compress.runtime.OnnxEncoder` (one onnxruntime session per tower) serves every request;
  onnxruntime's ``InferenceSession.run`` may be called from several threads at once, so text queries are encoded in
  parallel.
- The index is a *snapshot*: a :class:`ServedIndex` that is never changed once published. Searches take the
  current snapshot (under :attr:`GalleryService._swap_lock`, held for one attribute read) and search it without any
  lock; FAISS searches of an index nobody modifies are thread-safe, and filtered searches read the metadata from
  memory (no SQLite connection is shared between threads).
- Writers (uploads, deletions) are serialised by :attr:`GalleryService._write_lock`. A writer changes the gallery
  folder (writes or deletes a file), then builds the next snapshot exactly as a start does (load the saved index,
  embed what is new, save it to disk: :meth:`GalleryIndex.refresh`), and only then takes the swap lock to publish
  it. Searches meanwhile keep using the previous snapshot; they wait at most for the swap itself.

Uploads are checked before anything is written: a size limit, a file name without any path (the name is only echoed
back, never used), and a full decode with Pillow (a file is an image because it decodes, not because of its
extension), within a pixel limit. The decoded pixels are stored as PNG (EXIF orientation applied, no metadata kept:
an uploaded photo's GPS tags and camera serial numbers are not retained) under ``GALLERY/uploads/`` with a name the
server chooses.
"""

from __future__ import annotations

import collections
import io
import logging
import secrets
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..artifacts import open_artifact
from ..errors import UserError
from ..io_utils import atomic_file
from ..retrieval.index import GalleryIndex, Row, normalize_where
from ..runtime import OnnxEncoder

log = logging.getLogger(__name__)

__all__ = ["UPLOAD_DIRNAME", "GalleryService", "Limits", "ServeError", "ServedIndex", "check_upload_name",
           "decode_upload"]

UPLOAD_DIRNAME = "uploads"
UPLOAD_FORMATS = {"JPEG": "JPEG", "PNG": "PNG", "BMP": "BMP", "WEBP": "WebP"}  # Pillow format -> name for messages
_THUMB_CACHE = 512


class ServeError(Exception):
    """A request the service refuses: an HTTP status (4xx) and a one-line message saying what to change."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = int(status)
        self.message = " ".join(str(message).split())


@dataclass(frozen=True)
class Limits:
    """What one request may ask for (``tbps-compress serve`` flags in brackets)."""

    max_query_chars: int = 1000  # [--max-query-chars] characters of query text
    max_k: int = 100  # results per search
    max_upload_bytes: int = 10 * 1024 * 1024  # [--max-upload-mb] bytes per uploaded file
    max_files: int = 16  # files per upload request
    max_pixels: int = 25_000_000  # width * height of an uploaded image
    max_json_bytes: int = 64 * 1024  # body of a JSON request (/search)

    @property
    def max_upload_request_bytes(self) -> int:
        """Body limit of ``POST /gallery``: every file at its limit plus room for the multipart headers."""
        return self.max_files * self.max_upload_bytes + 64 * 1024


# ---------------------------------------------------------------------------------------------------------------------
# the index snapshot
# ---------------------------------------------------------------------------------------------------------------------


class ServedIndex(GalleryIndex):
    """A :class:`GalleryIndex` whose filtered searches read the file metadata from memory instead of SQLite.

    After :meth:`refresh` the service closes the SQLite connection (it belongs to the writer's thread); FAISS and the
    rows stay in memory, and :meth:`where_ids` answers ``where`` filters from a column table built once per snapshot,
    with the same semantics as the SQLite query (values ANDed across columns, any of the listed values within one,
    ``path`` as a case-sensitive glob), so any thread can search the snapshot.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._table: dict[str, Any] | None = None
        self._table_lock = threading.Lock()

    def _columns(self) -> dict[str, Any]:
        with self._table_lock:
            if self._table is None:
                rows = self.rows
                table: dict[str, Any] = {"id": np.array([r.id for r in rows], dtype=np.int64),
                                         "path": [r.entry.path for r in rows]}
                for col, get in (("size", lambda r: r.entry.size), ("mtime_ns", lambda r: r.entry.mtime_ns),
                                 ("identity", lambda r: r.identity), ("camera", lambda r: r.camera)):
                    values = [get(r) for r in rows]
                    table[col] = np.array([-1 if v is None else v for v in values], dtype=np.int64)
                    table[f"{col}_known"] = np.array([v is not None for v in values], dtype=bool)
                self._table = table
            return self._table

    def where_ids(self, where: Mapping[str, Any] | Sequence[str]) -> np.ndarray:
        conds = normalize_where(where)
        table = self._columns()
        mask = np.ones(len(table["id"]), dtype=bool)
        for col, values in conds:
            if col == "path":
                mask &= np.fromiter((any(fnmatchcase(p, str(v)) for v in values) for p in table["path"]),
                                    dtype=bool, count=len(table["path"]))
            else:
                mask &= table[f"{col}_known"] & np.isin(table[col], np.asarray(values, dtype=np.int64))
        if mask.any():
            return table["id"][mask]
        described = " ".join(f"{k}={','.join(map(str, v))}" for k, v in conds)
        for col, _ in conds:
            if col in ("camera", "identity") and not table[f"{col}_known"].any():
                raise UserError(f"where {described}: no indexed image has a known {col}; {col}s come from the "
                                "dataset annotation (start the server with --data ROOT, or on a gallery that is a "
                                "dataset root)")
        hints = []
        for col, _ in conds:
            if col in ("camera", "identity"):
                present = sorted(set(table[col][table[f"{col}_known"]].tolist()))
                shown = ", ".join(map(str, present[:12])) + (", ..." if len(present) > 12 else "")
                hints.append(f"{col} values present: {shown}")
        hint = f" ({'; '.join(hints)})" if hints else ""
        raise UserError(f"where {described}: no indexed image matches{hint}; check the values")


# ---------------------------------------------------------------------------------------------------------------------
# uploads
# ---------------------------------------------------------------------------------------------------------------------


def check_upload_name(name: str | None) -> str:
    """The client's file name, checked to be a plain name (it is echoed back only; never used as a path).
    A name with a directory part, ``..``, a NUL or a leading dot is refused (400)."""
    if not name:
        return ""
    shown = name if len(name) <= 80 else name[:77] + "..."
    if "/" in name or "\\" in name or "\x00" in name or name.startswith(".") or len(name) > 255:
        raise ServeError(400, f"file name {shown!r}: must be a plain file name (no folders, no '..', no leading "
                              "dot); the server chooses where uploads are stored")
    if any(ord(c) < 32 for c in name):
        raise ServeError(400, f"file name {shown!r}: contains control characters; rename the file")
    return name


def decode_upload(name: str, data: bytes, limits: Limits) -> Image.Image:
    """Decode an uploaded file fully (an image is what Pillow decodes, whatever the extension): the RGB image with
    its EXIF orientation applied. Refusals are :class:`ServeError` (413 too large, 415 not a supported image)."""
    label = f"file {name!r}" if name else "uploaded file"
    if not data:
        raise ServeError(400, f"{label}: empty file; upload a JPEG, PNG, BMP or WebP image")
    if len(data) > limits.max_upload_bytes:
        raise ServeError(413, f"{label}: {len(data)} bytes, over the limit of {limits.max_upload_bytes} bytes per "
                              "file (--max-upload-mb); shrink the image")
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format
            if fmt not in UPLOAD_FORMATS:
                raise ServeError(415, f"{label}: a {fmt} image; upload JPEG, PNG, BMP or WebP")
            w, h = im.size
            if w * h > limits.max_pixels:
                raise ServeError(413, f"{label}: {w}x{h} pixels, over the limit of {limits.max_pixels}; shrink the "
                                      "image")
            im.load()  # the whole image: a truncated or corrupt file fails here, not later in the index
            out = ImageOps.exif_transpose(im).convert("RGB")
    except ServeError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError) as exc:
        detail = "Pillow cannot identify it" if isinstance(exc, UnidentifiedImageError) else "a decompression bomb"
        raise ServeError(415, f"{label}: not an image ({detail}); upload a JPEG, PNG, BMP or WebP image") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        detail = " ".join(str(exc).split())[:120] or type(exc).__name__
        raise ServeError(415, f"{label}: cannot be decoded ({detail}); upload a complete JPEG, PNG, BMP or WebP "
                              "image") from None
    if min(out.size) < 1:
        raise ServeError(415, f"{label}: image has no pixels")
    return out


# ---------------------------------------------------------------------------------------------------------------------
# the service
# ---------------------------------------------------------------------------------------------------------------------


class _Latencies:
    """Search latencies of the last ``size`` searches (seconds), with a lock: p50 / p99 for ``/stats``."""

    def __init__(self, size: int = 1000) -> None:
        self._values: collections.deque[float] = collections.deque(maxlen=size)
        self._lock = threading.Lock()
        self.count = 0

    def add(self, seconds: float) -> None:
        with self._lock:
            self._values.append(seconds)
            self.count += 1

    def summary(self) -> dict[str, Any]:
        with self._lock:
            values = np.array(self._values, dtype=np.float64)
            count = self.count
        out: dict[str, Any] = {"searches": count, "window": int(len(values))}
        if len(values):
            p50, p99 = np.percentile(values, [50, 99]) * 1000
            out.update(p50_ms=round(float(p50), 3), p99_ms=round(float(p99), 3),
                       mean_ms=round(float(values.mean() * 1000), 3))
        else:
            out.update(p50_ms=None, p99_ms=None, mean_ms=None)
        return out


class GalleryService:
    """An ONNX artifact and a gallery folder, ready to be searched and changed from many threads.

    Args:
        artifact: an ONNX artifact folder (``tbps-compress export`` / ``quantize`` output); hash-verified.
        gallery: the folder of person crops (recursive); uploads go to its ``uploads/`` subfolder.
        index_dir: the index folder (default ``GALLERY/.tbps_index/<artifact hash>``).
        data: a dataset root whose annotations give the gallery's identities / cameras (default: the gallery itself
            when it is a dataset root).
        threads: onnxruntime intra-op threads per run (None: onnxruntime's default).
        batch_size: images embedded at a time while indexing.
        limits: per-request limits (:class:`Limits`).

    The gallery is indexed by the constructor (incrementally: a saved index of the same artifact is reused and
    only new or changed files are embedded), and the text tower is loaded, so the first search is not slow.
    """

    def __init__(self, artifact: Path, gallery: Path, *, index_dir: Path | None = None, data: Path | None = None,
                 threads: int | None = None, batch_size: int = 32, limits: Limits | None = None) -> None:
        from ..retrieval.search import artifact_hash

        self.limits = limits or Limits()
        self.gallery = Path(gallery)
        if not self.gallery.is_dir():
            what = "does not exist" if not self.gallery.exists() else "is not a folder"
            raise UserError(f"{self.gallery}: gallery folder {what}; pass --gallery with a folder of images")
        art = open_artifact(Path(artifact))
        if art.kind != "onnx":
            raise UserError(f"{artifact}: a {art.kind} artifact; serve needs an ONNX artifact (make one with "
                            "`tbps-compress export ARTIFACT --out DIR`)")
        self.artifact = art
        self.model_name = str((art.model_config or {}).get("name") or "unknown")
        self.encoder = OnnxEncoder(art.path, threads=threads)
        self.artifact_hash = artifact_hash(art)
        self.index_dir = index_dir
        self.batch_size = batch_size
        self.annotations = _annotations(self.gallery, data)
        self._write_lock = threading.Lock()
        self._swap_lock = threading.Lock()
        self._thumbs: collections.OrderedDict[tuple[Any, ...], bytes] = collections.OrderedDict()
        self._thumbs_lock = threading.Lock()
        self.latencies = _Latencies()
        self.uploads = 0
        self.deletions = 0
        self.started = time.time()
        self.encoder.encode_texts(["warm-up"])  # loads the text tower (and checks it) before serving
        self._index = self._build()

    # -- snapshots ----------------------------------------------------------------------------------------------------

    def _build(self) -> ServedIndex:
        """The next snapshot: the saved index loaded, brought in line with the folder, saved; its SQLite closed."""
        index = ServedIndex(self.gallery, self.encoder, self.artifact_hash, index_dir=self.index_dir,
                            batch_size=self.batch_size, annotations=self.annotations)
        try:
            index.refresh()
        finally:
            index.close()
        return index

    def current(self) -> ServedIndex:
        """The snapshot searches use now (never changed after it is published)."""
        with self._swap_lock:
            return self._index

    def _publish(self, index: ServedIndex) -> None:
        with self._swap_lock:
            self._index = index

    # -- searching ----------------------------------------------------------------------------------------------------

    def check_query(self, text: Any, k: Any, where: Any) -> tuple[str, int, dict[str, Any] | None]:
        """The request's text, k and filter, or a :class:`ServeError` saying which field is wrong and how."""
        lim = self.limits
        if not isinstance(text, str) or not text.strip():
            raise ServeError(400, "text: give a non-empty description, e.g. \"a woman in a red coat with a black "
                                  "bag\"")
        if len(text) > lim.max_query_chars:
            raise ServeError(400, f"text: {len(text)} characters, over the limit of {lim.max_query_chars} "
                                  "(--max-query-chars); shorten the description")
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= lim.max_k:
            raise ServeError(400, f"k: must be an integer from 1 to {lim.max_k}, got {k!r}")
        if where is not None and not isinstance(where, Mapping):
            raise ServeError(400, "where: must be an object such as {\"camera\": 3} or {\"camera\": [1, 3]}")
        if where:
            try:
                normalize_where(where)
            except UserError as exc:
                raise ServeError(400, str(exc).replace("--where ", "where ", 1)) from None
        return text, k, dict(where) if where else None

    def search(self, text: Any, k: Any = 10, where: Any = None) -> dict[str, Any]:
        """Rank the gallery for ``text``: the top ``k`` (matching ``where``) with their scores and metadata, the
        query embedding and the time taken (encode, search, total)."""
        text, k, where = self.check_query(text, k, where)
        t0 = time.perf_counter()
        emb = self.encoder.encode_texts([text])
        t1 = time.perf_counter()
        index = self.current()
        if len(index) == 0:
            raise ServeError(409, f"{self.gallery.name}: the gallery has no readable images yet; add some with "
                                  "POST /gallery")
        try:
            scores, ids = index.search_vectors(emb, k, where)
        except UserError as exc:
            raise ServeError(400, str(exc)) from None
        t2 = time.perf_counter()
        results = []
        for rank, (score, fid) in enumerate(zip(scores[0], ids[0], strict=True), start=1):
            if fid < 0:
                continue
            results.append(_hit(rank, index.row_of(int(fid)), float(score)))
        self.latencies.add(t2 - t0)
        return {"query": text, "k": k, "where": where, "results": results,
                "embedding": [round(float(x), 6) for x in emb[0]],
                "search_ms": round((t2 - t0) * 1000, 3),
                "timing_ms": {"encode": round((t1 - t0) * 1000, 3), "index": round((t2 - t1) * 1000, 3)},
                "gallery_size": len(index)}

    # -- files by id --------------------------------------------------------------------------------------------------

    def file_of(self, file_id: int) -> tuple[Row, Path]:
        """The indexed file with this id and its path, or a 404 :class:`ServeError`."""
        index = self.current()
        try:
            row = index.row_of(file_id)
        except KeyError:
            raise ServeError(404, f"no gallery image has id {file_id} (ids come from /search results and change "
                                  "when a file changes)") from None
        return row, self.gallery / row.entry.path

    def thumbnail(self, file_id: int, height: int) -> bytes:
        """A JPEG of the file, at most ``height`` pixels high (and 3/4 of that wide), cached by file content."""
        row, path = self.file_of(file_id)
        key = (row.entry, height)
        with self._thumbs_lock:
            data = self._thumbs.get(key)
            if data is not None:
                self._thumbs.move_to_end(key)
                return data
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
                im.thumbnail((max(1, height * 3 // 4), height), Image.Resampling.BICUBIC)
                buf = io.BytesIO()
                im.save(buf, format="JPEG", quality=85)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            raise ServeError(404, f"image {file_id} ({row.entry.path}) can no longer be read; it was changed or "
                                  "removed on disk") from None
        data = buf.getvalue()
        with self._thumbs_lock:
            self._thumbs[key] = data
            while len(self._thumbs) > _THUMB_CACHE:
                self._thumbs.popitem(last=False)
        return data

    # -- changing the gallery -----------------------------------------------------------------------------------------

    def add(self, files: Sequence[tuple[str | None, bytes]]) -> dict[str, Any]:
        """Store uploaded images (``(client file name, bytes)``) under ``uploads/`` and index them: the new snapshot
        is saved to disk and published before this returns. All files are checked first; one bad file refuses
        the whole request (nothing is stored)."""
        if not files:
            raise ServeError(400, "files: no file in the request; send multipart/form-data with one or more 'files' "
                                  "parts")
        if len(files) > self.limits.max_files:
            raise ServeError(413, f"files: {len(files)} files in one request, over the limit of "
                                  f"{self.limits.max_files}; send them in several requests")
        checked = []
        for name, data in files:
            name = check_upload_name(name)
            checked.append((name, decode_upload(name, data, self.limits)))
        folder = self.gallery / UPLOAD_DIRNAME
        with self._write_lock:
            written: list[Path] = []
            try:
                folder.mkdir(exist_ok=True)
                for _, image in checked:
                    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
                    path = folder / f"{stamp}-{secrets.token_hex(8)}.png"
                    with atomic_file(path, force=False, flag="--gallery") as tmp:
                        image.save(tmp, format="PNG")
                    written.append(path)
                index = self._build()
            except BaseException:
                for path in written:
                    path.unlink(missing_ok=True)
                raise
            rows = {r.entry.path: r for r in index.rows}
            added = []
            for (name, _), path in zip(checked, written, strict=True):
                rel = path.relative_to(self.gallery).as_posix()
                row = rows.get(rel)
                if row is None:  # decoded here, unreadable by the index: should not happen; undo it
                    path.unlink(missing_ok=True)
                    raise ServeError(415, f"file {name!r}: stored but the index could not read it back; upload a "
                                          "JPEG, PNG, BMP or WebP image")
                added.append({"id": row.id, "path": rel, "file_name": name,
                              "thumbnail": f"/thumb/{row.id}", "image": f"/image/{row.id}"})
            self._publish(index)
            self.uploads += len(added)
        log.info("added %d image(s); gallery now %d", len(added), len(index))
        return {"added": added, "gallery_size": len(index)}

    def delete(self, file_id: int) -> dict[str, Any]:
        """Delete the gallery file with this id from disk and from the index (saved and published before this
        returns)."""
        with self._write_lock:
            row, path = self.file_of(file_id)
            root = self.gallery.resolve()
            target = path.parent.resolve() / path.name
            if not target.is_relative_to(root):
                raise ServeError(409, f"image {file_id} ({row.entry.path}) is outside the gallery folder; not deleted")
            try:
                target.unlink(missing_ok=True)
            except OSError as exc:
                raise ServeError(409, f"image {file_id} ({row.entry.path}): cannot delete it ({exc.strerror}); fix "
                                      "the gallery folder's permissions") from None
            index = self._build()
            self._publish(index)
            self.deletions += 1
        log.info("deleted %s; gallery now %d", row.entry.path, len(index))
        return {"deleted": {"id": row.id, "path": row.entry.path}, "gallery_size": len(index)}

    # -- status -------------------------------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        index = self.current()
        return {"gallery_size": len(index), "gallery": str(self.gallery), "artifact": str(self.artifact.path),
                "artifact_stage": self.artifact.stage, "artifact_hash": self.artifact_hash[:16],
                "model": self.model_name, "index_kind": index.kind, "unreadable": index.stats.unreadable,
                "latency": self.latencies.summary(), "uploads": self.uploads, "deletions": self.deletions,
                "uptime_s": round(time.time() - self.started, 1)}


def _hit(rank: int, row: Row, score: float) -> dict[str, Any]:
    hit: dict[str, Any] = {"rank": rank, "id": row.id, "path": row.entry.path, "score": round(score, 6)}
    if row.identity is not None:
        hit["identity"] = row.identity
    if row.camera is not None:
        hit["camera"] = row.camera
    hit["thumbnail"] = f"/thumb/{row.id}"
    hit["image"] = f"/image/{row.id}"
    return hit


def _annotations(gallery: Path, data: Path | None) -> dict[Path, dict[str, int]] | None:
    """Identity / camera per image from ``data`` (or the gallery, when it is a dataset root); None otherwise."""
    from ..data.readers import detect_format
    from ..retrieval.search import dataset_annotations

    source = data
    if source is None:
        try:
            detect_format(gallery)
        except UserError:
            return None
        source = gallery
    return dataset_annotations(Path(source))
