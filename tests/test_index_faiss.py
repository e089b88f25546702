"""The FAISS + SQLite gallery index with a fake (torch-free, instant) encoder: incremental ids, index kinds and
conversions, hnsw tombstones, metadata filters, crash safety (an exception and a SIGKILL between the writes), bad
files and flags, the format-1 conversion, and the search_scale benchmark at a small size."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

faiss = pytest.importorskip("faiss")

from tbps_compress.errors import UserError  # noqa: E402
from tbps_compress.retrieval import index as index_mod  # noqa: E402
from tbps_compress.retrieval.index import (  # noqa: E402
    GalleryIndex,
    IndexFileError,
    IndexSpec,
    VectorStore,
    normalize_where,
)

REPO = Path(__file__).resolve().parents[1]
HASH_A = "a" * 64
HASH_B = "b" * 64
DIM = 16


def _vec(seed_bytes: bytes) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256(seed_bytes).digest()[:8], "little")
    v = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


class FakeEncoder:
    """A deterministic embedding of the pixels (changed image -> changed vector); counts what it embeds."""

    def __init__(self) -> None:
        self.images = 0

    def encode_images(self, images):
        self.images += len(images)
        return np.stack([_vec(im.tobytes()) for im in images])

    def encode_texts(self, texts):
        return np.stack([_vec(t.encode()) for t in texts])


def _image(path: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (8, 4, 3), dtype=np.uint8)).save(path)
    return path


def _gallery(root: Path, n: int) -> Path:
    for i in range(n):
        _image(root / ("sub" if i % 3 == 0 else "") / f"p{i:03d}.png", seed=i)
    return root


def _open(gallery: Path, artifact_hash: str = HASH_A, **kw) -> tuple[GalleryIndex, FakeEncoder]:
    enc = FakeEncoder()
    index = GalleryIndex(gallery, enc, artifact_hash, **kw)
    index.refresh()
    return index, enc


def _brute(index: GalleryIndex, query: str, k: int, keep=None) -> list[Path]:
    paths = [p for p in index.paths if keep is None or keep(p)]
    vecs = np.stack([_vec(np.asarray(Image.open(p).convert("RGB")).tobytes()) for p in paths])
    sims = vecs @ _vec(query.encode())
    return [paths[i] for i in np.argsort(-sims, kind="stable")[:k]]


def _db_rows(index: GalleryIndex) -> dict[str, tuple]:
    with sqlite3.connect(index.metadata_path) as c:
        g = index.generation
        cur = c.execute("SELECT path, id, identity, camera FROM files WHERE added_gen <= ? AND "
                        "(removed_gen IS NULL OR removed_gen > ?)", (g, g))
        return {p: (i, ident, cam) for p, i, ident, cam in cur}


def _snapshot(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
            if p.is_file() and not p.name.endswith(("-wal", "-shm")) and p.name != ".lock"}


def test_flat_incremental_ids_files_and_sqlite(tmp_path):
    gallery = _gallery(tmp_path / "g", 12)
    index, enc = _open(gallery)
    assert enc.images == 12 and index.stats.rebuilt and index.kind == "flat"
    manifest = json.loads(index.manifest_path.read_text())
    assert manifest["format"] == 2 and manifest["rows"] == 12 and manifest["index"] == {"kind": "flat", "params": {}}
    assert manifest["vectors_sha256"] == hashlib.sha256(index.vectors_path.read_bytes()).hexdigest()
    assert isinstance(faiss.read_index(str(index.vectors_path)), faiss.IndexIDMap2)
    with sqlite3.connect(index.metadata_path) as c:
        assert c.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        cols = [r[1] for r in c.execute("PRAGMA table_info(files)")]
    assert {"id", "path", "size", "mtime_ns", "identity", "camera", "indexed_at"} <= set(cols)
    before = _db_rows(index)
    assert sorted(before) == sorted(p.relative_to(gallery).as_posix() for p in index.paths)

    index, enc = _open(gallery)  # unchanged
    assert enc.images == 0 and index.stats.reused == 12 and not index.stats.rebuilt
    assert _db_rows(index) == before

    _image(gallery / "new.png", seed=100)
    _image(gallery / "p001.png", seed=101)  # changed content
    (gallery / "sub" / "p003.png").unlink()
    index, enc = _open(gallery)
    s = index.stats
    assert (enc.images, s.added, s.changed, s.removed, s.reused, len(index)) == (2, 1, 1, 1, 10, 12)
    after = _db_rows(index)
    assert "sub/p003.png" not in after and "new.png" in after
    assert after["p001.png"][0] != before["p001.png"][0], "a changed file gets a new id"
    assert after["p002.png"][0] == before["p002.png"][0], "an unchanged file keeps its id"
    assert sorted(index._store.ids()) == sorted(i for i, _, _ in after.values())
    assert len(list(index.index_dir.glob("vectors-*.faiss"))) == 1, "superseded FAISS file left behind"
    assert not list(index.index_dir.glob(".*.tmp"))

    for q in ("a man in a grey hoodie", "a red dress"):
        assert [p for p, _ in index.search(q, 5)[0]] == _brute(index, q, 5)
    np.testing.assert_allclose(index.embeddings, np.stack(
        [_vec(np.asarray(Image.open(p).convert("RGB")).tobytes()) for p in index.paths]), atol=1e-6)
    # top-k over the gallery size returns the whole gallery
    assert len(index.search("x", 50)[0]) == 12


def test_hnsw_tombstones_then_compaction(tmp_path, monkeypatch):
    gallery = _gallery(tmp_path / "g", 20)
    index, enc = _open(gallery, spec=IndexSpec("hnsw", {"M": 8, "ef_search": 64}))
    m = json.loads(index.manifest_path.read_text())
    assert m["index"] == {"kind": "hnsw", "params": {"M": 8, "ef_construction": 200, "ef_search": 64}}
    (gallery / "p001.png").unlink()
    _image(gallery / "p002.png", seed=200)
    index, enc = _open(gallery)  # kind kept from the manifest
    assert index.kind == "hnsw" and enc.images == 1 and index.stats.tombstones == 2
    m = json.loads(index.manifest_path.read_text())
    assert (m["rows"], m["ntotal"], m["tombstones"]) == (19, 21, 2)
    tomb = set(index._store.tombstones.tolist())
    for q in ("one", "two", "three"):
        scores, ids = index.search_vectors(_vec(q.encode()), 19)
        assert not tomb & set(ids[0].tolist()) and len(set(ids[0].tolist())) == 19
    index2 = GalleryIndex(gallery, FakeEncoder(), HASH_A)
    assert index2.load(strict=True) and index2.stats.tombstones == 0 and len(index2._store.tombstones) == 2
    index2.close()

    monkeypatch.setattr(index_mod, "HNSW_COMPACT_FRACTION", 0.1)
    (gallery / "p004.png").unlink()
    index, enc = _open(gallery)
    assert enc.images == 0 and index.stats.compacted and index.stats.tombstones == 0
    m = json.loads(index.manifest_path.read_text())
    assert (m["rows"], m["ntotal"], m["tombstones"], m["index"]["params"]["M"]) == (18, 18, 0, 8)
    assert [p for p, _ in index.search("q", 4)[0]] == _brute(index, "q", 4)


def test_kind_conversion_search_params_and_ivf(tmp_path):
    gallery = _gallery(tmp_path / "g", 45)
    flat, _ = _open(gallery)
    want = [p for p, _ in flat.search("query", 5)[0]]
    first_vectors = flat.vectors_path.name
    hnsw, enc = _open(gallery, spec="hnsw")
    assert enc.images == 0 and hnsw.stats.converted and [p for p, _ in hnsw.search("query", 5)[0]] == want
    name = hnsw.vectors_path.name
    assert name != first_vectors
    # a search-time parameter: manifest only, same FAISS file
    hnsw, enc = _open(gallery, spec=IndexSpec("hnsw", {"ef_search": 16}))
    assert enc.images == 0 and hnsw.vectors_path.name == name and hnsw.params["ef_search"] == 16
    # a build parameter: rebuilt from the stored vectors
    hnsw, enc = _open(gallery, spec=IndexSpec("hnsw", {"M": 4}))
    assert enc.images == 0 and hnsw.params == {"M": 4, "ef_construction": 200, "ef_search": 16}
    sq, enc = _open(gallery, spec=IndexSpec("ivfsq8", {"nprobe": 4}))
    assert enc.images == 0 and sq.params["nlist"] == 1 and sq.params["nprobe"] == 4
    got = [p for p, _ in sq.search("query", 5)[0]]
    assert len(set(got) & set(want)) >= 4  # 8-bit codes: near-ties may swap
    # ivf keeps codes only: going back to flat re-embeds, with a warning
    flat, enc = _open(gallery, spec="flat")
    assert enc.images == 45 and [p for p, _ in flat.search("query", 5)[0]] == want
    # incremental add and remove on an ivf index keep the trained codebooks
    sq, _ = _open(gallery, spec="ivfsq8")
    _image(gallery / "zz.png", seed=999)
    (gallery / "p010.png").unlink()
    sq, enc = _open(gallery)
    assert enc.images == 1 and len(sq) == 45 and sq.kind == "ivfsq8"
    assert sorted(sq._store.ids()) == sorted(r.id for r in sq.rows)


def test_flat16_stores_half_and_ranks_like_flat(tmp_path):
    gallery = _gallery(tmp_path / "g", 30)
    flat, _ = _open(gallery)
    want = flat.search("query", 6)[0]
    half, enc = _open(gallery, spec="flat16")  # converted from flat's stored vectors: nothing re-embedded
    assert enc.images == 0 and half.stats.converted and half.kind == "flat16"
    got = half.search("query", 6)[0]
    assert [p for p, _ in got] == [p for p, _ in want]
    assert max(abs(a - b) for (_, a), (_, b) in zip(got, want, strict=True)) < 1e-3
    _image(gallery / "zz.png", seed=77)
    (gallery / "p004.png").unlink()
    half, enc = _open(gallery)  # incremental: one embedded, one removed, the kind kept
    assert enc.images == 1 and len(half) == 30 and half.kind == "flat16"
    assert [p for p, _ in half.search("query", 5)[0]] == _brute(half, "query", 5)
    ids = np.arange(1, 2001, dtype=np.int64)
    vecs = np.random.default_rng(0).standard_normal((2000, 64)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    a, b = VectorStore.build("flat", ids, vecs), VectorStore.build("flat16", ids, vecs)
    a.write(tmp_path / "a.faiss")
    b.write(tmp_path / "b.faiss")
    assert (tmp_path / "b.faiss").stat().st_size < 0.55 * (tmp_path / "a.faiss").stat().st_size
    with pytest.raises(ValueError, match="holds a IndexFlat"):
        VectorStore.read(tmp_path / "a.faiss", "flat16", {}, 64)


def test_ivfpq_vector_store_recall():
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((20, 32)).astype(np.float32)
    x = centers[rng.integers(0, 20, 1000)] + 0.3 * rng.standard_normal((1000, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = np.arange(10, 1010, dtype=np.int64)
    exact = VectorStore.build("flat", ids, x)
    approx = VectorStore.build("ivfpq", ids, x, {"nlist": 8, "m": 16, "nprobe": 8})
    assert approx.params == {"nlist": 8, "m": 16, "nbits": 8, "nprobe": 8}
    assert not approx.index.do_polysemous_training  # slow, and useless here
    q = x[:50] + 0.05 * rng.standard_normal((50, 32)).astype(np.float32)
    _, gt = exact.search(q, 10)
    _, got = approx.search(q, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(gt, got, strict=True)])
    assert recall > 0.3, recall  # chance: 10 / 1000
    approx.remove(ids[:100])
    assert len(approx) == 900 and not set(ids[:100]) & set(approx.ids())
    with pytest.raises(UserError, match=r"at least 256 vectors .* --index flat"):
        VectorStore.build("ivfpq", ids[:100], x[:100])
    with pytest.raises(UserError, match=r"at least 64 vectors \(64 lists\)"):
        VectorStore.build("ivfsq8", ids[:20], x[:20], {"nlist": 64})
    with pytest.raises(UserError, match="m=5: the 32-d embeddings"):
        VectorStore.build("ivfpq", ids, x, {"m": 5})


def test_where_filters(tmp_path, monkeypatch):
    gallery = _gallery(tmp_path / "g", 24)
    paths = sorted(gallery.rglob("*.png"))
    ann = {p.resolve(): {"identity": i // 4, "camera": i % 3} for i, p in enumerate(paths)}
    cam_of = {p: a["camera"] for p, a in ann.items()}
    index, enc = _open(gallery, annotations=ann)
    assert {v[2] for v in _db_rows(index).values()} == {0, 1, 2}
    for exact_max in (index_mod.EXACT_SUBSET_MAX, 0):  # candidates scored directly, then an IDSelectorBatch
        monkeypatch.setattr(index_mod, "EXACT_SUBSET_MAX", exact_max)
        hits = index.search("someone", 5, where={"camera": 2})[0]
        assert [p for p, _ in hits] == _brute(index, "someone", 5, keep=lambda p: cam_of[p.resolve()] == 2)
        hits = index.search("someone", 50, where=["camera=1", "identity=0,1"])[0]
        assert hits and all(cam_of[p.resolve()] == 1 and ann[p.resolve()]["identity"] in (0, 1) for p, _ in hits)
    assert {p.name for p, _ in index.search("x", 50, where={"path": "sub/*"})[0]} == \
        {p.name for p in paths if p.parent.name == "sub"}
    # metadata follow the annotations without re-embedding
    ann2 = {p: {**a, "camera": 7} for p, a in ann.items()}
    index, enc = _open(gallery, annotations=ann2)
    assert enc.images == 0 and index.stats.metadata_updated == 24
    assert len(index.search("x", 50, where={"camera": 7})[0]) == 24
    # an approximate index filters too
    hnsw, _ = _open(gallery, spec="hnsw")
    assert len(hnsw.search("x", 50, where={"camera": 7})[0]) == 24
    with pytest.raises(UserError, match=r"no indexed image matches \(camera values present: 7\)"):
        index.search("x", 3, where={"camera": 99})
    with pytest.raises(UserError, match=r"unknown column 'colour'; valid columns: camera, identity, mtime_ns"):
        index.search("x", 3, where={"colour": "red"})
    plain, _ = _open(_gallery(tmp_path / "g2", 3))
    with pytest.raises(UserError, match="no indexed image has a known camera"):
        plain.search("x", 3, where={"camera": 1})


@pytest.mark.parametrize("where, message", [
    (["camera"], "expected KEY=VALUE"),
    (["=3"], "expected KEY=VALUE"),
    (["camera="], "expected KEY=VALUE"),
    (["camera=front"], "camera takes an integer value"),
    (["colour=red"], "unknown column 'colour'; valid columns: camera, identity, mtime_ns, path, size"),
])
def test_where_parse_errors(where, message):
    with pytest.raises(UserError, match=message) as err:
        normalize_where(where)
    assert "\n" not in str(err.value)
    assert normalize_where(["camera=1,3", "path=sub/*"]) == [("camera", (1, 3)), ("path", ("sub/*",))]


def test_spec_errors():
    with pytest.raises(UserError, match="--index annoy: unknown index kind; choose one of flat, flat16, hnsw"):
        IndexSpec("annoy")
    with pytest.raises(UserError, match="--index-param efsearch: not a parameter of --index hnsw; valid: M, "):
        IndexSpec.parse("hnsw", ["efsearch=4"])
    with pytest.raises(UserError, match="expected KEY=VALUE"):
        IndexSpec.parse("hnsw", ["M"])
    with pytest.raises(UserError, match="M takes an integer"):
        IndexSpec.parse("hnsw", ["M=big"])
    with pytest.raises(UserError, match="nprobe=0: must be at least 1"):
        IndexSpec.parse("ivfsq8", ["nprobe=0"])
    with pytest.raises(UserError, match="not a parameter of --index flat"):
        IndexSpec("flat", {"M": 4})


def test_too_small_for_ivf_leaves_index_untouched(tmp_path):
    gallery = _gallery(tmp_path / "g", 10)
    index, _ = _open(gallery)
    before = _snapshot(index.index_dir)
    enc = FakeEncoder()
    with pytest.raises(UserError, match=r"--index ivfpq: training needs at least 256 vectors .* gallery has 10 "
                                        r"images; use --index flat") as err:
        GalleryIndex(gallery, enc, HASH_A, spec="ivfpq").refresh()
    assert "\n" not in str(err.value) and enc.images == 0, "checked before embedding"
    with pytest.raises(UserError, match=r"--index ivfsq8: training needs at least 50 vectors \(50 lists\)"):
        GalleryIndex(gallery, enc, HASH_A, spec=IndexSpec("ivfsq8", {"nlist": 50})).refresh()
    assert _snapshot(index.index_dir) == before
    index, enc = _open(gallery)
    assert enc.images == 0 and index.kind == "flat"


def test_truncated_and_corrupt_files(tmp_path, caplog):
    gallery = _gallery(tmp_path / "g", 6)
    index, _ = _open(gallery)
    vpath = index.vectors_path
    data = vpath.read_bytes()
    vpath.write_bytes(data[: len(data) // 2])
    before = _snapshot(index.index_dir)
    probe = GalleryIndex(gallery, FakeEncoder(), HASH_A)
    with pytest.raises(IndexFileError, match=rf"{vpath.name}: FAISS index file does not match the manifest") as err:
        probe.load(strict=True)
    assert "\n" not in str(err.value) and "truncated" in str(err.value)
    with caplog.at_level(logging.WARNING, logger="tbps_compress.retrieval.index"):
        assert not probe.load()
    assert "rebuilding the index" in caplog.text and len(caplog.records) == 1
    assert _snapshot(index.index_dir) == before, "load must not change anything"
    index, enc = _open(gallery)
    assert enc.images == 6 and index.stats.rebuilt and len(index) == 6

    # the hash matches (manifest rewritten to the garbage) but FAISS cannot read it: still one line, rebuilt
    vpath = index.vectors_path
    vpath.write_bytes(b"garbage!" * 10)
    m = json.loads(index.manifest_path.read_text())
    m.update(vectors_sha256=hashlib.sha256(vpath.read_bytes()).hexdigest(), vectors_bytes=80)
    index.manifest_path.write_text(json.dumps(m))
    with pytest.raises(IndexFileError, match="unusable FAISS index: FAISS cannot read it"):
        GalleryIndex(gallery, FakeEncoder(), HASH_A).load(strict=True)
    index, enc = _open(gallery)
    assert enc.images == 6

    index.close()
    index.metadata_path.write_bytes(b"not a database" * 100)
    for suffix in ("-wal", "-shm"):
        Path(f"{index.metadata_path}{suffix}").unlink(missing_ok=True)
    with pytest.raises(IndexFileError, match="unusable metadata database"):
        GalleryIndex(gallery, FakeEncoder(), HASH_A).load(strict=True)
    index, enc = _open(gallery)
    assert enc.images == 6 and len(index) == 6

    index.manifest_path.write_text("{not json")
    with pytest.raises(IndexFileError, match="unreadable index manifest"):
        GalleryIndex(gallery, FakeEncoder(), HASH_A).load(strict=True)


def test_other_artifact_rebuilds(tmp_path):
    gallery = _gallery(tmp_path / "g", 4)
    a, _ = _open(gallery)
    with pytest.raises(IndexFileError, match="built by another artifact"):
        GalleryIndex(gallery, FakeEncoder(), HASH_B, index_dir=a.index_dir).load(strict=True)
    b, enc = _open(gallery, HASH_B, index_dir=a.index_dir)
    assert enc.images == 4 and b.stats.rebuilt
    assert json.loads(a.manifest_path.read_text())["artifact_hash"] == HASH_B
    assert len(list(a.index_dir.glob("metadata-*.sqlite"))) == 1


def _rows_and_search(gallery: Path) -> tuple[set[str], list[Path]]:
    index = GalleryIndex(gallery, FakeEncoder(), HASH_A)
    assert index.load(strict=True)
    rows = {r.entry.path for r in index.rows}
    hits = [p for p, _ in index.search("probe", len(rows))[0]]
    assert sorted(hits) == sorted(gallery / p for p in rows)
    index.close()
    return rows, hits


def _change(gallery: Path) -> None:
    _image(gallery / "added.png", seed=500)
    _image(gallery / "p002.png", seed=501)
    (gallery / "p004.png").unlink()


def test_crash_between_the_writes_keeps_the_old_index(tmp_path, monkeypatch):
    gallery = _gallery(tmp_path / "g", 8)
    _open(gallery, spec="hnsw")
    old_rows, _ = _rows_and_search(gallery)
    _change(gallery)
    real = os.replace
    calls = []

    def flaky(src, dst):
        calls.append(Path(dst).name)
        if len(calls) == 2:  # after the FAISS file and the SQLite commit, before the manifest
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", flaky)
    with pytest.raises(OSError, match="No space"):
        GalleryIndex(gallery, FakeEncoder(), HASH_A).refresh()
    monkeypatch.setattr(os, "replace", real)
    assert calls[0].endswith(".faiss") and calls[1] == "manifest.json"
    rows, _ = _rows_and_search(gallery)
    assert rows == old_rows
    index, enc = _open(gallery)
    assert enc.images == 2 and not index.stats.rebuilt
    new_rows, _ = _rows_and_search(gallery)
    assert "added.png" in new_rows and "p004.png" not in new_rows
    assert len(list(index.index_dir.glob("vectors-*.faiss"))) == 1 and not list(index.index_dir.glob(".*.tmp"))


_KILL_SCRIPT = textwrap.dedent("""
    import hashlib, os, signal, sys
    from pathlib import Path
    import numpy as np
    from tbps_compress.retrieval.index import GalleryIndex

    gallery, point = Path(sys.argv[1]), sys.argv[2]

    class Enc:
        def encode_images(self, images):
            out = []
            for im in images:
                seed = int.from_bytes(hashlib.sha256(im.tobytes()).digest()[:8], "little")
                v = np.random.default_rng(seed).standard_normal(16).astype(np.float32)
                out.append(v / np.linalg.norm(v))
            return np.stack(out)

    real, calls = os.replace, []

    def replace(src, dst):
        calls.append(dst)
        if point == "before-manifest" and len(calls) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        real(src, dst)
        if (point == "after-vectors" and len(calls) == 1) or (point == "after-manifest" and len(calls) == 2):
            os.kill(os.getpid(), signal.SIGKILL)

    os.replace = replace
    GalleryIndex(gallery, Enc(), "a" * 64).refresh()
    print("NOT KILLED")
""")


@pytest.mark.parametrize("point", ["after-vectors", "before-manifest", "after-manifest"])
def test_sigkill_during_update_leaves_old_or_new(tmp_path, point):
    gallery = _gallery(tmp_path / "g", 8)
    _open(gallery, spec="flat")
    old_rows, _ = _rows_and_search(gallery)
    _change(gallery)
    proc = subprocess.run([sys.executable, "-c", _KILL_SCRIPT, str(gallery), point], capture_output=True, text=True,
                          timeout=120, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    rows, _ = _rows_and_search(gallery)  # strict load: consistent
    new_rows = (old_rows - {"p004.png"}) | {"added.png"}
    assert rows == (new_rows if point == "after-manifest" else old_rows)
    index, enc = _open(gallery)
    assert not index.stats.rebuilt and enc.images == (0 if point == "after-manifest" else 2)
    assert {r.entry.path for r in index.rows} == new_rows
    assert len(list(index.index_dir.glob("vectors-*.faiss"))) == 1 and not list(index.index_dir.glob(".*.tmp"))


def test_format_1_index_converted_without_reembedding(tmp_path):
    gallery = _gallery(tmp_path / "g", 5)
    folder = gallery / ".tbps_index" / HASH_A[:16]
    folder.mkdir(parents=True)
    paths = sorted(gallery.rglob("*.png"), key=lambda p: p.relative_to(gallery).as_posix())
    emb = np.stack([_vec(np.asarray(Image.open(p).convert("RGB")).tobytes()) for p in paths])
    np.save(folder / "embeddings.npy", emb)
    files = [{"path": p.relative_to(gallery).as_posix(), "size": p.stat().st_size,
              "mtime_ns": p.stat().st_mtime_ns} for p in paths]
    (folder / "manifest.json").write_text(json.dumps({
        "format": 1, "artifact_hash": HASH_A, "gallery": str(gallery), "rows": 5, "dim": DIM,
        "embeddings_sha256": hashlib.sha256((folder / "embeddings.npy").read_bytes()).hexdigest(),
        "files": files, "unreadable": []}))
    index, enc = _open(gallery)
    assert enc.images == 0 and len(index) == 5 and not (folder / "embeddings.npy").exists()
    assert json.loads(index.manifest_path.read_text())["format"] == 2
    assert [p for p, _ in index.search("q", 3)[0]] == _brute(index, "q", 3)


def test_search_scale_benchmark_small(tmp_path, benchmark_script, capsys):
    mod = benchmark_script("search_scale")
    out = tmp_path / "scale"
    rc = mod.main(["--n", "2000", "--dim", "32", "--queries", "20", "--out", str(out), "--nlist", "16",
                   "--pq-m", "8", "--hnsw-m", "8", "--ef-construction", "40"])
    assert rc == 0
    result = json.loads(out.with_suffix(".json").read_text())
    kinds = {r["index"] for r in result["rows"]}
    assert {"old (npy + cosine_topk)", "flat", "flat16", "hnsw", "ivfpq", "ivfsq8"} <= kinds
    assert next(r for r in result["rows"] if r["index"] == "flat16")["recall_at_10"] >= 0.99
    for r in result["rows"]:
        assert r["single_p50_ms"] > 0 and r["batch_ms"] > 0 and r["index_bytes"] > 0
        assert 0.0 <= r["recall_at_10"] <= 1.0
    assert next(r for r in result["rows"] if r["index"] == "flat")["recall_at_10"] == 1.0
    table = out.with_suffix(".md").read_text()
    assert "| index |" in table and "recall@10" in table
    capsys.readouterr()
    assert mod.main(["--n", "2000", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --out ") and "exists; pass --force" in err and err.count("\n") == 1
