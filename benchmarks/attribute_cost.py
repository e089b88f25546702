"""Per-attribute cost of compression: which attribute families each compressed model loses first, against its teacher.

Each artifact (PyTorch or ONNX) is diagnosed by the ordinary command (``tbps-compress diagnose ART --data DATA
--out OUT/NAME.diagnosis.json``; finished diagnoses are reused) and compared with the reference artifact's: R@1,
mAP, and per attribute family the AUC change (x100) against the reference. Writes ``OUT/attribute_cost.md``,
``OUT/attribute_cost.json`` and ``OUT/attribute_cost.png`` (one bar group per family).

    python -m benchmarks.attribute_cost --data data/synthpedes --out benchmarks/results/attribute_cost \\
        --reference teacher=runs/synth-ref/hybrid-e2 student=runs/.../inherit_kd-s0 int8=runs/.../dynamic-image+text
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from benchmarks.quant_study import _aucs, _cli, _queries


def _named(items: list[str]) -> list[tuple[str, Path]]:
    out = []
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"error: {item!r}: give NAME=ARTIFACT (e.g. student=runs/synth/student)")
        out.append((name, Path(path)))
    return out


def diagnose(name: str, art: Path, data: Path, out: Path, threads: int) -> dict[str, Any]:
    path = out / f"{name}.diagnosis.json"
    if not path.is_file():
        _cli("diagnose", str(art), "--data", str(data), "--out", str(path), "--device", "cpu", threads=threads)
    return json.loads(path.read_text())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, type=Path, help="SynthPedes root (test split with ground truth)")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--reference", required=True, help="NAME=ARTIFACT the others are compared with (the teacher)")
    ap.add_argument("artifacts", nargs="+", help="NAME=ARTIFACT of each compressed model")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    from tbps_compress.io_utils import write_text_atomic

    ref_name, ref_path = _named([args.reference])[0]
    models = _named(args.artifacts)
    for _, p in [(ref_name, ref_path), *models]:
        if not (p / "lineage.json").is_file():
            raise SystemExit(f"error: {p}: not an artifact folder (no lineage.json)")
    args.out.mkdir(parents=True, exist_ok=True)
    ref = diagnose(ref_name, ref_path, args.data, args.out, args.threads)
    ref_auc = _aucs(ref)
    n = _queries(args.data)
    r1 = ref["metrics"]["R1"]
    se = 100.0 * math.sqrt(max(r1 / 100 * (1 - r1 / 100), 1e-12) / n)
    rows = []
    for name, art in models:
        d = diagnose(name, art, args.data, args.out, args.threads)
        aucs = _aucs(d)
        rows.append({"name": name, "artifact": str(art), "R1": round(d["metrics"]["R1"], 2),
                     "mAP": round(d["metrics"]["mAP"], 2),
                     "auc": {f: round(100 * v, 2) for f, v in aucs.items()},
                     "auc_delta": {f: round(100 * (aucs[f] - ref_auc[f]), 2) for f in ref_auc if f in aucs}})
    summary = {"reference": {"name": ref_name, "artifact": str(ref_path), "R1": round(r1, 2),
                             "mAP": round(ref["metrics"]["mAP"], 2),
                             "auc": {f: round(100 * v, 2) for f, v in ref_auc.items()}},
               "queries": n, "R1_se": round(se, 3), "rows": rows}
    write_text_atomic(args.out / "attribute_cost.json", json.dumps(summary, indent=2) + "\n", force=True)
    text = markdown(summary)
    write_text_atomic(args.out / "attribute_cost.md", text, force=True)
    plot(summary, args.out / "attribute_cost.png")
    print(text)
    return 0


def markdown(summary: dict[str, Any]) -> str:
    ref, rows = summary["reference"], summary["rows"]
    fams = [f for f in ref["auc"] if f != "overall"] + (["overall"] if "overall" in ref["auc"] else [])
    lines = ["# Per-attribute cost of compression", "",
             f"Reference `{ref['artifact']}` ({ref['name']}): R@1 {ref['R1']:.2f}, mAP {ref['mAP']:.2f}; test split, "
             f"{summary['queries']} queries, standard error of one R@1 {summary['R1_se']:.2f}.", "",
             "| model | R@1 | mAP |", "|---|---:|---:|",
             f"| {ref['name']} (reference) | {ref['R1']:.2f} | {ref['mAP']:.2f} |"]
    lines += [f"| {r['name']} | {r['R1']:.2f} | {r['mAP']:.2f} |" for r in rows]
    lines += ["", "Per attribute family: the reference's AUC (x100) and each model's change against it (negative = "
              "that attribute is separated less well):", "",
              "| family | " + ref["name"] + " | " + " | ".join(r["name"] for r in rows) + " |",
              "|---|---:|" + "---:|" * len(rows)]
    for f in fams:
        lines.append(f"| {f} | {ref['auc'][f]:.1f} | "
                     + " | ".join(f"{r['auc_delta'].get(f, float('nan')):+.2f}" for r in rows) + " |")
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, Any], path: Path) -> None:
    from tbps_compress.bench.report import grouped_bars

    fams = [f for f in summary["reference"]["auc"] if f != "overall"]
    grouped_bars(path, fams, {r["name"]: [r["auc_delta"].get(f, 0.0) for f in fams] for r in summary["rows"]},
                 f"AUC change vs {summary['reference']['name']} (x100)")


if __name__ == "__main__":
    sys.exit(main())
