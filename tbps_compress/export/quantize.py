"""Quantise an exported ONNX artifact: dynamic int8, static QDQ int8 (calibrated) or float16.

Input: an ``export`` artifact (``image_encoder.onnx``, ``text_encoder.onnx``, ``preprocess.json``,
``tokenizer.json`` and the vocabulary files). Output: a new artifact (stage ``quantize``) with the same file names,
so :class:`tbps_compress.runtime.OnnxEncoder` reads it unchanged, plus ``quantization.json`` (settings, node counts,
sizes, cosine similarity vs float32) and, with ``eval_data``, ``metrics.json`` = ``{"fp32": ..., "quantized": ...}``.

Modes (the figures and choices below were measured on this project's development CPU, AVX2 without VNNI):

- ``dynamic``: ``quantize_dynamic`` after ``quant_pre_process(skip_symbolic_shape=True)``; int8 per-channel weights
  with ``reduce_range`` (7-bit weights: the u8 x s8 kernels of AVX2 CPUs saturate otherwise, which cost ~0.01 of
  cosine on the test model), uint8 activations quantised at run time. Matrix products between two activations
  (attention) stay float. Gather is quantised too (the token-embedding table, weight-only). Quantise a fused
  export (``export --optimize``), not the other way round: fusion matches float MatMuls only, and the fused
  ``com.microsoft`` ``Attention`` nodes become ``QAttention`` (int8 qkv projection).
- ``static``: QDQ ``quantize_static`` calibrated on images / captions of a dataset (MinMax, Entropy or Percentile),
  uint8 activations, int8 per-channel weights, ``reduce_range``. Op types default to MatMul / Gemm / Conv: quantising
  every op puts the text tower's causal-mask Add (which holds -inf) through QDQ and destroys the text embeddings.
- ``fp16``: float16 weights and arithmetic with float32 inputs/outputs: a GPU format (no CPU speed-up; the CPU
  provider is used here only to measure cosine, with graph optimisations off).

Backend ``optimum`` (``pip install tbps-compress[optimum]``) runs optimum's ``ORTQuantizer`` with an
``AutoQuantizationConfig`` preset for this CPU (avx512_vnni, avx2 or arm64), dynamic mode only.
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field, field_validator

from ..artifacts import METRICS, MODEL_CONFIG, check_output_dir, open_artifact, write_artifact, write_json
from ..config import Strict, parsed_or_value_error
from ..errors import ArtifactError, UserError
from ..retrieval.encoders import OnnxRuntimeEncoder, Split, evaluate
from .onnx_export import (
    EXTERNAL_DATA_THRESHOLD,
    IMAGE_FILE,
    PREPROCESS_FILE,
    SOURCE_METRICS_FILE,
    TEXT_FILE,
    TOKENIZER_FILE,
    check_onnx,
    check_output_location,
    convert_to_float16,
    load_onnx,
    save_onnx,
)
from .parity import (
    cosine_rows,
    dataset_samples,
    external_data_files,
    make_session,
    onnx_file_size,
    random_images,
    random_tokens,
    run_session,
)

log = logging.getLogger(__name__)

__all__ = [
    "BACKENDS",
    "CALIB_METHODS",
    "DEFAULT_OP_TYPES",
    "MODES",
    "QUANT_FILE",
    "TOWERS",
    "count_nodes",
    "quantize_artifact",
]

MODES = ("dynamic", "static", "fp16")
CALIB_METHODS = ("minmax", "entropy", "percentile")
BACKENDS = ("ort", "optimum")
TOWERS = ("image", "text")
# Default op types per mode. Dynamic adds Gather: the token-embedding table is stored as uint8 with one
# DequantizeLinear (text tower ~4x smaller, cosine unchanged on the test model); attention's activation x activation
# products are never quantised in dynamic mode.
# Attention: the com.microsoft node of a fused export (``export --optimize``) becomes QAttention (int8 qkv weights).
DEFAULT_OP_TYPES = {"dynamic": ("MatMul", "Gemm", "Conv", "Gather", "Attention"),
                    "static": ("MatMul", "Gemm", "Conv")}
QUANT_FILE = "quantization.json"
OPTIMUM_HINT = "pip install tbps-compress[optimum]"
_FILES = {"image": IMAGE_FILE, "text": TEXT_FILE}
_INPUTS = {"image": "image", "text": "text"}
_QUANT_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger",
              "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QAttention"}
_COSINE_SAMPLES = 16
_CALIB_BATCH = 8
_EVAL_BATCH = 32
_COPY_ALONG = (PREPROCESS_FILE, TOKENIZER_FILE, MODEL_CONFIG, SOURCE_METRICS_FILE)


def count_nodes(model: Any) -> dict[str, Any]:
    """Total nodes, quantised nodes (QuantizeLinear, DequantizeLinear, DynamicQuantizeLinear, MatMulInteger,
    ConvInteger, QLinear*) and a per-type count of the latter."""
    by_type = Counter(n.op_type for n in model.graph.node if n.op_type in _QUANT_OPS or n.op_type.startswith("QLinear"))
    return {"total": len(model.graph.node), "quantized": int(sum(by_type.values())), "by_type": dict(by_type)}


def _is_quantized(model: Any) -> bool:
    from onnx import TensorProto

    return count_nodes(model)["quantized"] > 0 or any(t.data_type == TensorProto.FLOAT16
                                                      for t in model.graph.initializer)


def _parse_towers(towers: Sequence[str] | str) -> tuple[str, ...]:
    items = towers.split(",") if isinstance(towers, str) else list(towers)
    items = [str(t).strip() for t in items if str(t).strip()]
    bad = [t for t in items if t not in TOWERS]
    if bad or not items:
        raise UserError(f"--towers {','.join(items) or '(empty)'}: choose one or more of {', '.join(TOWERS)} "
                        "separated by commas")
    return tuple(t for t in TOWERS if t in items)


def _cpu_preset() -> str:
    """optimum AutoQuantizationConfig preset for this CPU."""
    machine = platform.machine().lower()
    if machine in ("arm64", "aarch64"):
        return "arm64"
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        flags = ""
    return "avx512_vnni" if "avx512_vnni" in flags else "avx2"


def _import_optimum() -> tuple[Any, Any]:
    try:
        from optimum.onnxruntime import ORTQuantizer
        from optimum.onnxruntime.configuration import AutoQuantizationConfig
    except ImportError as exc:
        raise UserError(f"--backend optimum needs the optional extra: {OPTIMUM_HINT} ({exc})") from exc
    return ORTQuantizer, AutoQuantizationConfig


def _copy_onnx(src: Path, dst: Path) -> None:
    shutil.copyfile(src, dst)
    for extra in external_data_files(src):
        shutil.copyfile(extra, dst.parent / extra.name)


def _quantize_dynamic_ort(src: Path, dst: Path, op_types: list[str], work: Path, large: bool) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = work / f"pre_{src.name}"
    quant_pre_process(str(src), str(pre), skip_symbolic_shape=True, save_as_external_data=large,
                      all_tensors_to_one_file=True, external_data_location=f"{pre.name}.data")
    quantize_dynamic(str(pre), str(dst), op_types_to_quantize=op_types, per_channel=True, reduce_range=True,
                     weight_type=QuantType.QInt8, use_external_data_format=large)


def _quantize_static_ort(src: Path, dst: Path, op_types: list[str], work: Path, large: bool, method: str,
                         input_name: str, calib: np.ndarray) -> None:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = iter([calib[i:i + _CALIB_BATCH] for i in range(0, len(calib), _CALIB_BATCH)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self._batches, None)
            return None if batch is None else {input_name: batch}

    pre = work / f"pre_{src.name}"
    quant_pre_process(str(src), str(pre), skip_symbolic_shape=True, save_as_external_data=large,
                      all_tensors_to_one_file=True, external_data_location=f"{pre.name}.data")
    quantize_static(str(pre), str(dst), Reader(), quant_format=QuantFormat.QDQ, op_types_to_quantize=op_types,
                    per_channel=True, reduce_range=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, calibrate_method=methods[method], use_external_data_format=large)


def _quantize_optimum(src: Path, dst: Path, work: Path) -> str:
    ort_quantizer, auto_config = _import_optimum()
    preset = _cpu_preset()
    qconfig = getattr(auto_config, preset)(is_static=False, per_channel=True)
    folder = work / f"optimum_{src.stem}"
    folder.mkdir()
    _copy_onnx(src, folder / src.name)
    quantizer = ort_quantizer.from_pretrained(folder, file_name=src.name)
    saved = Path(quantizer.quantize(save_dir=folder / "out", quantization_config=qconfig))
    produced = sorted(saved.glob("*.onnx"))
    if len(produced) != 1:
        raise UserError(f"optimum wrote {len(produced)} ONNX files in {saved}, expected one")
    model = load_onnx(produced[0])
    save_onnx(model, dst)
    return preset


def _embed(path: Path, array: np.ndarray, disable: bool) -> np.ndarray:
    return run_session(make_session(path, disable_optimizations=disable), array)


def _cos_stats(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    cos = cosine_rows(a, b)
    return {"min": float(np.min(cos)), "mean": float(np.mean(cos)), "n": int(len(cos))}


def _eval_split(root: Path) -> Split:
    """The test split of a dataset (else val, else every record)."""
    from ..data.readers import load_dataset

    dataset = load_dataset(Path(root))
    splits = dataset.splits()
    split = "test" if "test" in splits else ("val" if "val" in splits else None)
    return Split.of(dataset, dataset.split(split) if split else list(dataset.records))


def quantize_artifact(
    src: Path,
    out: Path,
    *,
    mode: str,
    calib_data: Path | None = None,
    calib_method: str = "minmax",
    calib_size: int = 64,
    backend: str = "ort",
    towers: tuple[str, ...] = ("image", "text"),
    op_types: list[str] | None = None,
    force: bool = False,
    eval_data: Path | None = None,
) -> dict:
    """Quantise the ONNX artifact ``src`` into a new artifact ``out`` (see the module docs).

    Args:
        src: an export artifact folder (hash-verified).
        out: the new artifact folder; not ``src`` nor inside it; replaced only with ``force``.
        mode: ``dynamic`` | ``static`` | ``fp16``.
        calib_data: dataset root; required for ``static`` (its train images / captions first); for other modes
            its samples are used to measure cosine similarity.
        calib_method: ``minmax`` | ``entropy`` | ``percentile`` (static only).
        calib_size: images and captions used for calibration (each).
        backend: ``ort`` (onnxruntime.quantization) or ``optimum`` (extra; dynamic only).
        towers: towers to quantise; the others are copied unchanged.
        op_types: ONNX op types to quantise (default: :data:`DEFAULT_OP_TYPES` of the mode).
        eval_data: dataset root; retrieval metrics of float32 and quantised models on its test split go to
            ``metrics.json``.

    Returns:
        The ``quantization.json`` dict (plus ``metrics`` and ``path``).
    """
    src, out = Path(src), Path(out)
    # -- validate everything before any work ------------------------------------------------------------------------
    if mode not in MODES:
        raise UserError(f"--mode {mode!r}: choose one of {', '.join(MODES)}")
    if calib_method not in CALIB_METHODS:
        raise UserError(f"--calib-method {calib_method!r}: choose one of {', '.join(CALIB_METHODS)}")
    if backend not in BACKENDS:
        raise UserError(f"--backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if isinstance(calib_size, bool) or not isinstance(calib_size, int) or calib_size < 1:
        raise UserError(f"--calib-size {calib_size!r}: must be a positive integer")
    chosen = _parse_towers(towers)
    ops = list(op_types) if op_types is not None else list(DEFAULT_OP_TYPES.get(mode, ()))
    if (mode != "fp16" and not ops) or any(not isinstance(o, str) or not o.strip() for o in ops):
        raise UserError(f"op types {op_types!r}: give one or more ONNX op type names, e.g. MatMul,Gemm,Conv")
    ops = [o.strip() for o in ops]
    if mode == "static" and "text" in chosen and {"Add", "Where"} & set(ops):
        log.warning("static quantisation of Add/Where in the text tower quantises the causal mask (-inf) and "
                    "usually destroys the text embeddings; the default op types are %s",
                    ", ".join(DEFAULT_OP_TYPES["static"]))
    if mode == "static" and calib_data is None:
        raise UserError("--mode static needs calibration data: pass --calib-data DATASET_ROOT")
    if backend == "optimum":
        if mode != "dynamic":
            raise UserError(f"--backend optimum supports --mode dynamic only (got {mode}); use --backend ort")
        _import_optimum()
    check_output_location(src, out)
    check_output_dir(out, force)
    art = open_artifact(src)
    for name in (PREPROCESS_FILE, TOKENIZER_FILE):
        if not (art.path / name).is_file():
            raise ArtifactError(f"{art.path / name}: missing; quantize needs an ONNX artifact written by "
                                "`tbps-compress export --onnx`")
    models = {}
    for tower, filename in _FILES.items():
        path = art.path / filename
        if not path.is_file():
            raise UserError(f"{path}: ONNX file not found; quantize needs an ONNX artifact written by "
                            "`tbps-compress export --onnx`")
        models[tower] = load_onnx(path)
        if tower in chosen and _is_quantized(models[tower]):
            raise UserError(f"{path}: already quantised (int8 nodes or float16 weights); quantise the float32 "
                            "export artifact instead")

    from ..runtime.encoder import load_preprocess_config, load_tokenizer

    preprocess = load_preprocess_config(art.path)
    tokenizer = load_tokenizer(art.path)
    eot = tokenizer.eot_token_id
    if tokenizer.vocab_map is not None:
        eot = tokenizer.vocab_map.get(eot, eot)

    calib: dict[str, np.ndarray] = {}
    if calib_data is not None:
        images, tokens = dataset_samples(Path(calib_data), preprocess, tokenizer, calib_size, calib_size)
        calib = {"image": images, "text": tokens}
        empty = [t for t in chosen if len(calib[t]) == 0]
        if mode == "static" and empty:
            raise UserError(f"{calib_data}: empty calibration set for the {', '.join(empty)} tower(s); the "
                            "dataset needs images and captions")
    evaluation = _eval_split(Path(eval_data)) if eval_data is not None else None

    samples: dict[str, dict[str, np.ndarray]] = {
        "random": {"image": random_images(_COSINE_SAMPLES, preprocess.image_size, seed=11),
                   "text": random_tokens(_COSINE_SAMPLES, tokenizer.context_length, eot, seed=12)},
    }
    if eval_data is not None:  # held-out samples when there are any, else the calibration ones
        images, tokens = dataset_samples(Path(eval_data), preprocess, tokenizer, _COSINE_SAMPLES, _COSINE_SAMPLES,
                                         splits=("test", "val", "train"))
        samples["dataset"] = {"image": images, "text": tokens}
    elif calib:
        samples["dataset"] = {t: a[:_COSINE_SAMPLES] for t, a in calib.items() if len(a)}

    options = {"mode": mode, "backend": backend, "calib_method": calib_method if mode == "static" else None,
               "calib_size": calib_size, "calib_data": str(calib_data) if calib_data else None,
               "towers": list(chosen), "op_types": ops if mode != "fp16" else None}
    # The float16 model runs on the CPU provider with graph optimisations off: a conservative setting (with
    # onnxruntime 1.32 on the AVX2 CPU without VNNI, the tiny test model runs with them on too, same cosine).
    disable = mode == "fp16"
    report: dict[str, Any] = {**options, "towers": {}}
    if mode == "dynamic":
        report.update(per_channel=True, reduce_range=True, weight_type="int8", activation_type="uint8 (dynamic)",
                      format="QOperator (MatMulInteger / ConvInteger)")
    elif mode == "static":
        report.update(per_channel=True, reduce_range=True, weight_type="int8", activation_type="uint8",
                      format="QDQ", calib_counts={t: int(len(calib[t])) for t in chosen})
    else:
        report["note"] = ("float16 is a GPU format: no speed-up on the CPU provider; cosine measured on CPU with "
                          "graph optimisations off")

    lineage = {"quantize": options}
    with write_artifact(out, stage="quantize", parent=src, force=force, extra_lineage=lineage) as tmp, \
            tempfile.TemporaryDirectory() as work_dir:
        work = Path(work_dir)
        for tower, filename in _FILES.items():
            src_file, dst_file = art.path / filename, tmp / filename
            size_before = onnx_file_size(src_file)
            entry: dict[str, Any] = {"quantized": tower in chosen, "size_before": size_before}
            if tower not in chosen:
                _copy_onnx(src_file, dst_file)
            else:
                large = size_before > EXTERNAL_DATA_THRESHOLD
                log.info("quantising the %s tower (%s, %s)", tower, mode, backend)
                if mode == "fp16":
                    save_onnx(convert_to_float16(models[tower]), dst_file)
                elif backend == "optimum":
                    entry["optimum_preset"] = _quantize_optimum(src_file, dst_file, work)
                elif mode == "dynamic":
                    _quantize_dynamic_ort(src_file, dst_file, ops, work, large)
                else:
                    _quantize_static_ort(src_file, dst_file, ops, work, large, calib_method, _INPUTS[tower],
                                         calib[tower])
            check_onnx(dst_file)
            entry["nodes_before"] = count_nodes(models[tower])
            entry["nodes"] = count_nodes(load_onnx(dst_file))
            entry["size_after"] = onnx_file_size(dst_file)
            entry["size_ratio"] = round(size_before / max(entry["size_after"], 1), 3)
            entry["cosine"], entry["cosine_skipped"] = {}, None
            try:
                for kind, arrays in samples.items():
                    if tower in arrays:
                        ref = _embed(src_file, arrays[tower], False)
                        got = _embed(dst_file, arrays[tower], disable and tower in chosen)
                        entry["cosine"][kind] = _cos_stats(got, ref)
            except UserError as exc:
                if mode != "fp16":
                    raise
                entry["cosine_skipped"] = f"the CPU provider cannot run the float16 model ({str(exc)[:200]})"
                log.warning("%s tower: cosine skipped: %s", tower, entry["cosine_skipped"])
            worst = min((c["min"] for c in entry["cosine"].values()), default=1.0)
            if tower in chosen and worst < 0.99:
                log.warning("%s tower: min cosine vs float32 is %.4f (< 0.99); check retrieval metrics", tower, worst)
            report["towers"][tower] = entry

        for name in _COPY_ALONG:
            if (art.path / name).is_file():
                shutil.copyfile(art.path / name, tmp / name)
        tok_cfg = art.read_json(TOKENIZER_FILE)
        for key in ("vocab_file", "vocab_map_file"):
            name = tok_cfg.get(key) if isinstance(tok_cfg, dict) else None
            if name:
                if not (art.path / name).is_file():
                    raise ArtifactError(f"{art.path / name}: named by {TOKENIZER_FILE} but missing; re-export")
                shutil.copyfile(art.path / name, tmp / name)
        if evaluation is not None:
            report["metrics"] = _evaluate(art.path, tmp, evaluation, disable)
            write_json(tmp / METRICS, report["metrics"])
        write_json(tmp / QUANT_FILE, report)
    report["path"] = str(out)
    return report


def _evaluate(src: Path, dst: Path, split: Split, disable: bool) -> dict[str, Any]:
    """Text-to-image retrieval metrics of the float32 and the quantised models on the eval split."""
    out: dict[str, Any] = {}
    for name, folder in (("fp32", src), ("quantized", dst)):
        off = disable and folder == dst
        encoder = OnnxRuntimeEncoder.open(folder, threads=min(4, os.cpu_count() or 1), optimize=not off,
                                          batch_size=_EVAL_BATCH)
        try:
            for session in ("image_session", "text_session"):  # load both graphs before embedding anything
                getattr(encoder.runtime, session)
        except UserError as exc:
            if not disable:
                raise
            out[name] = None
            out[f"{name}_skipped"] = f"cannot run on the CPU provider ({str(exc)[:200]})"
            continue
        out[name] = evaluate(encoder, split)
    out["eval_images"], out["eval_captions"] = len(split.image_paths), len(split.captions)
    return out


# --------------------------------------------------------------------------------------------------------- config
# The stage's settings (``tbps_compress.stages``): built from the CLI's flags or a pipeline stage's ``options``.


class QuantizeCfg(Strict):
    """``tbps-compress quantize``: an ONNX artifact to int8 (dynamic / static) or fp16."""

    mode: str = Field("dynamic", description="dynamic | static | fp16")
    calib_data: str | None = Field(None, description="Dataset root for static calibration (default: the stage's "
                                                     "dataset).")
    calib_method: str = Field("minmax", description="minmax | entropy | percentile (static).")
    calib_size: int = Field(64, ge=1, description="Calibration samples per tower.")
    backend: str = Field("ort", description="ort | optimum")
    towers: tuple[str, ...] = Field(("image", "text"), description="Towers to quantise (image, text).")
    op_types: list[str] | None = Field(None, description="Operator types to quantise (default per mode).")

    @field_validator("mode", "calib_method", "backend")
    @classmethod
    def _choice(cls, v: str, info: Any) -> str:
        allowed = {"mode": MODES, "calib_method": CALIB_METHODS, "backend": BACKENDS}[info.field_name]
        if v not in allowed:
            raise ValueError(f"got {v!r}; choose one of {', '.join(allowed)}")
        return v

    @field_validator("towers", mode="before")
    @classmethod
    def _towers(cls, v: Any) -> Any:
        return parsed_or_value_error(_parse_towers, v)
