"""Parity checks between PyTorch towers and ONNX files, and the sample inputs they run on.

Used by :mod:`tbps_compress.export.onnx_export` (ONNX vs PyTorch, max absolute difference against a tolerance)
and :mod:`tbps_compress.export.quantize` (quantised vs float32 ONNX, cosine similarity of embeddings).

Sample inputs:

- :func:`random_images`: standard-normal ``(N, 3, H, W)`` float32 (the range of normalised pixels).
- :func:`random_tokens`: ``(N, L)`` int64 rows of random ids below the end-of-text id, the end-of-text id at a
  random position, zero padding after it (the text tower pools at the argmax of the ids, i.e. at end-of-text).
- :func:`dataset_samples`: real images and captions of a dataset folder, preprocessed exactly as the runtime does
  (:func:`tbps_compress.runtime.preprocess_images`, :func:`tbps_compress.runtime.clean_caption` and the artifact's
  tokenizer).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ParityError, UserError

log = logging.getLogger(__name__)

__all__ = [
    "Case",
    "ParityResult",
    "check_max_abs",
    "cosine_rows",
    "dataset_samples",
    "make_session",
    "max_abs_diff",
    "onnx_file_size",
    "random_images",
    "random_tokens",
    "run_session",
]

EOT_ID = 49407


@dataclass
class Case:
    """One named input batch of one tower: ``tower`` is ``"image"`` or ``"text"``, ``name`` says where the input
    came from (``random-b3``, ``dataset-b4``)."""

    tower: str
    name: str
    array: np.ndarray

    @property
    def key(self) -> str:
        return f"{self.tower}:{self.name}"


@dataclass
class ParityResult:
    """Max absolute differences per case (``"image:random-b1"`` -> diff) and the tolerance used."""

    diffs: dict[str, float]
    atol: float

    @property
    def failing(self) -> dict[str, float]:
        return {k: v for k, v in self.diffs.items() if not v <= self.atol}  # NaN fails too

    @property
    def max_diff(self) -> float:
        return max(self.diffs.values(), default=0.0)


def random_images(n: int, size_hw: Sequence[int], seed: int = 0) -> np.ndarray:
    """``(n, 3, H, W)`` float32 standard-normal images."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 3, int(size_hw[0]), int(size_hw[1]))).astype(np.float32)


def random_tokens(n: int, context_length: int, eot_id: int = EOT_ID, seed: int = 0) -> np.ndarray:
    """``(n, L)`` int64 token rows: random ids in ``[1, eot_id)``, ``eot_id`` at a random position ``>= 1``,
    zero padding after it."""
    if context_length < 2:
        raise ValueError(f"context_length must be >= 2, got {context_length}")
    if eot_id < 2:
        raise ValueError(f"eot_id must be >= 2, got {eot_id}")
    rng = np.random.default_rng(seed)
    out = rng.integers(1, eot_id, size=(n, context_length), dtype=np.int64)
    for row in range(n):
        pos = int(rng.integers(1, context_length))
        out[row, pos] = eot_id
        out[row, pos + 1:] = 0
    return out


def dataset_samples(
    root: Path,
    preprocess: Any,
    tokenizer: Callable[[list[str]], np.ndarray],
    n_images: int,
    n_captions: int,
    splits: Sequence[str] = ("train", "val", "test"),
) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``n_images`` preprocessed images and ``n_captions`` tokenised captions of a dataset folder, taken from
    the first of ``splits`` that has records (then the next ones if more are needed), in record order.

    ``preprocess``: a :class:`tbps_compress.runtime.PreprocessConfig`; ``tokenizer``: a callable list of cleaned
    captions -> ``(N, L)`` int64 (a :class:`tbps_compress.runtime.BPETokenizer`). Returns ``(images, tokens)``,
    either possibly empty.
    """
    from ..data.readers import load_dataset
    from ..runtime.preprocess import preprocess_images
    from ..runtime.tokenizer import clean_caption

    dataset = load_dataset(Path(root))
    records = [r for s in splits for r in dataset.records if r.split == s]
    records += [r for r in dataset.records if r.split not in splits]
    paths = [dataset.image_path(r) for r in records[: max(n_images, 0)]]
    captions = [c for r in records for c in r.captions][: max(n_captions, 0)]
    height, width = preprocess.image_size
    images = preprocess_images(paths, preprocess) if paths else np.zeros((0, 3, height, width), np.float32)
    tokens = tokenizer([clean_caption(c) for c in captions]) if captions else None
    if tokens is None:
        tokens = np.zeros((0, getattr(tokenizer, "context_length", 1)), np.int64)
    return images, np.asarray(tokens, dtype=np.int64)


def make_session(path: Path, *, disable_optimizations: bool = False, threads: int | None = None) -> Any:
    """A CPU onnxruntime session for ``path``; errors name the file."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if disable_optimizations:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads is None:
        threads = min(4, os.cpu_count() or 1)
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises pybind exception types
        raise UserError(f"{path}: onnxruntime cannot load the model ({str(exc).strip()[:500]})") from exc


def run_session(session: Any, array: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Run a one-input, ``embedding``-output session over ``array`` in batches; float32 result."""
    name = session.get_inputs()[0].name
    outs = [session.run(["embedding"], {name: array[i:i + batch_size]})[0] for i in range(0, len(array), batch_size)]
    if not outs:
        return np.zeros((0, 0), np.float32)
    return np.concatenate(outs).astype(np.float32)


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    """Max absolute difference (NaN if either holds a NaN, inf for a shape mismatch)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        return float("inf")
    if a.size == 0:
        return 0.0
    if np.isnan(a).any() or np.isnan(b).any():
        return float("nan")
    return float(np.abs(a - b).max())


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two ``(N, D)`` arrays."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    na = np.linalg.norm(a, axis=1)
    nb = np.linalg.norm(b, axis=1)
    return (a * b).sum(1) / np.maximum(na * nb, 1e-12)


def check_max_abs(
    cases: Iterable[Case],
    reference: Callable[[Case], np.ndarray],
    candidate: Callable[[Case], np.ndarray],
    atol: float,
    what: str,
) -> ParityResult:
    """Compare ``candidate`` with ``reference`` on each case; raise :class:`ParityError` listing every failing
    output with its max absolute difference (``.diffs`` holds the failing ones); return all diffs otherwise."""
    diffs: dict[str, float] = {}
    for case in cases:
        diffs[case.key] = max_abs_diff(candidate(case), reference(case))
        log.debug("parity %s %s: max abs diff %.3g", what, case.key, diffs[case.key])
    result = ParityResult(diffs, atol)
    failing = result.failing
    if failing:
        listing = "; ".join(f"{k} embedding: max abs diff {v:.3g}" for k, v in failing.items())
        raise ParityError(
            f"{what}: {len(failing)} of {len(diffs)} outputs differ beyond atol {atol:g}: {listing}", diffs=failing
        )
    return result


def onnx_file_size(path: Path) -> int:
    """Bytes of an ONNX file plus its external data files (``<name>.data`` or any file its tensors name)."""
    path = Path(path)
    total = path.stat().st_size
    for extra in external_data_files(path):
        total += extra.stat().st_size
    return total


def external_data_files(path: Path) -> list[Path]:
    """External data files an ONNX model refers to (read without loading the tensors)."""
    import onnx

    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    names: set[str] = set()
    for tensor in _all_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            for entry in tensor.external_data:
                if entry.key == "location":
                    names.add(entry.value)
    return [path.parent / n for n in sorted(names) if (path.parent / n).is_file()]


def _all_tensors(model: Any) -> Iterable[Any]:
    import onnx

    yield from model.graph.initializer
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
