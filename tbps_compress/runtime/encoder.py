"""onnxruntime encoders for an exported artifact folder, and chunked cosine top-k search.

Artifact files read by :class:`OnnxEncoder` (all relative to the artifact folder):

- ``image_encoder.onnx``: input ``image`` (N, 3, H, W) float32 -> output ``embedding`` (N, D), L2-normalised.
- ``text_encoder.onnx``: input ``text`` (N, L) int64 -> output ``embedding`` (N, D), L2-normalised.
- ``preprocess.json``: the export's client document (format 2: ``image`` / ``text`` / ``output`` sections, read by
  :class:`~tbps_compress.runtime.preprocess.PreprocessConfig` and, for ``text.context_length``, by
  :func:`load_tokenizer`), or an earlier export's flat ``PreprocessConfig`` dict.
- ``tokenizer.json``: a Hugging Face ``tokenizers`` file with CLIP's BPE; the runtime takes the merges and the
  context length (``truncation.max_length``) from it and tokenises with :class:`BPETokenizer` (open_clip's exact
  ids); the text graph takes standard CLIP ids. Earlier exports hold ``{"context_length": int, "vocab_file":
  "bpe_simple_vocab_16e6.txt.gz", "vocab_map_file": "vocab_map.json" (optional), "unk_id": int (optional)}``
  instead, and a pruned model's ids are remapped by the tokenizer: ``vocab_map.json`` is either a dict
  ``{"<original id>": new id}`` or a list of original ids in new-id order (``list[new_id] = original_id``).

Each tower is loaded on first use, so a text-search-only deployment needs only the text files. onnxruntime itself
is imported on first use as well.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..errors import UserError
from .preprocess import PreprocessConfig, preprocess_images
from .tokenizer import BPETokenizer, clean_caption

log = logging.getLogger(__name__)

__all__ = [
    "IMAGE_MODEL_FILE",
    "TEXT_MODEL_FILE",
    "PREPROCESS_FILE",
    "TOKENIZER_FILE",
    "RuntimeConfigError",
    "OnnxEncoder",
    "cosine_topk",
    "l2_normalize",
    "load_preprocess_config",
    "load_tokenizer",
]

IMAGE_MODEL_FILE = "image_encoder.onnx"
TEXT_MODEL_FILE = "text_encoder.onnx"
PREPROCESS_FILE = "preprocess.json"
TOKENIZER_FILE = "tokenizer.json"
_TOKENIZER_KEYS = ("context_length", "vocab_file", "vocab_map_file", "unk_id")
_REEXPORT = "re-export the model (tbps-compress export --onnx) to rebuild the artifact"


class RuntimeConfigError(UserError, ValueError):
    """An exported artifact folder is missing a file the runtime needs, or a file is corrupt."""


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Row-wise L2 normalisation in float32 (zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norm, np.float32(eps))


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise RuntimeConfigError(f"{path}: file not found; {_REEXPORT}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RuntimeConfigError(f"{path}: not valid JSON ({exc}); {_REEXPORT}") from exc


def _read_vocab_map(path: Path) -> dict[int, int]:
    data = _read_json(path)
    try:
        if isinstance(data, list):
            return {int(orig): new for new, orig in enumerate(data)}
        if isinstance(data, dict):
            return {int(k): int(v) for k, v in data.items()}
    except (TypeError, ValueError) as exc:
        raise RuntimeConfigError(f"{path}: vocabulary map entries must be integers ({exc}); {_REEXPORT}") from exc
    raise RuntimeConfigError(
        f"{path}: expected a list of original ids or an object original id -> new id, got {type(data).__name__}; "
        f"{_REEXPORT}"
    )


def load_tokenizer(artifact_dir: str | Path) -> BPETokenizer:
    """Build the tokenizer of an exported artifact: from ``tokenizer.json`` (a Hugging Face ``tokenizers`` file, with
    ``preprocess.json``'s ``text.context_length`` when present), or from an earlier export's settings file."""
    artifact_dir = Path(artifact_dir)
    path = artifact_dir / TOKENIZER_FILE
    cfg = _read_json(path)
    if not isinstance(cfg, dict):
        raise RuntimeConfigError(f"{path}: expected a JSON object, got {type(cfg).__name__}; {_REEXPORT}")
    if "model" not in cfg:
        return _load_legacy_tokenizer(artifact_dir, path, cfg)
    trunc, pad = cfg.get("truncation"), cfg.get("padding")
    ctx = trunc.get("max_length") if isinstance(trunc, dict) else None
    strategy = pad.get("strategy") if isinstance(pad, dict) else None
    fixed = strategy.get("Fixed") if isinstance(strategy, dict) else None
    if not isinstance(ctx, int) or isinstance(ctx, bool) or ctx < 2 or fixed != ctx:
        raise RuntimeConfigError(f"{path}: expected truncation.max_length and a fixed padding length, equal and >= 2 "
                                 f"(got {ctx!r} and {fixed!r}); {_REEXPORT}")
    pre = artifact_dir / PREPROCESS_FILE
    if pre.is_file():
        doc = _read_json(pre)
        text = doc.get("text") if isinstance(doc, dict) else None
        if isinstance(text, dict) and text.get("context_length") != ctx:
            raise RuntimeConfigError(f"{pre}: text.context_length is {text.get('context_length')!r} but {path} "
                                     f"truncates to {ctx}; {_REEXPORT}")
    try:
        return BPETokenizer(path, context_length=ctx)
    except ValueError as exc:
        raise RuntimeConfigError(f"{exc}; {_REEXPORT}") from exc


def _load_legacy_tokenizer(artifact_dir: Path, path: Path, cfg: dict[str, Any]) -> BPETokenizer:
    """An earlier export's ``tokenizer.json``: ``{"context_length", "vocab_file", ["vocab_map_file", "unk_id"]}``."""
    unknown = sorted(set(cfg) - set(_TOKENIZER_KEYS))
    if unknown:
        raise RuntimeConfigError(f"{path}: unknown key(s) {unknown}; allowed keys are {list(_TOKENIZER_KEYS)} "
                                 "(or a Hugging Face tokenizers file)")
    ctx = cfg.get("context_length")
    if not isinstance(ctx, int) or isinstance(ctx, bool) or ctx < 2:
        raise RuntimeConfigError(f"{path}: 'context_length' must be an int >= 2, got {ctx!r}; {_REEXPORT}")
    vocab_file = cfg.get("vocab_file")
    if not isinstance(vocab_file, str) or not vocab_file:
        raise RuntimeConfigError(f"{path}: 'vocab_file' must name the BPE vocabulary file, got {vocab_file!r}")
    vocab_path = artifact_dir / vocab_file
    if not vocab_path.is_file():
        raise RuntimeConfigError(f"{vocab_path}: BPE vocabulary file not found (named by {path}); {_REEXPORT}")
    unk_id = cfg.get("unk_id")
    if unk_id is not None and (not isinstance(unk_id, int) or isinstance(unk_id, bool) or unk_id < 0):
        raise RuntimeConfigError(f"{path}: 'unk_id' must be a non-negative int or absent, got {unk_id!r}")
    vocab_map = None
    map_file = cfg.get("vocab_map_file")
    if map_file is not None:
        if not isinstance(map_file, str) or not map_file:
            raise RuntimeConfigError(f"{path}: 'vocab_map_file' must be a file name, got {map_file!r}")
        vocab_map = _read_vocab_map(artifact_dir / map_file)
    try:
        return BPETokenizer(vocab_path, context_length=ctx, vocab_map=vocab_map, unk_id=unk_id)
    except ValueError as exc:
        raise RuntimeConfigError(f"{path}: {exc}; {_REEXPORT}") from exc


def load_preprocess_config(artifact_dir: str | Path) -> PreprocessConfig:
    """Read ``artifact_dir/preprocess.json``."""
    path = Path(artifact_dir) / PREPROCESS_FILE
    data = _read_json(path)
    try:
        return PreprocessConfig.from_dict(data)
    except (TypeError, ValueError) as exc:
        raise RuntimeConfigError(f"{path}: {exc}; {_REEXPORT}") from exc


class OnnxEncoder:
    """Image and text encoders of an exported artifact, run with onnxruntime.

    Args:
        artifact_dir: folder holding the files listed in the module docstring.
        providers: onnxruntime execution providers, in order of preference; default ``["CPUExecutionProvider"]``.
        threads: intra-op thread count (``None``: onnxruntime's default).
        optimize: onnxruntime graph optimisations (``False``: all off; quantize evaluates its float16 models so).
    """

    def __init__(self, artifact_dir: str | Path, providers: Sequence[str] | None = None, threads: int | None = None,
                 optimize: bool = True):
        self.artifact_dir = Path(artifact_dir)
        if not self.artifact_dir.is_dir():
            raise RuntimeConfigError(f"{self.artifact_dir}: artifact folder not found")
        self.providers = list(providers) if providers is not None else ["CPUExecutionProvider"]
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise ValueError(f"threads must be a positive int or None, got {threads!r}")
        self.threads = threads
        self.optimize = bool(optimize)
        self._sessions: dict[str, Any] = {}
        self._preprocess: PreprocessConfig | None = None
        self._tokenizer: BPETokenizer | None = None
        self._outputs_normalized: bool | None = None

    # -- lazily loaded parts ------------------------------------------------------------------------------------------

    @property
    def preprocess_config(self) -> PreprocessConfig:
        if self._preprocess is None:
            self._preprocess = load_preprocess_config(self.artifact_dir)
        return self._preprocess

    @property
    def tokenizer(self) -> BPETokenizer:
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.artifact_dir)
        return self._tokenizer

    @property
    def outputs_normalized(self) -> bool:
        """Whether ``preprocess.json`` (format 2) says the graphs' outputs are L2-normalised: they are then returned
        as the graph wrote them (bit for bit what any other client of the files gets); else they are normalised
        here (earlier exports)."""
        if self._outputs_normalized is None:
            path = self.artifact_dir / PREPROCESS_FILE
            doc = _read_json(path) if path.is_file() else None
            output = doc.get("output") if isinstance(doc, dict) else None
            self._outputs_normalized = isinstance(output, dict) and output.get("l2_normalized") is True
        return self._outputs_normalized

    def _session(self, filename: str, input_name: str) -> Any:
        session = self._sessions.get(filename)
        if session is not None:
            return session
        path = self.artifact_dir / filename
        if not path.is_file():
            raise RuntimeConfigError(f"{path}: file not found; {_REEXPORT}")
        import onnxruntime as ort  # imported on first use: tokenising alone does not need it

        options = ort.SessionOptions()
        if self.threads is not None:
            options.intra_op_num_threads = self.threads
        if not self.optimize:
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        try:
            session = ort.InferenceSession(str(path), sess_options=options, providers=self.providers)
        except Exception as exc:  # onnxruntime raises its own pybind exception types
            raise RuntimeConfigError(f"{path}: onnxruntime cannot load the model ({exc}); {_REEXPORT}") from exc
        inputs = [i.name for i in session.get_inputs()]
        outputs = [o.name for o in session.get_outputs()]
        if inputs != [input_name] or "embedding" not in outputs:
            raise RuntimeConfigError(
                f"{path}: expected input ['{input_name}'] and output 'embedding', found inputs {inputs} and "
                f"outputs {outputs}; {_REEXPORT}"
            )
        self._sessions[filename] = session
        log.debug("loaded %s with providers %s", path, session.get_providers())
        return session

    @property
    def image_session(self) -> Any:
        session = self._session(IMAGE_MODEL_FILE, "image")
        shape = session.get_inputs()[0].shape
        want = tuple(self.preprocess_config.image_size)
        if len(shape) != 4 or (isinstance(shape[1], int) and shape[1] != 3):
            raise RuntimeConfigError(
                f"{self.artifact_dir / IMAGE_MODEL_FILE}: image input has shape {list(shape)}, expected "
                f"[batch, 3, height, width]; {_REEXPORT}")
        got = tuple(shape[2:])
        if all(isinstance(d, int) for d in got) and got != want:
            raise RuntimeConfigError(
                f"{self.artifact_dir / PREPROCESS_FILE}: image size [height, width] {list(want)} disagrees with "
                f"{IMAGE_MODEL_FILE}'s input {list(got)}; {_REEXPORT}")
        return session

    @property
    def text_session(self) -> Any:
        session = self._session(TEXT_MODEL_FILE, "text")
        shape = session.get_inputs()[0].shape
        ctx = self.tokenizer.context_length
        if len(shape) == 2 and isinstance(shape[1], int) and shape[1] != ctx:
            raise RuntimeConfigError(
                f"{self.artifact_dir / TEXT_MODEL_FILE}: text input length is {shape[1]} but "
                f"{self.artifact_dir / TOKENIZER_FILE} says context_length {ctx}; {_REEXPORT}"
            )
        return session

    # -- encoding -----------------------------------------------------------------------------------------------------

    def encode_images(self, images: Sequence[Image.Image | str | Path], batch_size: int = 32) -> np.ndarray:
        """Embed images (PIL images or paths): ``(N, D)`` float32, L2-normalised."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if isinstance(images, (str, Path, Image.Image)):
            images = [images]
        session = self.image_session
        cfg = self.preprocess_config
        outs = []
        for start in range(0, len(images), batch_size):
            batch = preprocess_images(list(images[start : start + batch_size]), cfg)
            outs.append(session.run(["embedding"], {"image": batch})[0])
        return self._finish(session, outs)

    def encode_texts(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Embed captions (``clean_caption`` then the tokenizer): ``(N, D)`` float32, L2-normalised."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if isinstance(texts, str):
            texts = [texts]
        session = self.text_session
        tokenizer = self.tokenizer
        outs = []
        for start in range(0, len(texts), batch_size):
            tokens = tokenizer([clean_caption(t) for t in texts[start : start + batch_size]])
            outs.append(session.run(["embedding"], {"text": tokens})[0])
        return self._finish(session, outs)

    def _finish(self, session: Any, outs: list[np.ndarray]) -> np.ndarray:
        if not outs:
            dim = session.get_outputs()[0].shape[-1]
            return np.zeros((0, dim if isinstance(dim, int) else 0), dtype=np.float32)
        out = np.concatenate(outs, axis=0)
        return out.astype(np.float32, copy=False) if self.outputs_normalized else l2_normalize(out)


def cosine_topk(
    queries: np.ndarray, gallery: np.ndarray, k: int, chunk: int = 4096
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` gallery rows by cosine similarity for each query.

    Both sides are L2-normalised here (cheap for already-normalised embeddings). The gallery is scored ``chunk``
    rows at a time, so memory stays ``O(Q * (chunk + k))``. Ties are ordered by gallery index (lowest first).

    Returns:
        ``(scores, indices)``: ``(Q, min(k, G))`` float32 and int64, best first. A 1-D query is treated as one row.
    """
    q = np.asarray(queries, dtype=np.float32)
    g = np.asarray(gallery, dtype=np.float32)
    if q.ndim == 1:
        q = q[None, :]
    if q.ndim != 2 or g.ndim != 2:
        raise ValueError(f"queries and gallery must be 2-D, got shapes {q.shape} and {g.shape}")
    if q.shape[1] != g.shape[1]:
        raise ValueError(f"embedding sizes differ: queries {q.shape[1]}, gallery {g.shape[1]}")
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    k = min(int(k), g.shape[0])
    n_q = q.shape[0]
    best_s = np.empty((n_q, 0), dtype=np.float32)
    best_i = np.empty((n_q, 0), dtype=np.int64)
    if k == 0:
        return best_s, best_i
    q = l2_normalize(q)
    for start in range(0, g.shape[0], chunk):
        block = l2_normalize(g[start : start + chunk])
        scores = q @ block.T
        # Stable sort on the negated scores: equal scores keep index order.
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        cand_s = np.concatenate([best_s, np.take_along_axis(scores, order, axis=1)], axis=1)
        cand_i = np.concatenate([best_i, order.astype(np.int64) + start], axis=1)
        # Earlier chunks come first in the candidate rows and have lower indices, so stability keeps ties ordered.
        keep = np.argsort(-cand_s, axis=1, kind="stable")[:, :k]
        best_s = np.take_along_axis(cand_s, keep, axis=1)
        best_i = np.take_along_axis(cand_i, keep, axis=1)
    return best_s, best_i
