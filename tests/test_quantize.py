"""Quantisation of the exported tiny model: dynamic / static int8, float16, node counts, cosine, typed errors."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import test_export as shared  # tests/ is on sys.path under pytest: one tiny export per session

from tbps_compress.artifacts import open_artifact, write_artifact
from tbps_compress.errors import ArtifactError, UserError
from tbps_compress.export.quantize import count_nodes, quantize_artifact


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shared.shared_export(tmp_path_factory)


@pytest.fixture(scope="module")
def data(exported: Path) -> Path:
    return exported.parent / "data"


@pytest.fixture(scope="module")
def dynamic(exported: Path, data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("q") / "dynamic"
    return out, quantize_artifact(exported, out, mode="dynamic", eval_data=data)


def _onnx(path: Path):  # noqa: ANN202
    import onnx

    return onnx.load(str(path))


def test_dynamic_int8(dynamic: tuple[Path, dict], exported: Path) -> None:
    out, report = dynamic
    art = open_artifact(out)
    assert art.stage == "quantize" and art.lineage["parent"]["stage"] == "export"
    saved = json.loads((out / "quantization.json").read_text())
    assert saved["mode"] == "dynamic" and saved["reduce_range"] is True
    for tower in ("image", "text"):
        entry = report["towers"][tower]
        assert entry["nodes"]["quantized"] > 0 and entry["nodes_before"]["quantized"] == 0
        assert entry["nodes"]["by_type"].get("MatMulInteger", 0) > 0
        assert count_nodes(_onnx(out / f"{tower}_encoder.onnx")) == entry["nodes"]
        assert entry["cosine"]["random"]["min"] >= 0.99, entry["cosine"]
        assert entry["cosine"]["dataset"]["min"] >= 0.99, entry["cosine"]
        assert entry["size_after"] < 0.5 * entry["size_before"]  # text: the token embedding is quantised too
    for name in ("preprocess.json", "tokenizer.json", "model_config.json", "source_metrics.json"):
        assert (out / name).read_bytes() == (exported / name).read_bytes()
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["fp32"]) >= {"R1", "R5", "R10", "mAP", "mINP"}
    assert set(metrics["quantized"]) >= {"R1", "mAP"}
    assert abs(metrics["quantized"]["mAP"] - metrics["fp32"]["mAP"]) < 25.0

    from tbps_compress.runtime import OnnxEncoder

    fp32, int8 = OnnxEncoder(exported), OnnxEncoder(out)
    caps = ["a man in a red shirt", "a woman with a blue bag"]
    assert (fp32.encode_texts(caps) * int8.encode_texts(caps)).sum(1).min() > 0.99


def test_static_matmul_only_keeps_mask_add_float(exported: Path, data: Path, tmp_path: Path) -> None:
    import onnx
    from onnx import numpy_helper

    out = tmp_path / "static"
    report = quantize_artifact(exported, out, mode="static", calib_data=data, calib_size=8)
    assert report["calib_counts"] == {"image": 8, "text": 8}
    text = _onnx(out / "text_encoder.onnx")
    by_type = report["towers"]["text"]["nodes"]["by_type"]
    assert by_type.get("QuantizeLinear", 0) > 0 and by_type.get("DequantizeLinear", 0) > 0
    # the causal mask (an initializer holding -inf) must still be float and feed an Add directly
    masks = {t.name for t in text.graph.initializer
             if t.data_type == onnx.TensorProto.FLOAT and np.isinf(numpy_helper.to_array(t)).any()}
    assert masks
    adds = [n for n in text.graph.node if n.op_type == "Add" and masks & set(n.input)]
    assert adds
    consumers = {i: n.op_type for n in text.graph.node for i in n.input}
    for add in adds:  # (ORT may fake-quantise the scores before the Add; the masked sum itself stays float)
        assert all(consumers.get(o) != "QuantizeLinear" for o in add.output)
    for tower in ("image", "text"):
        assert report["towers"][tower]["cosine"]["dataset"]["min"] > 0.95, report["towers"][tower]["cosine"]


def test_static_percentile_text_only(exported: Path, data: Path, tmp_path: Path) -> None:
    out = tmp_path / "static_pct"
    report = quantize_artifact(exported, out, mode="static", calib_data=data, calib_method="percentile",
                               calib_size=4, towers=("text",))
    assert report["towers"]["image"]["quantized"] is False
    assert report["towers"]["image"]["nodes"]["quantized"] == 0
    assert (out / "image_encoder.onnx").read_bytes() == (exported / "image_encoder.onnx").read_bytes()
    assert report["towers"]["text"]["nodes"]["quantized"] > 0
    assert report["towers"]["text"]["cosine"]["dataset"]["min"] > 0.95, report["towers"]["text"]["cosine"]


def test_fp16(exported: Path, tmp_path: Path) -> None:
    import onnx

    out = tmp_path / "fp16"
    report = quantize_artifact(exported, out, mode="fp16")
    assert "GPU" in report["note"]
    for tower in ("image", "text"):
        model = _onnx(out / f"{tower}_encoder.onnx")
        assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)
        entry = report["towers"][tower]
        if entry["cosine_skipped"] is None:
            assert entry["cosine"]["random"]["min"] > 0.999
    with pytest.raises(UserError, match="already exists"):
        quantize_artifact(exported, out, mode="fp16")
    quantize_artifact(exported, out, mode="fp16", towers="text", force=True)
    assert json.loads((out / "quantization.json").read_text())["towers"]["image"]["quantized"] is False
    open_artifact(out)


def test_bad_inputs_write_nothing(exported: Path, data: Path, tmp_path: Path,
                                  dynamic: tuple[Path, dict]) -> None:
    out = tmp_path / "out"
    cases = [
        (dict(mode="int4"), "mode"),
        (dict(mode="static", calib_data=data, calib_method="kl"), "calib-method"),
        (dict(mode="dynamic", backend="tensorrt"), "backend"),
        (dict(mode="dynamic", towers=("audio",)), "towers"),
        (dict(mode="dynamic", calib_size=0), "calib-size"),
        (dict(mode="static"), "calib-data"),
    ]
    for kwargs, match in cases:
        with pytest.raises(UserError, match=match):
            quantize_artifact(exported, out, **kwargs)
    for bad_out in (exported, exported / "q"):
        with pytest.raises(UserError, match="input artifact"):
            quantize_artifact(exported, bad_out, mode="dynamic")
    with pytest.raises(UserError, match="already quantised"):
        quantize_artifact(dynamic[0], out, mode="dynamic")
    with pytest.raises(ArtifactError):
        quantize_artifact(tmp_path / "missing", out, mode="dynamic")
    assert not out.exists() and not (exported / "q").exists()


def test_empty_calibration_set(exported: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "reid_raw.json").write_text("[]", encoding="utf-8")
    out = tmp_path / "out"
    with pytest.raises(UserError, match="empty"):
        quantize_artifact(exported, out, mode="static", calib_data=empty)
    assert not out.exists()


def _rewrite(src: Path, dst: Path, drop: tuple[str, ...] = (), replace: dict[str, bytes] | None = None) -> Path:
    with write_artifact(dst, stage="export") as tmp:
        for f in src.iterdir():
            if f.name not in drop and f.name != "lineage.json":
                shutil.copyfile(f, tmp / f.name)
        for name, content in (replace or {}).items():
            (tmp / name).write_bytes(content)
    return dst


def test_corrupt_or_incomplete_onnx_artifact(exported: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    # changed after writing: the hash check names the file
    tampered = tmp_path / "tampered"
    shutil.copytree(exported, tampered)
    (tampered / "text_encoder.onnx").write_bytes(b"garbage")
    with pytest.raises(ArtifactError, match="text_encoder.onnx"):
        quantize_artifact(tampered, out, mode="dynamic")
    # written corrupt (hashes consistent): onnx cannot parse it
    corrupt = _rewrite(exported, tmp_path / "corrupt", replace={"image_encoder.onnx": b"\x08\x07garbage"})
    with pytest.raises(UserError, match="image_encoder.onnx"):
        quantize_artifact(corrupt, out, mode="dynamic")
    no_pre = _rewrite(exported, tmp_path / "no_pre", drop=("preprocess.json",))
    with pytest.raises(UserError, match="preprocess.json"):
        quantize_artifact(no_pre, out, mode="dynamic")
    no_onnx = _rewrite(exported, tmp_path / "no_onnx", drop=("text_encoder.onnx",))
    with pytest.raises(UserError, match="text_encoder.onnx"):
        quantize_artifact(no_onnx, out, mode="dynamic")
    assert not out.exists()


@pytest.mark.skipif(importlib.util.find_spec("optimum") is not None, reason="optimum is installed")
def test_optimum_backend_missing_extra(exported: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"pip install tbps-compress\[optimum\]"):
        quantize_artifact(exported, tmp_path / "out", mode="dynamic", backend="optimum")
    assert not (tmp_path / "out").exists()


def test_optimum_backend_against_ort(exported: Path, data: Path, tmp_path: Path,
                                     dynamic: tuple[Path, dict]) -> None:
    """optimum's ORTQuantizer (CPU preset) against the onnxruntime backend: nodes quantised, cosine to float32,
    retrieval on the tiny test split."""
    try:
        import optimum.onnxruntime  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"optimum-onnx is not importable ({exc}); install the extra: pip install tbps-compress[optimum]")
    out = tmp_path / "optimum"
    report = quantize_artifact(exported, out, mode="dynamic", backend="optimum", eval_data=data)
    ort_report = dynamic[1]
    assert json.loads((out / "quantization.json").read_text())["backend"] == "optimum"
    open_artifact(out)
    for tower in ("image", "text"):
        got, ref = report["towers"][tower], ort_report["towers"][tower]
        assert got["optimum_preset"] in ("avx2", "avx512_vnni", "arm64")
        assert got["nodes"]["by_type"].get("MatMulInteger", 0) > 0
        # optimum's preset also quantises attention's two activation x activation MatMuls in each of the 2 blocks
        # (onnxruntime's quantize_dynamic leaves them float), and leaves the token-embedding Gather float
        assert got["nodes"]["by_type"]["MatMulInteger"] == ref["nodes"]["by_type"]["MatMulInteger"] + 4
        for kind in ("random", "dataset"):
            assert got["cosine"][kind]["min"] > 0.99, (tower, got["cosine"])
    assert report["towers"]["text"]["size_after"] > ort_report["towers"]["text"]["size_after"]
    metrics = report["metrics"]
    assert metrics["fp32"] == ort_report["metrics"]["fp32"]
    for key in ("R1", "mAP"):
        assert abs(metrics["quantized"][key] - ort_report["metrics"]["quantized"][key]) < 20.0, metrics
