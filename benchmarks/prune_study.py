"""Pruning study: what each kind of structured pruning and each importance criterion costs and buys.

Runs one prune recipe (default ``recipes/prune/synth-teacher.yaml``) as several variants, every one a normal
``run_prune`` artifact under ``OUT/runs/`` (finished runs are reused when the study is re-run; ``--force`` redoes
them):

- settings: ``width`` (the recipe's residual width and MLP ratios only), ``heads`` (its head ratio only, or
  ``--heads-ratio`` for a recipe that keeps every head), ``depth``
  (its ``drop_layers`` only; blocks ranked by the probe, so run once, independent of the criterion) and ``combined``
  (the whole recipe);
- criteria: ``magnitude``, ``taylor``, ``random`` (any of ``tbps_compress.compress.prune.list_criteria()``).

For each run: non-embedding parameters and MACs removed (per tower), text-to-image R@1 of the teacher and of the
pruned model on the test split (both evaluated here the same way), and the image-tower speed-up at batch 32 on this
CPU, timed in one process by alternating the teacher's and the pruned model's image tower (median over
``--bench-iters`` rounds of the per-round time ratio). Writes ``OUT/prune_study.md`` and ``OUT/prune_study.json``
with the acceptance checks on the ``combined`` rows: >= 50% of the non-embedding parameters removed, >= 95% of the
teacher's R@1 kept, image tower >= 1.8x faster.

``--holdout ROOT`` also evaluates the teacher and every pruned model on a second dataset (default split ``train``):
the SynthPedes demo test split has only 400 queries (one R@1 point = 4 queries), so a second SynthPedes draw with
another seed (``tbps-compress synth data/synth-holdout --identities 500 --seed 1``; its train split is 3,200 unseen
captions x 1,600 images) shows whether a difference on the test split is more than noise. Its figures are reported
next to the test split's; the acceptance checks stay on ``--split``.

Example (the demo study):
    python benchmarks/prune_study.py --teacher runs/synth/teacher --data data/synthpedes \\
        --out benchmarks/results/prune_study --heads-ratio 0.3333333 --holdout data/synth-holdout
Tiny smoke run (a test-tiny teacher trained for a few steps; heads of 2 need ratio 0.5):
    tbps-compress synth /tmp/ps/data --identities 16 --images-per-id 2 --size 64x32
    tbps-compress train recipes/teacher/synth-teacher.yaml --set output=/tmp/ps/teacher --set data.root=/tmp/ps/data \\
        --set model.config=test-tiny --set optim.batch_size=8 --set optim.max_steps=4 --set device=cpu
    python benchmarks/prune_study.py --teacher /tmp/ps/teacher --data /tmp/ps/data --out /tmp/ps/study \\
        --set prune.vision.head_ratio=0.5 --set prune.text.head_ratio=0.5 --set prune.recovery_steps=2 \\
        --set prune.iterative_steps=1 --set optim.batch_size=8 --bench-iters 3
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any

from tbps_compress.models.meta import meta_of

SETTINGS = ("width", "heads", "depth", "combined")
DEFAULT_CRITERIA = ("magnitude", "taylor", "random")
ACCEPT = {"removed": 0.50, "kept": 0.95, "speedup": 1.8}

log = logging.getLogger("prune_study")


def variant_prune(base: dict[str, Any], setting: str, heads_ratio: float | None = None) -> dict[str, Any]:
    """The recipe's ``prune`` section restricted to one kind of pruning (``heads_ratio``, when given, replaces the
    recipe's head ratio in the heads-only setting, for recipes that keep every head)."""
    p = copy.deepcopy(base)
    for tower in ("vision", "text"):
        t = dict(p.get(tower) or {})
        if setting == "width":
            t.update(head_ratio=0.0, drop_layers=0)
        elif setting == "heads":
            t.update(width_ratio=0.0, mlp_ratio=0.0, drop_layers=0)
            if heads_ratio is not None:
                t["head_ratio"] = heads_ratio
        elif setting == "depth":
            t.update(width_ratio=0.0, mlp_ratio=0.0, head_ratio=0.0)
        p[tower] = t
    return p


def is_noop(prune: dict[str, Any]) -> bool:
    for tower in ("vision", "text"):
        t = prune.get(tower) or {}
        if any(float(t.get(k, 0) or 0) > 0 for k in ("width_ratio", "mlp_ratio", "head_ratio")) or t.get("drop_layers"):
            return False
    return True


def time_image_towers(teacher: Any, pruned: Any, batch: int, iters: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds per batch of each image tower, timed in turns by ``bench.latency.interleaved`` (drift
    cancels), and the speed-up: the median over rounds of teacher time / pruned time."""
    import torch

    from tbps_compress.bench.latency import interleaved
    from tbps_compress.models.config import image_size_hw

    h, w = image_size_hw(meta_of(teacher).config)
    ph, pw = image_size_hw(meta_of(pruned).config)
    x_t = torch.randn(batch, 3, h, w)
    x_p = x_t if (ph, pw) == (h, w) else torch.randn(batch, 3, ph, pw)
    teacher.eval()
    pruned.eval()
    with torch.inference_mode():
        timing = interleaved({"teacher": lambda: teacher.encode_image(x_t),
                              "pruned": lambda: pruned.encode_image(x_p)}, warmup=warmup, rounds=iters)
    ts, ps = timing["teacher"].times_ms, timing["pruned"].times_ms
    ratio = statistics.median(a / b for a, b in zip(ts, ps, strict=True))
    return {"teacher_s": round(statistics.median(ts) / 1e3, 5), "pruned_s": round(statistics.median(ps) / 1e3, 5),
            "speedup": round(ratio, 3)}


def run_variant(base: dict[str, Any], setting: str, criterion: str, args: argparse.Namespace) -> Path | None:
    from tbps_compress.compress.prune import PruneRecipe, run_prune
    from tbps_compress.config import validate

    data = copy.deepcopy(base)
    data["prune"] = variant_prune(base.get("prune") or {}, setting, args.heads_ratio)
    if is_noop(data["prune"]):
        log.info("%s: the recipe has nothing of this kind to prune; skipped", setting)
        return None
    data["prune"]["criterion"] = criterion
    name = f"{setting}-{criterion}" if setting != "depth" else "depth"
    data["output"] = str(Path(args.out) / "runs" / name)
    data["teacher"] = {"artifact": str(args.teacher)}
    data["source"] = str(args.source) if args.source else None
    data.setdefault("data", {})["root"] = str(args.data)
    recipe = validate(PruneRecipe, data, f"{args.recipe} [{name}]")
    out = Path(recipe.output)
    if (out / "lineage.json").exists() and not args.force:
        log.info("%s: reusing %s", name, out)
        return out
    t0 = time.time()
    run_prune(recipe, force=True)
    log.info("%s: pruned and recovered in %.0f s", name, time.time() - t0)
    return out


def _kept(value: float, reference: float) -> float | None:
    """``value`` as a fraction of the unpruned model's ``reference`` (None when the reference is 0)."""
    return round(value / reference, 4) if reference > 0 else None


def measure(out: Path, teacher_path: Path, teacher_r1: dict[str, float], args: argparse.Namespace) -> dict[str, Any]:
    from tbps_compress.evaluation import evaluate_artifact
    from tbps_compress.models.io import load_model

    m = json.loads((out / "metrics.json").read_text())
    rep = m["prune"]
    ev = evaluate_artifact(out, args.data, split=args.split, device="cpu", batch_size=args.eval_batch)
    speed = time_image_towers(load_model(teacher_path), load_model(out), args.bench_batch, args.bench_iters)
    removed = rep["removed"]
    extra: dict[str, Any] = {}
    if args.holdout:
        ho = evaluate_artifact(out, args.holdout, split=args.holdout_split, device="cpu", batch_size=args.eval_batch)
        ref = teacher_r1["holdout"]
        extra = {"holdout_R1": round(ho["R1"], 2), "holdout_mAP": round(ho["mAP"], 2),
                 "holdout_R1_kept": _kept(ho["R1"], ref["R1"]), "holdout_mAP_kept": _kept(ho["mAP"], ref["mAP"])}
    return {
        "run": out.name,
        "criterion": rep["criterion"] if out.name != "depth" else "(probe)",
        "non_embedding_removed": removed.get("parameters.non_embedding", 0.0),
        "vision_params_removed": removed.get("parameters.vision", 0.0),
        "vision_macs_removed": removed.get("macs.vision", 0.0),
        "text_macs_removed": removed.get("macs.text", 0.0),
        "R1": round(ev["R1"], 2), "mAP": round(ev["mAP"], 2),
        "R1_kept": _kept(ev["R1"], teacher_r1["R1"]),
        "image_speedup_b32": speed["speedup"], "timing": speed,
        "dropped_layers": rep["dropped_layers"], "after": rep["after"],
        "recovery_steps": m.get("steps"), **extra,
    }


def _pct(x: float | None) -> str:
    return f"{100 * x:.1f}%" if x is not None else "-"


def markdown(rows: list[dict[str, Any]], teacher: dict[str, Any], args: argparse.Namespace,
             checks: list[dict[str, Any]]) -> str:
    lines = [
        "# Pruning study",
        "",
        f"Teacher `{args.teacher}`" + (f", source `{args.source}`" if args.source else "")
        + (f"; heads-only rows remove {args.heads_ratio:g} of the heads" if args.heads_ratio is not None else "")
        + ("; overrides " + ", ".join(f"`{o}`" for o in args.overrides) if args.overrides else "")
        + f"; recipe `{args.recipe}`; data `{args.data}` split `{args.split}`; teacher R@1 {teacher['R1']:.2f}. "
        f"Speed-up: image tower, batch {args.bench_batch}, median time ratio of {args.bench_iters} alternating "
        "rounds on this CPU.",
        "",
        "| setting | criterion | non-emb params removed | image MACs removed | text MACs removed | R@1 | R@1 kept "
        "| image tower speed-up |" + (" holdout R@1 | holdout R@1 kept | holdout mAP kept |" if args.holdout else ""),
        "|---|---|---:|---:|---:|---:|---:|---:|" + ("---:|---:|---:|" if args.holdout else ""),
    ]
    for r in rows:
        line = (f"| {r['setting']} | {r['criterion']} | {100 * r['non_embedding_removed']:.1f}% | "
                f"{100 * r['vision_macs_removed']:.1f}% | {100 * r['text_macs_removed']:.1f}% | {r['R1']:.2f} | "
                f"{_pct(r['R1_kept'])} | {r['image_speedup_b32']:.2f}x |")
        if args.holdout:
            line += f" {r['holdout_R1']:.2f} | {_pct(r['holdout_R1_kept'])} | {_pct(r['holdout_mAP_kept'])} |"
        lines.append(line)
    if args.holdout:
        ho = teacher["holdout"]
        lines += ["", f"Holdout: `{args.holdout}` split `{args.holdout_split}`, unpruned R@1 {ho['R1']:.2f}, "
                      f"mAP {ho['mAP']:.2f}."]
    lines += ["", "## Acceptance (combined)", ""]
    for c in checks:
        mark = "PASS" if c["pass"] else "FAIL"
        lines.append(f"- {c['run']}: {mark} (removed {100 * c['removed']:.1f}% >= 50%, R@1 kept "
                     f"{100 * (c['kept'] or 0):.1f}% >= 95%, speed-up {c['speedup']:.2f}x >= 1.8x)")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    import torch

    from tbps_compress.config import apply_overrides, read_yaml
    from tbps_compress.evaluation import evaluate_artifact

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", type=Path, default=Path("recipes/prune/synth-teacher.yaml"))
    ap.add_argument("--teacher", type=Path, required=True, help="teacher artifact (also the source by default)")
    ap.add_argument("--source", type=Path, default=None, help="artifact to prune (default: the teacher)")
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--split", default="test")
    ap.add_argument("--holdout", type=Path, default=None,
                    help="second dataset every model is also evaluated on (e.g. data/synth-holdout)")
    ap.add_argument("--holdout-split", default="train", help="split of --holdout to evaluate (default: train)")
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    ap.add_argument("--criteria", nargs="+", default=list(DEFAULT_CRITERIA))
    ap.add_argument("--heads-ratio", type=float, default=None,
                    help="head ratio of the heads-only setting (default: the recipe's; needed when it keeps all heads)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="recipe override key.path=value")
    ap.add_argument("--bench-batch", type=int, default=32)
    ap.add_argument("--bench-iters", type=int, default=20)
    ap.add_argument("--eval-batch", type=int, default=256)
    ap.add_argument("--threads", type=int, default=None, help="torch threads for timing (default: torch's)")
    ap.add_argument("--force", action="store_true", help="redo finished runs")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    base = apply_overrides(read_yaml(args.recipe), args.overrides)
    args.out.mkdir(parents=True, exist_ok=True)
    from tbps_compress.compress.prune import list_criteria

    bad = [c for c in args.criteria if c not in list_criteria()]
    if bad:
        ap.error(f"unknown criteria {bad}; valid: {', '.join(list_criteria())}")
    source = args.source or args.teacher
    teacher_eval = evaluate_artifact(source, args.data, split=args.split, device="cpu", batch_size=args.eval_batch)
    log.info("unpruned %s: R@1 %.2f", source, teacher_eval["R1"])
    if args.holdout:
        teacher_eval["holdout"] = evaluate_artifact(source, args.holdout, split=args.holdout_split, device="cpu",
                                                    batch_size=args.eval_batch)
        log.info("unpruned %s on %s: R@1 %.2f", source, args.holdout, teacher_eval["holdout"]["R1"])
    rows = []
    for setting in args.settings:
        for criterion in (args.criteria if setting != "depth" else args.criteria[:1]):
            out = run_variant(base, setting, criterion, args)
            if out is None:
                break
            row = {"setting": setting, **measure(out, source, teacher_eval, args)}
            log.info("%s", row)
            rows.append(row)
    checks = []
    for r in rows:
        if r["setting"] == "combined":
            ok = (r["non_embedding_removed"] >= ACCEPT["removed"] and (r["R1_kept"] or 0) >= ACCEPT["kept"]
                  and r["image_speedup_b32"] >= ACCEPT["speedup"])
            checks.append({"run": r["run"], "removed": r["non_embedding_removed"], "kept": r["R1_kept"],
                           "speedup": r["image_speedup_b32"], "pass": ok})
    result = {"teacher": str(args.teacher), "source": str(source), "recipe": str(args.recipe),
              "overrides": args.overrides, "data": str(args.data), "split": args.split,
              "holdout": str(args.holdout) if args.holdout else None, "holdout_split": args.holdout_split,
              "unpruned": teacher_eval, "threads": torch.get_num_threads(), "rows": rows, "acceptance": checks}
    (args.out / "prune_study.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "prune_study.md").write_text(markdown(rows, teacher_eval, args, checks))
    print((args.out / "prune_study.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
