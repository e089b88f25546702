"""Readers for the TBPS benchmark annotation files; each produces a :class:`TBPSDataset`.

Supported formats (all JSON lists of objects):

``cuhk-pedes``  ``reid_raw.json``: ``split`` (train/val/test), ``captions``, ``file_path``, ``id`` (and the unused
                ``processed_tokens``); optional ``captions_bt`` (back-translations, one per caption). SynthPedes
                writes this format too.
``icfg-pedes``  ``ICFG-PEDES.json``: the same fields; splits train/test only (see :func:`carve_val`).
``rstpreid``    ``data_captions.json``: ``id``, ``img_path``, ``captions``, ``split`` (train/val/test).
``tbps-clip``   TBPS-CLIP's converted form, one file per split: ``train_reid.json`` (``file_path``, ``id``,
                ``captions``, ``captions_bt``), ``test_reid.json`` (``file_path``, ``id``, ``captions``) and, if
                present, ``val_reid.json``.

Image paths are relative to the image root: ``ROOT/imgs`` when that folder exists and the paths resolve there
(the real CUHK-PEDES layout, ``CUHK01/0363004.png``; SynthPedes writes ``train/0001/0001_01.jpg``), else
``ROOT`` (older SynthPedes folders wrote ``imgs/train/...``).
The choice is made once per dataset by probing a sample of paths.

Every problem raises :class:`DataError` naming the file, the entry index and the field. With ``on_error="skip"``
bad entries are dropped instead and counted per reason in ``dataset.skipped`` (a plain attribute set on the
returned dataset, always present, empty when nothing was skipped); file-level problems (missing file, not UTF-8,
JSON syntax, top level not a list, no usable entry) still raise.

Entries that repeat an image path with the same id and split are merged into one record (captions concatenated,
exact duplicate captions dropped); the same path with a different id or split is an error.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import stat
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DataError, where
from .records import SPLITS, Record, TBPSDataset

log = logging.getLogger(__name__)

FORMATS = ("cuhk-pedes", "icfg-pedes", "rstpreid", "tbps-clip")

# Annotation file(s) per format, in detection priority order; for tbps-clip each file maps to its split.
_ANNOTATION = {
    "cuhk-pedes": "reid_raw.json",
    "icfg-pedes": "ICFG-PEDES.json",
    "rstpreid": "data_captions.json",
}
_TBPS_CLIP_FILES = {"train_reid.json": "train", "val_reid.json": "val", "test_reid.json": "test"}
_PATH_FIELD = {"cuhk-pedes": "file_path", "icfg-pedes": "file_path", "rstpreid": "img_path", "tbps-clip": "file_path"}

ON_ERROR = ("raise", "skip")
_DRIVE = re.compile(r"[A-Za-z]:/")
_PROBE_SAMPLE = 32

# Reasons an entry can be skipped with on_error="skip" (keys of dataset.skipped).
REASONS = (
    "not_object",
    "missing_field",
    "wrong_type",
    "empty_captions",
    "blank_caption",
    "captions_bt_mismatch",
    "unknown_split",
    "unsafe_path",
    "conflicting_duplicate",
    "missing_image",
    "unreadable_image",
)

def list_formats() -> list[str]:
    """Names accepted by ``load_dataset(format=...)``."""
    return list(FORMATS)


def detect_format(root: Path) -> str:
    """Name the format of the dataset folder ``root`` from the annotation files present.

    Checked in order: ``reid_raw.json`` (cuhk-pedes), ``ICFG-PEDES.json`` (icfg-pedes), ``data_captions.json``
    (rstpreid), ``train_reid.json`` / ``test_reid.json`` (tbps-clip). When several are present the first wins
    (logged); pass ``format=`` to :func:`load_dataset` to choose another.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder does not exist or is not a folder; pass the folder that holds "
                        "the annotation JSON file")
    found = [fmt for fmt, name in _ANNOTATION.items() if (root / name).is_file()]
    if (root / "train_reid.json").is_file() or (root / "test_reid.json").is_file():
        found.append("tbps-clip")
    if not found:
        looked = [*_ANNOTATION.values(), "train_reid.json", "test_reid.json"]
        raise DataError(f"{root}: no known annotation file; looked for {', '.join(looked)} "
                        f"(formats: {', '.join(FORMATS)}); pass the dataset folder that holds one of them")
    if len(found) > 1:
        log.info("%s: annotation files of several formats found (%s); using %s (pass format= to choose)",
                 root, ", ".join(found), found[0])
    return found[0]


class _EntryError(Exception):
    """One bad entry: a skip reason plus the full user-facing message."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass
class _Pending:
    """A validated entry (or several merged ones) waiting for the image check."""

    image: str
    pid: int
    split: str
    captions: list[str]
    captions_bt: list[str] | None
    source: Path
    index: int
    entries: int = 1


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _read_json_list(path: Path) -> list[Any]:
    if not path.is_file():
        raise DataError(f"{path}: annotation file is missing; check the dataset folder and format")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read the annotation file ({exc.strerror}); check its permissions") from exc
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: file is not UTF-8 (invalid byte at offset {exc.start}); re-save it as UTF-8") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: JSON syntax error at line {exc.lineno}, column {exc.colno}: {exc.msg}; "
                        "fix the file so it parses as JSON") from exc
    if not isinstance(data, list):
        raise DataError(f"{path}: top level is a JSON {_type_name(data)}, expected a list of entry objects")
    return data


def _check_path(value: str, loc: Callable[[], str]) -> str:
    """Reject absolute paths and ``..``; return the path in POSIX form without empty or ``.`` parts."""
    norm = value.replace("\\", "/") if "\\" in value else value
    if norm.startswith("/") or _DRIVE.match(norm):
        raise _EntryError("unsafe_path", f"{loc()}: image path {value!r} is absolute; "
                                         "write it relative to the dataset's image root")
    parts = [p for p in norm.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise _EntryError("unsafe_path", f"{loc()}: image path {value!r} contains '..' and could leave the dataset "
                                         "folder; write it relative to the image root without '..'")
    if not parts:
        raise _EntryError("wrong_type", f"{loc()}: image path is empty; give the image's path relative to the "
                                        "image root")
    return "/".join(parts)


def _check_captions(value: Any, loc: Callable[[], str], name: str) -> list[str]:
    if not isinstance(value, list):
        raise _EntryError("wrong_type", f"{loc()}: '{name}' is a {_type_name(value)}, expected a list of strings")
    if not value:
        raise _EntryError("empty_captions", f"{loc()}: '{name}' is an empty list; give at least one caption or "
                                            "remove the entry")
    for j, cap in enumerate(value):
        if not isinstance(cap, str):
            raise _EntryError("wrong_type", f"{loc()}: '{name}'[{j}] is a {_type_name(cap)}, expected a string")
        if not cap.strip():
            raise _EntryError("blank_caption", f"{loc()}: '{name}'[{j}] is empty or whitespace; write the caption "
                                               "or remove it from the list")
    return list(value)


def _parse_entry(entry: Any, path: Path, index: int, fmt: str, split: str | None) -> _Pending:
    """Validate one annotation entry. ``split`` is given for tbps-clip (one file per split)."""

    def loc(name: str) -> str:
        return where(path, f"entry {index}, field '{name}'")

    if not isinstance(entry, dict):
        at = where(path, f"entry {index}")
        raise _EntryError("not_object", f"{at}: entry is a JSON {_type_name(entry)}, expected an object")
    path_field = _PATH_FIELD[fmt]
    required = ["id", "captions", path_field] + ([] if split is not None else ["split"])
    for name in required:
        if name not in entry:
            raise _EntryError("missing_field", f"{loc(name)}: missing; every entry needs "
                                               f"{', '.join(repr(r) for r in required)}")

    pid = entry["id"]
    if isinstance(pid, bool) or not isinstance(pid, int):
        raise _EntryError("wrong_type", f"{loc('id')}: id is a {_type_name(pid)} ({pid!r}), expected an integer")
    if split is None:
        split = entry["split"]
        if not isinstance(split, str):
            raise _EntryError("wrong_type", f"{loc('split')}: split is a {_type_name(split)}, expected one of "
                                            f"{', '.join(SPLITS)}")
        if split not in SPLITS:
            raise _EntryError("unknown_split", f"{loc('split')}: unknown split {split!r}; use one of "
                                               f"{', '.join(SPLITS)}")
    image = entry[path_field]
    if not isinstance(image, str):
        raise _EntryError("wrong_type", f"{loc(path_field)}: image path is a {_type_name(image)}, expected a string")
    image = _check_path(image, lambda: loc(path_field))
    captions = _check_captions(entry["captions"], lambda: loc("captions"), "captions")
    captions_bt = None
    if entry.get("captions_bt") is not None:
        captions_bt = _check_captions(entry["captions_bt"], lambda: loc("captions_bt"), "captions_bt")
        if len(captions_bt) != len(captions):
            raise _EntryError("captions_bt_mismatch", f"{loc('captions_bt')}: {len(captions_bt)} back-translations "
                                                      f"for {len(captions)} captions; give exactly one per caption "
                                                      "or drop the field")
    return _Pending(image, pid, split, captions, captions_bt, path, index)


def _merge(into: _Pending, new: _Pending) -> None:
    """Merge a duplicate entry (same image, id and split) into ``into``; exact duplicate captions are dropped."""
    seen = set(into.captions)
    bt_ok = into.captions_bt is not None and new.captions_bt is not None
    bt = list(into.captions_bt) if bt_ok else None
    for j, cap in enumerate(new.captions):
        if cap in seen:
            continue
        seen.add(cap)
        into.captions.append(cap)
        if bt is not None:
            bt.append(new.captions_bt[j])  # type: ignore[index]
    into.captions_bt = bt
    into.entries += 1


def _choose_image_root(root: Path, images: list[str]) -> Path:
    """``ROOT/imgs`` or ``ROOT``: whichever more of a sample of image paths exist under."""
    imgs = root / "imgs"
    if not imgs.is_dir():
        return root
    step = max(1, len(images) // _PROBE_SAMPLE)
    sample = images[::step][:_PROBE_SAMPLE]
    hits_imgs = sum((imgs / p).is_file() for p in sample)
    hits_root = sum((root / p).is_file() for p in sample)
    if hits_imgs != hits_root:
        return imgs if hits_imgs > hits_root else root
    return root if sample and sample[0].startswith("imgs/") else imgs


class _ImageChecker:
    """Existence / regular-file / inside-the-root checks with cached parent folder resolution."""

    def __init__(self, image_root: Path, verify: bool) -> None:
        self.image_root = image_root
        self.real_root = os.path.realpath(image_root)
        self.verify = verify
        self._parents: dict[str, str] = {}

    def _inside(self, real: str) -> bool:
        return real == self.real_root or real.startswith(self.real_root.rstrip(os.sep) + os.sep)

    def check(self, image: str, loc: str) -> None:
        full = os.path.join(self.image_root, image)
        parent, name = os.path.split(full)
        real_parent = self._parents.get(parent)
        if real_parent is None:
            real_parent = self._parents[parent] = os.path.realpath(parent)
        escape = _EntryError("unsafe_path", f"{loc}: image {image!r} resolves (through a symlink) outside the "
                                            f"image root {self.image_root}; copy the image into the dataset folder")
        if not self._inside(real_parent):
            raise escape
        real = os.path.join(real_parent, name)
        try:
            st = os.lstat(real)
            if stat.S_ISLNK(st.st_mode):
                real = os.path.realpath(real)
                if not self._inside(real):
                    raise escape
                st = os.stat(real)
        except FileNotFoundError:
            raise _EntryError("missing_image", f"{loc}: image {image!r} not found under {self.image_root}; "
                                               "check the path or the dataset's imgs folder") from None
        except OSError as exc:
            raise _EntryError("unreadable_image", f"{loc}: image {image!r} cannot be read ({exc.strerror})") from None
        if not stat.S_ISREG(st.st_mode):
            raise _EntryError("unreadable_image", f"{loc}: image {image!r} under {self.image_root} is not a regular "
                                                  "file; point the path at an image file")
        if not os.access(real, os.R_OK):
            raise _EntryError("unreadable_image", f"{loc}: image {image!r} is not readable (permissions); "
                                                  "fix its permissions")
        if self.verify:
            from PIL import Image

            try:
                with Image.open(real) as im:
                    im.verify()
            except Exception as exc:  # PIL raises many types for corrupt files
                raise _EntryError("unreadable_image", f"{loc}: image {image!r} is not a readable image ({exc}); "
                                                      "replace the file") from None


def _annotation_files(root: Path, fmt: str) -> list[tuple[Path, str | None]]:
    if fmt != "tbps-clip":
        return [(root / _ANNOTATION[fmt], None)]
    files = [(root / name, split) for name, split in _TBPS_CLIP_FILES.items() if (root / name).is_file()]
    if not any(split in ("train", "test") for _, split in files):
        raise DataError(f"{root / 'train_reid.json'}: annotation file is missing (tbps-clip needs train_reid.json "
                        "and/or test_reid.json); check the dataset folder and format")
    return files


def load_dataset(
    root: Path,
    format: str | None = None,
    *,
    check_images: bool = True,
    verify_images: bool = False,
    on_error: str = "raise",
) -> TBPSDataset:
    """Read a dataset folder into a :class:`TBPSDataset`.

    ``format``: one of :data:`FORMATS`, or None to detect it (:func:`detect_format`).
    ``check_images``: each image must exist, be a regular readable file and stay inside the image root (cheap:
    one stat per image). ``verify_images``: additionally open each image with PIL and verify its header (slow).
    ``on_error``: ``"raise"`` (first bad entry raises :class:`DataError`) or ``"skip"`` (bad entries are dropped,
    counted per reason in ``dataset.skipped`` and summarised in a warning).

    Datasets without a val split (ICFG-PEDES, TBPS-CLIP's converted form) come back without one;
    ``dataset.splits()`` shows it and :func:`carve_val` makes one from train identities.
    """
    root = Path(root)
    if on_error not in ON_ERROR:
        raise ConfigError(f"on_error={on_error!r} is not valid; use one of {', '.join(ON_ERROR)}")
    if format is None:
        format = detect_format(root)
    elif format not in FORMATS:
        raise ConfigError(f"unknown dataset format {format!r}; use one of {', '.join(FORMATS)}")
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder does not exist or is not a folder")

    skipped: Counter[str] = Counter()
    pending: dict[str, _Pending] = {}
    files = _annotation_files(root, format)
    total = 0

    def bad(err: _EntryError, count: int = 1) -> None:
        if on_error == "raise":
            raise DataError(err.message)
        skipped[err.reason] += count
        log.debug("skipping: %s", err.message)

    for path, split in files:
        data = _read_json_list(path)
        if not data:
            raise DataError(f"{path}: annotation file holds an empty list; it needs at least one entry")
        total += len(data)
        for i, entry in enumerate(data):
            try:
                rec = _parse_entry(entry, path, i, format, split)
                first = pending.get(rec.image)
                if first is None:
                    pending[rec.image] = rec
                    continue
                if first.pid != rec.pid or first.split != rec.split:
                    what = "id" if first.pid != rec.pid else "split"
                    mine, theirs = (rec.pid, first.pid) if what == "id" else (rec.split, first.split)
                    field = "id" if what == "id" else ("split" if split is None else _PATH_FIELD[format])
                    raise _EntryError("conflicting_duplicate", (
                        f"{where(path, f'entry {i}, field {field!r}')}: image {rec.image!r} already appears in "
                        f"{where(first.source, f'entry {first.index}')} with {what} {theirs!r}, here {what} "
                        f"{mine!r}; one image must have one {what}: fix or remove one of the entries"))
                _merge(first, rec)
            except _EntryError as err:
                bad(err)

    image_root = _choose_image_root(root, list(pending))
    records: list[Record] = []
    checker = _ImageChecker(image_root, verify_images) if check_images else None
    for rec in pending.values():
        if checker is not None:
            try:
                field = _PATH_FIELD[format]
                checker.check(rec.image, where(rec.source, f"entry {rec.index}, field {field!r}"))
            except _EntryError as err:
                bad(err, rec.entries)
                continue
        records.append(Record(rec.image, rec.pid, tuple(rec.captions), rec.split,
                              tuple(rec.captions_bt) if rec.captions_bt is not None else None))

    if not records:
        raise DataError(f"{files[0][0]}: no usable entry ({total} entries, all skipped: "
                        f"{_format_counts(skipped)}); fix the annotation file or the images")
    merged = total - sum(skipped.values()) - len(records)
    if skipped:
        log.warning("%s: skipped %d of %d entries (%s)", root, sum(skipped.values()), total, _format_counts(skipped))
    if merged:
        log.info("%s: merged %d entries that repeat an image path with the same id", root, merged)
    dataset = TBPSDataset(root=root, image_root=image_root, format=format, annotation=files[0][0], records=records)
    dataset.skipped = dict(skipped)  # type: ignore[attr-defined]
    if "val" not in dataset.splits():
        log.info("%s: no val split (splits: %s); carve_val() can make one from train identities",
                 root, ", ".join(dataset.splits()))
    return dataset


def _format_counts(counts: Counter[str] | dict[str, int]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())) or "none"


def carve_val(dataset: TBPSDataset, fraction: float = 0.1, seed: int = 0) -> TBPSDataset:
    """Return a copy of ``dataset`` where about ``fraction`` of the TRAIN identities (all their images) become a
    new ``val`` split. Deterministic for a given ``seed``; at least one identity moves and at least one stays.
    The input is not changed. Raises :class:`DataError` if the dataset already has a val split or has fewer than
    two train identities.
    """
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"carve_val fraction={fraction!r} must be between 0 and 1 (exclusive)")
    if "val" in dataset.splits():
        raise DataError(f"{dataset.annotation}: the dataset already has a val split; use it instead of carving one")
    pids = sorted({r.pid for r in dataset.records if r.split == "train"})
    if len(pids) < 2:
        raise DataError(f"{dataset.annotation}: {len(pids)} train identities; carving a val split needs at least 2")
    n_val = min(len(pids) - 1, max(1, round(fraction * len(pids))))
    val_ids = set(random.Random(seed).sample(pids, n_val))
    records = [replace(r, split="val") if r.split == "train" and r.pid in val_ids else r for r in dataset.records]
    out = replace(dataset, records=records)
    out.skipped = dict(getattr(dataset, "skipped", {}))  # type: ignore[attr-defined]
    log.info("carved a val split: %d of %d train identities (seed %d)", n_val, len(pids), seed)
    return out


def ensure_val(dataset: TBPSDataset, fraction: float = 0.1, seed: int = 0) -> TBPSDataset:
    """``dataset`` itself if it has a val split, else :func:`carve_val` of it."""
    return dataset if "val" in dataset.splits() else carve_val(dataset, fraction, seed)
