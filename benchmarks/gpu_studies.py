"""The studies' GPU run: the reference teacher trained on the GPU, its student distilled and the teacher pruned
(with recovery), teacher and student exported, all benchmarked there (PyTorch fp32 / fp16 / bf16, optionally
compiled; onnxruntime's CUDA and TensorRT providers where present). One prepared run for a lent GPU machine,
bounded by per-stage time budgets (about 8 minutes in all).

    PYTHONPATH=. python -m benchmarks.gpu_studies --data data/synthpedes --out "$OUT/gpu-studies"
    python -m benchmarks.gpu_studies --data tests-data --out /tmp/dry --dry-run     # CPU, tiny model, 2 steps

Every stage is the ordinary command (`tbps-compress train / distill / export / bench`) with `--set` overrides:
`recipes/teacher/synth-reference.yaml` (device, bf16 autocast, DataLoader workers, a training-time budget) and
`recipes/distill/synth-stripe-gru-student.yaml` and `recipes/prune/synth-stripe-gru.yaml` (the teacher just
trained; the pruning's recovery rounds share one time budget). `--dry-run` runs the same commands on the CPU with
the tiny stripe-gru config, two steps per training, the student's export only and short timings: what the tests
run, so the GPU run cannot fail on a typo.

Writes, under --out: `summary.md` / `summary.json` (each stage's command, exit code, wall time and metrics) and the
bench table (`bench/bench.md`, `.csv`, `.json`, `pareto.png`); the artifacts go to `--work` (default OUT/work).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

TEACHER = "recipes/teacher/synth-reference.yaml"
STUDENT = "recipes/distill/synth-stripe-gru-student.yaml"
PRUNED = "recipes/prune/synth-stripe-gru.yaml"


def plan(data: Path, work: Path, out: Path, device: str, dry_run: bool, teacher_s: float, student_s: float,
         compile_: bool, pruned_s: float = 50.0) -> list[tuple[str, Path, list[str]]]:
    """The (name, output folder, tbps-compress arguments) of every stage, in order."""
    common = ["--force", "--set", f"data.root={data}", "--set", f"device={device}"]
    if device.startswith("cuda"):
        common += ["--set", "optim.precision=bf16", "--set", "data.num_workers=8"]
    tiny: list[str] = []
    if dry_run:
        tiny = ["--set", "optim.max_steps=2", "--set", "optim.batch_size=8", "--set", "eval.batch_size=32",
                "--set", "eval.curve_every_steps=null"]
    teacher = work / "reference"
    student = work / "student"
    pruned = work / "pruned"
    stages = [
        ("teacher", teacher, ["train", TEACHER, *common, *tiny, "--set", f"output={teacher}",
                     "--set", f"optim.time_budget_s={teacher_s}",
                     *(["--set", "model.config=test-tiny-stripe-gru"] if dry_run else [])]),
        ("student", student, ["distill", STUDENT, *common, *tiny, "--set", f"output={student}",
                     "--set", f"teacher.artifact={teacher}", "--set", f"optim.time_budget_s={student_s}",
                     *(["--set", "student.config=test-tiny-stripe-gru"] if dry_run else [])]),
        ("pruned", pruned, ["prune", PRUNED, *common, *tiny, "--set", f"output={pruned}",
                    "--set", f"teacher.artifact={teacher}", "--set", f"optim.time_budget_s={pruned_s / 2}",
                    *(["--set", "prune.recovery_steps=1", "--set", "prune.taylor_batch=8"] if dry_run else [])]),
    ]
    # the dry run exports the student only: the teacher's export is the same command on another folder, and an
    # export of a GRU graph costs the CPU about a minute
    for name, src in (("teacher", teacher), ("student", student))[1 if dry_run else 0:]:
        dest = work / f"{name}-onnx"
        stages.append((f"{name}-onnx", dest, ["export", str(src), "--out", str(dest), "--force",
                                              *([] if dry_run else ["--fp16"])]))
    bench = ["bench", str(teacher), str(student), str(pruned), *([] if dry_run else [str(work / "teacher-onnx")]),
             str(work / "student-onnx"),
             "--data", str(data), "--device", device, "--runtimes", "torch,onnxruntime", "--batch", "1,32",
             "--out", str(out / "bench"), "--force"]
    if dry_run:
        bench += ["--reps", "2", "--warmup", "1", "--gallery-size", "100"]
    if compile_ and device.startswith("cuda"):
        bench.append("--compile")
    stages.append(("bench", out / "bench", bench))
    return stages


def _metrics(folder: Path) -> dict[str, Any]:
    path = folder / "metrics.json"
    if not path.is_file():
        return {}
    m = json.loads(path.read_text(encoding="utf-8"))
    test = m.get("test") or {}
    return {k: v for k, v in {"steps": m.get("steps"), "train_seconds": m.get("train_seconds"),
                              "R1": test.get("R1"), "mAP": test.get("mAP")}.items() if v is not None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="SynthPedes root (the benchmark preset)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=None, help="artifact folder (default OUT/work)")
    ap.add_argument("--device", default=None, help="default: cuda, or cpu with --dry-run")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny model, two steps: checks the commands")
    ap.add_argument("--teacher-s", type=float, default=210.0, help="training-time budget of the teacher")
    ap.add_argument("--student-s", type=float, default=90.0, help="training-time budget of the student")
    ap.add_argument("--pruned-s", type=float, default=50.0, help="training-time budget of the pruning's recovery "
                                                                   "(both rounds together)")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile in the bench")
    args = ap.parse_args(argv)
    device = args.device or ("cpu" if args.dry_run else "cuda")
    if not (args.data / "reid_raw.json").is_file():
        raise SystemExit(f"error: --data {args.data}: no reid_raw.json there; generate it with `tbps-compress synth "
                         f"{args.data} --preset benchmark --size 128x64`")
    work = args.work or args.out / "work"
    args.out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    rows: list[dict[str, Any]] = []
    stages = plan(args.data, work, args.out, device, args.dry_run, args.teacher_s, args.student_s, args.compile,
                  args.pruned_s)
    for name, folder, cmd in stages:
        t0 = time.time()
        with open(args.out / f"{name}.log", "w", encoding="utf-8") as log:
            rc = subprocess.run([sys.executable, "-m", "tbps_compress.cli", *cmd], stdout=log,
                                stderr=subprocess.STDOUT, env=env).returncode
        row = {"stage": name, "command": "tbps-compress " + " ".join(cmd), "exit": rc,
               "wall_s": round(time.time() - t0, 1), **_metrics(folder)}
        rows.append(row)
        print(f"{name}: exit {rc} in {row['wall_s']} s", flush=True)
        if rc != 0:
            break
    lines = [f"# GPU studies run ({'dry run, ' if args.dry_run else ''}device {device})", "",
             "| stage | exit | wall s | steps | train s | R@1 | mAP |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['stage']} | {r['exit']} | {r['wall_s']} | {r.get('steps', '')} | "
                     f"{r.get('train_seconds', '')} | {r.get('R1', '')} | {r.get('mAP', '')} |")
    lines += ["", "Commands:", ""] + [f"- `{r['command']}`" for r in rows]
    (args.out / "summary.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (args.out / "summary.json").write_text(json.dumps({"device": device, "dry_run": args.dry_run, "stages": rows},
                                                      indent=2) + "\n", encoding="utf-8")
    return 0 if all(r["exit"] == 0 for r in rows) and len(rows) == len(stages) else 1


if __name__ == "__main__":
    raise SystemExit(main())
