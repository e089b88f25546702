"""Pruning criteria, one-shot and without recovery: does an importance criterion beat random choice?

For each fraction of the width removed (``--ratios``, default 0.2 0.4 0.6: the residual width and every MLP hidden
size of both towers cut by that fraction, heads and depth kept) and each criterion (``--criteria``, default magnitude,
taylor, lamp and the global variants of magnitude and lamp; plus ``random`` with ``--random-seeds`` seeds), one
ordinary ``run_prune`` with ``prune.recovery_steps: 0``, one round and no BatchNorm recalibration (``--set
prune.bn_recalibration=N`` turns it on) writes an artifact whose ``metrics.json`` holds
its test-split metrics. Finished runs under ``OUT/runs/`` are reused when the study is re-run. A criterion written
``NAME@global`` ranks the MLP units across the blocks of a tower (``prune.global_pruning: true``) instead of cutting
each block by the same fraction: LAMP rescales magnitudes within each layer, so with per-block fractions it keeps
exactly the units magnitude keeps, and only the global variant tells them apart.

A criterion is worth its name when it beats the mean of the random runs by more than three times the noise, the
noise being the larger of the random runs' seed spread (sample standard deviation) and the binomial standard error
of one R@1 estimate over the split's queries. Writes ``OUT/prune_criteria.md``, ``OUT/prune_criteria.json`` and
``OUT/prune_criteria.png`` (R@1 against the fraction removed, random as mean and spread).

    python benchmarks/prune_criteria.py --teacher runs/synth-ref/hybrid-e2 --recipe recipes/prune/synth-teacher.yaml \\
        --out benchmarks/results/prune_criteria
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger("prune_criteria")


def run_name(criterion: str, ratio: float, seed: int) -> str:
    return f"{criterion}-r{round(ratio * 100):02d}-s{seed}"


def one_shot(args: argparse.Namespace, criterion: str, ratio: float, seed: int) -> dict[str, Any]:
    """Prune the teacher once (no recovery) and return its test metrics and parameter counts."""
    from tbps_compress.compress.prune import load_prune_recipe, run_prune

    name, _, scope = criterion.partition("@")
    out = Path(args.out) / "runs" / run_name(criterion.replace("@", "-"), ratio, seed)
    if not (out / "metrics.json").is_file():
        sets = [f"teacher.artifact={args.teacher}", f"output={out}", f"seed={seed}", f"prune.criterion={name}",
                "prune.recovery_steps=0", "prune.iterative_steps=1", "prune.bn_recalibration=0",
                f"device={args.device}",
                f"prune.global_pruning={'true' if scope == 'global' else 'false'}"]
        for tower in ("vision", "text"):
            r = ratio if tower in args.towers else 0.0
            sets += [f"prune.{tower}.width_ratio={r}", f"prune.{tower}.mlp_ratio={r}",
                     f"prune.{tower}.head_ratio=0.0", f"prune.{tower}.drop_layers=0"]
        if args.data:
            sets.append(f"data.root={args.data}")
        run_prune(load_prune_recipe(Path(args.recipe), sets + list(args.set)), force=True)
    metrics = json.loads((out / "metrics.json").read_text())
    test = metrics["test"]
    removed = metrics.get("prune", {}).get("removed", {})
    return {"criterion": criterion, "ratio": ratio, "seed": seed, "R1": test["R1"], "mAP": test["mAP"],
            "removed": removed, "artifact": str(out)}


def noise(random_r1: list[float], r1: float, queries: int) -> float:
    """The larger of the random runs' seed spread and the binomial standard error of an R@1 over ``queries``."""
    spread = statistics.stdev(random_r1) if len(random_r1) > 1 else 0.0
    p = r1 / 100.0
    se = 100.0 * math.sqrt(max(p * (1 - p), 1e-12) / max(queries, 1))
    return max(spread, se)


def summarise(rows: list[dict[str, Any]], teacher: dict[str, Any], queries: int) -> dict[str, Any]:
    ratios = sorted({r["ratio"] for r in rows})
    table = []
    for ratio in ratios:
        rand = [r["R1"] for r in rows if r["ratio"] == ratio and r["criterion"] == "random"]
        rand_mean = statistics.fmean(rand) if rand else float("nan")
        for crit in sorted({r["criterion"] for r in rows if r["criterion"] != "random"}):
            got = [r for r in rows if r["ratio"] == ratio and r["criterion"] == crit]
            if not got:
                continue
            r1 = statistics.fmean(r["R1"] for r in got)
            n = noise(rand, rand_mean, queries) if rand else float("nan")
            margin = (r1 - rand_mean) / n if rand and n > 0 else float("nan")
            table.append({"ratio": ratio, "criterion": crit, "R1": round(r1, 2),
                          "params_removed": got[0]["removed"].get("parameters.non_embedding", float("nan")),
                          "mAP": round(statistics.fmean(r["mAP"] for r in got), 2),
                          "random_R1": round(rand_mean, 2), "noise": round(n, 3), "margin_noise": round(margin, 2),
                          "beats_random": bool(margin > 3)})
        if rand:
            first = next(r for r in rows if r["ratio"] == ratio and r["criterion"] == "random")
            table.append({"ratio": ratio, "criterion": "random", "R1": round(rand_mean, 2),
                          "params_removed": first["removed"].get("parameters.non_embedding", float("nan")),
                          "R1_spread": round(statistics.stdev(rand), 3) if len(rand) > 1 else 0.0,
                          "mAP": round(statistics.fmean(r["mAP"] for r in rows
                                                        if r["ratio"] == ratio and r["criterion"] == "random"), 2),
                          "seeds": len(rand)})
    return {"teacher": teacher, "queries": queries, "table": table, "runs": rows}


def markdown(summary: dict[str, Any], args: argparse.Namespace) -> str:
    t = summary["teacher"]
    lines = ["# Pruning criteria: one shot, no recovery", "",
             f"Teacher `{args.teacher}` (test R@1 {t['R1']:.2f}, mAP {t['mAP']:.2f}); recipe `{args.recipe}`; "
             f"{summary['queries']} test queries. Each row removes the given fraction of the residual width and of "
             "every MLP hidden size (stripe-gru: every block's inner width, the GRU's hidden units) in the "
             f"{' and '.join(args.towers)} "
             "tower(s) (heads and depth kept) and is evaluated without any recovery "
             "training. Noise: the larger of random's seed spread and the binomial standard error of one R@1; "
             "a criterion beats random when its margin exceeds 3 noise units."
             + (f" Recipe overrides: {', '.join(f'`{x}`' for x in args.set)}." if args.set else ""), "",
             "| width removed | non-emb. params removed | criterion | R@1 | mAP | random R@1 | noise | margin / noise "
             "| beats random |",
             "|---:|---:|---|---:|---:|---:|---:|---:|---|"]
    for row in summary["table"]:
        if row["criterion"] == "random":
            lines.append(f"| {row['ratio']:.0%} | {row['params_removed']:.1%} | random ({row['seeds']} seeds) | "
                         f"{row['R1']:.2f} (spread {row['R1_spread']:.2f}) | {row['mAP']:.2f} | | | | |")
        else:
            lines.append(f"| {row['ratio']:.0%} | {row['params_removed']:.1%} | {row['criterion']} | {row['R1']:.2f} | "
                         f"{row['mAP']:.2f} | "
                         f"{row['random_R1']:.2f} | {row['noise']:.2f} | {row['margin_noise']:+.1f} | "
                         f"{'yes' if row['beats_random'] else 'no (tie)' if abs(row['margin_noise']) <= 3 else 'no'} |")
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    crits = sorted({r["criterion"] for r in summary["table"]})
    for crit in crits:
        rows = [r for r in summary["table"] if r["criterion"] == crit]
        xs = [100 * r["ratio"] for r in rows]
        ys = [r["R1"] for r in rows]
        if crit == "random":
            err = [r.get("R1_spread", 0.0) for r in rows]
            ax.errorbar(xs, ys, yerr=err, label="random (mean, spread)", color="grey", capsize=3, ls="--")
        else:
            ax.plot(xs, ys, marker="o", label=crit)
    ax.axhline(summary["teacher"]["R1"], color="black", lw=0.8, label="teacher")
    ax.set_xlabel("width and MLP removed (%)")
    ax.set_ylabel("test R@1 (no recovery)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", required=True, help="trained artifact to prune (and the prune recipe's teacher)")
    ap.add_argument("--recipe", default="recipes/prune/synth-teacher.yaml")
    ap.add_argument("--data", help="dataset root (default: the recipe's)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.4, 0.6])
    ap.add_argument("--criteria", nargs="+", default=["magnitude", "taylor", "lamp", "magnitude@global",
                                                       "lamp@global"])
    ap.add_argument("--random-seeds", type=int, default=3)
    ap.add_argument("--towers", nargs="+", choices=["vision", "text"], default=["vision", "text"],
                    help="towers whose widths are cut (default both)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--set", action="append", default=[], help="extra recipe override KEY=VALUE (repeatable)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from tbps_compress.io_utils import write_text_atomic

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    teacher_metrics = json.loads((Path(args.teacher) / "metrics.json").read_text())["test"]
    rows = []
    for ratio in args.ratios:
        for crit in args.criteria:
            rows.append(one_shot(args, crit, ratio, 0))
            log.info("%s at %.0f%%: R@1 %.2f", crit, 100 * ratio, rows[-1]["R1"])
        for seed in range(args.random_seeds):
            rows.append(one_shot(args, "random", ratio, seed))
            log.info("random (seed %d) at %.0f%%: R@1 %.2f", seed, 100 * ratio, rows[-1]["R1"])
    queries = int(teacher_metrics.get("queries") or _queries(Path(args.teacher), args.data))
    summary = summarise(rows, teacher_metrics, queries)
    write_text_atomic(out / "prune_criteria.json", json.dumps(summary, indent=2) + "\n", force=True)
    text = markdown(summary, args)
    write_text_atomic(out / "prune_criteria.md", text, force=True)
    plot(summary, out / "prune_criteria.png")
    print(text)
    return 0


def _queries(teacher: Path, data: str | None) -> int:
    """Caption count of the test split the teacher was evaluated on."""
    import yaml

    from tbps_compress.data.readers import load_dataset

    root = data or yaml.safe_load((teacher / "recipe.resolved.yaml").read_text())["data"]["root"]
    return sum(len(r.captions) for r in load_dataset(Path(root)).split("test"))


if __name__ == "__main__":
    sys.exit(main())
