"""Dataset readers: each real annotation format, detection, carve_val, every bad input, skip mode."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tbps_compress.data.readers import (
    FORMATS,
    carve_val,
    detect_format,
    ensure_val,
    list_formats,
    load_dataset,
)
from tbps_compress.data.records import TBPSDataset
from tbps_compress.errors import ConfigError, DataError, UserError
from tbps_compress.runtime.tokenizer import clean_caption


def make_image(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 8), (120, 30, 200)).save(path)  # format from the suffix: PNG or JPEG


def tokens(caption: str) -> list[str]:
    return clean_caption(caption).split()


def write_json(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data, indent=1), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- builders, one per real format

def cuhk_entries() -> list[dict[str, Any]]:
    """reid_raw.json as in CUHK-PEDES: paths relative to ROOT/imgs, processed_tokens, 1-based ids."""
    rows = [
        ("train", 1, "CUHK01/0363004.png", ["A woman in a red coat.", "She wears black trousers!"]),
        ("train", 1, "CUHK01/0363003.png", ["The woman carries a white bag."]),
        ("train", 2, "cam_a/001_45.bmp.jpg", ["A man (tall) in a blue shirt; jeans."]),
        ("train", 3, "test_query/p1200_s1513.jpg", ["A boy with a backpack."]),
        ("val", 4, "CUHK03/11_1.png", ["A girl in a yellow dress."]),
        ("test", 5, "Market/0001_c1s1_001051_00.jpg", ["An old man with a cane.", "Grey hair, grey coat."]),
        ("test", 6, "train_query/p8848_s17.jpg", ["A person in white shoes."]),
    ]
    return [{"split": s, "captions": c, "file_path": p, "processed_tokens": [tokens(x) for x in c], "id": i}
            for s, i, p, c in rows]


def write_cuhk(root: Path, entries: list[dict[str, Any]] | None = None, name: str = "reid_raw.json") -> Path:
    entries = cuhk_entries() if entries is None else entries
    for e in entries:
        if isinstance(e, dict) and isinstance(e.get("file_path"), str):
            make_image(root / "imgs" / e["file_path"])
    return write_json(root / name, entries)


def write_synthpedes(root: Path) -> Path:
    """The layout older SynthPedes versions wrote (paths relative to ROOT, starting with imgs/): still accepted.
    Current SynthPedes writes paths relative to ROOT/imgs, as CUHK-PEDES does."""
    entries = []
    for split, pid in [("train", 1), ("train", 2), ("val", 3), ("test", 4)]:
        for k in range(2):
            path = f"imgs/{split}/{pid:04d}_{k}.png"
            make_image(root / path)
            entries.append({"split": split, "captions": [f"person {pid} view {k}", f"another caption {pid}"],
                            "captions_bt": [f"person {pid} seen {k}", f"one more caption {pid}"],
                            "file_path": path, "processed_tokens": [], "id": pid})
    return write_json(root / "reid_raw.json", entries)


def write_icfg(root: Path) -> Path:
    entries = []
    for split, pid, cams in [("train", 1, 2), ("train", 2, 1), ("train", 3, 2), ("train", 4, 1), ("train", 5, 1),
                             ("test", 27, 2), ("test", 28, 1)]:
        for c in range(cams):
            path = f"{split}/{pid:04d}/{pid:04d}_010_0{c}_0303morning_0029_0.jpg"
            make_image(root / "imgs" / path)
            cap = [f"The man {pid} wears a grey jacket and carries bag {c}."]
            entries.append({"split": split, "captions": cap, "file_path": path,
                            "processed_tokens": [tokens(cap[0])], "id": pid})
    return write_json(root / "ICFG-PEDES.json", entries)


def write_rstp(root: Path) -> Path:
    entries = []
    for split, pid in [("train", 0), ("train", 1), ("val", 3900), ("test", 3903)]:
        for k in range(5):
            path = f"{pid:04d}_c{k + 1}_{k:04d}.jpg"
            make_image(root / "imgs" / path)
            entries.append({"id": pid, "img_path": path, "captions": [f"a walker {pid} {k}", f"second text {pid}"],
                            "split": split})
    return write_json(root / "data_captions.json", entries)


def write_tbps_clip(root: Path) -> tuple[Path, Path]:
    train, test = [], []
    for pid, path in [(0, "CUHK01/0363004.png"), (0, "CUHK01/0363003.png"), (1, "CUHK03/11_1.png"),
                      (2, "Market/0002_c1s1_0001.jpg")]:
        make_image(root / "imgs" / path)
        train.append({"file_path": path, "id": pid, "captions": [f"text {pid}", f"more text {pid}"],
                      "captions_bt": [f"texte {pid}", f"plus de texte {pid}"]})
    for pid, path in [(11000, "test_query/p1.jpg"), (11001, "test_query/p2.jpg")]:
        make_image(root / "imgs" / path)
        test.append({"file_path": path, "id": pid, "captions": [f"query {pid}"]})
    return write_json(root / "train_reid.json", train), write_json(root / "test_reid.json", test)


# --------------------------------------------------------------------------- reading each format

def test_read_cuhk_pedes(tmp_path: Path) -> None:
    write_cuhk(tmp_path)
    ds = load_dataset(tmp_path)
    assert isinstance(ds, TBPSDataset)
    assert ds.format == "cuhk-pedes" and ds.annotation == tmp_path / "reid_raw.json"
    assert ds.image_root == tmp_path / "imgs"
    assert ds.splits() == ["train", "val", "test"]
    assert ds.stats() == {"train": {"identities": 3, "images": 4, "captions": 5},
                          "val": {"identities": 1, "images": 1, "captions": 1},
                          "test": {"identities": 2, "images": 2, "captions": 3}}
    first = ds.records[0]
    assert first.image == "CUHK01/0363004.png" and first.pid == 1 and first.split == "train"
    assert first.captions == ("A woman in a red coat.", "She wears black trousers!")  # raw text
    assert first.captions_bt is None
    assert all(ds.image_path(r).is_file() for r in ds.records)
    assert ds.skipped == {}


def test_read_synthpedes_layout(tmp_path: Path) -> None:
    write_synthpedes(tmp_path)
    ds = load_dataset(tmp_path)
    assert ds.format == "cuhk-pedes" and ds.image_root == tmp_path
    assert ds.records[0].image == "imgs/train/0001_0.png"
    assert ds.records[0].captions_bt == ("person 1 seen 0", "one more caption 1")
    assert all(ds.image_path(r).is_file() for r in ds.records)
    assert ds.stats()["val"] == {"identities": 1, "images": 2, "captions": 4}


def test_read_icfg_pedes_has_no_val(tmp_path: Path) -> None:
    write_icfg(tmp_path)
    ds = load_dataset(tmp_path)
    assert ds.format == "icfg-pedes" and ds.image_root == tmp_path / "imgs"
    assert ds.splits() == ["train", "test"]
    assert ds.stats()["train"] == {"identities": 5, "images": 7, "captions": 7}
    assert all(ds.image_path(r).is_file() for r in ds.records)
    carved = carve_val(ds, fraction=0.2, seed=0)
    assert carved.splits() == ["train", "val", "test"]


def test_read_rstpreid(tmp_path: Path) -> None:
    write_rstp(tmp_path)
    ds = load_dataset(tmp_path)
    assert ds.format == "rstpreid" and ds.image_root == tmp_path / "imgs"
    assert ds.stats() == {"train": {"identities": 2, "images": 10, "captions": 20},
                          "val": {"identities": 1, "images": 5, "captions": 10},
                          "test": {"identities": 1, "images": 5, "captions": 10}}
    assert ds.records[0].image == "0000_c1_0000.jpg"
    assert all(ds.image_path(r).is_file() for r in ds.records)


def test_read_tbps_clip(tmp_path: Path) -> None:
    train, _ = write_tbps_clip(tmp_path)
    ds = load_dataset(tmp_path)
    assert ds.format == "tbps-clip" and ds.annotation == train
    assert ds.splits() == ["train", "test"]
    assert ds.stats()["train"] == {"identities": 3, "images": 4, "captions": 8}
    tr, te = ds.split("train"), ds.split("test")
    assert tr[0].captions_bt == ("texte 0", "plus de texte 0") and te[0].captions_bt is None
    assert te[0].pid == 11000
    assert all(ds.image_path(r).is_file() for r in ds.records)


def test_tbps_clip_test_file_only(tmp_path: Path) -> None:
    write_tbps_clip(tmp_path)
    (tmp_path / "train_reid.json").unlink()
    ds = load_dataset(tmp_path, "tbps-clip")
    assert ds.splits() == ["test"] and ds.annotation == tmp_path / "test_reid.json"


def test_duplicates_with_same_id_are_merged(tmp_path: Path) -> None:
    entries = cuhk_entries()
    dup = dict(entries[0], captions=["A woman in a red coat.", "A new caption."])
    entries.append(dup)
    write_cuhk(tmp_path, entries)
    ds = load_dataset(tmp_path)
    assert len(ds.records) == len(entries) - 1
    assert ds.records[0].captions == ("A woman in a red coat.", "She wears black trousers!", "A new caption.")


def test_huge_caption_is_kept(tmp_path: Path) -> None:
    entries = cuhk_entries()
    entries[0]["captions"] = ["word " * 1000]
    write_cuhk(tmp_path, entries)
    assert len(load_dataset(tmp_path).records[0].captions[0]) == 5000


def test_check_images_off_accepts_missing_images(tmp_path: Path) -> None:
    write_json(tmp_path / "reid_raw.json", cuhk_entries())
    ds = load_dataset(tmp_path, check_images=False)
    assert len(ds.records) == 7 and ds.image_root == tmp_path


def test_utf8_bom_and_non_ascii_accepted(tmp_path: Path) -> None:
    entries = cuhk_entries()
    entries[0]["captions"] = ["Une femme en manteau rouge, café crème"]
    write_cuhk(tmp_path, entries)
    path = tmp_path / "reid_raw.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(entries, ensure_ascii=False).encode())
    assert load_dataset(tmp_path).records[0].captions[0].endswith("café crème")


# --------------------------------------------------------------------------- detection, formats, cleaning

@pytest.mark.parametrize(
    ("writer", "fmt"),
    [(write_cuhk, "cuhk-pedes"), (write_synthpedes, "cuhk-pedes"), (write_icfg, "icfg-pedes"),
     (write_rstp, "rstpreid"), (write_tbps_clip, "tbps-clip")],
)
def test_detect_format(tmp_path: Path, writer: Callable[[Path], Any], fmt: str) -> None:
    writer(tmp_path)
    assert detect_format(tmp_path) == fmt


def test_detect_format_nothing_found(tmp_path: Path) -> None:
    (tmp_path / "notes.json").write_text("[]")
    with pytest.raises(DataError) as exc:
        detect_format(tmp_path)
    for name in ("reid_raw.json", "ICFG-PEDES.json", "data_captions.json", "train_reid.json", "test_reid.json"):
        assert name in str(exc.value)


def test_detect_format_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        detect_format(tmp_path / "nope")


def test_detect_format_priority(tmp_path: Path) -> None:
    write_tbps_clip(tmp_path)
    write_cuhk(tmp_path)
    assert detect_format(tmp_path) == "cuhk-pedes"
    assert load_dataset(tmp_path, "tbps-clip").format == "tbps-clip"


def test_list_formats() -> None:
    assert list_formats() == list(FORMATS) == ["cuhk-pedes", "icfg-pedes", "rstpreid", "tbps-clip"]


def test_bad_arguments(tmp_path: Path) -> None:
    write_cuhk(tmp_path)
    with pytest.raises(ConfigError, match="unknown dataset format 'cuhk'.*cuhk-pedes"):
        load_dataset(tmp_path, "cuhk")
    with pytest.raises(ConfigError, match="on_error"):
        load_dataset(tmp_path, on_error="ignore")


def test_clean_caption() -> None:
    assert clean_caption('  A Woman (tall); "red" coat!  Black~trousers: bag*#. ') == \
        "a woman tall red coat black trousers bag"
    assert clean_caption("a,b\tc\n") == "a,b c"


# --------------------------------------------------------------------------- carve_val

def many_ids(tmp_path: Path) -> TBPSDataset:
    entries = []
    for pid in range(1, 41):
        for k in range(2):
            entries.append({"split": "train" if pid <= 30 else "test", "captions": [f"p{pid} k{k}"],
                            "file_path": f"x/{pid}_{k}.png", "processed_tokens": [], "id": pid})
    write_json(tmp_path / "ICFG-PEDES.json", entries)
    return load_dataset(tmp_path, check_images=False)


def test_carve_val_deterministic_and_disjoint(tmp_path: Path) -> None:
    ds = many_ids(tmp_path)
    a, b = carve_val(ds, 0.1, seed=0), carve_val(ds, 0.1, seed=0)
    assert a.records == b.records
    train_ids = {r.pid for r in a.split("train")}
    val_ids = {r.pid for r in a.split("val")}
    assert len(val_ids) == 3 and not train_ids & val_ids
    assert train_ids | val_ids == {r.pid for r in ds.split("train")}
    assert a.split("test") == ds.split("test")
    assert len(a.split("val")) == 6  # all images of a carved identity move
    assert ds.splits() == ["train", "test"]  # input untouched
    others = {frozenset(r.pid for r in carve_val(ds, 0.1, seed=s).split("val")) for s in range(1, 6)}
    assert len(others | {frozenset(val_ids)}) > 1  # the seed matters
    assert ensure_val(a) is a and ensure_val(ds).splits() == ["train", "val", "test"]


def test_carve_val_errors(tmp_path: Path) -> None:
    write_cuhk(tmp_path)
    ds = load_dataset(tmp_path)
    with pytest.raises(DataError, match="already has a val split"):
        carve_val(ds)
    with pytest.raises(ConfigError, match="fraction"):
        carve_val(ds, fraction=1.5)


# --------------------------------------------------------------------------- bad entries (CUHK-PEDES format)

Mutation = Callable[[list[Any], Path], None]


def _set(field: str, value: Any) -> Mutation:
    def mutate(entries: list[Any], root: Path) -> None:
        entries[1][field] = value
    return mutate


def _drop(field: str) -> Mutation:
    def mutate(entries: list[Any], root: Path) -> None:
        del entries[1][field]
    return mutate


def _not_object(entries: list[Any], root: Path) -> None:
    entries[1] = ["CUHK01/0363003.png", 1]


def _symlink_file_outside(entries: list[Any], root: Path) -> None:
    outside = root.parent / f"{root.name}-outside.png"
    make_image(outside)
    (root / "imgs" / "CUHK01" / "link.png").symlink_to(outside)
    entries[1]["file_path"] = "CUHK01/link.png"


def _symlink_dir_outside(entries: list[Any], root: Path) -> None:
    outside = root.parent / f"{root.name}-outside-dir"
    make_image(outside / "a.png")
    (root / "imgs" / "elsewhere").symlink_to(outside, target_is_directory=True)
    entries[1]["file_path"] = "elsewhere/a.png"


def _missing_image(entries: list[Any], root: Path) -> None:
    (root / "imgs" / entries[1]["file_path"]).unlink()


def _image_is_folder(entries: list[Any], root: Path) -> None:
    (root / "imgs" / "CUHK01" / "folder.png").mkdir()
    entries[1]["file_path"] = "CUHK01/folder.png"


def _duplicate(field: str, value: Any) -> Mutation:
    def mutate(entries: list[Any], root: Path) -> None:
        entries[1] = dict(entries[0], **{field: value})
    return mutate


BAD_ENTRIES: list[tuple[str, Mutation, str, str]] = [
    # (case id, mutation of entry 1, field named in the message, words expected in the message)
    ("not-object", _not_object, "", "expected an object"),
    ("missing-id", _drop("id"), "id", "missing"),
    ("missing-captions", _drop("captions"), "captions", "missing"),
    ("missing-split", _drop("split"), "split", "missing"),
    ("missing-file_path", _drop("file_path"), "file_path", "missing"),
    ("id-string", _set("id", "5"), "id", "expected an integer"),
    ("id-bool", _set("id", True), "id", "expected an integer"),
    ("id-float", _set("id", 1.0), "id", "expected an integer"),
    ("id-null", _set("id", None), "id", "expected an integer"),
    ("captions-string", _set("captions", "a woman"), "captions", "expected a list of strings"),
    ("captions-empty", _set("captions", []), "captions", "empty list"),
    ("caption-blank", _set("captions", ["ok", "   "]), "captions", "empty or whitespace"),
    ("caption-empty-string", _set("captions", [""]), "captions", "empty or whitespace"),
    ("caption-not-string", _set("captions", ["ok", 3]), "captions", "expected a string"),
    ("captions_bt-length", _set("captions_bt", ["a", "b"]), "captions_bt", "1 captions"),
    ("captions_bt-not-list", _set("captions_bt", "a"), "captions_bt", "expected a list"),
    ("split-unknown", _set("split", "dev"), "split", "unknown split 'dev'"),
    ("split-not-string", _set("split", 1), "split", "expected one of"),
    ("path-not-string", _set("file_path", ["a.png"]), "file_path", "expected a string"),
    ("path-empty", _set("file_path", ""), "file_path", "empty"),
    ("path-absolute", _set("file_path", "/etc/passwd"), "file_path", "absolute"),
    ("path-windows-absolute", _set("file_path", "C:\\imgs\\a.png"), "file_path", "absolute"),
    ("path-dotdot", _set("file_path", "CUHK01/../../secret.png"), "file_path", "'..'"),
    ("symlink-file-outside", _symlink_file_outside, "file_path", "outside the image root"),
    ("symlink-dir-outside", _symlink_dir_outside, "file_path", "outside the image root"),
    ("image-missing", _missing_image, "file_path", "not found"),
    ("image-is-folder", _image_is_folder, "file_path", "not a regular file"),
    ("duplicate-other-id", _duplicate("id", 99), "id", "entry 0 with id 1"),
    ("duplicate-other-split", _duplicate("split", "test"), "split", "entry 0 with split 'train'"),
]


@pytest.mark.parametrize(("mutate", "field", "words"), [c[1:] for c in BAD_ENTRIES], ids=[c[0] for c in BAD_ENTRIES])
def test_bad_entry_raises_naming_file_entry_field(tmp_path: Path, mutate: Mutation, field: str, words: str) -> None:
    root = tmp_path / "ds"
    entries = cuhk_entries()
    write_cuhk(root, entries)
    mutate(entries, root)
    write_json(root / "reid_raw.json", entries)
    with pytest.raises(DataError) as exc:
        load_dataset(root)
    msg = str(exc.value)
    assert "reid_raw.json: entry 1" in msg
    if field:
        assert f"field '{field}'" in msg
    assert words in msg
    assert "\n" not in msg


@pytest.mark.parametrize(("mutate", "field", "words"), [c[1:] for c in BAD_ENTRIES], ids=[c[0] for c in BAD_ENTRIES])
def test_bad_entry_is_skipped_and_counted(tmp_path: Path, mutate: Mutation, field: str, words: str) -> None:
    root = tmp_path / "ds"
    entries = cuhk_entries()
    write_cuhk(root, entries)
    mutate(entries, root)
    write_json(root / "reid_raw.json", entries)
    ds = load_dataset(root, on_error="skip")
    assert sum(ds.skipped.values()) == 1
    assert len(ds.records) == len(entries) - 1


def test_unreadable_image(tmp_path: Path) -> None:
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        pytest.skip("root can read files without read permission")
    write_cuhk(tmp_path)
    path = tmp_path / "imgs" / "CUHK01" / "0363003.png"
    path.chmod(0)
    try:
        with pytest.raises(DataError, match=r"entry 1, field 'file_path'.*not readable"):
            load_dataset(tmp_path)
    finally:
        path.chmod(0o644)


def test_verify_images_catches_corrupt_file(tmp_path: Path) -> None:
    write_cuhk(tmp_path)
    (tmp_path / "imgs" / "CUHK01" / "0363003.png").write_bytes(b"not an image at all")
    assert len(load_dataset(tmp_path).records) == 7  # existence check only by default
    with pytest.raises(DataError, match=r"reid_raw.json: entry 1, field 'file_path'.*not a readable image"):
        load_dataset(tmp_path, verify_images=True)
    assert load_dataset(tmp_path, verify_images=True, on_error="skip").skipped == {"unreadable_image": 1}


# --------------------------------------------------------------------------- other formats name their file/field

def test_rstpreid_bad_entry(tmp_path: Path) -> None:
    path = write_rstp(tmp_path)
    entries = json.loads(path.read_text())
    del entries[3]["img_path"]
    write_json(path, entries)
    with pytest.raises(DataError, match=r"data_captions.json: entry 3, field 'img_path': missing"):
        load_dataset(tmp_path)


def test_tbps_clip_bad_entries(tmp_path: Path) -> None:
    _, test = write_tbps_clip(tmp_path)
    entries = json.loads(test.read_text())
    entries[1]["id"] = "11001"
    write_json(test, entries)
    with pytest.raises(DataError, match=r"test_reid.json: entry 1, field 'id'"):
        load_dataset(tmp_path)
    entries[1]["id"] = 11001
    entries[1]["file_path"] = "CUHK01/0363004.png"  # also in train_reid.json entry 0 with id 0
    write_json(test, entries)
    with pytest.raises(DataError, match=r"test_reid.json: entry 1, field 'id'.*train_reid.json: entry 0"):
        load_dataset(tmp_path)
    entries[1]["id"] = 0  # same id but a different split
    write_json(test, entries)
    with pytest.raises(DataError, match=r"test_reid.json: entry 1, field 'file_path'.*split 'train'"):
        load_dataset(tmp_path)


# --------------------------------------------------------------------------- file-level problems

@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b'[\n {"id": 1,\n  "split": train}\n]', "JSON syntax error at line 3, column 12"),
        (b'{"entries": []}', "top level is a JSON dict, expected a list"),
        (b"[]", "empty list"),
        (b'[{"captions": ["caf\xe9"]}]', "not UTF-8"),
    ],
    ids=["syntax", "not-list", "empty", "not-utf8"],
)
def test_bad_file(tmp_path: Path, content: bytes, words: str) -> None:
    (tmp_path / "reid_raw.json").write_bytes(content)
    for on_error in ("raise", "skip"):
        with pytest.raises(DataError) as exc:
            load_dataset(tmp_path, on_error=on_error)
        assert "reid_raw.json" in str(exc.value) and words in str(exc.value)


def test_missing_annotation_file(tmp_path: Path) -> None:
    write_rstp(tmp_path)
    with pytest.raises(DataError, match=r"ICFG-PEDES.json: annotation file is missing"):
        load_dataset(tmp_path, "icfg-pedes")
    with pytest.raises(DataError, match=r"train_reid.json: annotation file is missing"):
        load_dataset(tmp_path, "tbps-clip")


def test_errors_are_user_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError):
        load_dataset(tmp_path)


# --------------------------------------------------------------------------- skip mode

def test_skip_mode_counts_per_reason(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    entries = cuhk_entries()
    write_cuhk(tmp_path, entries)
    entries[1]["id"] = "x"
    entries[2]["captions"] = []
    entries[3]["split"] = "dev"
    (tmp_path / "imgs" / entries[4]["file_path"]).unlink()
    entries.append(dict(entries[5], id=42))  # conflicting duplicate of entry 5
    entries.append(dict(entries[6], captions=["merged caption"]))  # harmless duplicate: merged
    write_json(tmp_path / "reid_raw.json", entries)
    with caplog.at_level(logging.WARNING, logger="tbps_compress.data.readers"):
        ds = load_dataset(tmp_path, on_error="skip")
    assert ds.skipped == {"wrong_type": 1, "empty_captions": 1, "unknown_split": 1, "missing_image": 1,
                          "conflicting_duplicate": 1}
    assert [r.image for r in ds.records] == [entries[i]["file_path"] for i in (0, 5, 6)]
    assert ds.records[-1].captions == ("A person in white shoes.", "merged caption")
    assert "skipped 5 of 9 entries" in caplog.text and "missing_image: 1" in caplog.text
    # the skipped counts travel with carve_val's copy
    assert carve_val(ds_with_two_train_ids(tmp_path / "two"), 0.5).skipped == {"wrong_type": 1}


def ds_with_two_train_ids(root: Path) -> TBPSDataset:
    root.mkdir()
    entries = [{"split": "train", "captions": ["a"], "file_path": "a.png", "id": 1},
               {"split": "train", "captions": ["b"], "file_path": "b.png", "id": 2},
               {"split": "train", "captions": ["c"], "file_path": "c.png", "id": "3"}]
    write_json(root / "reid_raw.json", entries)
    return load_dataset(root, check_images=False, on_error="skip")


def test_skip_mode_everything_bad_raises(tmp_path: Path) -> None:
    write_json(tmp_path / "reid_raw.json", [{"id": "a"}, 3])
    with pytest.raises(DataError, match=r"no usable entry \(2 entries, all skipped: missing_field: 1, not_object: 1\)"):
        load_dataset(tmp_path, on_error="skip")
