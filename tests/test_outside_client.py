"""An export folder is usable without this package: ``tests/outside_client.py`` (onnxruntime + numpy + Pillow +
tokenizers; the README's "Use the ONNX files from any language" section shows the same text) gives the runtime's
embeddings, for a plain model and for a vocabulary-pruned one (its id remap lives in the text graph)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import test_export as shared  # tests/ is on sys.path under pytest: one tiny export per session
from PIL import Image

from tbps_compress.models.meta import meta_of

pytest.importorskip("tokenizers")

CLIENT = Path(__file__).with_name("outside_client.py")
MAX_CLIENT_LINES = 25

# Runs the client with torch, open_clip and tbps_compress unimportable, then saves its embeddings.
HARNESS = textwrap.dedent(
    """
    import importlib.abc, json, sys
    import numpy as np

    BLOCKED = {"torch", "torchvision", "open_clip", "tbps_compress"}

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{name} is blocked: the client must not need it")

    sys.meta_path.insert(0, Block())
    client, folder, images, captions, out = sys.argv[1:6]
    sys.argv = [client, folder]
    ns = {"__name__": "outside_client"}
    exec(compile(open(client).read(), client, "exec"), ns)
    np.savez(out, image=ns["embed_images"](json.loads(images)), text=ns["embed_texts"](json.loads(captions)))
    assert not [m for m in sys.modules if m.split(".")[0] in BLOCKED]
    """
)

CAPTIONS = [
    "A woman wearing a red T-shirt, blue jeans and white sneakers.",
    "The man's bag is BLACK; he wears glasses!!! (maybe) #2 ~ok: yes*",
    "A young man in a dark-blue hoodie -- carrying 3 bags & a “big” umbrella",
    "Zoë's café-style coat, ﬁne ＡＢＣ１２３ and a 红色 hat 😀",
    "zebra-striped xylophone quintessence",  # words a pruned vocabulary does not hold: the unknown-token row
    "",
    " ".join(["a person in a long grey coat with a black shoulder bag"] * 6),  # truncated
]


def _images(folder: Path) -> list[str]:
    rng = np.random.default_rng(4)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (h, w, mode, ext) in enumerate([(64, 32, "RGB", "png"), (97, 41, "RGB", "jpg"), (30, 70, "RGBA", "png"),
                                           (128, 48, "L", "png"), (50, 50, "P", "png")]):
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)
        path = folder / f"img{i}.{ext}"
        img.save(path)
        paths.append(str(path))
    return paths


def _run_client(export: Path, images: list[str], captions: list[str], out: Path) -> dict[str, np.ndarray]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    proc = subprocess.run(
        [sys.executable, "-c", HARNESS, str(CLIENT), str(export), json.dumps(images), json.dumps(captions), str(out)],
        cwd=out.parent, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-2000:]
    with np.load(out) as data:
        return {k: data[k] for k in data.files}


def _compare_with_runtime(export: Path, tmp_path: Path) -> None:
    from tbps_compress.runtime import OnnxEncoder

    images = _images(tmp_path / "images")
    got = _run_client(export, images, CAPTIONS, tmp_path / "client.npz")
    enc = OnnxEncoder(export)
    ref_images, ref_texts = enc.encode_images(images), enc.encode_texts(CAPTIONS)
    assert got["image"].shape == ref_images.shape and got["text"].shape == ref_texts.shape
    assert np.abs(got["image"] - ref_images).max() == 0.0
    assert np.abs(got["text"] - ref_texts).max() <= 1e-6
    assert np.allclose(np.linalg.norm(got["text"], axis=1), 1.0, atol=1e-5)  # preprocess.json: l2_normalized


def test_client_is_short_and_imports_only_outside_packages() -> None:
    text = CLIENT.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= MAX_CLIENT_LINES
    imports = {line.split()[1].split(".")[0] for line in text.splitlines() if line.startswith(("import ", "from "))}
    assert imports == {"json", "sys", "numpy", "onnxruntime", "PIL", "tokenizers"}


def test_client_matches_runtime(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    _compare_with_runtime(shared.shared_export(tmp_path_factory), tmp_path)


@pytest.fixture(scope="module")
def pruned_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A test-tiny model whose token table :func:`prune_vocabulary` cut to a small caption corpus, exported."""
    import torch

    from tbps_compress.artifacts import write_artifact
    from tbps_compress.export.onnx_export import export_onnx
    from tbps_compress.models.factory import build_model
    from tbps_compress.models.io import save_model
    from tbps_compress.models.tokenizer import get_tokenizer
    from tbps_compress.models.vocab import prune_vocabulary
    from tbps_compress.runtime.tokenizer import clean_caption

    base = tmp_path_factory.mktemp("pruned")
    torch.manual_seed(5)
    model = build_model("test-tiny")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    corpus = [clean_caption(c) for c in CAPTIONS[:4]] + ["a person in a long grey coat", "a black shoulder bag"]
    prune_vocabulary(model, corpus, get_tokenizer(meta_of(model).config))
    src = base / "torch"
    with write_artifact(src, stage="train") as tmp:
        save_model(model, tmp)
    assert (src / "vocab_map.json").is_file() and model.token_embedding.num_embeddings < 100
    export_onnx(src, base / "onnx")
    return base / "onnx"


def test_client_matches_runtime_on_a_pruned_vocabulary(pruned_export: Path, tmp_path: Path) -> None:
    assert not (pruned_export / "vocab_map.json").exists()
    _compare_with_runtime(pruned_export, tmp_path)
