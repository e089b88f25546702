"""SynthPedes generator: schema, determinism, viewpoints, attribute coverage, hard negatives, safe writes."""

from __future__ import annotations

import hashlib
import json
from itertools import combinations
from pathlib import Path

import pytest

from tbps_compress.data import synthpedes as sp
from tbps_compress.data.synth_text import MAX_WORDS, MIN_WORDS, tokenize
from tbps_compress.errors import UserError

SIZE = (128, 48)
CUHK_FIELDS = {"split", "captions", "file_path", "processed_tokens", "id", "captions_bt"}


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "ds"
    summary = sp.generate(out, identities=12, images_per_id=3, captions_per_image=2, size=SIZE, seed=3, workers=1)
    assert summary["images"] == 36 and summary["captions"] == 72
    assert set(summary["splits"]) == {"train", "val", "test"}
    return out


def test_schema(small: Path) -> None:
    entries = json.loads((small / "reid_raw.json").read_text())
    assert len(entries) == 36
    split_of: dict[int, str] = {}
    for e in entries:
        assert set(e) == CUHK_FIELDS
        assert e["split"] in ("train", "val", "test")
        assert isinstance(e["id"], int) and e["id"] >= 1
        assert e["file_path"].startswith(f"imgs/{e['split']}/") and e["file_path"].endswith(".jpg")
        assert (small / e["file_path"]).is_file()
        assert len(e["captions"]) == 2 and len(e["captions_bt"]) == 2
        assert len(set(e["captions"])) == 2, "captions of one image must differ"
        assert e["processed_tokens"] == [tokenize(c) for c in e["captions"]]
        for c in e["captions"] + e["captions_bt"]:
            assert MIN_WORDS <= len(tokenize(c)) <= MAX_WORDS, c
        for toks in e["processed_tokens"]:
            assert all(t == t.lower() and t.strip() for t in toks)
        assert split_of.setdefault(e["id"], e["split"]) == e["split"], "an identity spans two splits"
    counts = {s: sum(1 for v in split_of.values() if v == s) for s in ("train", "val", "test")}
    assert counts["val"] >= 1 and counts["test"] >= 1 and counts["train"] >= counts["val"]
    from PIL import Image

    with Image.open(small / entries[0]["file_path"]) as im:
        assert im.format == "JPEG" and im.size == (SIZE[1], SIZE[0]) and im.mode == "RGB"
    assert not list(small.parent.glob(".ds.*")), "temporary folder left behind"


def test_views_and_visibility(small: Path) -> None:
    meta = json.loads((small / sp.META_FILE).read_text())
    views: dict[int, set[str]] = {}
    for im in meta["images"]:
        views.setdefault(im["id"], set()).add(im["view"])
    assert all(v == {"front", "back", "side"} for v in views.values())
    entries = {e["file_path"]: e for e in json.loads((small / "reid_raw.json").read_text())}
    idents = {i["id"]: i for i in meta["identities"]}
    for im in meta["images"]:
        attrs = idents[im["id"]]["attributes"]
        text = " ".join(entries[im["file_path"]]["captions"]).lower()
        if im["view"] == "back":
            for word in ("logo", "glasses", "sunglasses", "mask", "graphic"):
                assert word not in text.split(), (word, text)
        if attrs["upper_pattern"] == "logo" and im["view"] != "front":
            assert "logo" not in text


def test_attribute_families() -> None:
    fams = sp.ATTRIBUTE_FAMILIES
    assert len(fams) >= 8
    assert all(len(set(v)) >= 4 for v in fams.values())
    ident = sp.make_identities(5, 0)[0]
    assert set(ident["attributes"]) == set(fams)
    for fam, value in ident["attributes"].items():
        assert value in fams[fam]


def test_hard_negatives() -> None:
    idents = sp.make_identities(60, 1)
    copies = [i for i in idents if i["near_copy_of"] is not None]
    assert 0.15 * 60 <= len(copies) <= 0.45 * 60
    by_id = {i["id"]: i for i in idents}
    for c in copies:
        base = by_id[c["near_copy_of"]]
        assert base["split"] == c["split"]
        diff = [f for f in sp.ATTRIBUTE_FAMILIES if c["attributes"][f] != base["attributes"][f]]
        assert 1 <= len(diff) <= 2 and sorted(diff) == sorted(c["changed"])
    close = sum(1 for a, b in combinations(idents, 2)
                if sum(a["attributes"][f] != b["attributes"][f] for f in sp.ATTRIBUTE_FAMILIES) <= 2)
    assert close >= len(copies)


def test_deterministic_bytes(small: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    sp.generate(again, identities=12, images_per_id=3, captions_per_image=2, size=SIZE, seed=3, workers=2)
    assert _digest(again) == _digest(small)
    other = tmp_path / "other"
    sp.generate(other, identities=12, images_per_id=3, captions_per_image=2, size=SIZE, seed=4, workers=1)
    a, b = _digest(other), _digest(small)
    assert a.keys() == b.keys()
    assert a["reid_raw.json"] != b["reid_raw.json"]
    assert sum(a[k] != b[k] for k in a) > len(a) // 2


def test_refuses_to_overwrite(small: Path, tmp_path: Path) -> None:
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(UserError, match="not empty"):
        sp.generate(out, identities=3, images_per_id=1, captions_per_image=1, size=SIZE, workers=1)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    sp.generate(out, identities=3, images_per_id=1, captions_per_image=1, size=SIZE, workers=1, force=True)
    assert not (out / "keep.txt").exists() and (out / "reid_raw.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]


def test_failure_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(sp, "_render_job", boom)
    out = tmp_path / "ds"
    with pytest.raises(RuntimeError, match="disk full"):
        sp.generate(out, identities=3, images_per_id=1, captions_per_image=1, size=SIZE, workers=1)
    assert list(tmp_path.iterdir()) == []


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="identities"):
        sp.generate(tmp_path / "x", identities=0)
    with pytest.raises(UserError, match="size"):
        sp.generate(tmp_path / "x", identities=3, size=(10, 10))
    with pytest.raises(UserError, match="split fractions"):
        sp.generate(tmp_path / "x", identities=3, split_fractions=(0.5, 0.1, 0.1))
    assert list(tmp_path.iterdir()) == []


def test_preview(small: Path, tmp_path: Path) -> None:
    png = sp.save_preview(small, tmp_path / "sheet.png", identities=2)
    from PIL import Image

    with Image.open(png) as im:
        assert im.width >= 3 * SIZE[1] and im.height >= 2 * SIZE[0]
