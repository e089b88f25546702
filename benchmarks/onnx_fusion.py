"""ONNX operator fusion on this CPU: the demo teacher and student exports, fp32 unfused / fp32 fused / int8
(unfused and fused), image tower at batch 32 and text tower at batch 1, one intra-op thread.

Fused graphs are made with the product's code (:func:`tbps_compress.export.fusion.fuse_tower`, what
``export --optimize`` runs) from the exports in ``runs/synth`` and written as artifacts under ``--work``; int8 is
``quantize_artifact(mode="dynamic")`` (an int8 artifact already in ``runs/synth`` is used for the unfused student).
Timings use :func:`tbps_compress.bench.latency.interleaved` (the variants of one tower in turns, so load drift hits
them alike) and the share of the machine's matrix-product rate uses MACs from
:func:`tbps_compress.models.factory.count_macs` against a 1-thread onnxruntime MatMul (and torch.mm) measured in the
same run. Each fused / int8 variant's max abs difference (fused) or min cosine (int8) against fp32 unfused is
checked on the timing inputs.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/onnx_fusion.py --out benchmarks/results/onnx_fusion
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import numpy as np

MODELS = {"teacher": "runs/synth/teacher-onnx", "student": "runs/synth/student-onnx"}
INT8 = {"student": "runs/synth/student-int8"}  # used when present (dynamic int8 of the unfused student export)
BATCH = {"image": 32, "text": 1}


def fused_artifact(src: Path, dst: Path) -> tuple[Path, dict]:
    """An export artifact at ``dst`` holding ``src``'s towers fused; returns it and the fusion info per tower."""
    from tbps_compress.artifacts import write_artifact
    from tbps_compress.export.fusion import fuse_tower
    from tbps_compress.export.onnx_export import IMAGE_FILE, TEXT_FILE, load_onnx, save_onnx

    infos = {}
    with write_artifact(dst, stage="export", parent=src, force=True) as tmp:
        for f in src.iterdir():
            if f.is_file() and f.name != "lineage.json":
                shutil.copyfile(f, tmp / f.name)
        for tower, name in (("image", IMAGE_FILE), ("text", TEXT_FILE)):
            fused, info = fuse_tower(load_onnx(src / name))
            save_onnx(fused, tmp / name)
            infos[tower] = info
    return dst, infos


def ort_matmul(n: int = 512) -> tuple[object, float]:
    """A call running one n x n x n float32 MatMul in onnxruntime on one thread (MLAS: the kernels the towers run
    on) and its FLOPs."""
    import onnxruntime as ort
    from onnx import TensorProto, helper


    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "mm",
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [n, n]) for x in "ab"],
                              [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {"a": rng.standard_normal((n, n), dtype=np.float32), "b": rng.standard_normal((n, n), dtype=np.float32)}
    return (lambda: session.run(None, feeds)), 2.0 * n**3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/onnx_fusion"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/onnx_fusion_work"))
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--budget-s", type=float, default=120.0, help="time budget per tower's interleaved timing")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    log = logging.getLogger("onnx_fusion")

    from tbps_compress.artifacts import open_artifact
    from tbps_compress.bench.latency import environment, interleaved, matmul_ceiling, torch_threads
    from tbps_compress.export.parity import cosine_rows, make_session, max_abs_diff, random_images, random_tokens
    from tbps_compress.export.quantize import quantize_artifact
    from tbps_compress.models.factory import count_macs

    args.work.mkdir(parents=True, exist_ok=True)
    with torch_threads(1):
        torch_ceiling = matmul_ceiling("cpu", "fp32", n=1024)
    matmul_fn, matmul_flops = ort_matmul()
    log.info("1-thread torch.mm (before the timings): %.1f GFLOP/s", torch_ceiling["gflops"])
    ceilings: dict[str, float] = {}

    rows, fusion = [], {}
    for model, src in MODELS.items():
        src = Path(src)
        art = open_artifact(src)
        macs = count_macs(art.model_config)
        fused, infos = fused_artifact(src, args.work / f"{model}-fused")
        keys = ("ops_before", "ops_after", "attention", "ort")
        fusion[model] = {t: {k: i[k] for k in keys} for t, i in infos.items()}
        int8 = Path(INT8[model]) if model in INT8 and (Path(INT8[model]) / "lineage.json").is_file() else None
        if int8 is None:
            int8 = args.work / f"{model}-int8"
            quantize_artifact(src, int8, mode="dynamic", force=True)
        int8_fused = args.work / f"{model}-int8-fused"
        quantize_artifact(fused, int8_fused, mode="dynamic", force=True)
        variants = {"fp32": src, "fp32-fused": fused, "int8": int8, "int8-fused": int8_fused}
        cfg = art.model_config
        for tower in ("image", "text"):
            n = BATCH[tower]
            if tower == "image":
                x = random_images(n, cfg["vision_cfg"]["image_size"], seed=1)
            else:
                x = random_tokens(n, cfg["text_cfg"]["context_length"], seed=1)
            sessions = {v: make_session(p / f"{tower}_encoder.onnx", threads=1) for v, p in variants.items()}
            outs = {v: s.run(["embedding"], {tower: x})[0] for v, s in sessions.items()}
            feeds = {tower: x}
            fns = {v: (lambda s=s, f=feeds: s.run(["embedding"], f)) for v, s in sessions.items()}
            fns["matmul"] = matmul_fn  # the machine's rate measured in the same turns, under the same load
            timings = interleaved(fns, warmup=3, rounds=args.rounds, deadline=time.perf_counter() + args.budget_s)
            ceiling = matmul_flops / (timings.pop("matmul").p50 / 1000.0) / 1e9
            ceilings[f"{model}/{tower}"] = round(ceiling, 2)
            base = timings["fp32"].p50
            mac = macs["vision" if tower == "image" else "text"] * n
            for v, t in timings.items():
                gflops = 2.0 * mac / (t.p50 / 1000.0) / 1e9
                rows.append({
                    "model": model, "tower": tower, "batch": n, "variant": v, "artifact": str(variants[v]),
                    "p50_ms": round(t.p50, 3), "p90_ms": round(t.p90, 3), "timed": t.n,
                    "speedup_vs_fp32": round(base / t.p50, 3), "gflops": round(gflops, 2),
                    "pct_of_matmul": round(100.0 * gflops / ceiling, 1), "matmul_gflops": round(ceiling, 2),
                    "max_abs_diff_vs_fp32": max_abs_diff(outs[v], outs["fp32"]),
                    "min_cosine_vs_fp32": float(cosine_rows(outs[v], outs["fp32"]).min()),
                    "nodes": sum(fusion[model][tower]["ops_after" if "fused" in v else "ops_before"].values())
                    if v.startswith("fp32") else None,
                })
                log.info("%s %s b%d %-10s p50 %8.2f ms  x%.2f  %5.1f%% of matmul", model, tower, n, v, t.p50,
                         base / t.p50, rows[-1]["pct_of_matmul"])
            bad = [r for r in rows[-4:] if (r["variant"] == "fp32-fused" and not r["max_abs_diff_vs_fp32"] < 1e-4)
                   or r["min_cosine_vs_fp32"] < 0.99]
            if bad:
                log.error("outputs differ from fp32: %s", bad)
                return 1

    env = environment()
    meta = {"threads": 1, "note": "measured under load: the other of the 2 cores ran a training; compare variants "
                                  "by their ratio (interleaved timing in one process), not across runs",
            "matmul_gflops": {"onnxruntime_per_tower": ceilings, "torch_before": round(torch_ceiling["gflops"], 2),
                              "method": "onnxruntime 512^3 float32 MatMul, 1 thread, p50 of the same interleaved "
                                        "turns as the tower's variants; torch.mm 1024^3 best of 5 before"},
            "env": env, "rounds": args.rounds, "fusion": fusion}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "onnx_fusion.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2), encoding="utf-8")
    lines = [f"# ONNX fusion, 1 thread, {env['cpu']} (onnxruntime {env['onnxruntime']})", "",
             meta["note"] + ".", "",
             "Matmul rate: a 1-thread onnxruntime 512^3 fp32 MatMul timed in the same interleaved turns as each "
             "tower's variants (p50, GFLOP/s): " + ", ".join(f"{k} {v:.1f}" for k, v in ceilings.items()) +
             f"; torch.mm 1024^3 before the timings: {torch_ceiling['gflops']:.1f}. The share is of that tower's "
             "rate (int8 rows too).", "",
             "| model | tower | batch | variant | p50 ms | p90 ms | vs fp32 | GFLOP/s | % of matmul | fp32 nodes "
             "| max abs diff / min cos vs fp32 |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        check = (f"{r['max_abs_diff_vs_fp32']:.1e}" if r["variant"].startswith("fp32")
                 else f"cos {r['min_cosine_vs_fp32']:.5f}")
        lines.append(f"| {r['model']} | {r['tower']} | {r['batch']} | {r['variant']} | {r['p50_ms']:.2f} | "
                     f"{r['p90_ms']:.2f} | x{r['speedup_vs_fp32']:.2f} | {r['gflops']:.1f} | {r['pct_of_matmul']:.1f} "
                     f"| {r['nodes'] if r['nodes'] is not None else ''} | {check} |")
    lines += ["", "Fused attention blocks (heads per block): " + "; ".join(
        f"{m} {t}: {f[t]['attention']['heads']}" for m, f in fusion.items() for t in f)]
    (args.out / "onnx_fusion.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
