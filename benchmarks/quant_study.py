"""Quantisation study: dynamic and static int8 of each tower and of both, against the fp32 export, with the
per-attribute diagnosis of what each loses.

Every variant is made by the ordinary commands, so the study measures what a user gets:

    tbps-compress export --onnx TEACHER --out OUT/runs/fp32
    tbps-compress quantize OUT/runs/fp32 --mode dynamic|static --towers image|text|image,text \\
        [--calib-data DATA] --out OUT/runs/MODE-TOWERS
    tbps-compress diagnose OUT/runs/VARIANT --data DATA --out OUT/runs/VARIANT.diagnosis.json

(finished variants are reused when the study is re-run). Each row gives the test-split R@1 and mAP, R@1 kept
against fp32, and the binomial standard error of R@1 over the split's queries; the difference to fp32 counts only
beyond twice the standard error of a difference of two such estimates (``sqrt(2)`` times one, a conservative bound
for paired runs on the same queries). The per-attribute table lists each family's AUC change against fp32 (points
of AUC x 100) for the both-towers variants; the plot shows the same. Writes ``OUT/quant_study.md``,
``OUT/quant_study.json`` and ``OUT/quant_attributes.png``.

    python benchmarks/quant_study.py --teacher runs/synth-ref/hybrid-e2 --data data/synthpedes \\
        --out benchmarks/results/quant_study
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

VARIANTS = [("dynamic", "image"), ("dynamic", "text"), ("dynamic", "image,text"),
            ("static", "image"), ("static", "text"), ("static", "image,text")]


def _cli(*args: str, threads: int) -> None:
    cmd = [sys.executable, "-m", "tbps_compress.cli", *args]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr.strip()[-2000:]}")


def _variant_dir(out: Path, mode: str, towers: str) -> Path:
    return out / "runs" / f"{mode}-{towers.replace(',', '+')}"


def _diagnose(art: Path, data: Path, threads: int) -> dict[str, Any]:
    path = art.parent / f"{art.name}.diagnosis.json"
    if not path.is_file():
        _cli("diagnose", str(art), "--data", str(data), "--out", str(path), "--device", "cpu", threads=threads)
    return json.loads(path.read_text())


def _aucs(diag: dict[str, Any]) -> dict[str, float]:
    return {f: v["auc"] for f, v in diag["attributes"].items() if isinstance(v, dict) and v.get("auc") is not None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", required=True, type=Path, help="PyTorch artifact to export and quantise")
    ap.add_argument("--data", required=True, type=Path, help="SynthPedes root (test split, ground truth, calibration)")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--calib-size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    from tbps_compress.io_utils import write_text_atomic

    out = args.out
    (out / "runs").mkdir(parents=True, exist_ok=True)
    fp32 = out / "runs" / "fp32"
    if not (fp32 / "lineage.json").is_file():
        _cli("export", "--onnx", str(args.teacher), "--out", str(fp32), "--force", threads=args.threads)
    rows: list[dict[str, Any]] = []
    base = _diagnose(fp32, args.data, args.threads)
    queries = int(base["attributes"].get("overall", {}).get("queries") or 0) or None
    variants: list[tuple[str, str, Path]] = [("fp32", "-", fp32)]
    for mode, towers in VARIANTS:
        art = _variant_dir(out, mode, towers)
        if not (art / "lineage.json").is_file():
            extra = ["--calib-data", str(args.data), "--calib-size", str(args.calib_size)] if mode == "static" else []
            _cli("quantize", str(fp32), "--mode", mode, "--towers", towers, "--out", str(art), "--force", *extra,
                 threads=args.threads)
        variants.append((mode, towers, art))
    base_r1 = base["metrics"]["R1"]
    n_queries = _queries(args.data)
    se = 100.0 * math.sqrt(max(base_r1 / 100 * (1 - base_r1 / 100), 1e-12) / n_queries)
    base_auc = _aucs(base)
    for mode, towers, art in variants:
        diag = base if art == fp32 else _diagnose(art, args.data, args.threads)
        m = diag["metrics"]
        delta = m["R1"] - base_r1
        aucs = _aucs(diag)
        rows.append({"mode": mode, "towers": towers, "artifact": str(art), "R1": round(m["R1"], 2),
                     "mAP": round(m["mAP"], 2), "R1_kept": round(100 * m["R1"] / base_r1, 1) if base_r1 else None,
                     "delta_R1": round(delta, 2), "beyond_noise": abs(delta) > 2 * math.sqrt(2) * se,
                     "auc_delta": {f: round(100 * (aucs[f] - base_auc[f]), 2) for f in base_auc if f in aucs},
                     "size_mb": round(sum(p.stat().st_size for p in art.glob("*.onnx")) / 2**20, 2)})
    summary = {"teacher": str(args.teacher), "queries": n_queries, "R1_se": round(se, 3), "rows": rows,
               "attribute_queries": queries}
    write_text_atomic(out / "quant_study.json", json.dumps(summary, indent=2) + "\n", force=True)
    text = _markdown(summary, base_auc)
    write_text_atomic(out / "quant_study.md", text, force=True)
    _plot(rows, out / "quant_attributes.png")
    print(text)
    return 0


def _queries(data: Path) -> int:
    from tbps_compress.data.readers import load_dataset

    return sum(len(r.captions) for r in load_dataset(data).split("test"))


def _markdown(summary: dict[str, Any], base_auc: dict[str, float]) -> str:
    se = summary["R1_se"]
    lines = ["# Quantisation study", "",
             f"Source `{summary['teacher']}` exported to ONNX (fp32), then quantised by `tbps-compress quantize`; "
             f"test split, {summary['queries']} queries; standard error of one R@1 {se:.2f}, so a difference to fp32 "
             f"counts beyond {2 * math.sqrt(2) * se:.2f} points. CPU execution provider.", "",
             "| mode | towers | R@1 | mAP | R@1 kept | R@1 - fp32 | beyond noise | ONNX MB |",
             "|---|---|---:|---:|---:|---:|---|---:|"]
    for r in summary["rows"]:
        lines.append(f"| {r['mode']} | {r['towers']} | {r['R1']:.2f} | {r['mAP']:.2f} | {r['R1_kept']}% | "
                     f"{r['delta_R1']:+.2f} | {'yes' if r['beyond_noise'] else 'no (tie)'} | {r['size_mb']} |")
    both = [r for r in summary["rows"] if r["towers"] == "image,text"]
    fams = [f for f in base_auc if f != "overall"] + (["overall"] if "overall" in base_auc else [])
    lines += ["", "Per-attribute AUC change against fp32 (x100; negative = the quantised model separates that "
              "attribute less well):", "",
              "| family | fp32 AUC | " + " | ".join(f"{r['mode']} both" for r in both) + " |",
              "|---|---:|" + "---:|" * len(both)]
    for f in fams:
        lines.append(f"| {f} | {100 * base_auc[f]:.1f} | " + " | ".join(f"{r['auc_delta'].get(f, float('nan')):+.2f}"
                                                                      for r in both) + " |")
    return "\n".join(lines) + "\n"


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    from tbps_compress.bench.report import grouped_bars

    both = [r for r in rows if r["towers"] == "image,text"]
    if not both:
        return
    fams = [f for f in both[0]["auc_delta"] if f != "overall"]
    grouped_bars(path, fams, {f"{r['mode']} int8, both towers": [r["auc_delta"][f] for f in fams] for r in both},
                 "AUC change vs fp32 (x100)")


if __name__ == "__main__":
    sys.exit(main())
