"""SynthPedes generator: schema and CUHK-PEDES layout, determinism, test/val splits that do not move with the
training size, the ground-truth sidecar, viewpoints, attribute coverage, hard negatives, safe writes."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from itertools import combinations
from pathlib import Path

import pytest

from tbps_compress.data import synthpedes as sp
from tbps_compress.data.readers import load_dataset
from tbps_compress.data.synthpedes.captions import _COLOUR_WORDS, _HAIR_COLOUR_WORDS, MAX_WORDS, MIN_WORDS, tokenize
from tbps_compress.errors import DataError, UserError

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
        assert e["file_path"].startswith(f"{e['split']}/{e['id']:04d}/") and e["file_path"].endswith(".jpg")
        assert (small / "imgs" / e["file_path"]).is_file()
        assert len(e["captions"]) == 2 and len(e["captions_bt"]) == 2
        assert len(set(e["captions"])) == 2, "captions of one image must differ"
        assert e["processed_tokens"] == [tokenize(c) for c in e["captions"]]
        for c in e["captions"] + e["captions_bt"]:
            assert MIN_WORDS <= len(tokenize(c)) <= MAX_WORDS, c
        for toks in e["processed_tokens"]:
            assert all(t == t.lower() and t.strip() for t in toks)
        assert split_of.setdefault(e["id"], e["split"]) == e["split"], "an identity spans two splits"
    counts = {s: sum(1 for v in split_of.values() if v == s) for s in ("train", "val", "test")}
    assert counts == {"train": 8, "val": 2, "test": 2}  # identities=12: 80/10/10 with at least 2 val and 2 test
    assert sorted(i for i, s in split_of.items() if s == "test") == [1, 2], "test identities are numbered first"
    from PIL import Image

    with Image.open(small / "imgs" / entries[0]["file_path"]) as im:
        assert im.format == "JPEG" and im.size == (SIZE[1], SIZE[0]) and im.mode == "RGB"
    assert not list(small.parent.glob(".ds.*")), "temporary folder left behind"


def test_public_loaders_join(small: Path) -> None:
    """IRRA and TBPS-CLIP read CUHK-PEDES as os.path.join(dataset_dir, "imgs", file_path): every image opens."""
    from PIL import Image

    entries = json.loads((small / "reid_raw.json").read_text())
    for e in entries:
        img_path = os.path.join(str(small), "imgs", e["file_path"])
        with Image.open(img_path) as im:
            im.verify()
    ds = load_dataset(small)
    assert ds.format == "cuhk-pedes" and ds.image_root == small / "imgs"
    assert all(ds.image_path(r).is_file() for r in ds.records)
    meta = json.loads((small / sp.META_FILE).read_text())
    assert [im["file_path"] for im in meta["images"]] == [e["file_path"] for e in entries]


def test_old_layout_still_loads(small: Path, tmp_path: Path) -> None:
    """Folders written before the CUHK-PEDES layout (file_path starting with imgs/) still load and preview."""
    old = tmp_path / "old"
    shutil.copytree(small, old)
    entries = json.loads((old / "reid_raw.json").read_text())
    for e in entries:
        e["file_path"] = f"imgs/{e['file_path']}"
    (old / "reid_raw.json").write_text(json.dumps(entries))
    ds = load_dataset(old)
    assert ds.image_root == old and ds.records[0].image.startswith("imgs/")
    assert all(ds.image_path(r).is_file() for r in ds.records)
    assert sp.save_preview(old, tmp_path / "sheet.png", identities=1).is_file()


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
    ident = sp.make_identities(0, train_ids=5)[0]
    assert set(ident["attributes"]) == set(fams)
    for fam, value in ident["attributes"].items():
        assert value in fams[fam]


def test_hard_negatives() -> None:
    idents = sp.make_identities(1, train_ids=48, val_ids=6, test_ids=6)
    assert [i["split"] for i in idents] == ["test"] * 6 + ["val"] * 6 + ["train"] * 48
    assert [i["id"] for i in idents] == list(range(1, 61))
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


def _split_view(root: Path, splits: tuple[str, ...] = ("test", "val")) -> tuple[list, list, dict[str, str]]:
    """The entries, truth entries and image hashes of ``splits``."""
    entries = [e for e in json.loads((root / "reid_raw.json").read_text()) if e["split"] in splits]
    truth = [t for t in json.loads((root / sp.TRUTH_FILE).read_text())["entries"] if t["split"] in splits]
    images = {e["file_path"]: hashlib.sha256((root / "imgs" / e["file_path"]).read_bytes()).hexdigest()
              for e in entries}
    return entries, truth, images


def test_test_and_val_do_not_move_with_train_size(tmp_path: Path) -> None:
    kw = {"val_ids": 4, "test_ids": 6, "images_per_id": 3, "eval_images_per_id": 2, "captions_per_image": 2,
          "size": (96, 32), "seed": 2, "workers": 1}
    a = sp.generate(tmp_path / "a", train_ids=8, **kw)
    b = sp.generate(tmp_path / "b", train_ids=20, **kw)
    assert a["splits"]["test"] == b["splits"]["test"] == {"identities": 6, "images": 12, "captions": 24}
    assert a["splits"]["train"]["images"] == 24 and b["splits"]["train"]["images"] == 60  # 3 per train identity
    view_a, view_b = _split_view(tmp_path / "a"), _split_view(tmp_path / "b")
    assert view_a[0] and view_a == view_b, "the test and val splits changed with the number of train identities"
    assert _split_view(tmp_path / "a", ("train",))[2] != _split_view(tmp_path / "b", ("train",))[2]
    meta = json.loads((tmp_path / "b" / sp.META_FILE).read_text())
    assert meta["splits"]["test"] == {"identities": 6, "images_per_id": 2, "images": 12, "captions": 24}
    assert meta["splits"]["val"]["identities"] == 4 and meta["splits"]["train"]["identities"] == 20
    assert meta["splits"]["train"]["images_per_id"] == 3
    test_ids = {i["id"] for i in meta["identities"] if i["split"] == "test"}
    assert test_ids == set(range(1, 7))
    copies = [i for i in meta["identities"] if i["split"] == "test" and i["near_copy_of"] is not None]
    assert copies and all(c["near_copy_of"] in test_ids for c in copies), "no near-copies inside the test split"


def test_ground_truth_sidecar(small: Path) -> None:
    raw = (small / "reid_raw.json").read_bytes()
    entries = json.loads(raw)
    truth = json.loads((small / sp.TRUTH_FILE).read_text())
    assert list(truth) == ["format", "version", "annotation_sha256", "families", "coarse", "entries"]
    assert truth["format"] == "synthpedes-truth" and truth["version"] == 1
    assert truth["annotation_sha256"] == hashlib.sha256(raw).hexdigest()
    families = truth["families"]
    assert families == ["gender", "build", "view", "hair_style", "hair_color", "hat", "hat_color", "face",
                        "upper_type", "upper_color", "upper_pattern", "upper_color2", "upper_inner", "lower_type",
                        "lower_color", "shoe_type", "shoe_color", "bag", "bag_color", "held", "held_color"]
    assert truth["coarse"] == ["gender", "upper_type", "upper_color", "upper_pattern", "lower_type", "lower_color"]
    assert len(truth["entries"]) == len(entries)
    colour_families = [f for f in families if f.endswith("_color") or f == "upper_inner"]
    # families whose stated value is never noisy: when a caption states them, it states what the image shows
    exact = ("gender", "build", "view", "hair_style", "hair_color", "hat", "face", "upper_type", "upper_pattern",
             "lower_type", "shoe_type", "bag", "held")
    checked = 0
    for e, t in zip(entries, truth["entries"], strict=True):
        assert (t["file_path"], t["id"], t["split"]) == (e["file_path"], e["id"], e["split"])
        vis = t["visible"]
        assert list(vis) == families and vis["gender"] in ("male", "female")
        assert vis["view"] in ("front", "back", "side") and vis["build"] in ("slim", "average", "heavy")
        for thing, colour in (("hat", "hat_color"), ("bag", "bag_color"), ("held", "held_color"),
                              ("lower_type", "lower_color"), ("shoe_type", "shoe_color")):
            if vis[thing] == "none":
                assert vis[colour] is None, (thing, vis)
        if vis["held"] != "umbrella":
            assert vis["held_color"] is None
        if vis["upper_pattern"] == "plain":
            assert vis["upper_color2"] is None
        assert len(t["stated"]) == len(e["captions"]) == len(e["captions_bt"])
        for stated, cap, bt in zip(t["stated"], e["captions"], e["captions_bt"], strict=True):
            assert set(stated) <= set(families) and list(stated) == [f for f in families if f in stated]
            assert stated["gender"] == vis["gender"]
            for fam in exact:
                if fam in stated:
                    assert stated[fam] == vis[fam], (fam, stated, vis, cap)
            for fam in colour_families:
                if fam not in stated:
                    continue
                words = _HAIR_COLOUR_WORDS.get(stated[fam], (stated[fam],)) if fam == "hair_color" else \
                    _COLOUR_WORDS[stated[fam]]
                for text in (cap, bt):  # the paraphrase states the same content
                    assert any(w in text.lower() for w in words), (fam, stated[fam], text)
                checked += 1
    assert checked > len(entries)
    assert sp.load_truth(small) == truth


def _truth_copy(small: Path, tmp_path: Path) -> Path:
    ds = tmp_path / "ds"
    shutil.copytree(small, ds)
    return ds


def test_load_truth_errors(small: Path, tmp_path: Path) -> None:
    ds = _truth_copy(small, tmp_path)
    path = ds / sp.TRUTH_FILE
    good = path.read_text()

    def expect(*needles: str, at: Path = path) -> None:
        with pytest.raises(DataError) as info:
            sp.load_truth(ds)
        msg = str(info.value)
        assert "\n" not in msg and msg.startswith(f"{at}: "), msg
        for needle in needles:
            assert needle in msg, (needle, msg)

    path.unlink()
    expect("synth_truth.json: not found; this dataset has no ground truth (only SynthPedes folders written by "
           "`tbps-compress synth` have one)")
    path.write_text("{not json")
    expect("not valid JSON", "regenerate with `tbps-compress synth`")
    path.write_text(json.dumps({**json.loads(good), "format": "something-else"}))
    expect("'something-else'", "expected 'synthpedes-truth' version 1")
    path.write_text(json.dumps({**json.loads(good), "version": 2}))
    expect("version 2", "expected 'synthpedes-truth' version 1")
    path.write_text(good)
    assert sp.load_truth(ds)["format"] == "synthpedes-truth"
    # the annotations change: the sidecar no longer describes them
    entries = json.loads((ds / "reid_raw.json").read_text())
    entries[0]["captions"][0] = "a person in a red coat"
    (ds / "reid_raw.json").write_text(json.dumps(entries))
    expect("does not match reid_raw.json (the annotations were changed or the sidecar belongs to another dataset); "
           "regenerate with `tbps-compress synth`")
    # a sidecar of another dataset
    shutil.copyfile(small / "reid_raw.json", ds / "reid_raw.json")
    other = tmp_path / "other"
    sp.generate(other, identities=5, images_per_id=1, captions_per_image=1, size=SIZE, seed=9, workers=1)
    shutil.copyfile(other / sp.TRUTH_FILE, path)
    expect("does not match reid_raw.json")
    # the sidecar's entries were edited (hash still right): they no longer line up
    data = json.loads(good)
    data["entries"][3]["id"] += 1
    path.write_text(json.dumps(data))
    expect("entry 3 does not line up with reid_raw.json entry 3")
    data = json.loads(good)
    data["entries"][5]["stated"].pop()
    path.write_text(json.dumps(data))
    expect("entry 5 does not line up")
    data = json.loads(good)
    data["entries"].pop()
    path.write_text(json.dumps(data))
    expect(f"{len(data['entries'])} entries but reid_raw.json has {len(data['entries']) + 1}")
    path.write_text(good)
    (ds / "reid_raw.json").unlink()
    expect("reid_raw.json: not found", at=ds / "reid_raw.json")


def test_presets_and_overrides() -> None:
    assert sp.preset_settings() == {"train_ids": 160, "val_ids": 20, "test_ids": 20, "images_per_id": 4,
                                    "captions_per_image": 2}
    bench = sp.preset_settings("benchmark")
    assert bench == {"train_ids": 10_000, "val_ids": 200, "test_ids": 1_000, "images_per_id": 4,
                     "eval_images_per_id": 3, "captions_per_image": 2}
    # CUHK-PEDES scale test split: 1,000 identities, 3,000 images, 6,000 captions
    assert bench["test_ids"] * bench["eval_images_per_id"] * bench["captions_per_image"] == 6_000
    assert sp.preset_settings("benchmark", train_ids=50, eval_images_per_id=None)["train_ids"] == 50
    assert sp.preset_settings("benchmark", 300, test_ids=40) == {
        "identities": 300, "test_ids": 40, "images_per_id": 4, "eval_images_per_id": 3, "captions_per_image": 2}
    assert sp.resolve_counts(300, test_ids=40) == (240, 30, 40)
    assert sp.resolve_counts() == (160, 20, 20) and sp.resolve_counts(16) == (12, 2, 2)
    assert sp.resolve_counts(5) == (1, 2, 2)
    with pytest.raises(UserError, match=r"--preset must be one of demo, benchmark \(got 'huge'\)"):
        sp.preset_settings("huge")


def test_cli_preset_with_overrides(tmp_path: Path, run_cli) -> None:
    out = tmp_path / "ds"
    code, stdout, err = run_cli(["synth", out, "--preset", "benchmark", "--train-ids", "3", "--val-ids", "0",
                                 "--test-ids", "2", "--size", "48x16", "--workers", "1"])
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["splits"] == {"train": {"identities": 3, "images": 12, "captions": 24},
                                 "test": {"identities": 2, "images": 6, "captions": 12}}
    meta = json.loads((out / sp.META_FILE).read_text())
    assert meta["splits"]["val"] == {"identities": 0, "images_per_id": 3, "images": 0, "captions": 0}
    assert sp.load_truth(out)["entries"][0]["file_path"] == "test/0001/0001_01.jpg"


def test_refuses_to_overwrite(small: Path, tmp_path: Path) -> None:
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(UserError, match="not empty"):
        sp.generate(out, identities=5, images_per_id=1, captions_per_image=1, size=SIZE, workers=1)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    sp.generate(out, identities=5, images_per_id=1, captions_per_image=1, size=SIZE, workers=1, force=True)
    assert not (out / "keep.txt").exists() and (out / "reid_raw.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]


def test_failure_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("disk full")

    from tbps_compress.data.synthpedes import writer

    monkeypatch.setattr(writer, "_render_job", boom)  # the writer renders through it
    out = tmp_path / "ds"
    with pytest.raises(RuntimeError, match="disk full"):
        sp.generate(out, identities=5, images_per_id=1, captions_per_image=1, size=SIZE, workers=1)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"identities": 0}, "synth: --identities must be at least 5 (got 0)"),
    ({"identities": 2}, "synth: --identities must be at least 5 (got 2): it is split 80/10/10 and val and test "
                        "need 2 identities each"),
    ({"identities": 3, "size": (10, 10)}, "synth: --size must be HEIGHTxWIDTH"),
    ({"train_ids": 0, "val_ids": 2, "test_ids": 2}, "synth: --train-ids must be at least 1 (got 0)"),
    ({"test_ids": 1}, "synth: --test-ids must be at least 2 (got 1): retrieval among fewer than 2 test identities"),
    ({"test_ids": 0}, "synth: --test-ids must be at least 2 (got 0)"),
    ({"val_ids": 1}, "synth: --val-ids must be 0 (no val split) or at least 2 (got 1): with 1 val identity any "
                     "model scores R@1 100"),
    ({"val_ids": -3}, "synth: --val-ids must be 0 (no val split) or at least 2 (got -3)"),
    ({"eval_images_per_id": 0}, "synth: --eval-images-per-id must be at least 1 (got 0)"),
])
def test_bad_arguments(kwargs: dict, message: str, tmp_path: Path) -> None:
    with pytest.raises(UserError) as info:
        sp.generate(tmp_path / "x", **kwargs)
    assert str(info.value).startswith(message) and "\n" not in str(info.value), str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_preview(small: Path, tmp_path: Path) -> None:
    png = sp.save_preview(small, tmp_path / "sheet.png", identities=2)
    from PIL import Image

    with Image.open(png) as im:
        assert im.width >= 3 * SIZE[1] and im.height >= 2 * SIZE[0]
