"""Distillation study: which KD terms and which initialisation make a small student keep the teacher's accuracy.

Runs the same student, with the same number of optimiser steps, as several variants of one distill recipe
(default ``recipes/distill/synth-student.yaml``): trained from scratch (task losses only, random init), each KD term
alone and all combined on top of the task losses, random init vs weight inheritance (uniform and importance layer
selection), optionally the hidden-state term. Every run is a normal ``run_distill`` artifact under ``OUT/runs/``
(finished runs are reused when the study is re-run; ``--force`` retrains); the KD runs of one seed share one
teacher cache (``OUT/teacher-cache[-sSEED].safetensors``) unless the recipe sets ``teacher.cache: null`` (an online
teacher, cheaper when the steps see a small part of the captions). Writes ``OUT/distill_study.md`` and
``OUT/distill_study.json``: R@1/R@5/mAP/mINP
on the test split, non-embedding parameters and MACs against the teacher, and the acceptance checks:

- the main variant (``--main``, default ``inherit+kd``) has at most 25% of the teacher's non-embedding parameters
  and keeps >= 90% of the teacher's R@1;
- it beats the scratch student by >= 5 R@1 points and by more than 3 seed spreads.

With ``--seeds 0,1`` every variant runs once per seed (the recipe's ``seed``: data order, augmentation and random
initialisation); the table gives the mean, each seed's R@1 and the spread (largest minus smallest), beside the
standard error of one R@1 measurement on the test split (binomial over its queries).

Example (the demo study; minutes per variant on CPU):
    python benchmarks/distill_study.py --teacher runs/synth/teacher --data data/synthpedes \\
        --out benchmarks/results/distill_study --steps 2000
Tiny smoke run:
    python benchmarks/distill_study.py --teacher T --data D --out /tmp/study --steps 3 --batch-size 8 \\
        --set student.config=test-tiny --set student.inline.text.layers=2 --set student.inline.text.width=32
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

KD_TERMS = ("kd_feature", "kd_affinity", "kd_interactive")
KD_DEFAULTS: dict[str, dict[str, Any]] = {"kd_feature": {"weight": 1.0}, "kd_affinity": {"weight": 1.0},
                                          "kd_interactive": {"weight": 0.5}, "kd_hidden": {"weight": 0.5}}

# name -> (init, layer_selection, KD terms on top of the task losses)
VARIANTS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "scratch": ("random", "uniform", ()),
    "random+kd": ("random", "uniform", KD_TERMS),
    "random+feature": ("random", "uniform", ("kd_feature",)),
    "random+affinity": ("random", "uniform", ("kd_affinity",)),
    "random+interactive": ("random", "uniform", ("kd_interactive",)),
    "inherit": ("inherit", "uniform", ()),
    "inherit+feature": ("inherit", "uniform", ("kd_feature",)),
    "inherit+affinity": ("inherit", "uniform", ("kd_affinity",)),
    "inherit+interactive": ("inherit", "uniform", ("kd_interactive",)),
    "inherit+kd": ("inherit", "uniform", KD_TERMS),
    "importance+kd": ("inherit", "importance", KD_TERMS),
    "inherit+kd+hidden": ("inherit", "uniform", (*KD_TERMS, "kd_hidden")),
    # init from an artifact named by --init-artifact (e.g. the teacher pruned by `tbps-compress prune`)
    "pruned+kd": ("artifact", "uniform", KD_TERMS),
}
# named variant lists for --variants
RANDOM_VARIANTS = ["scratch", "random+feature", "random+affinity", "random+interactive", "random+kd"]
# the stripe-gru family inherits its teacher pruned to narrower widths; it has no blocks to rank or hidden states
STRIPE_VARIANTS = ["scratch", "random+kd", "inherit", "inherit+feature", "inherit+affinity", "inherit+interactive",
                   "inherit+kd"]
GROUPS = {"random-init": RANDOM_VARIANTS, "stripe-gru": STRIPE_VARIANTS}
DEFAULT_VARIANTS = [v for v in VARIANTS
                    if v not in ("inherit+kd+hidden", "random+feature", "random+affinity", "random+interactive",
                                  "pruned+kd")]

log = logging.getLogger("distill_study")


def _per_epoch(recipe: Any) -> int:
    """Steps per epoch of a recipe: the splits object the trainer itself builds."""
    from tbps_compress.data.splits import build_splits

    return max(1, build_splits(recipe).steps_per_epoch(recipe.optim.batch_size))


def variant_recipe(base: dict[str, Any], name: str, args: argparse.Namespace, epochs: int | None = None,
                   seed: int | None = None) -> Any:
    """The DistillRecipe of one study variant (and seed: its own output folder ``NAME-sSEED``)."""
    from tbps_compress.compress.distill import DistillRecipe
    from tbps_compress.config import validate

    init, selection, kd = VARIANTS[name]
    data = copy.deepcopy(base)
    losses = {k: v for k, v in (data.get("losses") or {}).items() if not k.startswith("kd_")}
    if not losses:
        losses = {"n_itc": {"weight": 0.5}, "r_itc": {"weight": 1.0}}
    for term in kd:
        losses[term] = (base.get("losses") or {}).get(term) or KD_DEFAULTS[term]
    data["losses"] = losses
    data["output"] = str(Path(args.out) / "runs" / (name.replace("+", "_") + ("" if seed is None else f"-s{seed}")))
    if seed is not None:
        data["seed"] = seed
    teacher = data.setdefault("teacher", {})
    # a cache is shared by the variants of one seed (it is keyed to the data order); a recipe with cache: null
    # keeps the teacher online (cheaper than a cache pass when the steps see few of the captions)
    cache = None if ("cache" in teacher and teacher["cache"] is None) else \
        str(Path(args.out) / ("teacher-cache.safetensors" if seed is None else f"teacher-cache-s{seed}.safetensors"))
    teacher.update({"artifact": args.teacher, "cache": cache, "hidden": "kd_hidden" in kd})
    data.setdefault("data", {})["root"] = args.data
    st = data.setdefault("student", {})
    st.update({"init": init, "layer_selection": selection})
    st.pop("init_artifact", None)
    if init == "artifact":
        if not args.init_artifact:
            raise SystemExit(f"variant {name}: starts from an artifact; give it with --init-artifact PATH")
        st["init_artifact"] = args.init_artifact
    optim = data.setdefault("optim", {})
    optim["max_steps"] = args.steps
    if args.batch_size:
        optim["batch_size"] = args.batch_size
    if epochs is not None:
        optim["epochs"] = epochs
    if args.device:
        data["device"] = args.device
    if init == "random":  # a frozen random patch embedding would handicap the scratch baseline
        data.setdefault("tricks", {})["freeze_patch_embed"] = False
    return validate(DistillRecipe, data, f"{args.recipe} [{name}]")


def run_variant(recipe: Any, force: bool) -> dict[str, Any]:
    from tbps_compress.artifacts import open_artifact
    from tbps_compress.compress.distill import run_distill
    from tbps_compress.models.factory import count_macs, count_parameters
    from tbps_compress.models.io import load_model

    out = Path(recipe.output)
    t0 = time.time()
    if force or not (out / "lineage.json").exists():
        run_distill(recipe, force=True)
    else:
        log.info("%s: finished earlier, reusing it (--force retrains)", out)
    art = open_artifact(out)
    model = load_model(art, verify=False)
    m = art.metrics
    return {"artifact": str(out), "test": m.get("test", {}), "val_best": m.get("val_best", {}),
            "steps": m.get("steps"), "train_seconds": m.get("train_seconds"),
            "wall_seconds": round(time.time() - t0, 1),
            "parameters": count_parameters(model), "macs": count_macs(art.model_config),
            "cache": (m.get("distill") or {}).get("cache"), "vocab_prune": m.get("vocab_prune"),
            "losses": sorted(recipe.losses), "init": recipe.student.init,
            "layer_selection": recipe.student.layer_selection}


def combine_seeds(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One variant's row from its per-seed runs: metrics averaged, each seed's R@1 and their spread kept."""
    row = dict(runs[0])
    keys = [k for k in runs[0]["test"] if all(k in r["test"] for r in runs)]
    row["test"] = {k: round(sum(r["test"][k] for r in runs) / len(runs), 3) for k in keys}
    r1 = [r["test"].get("R1", float("nan")) for r in runs]
    row["seeds"] = [{"artifact": r["artifact"], "test": r["test"], "train_seconds": r.get("train_seconds")}
                    for r in runs]
    row["R1_seeds"] = r1
    row["R1_spread"] = round(max(r1) - min(r1), 3) if len(r1) > 1 else None
    row["train_seconds"] = round(sum(r.get("train_seconds") or 0 for r in runs) / len(runs), 1)
    return row


def r1_standard_error(r1: float, queries: int) -> float:
    """Binomial standard error (points) of an R@1 of ``r1`` percent measured over ``queries`` queries."""
    p = r1 / 100
    return 100 * math.sqrt(max(p * (1 - p), 0.0) / max(queries, 1))


def teacher_row(teacher: Path, data: Path, device: str) -> dict[str, Any]:
    from tbps_compress.artifacts import open_artifact
    from tbps_compress.evaluation import evaluate_artifact
    from tbps_compress.models.factory import count_macs, count_parameters
    from tbps_compress.models.io import load_model

    art = open_artifact(teacher)
    return {"artifact": str(teacher), "test": evaluate_artifact(teacher, data, device=device or "auto"),
            "parameters": count_parameters(load_model(art, verify=False)), "macs": count_macs(art.model_config)}


def _seed_label(artifact: str) -> str:
    """``s1 `` for a run folder ``NAME-s1`` (a study run with a seed), else nothing."""
    tail = Path(artifact).name.rsplit("-s", 1)
    return f"s{tail[1]} " if len(tail) == 2 and tail[1].isdigit() else ""


def _fmt_table(teacher: dict[str, Any], rows: dict[str, dict[str, Any]]) -> str:
    t_ne = teacher["parameters"]["non_embedding"]
    t_r1 = teacher["test"].get("R1", float("nan"))
    head = ("| variant | init | KD terms | R@1 | R@1 per seed | R@5 | mAP | mINP | R@1 vs teacher | "
            "non-emb params (M) | % teacher | MACs (G) | train s |")
    lines = [head, "|" + "---|" * 13]

    def line(name: str, r: dict[str, Any], init: str, kd: str) -> str:
        t = r["test"]
        ne = r["parameters"]["non_embedding"]
        macs = sum(r["macs"].values())
        seeds = ", ".join(f"{_seed_label(s['artifact'])}{v:.2f}"
                          for s, v in zip(r.get("seeds", []), r.get("R1_seeds", []), strict=True)) or "-"
        return (f"| {name} | {init} | {kd} | {t.get('R1', float('nan')):.2f} | {seeds} | "
                f"{t.get('R5', float('nan')):.2f} | "
                f"{t.get('mAP', float('nan')):.2f} | {t.get('mINP', float('nan')):.2f} | "
                f"{100 * t.get('R1', float('nan')) / t_r1 if t_r1 else float('nan'):.1f}% | {ne / 1e6:.2f} | "
                f"{100 * ne / t_ne:.1f}% | {macs / 1e9:.3f} | {r.get('train_seconds', '')} |")

    lines.append(line("teacher", teacher, "-", "-"))
    for name, r in rows.items():
        kd = ", ".join(k.removeprefix("kd_") for k in r["losses"] if k.startswith("kd_")) or "none"
        init = r["init"] + (f" ({r['layer_selection']})" if r["init"] == "inherit" else "")
        lines.append(line(name, r, init, kd))
    return "\n".join(lines)


def acceptance(teacher: dict[str, Any], rows: dict[str, dict[str, Any]], main: str) -> list[dict[str, Any]]:
    checks: list[dict[str, Any]] = []
    if main not in rows:
        return checks
    m = rows[main]
    ratio = m["parameters"]["non_embedding"] / teacher["parameters"]["non_embedding"]
    checks.append({"check": f"{main}: non-embedding parameters <= 25% of the teacher's", "value": round(ratio, 4),
                   "pass": ratio <= 0.25})
    t_r1 = teacher["test"].get("R1", 0.0)
    keep = m["test"].get("R1", 0.0) / t_r1 if t_r1 else 0.0
    checks.append({"check": f"{main}: R@1 >= 90% of the teacher's", "value": round(keep, 4), "pass": keep >= 0.90})
    if "scratch" in rows:
        gain = m["test"].get("R1", 0.0) - rows["scratch"]["test"].get("R1", 0.0)
        checks.append({"check": f"{main} beats scratch by >= 5 R@1 points", "value": round(gain, 2),
                       "pass": gain >= 5.0})
        spreads = [s for s in (m.get("R1_spread"), rows["scratch"].get("R1_spread")) if s is not None]
        if spreads:
            spread = max(spreads)
            checks.append({"check": f"{main} beats scratch by more than 3 seed spreads (spread {spread:.2f})",
                           "value": round(gain, 2), "pass": gain > 3 * spread})
    return checks


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", required=True, help="teacher artifact folder")
    p.add_argument("--data", required=True, help="dataset root (SynthPedes for the demo)")
    p.add_argument("--out", required=True, help="output folder (runs/, teacher cache, Markdown + JSON table)")
    p.add_argument("--steps", type=int, required=True, help="optimiser steps per variant (the same for all)")
    p.add_argument("--recipe", default="recipes/distill/synth-student.yaml", help="base distill recipe")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help=f"comma-separated subset of: {', '.join(VARIANTS)}; or a named list: "
                        + "; ".join(f"'{k}' = {', '.join(v)}" for k, v in GROUPS.items()))
    p.add_argument("--init-artifact", default=None,
                   help="the artifact the 'pruned+kd' variant starts from (its architecture is the student's)")
    p.add_argument("--main", default="inherit+kd", help="the variant the acceptance checks judge")
    p.add_argument("--batch-size", type=int, default=None, help="override optim.batch_size")
    p.add_argument("--device", default=None, help="override device (cpu, cuda, auto)")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   help="recipe override key.path=value (repeatable), applied to every variant")
    p.add_argument("--seeds", default=None, help="comma-separated seeds; every variant runs once per seed "
                                                 "(default: the recipe's seed, once)")
    p.add_argument("--force", action="store_true", help="retrain variants that already finished")
    p.add_argument("--only-finished", action="store_true",
                   help="train nothing: tabulate the runs that finished (a variant's missing seeds are left out of "
                        "its row, a variant without any is dropped)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    from tbps_compress.config import apply_overrides, read_yaml

    names = GROUPS.get(args.variants) or [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in names if v not in VARIANTS]
    if bad:
        p.error(f"unknown variant(s) {bad}; choose from {', '.join(VARIANTS)}")
    base = apply_overrides(read_yaml(Path(args.recipe)), args.overrides)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    first = variant_recipe(base, names[0], args)
    per_epoch = _per_epoch(first)
    epochs = math.ceil(args.steps / per_epoch)
    log.info("%d steps = %d epoch(s) of %d steps", args.steps, epochs, per_epoch)
    teacher = teacher_row(Path(args.teacher), Path(args.data), args.device or "auto")
    rows: dict[str, dict[str, Any]] = {}
    seeds: list[int | None] = [int(x) for x in args.seeds.split(",")] if args.seeds else [None]
    for name in names:
        runs = []
        for seed in seeds:
            recipe = variant_recipe(base, name, args, epochs, seed)
            if args.only_finished and not (Path(recipe.output) / "lineage.json").exists():
                log.info("=== variant %s%s: not run, left out (--only-finished)", name,
                         "" if seed is None else f", seed {seed}")
                continue
            log.info("=== variant %s%s", name, "" if seed is None else f", seed {seed}")
            runs.append(run_variant(recipe, args.force and not args.only_finished))
        if runs:
            rows[name] = combine_seeds(runs)
    from tbps_compress.data.readers import load_dataset

    queries = sum(len(r.captions) for r in load_dataset(Path(args.data)).split("test"))
    checks = acceptance(teacher, rows, args.main)
    table = _fmt_table(teacher, rows)
    md = [f"# Distillation study ({args.steps} steps per student, {epochs} epoch(s))", "",
          f"Teacher `{args.teacher}`, data `{args.data}`, base recipe `{args.recipe}`"
          + (f", overrides {args.overrides}" if args.overrides else "") + ".",
          "Test split, text-to-image; parameters without token/position embeddings; MACs of one image + one caption.",
          f"Seeds {seeds if seeds != [None] else 'recipe default (one run)'}; one R@1 measurement on the "
          f"{queries} test queries has a standard error of "
          f"{r1_standard_error(teacher['test'].get('R1', 0.0), queries):.2f} points at the teacher's R@1.",
          "", table, "", "## Acceptance", ""]
    md += [f"- {'PASS' if c['pass'] else 'FAIL'}: {c['check']} (value {c['value']})" for c in checks]
    (out / "distill_study.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    (out / "distill_study.json").write_text(json.dumps(
        {"steps": args.steps, "epochs": epochs, "recipe": args.recipe, "overrides": args.overrides, "seeds": seeds,
         "test_queries": queries,
         "teacher": teacher, "variants": rows, "acceptance": checks}, indent=2, default=str) + "\n", encoding="utf-8")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
