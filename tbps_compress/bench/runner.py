"""The benchmark: every artifact x runtime x precision measured for retrieval quality, latency, throughput, size,
memory and hardware efficiency, as one flat row each.

What one row holds (``None`` where a quantity was not measured; see :data:`ROW_FIELDS`):

- identity: ``label``, ``artifact``, ``stage``, ``kind`` ('torch' | 'onnx'), ``runtime`` ('torch',
  'torch.compile', 'onnxruntime'), ``provider`` (onnxruntime execution provider), ``precision`` ('fp32', 'fp16',
  'bf16', 'int8-dynamic', 'int8-static'), ``device``, ``status`` ('ok', 'skipped: <reason>', 'error: <message>').
- retrieval on ``split`` (text-to-image, percent): ``R1``, ``R5``, ``R10``, ``mAP``, ``mINP``.
- query latency: ``text_p50_ms`` / ``text_p90_ms``, the text encoder on one tokenised caption (batch 1).
- gallery throughput: ``image_b{B}_p50_ms`` and ``image_b{B}_ips`` (images/s) per batch size B, and
  ``image_ips`` at batch 32 (or the largest batch given).
- search latency: ``search_p50_ms`` / ``search_p90_ms``: tokenise + encode one caption + cosine top-``k`` over
  ``gallery_size`` precomputed, L2-normalised random embeddings of the model's dimension (numpy
  :func:`~tbps_compress.runtime.cosine_topk` on the CPU, ``torch.topk`` on the GPU for PyTorch rows).
- cost: ``params_total`` / ``params_vision`` / ``params_text``, ``macs_image`` / ``macs_text`` (one image, one
  caption), ``file_mb`` (weights or ONNX files), ``peak_mem_mb`` with ``mem_method``.
- efficiency: ``image_tflops`` (``2 * macs_image * image_ips``), ``text_tflops`` (``2 * macs_text / text_p50``),
  ``ceiling_tflops`` (a measured large matrix product on the same device and precision: the machine ceiling;
  int8 rows are compared with the fp32 ceiling) and ``image_pct_of_ceiling`` / ``text_pct_of_ceiling``.
- how: ``warmup``, ``reps``, ``min_timed`` (fewest calls timed in one measurement of the row), ``threads``,
  ``device_name``, ``torch_version``, ``onnxruntime_version``, ``notes``.

GPU timings synchronise (``torch.cuda.synchronize`` around each timed call; onnxruntime's ``run`` is synchronous
and its CUDA / TensorRT timings include the host-device copies of inputs and outputs).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field, field_validator

from ..config import Strict, parsed_or_value_error
from ..devices import check_device
from ..errors import UserError
from ..io_utils import check_output_folder
from .latency import PeakMemory, Timing, environment, matmul_ceiling, measure, no_sync, torch_threads

log = logging.getLogger(__name__)

__all__ = ["RUNTIMES", "ROW_FIELDS", "BenchCase", "onnx_precision", "parse_int_list", "parse_runtimes", "plan_cases",
           "run_bench"]

RUNTIMES = ("torch", "onnxruntime")
CUDA_TORCH_PRECISIONS = ("fp32", "fp16", "bf16")
CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"
TRT_PROVIDER = "TensorrtExecutionProvider"
_PROVIDER_CHAIN = {
    CPU_PROVIDER: [CPU_PROVIDER],
    CUDA_PROVIDER: [CUDA_PROVIDER, CPU_PROVIDER],
    TRT_PROVIDER: [TRT_PROVIDER, CUDA_PROVIDER, CPU_PROVIDER],
}
_PROVIDER_SHORT = {CPU_PROVIDER: "ort-cpu", CUDA_PROVIDER: "ort-cuda", TRT_PROVIDER: "ort-trt"}
DEFAULT_CAPTION = ("a young woman with long black hair wearing a red jacket, blue jeans and white sneakers, "
                   "carrying a black backpack")
THROUGHPUT_BATCH = 32
TOPK = 10

ROW_FIELDS = (
    "label", "artifact", "stage", "kind", "runtime", "provider", "precision", "device", "status",
    "R1", "R5", "R10", "mAP", "mINP", "split",
    "text_p50_ms", "text_p90_ms", "image_ips", "search_p50_ms", "search_p90_ms", "gallery_size", "topk",
    "params_total", "params_vision", "params_text", "macs_image", "macs_text", "file_mb", "peak_mem_mb",
    "mem_method", "image_tflops", "text_tflops", "ceiling_tflops", "image_pct_of_ceiling", "text_pct_of_ceiling",
    "embed_dim", "image_size", "context_length",
    "warmup", "reps", "min_timed", "threads", "device_name", "torch_version", "onnxruntime_version", "notes",
)


def batch_fields(batches: Sequence[int]) -> list[str]:
    """The per-batch image columns of a run."""
    return [f for b in batches for f in (f"image_b{b}_p50_ms", f"image_b{b}_ips")]


def parse_int_list(text: str | Sequence[int], what: str = "--batch") -> list[int]:
    """``"1,32"`` -> ``[1, 32]`` (positive, unique, order kept); a sequence is checked the same way."""
    items = text.split(",") if isinstance(text, str) else list(text)
    out: list[int] = []
    for item in items:
        try:
            value = int(str(item).strip())
        except ValueError:
            raise UserError(f"{what}: expected comma-separated positive integers such as 1,32, got {text!r}") from None
        if value < 1:
            raise UserError(f"{what}: values must be >= 1, got {value}")
        if value not in out:
            out.append(value)
    if not out:
        raise UserError(f"{what}: give at least one value")
    return out


def parse_runtimes(text: str | Sequence[str]) -> list[str]:
    """``"torch,onnxruntime"`` -> a checked list of runtime names (``ort`` is accepted for onnxruntime)."""
    items = text.split(",") if isinstance(text, str) else list(text)
    out = []
    for item in items:
        name = {"ort": "onnxruntime", "pytorch": "torch"}.get(item.strip().lower(), item.strip().lower())
        if name not in RUNTIMES:
            raise UserError(f"--runtimes: unknown runtime {item!r}; choose from {', '.join(RUNTIMES)}")
        if name not in out:
            out.append(name)
    if not out:
        raise UserError(f"--runtimes: give at least one of {', '.join(RUNTIMES)}")
    return out


# ---------------------------------------------------------------------------------------------------------------------
# cases
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchCase:
    """One runtime x precision (x provider) combination of an artifact, with the reason it is skipped if it is."""

    runtime: str
    precision: str
    provider: str | None = None
    skip: str | None = None

    @property
    def short(self) -> str:
        if self.runtime == "onnxruntime":
            return _PROVIDER_SHORT.get(self.provider or "", "ort")
        return "pt-compile" if self.runtime == "torch.compile" else "pt"


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def _ort_providers() -> list[str] | None:
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    return list(ort.get_available_providers())


def plan_cases(kind: str, onnx_prec: str | None, runtimes: Sequence[str], device: str, *, compile: bool = False,
               export_torch: bool = False, precisions: Sequence[str] | None = None,
               cuda_available: bool | None = None, ort_providers: list[str] | None | bool = False) -> list[BenchCase]:
    """The cases of one artifact (``kind`` 'torch' or 'onnx'; ``onnx_prec`` the ONNX files' precision).

    Every requested combination yields a case; the ones that cannot run carry ``skip`` (the row's reason):
    ONNX artifacts in PyTorch, PyTorch artifacts in onnxruntime without ``export_torch``, a missing CUDA device or
    execution provider, float16 ONNX on the CPU provider. ``precisions`` filters the PyTorch precisions."""
    cuda = str(device).startswith("cuda")
    if cuda_available is None:
        cuda_available = _cuda_available()
    if ort_providers is False:
        ort_providers = _ort_providers()
    cases: list[BenchCase] = []
    for runtime in runtimes:
        if runtime == "torch":
            names = ["torch"] + (["torch.compile"] if compile else [])
            precs = list(CUDA_TORCH_PRECISIONS if cuda else ("fp32",))
            if precisions:
                precs = [p for p in precs if p in precisions]
            for name in names:
                for prec in precs:
                    skip = None
                    if kind != "torch":
                        skip = "ONNX artifact: the PyTorch runtime needs model_config.json + weights.safetensors"
                    elif cuda and not cuda_available:
                        skip = "CUDA is not available (torch.cuda.is_available() is False)"
                    cases.append(BenchCase(name, prec, None, skip))
        elif runtime == "onnxruntime":
            providers = [CUDA_PROVIDER, TRT_PROVIDER] if cuda else [CPU_PROVIDER]
            prec = onnx_prec or "fp32"
            for provider in providers:
                skip = None
                if ort_providers is None:
                    skip = "onnxruntime is not installed"
                elif provider not in ort_providers:
                    skip = (f"{provider} is not available in this onnxruntime build (available: "
                            f"{', '.join(ort_providers)}); install onnxruntime-gpu for CUDA / TensorRT")
                elif kind == "torch" and not export_torch:
                    skip = ("PyTorch artifact has no ONNX files: export it first (tbps-compress export --onnx) or "
                            "pass --export-torch to export it on the fly")
                elif provider == CPU_PROVIDER and prec == "fp16":
                    skip = ("float16 ONNX is a GPU format: the CPU provider lacks (or crashes on) float16 kernels; "
                            "bench it with --device cuda")
                cases.append(BenchCase(runtime, prec, provider, skip))
    return cases


# ---------------------------------------------------------------------------------------------------------------------
# static facts of an artifact
# ---------------------------------------------------------------------------------------------------------------------

_INT8_DYNAMIC_OPS = {"DynamicQuantizeLinear", "MatMulInteger", "DynamicQuantizeMatMul", "ConvInteger"}
_INT8_STATIC_OPS = {"QuantizeLinear", "DequantizeLinear", "QLinearMatMul", "QLinearConv", "QGemm"}


def onnx_precision(paths: Sequence[Path]) -> str:
    """'int8-dynamic', 'int8-static', 'fp16' or 'fp32', read from the graphs (ops and initializer types)."""
    import onnx

    found = set()
    for path in paths:
        model = onnx.load(str(path), load_external_data=False)
        ops = {n.op_type for n in model.graph.node}
        if ops & _INT8_DYNAMIC_OPS:
            found.add("int8-dynamic")
        elif ops & _INT8_STATIC_OPS:
            found.add("int8-static")
        elif any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer):
            found.add("fp16")
    for name in ("int8-static", "int8-dynamic", "fp16"):
        if name in found:
            return name
    return "fp32"


def _file_mb(path: Path, kind: str) -> float:
    if kind == "torch":
        files = [path / "weights.safetensors"]
    else:
        files = [f for f in path.iterdir() if f.name.endswith(".onnx") or f.name.endswith(".onnx.data")]
    return sum(f.stat().st_size for f in files if f.is_file()) / 2**20


def artifact_facts(art: Any) -> dict[str, Any]:
    """Size, parameter and MAC counts, shapes and (ONNX) precision of an opened artifact."""
    import torch

    from ..models.config import image_size_hw
    from ..models.factory import build_model, count_macs, count_parameters

    facts: dict[str, Any] = {"kind": art.kind, "stage": art.stage, "file_mb": _file_mb(art.path, art.kind)}
    cfg = art.model_config
    if art.kind == "onnx":
        facts["onnx_precision"] = onnx_precision([art.path / "image_encoder.onnx", art.path / "text_encoder.onnx"])
    if cfg is not None:
        with torch.device("meta"):
            model = build_model(cfg)
        params = count_parameters(model)
        macs = count_macs(cfg)
        h, w = image_size_hw(cfg)
        facts.update(params_total=params["total"], params_vision=params["vision"], params_text=params["text"],
                     macs_image=macs["vision"], macs_text=macs["text"], embed_dim=int(cfg["embed_dim"]),
                     image_size=[h, w], context_length=int(cfg["text_cfg"]["context_length"]))
    else:
        from ..runtime import load_preprocess_config, load_tokenizer

        facts["image_size"] = list(load_preprocess_config(art.path).image_size)
        facts["context_length"] = load_tokenizer(art.path).context_length
    return facts


# ---------------------------------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class _Context:
    device: str
    batches: list[int]
    warmup: int
    reps: int
    threads: int | None
    max_time_s: float | None
    gallery_size: int
    topk: int
    caption: str
    split: str
    dataset: Any = None
    records: list = field(default_factory=list)
    retrieval_batch: int = 128
    ceilings: dict[str, dict[str, Any]] = field(default_factory=dict)
    galleries: dict[int, np.ndarray] = field(default_factory=dict)
    tmp: Path | None = None
    exported: dict[str, Path] = field(default_factory=dict)

    def gallery(self, dim: int) -> np.ndarray:
        if dim not in self.galleries:
            rng = np.random.default_rng(0)
            g = rng.standard_normal((self.gallery_size, dim), dtype=np.float32)
            g /= np.linalg.norm(g, axis=1, keepdims=True)
            self.galleries[dim] = g
        return self.galleries[dim]

    def ceiling(self, precision: str) -> dict[str, Any]:
        dtype = precision if precision in ("fp16", "bf16") and self.device.startswith("cuda") else "fp32"
        if dtype not in self.ceilings:
            with torch_threads(self.threads):
                self.ceilings[dtype] = matmul_ceiling(self.device, dtype)
            log.info("machine ceiling on %s: %.2f TFLOP/s (%s)", self.device, self.ceilings[dtype]["gflops"] / 1e3,
                     self.ceilings[dtype]["method"])
        return self.ceilings[dtype]

    @property
    def throughput_batch(self) -> int:
        return THROUGHPUT_BATCH if THROUGHPUT_BATCH in self.batches else max(self.batches)


def run_bench(
    artifacts: Sequence[Path],
    data: Path | None = None,
    *,
    runtimes: str | Sequence[str] = RUNTIMES,
    device: str = "cpu",
    batches: str | Sequence[int] = (1, 32),
    split: str = "test",
    gallery_size: int = 10_000,
    warmup: int = 3,
    reps: int = 20,
    threads: int | None = None,
    out: Path | None = None,
    export_torch: bool = False,
    compile: bool = False,
    precisions: Sequence[str] | None = None,
    max_time_s: float | None = 60.0,
    topk: int = TOPK,
    format: str | None = None,
    retrieval_batch: int = 128,
    meta: dict[str, Any] | None = None,
    force: bool = False,
) -> list[dict[str, Any]]:
    """Benchmark artifacts (torch or ONNX folders) on every requested runtime and precision; one row each.

    Args:
        artifacts: artifact folders (any stage).
        data: dataset root for the retrieval metrics on ``split``; None measures latency only.
        runtimes: any of ``'torch'`` and ``'onnxruntime'`` (a list, or a comma-separated string as on the CLI).
        device: ``'cpu'`` or ``'cuda'`` (``'cuda:N'``): PyTorch fp32 (+ fp16, bf16 on CUDA); onnxruntime's CPU
            provider, or its CUDA and TensorRT providers on CUDA.
        batches: image batch sizes timed (list or ``"1,32"``); the gallery throughput (``image_ips``) is taken
            at 32 or the largest.
        gallery_size: N random normalised gallery embeddings for the end-to-end search latency.
        warmup, reps: untimed and timed calls per measurement.
        threads: intra-op threads for PyTorch and onnxruntime (None: their defaults).
        out: folder for ``bench.csv``, ``bench.json``, ``bench.md`` and ``pareto.png`` (None: write nothing). It is
            checked before anything is measured, written under a temporary name and renamed when complete.
        export_torch: export PyTorch artifacts to ONNX in a temporary folder to bench them in onnxruntime.
        compile: add ``torch.compile`` rows.
        precisions: keep only these PyTorch precisions (e.g. ``["fp32", "fp16"]``).
        max_time_s: stop a measurement early after this many timed seconds (at least 3 calls timed).
        topk: k of the search latency.
        meta: a dict to fill with how the run was measured (what ``bench.json`` holds under ``meta``).
        force: replace an existing ``out`` folder holding an earlier report (refused otherwise, and always when it
            holds other files).

    Returns:
        The rows (dicts with :data:`ROW_FIELDS` plus the per-batch image fields), in artifact then case order.
    """
    runtimes = parse_runtimes(runtimes)
    batches = parse_int_list(batches)
    if warmup < 0 or reps < 1:
        raise UserError(f"--warmup must be >= 0 and --reps >= 1, got {warmup} and {reps}")
    if gallery_size < 1 or topk < 1:
        raise UserError(f"--gallery-size and topk must be >= 1, got {gallery_size} and {topk}")
    if threads is not None and threads < 1:
        raise UserError(f"--threads must be >= 1, got {threads}")
    check_device(device, allow_auto=False)
    if out is not None:
        from .report import REPORT_FILES

        check_output_folder(Path(out), force=force, flag="--out", owned=REPORT_FILES)
    from ..artifacts import open_artifact

    opened = [open_artifact(Path(a)) for a in artifacts]  # fail early on a missing or corrupt artifact
    if not opened:
        raise UserError("give at least one artifact folder to benchmark")
    ctx = _Context(device=device, batches=batches, warmup=warmup, reps=reps, threads=threads, max_time_s=max_time_s,
                   gallery_size=gallery_size, topk=topk, caption=DEFAULT_CAPTION, split=split,
                   retrieval_batch=retrieval_batch)
    if data is not None:
        from ..data.readers import load_dataset

        ds = load_dataset(Path(data), format)
        recs = ds.split(split)
        if not recs:
            raise UserError(f"{ds.annotation}: no records in split '{split}' (splits present: "
                            f"{', '.join(ds.splits())})")
        ctx.dataset, ctx.records = ds, recs
        ctx.caption = recs[0].captions[0]
    with torch_threads(threads):
        env = environment(device)
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    rows: list[dict[str, Any]] = []
    ctx.tmp = Path(tempfile.mkdtemp(prefix="tbps-bench-")) if export_torch else None
    try:
        for art in opened:
            facts = artifact_facts(art)
            cases = plan_cases(art.kind, facts.get("onnx_precision"), runtimes, device, compile=compile,
                               export_torch=export_torch, precisions=precisions)
            for case in cases:
                row = _base_row(art, facts, case, ctx, env)
                if case.skip:
                    row["status"] = f"skipped: {case.skip}"
                    log.info("%s: %s", row["label"], row["status"])
                    rows.append(row)
                    continue
                log.info("benchmarking %s", row["label"])
                try:
                    if case.runtime == "onnxruntime":
                        path = art.path
                        if art.kind == "torch":
                            path = _export_on_the_fly(art.path, ctx)
                            row["notes"] = "exported to ONNX (fp32) on the fly with export_onnx"
                        _bench_ort(path, case, ctx, row)
                    else:
                        _bench_torch(art, case, ctx, row)
                    _efficiency(row, ctx, case)
                    if row["status"] is None:
                        row["status"] = "ok"
                except Exception as exc:  # one broken combination must not lose the rest of the table
                    log.exception("%s failed", row["label"])
                    row["status"] = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
                rows.append(row)
    finally:
        if ctx.tmp is not None:
            shutil.rmtree(ctx.tmp, ignore_errors=True)
    info = run_meta(ctx, env, runtimes=runtimes, data=data, started=started, artifacts=artifacts, compile=compile,
                    export_torch=export_torch)
    if meta is not None:
        meta.update(info)
    if out is not None:
        from .report import write_report

        write_report(rows, info, Path(out), force=force)
    return rows


def run_meta(ctx: _Context, env: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """How the run was measured (saved beside the rows)."""
    meta = {
        "device": ctx.device, "batches": ctx.batches, "throughput_batch": ctx.throughput_batch, "warmup": ctx.warmup,
        "reps": ctx.reps, "max_time_s": ctx.max_time_s, "threads": ctx.threads, "gallery_size": ctx.gallery_size,
        "topk": ctx.topk, "split": ctx.split, "query_caption": ctx.caption, "environment": env,
        "ceilings": ctx.ceilings,
        "method": {
            "latency": "warm-up calls, then timed calls; p50/p90 of per-call wall time (time.perf_counter); CUDA "
                       "work synchronised before and after each call",
            "text": "text encoder on one tokenised caption (batch 1), tokenisation excluded",
            "image": "image encoder on random normalised images at the model's size; images/s = batch / p50",
            "search": f"tokenise + encode one caption + cosine top-{ctx.topk} over {ctx.gallery_size} random "
                      "L2-normalised embeddings",
            "ceiling": "best time of a large torch.mm on the same device, threads and precision",
            "memory": "CPU: peak RSS above the level before loading (model load + one pass per batch size); "
                      "CUDA torch: torch.cuda.max_memory_allocated",
        },
    }
    meta.update({k: [str(a) for a in v] if k == "artifacts" else (str(v) if isinstance(v, Path) else v)
                 for k, v in extra.items()})
    return meta


def _base_row(art: Any, facts: dict[str, Any], case: BenchCase, ctx: _Context, env: dict[str, Any]) -> dict:
    row: dict[str, Any] = dict.fromkeys(ROW_FIELDS)
    row.update(dict.fromkeys(batch_fields(ctx.batches)))
    row.update({k: v for k, v in facts.items() if k in row})
    row.update(
        label=f"{art.path.name} [{case.short}/{case.precision}]", artifact=str(art.path), runtime=case.runtime,
        provider=case.provider, precision=case.precision, device=ctx.device, split=ctx.split if ctx.records else None,
        gallery_size=ctx.gallery_size, topk=ctx.topk, warmup=ctx.warmup, reps=ctx.reps,
        device_name=env.get("device_name") if (ctx.device.startswith("cuda")) else env.get("cpu"),
        torch_version=env.get("torch"), onnxruntime_version=env.get("onnxruntime"),
    )
    row["file_mb"] = round(facts["file_mb"], 3)
    return row


def _export_on_the_fly(src: Path, ctx: _Context) -> Path:
    """Export a PyTorch artifact once per run into the run's temporary folder (``--export-torch``)."""
    from ..export.onnx_export import export_onnx

    assert ctx.tmp is not None
    key = str(Path(src).resolve())
    if key not in ctx.exported:
        dest = ctx.tmp / f"{len(ctx.exported)}-{Path(src).name}-onnx"
        log.info("exporting %s to ONNX in %s", src, dest)
        export_onnx(Path(src), dest)
        ctx.exported[key] = dest
    return ctx.exported[key]


def _timing_fields(row: dict[str, Any], prefix: str, t: Timing) -> None:
    row[f"{prefix}_p50_ms"] = round(t.p50, 4)
    if f"{prefix}_p90_ms" in row:
        row[f"{prefix}_p90_ms"] = round(t.p90, 4)
    row["min_timed"] = t.n if row.get("min_timed") is None else min(row["min_timed"], t.n)


def _measure_all(row: dict[str, Any], ctx: _Context, sync: Callable[[], None], text_fn: Callable[[], Any],
                 image_fns: dict[int, Callable[[], Any]], search_fn: Callable[[], Any]) -> None:
    kw = dict(warmup=ctx.warmup, reps=ctx.reps, sync=sync, max_time_s=ctx.max_time_s)
    _timing_fields(row, "text", measure(text_fn, **kw))
    for b, fn in image_fns.items():
        t = measure(fn, **kw)
        _timing_fields(row, f"image_b{b}", t)
        row[f"image_b{b}_ips"] = round(t.per_second(b), 3)
    row["image_ips"] = row[f"image_b{ctx.throughput_batch}_ips"]
    _timing_fields(row, "search", measure(search_fn, **kw))


def _efficiency(row: dict[str, Any], ctx: _Context, case: BenchCase) -> None:
    ceiling = ctx.ceiling(case.precision)
    tflops = ceiling["gflops"] / 1e3
    row["ceiling_tflops"] = round(tflops, 4)
    if row.get("macs_image") and row.get("image_ips"):
        row["image_tflops"] = round(2 * row["macs_image"] * row["image_ips"] / 1e12, 5)
        row["image_pct_of_ceiling"] = round(100 * row["image_tflops"] / tflops, 2)
    if row.get("macs_text") and row.get("text_p50_ms"):
        row["text_tflops"] = round(2 * row["macs_text"] / (row["text_p50_ms"] / 1000) / 1e12, 5)
        row["text_pct_of_ceiling"] = round(100 * row["text_tflops"] / tflops, 2)
    if case.precision.startswith("int8"):
        note = "int8 compared with the fp32 matmul ceiling"
        row["notes"] = f"{row['notes']}; {note}" if row.get("notes") else note


# ---------------------------------------------------------------------------------------------------------------------
# PyTorch
# ---------------------------------------------------------------------------------------------------------------------


def _bench_torch(art: Any, case: BenchCase, ctx: _Context, row: dict[str, Any]) -> None:
    import torch

    from ..models.config import image_size_hw
    from ..retrieval.encoders import Split, TorchEncoder, evaluate
    from ..runtime import cosine_topk
    from ..runtime.tokenizer import clean_caption

    dev = torch.device(ctx.device)
    cuda = dev.type == "cuda"
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[case.precision]
    sync = torch.cuda.synchronize if cuda else no_sync
    h, w = image_size_hw(art.model_config)
    gen = torch.Generator().manual_seed(0)
    with torch_threads(ctx.threads) as n_threads, torch.inference_mode():
        row["threads"] = None if cuda else n_threads
        with PeakMemory(ctx.device) as mem:
            encoder = TorchEncoder.from_artifact(art, device=dev, precision=case.precision,
                                                 batch_size=ctx.retrieval_batch)
            model, tokenizer = encoder.model, encoder.tokenizer
            enc_image, enc_text = model.encode_image, model.encode_text
            if case.runtime == "torch.compile":
                enc_image, enc_text = torch.compile(enc_image), torch.compile(enc_text)
            images = {b: torch.randn(b, 3, h, w, generator=gen).to(dev, dtype) for b in ctx.batches}
            tokens = tokenizer([clean_caption(ctx.caption)]).to(dev)
            for b in ctx.batches:
                enc_image(images[b], normalize=True)
            enc_text(tokens, normalize=True)
            sync()
        row["peak_mem_mb"], row["mem_method"] = round(mem.peak_mb or 0.0, 2), mem.method
        gallery_np = ctx.gallery(int(row["embed_dim"]))
        if cuda:
            gallery = torch.from_numpy(gallery_np).to(dev, dtype)

            def search() -> Any:
                q = enc_text(tokenizer([clean_caption(ctx.caption)]).to(dev), normalize=True)
                return torch.topk(q @ gallery.T, min(ctx.topk, gallery.shape[0]), dim=1).indices.cpu()
        else:
            def search() -> Any:
                q = enc_text(tokenizer([clean_caption(ctx.caption)]), normalize=True).float().numpy()
                return cosine_topk(q, gallery_np, ctx.topk)

        _measure_all(row, ctx, sync, lambda: enc_text(tokens, normalize=True),
                     {b: (lambda x=images[b]: enc_image(x, normalize=True)) for b in ctx.batches}, search)
        if ctx.records:
            _retrieval_fields(row, evaluate(encoder, Split.of(ctx.dataset, ctx.records)))
    del model, encoder
    if cuda:
        torch.cuda.empty_cache()


def _retrieval_fields(row: dict[str, Any], metrics: dict[str, float]) -> None:
    for k in ("R1", "R5", "R10", "mAP", "mINP"):
        if k in metrics:
            row[k] = round(float(metrics[k]), 3)


# ---------------------------------------------------------------------------------------------------------------------
# onnxruntime
# ---------------------------------------------------------------------------------------------------------------------


def _bench_ort(path: Path, case: BenchCase, ctx: _Context, row: dict[str, Any]) -> None:
    from ..retrieval.encoders import OnnxRuntimeEncoder, Split, evaluate
    from ..runtime import clean_caption, cosine_topk

    assert case.provider is not None
    chain = _PROVIDER_CHAIN[case.provider]
    h, w = (int(x) for x in row["image_size"])
    rng = np.random.default_rng(0)
    row["threads"] = ctx.threads if case.provider == CPU_PROVIDER else None
    with PeakMemory("cpu") as mem:
        encoder = OnnxRuntimeEncoder.open(path, providers=chain, threads=ctx.threads, batch_size=ctx.retrieval_batch)
        enc = encoder.runtime
        s_img, s_txt = enc.image_session, enc.text_session
        used = s_img.get_providers()[0]
        if used != case.provider:
            row["status"] = f"skipped: {case.provider} could not be used (the session fell back to {used})"
            return
        images = {b: rng.standard_normal((b, 3, h, w), dtype=np.float32) for b in ctx.batches}
        tokens = enc.tokenizer([clean_caption(ctx.caption)])
        for b in ctx.batches:
            s_img.run(["embedding"], {"image": images[b]})
        s_txt.run(["embedding"], {"text": tokens})
    row["peak_mem_mb"] = round(mem.peak_mb or 0.0, 2)
    row["mem_method"] = mem.method + ("" if case.provider == CPU_PROVIDER else "; host memory only")
    if row.get("embed_dim") is None:
        row["embed_dim"] = int(s_txt.run(["embedding"], {"text": tokens})[0].shape[1])
    gallery = ctx.gallery(int(row["embed_dim"]))

    def search() -> Any:
        return cosine_topk(enc.encode_texts([ctx.caption]), gallery, ctx.topk)

    _measure_all(row, ctx, no_sync, lambda: s_txt.run(["embedding"], {"text": tokens}),
                 {b: (lambda x=images[b]: s_img.run(["embedding"], {"image": x})) for b in ctx.batches}, search)
    if ctx.records:
        _retrieval_fields(row, evaluate(encoder, Split.of(ctx.dataset, ctx.records)))


# --------------------------------------------------------------------------------------------------------- config
# The stage's settings (``tbps_compress.stages``): built from the CLI's flags or a pipeline stage's ``options``.


class BenchCfg(Strict):
    """``tbps-compress bench``: accuracy against latency for artifacts x runtimes x precisions."""

    runtimes: list[str] = Field(default_factory=lambda: ["torch", "onnxruntime"], description="torch, onnxruntime")
    device: str = Field("cpu", description="cpu | cuda | cuda:N")
    batches: list[int] = Field(default_factory=lambda: [1, 32], description="Image batch sizes timed.")
    split: str = Field("test", description="Dataset split of the retrieval metrics.")
    gallery_size: int = Field(10_000, ge=1, description="Embeddings in the search-latency gallery.")
    warmup: int = Field(3, ge=0)
    reps: int = Field(20, ge=1)
    threads: int | None = Field(None, ge=1, description="Intra-op threads (default: the library's).")
    export_torch: bool = Field(False, description="Export torch artifacts for onnxruntime too.")
    compile: bool = Field(False, description="Also time torch.compile (CUDA).")
    precisions: list[str] | None = Field(None, description="Keep only these PyTorch precisions (default: all).")
    max_time_s: float | None = Field(60.0, gt=0, description="Stop timing one measurement after this long.")
    topk: int = Field(10, ge=1)
    format: str | None = Field(None, description="Dataset format (None = detect).")
    retrieval_batch: int = Field(128, ge=1, description="Batch size of the retrieval-metric embedding.")

    @field_validator("runtimes", mode="before")
    @classmethod
    def _runtimes(cls, v: Any) -> Any:
        return parsed_or_value_error(parse_runtimes, v)

    @field_validator("batches", mode="before")
    @classmethod
    def _batches(cls, v: Any) -> Any:
        return parsed_or_value_error(parse_int_list, v)
