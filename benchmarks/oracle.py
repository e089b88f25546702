"""Attribute-oracle ceilings of SynthPedes datasets: the retrieval their captions' attributes alone allow.

For each dataset root (with its ``synth_truth.json``), :func:`tbps_compress.retrieval.diagnosis.oracle_table`
scores the split with the naive-Bayes attribute oracle for the presets ``all``, ``coarse``, ``colours`` and
``upper_color``; one markdown table per dataset goes to ``--out`` and the full results to the JSON next to it.

    python benchmarks/oracle.py /data/synthpedes-500 --out benchmarks/results/oracle/oracle.md
    python benchmarks/oracle.py ROOT_A ROOT_B --split val --out /tmp/oracle.md --force
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from tbps_compress.io_utils import write_text_atomic


def markdown(root: Path, result: dict[str, Any]) -> str:
    """One dataset's section: retrieval per preset, then the all-families oracle's per-attribute AUCs."""
    lines = [f"## {root} ({result['split']}: {result['queries']} queries, {result['images']} images, "
             f"{result['identities']} identities)", "",
             "| preset | families | R@1 | R@5 | R@10 | mAP | R@1 s.e. |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, m in result["presets"].items():
        lines.append(f"| {name} | {len(m['families'])} | "
                     + " | ".join(f"{m[k]:.2f}" for k in ("R1", "R5", "R10", "mAP", "R1_se")) + " |")
    if result["attributes"]:
        lines += ["", "| family | queries | pairs | oracle AUC |", "|---|---:|---:|---:|"]
        for fam, row in result["attributes"].items():
            auc = "-" if row["auc"] is None else f"{row['auc']:.3f}"
            lines.append(f"| {fam} | {row['queries']} | {row['pairs']} | {auc} |")
    return "\n".join(lines) + "\n"



def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("roots", nargs="+", type=Path, help="SynthPedes dataset roots (with synth_truth.json).")
    parser.add_argument("--out", type=Path, required=True, help="Markdown file to write (JSON goes next to it).")
    parser.add_argument("--split", default="test", help="Split to score (default: test).")
    parser.add_argument("--force", action="store_true", help="Replace existing outputs.")
    args = parser.parse_args(argv)

    from tbps_compress.data.synthpedes import load_truth
    from tbps_compress.errors import UserError
    from tbps_compress.retrieval.diagnosis import TRUTH_FILE, oracle_table, truth_splits

    out_md: Path = args.out
    out_json = out_md.with_suffix(".json")
    existing = [str(p) for p in (out_md, out_json) if p.exists()]
    if existing and not args.force:
        print(f"error: {', '.join(existing)}: exists; pass --force to replace or choose another --out", file=sys.stderr)
        return 2
    try:
        sections, results = [], {}
        for root in args.roots:
            truth = load_truth(root)
            if args.split not in truth_splits(truth):
                raise UserError(f"{root / TRUTH_FILE}: no entries in split {args.split!r} (splits present: "
                                f"{', '.join(truth_splits(truth))}); pass --split with one of them")
            result = oracle_table(truth, args.split)
            results[str(root)] = result
            sections.append(markdown(root, result))
            print(f"{root}: " + ", ".join(f"{name} R@1 {m['R1']:.2f}" for name, m in result["presets"].items()))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out_md.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_md, force=True, text="# Attribute-oracle ceilings\n\n" + "\n".join(sections))
    write_text_atomic(out_json, force=True, text=json.dumps(results, indent=2) + "\n")
    print(f"wrote {out_md} and {out_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
