"""Closed-loop load test of ``tbps-compress serve`` on 127.0.0.1: throughput and latency of searches while images are
uploaded, with no error response and no lost upload allowed.

The script starts the real server (the console command, ``--port 0``, a throw-away token, on a *copy* you give it:
uploads are written into ``--gallery``), waits for it, then runs ``--clients`` search clients, each sending its next
query as soon as the previous answer arrived (closed loop), for ``--duration`` seconds, while one uploader adds an
image every ``--upload-every`` seconds. Bounded: it stops by itself after the duration (plus the last requests'
time) and stops the server. Only loopback addresses are used.

Checks (exit code 1 when one fails): every response was a 2xx; every uploaded image is in the gallery afterwards
(found by a ``where`` path filter, and counted in ``/stats``).

    cp -r data/synthpedes/imgs/test /tmp/serve-gallery
    python benchmarks/serve_load.py --artifact runs/synth/student-int8-text --gallery /tmp/serve-gallery \\
        --out benchmarks/results/serve/load --clients 8 --duration 30

Writes ``OUT.md`` (a table) and ``OUT.json``; refuses to overwrite them without ``--force``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from tbps_compress.retrieval.index import scan_images
from tbps_compress.serve.client import ServeClient, ServeHTTPError

QUERIES = [
    "a man in a grey hoodie with a black backpack",
    "a woman wearing a red coat and blue jeans",
    "a person in a white shirt and black trousers carrying a bag",
    "a young man with a yellow t-shirt and dark shorts",
    "a woman with long hair in a green dress",
    "a man wearing a blue jacket, grey pants and white shoes",
    "someone in a purple top holding a phone",
    "a person with a black coat and a red scarf",
]


def _start_server(artifact: Path, gallery: Path, token_file: Path, threads: int | None, log: Path,
                  timeout: float = 600) -> tuple[subprocess.Popen, str]:
    exe = Path(sys.executable).parent / "tbps-compress"
    cmd = [str(exe), "serve", str(artifact), "--gallery", str(gallery), "--port", "0", "--token-file",
           str(token_file)]
    if threads:
        cmd += ["--threads", str(threads)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith("serving http://"):
                return proc, line.split()[1]
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}:\n{log.read_text(errors='replace')}")
        time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"the server did not start in {timeout:.0f} s; see {log}")


def _variant(path: Path, rng: random.Random) -> bytes:
    """A gallery image, mirrored and colour-shifted, as PNG: a new upload each time."""
    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.int16)[:, ::-1]
    arr = np.clip(arr + rng.randint(-30, 30), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def run(args: argparse.Namespace) -> dict[str, Any]:
    gallery = Path(args.gallery)
    originals = scan_images(gallery)
    if not originals:
        raise SystemExit(f"{gallery}: no images; pass --gallery with a copy of a folder of person crops")
    work = Path(tempfile.mkdtemp(prefix="serve-load-"))  # the token and the server's log
    token = secrets.token_urlsafe(24)
    token_file = work / "token.txt"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    log = work / "server.log"
    t_start = time.perf_counter()
    proc, url = _start_server(Path(args.artifact), gallery, token_file, args.threads, log)
    startup_s = time.perf_counter() - t_start
    try:
        admin = ServeClient(url, token=token)
        size0 = admin.stats()["gallery_size"]
        stop = threading.Event()
        lock = threading.Lock()
        latencies: list[float] = []
        server_ms: list[float] = []
        errors: list[str] = []
        uploads: list[dict[str, Any]] = []
        upload_s: list[float] = []

        def searcher(seed: int) -> None:
            rng = random.Random(seed)
            client = ServeClient(url, timeout=60)
            while not stop.is_set():
                t0 = time.perf_counter()
                try:
                    res = client.search(rng.choice(QUERIES), k=args.k)
                except (ServeHTTPError, OSError) as exc:
                    with lock:
                        errors.append(f"search: {exc}")
                    continue
                dt = time.perf_counter() - t0
                with lock:
                    latencies.append(dt)
                    server_ms.append(res["search_ms"])

        def uploader() -> None:
            rng = random.Random(1)
            client = ServeClient(url, token=token, timeout=120)
            while not stop.wait(args.upload_every):
                data = _variant(rng.choice(originals), rng)
                t0 = time.perf_counter()
                try:
                    res = client.add([(f"load-{len(uploads)}.png", data)])
                except (ServeHTTPError, OSError) as exc:
                    with lock:
                        errors.append(f"upload: {exc}")
                    continue
                with lock:
                    upload_s.append(time.perf_counter() - t0)
                    uploads.extend(res["added"])

        threads = [threading.Thread(target=searcher, args=(i,)) for i in range(args.clients)]
        if args.upload_every > 0:
            threads.append(threading.Thread(target=uploader))
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        time.sleep(args.duration)
        stop.set()
        for t in threads:
            t.join(180)
        elapsed = time.perf_counter() - t0

        # nothing lost: every upload is in the index, and counted
        lost = []
        for up in uploads:
            hits = admin.search("a person", k=1, where={"path": up["path"]})["results"]
            if not hits or hits[0]["id"] != up["id"]:
                lost.append(up["path"])
        stats = admin.stats()
        size1 = stats["gallery_size"]
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        token_file.unlink(missing_ok=True)
    print(f"server log: {log}", file=sys.stderr)
    lat = np.array(latencies) * 1000
    result = {
        "artifact": str(args.artifact), "model": stats.get("model"), "gallery_before": size0, "gallery_after": size1,
        "clients": args.clients, "duration_s": round(elapsed, 2), "k": args.k, "threads": args.threads,
        "startup_s": round(startup_s, 2), "searches": int(len(lat)),
        "throughput_qps": round(len(lat) / elapsed, 1) if elapsed else 0.0,
        "p50_ms": round(float(np.percentile(lat, 50)), 2) if len(lat) else None,
        "p99_ms": round(float(np.percentile(lat, 99)), 2) if len(lat) else None,
        "max_ms": round(float(lat.max()), 2) if len(lat) else None,
        "server_p50_ms": round(float(np.percentile(server_ms, 50)), 2) if server_ms else None,
        "uploads": len(uploads), "upload_p50_s": round(float(np.median(upload_s)), 3) if upload_s else None,
        "upload_max_s": round(float(max(upload_s)), 3) if upload_s else None,
        "errors": errors[:20], "error_count": len(errors), "lost_uploads": lost,
        "count_ok": size1 == size0 + len(uploads),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_implementation()} "
                   f"{platform.python_version()}", "note": args.note,
    }
    result["ok"] = not errors and not lost and result["count_ok"] and len(lat) > 0
    return result


def table(r: dict[str, Any]) -> str:
    rows = [
        ("artifact", f"`{r['artifact']}` ({r['model']})"), ("gallery", f"{r['gallery_before']} -> "
                                                           f"{r['gallery_after']} images"),
        ("clients (closed loop)", r["clients"]), ("duration", f"{r['duration_s']} s"), ("k", r["k"]),
        ("onnxruntime threads / request", r["threads"] or "default"), ("server start (load + index the gallery)",
                                                                      f"{r['startup_s']} s"),
        ("searches", r["searches"]), ("throughput", f"{r['throughput_qps']} searches/s"),
        ("latency p50 / p99 / max (client)", f"{r['p50_ms']} / {r['p99_ms']} / {r['max_ms']} ms"),
        ("server-side search time p50", f"{r['server_p50_ms']} ms"),
        ("uploads during the run", f"{r['uploads']} (p50 {r['upload_p50_s']} s, max {r['upload_max_s']} s each)"),
        ("error responses", r["error_count"]), ("lost uploads", len(r["lost_uploads"])),
        ("result", "PASS" if r["ok"] else "FAIL"),
    ]
    lines = ["| | |", "| --- | --- |", *(f"| {k} | {v} |" for k, v in rows)]
    foot = f"\n\nMachine: {r['machine']}." + (f" {r['note']}" if r.get("note") else "")
    return "# tbps-compress serve: closed-loop load test\n\n" + "\n".join(lines) + foot + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--artifact", required=True, help="ONNX artifact folder")
    p.add_argument("--gallery", required=True, help="a COPY of a gallery folder (uploads are written into it)")
    p.add_argument("--out", required=True, help="output path stem: writes OUT.md and OUT.json")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--duration", type=float, default=30.0, help="seconds of load (at most 600)")
    p.add_argument("--upload-every", type=float, default=2.0, help="seconds between uploads (0: none)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--threads", type=int, default=1, help="onnxruntime threads per request (0: default)")
    p.add_argument("--note", default="", help="a sentence for the table's footer (e.g. what else ran)")
    p.add_argument("--force", action="store_true", help="replace existing OUT.md / OUT.json")
    args = p.parse_args(argv)
    if not 0 < args.duration <= 600 or not 1 <= args.clients <= 64:
        p.error("--duration must be in (0, 600] and --clients in [1, 64]")
    args.threads = args.threads or None
    out = Path(args.out)
    md, js = out.with_suffix(".md"), out.with_suffix(".json")
    for f in (md, js):
        if f.exists() and not args.force:
            print(f"error: {f}: already exists; pass --force to replace it", file=sys.stderr)
            return 2
    result = run(args)
    text = table(result)
    md.write_text(text, encoding="utf-8")
    js.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(text)
    if not result["ok"]:
        print(f"FAIL: {result['error_count']} errors, {len(result['lost_uploads'])} lost uploads, count ok: "
              f"{result['count_ok']}; {result['errors'][:3]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
