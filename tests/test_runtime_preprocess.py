"""Torch-free runtime: image preprocessing (torchvision is the reference), ONNX encoders on tiny hand-built graphs,
cosine top-k, and a subprocess proving the runtime works with torch / open_clip / torchvision unimportable."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tbps_compress.runtime import (
    OPENAI_CLIP_MEAN,
    OnnxEncoder,
    PreprocessConfig,
    RuntimeConfigError,
    clean_caption,
    cosine_topk,
    default_vocab_path,
    load_image,
    preprocess_images,
)
from tbps_compress.runtime.tokenizer import BPETokenizer

REPO = Path(__file__).resolve().parents[1]
EMB_DIM = 8
VOCAB = 49408


def _random_images(seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    sizes = [(37, 101), (250, 83), (128, 384), (1, 1), (64, 64)]  # (width, height) as PIL writes them
    imgs = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]
    imgs.append(Image.fromarray(rng.integers(0, 256, (45, 71, 4), dtype=np.uint8), mode="RGBA"))
    imgs.append(Image.fromarray(rng.integers(0, 256, (50, 20), dtype=np.uint8), mode="L"))
    return imgs


# ---------------------------------------------------------------------------------------------------------------------
# preprocessing
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(384, 128), (64, 48)])
def test_preprocess_matches_torchvision(size):
    transforms = pytest.importorskip("torchvision.transforms")
    cfg = PreprocessConfig(image_size=size)
    ref_tf = transforms.Compose([
        transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.ToTensor(),
        transforms.Normalize(cfg.mean, cfg.std),
    ])
    images = _random_images()
    ours = preprocess_images(images, cfg)
    assert ours.shape == (len(images), 3, *size) and ours.dtype == np.float32
    ref = np.stack([ref_tf(img.convert("RGB")).numpy() for img in images])
    assert np.abs(ours - ref).max() < 1e-5


def test_preprocess_paths_equal_pil(tmp_path):
    cfg = PreprocessConfig(image_size=(32, 16))
    images = _random_images(1)[:3]
    paths = []
    for i, img in enumerate(images):
        paths.append(tmp_path / f"{i}.png")
        img.save(paths[-1])
    assert load_image(str(paths[0])).mode == "RGB"
    np.testing.assert_array_equal(preprocess_images(paths, cfg), preprocess_images(images, cfg))
    with pytest.raises(TypeError, match=r"images\[0\]"):
        preprocess_images([np.zeros((4, 4, 3))], cfg)


def test_preprocess_config_roundtrip_and_validation():
    cfg = PreprocessConfig(image_size=(384, 128))
    assert cfg.mean == OPENAI_CLIP_MEAN and cfg.resize == "bicubic"
    data = json.loads(json.dumps(cfg.to_dict()))
    assert PreprocessConfig.from_dict(data) == cfg
    assert PreprocessConfig.from_dict({"image_size": 224}).image_size == (224, 224)
    bad = [
        ({"image_size": [384]}, "image_size"),
        ({"image_size": [384, -1]}, "image_size"),
        ({"image_size": [384, 128], "mean": [0.5, 0.5]}, "mean"),
        ({"image_size": [384, 128], "std": [0.5, 0.0, 0.5]}, "std"),
        ({"image_size": [384, 128], "std": ["a", 1, 1]}, "std"),
        ({"image_size": [384, 128], "resize": "cubic"}, "resize"),
        ({"image_size": [384, 128], "colour": 1}, "colour"),
        ({"mean": [0.5, 0.5, 0.5]}, "image_size"),
    ]
    for data, key in bad:
        with pytest.raises(ValueError, match=key):
            PreprocessConfig.from_dict(data)


# ---------------------------------------------------------------------------------------------------------------------
# tiny ONNX artifacts
# ---------------------------------------------------------------------------------------------------------------------


def _save_model(graph, path: Path) -> None:
    import onnx
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def _write_artifact(root: Path, image_size=(24, 12), context_length=77, vocab=VOCAB, seed=0, vocab_map=None):
    """image: GlobalAveragePool -> Flatten -> MatMul -> LpNorm; text: Gather -> ReduceMean -> LpNorm."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w_img = rng.standard_normal((3, EMB_DIM)).astype(np.float32)
    emb = rng.standard_normal((vocab, EMB_DIM)).astype(np.float32)
    root.mkdir(parents=True, exist_ok=True)
    image_graph = helper.make_graph(
        [
            helper.make_node("GlobalAveragePool", ["image"], ["pooled"]),
            helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
            helper.make_node("MatMul", ["flat", "w"], ["proj"]),
            helper.make_node("LpNormalization", ["proj"], ["embedding"], axis=1, p=2),
        ],
        "image_encoder",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, *image_size])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", EMB_DIM])],
        [numpy_helper.from_array(w_img, "w")],
    )
    text_graph = helper.make_graph(
        [
            helper.make_node("Gather", ["emb", "text"], ["tok"], axis=0),
            helper.make_node("ReduceMean", ["tok"], ["mean"], axes=[1], keepdims=0),
            helper.make_node("LpNormalization", ["mean"], ["embedding"], axis=1, p=2),
        ],
        "text_encoder",
        [helper.make_tensor_value_info("text", TensorProto.INT64, ["batch", context_length])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", EMB_DIM])],
        [numpy_helper.from_array(emb, "emb")],
    )
    _save_model(image_graph, root / "image_encoder.onnx")
    _save_model(text_graph, root / "text_encoder.onnx")
    (root / "preprocess.json").write_text(json.dumps(PreprocessConfig(image_size=image_size).to_dict()))
    shutil.copy(default_vocab_path(), root / "bpe_simple_vocab_16e6.txt.gz")
    tok_cfg = {"context_length": context_length, "vocab_file": "bpe_simple_vocab_16e6.txt.gz"}
    if vocab_map is not None:
        (root / "vocab_map.json").write_text(json.dumps(vocab_map))
        tok_cfg.update(vocab_map_file="vocab_map.json", unk_id=vocab - 2)
    (root / "tokenizer.json").write_text(json.dumps(tok_cfg))
    return w_img, emb


def _to_format2(root: Path, image_size=(24, 12), context_length=77) -> None:
    """Turn a ``_write_artifact`` folder into what exports write now: preprocess.json format 2 and a Hugging Face
    tokenizer.json, no merges file."""
    from tbps_compress.export.hf_tokenizer import write_hf_tokenizer
    from tbps_compress.export.onnx_export import preprocess_document

    doc = preprocess_document(*image_size, context_length, EMB_DIM)
    (root / "preprocess.json").write_text(json.dumps(doc))
    write_hf_tokenizer(root / "tokenizer.json", context_length)
    (root / "bpe_simple_vocab_16e6.txt.gz").unlink()


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


CAPTIONS = ["A woman in a RED coat.", "the man (wearing) a blue t-shirt; black jeans!", "", "café 😀 " * 40]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    root = tmp_path_factory.mktemp("artifact")
    w_img, emb = _write_artifact(root)
    return root, w_img, emb


@pytest.fixture(scope="module")
def artifact2(tmp_path_factory, artifact):
    """The same models with the current export layout (format-2 preprocess.json, Hugging Face tokenizer.json)."""
    root = tmp_path_factory.mktemp("artifact2")
    shutil.copytree(artifact[0], root, dirs_exist_ok=True)
    _to_format2(root)
    return root


def test_format2_artifact_reads_like_the_earlier_layout(artifact, artifact2):
    old, new = OnnxEncoder(artifact[0], threads=1), OnnxEncoder(artifact2, threads=1)
    assert new.preprocess_config == old.preprocess_config == PreprocessConfig(image_size=(24, 12))
    assert new.tokenizer.context_length == 77 and new.tokenizer.vocab_map is None
    images = _random_images(3)
    np.testing.assert_allclose(new.encode_images(images), old.encode_images(images), rtol=0, atol=1e-6)
    np.testing.assert_allclose(new.encode_texts(CAPTIONS), old.encode_texts(CAPTIONS), rtol=0, atol=1e-6)
    # preprocess.json format 2 says the outputs are L2-normalised: returned as the graph wrote them, bit for bit
    assert new.outputs_normalized and not old.outputs_normalized
    raw = new.image_session.run(["embedding"], {"image": preprocess_images(images, new.preprocess_config)})[0]
    np.testing.assert_array_equal(new.encode_images(images), raw)


def _edit_json(path: Path, edit) -> None:  # noqa: ANN001
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    "filename, edit, use, message",
    [
        ("preprocess.json", lambda d: d["image"].update(layout="NHWC"), "image",
         r"preprocess.json: preprocess config 'image.layout': got 'NHWC', the runtime supports 'NCHW' only"),
        ("preprocess.json", lambda d: d["image"].update(channel_order="BGR"), "image", r"'image.channel_order'"),
        ("preprocess.json", lambda d: d.update(format=3), "image", r"'format': got 3, this version reads format 2"),
        ("preprocess.json", lambda d: d["image"].update(imgae_size=[1, 1]), "image",
         r"unknown key\(s\) \['imgae_size'\]"),
        ("preprocess.json", lambda d: d["image"].update(image_size_hw=[0, 12]), "image", r"'image.image_size_hw'"),
        ("preprocess.json", lambda d: d["image"].pop("image_size_hw"), "image", r"'image.image_size_hw': missing"),
        ("preprocess.json", lambda d: d["text"].update(context_length=16), "text",
         r"preprocess.json: text.context_length is 16 but .*tokenizer.json truncates to 77"),
        ("tokenizer.json", lambda d: d["truncation"].update(max_length=16), "text",
         r"tokenizer.json: expected truncation.max_length and a fixed padding length, equal"),
        ("tokenizer.json", lambda d: d["model"].update(merges=d["model"]["merges"][:10]), "text",
         r"tokenizer.json: expected at least 48894 BPE merges"),
    ],
)
def test_format2_bad_files_are_named(tmp_path, artifact2, filename, edit, use, message):
    shutil.copytree(artifact2, tmp_path, dirs_exist_ok=True)
    _edit_json(tmp_path / filename, edit)
    enc = OnnxEncoder(tmp_path)
    with pytest.raises(RuntimeConfigError, match=message) as info:
        _ = enc.preprocess_config if use == "image" else enc.tokenizer
    assert "re-export" in str(info.value) and "\n" not in str(info.value)


def test_encoder_matches_numpy_reference(artifact):
    root, w_img, emb = artifact
    enc = OnnxEncoder(root, threads=1)
    images = _random_images(2)
    got = enc.encode_images(images, batch_size=3)
    x = preprocess_images(images, PreprocessConfig(image_size=(24, 12)))
    np.testing.assert_allclose(got, _normalise(x.mean(axis=(2, 3)) @ w_img), atol=1e-5)
    assert got.shape == (len(images), EMB_DIM) and got.dtype == np.float32

    texts = enc.encode_texts(CAPTIONS, batch_size=3)
    tokens = BPETokenizer()([clean_caption(c) for c in CAPTIONS])
    np.testing.assert_allclose(texts, _normalise(emb[tokens].mean(axis=1)), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(texts, axis=1), 1.0, atol=1e-5)
    assert enc.encode_texts([]).shape == (0, EMB_DIM)
    assert enc.encode_texts("one caption").shape == (1, EMB_DIM)


def test_text_only_artifact_is_lazy(tmp_path):
    _write_artifact(tmp_path)
    (tmp_path / "image_encoder.onnx").unlink()
    (tmp_path / "preprocess.json").unlink()
    enc = OnnxEncoder(tmp_path)
    assert enc.encode_texts(["a man"]).shape == (1, EMB_DIM)
    with pytest.raises(RuntimeConfigError, match="image_encoder.onnx"):
        enc.encode_images(_random_images()[:1])


def test_vocab_map_artifact(tmp_path):
    kept = list(range(0, 49408, 7)) + [49406, 49407]  # list[new id] = original id
    vocab = len(kept) + 2  # room for unk_id = vocab - 2
    _, emb = _write_artifact(tmp_path, vocab=vocab, vocab_map=kept)
    enc = OnnxEncoder(tmp_path)
    out = enc.encode_texts(CAPTIONS)
    lookup = {orig: new for new, orig in enumerate(kept)}
    raw = BPETokenizer()([clean_caption(c) for c in CAPTIONS])
    mapped = np.where(raw == 0, 0, np.vectorize(lambda i: lookup.get(int(i), vocab - 2))(raw))
    np.testing.assert_allclose(out, _normalise(emb[mapped].mean(axis=1)), atol=1e-5)


@pytest.mark.parametrize(
    "filename, use",
    [
        ("image_encoder.onnx", "image"),
        ("preprocess.json", "image"),
        ("text_encoder.onnx", "text"),
        ("tokenizer.json", "text"),
        ("bpe_simple_vocab_16e6.txt.gz", "text"),
    ],
)
def test_missing_file_is_named(tmp_path, filename, use):
    _write_artifact(tmp_path)
    (tmp_path / filename).unlink()
    enc = OnnxEncoder(tmp_path)
    with pytest.raises(RuntimeConfigError, match=filename.replace(".", r"\.")) as info:
        enc.encode_images(_random_images()[:1]) if use == "image" else enc.encode_texts(["a man"])
    assert "re-export" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_corrupt_files(tmp_path):
    _write_artifact(tmp_path)
    (tmp_path / "image_encoder.onnx").write_bytes(b"garbage")
    (tmp_path / "tokenizer.json").write_text("{not json")
    enc = OnnxEncoder(tmp_path)
    with pytest.raises(RuntimeConfigError, match="image_encoder.onnx"):
        enc.encode_images(_random_images()[:1])
    with pytest.raises(RuntimeConfigError, match="tokenizer.json"):
        enc.encode_texts(["a"])
    tok_cfg = {"context_length": 16, "vocab_file": "bpe_simple_vocab_16e6.txt.gz"}
    (tmp_path / "tokenizer.json").write_text(json.dumps(tok_cfg))
    with pytest.raises(RuntimeConfigError, match="context_length 16"):
        OnnxEncoder(tmp_path).encode_texts(["a"])
    (tmp_path / "preprocess.json").write_text(json.dumps({"image_size": [24, 12], "resize": "cubic"}))
    with pytest.raises(RuntimeConfigError, match="preprocess.json.*resize"):
        _ = OnnxEncoder(tmp_path).preprocess_config
    with pytest.raises(RuntimeConfigError, match="artifact folder not found"):
        OnnxEncoder(tmp_path / "nope")


def test_wrong_io_names(tmp_path):
    from onnx import TensorProto, helper

    _write_artifact(tmp_path)
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["embedding"])],
        "bad",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 24, 12])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", 3, 24, 12])],
    )
    _save_model(graph, tmp_path / "image_encoder.onnx")
    with pytest.raises(RuntimeConfigError, match=r"expected input \['image'\]"):
        OnnxEncoder(tmp_path).encode_images(_random_images()[:1])


# ---------------------------------------------------------------------------------------------------------------------
# cosine top-k
# ---------------------------------------------------------------------------------------------------------------------


def test_cosine_topk_matches_brute_force_with_ties():
    rng = np.random.default_rng(0)
    gallery = rng.standard_normal((53, 6)).astype(np.float32)
    gallery[[7, 20, 41]] = gallery[3]  # exact ties with row 3
    gallery[30] = 2.0 * gallery[11]  # same direction, different norm (exactly equal after normalising)
    queries = np.concatenate([gallery[[3, 11]], rng.standard_normal((5, 6)).astype(np.float32)])
    for chunk in (1, 5, 16, 4096):
        scores, idx = cosine_topk(queries, gallery, k=10, chunk=chunk)
        assert scores.shape == idx.shape == (7, 10) and idx.dtype == np.int64
        full = _normalise(queries) @ _normalise(gallery).T
        for row in range(len(queries)):
            order = np.lexsort((np.arange(len(gallery)), -full[row]))[:10]
            np.testing.assert_array_equal(idx[row], order)
            np.testing.assert_allclose(scores[row], full[row, order], atol=1e-6)
        assert idx[0, :4].tolist() == [3, 7, 20, 41]
        assert idx[1, :2].tolist() == [11, 30]
    scores, idx = cosine_topk(queries[0], gallery[:4], k=100)
    assert idx.shape == (1, 4)
    with pytest.raises(ValueError, match="embedding sizes"):
        cosine_topk(queries, gallery[:, :5], k=1)
    with pytest.raises(ValueError, match="k must"):
        cosine_topk(queries, gallery, k=0)


# ---------------------------------------------------------------------------------------------------------------------
# torch-free proof
# ---------------------------------------------------------------------------------------------------------------------

_BLOCKED_SCRIPT = textwrap.dedent(
    """
    import importlib.abc, sys

    BLOCKED = {"torch", "open_clip", "torchvision", "tokenizers"}

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{name} is blocked in this test")
            return None

    sys.meta_path.insert(0, Block())
    for name in BLOCKED:
        try:
            __import__(name)
        except ImportError:
            pass
        else:
            raise SystemExit(f"{name} importable despite the block")

    import numpy as np
    from PIL import Image
    import tbps_compress.runtime as rt

    artifact, vocab = sys.argv[1], sys.argv[2]
    try:
        rt.BPETokenizer()
    except FileNotFoundError as exc:
        assert "vocab_path" in str(exc), exc
    else:
        raise SystemExit("the default vocabulary was found although open_clip is blocked")
    ids = rt.BPETokenizer(vocab)(["A man in a red coat."])
    assert ids.shape == (1, 77) and ids.dtype == np.int64
    img = Image.fromarray(np.zeros((30, 20, 3), dtype=np.uint8))
    x = rt.preprocess_images([img], rt.PreprocessConfig(image_size=(24, 12)))
    assert x.shape == (1, 3, 24, 12)
    enc = rt.OnnxEncoder(artifact, threads=1)
    t = enc.encode_texts(["a man in a red coat"])
    v = enc.encode_images([img])
    s, i = rt.cosine_topk(t, v, k=1)
    heavy = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    assert not heavy, heavy
    print("OK", ids[0, :3].tolist(), t.shape, v.shape)
    """
)


def test_runtime_works_without_torch(artifact):
    root, _, _ = artifact
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run(
        [sys.executable, "-c", _BLOCKED_SCRIPT, str(root), str(root / "bpe_simple_vocab_16e6.txt.gz")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert proc.stdout.startswith("OK [49406,")


def test_runtime_reads_current_exports_without_torch_or_tokenizers(artifact2):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run(
        [sys.executable, "-c", _BLOCKED_SCRIPT, str(artifact2), str(artifact2 / "tokenizer.json")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert proc.stdout.startswith("OK [49406,")


def test_plain_import_loads_nothing_heavy():
    code = (
        "import sys, tbps_compress.runtime as rt; rt.BPETokenizer()('a man');"
        "heavy = [m for m in sys.modules if m.split('.')[0] in ('torch', 'open_clip', 'torchvision', 'onnxruntime')];"
        "assert not heavy, heavy"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
