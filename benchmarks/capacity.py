"""Capacity check and learning curves: a teacher recipe trained with its own model and with a model of a quarter of
its non-embedding parameters, same recipe, same steps, several seeds.

    python benchmarks/capacity.py --recipe recipes/teacher/synth-teacher.yaml --models synth-teacher synth-quarter \
        --seeds 0 1 --out benchmarks/results/capacity-benchmark --reuse synth-teacher:0=runs/synth/teacher \
        --parallel 2

Each run is `tbps-compress train RECIPE --set model.config=MODEL --set seed=SEED --set output=OUT/MODEL-sSEED`;
finished runs (and runs named by --reuse, e.g. the demo's own teacher) are reused. With --parallel N, N runs train
at once with one thread each (on a 2-core CPU two one-thread runs get more done than one two-thread run). Writes
capacity.md, capacity.json and curves.png (R@1 on the recipe's learning-curve split against training time, from
each run's curve.csv).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def _run(recipe: Path, out: Path, model: str, seed: int, threads: int, sets: list[str]) -> float:
    cmd = [sys.executable, "-m", "tbps_compress.cli", "train", str(recipe), "--force",
           "--set", f"output={out}", "--set", f"model.config={model}", "--set", f"seed={seed}"]
    for s in sets:
        cmd += ["--set", s]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t0 = time.time()
    with open(out.parent / f"{out.name}.log", "w") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, env=env)
    return time.time() - t0


def _curve(folder: Path) -> list[dict[str, float]]:
    path = folder / "curve.csv"
    if not path.exists():
        return []
    with open(path, encoding="utf-8") as f:
        return [{k: float(v) for k, v in row.items() if k != "split"} for row in csv.DictReader(f)]


def _mean_sd(vals: list[float]) -> str:
    sd = statistics.pstdev(vals) if len(vals) > 1 else 0.0
    return f"{statistics.mean(vals):.2f} ± {sd:.2f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", type=Path, default=Path("recipes/teacher/synth-teacher.yaml"))
    ap.add_argument("--models", nargs=2, default=["synth-teacher", "synth-quarter"], metavar=("FULL", "QUARTER"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--full-seeds", type=int, nargs="+", default=None,
                    help="seeds of the full model (default: --seeds), e.g. only the seed of an existing reference "
                         "run when its second seed costs more than this machine has")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/capacity-benchmark"))
    ap.add_argument("--reuse", nargs="*", default=[], metavar="MODEL:SEED=FOLDER",
                    help="an existing artifact trained by the same recipe for that model and seed")
    ap.add_argument("--parallel", type=int, default=1, help="runs trained at once (one thread each when > 1)")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="extra recipe override for every run")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    reuse: dict[tuple[str, int], Path] = {}
    for item in args.reuse:
        try:
            key, folder = item.split("=", 1)
            model, seed = key.rsplit(":", 1)
            reuse[(model, int(seed))] = Path(folder)
        except ValueError:
            ap.error(f"--reuse {item!r}: expected MODEL:SEED=FOLDER")
    jobs = []
    folders: dict[tuple[str, int], Path] = {}
    for model in args.models:
        for seed in (args.full_seeds or args.seeds) if model == args.models[0] else args.seeds:
            folder = reuse.get((model, seed), args.out / f"{model}-s{seed}")
            folders[(model, seed)] = folder
            if not (folder / "metrics.json").exists():
                if (model, seed) in reuse:
                    ap.error(f"--reuse {model}:{seed}={folder}: no metrics.json there (not a finished run)")
                jobs.append((model, seed, folder))
    threads = 1 if args.parallel > 1 else int(os.environ.get("OMP_NUM_THREADS", "0") or os.cpu_count() or 1)
    with ThreadPoolExecutor(max(1, args.parallel)) as pool:
        futures = {pool.submit(_run, args.recipe, f, m, s, threads, args.sets): (m, s) for m, s, f in jobs}
        for fut, (m, s) in futures.items():
            print(f"  trained {m} seed {s} in {fut.result():.0f} s", flush=True)
    rows = []
    for (model, seed), folder in folders.items():
        m = json.loads((folder / "metrics.json").read_text())
        rows.append({"model": model, "seed": seed, "folder": str(folder),
                     **{k: m["test"][k] for k in ("R1", "R5", "mAP", "mINP")},
                     "train_seconds": m.get("train_seconds"), "steps": m.get("steps"),
                     "non_embedding_params": m["parameters"]["non_embedding"], "curve": _curve(folder)})
    full, quarter = args.models
    by = {name: [r for r in rows if r["model"] == name] for name in args.models}
    ratio = by[quarter][0]["non_embedding_params"] / by[full][0]["non_embedding_params"]
    lines = [f"# Capacity: {full} vs {quarter} ({100 * ratio:.1f}% of its non-embedding parameters)", "",
             f"Recipe `{args.recipe}`{' with ' + ', '.join(args.sets) if args.sets else ''}, seeds "
             f"{', '.join(map(str, args.seeds))}"
             + (f" ({full}: {', '.join(map(str, args.full_seeds))})" if args.full_seeds else "")
             + "; test split, text-to-image. Mean ± spread (population s.d.) over seeds.", "",
             "| model | non-emb. params | seeds | R@1 | R@5 | mAP | mINP | train s (mean) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name in args.models:
        rs = by[name]
        lines.append(f"| {name} | {rs[0]['non_embedding_params'] / 1e6:.2f} M | {len(rs)} | "
                     f"{_mean_sd([r['R1'] for r in rs])} | {_mean_sd([r['R5'] for r in rs])} | "
                     f"{_mean_sd([r['mAP'] for r in rs])} | {_mean_sd([r['mINP'] for r in rs])} | "
                     f"{statistics.mean(r['train_seconds'] or 0 for r in rs):.0f} |")
    gap = statistics.mean(r["R1"] for r in by[full]) - statistics.mean(r["R1"] for r in by[quarter])
    lines += ["", f"R@1 gap ({full} minus {quarter}): {gap:+.2f} points.", "",
              "| model | seed | R@1 | mAP | steps | train s | folder |", "|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['seed']} | {r['R1']:.2f} | {r['mAP']:.2f} | {r['steps']} | "
                     f"{r['train_seconds'] or 0:.0f} | {r['folder']} |")
    curves = [r for r in rows if r["curve"]]
    if curves:
        lines += ["", "Learning curves (R@1 on the curve split; training seconds exclude the curve's evaluations):", "",
                  "| model | seed | " + " | ".join(f"step {int(p['step'])}" for p in curves[0]["curve"]) + " |",
                  "|---|---:|" + "---:|" * len(curves[0]["curve"])]
        for r in curves:
            lines.append(f"| {r['model']} | {r['seed']} | " + " | ".join(
                f"{p['R1']:.2f} ({p['train_seconds']:.0f} s)" for p in r["curve"]) + " |")
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        for r in curves:
            ax.plot([p["train_seconds"] / 60 for p in r["curve"]], [p["R1"] for p in r["curve"]], marker="o",
                    label=f"{r['model']} seed {r['seed']}", linestyle="-" if r["model"] == full else "--")
        ax.set_xlabel("training time (minutes, 2-core CPU)")
        ax.set_ylabel("test R@1 (%)")
        ax.set_title("Learning curves on the fixed SynthPedes test split")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.out / "curves.png", dpi=120)
        plt.close(fig)
    text = "\n".join(lines) + "\n"
    (args.out / "capacity.md").write_text(text)
    (args.out / "capacity.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
