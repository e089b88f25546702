"""Profile one training step of a train recipe: data (loading + augmentation), forward, backward, optimiser.

    python benchmarks/profile_step.py recipes/teacher/synth-teacher.yaml --steps 10 \
        --variant "no vocab prune" model.vocab_prune=false --variant "vocab prune" model.vocab_prune=true

Each variant is the recipe with its overrides (KEY=VALUE after the variant's name); all variants are timed in this
one process, alternating, after two warm-up steps each, so their ratios are comparable. Prints a Markdown table of
milliseconds per step (median over the timed steps) and writes it to --out when given. With --towers it also times
each tower's forward + backward alone on the same batches (which of the two the step waits on).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path


def _trainer(recipe: Path, sets: list[str]):
    from tbps_compress.config import load_recipe
    from tbps_compress.engine.train import Trainer
    from tbps_compress.recipes import TrainRecipe

    tr = Trainer(load_recipe(recipe, TrainRecipe, ["output=/tmp/tbps-profile-step", *sets]))
    tr.prepare()
    tr.model.train()
    return tr, iter(tr.loader)


def _step(tr, it) -> dict[str, float]:
    t0 = time.perf_counter()
    batch = next(it)
    t1 = time.perf_counter()
    tr.optimizer.zero_grad(set_to_none=True)
    emb = tr._embed(batch)
    loss, _ = tr._loss(emb, batch["pid"], {}, 0.5)
    t2 = time.perf_counter()
    loss.backward()
    t3 = time.perf_counter()
    tr.optimizer.step()
    t4 = time.perf_counter()
    return {"data": t1 - t0, "forward": t2 - t1, "backward": t3 - t2, "optimiser": t4 - t3, "step": t4 - t0}


def _towers(tr, it) -> dict[str, float]:
    """Forward + backward of the image tower alone, then of the text tower alone, on one batch (seconds)."""
    batch = next(it)
    out = {}
    for name, fn, x in (("image tower", tr.model.encode_image, batch["image"]),
                        ("text tower", tr.model.encode_text, batch["text"])):
        tr.optimizer.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        fn(x).float().square().mean().backward()
        out[name] = time.perf_counter() - t0
    tr.optimizer.zero_grad(set_to_none=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipe", type=Path)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--variant", nargs="+", action="append", metavar=("NAME", "KEY=VALUE"), required=True)
    ap.add_argument("--set", dest="sets", action="append", default=[], help="override for every variant")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--towers", action="store_true", help="also time each tower's forward + backward alone")
    args = ap.parse_args()
    import torch

    runs = []
    for name, *sets in args.variant:
        tr, it = _trainer(args.recipe, [*args.sets, *sets])
        for _ in range(2):
            _step(tr, it)
        runs.append((name, tr, it, []))
    for _ in range(args.steps):
        for _name, tr, it, times in runs:
            times.append(_step(tr, it))
            if args.towers:
                times[-1].update(_towers(tr, it))
    keys = ("data", "forward", "backward", "optimiser", "step")
    if args.towers:
        keys += ("image tower", "text tower")
    lines = [f"Training step of `{args.recipe}` ({torch.get_num_threads()} threads, batch "
             f"{runs[0][1].recipe.optim.batch_size}, median of {args.steps} alternating steps, ms)", "",
             "| variant | token rows | " + " | ".join(keys) + " | samples/s |",
             "|---|---:|" + "---:|" * (len(keys) + 1)]
    for name, tr, _it, times in runs:
        med = {k: statistics.median(t[k] for t in times) for k in keys}
        rows = tr.model.token_embedding.num_embeddings
        lines.append(f"| {name} | {rows} | " + " | ".join(f"{1e3 * med[k]:.0f}" for k in keys)
                     + f" | {tr.recipe.optim.batch_size / med['step']:.0f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
