"""Scale check: evaluation metrics and gallery search at 20,000 queries x 100,000 gallery embeddings (dim 256)
run in bounded memory (chunked, never a Q x G matrix) and finish on a small CPU machine.

Measures, each in a fresh process so that its peak RSS is its own:

- ``metrics``: :func:`tbps_compress.retrieval.metrics.metrics_from_embeddings` (R@1/5/10, mAP, mINP);
- ``topk``: :func:`tbps_compress.runtime.cosine_topk` (k=10) of every query over the gallery.

Embeddings are synthetic: identity centres plus noise (4 gallery images per identity, one identity per query), so
the metrics are meaningful numbers, not chance. Reported per measurement: wall time, peak RSS
(``resource.getrusage``), the RSS before the call (imports and embeddings), the extra memory the call needed
and, for comparison, the size a dense float32 Q x G similarity matrix would have.

    python benchmarks/scale_check.py                      # full size: 20,000 x 100,000 (minutes)
    python benchmarks/scale_check.py --scale 0.05         # 1/20 size: 1,000 x 5,000 (seconds)
    python benchmarks/scale_check.py --max-extra-mb 3000  # exit 1 when a call needs more than this
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from typing import Any

QUERIES = 20_000
GALLERY = 100_000
DIM = 256
IMAGES_PER_ID = 4


def _rss_mb() -> float:
    """Current resident set size in MB (Linux /proc; falls back to the peak)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * resource.getpagesize() / 1e6
    except (OSError, ValueError, IndexError):
        return _peak_mb()


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3  # KB on Linux


def make_embeddings(n_query: int, n_gallery: int, dim: int, seed: int = 0):
    """(queries, gallery, query_ids, gallery_ids): float32, identity centre + noise."""
    import numpy as np

    rng = np.random.default_rng(seed)
    n_ids = max(1, n_gallery // IMAGES_PER_ID)
    centres = rng.standard_normal((n_ids, dim), dtype=np.float32)
    gallery_ids = np.arange(n_gallery) % n_ids
    query_ids = rng.integers(0, n_ids, n_query)
    gallery = centres[gallery_ids] + 2.5 * rng.standard_normal((n_gallery, dim), dtype=np.float32)
    queries = centres[query_ids] + 2.5 * rng.standard_normal((n_query, dim), dtype=np.float32)
    return queries, gallery, query_ids.astype(np.int64), gallery_ids.astype(np.int64)


def worker(what: str, n_query: int, n_gallery: int, dim: int, k: int, threads: int | None) -> dict[str, Any]:
    """One measurement in this process."""
    import numpy as np
    import torch

    if threads:
        torch.set_num_threads(threads)
    q, g, qid, gid = make_embeddings(n_query, n_gallery, dim)
    if what == "metrics":
        from tbps_compress.retrieval.metrics import metrics_from_embeddings

        def call() -> Any:
            return metrics_from_embeddings(q, g, qid, gid)
    else:
        from tbps_compress.runtime import cosine_topk

        def call() -> Any:
            return cosine_topk(q, g, k)

    base = _rss_mb()
    t0 = time.perf_counter()
    result = call()
    wall = time.perf_counter() - t0
    peak = _peak_mb()
    out: dict[str, Any] = {"what": what, "queries": n_query, "gallery": n_gallery, "dim": dim,
                           "wall_s": round(wall, 2), "peak_rss_mb": round(peak, 1), "rss_before_mb": round(base, 1),
                           "extra_mb": round(peak - base, 1),
                           "dense_similarity_mb": round(n_query * n_gallery * 4 / 1e6, 1),
                           "threads": torch.get_num_threads()}
    if what == "metrics":
        out["metrics"] = {key: round(v, 2) for key, v in result.items()}
    else:
        scores, idx = result
        assert scores.shape == idx.shape == (n_query, min(k, n_gallery))
        out["k"] = k
        out["top1_same_identity_pct"] = round(float(100.0 * np.mean(gid[idx[:, 0]] == qid)), 2)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=float, default=1.0, help="Fraction of 20,000 queries x 100,000 gallery.")
    ap.add_argument("--queries", type=int, default=None, help="Override the number of queries.")
    ap.add_argument("--gallery", type=int, default=None, help="Override the gallery size.")
    ap.add_argument("--dim", type=int, default=DIM)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's).")
    ap.add_argument("--only", choices=("metrics", "topk"), default=None, help="Run one measurement.")
    ap.add_argument("--max-extra-mb", type=float, default=None, help="Fail when a call needs more memory.")
    ap.add_argument("--worker", choices=("metrics", "topk"), default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help="Also write the results as JSON here.")
    args = ap.parse_args(argv)
    n_query = args.queries or max(1, round(QUERIES * args.scale))
    n_gallery = args.gallery or max(1, round(GALLERY * args.scale))
    if args.worker:
        print(json.dumps(worker(args.worker, n_query, n_gallery, args.dim, args.k, args.threads)))
        return 0
    results = []
    for what in [args.only] if args.only else ["metrics", "topk"]:
        cmd = [sys.executable, __file__, "--worker", what, "--queries", str(n_query), "--gallery", str(n_gallery),
               "--dim", str(args.dim), "--k", str(args.k)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            print(f"{what} failed ({proc.returncode}):\n{proc.stderr[-3000:]}", file=sys.stderr)
            return 1
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        results.append(res)
        extra = (f"metrics {res['metrics']}" if what == "metrics"
                 else f"top-1 same identity {res['top1_same_identity_pct']}%")
        print(f"{what:8s} Q={n_query} G={n_gallery} D={args.dim}: {res['wall_s']:.2f} s, peak RSS "
              f"{res['peak_rss_mb']:.0f} MB (before the call {res['rss_before_mb']:.0f} MB: imports + embeddings; "
              f"extra {res['extra_mb']:.0f} MB; a dense Q x G matrix would be {res['dense_similarity_mb']:.0f} MB); "
              f"{extra}", flush=True)
    print(json.dumps(results))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    if args.max_extra_mb is not None and any(r["extra_mb"] > args.max_extra_mb for r in results):
        print(f"a call needed more than {args.max_extra_mb} MB beyond its inputs", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
