"""Text search over a gallery folder with any artifact: ranked files, a contact sheet and an HTML page.

- :func:`open_encoder` (from :mod:`tbps_compress.retrieval.encoders`, the one encoder mechanism) gives the encoder of
  an artifact: ONNX artifacts run on the torch-free runtime (:class:`tbps_compress.runtime.OnnxEncoder`); torch
  artifacts through :class:`~tbps_compress.retrieval.encoders.TorchEncoder`, which imports torch in its constructor.
  Importing this module, and searching with an ONNX artifact, never imports torch, torchvision or open_clip.
- :func:`search_gallery` opens (builds or updates) the gallery index (FAISS vectors + SQLite metadata, see
  :mod:`tbps_compress.retrieval.index`) and ranks its files for each query; ``where={"camera": 3}`` restricts the
  ranking to files whose stored metadata match, ``index_kind`` / ``index_params`` choose an exact or approximate index.
- Identities: where the gallery's images belong to a dataset (``data=ROOT`` or a gallery that is itself a dataset
  root), each hit carries its identity, and with an expected identity per query each hit is marked correct or not.
  :func:`dataset_query` turns caption K of a split into such a query (``--data ROOT --query-index K``).
  :func:`dataset_annotations` adds each image's camera where the dataset has a ``synth_meta.json`` (SynthPedes);
  both are stored in the index's SQLite metadata, so that a search can be filtered on them.
- :func:`render_sheet` (PNG/JPEG, Pillow) and :func:`render_html` (one self-contained page, base64 thumbnails).
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import textwrap
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from ..artifacts import Artifact, content_hash, open_artifact
from ..errors import UserError
from .encoders import open_encoder
from .index import Encoder, GalleryIndex, IndexSpec, IndexStats, normalize_where

log = logging.getLogger(__name__)

__all__ = ["Hit", "SearchReport", "SearchResult", "artifact_hash", "dataset_annotations",
           "dataset_identities", "dataset_query", "format_results", "open_encoder", "open_index", "render_html",
           "render_sheet", "run_search", "search_gallery"]

GREEN = (34, 150, 60)
RED = (200, 40, 50)
GREY = (190, 190, 190)


def artifact_hash(artifact: Artifact) -> str:
    """The artifact's lineage content hash (what gallery indexes are keyed by)."""
    digest = artifact.lineage.get("content_hash")
    return str(digest) if digest else content_hash(artifact.lineage["files"])


# ---------------------------------------------------------------------------------------------------------------------
# identities
# ---------------------------------------------------------------------------------------------------------------------


def _is_dataset_root(folder: Path) -> bool:
    from ..data.readers import detect_format

    try:
        detect_format(Path(folder))
    except UserError:
        return False
    return True


def _load_dataset(root: Path, format: str | None):
    from ..data.readers import load_dataset

    return load_dataset(Path(root), format)


def dataset_identities(root: Path, format: str | None = None, split: str | None = None) -> dict[Path, int]:
    """Resolved image path -> identity for the images of a dataset (of one split, or all)."""
    ds = _load_dataset(root, format)
    recs = ds.split(split) if split else ds.records
    return {ds.image_path(r).resolve(): int(r.pid) for r in recs}


def _synth_cameras(root: Path) -> dict[str, int]:
    """``file_path`` -> camera from a SynthPedes ``synth_meta.json`` (empty when there is none)."""
    from ..data.synthpedes import META_FILE

    path = Path(root) / META_FILE
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        images = meta["images"]
        out = {str(m["file_path"]): int(m["camera"]) for m in images if m.get("camera") is not None}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        log.warning("%s: unreadable per-image camera list (%s); cameras left unknown", path, exc)
        return {}
    root_dir = str(meta.get("file_path_root") or "imgs").strip("/")
    out.update({f"{root_dir}/{k}": v for k, v in list(out.items())})  # older folders wrote imgs/<split>/...
    return out


def dataset_annotations(root: Path, format: str | None = None, split: str | None = None,
                        ) -> dict[Path, dict[str, int]]:
    """Resolved image path -> ``{"identity": ..., "camera": ...}`` for the images of a dataset (of one split, or
    all); ``camera`` only where the dataset has a ``synth_meta.json`` that gives it."""
    ds = _load_dataset(root, format)
    recs = ds.split(split) if split else ds.records
    cameras = _synth_cameras(ds.root)
    out: dict[Path, dict[str, int]] = {}
    for r in recs:
        ann = {"identity": int(r.pid)}
        cam = cameras.get(r.image)
        if cam is not None:
            ann["camera"] = cam
        out[ds.image_path(r).resolve()] = ann
    return out


def dataset_query(root: Path, index: int, split: str = "test", format: str | None = None) -> tuple[str, int]:
    """Caption ``index`` of ``split`` (captions numbered record by record, as in evaluation): ``(text, identity)``."""
    ds = _load_dataset(root, format)
    caps = [(c, int(r.pid)) for r in ds.split(split) for c in r.captions]
    if not caps:
        raise UserError(f"{ds.annotation}: no captions in split '{split}' (splits present: {', '.join(ds.splits())})")
    if not 0 <= index < len(caps):
        raise UserError(f"--query-index {index}: out of range; split '{split}' of {root} has {len(caps)} captions "
                        f"(0..{len(caps) - 1})")
    return caps[index]


# ---------------------------------------------------------------------------------------------------------------------
# search
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class Hit:
    rank: int  # 1-based
    path: Path
    score: float
    pid: int | None = None  # identity, where the gallery's annotations are known
    correct: bool | None = None  # pid == the query's expected identity (None when either is unknown)


@dataclass
class SearchResult:
    query: str
    hits: list[Hit]
    expected_id: int | None = None


@dataclass
class SearchReport:
    results: list[SearchResult]
    stats: IndexStats
    index_dir: Path
    gallery: Path
    extra: dict[str, Any] = field(default_factory=dict)


def open_index(artifact: Artifact | Path, gallery: Path, *, index_dir: Path | None = None,
               files: Sequence[Path] | None = None, tag: str | None = None, device: str = "auto",
               batch_size: int = 32, providers: Sequence[str] | None = None, encoder: Encoder | None = None,
               progress: Callable[[int, int], None] | None = None, index_kind: str | None = None,
               index_params: Sequence[str] | Mapping[str, int] | None = None,
               annotations: Mapping[Path, Mapping[str, int | None]] | None = None) -> GalleryIndex:
    """A current index of ``gallery`` for ``artifact``: loaded, updated incrementally and saved.

    ``index_kind`` (flat | hnsw | ivfpq | ivfsq8; default: the saved index's kind, flat for a new one) and
    ``index_params`` (``KEY=VALUE`` strings or a mapping) choose the FAISS index; ``annotations`` (see
    :func:`dataset_annotations`) are stored as the files' identity / camera.
    """
    spec = IndexSpec.parse(index_kind, index_params)
    gallery = Path(gallery)
    if not gallery.is_dir():
        what = "does not exist" if not gallery.exists() else "is not a folder"
        raise UserError(f"{gallery}: gallery folder {what}; pass --gallery with a folder of images")
    art = artifact if isinstance(artifact, Artifact) else open_artifact(Path(artifact))
    if encoder is None:
        encoder = open_encoder(art, device=device, providers=providers)
    index = GalleryIndex(gallery, encoder, artifact_hash(art), index_dir=index_dir, files=files, tag=tag,
                         batch_size=batch_size, progress=progress, spec=spec, annotations=annotations)
    index.refresh(require_images=True)
    return index


def search_gallery(artifact: Artifact | Path, gallery: Path, queries: Sequence[str] | str, top_k: int = 10, *,
                   index_dir: Path | None = None, files: Sequence[Path] | None = None, tag: str | None = None,
                   device: str = "auto", batch_size: int = 32, providers: Sequence[str] | None = None,
                   identities: Mapping[Path, int] | None = None,
                   expected_ids: Sequence[int | None] | None = None, encoder: Encoder | None = None,
                   progress: Callable[[int, int], None] | None = None,
                   where: Mapping[str, Any] | Sequence[str] | None = None, index_kind: str | None = None,
                   index_params: Sequence[str] | Mapping[str, int] | None = None,
                   annotations: Mapping[Path, Mapping[str, int | None]] | None = None) -> SearchReport:
    """Rank the gallery's images for each query text.

    ``identities``: resolved image path -> identity (see :func:`dataset_identities`); ``expected_ids``: the
    identity each query describes (one per query, or None). With both, each hit says whether it is correct.
    ``where``: only files whose stored metadata match (``{"camera": 3}`` or ``["camera=3"]``, ANDed; columns in
    :data:`~tbps_compress.retrieval.index.WHERE_COLUMNS`). ``annotations``: stored identity / camera per file
    (:func:`dataset_annotations`); identities default to theirs. ``index_kind`` / ``index_params``: see
    :func:`open_index`.
    """
    if isinstance(queries, str):
        queries = [queries]
    queries = list(queries)
    if not queries or any(not isinstance(q, str) or not q.strip() for q in queries):
        raise UserError("give a non-empty query text (or --data ROOT --query-index K)")
    if not isinstance(top_k, int) or top_k < 1:
        raise UserError(f"--top-k must be a positive integer, got {top_k!r}")
    if expected_ids is not None and len(expected_ids) != len(queries):
        raise ValueError(f"expected_ids has {len(expected_ids)} entries for {len(queries)} queries")
    normalize_where(where)  # a malformed filter fails before the index is touched
    IndexSpec.parse(index_kind, index_params)
    if identities is None and annotations is not None:
        identities = {p: int(a["identity"]) for p, a in annotations.items() if a.get("identity") is not None}
    index = open_index(artifact, gallery, index_dir=index_dir, files=files, tag=tag, device=device,
                       batch_size=batch_size, providers=providers, encoder=encoder, progress=progress,
                       index_kind=index_kind, index_params=index_params, annotations=annotations)
    try:
        ranked = index.search(queries, top_k, where=where)
    finally:
        index.close()
    results = []
    for qi, (query, hits) in enumerate(zip(queries, ranked, strict=True)):
        expected = expected_ids[qi] if expected_ids is not None else None
        out = []
        for rank, (path, score) in enumerate(hits, start=1):
            pid = identities.get(path.resolve()) if identities is not None else None
            correct = None if pid is None or expected is None else pid == expected
            out.append(Hit(rank, path, score, pid, correct))
        results.append(SearchResult(query, out, expected))
    extra: dict[str, Any] = {"index_kind": index.kind, "index_params": index.params}
    if where:
        extra["where"] = where
    return SearchReport(results, index.stats, index.index_dir, Path(gallery), extra)


def format_results(report: SearchReport | Sequence[SearchResult], relative_to: Path | None = None) -> str:
    """Plain-text ranking: a ``# query`` line per query, then ``rank<TAB>score<TAB>path`` (+ identity, correct)."""
    results = report.results if isinstance(report, SearchReport) else list(report)
    base = relative_to if relative_to is not None else (report.gallery if isinstance(report, SearchReport) else None)
    lines = []
    for res in results:
        head = f"# {res.query}"
        if res.expected_id is not None:
            head += f"  (expected id {res.expected_id})"
        lines.append(head)
        for h in res.hits:
            row = f"{h.rank}\t{h.score:.4f}\t{_display_path(h.path, base)}"
            if h.pid is not None:
                row += f"\tid={h.pid}"
            if h.correct is not None:
                row += "\tcorrect" if h.correct else "\twrong"
            lines.append(row)
    return "\n".join(lines)


def _display_path(path: Path, base: Path | None) -> str:
    if base is not None:
        try:
            return Path(path).relative_to(base).as_posix()
        except ValueError:
            pass
    return str(path)


# ---------------------------------------------------------------------------------------------------------------------
# rendering
# ---------------------------------------------------------------------------------------------------------------------


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow < 10.1 or no FreeType
        return ImageFont.load_default()


def _thumb(path: Path, box: tuple[int, int]) -> Image.Image:
    """The image fitted into ``box`` (width, height), aspect kept, centred on white; a grey tile if unreadable."""
    tile = Image.new("RGB", box, (255, 255, 255))
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            im.thumbnail(box, Image.Resampling.BICUBIC)
            if im.width < box[0] and im.height < box[1]:  # small crops: scale up to fit
                s = min(box[0] / im.width, box[1] / im.height)
                im = im.resize((max(1, int(im.width * s)), max(1, int(im.height * s))), Image.Resampling.BICUBIC)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return Image.new("RGB", box, (128, 128, 128))
    tile.paste(im, ((box[0] - im.width) // 2, (box[1] - im.height) // 2))
    return tile


def _fit_text(draw: ImageDraw.ImageDraw, text: str, font: Any, width: int) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength("…" + text, font=font) > width:
        text = text[1:]
    return "…" + text


def _wrap(draw: ImageDraw.ImageDraw, text: str, font: Any, width: int) -> list[str]:
    lines: list[str] = []
    for para in text.splitlines() or [""]:
        words, line = para.split(), ""
        for w in words:
            cand = f"{line} {w}".strip()
            if draw.textlength(cand, font=font) <= width or not line:
                line = cand
            else:
                lines.append(line)
                line = w
        lines.append(line)
    return lines


def render_sheet(report: SearchReport | Sequence[SearchResult], out: Path, *, thumb_height: int = 256,
                 columns: int | None = None) -> Path:
    """A contact sheet: per query, the query text then its hits left to right (rank, score, file name, identity),
    framed green (correct identity), red (wrong) or grey (unknown). Written with Pillow; format from the suffix."""
    results = report.results if isinstance(report, SearchReport) else list(report)
    if not results:
        raise UserError("nothing to draw: no search results")
    base = report.gallery if isinstance(report, SearchReport) else None
    th = max(64, thumb_height)
    tw = th * 3 // 8  # person crops are about 1:2.5 to 1:3 (width:height)
    pad, border = 10, 5
    cols = columns or max(1, max(len(r.hits) for r in results))
    cell_w, label_h = max(tw + 2 * border, 124), 54
    cell_h = th + 2 * border + label_h
    width = max(pad + cols * (cell_w + pad), 480)
    font, small, big = _font(14), _font(12), _font(18)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    blocks = []
    for res in results:
        head = _wrap(probe, f"“{res.query}”", big, width - 2 * pad)
        sub = f"top {len(res.hits)}"
        if res.expected_id is not None:
            n_ok = sum(1 for h in res.hits if h.correct)
            sub += f"  ·  expected id {res.expected_id}: {n_ok} correct (green), {len(res.hits) - n_ok} wrong (red)"
        rows = max(1, -(-len(res.hits) // cols))
        head_h = pad + 24 * len(head) + 22
        blocks.append((res, head, sub, rows, head_h))
    height = sum(hh + rows * (cell_h + pad) for _, _, _, rows, hh in blocks) + pad
    sheet = Image.new("RGB", (width, height), (250, 250, 250))
    draw = ImageDraw.Draw(sheet)
    y = 0
    for res, head, sub, rows, head_h in blocks:
        ty = y + pad
        for line in head:
            draw.text((pad, ty), line, fill=(20, 20, 20), font=big)
            ty += 24
        draw.text((pad, ty), sub, fill=(90, 90, 90), font=small)
        y += head_h
        for i, h in enumerate(res.hits):
            cx = pad + (i % cols) * (cell_w + pad)
            cy = y + (i // cols) * (cell_h + pad)
            colour = GREY if h.correct is None else (GREEN if h.correct else RED)
            fx = cx + (cell_w - tw - 2 * border) // 2
            draw.rectangle([fx, cy, fx + tw + 2 * border - 1, cy + th + 2 * border - 1], fill=colour)
            sheet.paste(_thumb(h.path, (tw, th)), (fx + border, cy + border))
            ly = cy + th + 2 * border + 3
            draw.text((cx, ly), f"#{h.rank}  {h.score:.3f}", fill=(20, 20, 20), font=font)
            name = _display_path(h.path, base)
            draw.text((cx, ly + 18), _fit_text(draw, name, small, cell_w), fill=(70, 70, 70), font=small)
            if h.pid is not None:
                mark = "" if h.correct is None else ("  correct" if h.correct else "  wrong")
                draw.text((cx, ly + 34), f"id {h.pid}{mark}", fill=colour if h.correct is not None else (70, 70, 70),
                          font=small)
        y += rows * (cell_h + pad)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        sheet.save(out)
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"{out}: cannot write the contact sheet ({exc}); use a .png or .jpg path") from exc
    return out


def _data_uri(path: Path, box: tuple[int, int]) -> str:
    buf = io.BytesIO()
    _thumb(path, box).save(buf, format="JPEG", quality=88)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


_CSS = textwrap.dedent("""\
    body{font-family:system-ui,sans-serif;margin:1.5em;background:#fafafa;color:#222}
    h2{font-weight:500;margin:.2em 0}.sub{color:#666;margin-bottom:.8em}
    .hits{display:flex;flex-wrap:wrap;gap:12px;margin-bottom:2em}
    figure.hit{margin:0;width:%dpx}figure.hit img{display:block;border:5px solid #bbb;background:#fff}
    figure.correct img{border-color:#22963c}figure.wrong img{border-color:#c82832}
    figcaption{font-size:12px;word-break:break-all}.score{font-weight:600}
""")


def render_html(report: SearchReport | Sequence[SearchResult], out: Path, *, thumb_height: int = 256) -> Path:
    """One self-contained HTML page (thumbnails embedded as base64 JPEG) with the same content as the sheet; each
    hit is a ``<figure class="hit ...">`` and links to the original file by a path relative to the page."""
    results = report.results if isinstance(report, SearchReport) else list(report)
    base = report.gallery if isinstance(report, SearchReport) else None
    out = Path(out)
    tw, th = max(32, thumb_height // 2), max(64, thumb_height)
    parts = ["<!doctype html>", "<html><head><meta charset='utf-8'>",
             f"<title>tbps-compress search: {html.escape(results[0].query if results else '')}</title>",
             f"<style>{_CSS % (tw + 10)}</style></head><body>"]
    for res in results:
        parts.append(f"<section class='query'><h2>“{html.escape(res.query)}”</h2>")
        sub = f"top {len(res.hits)}"
        if res.expected_id is not None:
            n_ok = sum(1 for h in res.hits if h.correct)
            sub += f" · expected id {res.expected_id}: {n_ok} correct"
        parts.append(f"<div class='sub'>{html.escape(sub)}</div><div class='hits'>")
        for h in res.hits:
            cls = "" if h.correct is None else (" correct" if h.correct else " wrong")
            href = _relative_href(h.path, out.parent)
            label = html.escape(_display_path(h.path, base))
            ident = "" if h.pid is None else f"<br>id {h.pid}" + ("" if h.correct is None else
                                                                   (" ✓" if h.correct else " ✗"))
            parts.append(
                f"<figure class=\"hit{cls}\"><a href=\"{html.escape(href)}\"><img alt=\"{label}\" width=\"{tw}\" "
                f"height=\"{th}\" src=\"{_data_uri(h.path, (tw, th))}\"></a><figcaption>#{h.rank} "
                f"<span class='score'>{h.score:.4f}</span><br>{label}{ident}</figcaption></figure>")
        parts.append("</div></section>")
    parts.append("</body></html>")
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        out.write_text("\n".join(parts) + "\n", encoding="utf-8")
    except OSError as exc:
        raise UserError(f"{out}: cannot write the HTML page ({exc.strerror})") from exc
    return out


def _relative_href(path: Path, start: Path) -> str:
    import os

    try:
        return Path(os.path.relpath(Path(path).resolve(), Path(start).resolve())).as_posix()
    except ValueError:  # another drive on Windows
        return Path(path).resolve().as_uri()


# ---------------------------------------------------------------------------------------------------------------------
# the CLI's entry point
# ---------------------------------------------------------------------------------------------------------------------


def run_search(artifact: Path, query: str | None = None, *, gallery: Path | None = None, top_k: int = 10,
               sheet: Path | None = None, html_out: Path | None = None, index: Path | None = None,
               device: str = "auto", data: Path | None = None, query_index: int | None = None,
               split: str = "test", expect_id: int | None = None, batch_size: int = 32,
               progress: Callable[[int, int], None] | None = None,
               where: Mapping[str, Any] | Sequence[str] | None = None, index_kind: str | None = None,
               index_params: Sequence[str] | Mapping[str, int] | None = None) -> SearchReport:
    """What ``tbps-compress search`` does; the CLI prints :func:`format_results` of the returned report.

    - ``query`` or ``data`` + ``query_index`` (caption K of ``split``; its identity becomes the expected one).
    - Without ``gallery`` (only with ``data``) the gallery is the ``split`` images of the dataset.
    - Identities (and SynthPedes cameras) come from ``data``, else from ``gallery`` when it is a dataset root;
      ``expect_id`` sets the expected identity of a free-text query.
    - ``where`` filters on the stored metadata (``["camera=3"]``); ``index`` is the index folder, ``index_kind`` /
      ``index_params`` the FAISS index (see :func:`open_index`). Both are checked before any work.
    """
    normalize_where(where)
    IndexSpec.parse(index_kind, index_params)
    if query_index is not None and data is None:
        if gallery is not None and _is_dataset_root(gallery):
            data = gallery
        else:
            raise UserError("--query-index needs --data ROOT (a dataset folder with its annotation file)")
    if query_index is not None and query:
        raise UserError("give either a query text or --query-index, not both")
    if query_index is None and not (query and query.strip()):
        raise UserError("give a query text, e.g. \"a man in a grey hoodie with a black backpack\"")
    if gallery is None and data is None:
        raise UserError("--gallery DIR is required (or --data ROOT to search a dataset split)")
    expected = expect_id
    if query_index is not None:
        query, pid = dataset_query(data, query_index, split)
        if expect_id is not None and expect_id != pid:
            raise UserError(f"--expect-id {expect_id} contradicts caption {query_index}'s identity {pid}")
        expected = pid
    files = tag = None
    if gallery is None:
        ds = _load_dataset(data, None)
        recs = ds.split(split)
        if not recs:
            raise UserError(f"{ds.annotation}: no images in split '{split}' (splits present: "
                            f"{', '.join(ds.splits())})")
        gallery, files, tag = ds.root, [ds.image_path(r) for r in recs], f"split-{split}"
    identities = annotations = None
    id_source = data if data is not None else (gallery if _is_dataset_root(gallery) else None)
    if id_source is not None:
        annotations = dataset_annotations(id_source)
        identities = {p: a["identity"] for p, a in annotations.items()}
    elif expected is not None:
        raise UserError("--expect-id needs the gallery's identities: pass --data ROOT (the dataset the gallery "
                        "images come from) or a gallery that is a dataset root")
    report = search_gallery(artifact, gallery, [query], top_k, index_dir=index, files=files, tag=tag,
                            device=device, batch_size=batch_size, identities=identities,
                            expected_ids=[expected], progress=progress, where=where, index_kind=index_kind,
                            index_params=index_params, annotations=annotations)
    if sheet is not None:
        report.extra["sheet"] = render_sheet(report, sheet)
    if html_out is not None:
        report.extra["html"] = render_html(report, html_out)
    return report
