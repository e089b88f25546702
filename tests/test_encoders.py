"""The one encoder mechanism: torch and ONNX encoders of one exported tiny model, ``evaluate(encoder, split)``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import test_export as shared  # tests/ is on sys.path under pytest: one tiny export per session
import torch
from PIL import Image

from tbps_compress.data.loader import ImageStore
from tbps_compress.errors import UserError
from tbps_compress.evaluation import evaluate_artifact
from tbps_compress.retrieval.encoders import (
    OnnxRuntimeEncoder,
    Split,
    TorchEncoder,
    evaluate,
    load_split,
    normalize_pixels,
    open_encoder,
)
from tbps_compress.runtime.preprocess import PreprocessConfig, preprocess_images

METRIC_KEYS = ("R1", "R5", "R10", "mAP", "mINP")


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shared.shared_export(tmp_path_factory)


@pytest.fixture(scope="module")
def source(exported: Path) -> Path:
    return exported.parent / "torch"  # the PyTorch artifact the ONNX one was exported from


@pytest.fixture(scope="module")
def split(exported: Path) -> Split:
    return load_split(exported.parent / "data", "test")[1]


def test_torch_and_onnx_encoders_of_one_model_give_the_same_metrics(source: Path, exported: Path,
                                                                      split: Split) -> None:
    torch_enc = open_encoder(source, device="cpu", batch_size=4)
    onnx_enc = open_encoder(exported, batch_size=4)
    assert isinstance(torch_enc, TorchEncoder) and isinstance(onnx_enc, OnnxRuntimeEncoder)
    a, b = torch_enc.encode_split(split), onnx_enc.encode_split(split)
    assert a.image.shape == b.image.shape == (len(split.records), 32)
    assert a.text.shape == b.text.shape == (len(split.captions), 32)
    np.testing.assert_allclose(a.image, b.image, atol=1e-4)
    np.testing.assert_allclose(a.text, b.text, atol=1e-4)
    np.testing.assert_array_equal(a.text_pids, b.text_pids)
    m_torch, m_onnx = evaluate(torch_enc, split), evaluate(onnx_enc, split)
    assert set(m_torch) >= set(METRIC_KEYS)
    for key in METRIC_KEYS:
        assert m_torch[key] == pytest.approx(m_onnx[key], abs=1e-6), key
    # the eval command's path is the same mechanism
    data = exported.parent / "data"
    for art, expected in ((source, m_torch), (exported, m_onnx)):
        got = evaluate_artifact(art, data, device="cpu", batch_size=4)
        assert {k: got[k] for k in METRIC_KEYS} == pytest.approx({k: expected[k] for k in METRIC_KEYS})


def test_torch_encoder_paths_agree_bit_for_bit(source: Path, split: Split) -> None:
    """Files, a split's pre-decoded images and PIL images go through the same evaluation transform."""
    enc = TorchEncoder.from_artifact(source, device="cpu", batch_size=3)
    files = enc.encode_image_files(split.image_paths)
    cached = enc.encode_split(Split(split.records, split.image_paths,
                                    images=ImageStore(split.image_paths, enc.image_size, cache=True)))
    pil = enc.encode_images([Image.open(p).convert("RGB") for p in split.image_paths])
    np.testing.assert_array_equal(files, cached.image)
    np.testing.assert_array_equal(files, pil)
    cfg = PreprocessConfig(image_size=enc.image_size)
    store = ImageStore(split.image_paths[:2], enc.image_size, cache=False)
    np.testing.assert_array_equal(normalize_pixels(torch.stack([store[0], store[1]])).numpy(),
                                  preprocess_images(split.image_paths[:2], cfg))
    tokens = enc.tokenizer([enc.clean(c) for c in split.captions])
    np.testing.assert_array_equal(enc.embed_tokens(tokens).numpy(), enc.encode_texts(split.captions))


def test_torch_encoder_keeps_the_models_mode_and_takes_a_precision(source: Path, split: Split) -> None:
    fp32 = TorchEncoder.from_artifact(source, device="cpu")
    fp32.model.train()
    ref = fp32.encode_split(split)
    assert fp32.model.training  # put in eval mode for the call only
    bf16 = TorchEncoder.from_artifact(source, device="cpu", precision="bf16", batch_size=4)
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    got = bf16.encode_split(split)
    assert got.image.dtype == np.float32
    cos = np.sum(got.image * ref.image, axis=1)
    assert cos.min() > 0.98, cos
    assert set(evaluate(bf16, split)) >= set(METRIC_KEYS)


def test_bad_uses_are_one_line_errors(source: Path, exported: Path) -> None:
    with pytest.raises(UserError, match="precision"):
        open_encoder(exported, precision="fp16")
    with pytest.raises(UserError, match="precision 'int4'"):
        open_encoder(source, device="cpu", precision="int4")
    with pytest.raises(UserError, match="batch size"):
        open_encoder(exported, batch_size=0)
    with pytest.raises(UserError, match="no records in split 'nope'"):
        load_split(exported.parent / "data", "nope")
    with pytest.raises(ValueError, match="one image path per record"):
        Split([], [Path("a.png")])


def test_onnx_encoder_embeds_a_split_without_torch(exported: Path) -> None:
    import subprocess
    import sys

    code = ("import sys\n"
            "from tbps_compress.retrieval.encoders import load_split, open_encoder\n"
            f"_, split = load_split({str(exported.parent / 'data')!r})\n"
            f"emb = open_encoder({str(exported)!r}, device='cpu').encode_split(split)\n"
            "assert emb.image.shape[0] == len(split.records) and emb.text.shape[0] == len(split.captions)\n"
            "print(sorted(m for m in ('torch', 'torchvision', 'open_clip') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"
