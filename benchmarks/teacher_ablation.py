"""Teacher ablation on SynthPedes: plain CLIP, + tricks, simplified and full TBPS-CLIP at equal step budgets,
several seeds; plus the capacity check (the demo teacher against a model with a quarter of its non-embedding
parameters, same recipe, same step budget).

    python benchmarks/teacher_ablation.py --data data/synthpedes --out benchmarks/results/teacher_ablation \
        --steps 600 --seeds 0 1

Each run is `tbps-compress train recipes/teacher/synth-teacher.yaml --set ...`; finished runs are reused.
Writes ablation.md and ablation.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

BASE = "recipes/teacher/synth-teacher.yaml"
NO_AUG = ["augment.image.num_ops=0", "augment.text.back_translation_p=0", "augment.text.deletion_p=0"]
NO_TRICKS = ["tricks.global_gradients=false", "tricks.text_attn_dropout=0", "tricks.freeze_patch_embed=false"]
TRICKS = ["tricks.global_gradients=true", "tricks.text_attn_dropout=0.05", "tricks.freeze_patch_embed=true"]

VARIANTS: dict[str, list[str]] = {
    # InfoNCE on the diagonal, no tricks, no augmentation
    "plain CLIP": ["losses={itc: {weight: 1.0}}", *NO_TRICKS, *NO_AUG],
    # the paper's four tricks: global gradients, text attention dropout, locked patch embedding, soft labels
    "+ tricks": ["losses={n_itc: {weight: 1.0}}", *TRICKS, *NO_AUG],
    # + augmentation (image pool, back-translation, deletion) + R-ITC
    "simplified TBPS-CLIP": ["losses={n_itc: {weight: 1.0}, r_itc: {weight: 1.0}}", *TRICKS],
    "full TBPS-CLIP": ["losses={n_itc: {weight: 0.5}, mvs_i: {weight: 0.5}, ss_i: {weight: 0.4}, "
                       "r_itc: {weight: 1.0}, c_itc: {weight: 0.1}}", *TRICKS],
}


def train(out: Path, sets: list[str], data: Path, steps: int, seed: int, model: str) -> dict:
    if not (out / "metrics.json").exists():
        cmd = [sys.executable, "-m", "tbps_compress.cli", "train", BASE, "--force",
               "--set", f"output={out}", "--set", f"data.root={data}", "--set", f"seed={seed}",
               "--set", f"optim.max_steps={steps}", "--set", f"model.config={model}"]
        for s in sets:
            cmd += ["--set", s]
        t0 = time.time()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        print(f"  trained {out.name} in {time.time() - t0:.0f} s", flush=True)
    return json.loads((out / "metrics.json").read_text())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("data/synthpedes"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/teacher_ablation"))
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), help="subset of: " + ", ".join(VARIANTS))
    ap.add_argument("--capacity", action="store_true", help="also run the quarter-size model check")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.variants:
        for seed in args.seeds:
            tag = name.replace(" ", "_").replace("+", "plus").replace("-", "_")
            m = train(args.out / f"{tag}-s{seed}", VARIANTS[name], args.data, args.steps, seed, "synth-teacher")
            rows.append({"variant": name, "seed": seed, **{k: m["test"][k] for k in ("R1", "mAP", "mINP")},
                         "train_s": m.get("train_seconds")})
    if args.capacity:
        sets = VARIANTS["simplified TBPS-CLIP"]
        for seed in args.seeds:
            for model in ("synth-teacher", "synth-student"):
                # the teacher's row is the simplified TBPS-CLIP run itself (same recipe, same seed)
                out = (args.out / f"simplified_TBPS_CLIP-s{seed}" if model == "synth-teacher"
                       else args.out / f"capacity-{model}-s{seed}")
                m = train(out, sets, args.data, args.steps, seed, model)
                rows.append({"variant": f"capacity: {model}", "seed": seed,
                             **{k: m["test"][k] for k in ("R1", "mAP", "mINP")},
                             "train_s": m.get("train_seconds"),
                             "non_embedding_params": m["parameters"]["non_embedding"]})
    lines = [f"# Teacher ablation on {args.data} ({args.steps} steps each, test split)", "",
             "| variant | seeds | R@1 | mAP | mINP | train s |", "|---|---|---:|---:|---:|---:|"]
    for name in dict.fromkeys(r["variant"] for r in rows):
        rs = [r for r in rows if r["variant"] == name]

        def ms(key: str, rs: list[dict] = rs) -> str:
            vals = [r[key] for r in rs]
            sd = statistics.pstdev(vals) if len(vals) > 1 else 0.0
            return f"{statistics.mean(vals):.2f} ± {sd:.2f}"

        lines.append(f"| {name} | {len(rs)} | {ms('R1')} | {ms('mAP')} | {ms('mINP')} | "
                     f"{statistics.mean(r['train_s'] or 0 for r in rs):.0f} |")
    text = "\n".join(lines) + "\n"
    (args.out / "ablation.md").write_text(text)
    (args.out / "ablation.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
