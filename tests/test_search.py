"""Gallery index and text search: incremental updates, artifact keying, ranking, sheet / HTML output, dataset
queries, the search_check benchmark, ONNX search with torch unimportable, and the search command's index and filter
flags (--index, --index-param, --index-dir, --where) with their one-line errors."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tbps_compress.artifacts import open_artifact, write_artifact
from tbps_compress.errors import UserError
from tbps_compress.retrieval.index import GalleryIndex, scan_images
from tbps_compress.retrieval.search import (
    artifact_hash,
    format_results,
    open_encoder,
    open_index,
    render_html,
    render_sheet,
    run_search,
    search_gallery,
)

REPO = Path(__file__).resolve().parents[1]
QUERY = "a man in a grey hoodie with a black backpack"


def _image(path: Path, seed: int, size: tuple[int, int] = (24, 48)) -> Path:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, 3)
    arr = np.clip(base + rng.integers(-40, 40, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def _gallery(root: Path, n: int = 5) -> Path:
    for i in range(n):
        ext = (".jpg", ".png", ".JPEG", ".bmp", ".webp")[i % 5]
        _image(root / ("sub" if i % 2 else "") / f"p{i:02d}{ext}", seed=i)
    (root / "notes.txt").write_text("not an image")
    return root


def _torch_artifact(out: Path, seed: int) -> Path:
    torch = pytest.importorskip("torch")
    from tbps_compress.models.factory import build_model
    from tbps_compress.models.io import save_model

    torch.manual_seed(seed)
    model = build_model("test-tiny")
    with write_artifact(out, stage="train") as tmp:
        save_model(model, tmp)
    return out


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("artifacts")
    return _torch_artifact(root / "a", 0), _torch_artifact(root / "b", 1)


class Counting:
    """Wraps an encoder and counts the images it embeds."""

    def __init__(self, inner):
        self.inner, self.images = inner, 0

    def encode_images(self, images):
        self.images += len(images)
        return self.inner.encode_images(images)

    def encode_texts(self, texts):
        return self.inner.encode_texts(texts)


@pytest.fixture(scope="module")
def encoder_a(artifacts):
    return open_encoder(artifacts[0], device="cpu")


def _open(art: Path, gallery: Path, encoder, **kw) -> tuple[GalleryIndex, Counting]:
    enc = Counting(encoder)
    return open_index(art, gallery, encoder=enc, **kw), enc


def test_index_incremental(tmp_path, artifacts, encoder_a, caplog):
    gallery = _gallery(tmp_path / "g")
    art = artifacts[0]
    index, enc = _open(art, gallery, encoder_a)
    assert enc.images == 5 and len(index) == 5 and index.stats.rebuilt
    h = artifact_hash(open_artifact(art))
    assert index.index_dir == gallery / ".tbps_index" / h[:16]
    assert index.vectors_path.is_file() and index.metadata_path.is_file() and index.manifest_path.is_file()
    assert index.vectors_path.parent == index.index_dir and index.vectors_path.suffix == ".faiss"
    rel = [p.relative_to(gallery).as_posix() for p in index.paths]
    assert rel == sorted(rel) and "notes.txt" not in rel and not any(".tbps_index" in r for r in rel)
    assert not list(index.index_dir.glob("*.tmp")), "temporary file left behind"

    index, enc = _open(art, gallery, encoder_a)  # unchanged: nothing re-embedded
    assert enc.images == 0 and index.stats.reused == 5 and not index.stats.rebuilt

    _image(gallery / "new.png", seed=10)
    index, enc = _open(art, gallery, encoder_a)
    assert enc.images == 1 and index.stats.added == 1 and len(index) == 6

    target = gallery / "p00.jpg"
    st = target.stat()
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))  # mtime only
    index, enc = _open(art, gallery, encoder_a)
    assert enc.images == 1 and index.stats.changed == 1
    _image(gallery / "sub" / "p01.png", seed=11, size=(30, 60))  # content and size
    index, enc = _open(art, gallery, encoder_a)
    assert enc.images == 1 and index.stats.changed == 1

    (gallery / "sub" / "p03.bmp").unlink()
    index, enc = _open(art, gallery, encoder_a)
    assert enc.images == 0 and index.stats.removed == 1 and len(index) == 5
    assert "sub/p03.bmp" not in {e.path for e in index.entries}
    with sqlite3.connect(index.metadata_path) as db:
        live = {p for (p,) in db.execute("SELECT path FROM files WHERE removed_gen IS NULL")}
    assert "sub/p03.bmp" not in live and len(live) == 5

    (gallery / "broken.jpg").write_bytes(b"not a jpeg at all")
    with caplog.at_level(logging.WARNING, logger="tbps_compress.retrieval.index"):
        index, enc = _open(art, gallery, encoder_a)
    assert enc.images == 0 and index.stats.unreadable == 1 and "broken.jpg" in caplog.text
    index, enc = _open(art, gallery, encoder_a)  # remembered: not retried, still counted
    assert enc.images == 0 and index.stats.unreadable == 1 and len(index) == 5

    # Rows kept across updates are the right ones: compare with a fresh embedding of every file.
    fresh = encoder_a.encode_images([Image.open(p).convert("RGB") for p in index.paths])
    np.testing.assert_allclose(index.embeddings, fresh, atol=1e-5)


def test_other_artifact_not_reused(tmp_path, artifacts, encoder_a):
    gallery = _gallery(tmp_path / "g", n=3)
    a, b = artifacts
    ia, _ = _open(a, gallery, encoder_a)
    enc_b = open_encoder(b, device="cpu")
    ib, cb = _open(b, gallery, enc_b)
    assert cb.images == 3 and ib.index_dir != ia.index_dir
    # Pointed at A's index folder, B still rebuilds and takes the folder over.
    ib2, cb2 = _open(b, gallery, enc_b, index_dir=ia.index_dir)
    assert cb2.images == 3 and ib2.stats.rebuilt
    assert json.loads((ia.index_dir / "manifest.json").read_text())["artifact_hash"] == artifact_hash(open_artifact(b))
    # A corrupt FAISS file is detected and rebuilt, not trusted.
    ib.vectors_path.write_bytes(b"garbage")
    ib3, cb3 = _open(b, gallery, enc_b)
    assert cb3.images == 3 and len(ib3) == 3


def test_ranking_matches_brute_force(tmp_path, artifacts, encoder_a):
    gallery = _gallery(tmp_path / "g", n=7)
    queries = [QUERY, "a woman in a red dress"]
    report = search_gallery(artifacts[0], gallery, queries, top_k=4, encoder=encoder_a)
    img = encoder_a.encode_images([Image.open(p).convert("RGB") for p in scan_images(gallery)])
    txt = encoder_a.encode_texts(queries)
    sims = txt @ img.T
    paths = scan_images(gallery)
    for res, row in zip(report.results, sims, strict=True):
        order = np.argsort(-row, kind="stable")[:4]
        assert [h.path for h in res.hits] == [paths[i] for i in order]
        np.testing.assert_allclose([h.score for h in res.hits], row[order], atol=1e-5)
        assert [h.rank for h in res.hits] == [1, 2, 3, 4]
    text = format_results(report)
    assert text.splitlines()[0] == f"# {QUERY}" and text.splitlines()[1].startswith("1\t")
    # top_k larger than the gallery returns the whole gallery
    assert len(search_gallery(artifacts[0], gallery, QUERY, top_k=50, encoder=encoder_a).results[0].hits) == 7


def test_sheet_and_html(tmp_path, artifacts, encoder_a):
    gallery = _gallery(tmp_path / "g", n=6)
    paths = scan_images(gallery)
    identities = {p.resolve(): (7 if i % 2 == 0 else 8) for i, p in enumerate(paths)}
    report = search_gallery(artifacts[0], gallery, QUERY, top_k=5, encoder=encoder_a, identities=identities,
                            expected_ids=[7])
    hits = report.results[0].hits
    assert all(h.correct == (h.pid == 7) for h in hits)
    sheet = render_sheet(report, tmp_path / "out" / "sheet.png")
    with Image.open(sheet) as im:
        assert im.width > 5 * 64 and im.height > 128
        # Frame of the first tile (cell 124 px wide), below a one-line header (pad 10 + 24 per line + 22).
        colour = im.convert("RGB").getpixel((10 + 62, 10 + 24 + 22 + 1))  # top edge, mid-cell
        assert colour == ((34, 150, 60) if hits[0].correct else (200, 40, 50))
    page = render_html(report, tmp_path / "out" / "page.html").read_text()
    assert QUERY in page and page.count('<figure class="hit') == 5
    assert page.count("data:image/jpeg;base64,") == 5
    assert page.count('class="hit correct"') == sum(h.correct for h in hits)


def test_dataset_query_and_search_check(tmp_path, artifacts, capsys, benchmark_script):
    root = tmp_path / "ds"
    entries = []
    for pid in (1, 2, 3):
        for k in range(2):
            rel = f"imgs/test/{pid}/{pid}_{k}.jpg"
            _image(root / rel, seed=10 * pid + k)
            entries.append({"split": "test", "id": pid, "file_path": rel,
                            "captions": [f"person {pid} view {k} in a coat", f"someone number {pid}"]})
    _image(root / "imgs/train/9/9_0.jpg", seed=99)
    entries.append({"split": "train", "id": 9, "file_path": "imgs/train/9/9_0.jpg", "captions": ["a train person"]})
    (root / "reid_raw.json").write_text(json.dumps(entries))

    report = run_search(artifacts[0], data=root, query_index=5, top_k=3, device="cpu",
                        sheet=tmp_path / "s.png", html_out=tmp_path / "p.html")
    res = report.results[0]
    assert res.query == "someone number 2" and res.expected_id == 2
    assert len(res.hits) == 3 and all(h.correct == (h.pid == 2) for h in res.hits)
    assert all("train" not in h.path.as_posix() for h in res.hits), "gallery must be the test split only"
    assert report.index_dir.name.endswith("-split-test")
    # A gallery that is a dataset root gives identities too; --expect-id marks them.
    report = run_search(artifacts[0], "a person in a coat", gallery=root, expect_id=9, top_k=7, device="cpu")
    assert len(report.results[0].hits) == 7 and sum(h.correct for h in report.results[0].hits) == 1
    with pytest.raises(UserError, match="--query-index"):
        run_search(artifacts[0], data=root, query_index=99, device="cpu")
    with pytest.raises(UserError, match="expect-id"):
        run_search(artifacts[0], "x", gallery=root / "imgs" / "test" / "1", expect_id=1, device="cpu")

    mod = benchmark_script("search_check")
    rc = mod.main(["--artifact", str(artifacts[0]), "--data", str(root), "--device", "cpu", "--tolerance", "0"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "search top-5 hit rate" in out and "evaluate_artifact R5" in out


def test_gallery_errors(tmp_path, artifacts, encoder_a):
    with pytest.raises(UserError, match="does not exist"):
        search_gallery(artifacts[0], tmp_path / "missing", QUERY, encoder=encoder_a)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(UserError, match="no image files"):
        search_gallery(artifacts[0], tmp_path / "empty", QUERY, encoder=encoder_a)
    assert sorted(p.name for p in (tmp_path / "empty").iterdir()) == ["readme.txt"]  # no index left behind
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"junk")
    with pytest.raises(UserError, match="could be read"):
        search_gallery(artifacts[0], tmp_path / "bad", QUERY, encoder=encoder_a)
    assert sorted(p.name for p in (tmp_path / "bad").iterdir()) == ["x.png"]
    _gallery(tmp_path / "ok", n=2)
    with pytest.raises(UserError, match="query"):
        search_gallery(artifacts[0], tmp_path / "ok", "  ", encoder=encoder_a)
    with pytest.raises(UserError, match="top-k"):
        search_gallery(artifacts[0], tmp_path / "ok", QUERY, top_k=0, encoder=encoder_a)


# ---------------------------------------------------------------------------------------------------------------------
# ONNX artifact, torch unimportable
# ---------------------------------------------------------------------------------------------------------------------

EMB = 8


def _onnx_artifact(out: Path) -> Path:
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    from tbps_compress.runtime import PreprocessConfig, default_vocab_path

    rng = np.random.default_rng(0)
    size, ctx = (32, 16), 77

    def save(nodes, name, inp, init, path):
        graph = helper.make_graph(nodes, name, [inp], [helper.make_tensor_value_info(
            "embedding", TensorProto.FLOAT, ["batch", EMB])], init)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
        onnx.checker.check_model(model)
        onnx.save(model, str(path))

    with write_artifact(out, stage="export") as tmp:
        save([helper.make_node("GlobalAveragePool", ["image"], ["g"]),
              helper.make_node("Flatten", ["g"], ["f"], axis=1),
              helper.make_node("MatMul", ["f", "w"], ["p"]),
              helper.make_node("LpNormalization", ["p"], ["embedding"], axis=1, p=2)],
             "image_encoder", helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, *size]),
             [numpy_helper.from_array(rng.standard_normal((3, EMB)).astype(np.float32), "w")],
             tmp / "image_encoder.onnx")
        save([helper.make_node("Gather", ["emb", "text"], ["t"], axis=0),
              helper.make_node("ReduceMean", ["t"], ["m"], axes=[1], keepdims=0),
              helper.make_node("LpNormalization", ["m"], ["embedding"], axis=1, p=2)],
             "text_encoder", helper.make_tensor_value_info("text", TensorProto.INT64, ["batch", ctx]),
             [numpy_helper.from_array(rng.standard_normal((49408, EMB)).astype(np.float32), "emb")],
             tmp / "text_encoder.onnx")
        (tmp / "preprocess.json").write_text(json.dumps(PreprocessConfig(image_size=size).to_dict()))
        shutil.copy(default_vocab_path(), tmp / "bpe_simple_vocab_16e6.txt.gz")
        (tmp / "tokenizer.json").write_text(json.dumps({"context_length": ctx,
                                                        "vocab_file": "bpe_simple_vocab_16e6.txt.gz"}))
    return out


def test_onnx_search_is_torch_free(tmp_path):
    art = _onnx_artifact(tmp_path / "onnx_art")
    gallery = _gallery(tmp_path / "g", n=4)
    script = textwrap.dedent(f"""
        import sys
        from importlib.abc import MetaPathFinder

        class Block(MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "open_clip", "torchvision"):
                    raise ImportError(f"blocked import of {{name}}")
                return None

        sys.meta_path.insert(0, Block())
        from pathlib import Path
        from tbps_compress.retrieval.search import format_results, render_html, render_sheet, run_search

        report = run_search(Path({str(art)!r}), {QUERY!r}, gallery=Path({str(gallery)!r}), top_k=3,
                            sheet=Path({str(tmp_path / "o.png")!r}), html_out=Path({str(tmp_path / "o.html")!r}))
        assert len(report.results[0].hits) == 3, report
        print(format_results(report))
        bad = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "open_clip", "torchvision"))
        assert not bad, bad
        print("TORCH_FREE_OK")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "TORCH_FREE_OK" in proc.stdout
    assert proc.stdout.splitlines()[0] == f"# {QUERY}" and proc.stdout.splitlines()[1].startswith("1\t")
    assert (tmp_path / "o.png").is_file() and (tmp_path / "o.html").is_file()


# ---------------------------------------------------------------------------------------------------------------------
# the search command: index kinds, metadata filters, one-line errors
# ---------------------------------------------------------------------------------------------------------------------


def _synth_like(root: Path) -> Path:
    """A dataset root with reid_raw.json and a synth_meta.json giving each image's camera (image k: camera k)."""
    entries, metas = [], []
    for pid in (1, 2, 3):
        for k in range(2):
            rel = f"test/{pid:04d}/{pid:04d}_{k:02d}.jpg"
            _image(root / "imgs" / rel, seed=10 * pid + k)
            entries.append({"split": "test", "id": pid, "file_path": rel, "captions": [f"person {pid} view {k}"]})
            metas.append({"file_path": rel, "id": pid, "view": "front", "camera": k, "occluder": None})
    (root / "reid_raw.json").write_text(json.dumps(entries))
    (root / "synth_meta.json").write_text(json.dumps({"format": "synthpedes", "file_path_root": "imgs",
                                                      "images": metas}))
    return root


def _index_files(root: Path) -> dict[str, str]:
    (folder,) = [p.parent for p in (root / ".tbps_index").glob("*/manifest.json")]
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
            if p.is_file() and not p.name.endswith(("-wal", "-shm")) and p.name != ".lock"}


def test_cli_search_where_and_index_kinds(tmp_path, run_cli):
    art = _onnx_artifact(tmp_path / "onnx_art")
    root = _synth_like(tmp_path / "ds")
    code, out, err = run_cli(["search", art, QUERY, "--gallery", root, "--where", "camera=1", "--top-k", "10"])
    assert code == 0, err
    hits = out.splitlines()[1:]
    assert len(hits) == 3 and all("_01.jpg" in h and "\tid=" in h for h in hits), out
    code, out, _ = run_cli(["search", art, QUERY, "--gallery", root, "--where", "camera=0", "--where", "identity=2"])
    assert code == 0 and len(out.splitlines()) == 2 and "0002_00.jpg" in out
    before = _index_files(root)

    bad = [
        (["--where", "colour=red"], "error: --where colour=red: unknown column 'colour'; valid columns: camera, "
                                    "identity, mtime_ns, path, size"),
        (["--where", "camera"], "error: --where 'camera': expected KEY=VALUE"),
        (["--where", "camera=9"], "error: --where camera=9: no indexed image matches (camera values present: 0, 1)"),
        (["--index", str(tmp_path / "somewhere")], "unknown index kind; choose one of flat, flat16, hnsw, ivfpq, "
                                                   "ivfsq8 (an index folder is now given with --index-dir)"),
        (["--index", "ivfpq"], "error: --index ivfpq: training needs at least 256 vectors (256 codewords per "
                               "sub-quantizer with nbits=8) but the gallery has 6 images; use --index flat"),
        (["--index", "hnsw", "--index-param", "nprobe=4"], "error: --index-param nprobe: not a parameter of "
                                                           "--index hnsw; valid: M, ef_construction, ef_search"),
    ]
    for flags, message in bad:
        code, out, err = run_cli(["search", art, QUERY, "--gallery", root, *flags])
        assert code == 2, (flags, out, err)
        assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, (flags, err)
        assert _index_files(root) == before, f"{flags} changed the index"

    code, out, err = run_cli(["search", art, QUERY, "--gallery", root, "--index", "hnsw", "--index-param",
                              "ef_search=8"])
    assert code == 0, err
    (manifest,) = (root / ".tbps_index").glob("*/manifest.json")
    assert json.loads(manifest.read_text())["index"] == {"kind": "hnsw", "params": {
        "M": 32, "ef_construction": 200, "ef_search": 8}}
    custom = tmp_path / "custom_index"
    code, _, err = run_cli(["search", art, QUERY, "--gallery", root, "--index-dir", custom])
    assert code == 0, err
    assert (custom / "manifest.json").is_file()


def test_cli_truncated_index_is_rebuilt_without_traceback(tmp_path, run_cli_subprocess):
    art = _onnx_artifact(tmp_path / "onnx_art")
    gallery = _gallery(tmp_path / "g", n=4)
    code, _, err = run_cli_subprocess(["search", art, QUERY, "--gallery", gallery])
    assert code == 0, err
    (vectors,) = (gallery / ".tbps_index").glob("*/vectors-*.faiss")
    vectors.write_bytes(vectors.read_bytes()[:100])
    code, out, err = run_cli_subprocess(["search", art, QUERY, "--gallery", gallery])
    assert code == 0, err
    assert "Traceback" not in err and "FAISS index file does not match the manifest" in err
    assert "rebuilding the index" in err and len(out.splitlines()) == 5


# ---------------------------------------------------------------------------------------------------------------------
# sharded embedding
# ---------------------------------------------------------------------------------------------------------------------


def test_shards_merge_into_the_single_process_index(tmp_path, artifacts, encoder_a):
    """Two shards embedded separately and merged give the same files and vectors as one process; a file changed
    after its shard was embedded is re-embedded by the merge, the rest is not; shard folders are removed."""
    from tbps_compress.retrieval.search import artifact_hash, open_artifact
    from tbps_compress.retrieval.shards import build_shard, merge_shards

    gallery = _gallery(tmp_path / "g", n=7)
    h = artifact_hash(open_artifact(artifacts[0]))
    single, _ = _open(artifacts[0], gallery, encoder_a, index_dir=tmp_path / "single")
    single.refresh()
    shards = [build_shard(gallery, encoder_a, h, r, 2) for r in range(2)]
    assert all(s.is_dir() and s.parent.name == ".tbps_index" for s in shards)
    _image(gallery / "p00.jpg", seed=99)  # changed after shard 0 embedded it
    counting = Counting(encoder_a)
    merged = merge_shards(gallery, counting, h, shards, spec="hnsw")
    assert counting.images == 1 and merged.kind == "hnsw"
    assert not any(s.exists() for s in shards)
    single.refresh()
    assert [r.entry for r in merged.rows] == [r.entry for r in single.rows]
    np.testing.assert_allclose(merged.embeddings, single.embeddings, atol=1e-5)
    again = Counting(encoder_a)
    reopened = GalleryIndex(gallery, again, h)
    assert reopened.refresh().embedded == 0 and again.images == 0  # an ordinary index afterwards


def test_sharded_build_under_torchrun_with_two_processes(tmp_path):
    """The module entry point under torchrun: 2 CPU processes, each a shard, rank 0 merges."""
    import subprocess
    import sys

    from tbps_compress.retrieval.index import GalleryIndex as GI
    from tbps_compress.retrieval.search import artifact_hash, open_artifact, open_encoder

    art = _onnx_artifact(tmp_path / "onnx")
    gallery = _gallery(tmp_path / "g", n=6)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "tbps_compress.retrieval.shards", str(art), "--gallery", str(gallery)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "6 images (flat)" in done.stdout
    a = open_artifact(art)
    counting = Counting(open_encoder(a, device="cpu"))
    index = GI(gallery, counting, artifact_hash(a))
    assert index.refresh().embedded == 0 and len(index) == 6
    assert sorted(p.name for p in (gallery / ".tbps_index").iterdir()) == [index.index_dir.name]
