"""Writing a SynthPedes dataset: split sizes and presets, parallel rendering, the CUHK-PEDES annotation file,
the ground-truth sidecar and the preview sheet."""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ...errors import DataError, UserError
from .attributes import ATTRIBUTE_FAMILIES, make_identities
from .captions import (
    COARSE_FAMILIES,
    TRUTH_FAMILIES,
    flatten_stated,
    flatten_visible,
    tokenize,
    visible_facts,
    write_captions,
)
from .render import _render_job
from .scenes import make_cameras, plan_images

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
META_FILE = "synth_meta.json"
ANNOTATION_FILE = "reid_raw.json"
TRUTH_FILE = "synth_truth.json"
TRUTH_FORMAT = "synthpedes-truth"
TRUTH_VERSION = 1
DEFAULT_IDENTITIES = 200
MIN_IDENTITIES = 5  # --identities N: 2 test + 2 val + 1 train at least
MIN_TEST_IDS = 2
PRESETS: dict[str, dict[str, int]] = {
    # what `tbps-compress synth OUT` writes without flags (--identities 200)
    "demo": {"train_ids": 160, "val_ids": 20, "test_ids": 20, "images_per_id": 4, "captions_per_image": 2},
    # a test split of CUHK-PEDES scale: 1,000 identities, 3,000 images, 6,000 captions
    "benchmark": {"train_ids": 10_000, "val_ids": 200, "test_ids": 1_000, "images_per_id": 4,
                  "eval_images_per_id": 3, "captions_per_image": 2},
}

def split_counts(identities: int) -> tuple[int, int, int]:
    """``(train, val, test)`` identity counts of ``--identities N``: 80/10/10, at least 2 val and 2 test."""
    if identities < MIN_IDENTITIES:
        raise UserError(f"synth: --identities must be at least {MIN_IDENTITIES} (got {identities}): it is split "
                        f"80/10/10 and val and test need 2 identities each; or set --train-ids, --val-ids and "
                        f"--test-ids")
    n_val = n_test = max(2, round(identities * 0.1))
    return identities - n_val - n_test, n_val, n_test


def _check_args(images_per_id: int, eval_images_per_id: int, captions_per_image: int, size: tuple[int, int],
                workers: int | None) -> None:
    if images_per_id < 1:
        raise UserError(f"synth: --images-per-id must be at least 1 (got {images_per_id})")
    if eval_images_per_id < 1:
        raise UserError(f"synth: --eval-images-per-id must be at least 1 (got {eval_images_per_id})")
    if captions_per_image < 1:
        raise UserError(f"synth: --captions-per-image must be at least 1 (got {captions_per_image})")
    if len(size) != 2 or size[0] < 48 or size[1] < 16:
        raise UserError(f"synth: --size must be HEIGHTxWIDTH with height >= 48 and width >= 16 (got {size})")
    if workers is not None and workers < 1:
        raise UserError(f"synth: --workers must be at least 1 (got {workers})")


def _check_counts(train_ids: int, val_ids: int, test_ids: int) -> None:
    if train_ids < 1:
        raise UserError(f"synth: --train-ids must be at least 1 (got {train_ids})")
    if test_ids < MIN_TEST_IDS:
        raise UserError(f"synth: --test-ids must be at least {MIN_TEST_IDS} (got {test_ids}): retrieval among "
                        f"fewer than 2 test identities is meaningless (with 1, any model scores R@1 100)")
    if val_ids < 0 or val_ids == 1:
        raise UserError(f"synth: --val-ids must be 0 (no val split) or at least 2 (got {val_ids}): with 1 val "
                        f"identity any model scores R@1 100, so validation could not pick a checkpoint")


def resolve_counts(identities: int | None = None, train_ids: int | None = None, val_ids: int | None = None,
                   test_ids: int | None = None) -> tuple[int, int, int]:
    """``(train, val, test)`` identity counts: the explicit per-split counts, the others from ``identities``
    (80/10/10, default :data:`DEFAULT_IDENTITIES`). Raises :class:`UserError` for counts that cannot work."""
    if train_ids is None or val_ids is None or test_ids is None:
        base = split_counts(DEFAULT_IDENTITIES if identities is None else identities)
        train_ids = base[0] if train_ids is None else train_ids
        val_ids = base[1] if val_ids is None else val_ids
        test_ids = base[2] if test_ids is None else test_ids
    _check_counts(train_ids, val_ids, test_ids)
    return train_ids, val_ids, test_ids


def preset_settings(preset: str | None = None, identities: int | None = None, **flags: int | None) -> dict[str, int]:
    """The keyword arguments of :func:`generate` for ``tbps-compress synth``: the preset's values (default
    ``demo``), then ``identities`` (replacing the preset's split counts), then every flag that is not ``None``
    (``train_ids``, ``val_ids``, ``test_ids``, ``images_per_id``, ``eval_images_per_id``, ``captions_per_image``).
    Without a preset or flag value for ``eval_images_per_id``, val and test get ``images_per_id`` images.
    """
    name = "demo" if preset is None else preset
    if name not in PRESETS:
        raise UserError(f"synth: --preset must be one of {', '.join(PRESETS)} (got {preset!r})")
    unknown = sorted(set(flags) - {"train_ids", "val_ids", "test_ids", "images_per_id", "eval_images_per_id",
                                   "captions_per_image"})
    if unknown:
        raise TypeError(f"preset_settings: unknown setting(s) {', '.join(unknown)}")
    out = dict(PRESETS[name])
    if identities is not None:  # generate() splits it (and checks it together with the other arguments)
        for key in ("train_ids", "val_ids", "test_ids"):
            del out[key]
        out["identities"] = identities
    out.update({k: v for k, v in flags.items() if v is not None})
    return out


def generate(out: Path, identities: int | None = None, images_per_id: int = 4, captions_per_image: int = 2,
             size: tuple[int, int] = (384, 128), seed: int = 0, workers: int | None = None, force: bool = False,
             progress: Callable[[int, int], None] | None = None, *, train_ids: int | None = None,
             val_ids: int | None = None, test_ids: int | None = None,
             eval_images_per_id: int | None = None) -> dict[str, Any]:
    """Write a SynthPedes dataset to ``out`` (CUHK-PEDES layout) and return a summary.

    Split sizes: ``train_ids``, ``val_ids`` and ``test_ids`` identities; those not given come from ``identities``
    split 80/10/10 (default 200: 160/20/20). The test split needs at least 2 identities, val 0 or at least 2.
    ``images_per_id`` applies to train, ``eval_images_per_id`` (default: ``images_per_id``) to val and test.
    ``size`` is (height, width). The dataset is built in a temporary sibling folder and renamed into place, so
    ``out`` never holds a partial dataset. A non-empty ``out`` is replaced only with ``force=True``.
    """
    t0 = time.perf_counter()
    out = Path(out)
    size = (int(size[0]), int(size[1]))
    eval_images = images_per_id if eval_images_per_id is None else eval_images_per_id
    _check_args(images_per_id, eval_images, captions_per_image, size, workers)
    counts = resolve_counts(identities, train_ids, val_ids, test_ids)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder; choose another output path")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserError(f"{out}: folder is not empty; pass --force to replace it or choose another output path")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    n_workers = workers if workers is not None else min(2, os.cpu_count() or 1)
    per_split = {"train": (counts[0], images_per_id), "val": (counts[1], eval_images),
                 "test": (counts[2], eval_images)}
    try:
        summary = _build(tmp, per_split, captions_per_image, size, seed, n_workers, progress)
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    summary["images_per_s"] = round(summary["images"] / max(summary["seconds"], 1e-9), 1)
    logger.info("SynthPedes: wrote %d images of %d identities (train %d, val %d, test %d) to %s in %.1f s "
                "(%.1f images/s)", summary["images"], sum(counts), *counts, out, summary["seconds"],
                summary["images_per_s"])
    return summary


def _build(root: Path, per_split: dict[str, tuple[int, int]], captions_per_image: int, size: tuple[int, int],
           seed: int, workers: int, progress: Callable[[int, int], None] | None) -> dict[str, Any]:
    """``per_split``: split -> (identities, images per identity)."""
    idents = make_identities(seed, train_ids=per_split["train"][0], val_ids=per_split["val"][0],
                             test_ids=per_split["test"][0])
    cams = make_cameras(seed)
    images: list[tuple[dict[str, Any], dict[str, Any], str]] = []
    jobs = []
    for ident in idents:
        pid, split = ident["id"], ident["split"]
        (root / "imgs" / split / f"{pid:04d}").mkdir(parents=True, exist_ok=True)
        for plan in plan_images(ident, per_split[split][1], seed, len(cams)):
            rel = f"{split}/{pid:04d}/{pid:04d}_{plan['k']:02d}.jpg"  # relative to imgs/, as in CUHK-PEDES
            images.append((ident, plan, rel))
            jobs.append((str(root / "imgs" / rel), ident, plan, cams[plan["camera"]], seed, size))
    total = len(jobs)

    def annotate() -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
        entries, metas, truths = [], [], []
        for ident, plan, rel in images:
            pid = ident["id"]
            facts = visible_facts(ident["attributes"], ident["extras"], plan["view"], plan["facing"], plan["hidden"])
            caps, bts, contents = write_captions(facts, captions_per_image,
                                                 np.random.default_rng([seed, 17, pid, plan["k"]]))
            entries.append({"split": ident["split"], "captions": caps, "file_path": rel,
                            "processed_tokens": [tokenize(c) for c in caps], "id": pid, "captions_bt": bts})
            metas.append({"file_path": rel, "id": pid, "view": plan["view"], "facing": plan["facing"],
                          "camera": plan["camera"], "occluder": plan["occluder"]})
            truths.append({"file_path": rel, "id": pid, "split": ident["split"], "visible": flatten_visible(facts),
                           "stated": [flatten_stated(c) for c in contents]})
        return entries, metas, truths

    done = 0
    if workers <= 1 or total < 8:
        entries, images_meta, truths = annotate()
        for job in jobs:
            done += _render_job(job)
            if progress is not None:
                progress(done, total)
    else:
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(processes=workers) as pool:
            results = pool.imap_unordered(_render_job, jobs, chunksize=max(1, min(16, total // (workers * 8))))
            entries, images_meta, truths = annotate()  # captions are written while the workers draw
            for n in results:
                done += n
                if progress is not None:
                    progress(done, total)
    split_info: dict[str, dict[str, int]] = {}
    for split in ("train", "val", "test"):
        n_ids, per_id = per_split[split]
        recs = [e for e in entries if e["split"] == split]
        split_info[split] = {"identities": n_ids, "images_per_id": per_id, "images": len(recs),
                             "captions": sum(len(e["captions"]) for e in recs)}
    meta = {
        "format": "synthpedes", "version": FORMAT_VERSION, "seed": seed, "size": list(size),
        "images_per_id": per_split["train"][1], "eval_images_per_id": per_split["test"][1],
        "captions_per_image": captions_per_image, "file_path_root": "imgs", "splits": split_info,
        "attribute_families": ATTRIBUTE_FAMILIES,
        "identities": [{k: i[k] for k in ("id", "split", "near_copy_of", "changed", "attributes", "extras")}
                       for i in idents],
        "images": images_meta, "cameras": cams,
    }
    annotation = json.dumps(entries).encode("utf-8")
    (root / ANNOTATION_FILE).write_bytes(annotation)
    truth = {"format": TRUTH_FORMAT, "version": TRUTH_VERSION,
             "annotation_sha256": hashlib.sha256(annotation).hexdigest(),
             "families": list(TRUTH_FAMILIES), "coarse": list(COARSE_FAMILIES), "entries": truths}
    (root / TRUTH_FILE).write_text(json.dumps(truth, separators=(",", ":")), encoding="utf-8")
    (root / META_FILE).write_text(json.dumps(meta, indent=1), encoding="utf-8")
    return {"identities": len(idents), "images": total, "captions": total * captions_per_image,
            "splits": {k: {f: v[f] for f in ("identities", "images", "captions")}
                       for k, v in split_info.items() if v["identities"]}}


def _image_file(root: Path, file_path: str) -> Path:
    """``ROOT/imgs/<file_path>`` (this layout), or ``ROOT/<file_path>`` for folders whose paths start with imgs/
    (written by older versions)."""
    under = root / "imgs" / file_path
    return root / file_path if not under.is_file() and (root / file_path).is_file() else under


def save_preview(root: Path, out_png: Path, identities: int = 6) -> Path:
    """A contact sheet: the first few identities, one row each, every view with its first caption underneath."""
    root, out_png = Path(root), Path(out_png)
    ann = root / ANNOTATION_FILE
    if not ann.is_file():
        raise DataError(f"{ann}: not found; run `tbps-compress synth {root}` first or point at a SynthPedes folder")
    try:
        entries = json.loads(ann.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{ann}: not valid JSON ({exc.msg} at line {exc.lineno}); regenerate the dataset") from exc
    by_id: dict[int, list[dict[str, Any]]] = {}
    for e in entries:
        by_id.setdefault(int(e["id"]), []).append(e)
    ids = sorted(by_id)[: max(1, identities)]
    if not ids:
        raise DataError(f"{ann}: has no entries; regenerate the dataset")
    first = Image.open(_image_file(root, by_id[ids[0]][0]["file_path"]))
    iw, ih = first.width, first.height
    scale = min(1.0, 256 / ih)
    cw, chh = max(int(iw * scale), 150), int(ih * scale)
    try:
        font: ImageFont.ImageFont | ImageFont.FreeTypeFont = ImageFont.load_default(size=10)
    except TypeError:  # Pillow without FreeType sizes
        font = ImageFont.load_default()
    chars = max(16, cw // 6)
    cols = max(len(by_id[i]) for i in ids)
    text_h = 12 * 12
    sheet = Image.new("RGB", (cols * (cw + 6) + 6, len(ids) * (chh + text_h + 24) + 6), (255, 255, 255))
    d = ImageDraw.Draw(sheet)
    y = 6
    for pid in ids:
        d.text((6, y), f"id {pid} ({by_id[pid][0]['split']})", fill=(0, 0, 0), font=font)
        y += 14
        for j, e in enumerate(by_id[pid]):
            x = 6 + j * (cw + 6)
            im = Image.open(_image_file(root, e["file_path"])).convert("RGB")
            im = im.resize((int(im.width * scale), chh), Image.Resampling.BILINEAR)
            sheet.paste(im, (x + (cw - im.width) // 2, y))
            lines = textwrap.wrap(e["captions"][0], chars)[:12]
            d.multiline_text((x, y + chh + 2), "\n".join(lines), fill=(20, 20, 20), font=font, spacing=1)
        y += chh + text_h + 10
    out_png.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out_png)
    return out_png


def load_truth(root: Path) -> dict[str, Any]:
    """The ground-truth sidecar ``ROOT/synth_truth.json`` of a SynthPedes folder, checked against its annotations.

    Format (version 1)::

        {"format": "synthpedes-truth", "version": 1, "annotation_sha256": <sha256 hex of reid_raw.json's bytes>,
         "families": [... TRUTH_FAMILIES], "coarse": [... COARSE_FAMILIES],
         "entries": [{"file_path", "id", "split", "visible": {family: value or null, every family},
                      "stated": [{family: value, only the families the caption states}, one per caption]}, ...]}

    ``entries`` line up with the reid_raw.json entries (same order, file_path, id and number of captions);
    ``visible`` is :func:`~tbps_compress.data.synthpedes.captions.flatten_visible`, ``stated`` is
    :func:`~tbps_compress.data.synthpedes.captions.flatten_stated` (a caption's ``captions_bt`` paraphrase states the
    same). Raises :class:`DataError` (one line) when the file is missing, not JSON, of another format or version,
    or does not describe the current reid_raw.json.
    """
    root = Path(root)
    path, ann = root / TRUTH_FILE, root / ANNOTATION_FILE
    regen = "regenerate with `tbps-compress synth`"
    if not path.is_file():
        raise DataError(f"{path}: not found; this dataset has no ground truth (only SynthPedes folders written by "
                        f"`tbps-compress synth` have one)")
    try:
        truth = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 (byte {exc.start}); {regen}") from exc
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}); {regen}") from exc
    fmt = truth.get("format") if isinstance(truth, dict) else None
    version = truth.get("version") if isinstance(truth, dict) else None
    if fmt != TRUTH_FORMAT or version != TRUTH_VERSION:
        raise DataError(f"{path}: format {fmt!r} version {version!r}, expected {TRUTH_FORMAT!r} version "
                        f"{TRUTH_VERSION}; {regen}")
    if truth.get("families") != list(TRUTH_FAMILIES) or not isinstance(truth.get("entries"), list):
        raise DataError(f"{path}: 'families' or 'entries' is not what {TRUTH_FORMAT} version {TRUTH_VERSION} holds; "
                        f"{regen}")
    if not ann.is_file():
        raise DataError(f"{ann}: not found; the ground truth in {path.name} describes it, so {regen}")
    raw = ann.read_bytes()
    if truth.get("annotation_sha256") != hashlib.sha256(raw).hexdigest():
        raise DataError(f"{path}: does not match reid_raw.json (the annotations were changed or the sidecar belongs "
                        f"to another dataset); {regen}")
    entries = json.loads(raw.decode("utf-8"))  # the hash matched, so these are the bytes that were written
    if len(entries) != len(truth["entries"]):
        raise DataError(f"{path}: {len(truth['entries'])} entries but reid_raw.json has {len(entries)}; the "
                        f"sidecar was edited; {regen}")
    for i, (e, t) in enumerate(zip(entries, truth["entries"], strict=True)):
        if not (isinstance(t, dict) and t.get("file_path") == e.get("file_path") and t.get("id") == e.get("id")
                and isinstance(t.get("stated"), list) and len(t["stated"]) == len(e.get("captions", []))
                and isinstance(t.get("visible"), dict)):
            raise DataError(f"{path}: entry {i} does not line up with reid_raw.json entry {i} (file_path, id, "
                            f"visible or one 'stated' per caption); the sidecar was edited; {regen}")
    return truth
