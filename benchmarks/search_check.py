"""Check that ``tbps-compress search`` finds people as well as the benchmark says it should.

Runs the search library (:mod:`tbps_compress.retrieval.search`: gallery index built once, chunked cosine top-k)
with every caption of a split as a query against that split's images, and prints the share of captions with a
correct identity in the top 5 next to ``evaluate_artifact(...)``'s R@5 on the same split. The two should agree
(up to ties and float rounding); the script exits 1 when they differ by more than ``--tolerance`` points.

    python benchmarks/search_check.py --artifact runs/A4 --data data/synthpedes [--split test] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

from tbps_compress.errors import UserError


def search_recall(artifact: Path, data: Path, split: str = "test", k: int = 5, device: str = "auto",
                  index_dir: Path | None = None, batch_size: int = 64) -> dict[str, float]:
    """Share (percent) of the split's captions whose top ``k`` search hits include an image of their identity."""
    from tbps_compress.data.readers import load_dataset
    from tbps_compress.retrieval.search import open_index

    ds = load_dataset(Path(data))
    recs = ds.split(split)
    if not recs:
        raise UserError(f"{ds.annotation}: no records in split '{split}' (splits present: {', '.join(ds.splits())})")
    paths = [ds.image_path(r) for r in recs]
    t0 = time.perf_counter()
    index = open_index(artifact, ds.root, files=paths, tag=f"split-{split}", index_dir=index_dir, device=device,
                       batch_size=batch_size)
    t_index = time.perf_counter() - t0
    pid_of = {p.resolve(): int(r.pid) for p, r in zip(paths, recs, strict=True)}
    row_pid = np.array([pid_of[p.resolve()] for p in index.paths])
    captions = [c for r in recs for c in r.captions]
    cap_pid = np.array([int(r.pid) for r in recs for _ in r.captions])
    t0 = time.perf_counter()
    hits = index.search(captions, k)
    t_search = time.perf_counter() - t0
    found = np.array([any(pid_of[p.resolve()] == pid for p, _ in h) for h, pid in zip(hits, cap_pid, strict=True)])
    # Evaluation excludes queries without any correct gallery item; so do we (none in a well-formed split).
    has_match = np.isin(cap_pid, row_pid)
    return {
        f"search_R{k}": float(100.0 * found[has_match].mean()) if has_match.any() else float("nan"),
        "captions": int(len(captions)),
        "gallery_images": int(len(index)),
        "unreadable": int(index.stats.unreadable),
        "embedded_now": int(index.stats.embedded),
        "index_seconds": round(t_index, 2),
        "search_seconds": round(t_search, 2),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifact", type=Path, required=True, help="artifact folder (torch or ONNX)")
    ap.add_argument("--data", type=Path, required=True, help="dataset folder (e.g. SynthPedes root)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda (torch artifacts)")
    ap.add_argument("--index", type=Path, default=None, help="index folder (default DATA/.tbps_index/<hash>-split-S)")
    ap.add_argument("--tolerance", type=float, default=0.5, help="allowed |search R5 - eval R5| in points")
    ap.add_argument("--skip-eval", action="store_true", help="only the search side")
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        out = search_recall(args.artifact, args.data, args.split, device=args.device, index_dir=args.index)
        if not args.skip_eval:
            from tbps_compress.evaluation import evaluate_artifact

            t0 = time.perf_counter()
            m = evaluate_artifact(args.artifact, args.data, split=args.split, device=args.device)
            out["eval_R5"] = float(m["R5"])
            out["eval_seconds"] = round(time.perf_counter() - t0, 2)
            out["difference"] = round(out["search_R5"] - out["eval_R5"], 4)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"artifact {args.artifact}  split {args.split}: {out['captions']} captions, {out['gallery_images']} images")
    line = f"search top-5 hit rate: {out['search_R5']:.2f}%"
    if "eval_R5" in out:
        line += f"   evaluate_artifact R5: {out['eval_R5']:.2f}%   difference {out['difference']:+.2f} points"
    print(line)
    if args.json is not None:
        args.json.write_text(json.dumps({"artifact": str(args.artifact), "split": args.split, **out}, indent=2) + "\n")
    if "difference" in out and abs(out["difference"]) > args.tolerance:
        print(f"MISMATCH: more than {args.tolerance} points apart", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
