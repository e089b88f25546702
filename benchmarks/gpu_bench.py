"""GPU latency table of the real model shapes (random weights): the TBPS-CLIP teacher (``tbps-vit-b-16``, ViT-B/16
at 384x128) against the student shapes (``tbps-vit-s-16``, ``tbps-vit-t-16``), PyTorch eager in fp32 / fp16 / bf16
(optionally ``torch.compile``), plus onnxruntime's CUDA provider when onnxruntime-gpu is installed.

Made for a short session on a lent GPU machine without internet: the models are the product's (``build_model``,
open_clip towers), so the machine needs the package's dependencies; those it lacks travel as wheels in ``.whl/``
(``benchmarks/gpu_check.sh`` installs them). Every measurement is bounded (``--budget-s`` for the whole run, at most
``--max-time-s`` per measurement), so the run ends in a few minutes.

Usage, from the repository root (no install needed)::

    PYTHONPATH=. python benchmarks/gpu_bench.py --out "$OUT/gpu"             # about 1-2 minutes on an H100
    PYTHONPATH=. python benchmarks/gpu_bench.py --out "$OUT/gpu" --compile   # + torch.compile rows (slower)

Writes ``bench.csv``, ``bench.json`` and ``bench.md`` (same columns as ``tbps-compress bench``) and prints the
Markdown table.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

DEFAULT_MODELS = "tbps-vit-b-16,tbps-vit-s-16,tbps-vit-t-16"
CAPTION_TOKENS = 24  # a typical CUHK-PEDES caption length in BPE tokens (with start and end tokens)
EOT = 49407
SOT = 49406

log = logging.getLogger("gpu_bench")


def build(cfg: dict[str, Any]) -> Any:
    """The product's model for a config (open_clip towers; random weights from the caller's seed)."""
    from tbps_compress.models.factory import build_model

    return build_model(cfg)


def caption_tokens(context_length: int, n: int = CAPTION_TOKENS, seed: int = 0) -> Any:
    import torch

    g = torch.Generator().manual_seed(seed)
    tokens = torch.zeros(1, context_length, dtype=torch.long)
    n = min(n, context_length)
    tokens[0, 0] = SOT
    tokens[0, 1:n - 1] = torch.randint(300, 40000, (n - 2,), generator=g)
    tokens[0, n - 1] = EOT
    return tokens


# ---------------------------------------------------------------------------------------------------------------------
# measurement
# ---------------------------------------------------------------------------------------------------------------------


class Budget:
    def __init__(self, seconds: float) -> None:
        self.end = time.perf_counter() + seconds

    def left(self) -> float:
        return self.end - time.perf_counter()


def base_row(name: str, cfg: dict[str, Any], runtime: str, precision: str, args: argparse.Namespace,
             env: dict[str, Any], provider: str | None = None) -> dict[str, Any]:
    from tbps_compress.bench.runner import ROW_FIELDS, batch_fields
    from tbps_compress.models.config import image_size_hw
    from tbps_compress.models.factory import count_macs

    short = {"torch": "pt", "torch.compile": "pt-compile", "onnxruntime": "ort-cuda"}[runtime]
    row: dict[str, Any] = dict.fromkeys(ROW_FIELDS)
    row.update(dict.fromkeys(batch_fields(args.batches)))
    macs = count_macs(cfg)
    row.update(label=f"{name} [{short}/{precision}]", artifact=name, stage="random-init", kind="model",
               runtime=runtime, provider=provider, precision=precision, device=args.device,
               gallery_size=args.gallery_size, topk=10, macs_image=macs["vision"], macs_text=macs["text"],
               embed_dim=int(cfg["embed_dim"]), image_size=list(image_size_hw(cfg)),
               context_length=int(cfg["text_cfg"]["context_length"]), warmup=args.warmup, reps=args.reps,
               device_name=env.get("device_name"), torch_version=env.get("torch"),
               onnxruntime_version=env.get("onnxruntime"), notes="random weights")
    return row


def _fill_timings(row: dict[str, Any], args: argparse.Namespace, sync: Any, text_fn: Any, image_fns: dict,
                  search_fn: Any | None) -> None:
    from tbps_compress.bench.latency import measure

    kw = dict(warmup=args.warmup, reps=args.reps, sync=sync, max_time_s=args.max_time_s)
    timings = []
    t = measure(text_fn, **kw)
    row["text_p50_ms"], row["text_p90_ms"] = round(t.p50, 4), round(t.p90, 4)
    timings.append(t)
    for b, fn in image_fns.items():
        t = measure(fn, **kw)
        row[f"image_b{b}_p50_ms"], row[f"image_b{b}_ips"] = round(t.p50, 4), round(t.per_second(b), 2)
        timings.append(t)
    tb = 32 if 32 in args.batches else max(args.batches)
    row["image_ips"] = row[f"image_b{tb}_ips"]
    if search_fn is not None:
        t = measure(search_fn, **kw)
        row["search_p50_ms"], row["search_p90_ms"] = round(t.p50, 4), round(t.p90, 4)
        timings.append(t)
    row["min_timed"] = min(t.n for t in timings)


def _efficiency(row: dict[str, Any], ceiling: dict[str, Any]) -> None:
    tflops = ceiling["gflops"] / 1e3
    row["ceiling_tflops"] = round(tflops, 3)
    if row.get("image_ips"):
        row["image_tflops"] = round(2 * row["macs_image"] * row["image_ips"] / 1e12, 4)
        row["image_pct_of_ceiling"] = round(100 * row["image_tflops"] / tflops, 2)
    if row.get("text_p50_ms"):
        row["text_tflops"] = round(2 * row["macs_text"] / (row["text_p50_ms"] / 1000) / 1e12, 5)
        row["text_pct_of_ceiling"] = round(100 * row["text_tflops"] / tflops, 3)


def bench_torch(model: Any, row: dict[str, Any], precision: str, compiled: bool, args: argparse.Namespace) -> None:
    import torch

    from tbps_compress.bench.latency import PeakMemory
    from tbps_compress.models.factory import count_parameters

    dev = torch.device(args.device)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    h, w = row["image_size"]
    gen = torch.Generator().manual_seed(0)
    params = count_parameters(model)
    row.update(params_total=params["total"], params_vision=params["vision"], params_text=params["text"])
    row["file_mb"] = round(params["total"] * dtype.itemsize / 2**20, 2)  # weights in this precision
    model.to("cpu", torch.float32)  # every case starts from the CPU, so its peak memory counts the same things
    torch.cuda.empty_cache()
    with torch.inference_mode():
        with PeakMemory(args.device) as mem:
            m = model.to(dev, dtype).eval()
            enc_image, enc_text = m.encode_image, m.encode_text
            if compiled:
                enc_image = torch.compile(enc_image, mode=args.compile_mode)
                enc_text = torch.compile(enc_text, mode=args.compile_mode)
            images = {b: torch.randn(b, 3, h, w, generator=gen).to(dev, dtype) for b in args.batches}
            tokens = caption_tokens(row["context_length"]).to(dev)
            for b in args.batches:
                enc_image(images[b], normalize=True)
            enc_text(tokens, normalize=True)
            torch.cuda.synchronize()
        row["peak_mem_mb"], row["mem_method"] = round(mem.peak_mb or 0.0, 1), mem.method
        g = torch.randn(args.gallery_size, row["embed_dim"], generator=gen).to(dev)
        gallery = torch.nn.functional.normalize(g, dim=1).to(dtype)

        def search() -> Any:
            q = enc_text(tokens, normalize=True)
            return torch.topk(q @ gallery.T, 10, dim=1).indices.cpu()

        _fill_timings(row, args, torch.cuda.synchronize, lambda: enc_text(tokens, normalize=True),
                      {b: (lambda x=images[b]: enc_image(x, normalize=True)) for b in args.batches}, search)
    row["notes"] += "; search: encode 1 caption + torch.topk over the gallery on the GPU (tokenisation excluded)"


def bench_ort_cuda(model: Any, row: dict[str, Any], args: argparse.Namespace, work: Path,
                   provider: str = "CUDAExecutionProvider") -> None:
    """fp32 ONNX towers (torch.onnx.export) on onnxruntime's CUDA provider; numpy in and out (the timings include
    host-device copies)."""
    import numpy as np
    import onnxruntime as ort
    import torch

    from tbps_compress.bench.latency import PeakMemory

    m = model.to("cpu", torch.float32).eval()

    class Tower(torch.nn.Module):
        def __init__(self, fn: Any) -> None:
            super().__init__()
            self.m, self.fn = m, fn

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return getattr(self.m, self.fn)(x, normalize=True)

    h, w = row["image_size"]
    examples = {"image": torch.randn(2, 3, h, w), "text": caption_tokens(row["context_length"]).repeat(2, 1)}
    paths = {}
    for tower, fn in (("image", "encode_image"), ("text", "encode_text")):
        path = work / f"{row['artifact']}-{tower}.onnx"
        errors = []
        for dynamo in (False, True):
            try:
                with torch.no_grad():
                    torch.onnx.export(Tower(fn), (examples[tower],), str(path), input_names=[tower],
                                      output_names=["embedding"], dynamic_axes={tower: {0: "batch"}},
                                      opset_version=18, dynamo=dynamo)
                break
            except Exception as exc:  # exporter missing pieces (onnx, onnxscript) or failing on the model
                errors.append(f"dynamo={dynamo}: {str(exc).splitlines()[0][:150]}")
        else:
            row["status"] = "skipped: ONNX export failed here (" + "; ".join(errors) + ")"
            return
        paths[tower] = path
    with PeakMemory("cpu") as mem:
        sessions = {k: ort.InferenceSession(str(p), providers=[provider]) for k, p in paths.items()}
        if sessions["image"].get_providers()[0] != provider:
            row["status"] = f"skipped: {provider} fell back to {sessions['image'].get_providers()[0]}"
            return
        rng = np.random.default_rng(0)
        images = {b: rng.standard_normal((b, 3, h, w), dtype=np.float32) for b in args.batches}
        tokens = caption_tokens(row["context_length"]).numpy()
        for b in args.batches:
            sessions["image"].run(["embedding"], {"image": images[b]})
    row["peak_mem_mb"], row["mem_method"] = round(mem.peak_mb or 0.0, 1), mem.method + "; host memory only"
    _fill_timings(row, args, lambda: None, lambda: sessions["text"].run(["embedding"], {"text": tokens}),
                  {b: (lambda x=images[b]: sessions["image"].run(["embedding"], {"image": x})) for b in args.batches},
                  None)
    row["notes"] += "; fp32 ONNX via torch.onnx.export, numpy in/out (includes host-device copies)"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--force", action="store_true", help="replace an existing report folder")
    p.add_argument("--models", default=DEFAULT_MODELS)
    p.add_argument("--device", default="cuda")
    p.add_argument("--batches", default="1,32,128")
    p.add_argument("--precisions", default="fp32,fp16,bf16")
    p.add_argument("--compile", action="store_true", help="add torch.compile rows for --compile-precisions")
    p.add_argument("--compile-precisions", default="fp16")
    p.add_argument("--compile-mode", default="reduce-overhead",
                   help="torch.compile mode (default %(default)s: CUDA graphs, which removes the launch overhead "
                        "that dominates batch-1 text latency)")
    p.add_argument("--no-ort", action="store_true", help="skip onnxruntime even when its CUDA provider is present")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--max-time-s", type=float, default=5.0)
    p.add_argument("--gallery-size", type=int, default=10_000)
    p.add_argument("--budget-s", type=float, default=240.0, help="stop starting new measurements after this")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args.batches = [int(b) for b in args.batches.split(",")]
    budget = Budget(args.budget_s)

    import torch

    from tbps_compress.bench.latency import environment, matmul_ceiling
    from tbps_compress.bench.report import markdown_table, write_report
    from tbps_compress.models.config import get_model_config

    if not torch.cuda.is_available():
        print("gpu_bench: CUDA is not available (torch.cuda.is_available() is False); nothing to do",
              file=sys.stderr)
        return 1
    env = environment(args.device)
    env["gpu_capability"] = list(torch.cuda.get_device_capability())
    env["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    env["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
    precisions = args.precisions.split(",")
    ceilings = {d: matmul_ceiling(args.device, d) for d in sorted(set(precisions) | {"fp32"})}
    for d, c in ceilings.items():
        log.info("ceiling %s: %.1f TFLOP/s", d, c["gflops"] / 1e3)
    ort_reason = None
    if args.no_ort:
        ort_reason = "--no-ort given"
    else:
        try:
            import onnxruntime as ort

            if "CUDAExecutionProvider" not in ort.get_available_providers():
                ort_reason = (f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (available: "
                              f"{', '.join(ort.get_available_providers())}); install onnxruntime-gpu")
        except ImportError:
            ort_reason = "onnxruntime is not installed"
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="gpu-bench-") as tmp:
        for name in [m.strip() for m in args.models.split(",") if m.strip()]:
            cfg = get_model_config(name)
            torch.manual_seed(0)
            model = build(cfg)
            cases = [("torch", prec) for prec in precisions]
            if args.compile:
                cases += [("torch.compile", prec) for prec in args.compile_precisions.split(",")]
            for runtime, prec in cases + [("onnxruntime", "fp32")]:
                row = base_row(name, cfg, runtime, prec, args, env,
                               "CUDAExecutionProvider" if runtime == "onnxruntime" else None)
                rows.append(row)
                if runtime == "onnxruntime" and ort_reason:
                    row["status"] = f"skipped: {ort_reason}"
                    continue
                if budget.left() < (60 if runtime == "torch.compile" else 5):
                    row["status"] = f"skipped: time budget of {args.budget_s:.0f} s used up (--budget-s)"
                    continue
                log.info("measuring %s", row["label"])
                t0 = time.perf_counter()
                try:
                    if runtime == "onnxruntime":
                        bench_ort_cuda(model, row, args, Path(tmp))
                    else:
                        bench_torch(model, row, prec, runtime == "torch.compile", args)
                    if row["status"] is None:
                        row["status"] = "ok"
                        _efficiency(row, ceilings.get(prec, ceilings["fp32"]))
                except Exception as exc:  # report and go on: one failing case must not lose the table
                    log.exception("%s failed", row["label"])
                    row["status"] = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
                log.info("%s: %s in %.1f s", row["label"], row["status"], time.perf_counter() - t0)
            del model
            torch.cuda.empty_cache()
    meta = {
        "device": args.device, "batches": args.batches, "throughput_batch": 32 if 32 in args.batches else
        max(args.batches), "warmup": args.warmup, "reps": args.reps, "max_time_s": args.max_time_s,
        "threads": None, "gallery_size": args.gallery_size, "topk": 10, "environment": env, "ceilings": ceilings,
        "budget_s": args.budget_s,
        "method": {
            "latency": "warm-up calls, then timed calls, torch.cuda.synchronize before and after each; p50/p90",
            "text": f"text encoder on one random caption of {CAPTION_TOKENS} tokens padded to the context length",
            "image": "image encoder on random images at the model's size; images/s = batch / p50",
            "search": f"encode 1 caption + torch.topk over {args.gallery_size} normalised random embeddings on GPU",
            "memory": "torch.cuda.max_memory_allocated above the level before the model moved to the GPU",
            "ceiling": "best of 5 torch.mm 8192x8192 in each precision (TF32 off for fp32 unless enabled)",
        },
    }
    write_report(rows, meta, args.out, force=args.force)
    print(markdown_table(rows, meta))
    print(f"gpu_bench: wrote {args.out} ({args.budget_s - budget.left():.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
