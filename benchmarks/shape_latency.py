"""Latency of the real model shapes (random weights, no retrieval): the TBPS-CLIP teacher (ViT-B/16 at 384x128,
``tbps-vit-b-16``) against the student shapes (``tbps-vit-s-16``, ``tbps-vit-t-16``), in PyTorch fp32, onnxruntime
fp32 and onnxruntime int8 (dynamic), through the product's code path: each shape is saved as an artifact, exported
with ``export_onnx``, quantised with ``quantize_artifact`` and measured by ``run_bench``.

Writes ``bench.csv``, ``bench.json``, ``bench.md`` into ``--out`` and prints the table.

Usage (CPU; about 10-20 minutes on 2 cores, most of it the ViT-B export and batch-32 timings)::

    python benchmarks/shape_latency.py --out benchmarks/results/shape-cpu
    python benchmarks/shape_latency.py --out /tmp/shape --batches 1,8 --reps 5         # quicker look
    python benchmarks/shape_latency.py --out /tmp/shape --device cuda --runtimes torch   # GPU (see gpu_bench.py)

``--work DIR`` keeps the artifacts (and reuses ones already there, so a second run skips the exports).
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_MODELS = "tbps-vit-b-16,tbps-vit-s-16,tbps-vit-t-16"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="report folder")
    p.add_argument("--force", action="store_true", help="replace an existing report folder")
    p.add_argument("--models", default=DEFAULT_MODELS, help="comma-separated model config names (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--runtimes", default="torch,onnxruntime", help="torch,onnxruntime")
    p.add_argument("--no-int8", action="store_true", help="skip the int8 (dynamic) ONNX models")
    p.add_argument("--batches", default="1,32", help="image batch sizes (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--max-time-s", type=float, default=30.0, help="cap per measurement (at least 3 calls timed)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: library defaults)")
    p.add_argument("--gallery-size", type=int, default=10_000)
    p.add_argument("--precisions", default=None, help="PyTorch precisions to keep, e.g. fp32,fp16 (CUDA)")
    p.add_argument("--compile", action="store_true", help="add torch.compile rows")
    p.add_argument("--work", type=Path, default=None, help="keep / reuse the artifacts here (default: a temp dir)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")

    from tbps_compress.bench import parse_runtimes, run_bench
    from tbps_compress.bench.report import markdown_table, print_table, write_report
    from tbps_compress.bench.zoo import random_artifacts

    runtimes = parse_runtimes(args.runtimes)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="shape-latency-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        forms = ("torch",) + (("onnx",) + (() if args.no_int8 else ("int8",)) if "onnxruntime" in runtimes else ())
        arts = random_artifacts(work, models, forms)
        torch_arts = [a["torch"] for a in arts.values()]
        onnx_arts = [a[f] for a in arts.values() for f in ("onnx", "int8") if f in a]
        common = dict(device=args.device, batches=args.batches, warmup=args.warmup, reps=args.reps,
                      threads=args.threads, gallery_size=args.gallery_size, max_time_s=args.max_time_s,
                      compile=args.compile,
                      precisions=args.precisions.split(",") if args.precisions else None)
        meta: dict = {}
        rows = []
        # Each artifact only in the runtimes that can run it: no "skipped: ONNX artifact" noise in this table.
        if "torch" in runtimes:
            rows += run_bench(torch_arts, None, runtimes=["torch"], meta=meta, **common)
        if onnx_arts:
            rows += run_bench(onnx_arts, None, runtimes=["onnxruntime"], meta=meta, **common)
    meta.update(runtimes=runtimes, artifacts=models, note="random weights: latency only, no retrieval",
                elapsed_s=round(time.perf_counter() - start, 1))
    write_report(rows, meta, args.out, force=args.force)
    print_table(rows, title=f"Shape latency on {args.device} (random weights)")
    print(markdown_table(rows, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
