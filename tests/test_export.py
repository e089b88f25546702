"""ONNX export of the tiny model: parity, dynamic batch, typed errors, float16, pruned shapes, external data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tbps_compress.artifacts import open_artifact, write_artifact, write_json
from tbps_compress.errors import ArtifactError, ParityError, UserError
from tbps_compress.export import onnx_export
from tbps_compress.export.onnx_export import export_onnx
from tbps_compress.export.parity import make_session, random_images, random_tokens
from tbps_compress.models.config import get_model_config
from tbps_compress.models.factory import build_model
from tbps_compress.models.io import load_model, save_model

COLOURS = ["red", "blue", "green", "black", "white"]


def make_dataset(root: Path, n_ids: int = 5, per_id: int = 2) -> Path:
    """A tiny CUHK-PEDES-format dataset: ids 0-1 train, the rest test."""
    rng = np.random.default_rng(0)
    (root / "imgs" / "cam").mkdir(parents=True, exist_ok=True)
    entries = []
    for pid in range(n_ids):
        for k in range(per_id):
            rel = f"cam/{pid:03d}_{k}.png"
            Image.fromarray(rng.integers(0, 256, (48 + 4 * pid, 24 + 2 * k, 3), dtype=np.uint8)).save(
                root / "imgs" / rel)
            entries.append({
                "split": "train" if pid < 2 else "test", "id": pid, "file_path": rel,
                "captions": [f"A person in a {COLOURS[pid]} shirt; carrying bag #{k}.",
                             f"The {COLOURS[(pid + 1) % 5]} shoes (and) {COLOURS[pid]} top"],
            })
    (root / "reid_raw.json").write_text(json.dumps(entries), encoding="utf-8")
    return root


def make_torch_artifact(path: Path, cfg: dict | str = "test-tiny", seed: int = 0, extra: dict | None = None) -> Path:
    torch.manual_seed(seed)
    model = build_model(cfg)
    with torch.no_grad():  # non-trivial biases / norms so that deduplicated zero tensors do not hide mistakes
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    with write_artifact(path, stage="train") as tmp:
        save_model(model, tmp)
        write_json(tmp / "metrics.json", {"R1": 12.5})
        for name, data in (extra or {}).items():
            write_json(tmp / name, data)
    return path


def shared_export(factory: pytest.TempPathFactory) -> Path:
    """One real export of the tiny model per test session (shared with test_quantize.py)."""
    base = factory.getbasetemp() / "tbps_shared_export"
    out = base / "onnx"
    if not (out / "lineage.json").is_file():
        base.mkdir(exist_ok=True)
        data = base / "data"
        if not (data / "reid_raw.json").is_file():
            make_dataset(data)
        src = base / "torch"
        if not (src / "lineage.json").is_file():
            make_torch_artifact(src)
        export_onnx(src, out, parity_data=data)
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shared_export(tmp_path_factory)


def _torch_embed(model: torch.nn.Module, tower: str, array: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        x = torch.from_numpy(array)
        out = model.encode_image(x, normalize=True) if tower == "image" else model.encode_text(x, normalize=True)
    return out.numpy()


def test_export_writes_runtime_files_with_parity(exported: Path) -> None:
    art = open_artifact(exported)  # hash-verified
    assert art.stage == "export" and art.kind == "onnx"
    assert art.lineage["parent"]["stage"] == "train"
    report = json.loads((exported / "export_report.json").read_text())
    diffs = report["parity"]["float32"]
    for key in ("image:random-b1", "image:random-b3", "text:random-b1", "text:random-b3",
                "image:dataset-b4", "text:dataset-b4"):
        assert diffs[key] < 1e-4, (key, diffs[key])
    assert report["opset"] == 18 and report["external_data"] is False
    check = report["tokenizer_check"]  # tokenizer.json vs the runtime tokenizer, on probes + the dataset's captions
    assert check["checked"] > len(onnx_export.TOKENIZER_PROBES) and check["dataset_differ"] == 0
    assert report["vocab_lookup_in_graph"] is False
    doc = json.loads((exported / "preprocess.json").read_text())
    assert doc["format"] == 2
    assert doc["image"] == {
        "input": "image", "image_size_hw": [64, 32], "resize": "bicubic", "channel_order": "RGB", "layout": "NCHW",
        "dtype": "float32", "mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711],
        "resize_rule": doc["image"]["resize_rule"], "scale": doc["image"]["scale"]}
    assert "image.resize((32, 64), Image.BICUBIC)" in doc["image"]["resize_rule"]
    text = doc["text"]
    assert text["context_length"] == 32 and text["tokenizer"] == "tokenizer.json" and text["dtype"] == "int64"
    assert (text["sot_id"], text["eot_id"], text["pad_id"]) == (49406, 49407, 0)
    assert text["caption_cleaning"]["replace_with_space"] == [".", "!", '"', "(", ")", "*", "#", ":", ";", "~"]
    assert '. ! " ( ) * # : ; ~' in text["caption_cleaning"]["rule"]
    assert doc["output"] == {"name": "embedding", "dtype": "float32", "shape": ["batch", 32], "l2_normalized": True,
                             "similarity": doc["output"]["similarity"]}
    tokenizers = pytest.importorskip("tokenizers")
    hf = tokenizers.Tokenizer.from_file(str(exported / "tokenizer.json"))  # a real Hugging Face tokenizers file
    assert hf.encode("A man (in RED)!").ids[:6] == [49406, 320, 786, 530, 736, 49407]
    assert len(hf.encode("word " * 100).ids) == 32
    assert not (exported / "bpe_simple_vocab_16e6.txt.gz").exists() and not (exported / "vocab_map.json").exists()
    assert json.loads((exported / "source_metrics.json").read_text()) == {"R1": 12.5}
    assert (exported / "model_config.json").is_file()
    import onnx

    for name, inp, dtype in (("image_encoder.onnx", "image", 1), ("text_encoder.onnx", "text", 7)):
        model = onnx.load(str(exported / name))
        assert [i.name for i in model.graph.input] == [inp]
        assert model.graph.input[0].type.tensor_type.elem_type == dtype
        assert [o.name for o in model.graph.output] == ["embedding"]
        assert model.graph.output[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch


def test_dynamic_batch_and_argmax_pooling(exported: Path) -> None:
    model = load_model(exported.parent / "torch").eval()
    images = random_images(5, (64, 32), seed=5)
    tokens = random_tokens(5, 32, seed=5)
    tokens[0, 1:] = 0  # EOT right after position 0 and a full-length row
    tokens[0, 1] = 49407
    tokens[1, -1] = 49407
    for tower, array in (("image", images), ("text", tokens)):
        got = make_session(exported / f"{tower}_encoder.onnx").run(["embedding"], {tower: array})[0]
        assert got.shape == (5, 32)
        assert np.abs(got - _torch_embed(model, tower, array)).max() < 1e-4
        assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_runtime_encoder_reads_export(exported: Path) -> None:
    from tbps_compress.runtime import OnnxEncoder

    model = load_model(exported.parent / "torch").eval()
    enc = OnnxEncoder(exported)
    captions = ["a man in a red shirt", "woman with a blue bag"]
    tokens = enc.tokenizer(captions)
    assert np.abs(enc.encode_texts(captions) - _torch_embed(model, "text", tokens)).max() < 1e-4
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (80, 40, 3), dtype=np.uint8))
    from tbps_compress.runtime import preprocess_images

    ref = _torch_embed(model, "image", preprocess_images([img], enc.preprocess_config))
    assert np.abs(enc.encode_images([img]) - ref).max() < 1e-4


def _fake_export(source: Path, corrupt: str | None = None):
    """Stand-in for ``_export_tower`` that copies an already exported file (optionally with one weight of one
    tower corrupted): exercises everything after the exporter without paying for another export."""
    import onnx
    from onnx import numpy_helper

    def fake(module, example, input_name, path, opset):  # noqa: ANN001, ANN202
        name = f"{input_name}_encoder.onnx"
        if corrupt != input_name:
            shutil.copyfile(source / name, path)
            return False
        model = onnx.load(str(source / name))
        init = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)) if t.data_type == 1 else 0)
        arr = numpy_helper.to_array(init).copy()
        arr += np.random.default_rng(0).standard_normal(arr.shape).astype(arr.dtype)
        init.CopyFrom(numpy_helper.from_array(arr, init.name))
        onnx.save(model, str(path))
        return False

    return fake


def test_parity_error_lists_outputs_and_leaves_nothing(exported: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(onnx_export, "_export_tower", _fake_export(exported, corrupt="image"))
    out = tmp_path / "bad"
    with pytest.raises(ParityError) as info:
        export_onnx(exported.parent / "torch", out)
    err = info.value
    assert set(err.diffs) == {"image:random-b1", "image:random-b3"}
    assert all(v > 1e-4 for v in err.diffs.values())
    msg = str(err)
    assert "image:random-b1" in msg and "image:random-b3" in msg and "max abs diff" in msg and "text:" not in msg
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary folder left either


def test_fp16_export(exported: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import onnx

    monkeypatch.setattr(onnx_export, "_export_tower", _fake_export(exported))
    out = tmp_path / "fp16"
    report = export_onnx(exported.parent / "torch", out, fp16=True)
    assert report["fp16"] is True and report["max_diff"] < 1e-4
    if report["fp16_parity_skipped"] is None:
        assert report["max_diff_fp16"] < 1e-2
    for name in ("image_encoder.onnx", "text_encoder.onnx"):
        model = onnx.load(str(out / name))
        big = [t for t in model.graph.initializer if int(np.prod(t.dims)) > 100]
        assert big and all(t.data_type == onnx.TensorProto.FLOAT16 for t in big)
        assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        assert report["files"][name] < 0.7 * (exported / name).stat().st_size


def test_out_equal_or_inside_input_refused(exported: Path) -> None:
    src = exported.parent / "torch"
    before = sorted(p.name for p in src.iterdir())
    for out in (src, src / "onnx", src.parent):
        with pytest.raises(UserError, match="input artifact"):
            export_onnx(src, out)
    assert sorted(p.name for p in src.iterdir()) == before
    with pytest.raises(UserError, match="already exists"):
        export_onnx(src, exported)


def test_missing_or_corrupt_source(tmp_path: Path, exported: Path) -> None:
    with pytest.raises(ArtifactError):
        export_onnx(tmp_path / "nope", tmp_path / "out")
    bad = tmp_path / "bad"
    shutil.copytree(exported.parent / "torch", bad)
    with open(bad / "weights.safetensors", "r+b") as fh:
        fh.seek(200)
        fh.write(b"\xff" * 16)
    with pytest.raises(ArtifactError, match="weights.safetensors"):
        export_onnx(bad, tmp_path / "out")
    with pytest.raises(ArtifactError, match="not a PyTorch artifact"):
        export_onnx(exported, tmp_path / "out")  # an ONNX artifact is not an export source
    assert not (tmp_path / "out").exists()


def test_bad_opset_refused(exported: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="opset"):
        export_onnx(exported.parent / "torch", tmp_path / "o", opset=11)


def test_pruned_model_with_vocab_map_and_external_data(tmp_path: Path, exported: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Per-block head / MLP sizes (pruned), a pruned vocabulary (vocab_map.json) and weights in external data;
    fused (--optimize) with each block's own head count (one num_heads for all would break attention)."""
    cfg = get_model_config("test-tiny")
    cfg["vision_blocks"] = [{"heads": 2, "head_dim": 32, "mlp_dim": 128}, {"heads": 1, "head_dim": 16, "mlp_dim": 40}]
    cfg["text_blocks"] = [{"heads": 1, "head_dim": 24, "mlp_dim": 96}, {"heads": 2, "head_dim": 32, "mlp_dim": 128}]
    cfg["text_cfg"]["vocab_size"] = 1000
    vocab_map = {str(i): i for i in range(1, 998)}
    vocab_map.update({"49406": 998, "49407": 999, "unk_id": 1})
    src = make_torch_artifact(tmp_path / "pruned", cfg, seed=3, extra={"vocab_map.json": vocab_map})
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD", 0)
    out = tmp_path / "onnx"
    report = export_onnx(src, out, parity_data=exported.parent / "data", optimize=True)
    fused = report["optimize"]
    assert fused["image"]["attention"]["heads"] == [2, 1] and fused["image"]["attention"]["head_dim"] == [32, 16]
    assert fused["text"]["attention"]["heads"] == [1, 2] and fused["text"]["attention"]["head_dim"] == [24, 32]
    assert fused["image"]["fused"] and fused["text"]["fused"] and "text:kept-b3" in report["parity"]["fused"]
    assert report["external_data"] is True
    assert report["max_diff"] < 1e-4 and "text:dataset-b4" in report["parity"]["float32"]
    assert (out / "image_encoder.onnx.data").is_file() and (out / "text_encoder.onnx.data").is_file()
    assert report["files"]["text_encoder.onnx"] > (out / "text_encoder.onnx").stat().st_size
    assert "text:kept-b3" in report["parity"]["float32"] and report["vocab_lookup_in_graph"] is True
    assert not (out / "vocab_map.json").exists()  # the remap lives in the graph
    assert json.loads((out / "tokenizer.json").read_text())["model"]["type"] == "BPE"
    open_artifact(out)

    from tbps_compress.models.tokenizer import model_tokenizer
    from tbps_compress.runtime import OnnxEncoder

    enc = OnnxEncoder(out)
    captions = ["a person in a red shirt", "zebra-striped xylophone"]  # the second: ids outside the kept 1..997
    tokens = enc.tokenizer(captions)
    assert tokens.max() == 49407 and enc.tokenizer.vocab_map is None  # standard ids: no remap in the runtime
    model = load_model(src).eval()
    rows = model_tokenizer(model)(captions).numpy()  # PyTorch's own (remapping) tokenizer
    assert rows.max() == 999 and 1 in rows[1].tolist()  # EOT's row, and the unknown-token row for the zebra
    assert np.abs(enc.encode_texts(captions) - _torch_embed(model, "text", rows)).max() < 1e-4
    images = random_images(5, (64, 32), seed=9)
    got = enc.image_session.run(["embedding"], {"image": images})[0]
    assert np.abs(got - _torch_embed(model, "image", images)).max() < 1e-4
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(out / "text_encoder.onnx")).graph
    tables = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    lookups = [tables[n.input[0]] for n in graph.node if n.op_type == "Gather" and n.input[1] == "text"]
    assert len(lookups) == 1 and lookups[0].shape == (49408, 1)  # the lookup table: a Gather on the input
    lut = lookups[0][:, 0]
    assert lut[49407] == 999 and lut[49406] == 998 and lut[5] == 5 and lut[2000] == 1 and lut[0] == 0


def test_pruned_vocabulary_without_unk_refused(tmp_path: Path) -> None:
    cfg = get_model_config("test-tiny")
    cfg["text_cfg"]["vocab_size"] = 1000
    vocab_map = {str(i): i for i in range(0, 998)}
    vocab_map.update({"49406": 998, "49407": 999})
    src = make_torch_artifact(tmp_path / "pruned", cfg, seed=3, extra={"vocab_map.json": vocab_map})
    with pytest.raises(ArtifactError, match=r"vocab_map.json: no unknown-token id .*add it or re-run") as info:
        export_onnx(src, tmp_path / "onnx")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "onnx").exists()


def _retrieval(folder: Path, data: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """Gallery / query embeddings of the tiny dataset's test split through the runtime, and their metrics."""
    from tbps_compress.data.readers import load_dataset
    from tbps_compress.retrieval.metrics import metrics_from_embeddings
    from tbps_compress.runtime import OnnxEncoder

    dataset = load_dataset(data)
    records = dataset.split("test")
    enc = OnnxEncoder(folder)
    gallery = enc.encode_images([dataset.image_path(r) for r in records])
    queries = enc.encode_texts([c for r in records for c in r.captions])
    metrics = metrics_from_embeddings(queries, gallery, [r.pid for r in records for _ in r.captions],
                                      [r.pid for r in records])
    return gallery, queries, metrics


def test_optimize_fuses_towers_with_parity_retrieval_and_int8(exported: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import onnx

    from tbps_compress.export.fusion import op_counts
    from tbps_compress.export.quantize import quantize_artifact

    monkeypatch.setattr(onnx_export, "_export_tower", _fake_export(exported))
    data = exported.parent / "data"
    out = tmp_path / "fused"
    report = export_onnx(exported.parent / "torch", out, parity_data=data, optimize=True)
    saved = json.loads((out / "export_report.json").read_text())
    assert saved["optimize"] == report["optimize"] and open_artifact(out).lineage["export"]["optimize"] is True
    for tower in ("image", "text"):
        entry = report["optimize"][tower]
        assert entry["fused"] is True and entry["fallback_reason"] is None
        assert entry["attention"] == {"fused": 2, "heads": [2, 2], "head_dim": [32, 32], "refused": []}
        before, after = entry["ops_before"], entry["ops_after"]
        assert before["Softmax"] == 2 and "Softmax" not in after and after["com.microsoft:Attention"] == 2
        assert after["com.microsoft:BiasGelu"] == 2 and "Erf" not in after
        assert sum(after.values()) < 0.6 * sum(before.values())
        model = onnx.load(str(out / f"{tower}_encoder.onnx"))
        assert op_counts(model) == after
        assert entry["max_diff"] < 1e-4 and f"{tower}:dataset-b4" in entry["parity"]
    assert set(report["parity"]["fused"]) == set(report["parity"]["float32"])
    assert report["max_diff"] < 1e-4
    # the same retrieval through the runtime as the unfused export
    g0, q0, m0 = _retrieval(exported, data)
    g1, q1, m1 = _retrieval(out, data)
    assert np.abs(g0 - g1).max() < 1e-4 and np.abs(q0 - q1).max() < 1e-4
    assert m0 == m1
    # quantised after fusion: the fused attention becomes QAttention, embeddings stay close
    q = quantize_artifact(out, tmp_path / "int8", mode="dynamic")
    for tower in ("image", "text"):
        entry = q["towers"][tower]
        assert entry["nodes"]["by_type"].get("QAttention") == 2, entry["nodes"]
        assert entry["cosine"]["random"]["min"] > 0.99, entry["cosine"]


def test_optimize_falls_back_per_tower_when_parity_fails(exported: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A fusion with the wrong head count (what a global num_heads does to a pruned model) fails parity: that
    tower keeps its unfused graph, with the reason in the report; the other tower is still fused."""
    from tbps_compress.export import fusion

    real = fusion.fuse_attention

    def wrong_heads(model):  # noqa: ANN001, ANN202
        fused, info = real(model)
        if model.graph.input[0].name == "image":
            for node in fused.graph.node:
                if node.op_type == "Attention":
                    for attr in node.attribute:
                        if attr.name == "num_heads":
                            attr.i = 1
        return fused, info

    monkeypatch.setattr(onnx_export, "_export_tower", _fake_export(exported))
    monkeypatch.setattr(fusion, "fuse_attention", wrong_heads)
    out = tmp_path / "fallback"
    report = export_onnx(exported.parent / "torch", out, optimize=True)
    image, text = report["optimize"]["image"], report["optimize"]["text"]
    assert image["fused"] is False and "fails parity" in image["fallback_reason"]
    assert "max abs diff" in image["fallback_reason"] and image["parity"]
    assert text["fused"] is True
    assert (out / "image_encoder.onnx").read_bytes() == (exported / "image_encoder.onnx").read_bytes()
    assert set(report["parity"]["fused"]) == {"text:random-b1", "text:random-b3"} and report["max_diff"] < 1e-4
    open_artifact(out)


def test_optimize_with_fp16_refused(exported: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="choose one") as info:
        export_onnx(exported.parent / "torch", tmp_path / "o", optimize=True, fp16=True)
    assert "\n" not in str(info.value) and not (tmp_path / "o").exists()
