"""CI latency check: the speed ratios the project promises, measured in one process in about a minute, against
floors in ``benchmarks/ci_baseline.json``.

Models (random weights, realistic shapes): the ``synth-teacher`` config as the teacher and ``synth-student`` as the
student; image batch 32 at their image size, text batch 1 (one tokenised caption). The student is saved as an
artifact in a temporary folder, exported with the product's ``export_onnx`` and quantised with
``quantize_artifact(mode="dynamic")``; ONNX models run through the product's ``OnnxEncoder`` sessions.

Ratios (each "higher is better"; a throughput ratio at a fixed batch equals the inverse latency ratio):

- ``student_vs_teacher_image``: student / teacher image throughput (PyTorch fp32, batch 32)
- ``student_vs_teacher_text``: teacher / student text latency (PyTorch fp32, batch 1)
- ``int8_vs_fp32_image`` / ``int8_vs_fp32_text``: fp32 / int8 (dynamic) latency of the student ONNX (onnxruntime)
- ``ort_vs_torch_image`` / ``ort_vs_torch_text``: PyTorch / onnxruntime latency of the same student (fp32)

Threads: 1 by default for both runtimes. Ratios are what is checked, and multi-threaded PyTorch (OpenMP spinning)
collapses on a shared, oversubscribed CI machine (measured: student text 26 ms at 1 thread, 135-500 ms at 2 threads
on 2 busy cores) while onnxruntime does not, which would make the PyTorch / onnxruntime ratios meaningless.

All models of a tower are timed in turns (A, B, C, D, A, B, ...) and compared by medians, so slow drift of the
machine's load cancels. The script exits 1 with a message naming each ratio below its floor. Floors are set
conservatively at ``--fraction`` (default 70%) of a measurement: ``--update-baseline`` rewrites them.

Usage: ``python benchmarks/ci_latency.py [--baseline benchmarks/ci_baseline.json] [--update-baseline]
[--threads N] [--json OUT.json]``
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from tbps_compress.models.meta import meta_of

BASELINE = Path(__file__).resolve().parent / "ci_baseline.json"
TEACHER, STUDENT = "synth-teacher", "synth-student"
IMAGE_BATCH, TEXT_BATCH = 32, 1
DEFAULT_FRACTION = 0.7
CAPTION = "a young woman with long black hair wearing a red jacket, blue jeans and white sneakers"

RATIOS: dict[str, tuple[str, tuple[str, str], str]] = {
    # name: (tower, (numerator model, denominator model) of the latency ratio, description)
    "student_vs_teacher_image": ("image", ("teacher_pt", "student_pt"),
                                 "student / teacher image throughput, PyTorch fp32, batch 32"),
    "student_vs_teacher_text": ("text", ("teacher_pt", "student_pt"),
                                "teacher / student text latency, PyTorch fp32, batch 1"),
    "int8_vs_fp32_image": ("image", ("student_ort", "student_int8"),
                           "fp32 / int8-dynamic image latency, student ONNX on onnxruntime, batch 32"),
    "int8_vs_fp32_text": ("text", ("student_ort", "student_int8"),
                          "fp32 / int8-dynamic text latency, student ONNX on onnxruntime, batch 1"),
    "ort_vs_torch_image": ("image", ("student_pt", "student_ort"),
                           "PyTorch / onnxruntime image latency, student fp32, batch 32"),
    "ort_vs_torch_text": ("text", ("student_pt", "student_ort"),
                          "PyTorch / onnxruntime text latency, student fp32, batch 1"),
}

log = logging.getLogger("ci_latency")


# ---------------------------------------------------------------------------------------------------------------------
# pure logic (unit-tested)
# ---------------------------------------------------------------------------------------------------------------------


def compute_ratios(medians: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Ratios from median latencies ``medians[tower][model]`` (ms); ratios whose models are missing are left
    out."""
    out = {}
    for name, (tower, (num, den), _) in RATIOS.items():
        t = medians.get(tower, {})
        if num in t and den in t and t[den] > 0:
            out[name] = float(t[num]) / float(t[den])
    return out


def check_floors(ratios: Mapping[str, float], baseline: Mapping[str, Any]) -> list[str]:
    """One message per ratio below its floor (or missing from the measurement); empty when all pass."""
    floors = baseline.get("floors")
    if not isinstance(floors, dict) or not floors:
        return ["the baseline has no 'floors' table; run benchmarks/ci_latency.py --update-baseline"]
    failures = []
    for name, floor in floors.items():
        desc = RATIOS.get(name, ("", ("", ""), name))[2]
        if name not in ratios:
            failures.append(f"{name}: not measured (the baseline expects it; {desc})")
            continue
        value = ratios[name]
        if not value >= float(floor):  # NaN fails too
            measured = baseline.get("measured", {}).get(name)
            ref = f", baseline measurement {measured:.2f}" if isinstance(measured, (int, float)) else ""
            failures.append(f"{name} = {value:.2f} is below its floor {float(floor):.2f}{ref} ({desc})")
    return failures


def make_baseline(ratios: Mapping[str, float], fraction: float = DEFAULT_FRACTION,
                  info: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A baseline whose floors are ``fraction`` of the measured ratios (rounded down to 0.01)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    return {
        "description": "Floors of benchmarks/ci_latency.py: a ratio below its floor fails CI. Each floor is "
                       f"{fraction:.0%} of the measured ratio (CI machines are noisy).",
        "floor_fraction": fraction,
        "measured": {k: round(v, 3) for k, v in ratios.items()},
        "floors": {k: math.floor(v * fraction * 100 + 1e-6) / 100 for k, v in ratios.items()},
        "measured_on": dict(info or {}),
    }


def format_table(medians: Mapping[str, Mapping[str, float]], ratios: Mapping[str, float],
                 baseline: Mapping[str, Any] | None) -> str:
    floors = (baseline or {}).get("floors", {})
    lines = ["median latency (ms):"]
    for tower, models in medians.items():
        lines.append(f"  {tower:<6}" + "  ".join(f"{m} {v:9.2f}" for m, v in models.items()))
    lines.append(f"{'ratio':<28}{'measured':>10}{'floor':>8}  result")
    for name, value in ratios.items():
        floor = floors.get(name)
        verdict = "-" if floor is None else ("ok" if value >= floor else "FAIL")
        lines.append(f"{name:<28}{value:>10.2f}{floor if floor is not None else '-':>8}  {verdict}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------------
# measurement
# ---------------------------------------------------------------------------------------------------------------------


def build_candidates(work: Path, threads: int) -> dict[str, dict[str, Callable[[], Any]]]:
    """The timed callables: ``{tower: {model: fn}}`` for teacher / student PyTorch and student ONNX fp32 / int8."""
    import numpy as np
    import torch

    from tbps_compress.bench.zoo import random_artifacts
    from tbps_compress.models.config import image_size_hw
    from tbps_compress.models.io import load_model
    from tbps_compress.models.tokenizer import get_tokenizer
    from tbps_compress.runtime import OnnxEncoder

    t0 = time.perf_counter()
    arts = random_artifacts(work, [TEACHER], ("torch",)) | random_artifacts(work, [STUDENT], ("torch", "onnx", "int8"))
    log.info("built the teacher and the student (PyTorch, ONNX, int8) in %.1f s", time.perf_counter() - t0)
    models = {"teacher": load_model(arts[TEACHER]["torch"]), "student": load_model(arts[STUDENT]["torch"])}

    fns: dict[str, dict[str, Callable[[], Any]]] = {"image": {}, "text": {}}
    gen = torch.Generator().manual_seed(0)
    for role in ("teacher", "student"):
        m = models[role]
        h, w = image_size_hw(meta_of(m).config)
        images = torch.randn(IMAGE_BATCH, 3, h, w, generator=gen)
        tokens = get_tokenizer(meta_of(m).config)([CAPTION] * TEXT_BATCH)

        def run_image(m: Any = m, x: Any = images) -> Any:
            with torch.inference_mode():
                return m.encode_image(x, normalize=True)

        def run_text(m: Any = m, t: Any = tokens) -> Any:
            with torch.inference_mode():
                return m.encode_text(t, normalize=True)

        fns["image"][f"{role}_pt"] = run_image
        fns["text"][f"{role}_pt"] = run_text
    h, w = image_size_hw(meta_of(models["student"]).config)
    images_np = np.random.default_rng(0).standard_normal((IMAGE_BATCH, 3, h, w), dtype=np.float32)
    for key, folder in (("student_ort", arts[STUDENT]["onnx"]), ("student_int8", arts[STUDENT]["int8"])):
        enc = OnnxEncoder(folder, threads=threads)
        s_img, s_txt = enc.image_session, enc.text_session
        tokens_np = enc.tokenizer([CAPTION] * TEXT_BATCH)
        fns["image"][key] = lambda s=s_img, x=images_np: s.run(["embedding"], {"image": x})
        fns["text"][key] = lambda s=s_txt, t=tokens_np: s.run(["embedding"], {"text": t})
    return fns


def measure_medians(fns: Mapping[str, Mapping[str, Callable[[], Any]]], deadline: float,
                    rounds: int = 30) -> dict[str, dict[str, float]]:
    """Interleaved timings per tower; the image tower gets most of the time left before ``deadline``."""
    from tbps_compress.bench.latency import interleaved

    now = time.perf_counter()
    text_deadline = now + max(3.0, 0.25 * (deadline - now))
    medians = {}
    text = interleaved(fns["text"], warmup=3, rounds=rounds, calls_per_round=5, deadline=text_deadline)
    medians["text"] = {k: t.p50 for k, t in text.items()}
    image = interleaved(fns["image"], warmup=1, rounds=rounds, calls_per_round=1, deadline=deadline)
    medians["image"] = {k: t.p50 for k, t in image.items()}
    log.info("timed %d text rounds, %d image rounds", text[next(iter(text))].n // 5, image[next(iter(image))].n)
    return medians


def machine_info(threads: int) -> dict[str, Any]:
    import onnxruntime
    import torch

    from tbps_compress.bench.latency import cpu_name

    return {"cpu": cpu_name(), "cpu_count": os.cpu_count(), "threads": threads, "python": platform.python_version(),
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
            "date": time.strftime("%Y-%m-%d", time.gmtime())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--baseline", type=Path, default=BASELINE, help="floors JSON (default: %(default)s)")
    p.add_argument("--update-baseline", action="store_true", help="write floors = fraction x measured ratios")
    p.add_argument("--fraction", type=float, default=DEFAULT_FRACTION, help="floor fraction for --update-baseline")
    p.add_argument("--threads", type=int, default=None,
                   help="intra-op threads for PyTorch and onnxruntime (default 1, see the module docs)")
    p.add_argument("--budget-s", type=float, default=95.0,
                   help="stop timing when this many seconds have passed since start (default %(default)s)")
    p.add_argument("--rounds", type=int, default=30, help="interleaved rounds per tower, at most (default %(default)s)")
    p.add_argument("--json", type=Path, default=None, help="also write medians and ratios here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    start = time.perf_counter()

    baseline = None
    if not args.update_baseline:
        try:
            baseline = json.loads(args.baseline.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            print(f"ci_latency: cannot read the baseline {args.baseline} ({exc}); create it with --update-baseline",
                  file=sys.stderr)
            return 1

    import torch

    threads = args.threads or 1
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory(prefix="ci-latency-") as tmp:
        fns = build_candidates(Path(tmp), threads)
        setup_s = time.perf_counter() - start
        deadline = start + args.budget_s
        if deadline - time.perf_counter() < 12:
            deadline = time.perf_counter() + 12  # always leave time for a few rounds
        medians = measure_medians(fns, deadline, rounds=args.rounds)
    ratios = compute_ratios(medians)
    elapsed = time.perf_counter() - start
    info = machine_info(threads)
    if args.json is not None:
        args.json.write_text(json.dumps({"medians_ms": medians, "ratios": ratios, "elapsed_s": elapsed,
                                         "setup_s": setup_s, "machine": info}, indent=2) + "\n")
    if args.update_baseline:
        new = make_baseline(ratios, args.fraction, info)
        args.baseline.write_text(json.dumps(new, indent=2) + "\n", encoding="utf-8")
        print(format_table(medians, ratios, new))
        print(f"ci_latency: wrote {args.baseline} ({elapsed:.0f} s, setup {setup_s:.0f} s)")
        return 0
    assert baseline is not None
    print(format_table(medians, ratios, baseline))
    failures = check_floors(ratios, baseline)
    print(f"ci_latency: {elapsed:.0f} s (setup {setup_s:.0f} s), {threads} threads, {info['cpu']}")
    if failures:
        print("ci_latency: FAILED: a speed ratio fell below its floor in " + str(args.baseline) + ":",
              file=sys.stderr)
        for f in failures:
            print(f"  - {f}", file=sys.stderr)
        print("If the slowdown is intended, re-measure the floors with --update-baseline and commit them.",
              file=sys.stderr)
        return 1
    print("ci_latency: all ratios are above their floors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
