"""Teacher learning curves side by side: test R@1 against training time, one line per run.

    python -m benchmarks.teacher_curves --out benchmarks/results/teacher_ground/curves \
        "ViT demo teacher=benchmarks/results/teacher_ground/demo-teacher-curve.csv" \
        "stripe-gru reference=runs/synth/reference"

Each run is LABEL=SOURCE, where SOURCE is a ``curve.csv`` (the trainer's learning curve: ``step``,
``train_seconds``, ``R1``, ...) or an artifact folder, whose ``curve.csv`` is read with the final test point of its
``metrics.json`` appended (the trainer evaluates the test split once more after the last step). Writes
``curves.png`` and ``curves.md`` (every point) and, for artifact folders, ``LABEL-curve.csv`` with the final point,
so the figure can be redrawn from committed files.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
from pathlib import Path

FIELDS = ("step", "train_seconds", "R1", "R5", "R10", "mAP")


def read_curve(source: Path) -> list[dict[str, float]]:
    """The points of a curve.csv, or of an artifact folder's curve.csv plus its final test metrics."""
    path = source / "curve.csv" if source.is_dir() else source
    if not path.is_file():
        raise SystemExit(f"error: {path}: no learning curve (curve.csv) there; train with eval.curve_every_steps")
    with open(path, encoding="utf-8") as f:
        points = [{k: float(row[k]) for k in FIELDS} for row in csv.DictReader(f)]
    if source.is_dir():
        metrics = json.loads((source / "metrics.json").read_text(encoding="utf-8"))
        test = metrics["test"]
        final = {"step": float(metrics["steps"]), "train_seconds": float(metrics["train_seconds"]),
                 **{k: float(test[k]) for k in ("R1", "R5", "R10", "mAP")}}
        if not points or final["step"] > points[-1]["step"]:
            points.append(final)
    return points


def _slug(label: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", metavar="LABEL=SOURCE")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    curves: dict[str, list[dict[str, float]]] = {}
    for spec in args.runs:
        label, sep, src = spec.partition("=")
        if not sep or not label or not src:
            raise SystemExit(f"error: run {spec!r}: expected LABEL=SOURCE (a curve.csv or an artifact folder)")
        curves[label] = read_curve(Path(src))
    args.out.mkdir(parents=True, exist_ok=True)
    for spec in args.runs:
        label, _, src = spec.partition("=")
        if Path(src).is_dir():
            with open(args.out / f"{_slug(label)}-curve.csv", "w", newline="", encoding="utf-8") as f:
                w = csv.DictWriter(f, fieldnames=FIELDS)
                w.writeheader()
                w.writerows(curves[label])
    lines = ["| run | step | training min | R@1 | R@5 | R@10 | mAP |", "|---|---:|---:|---:|---:|---:|---:|"]
    for label, pts in curves.items():
        for p in pts:
            lines.append(f"| {label} | {int(p['step'])} | {p['train_seconds'] / 60:.1f} | {p['R1']:.2f} | "
                         f"{p['R5']:.2f} | {p['R10']:.2f} | {p['mAP']:.2f} |")
    (args.out / "curves.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, pts in curves.items():
        ax.plot([p["train_seconds"] / 60 for p in pts], [p["R1"] for p in pts], marker="o", label=label)
    ax.set_xlabel("training time (minutes, this 2-core CPU)")
    ax.set_ylabel("test R@1 (fixed benchmark split)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out / "curves.png", dpi=120)
    plt.close(fig)
    print(f"wrote {args.out / 'curves.png'} and {args.out / 'curves.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
