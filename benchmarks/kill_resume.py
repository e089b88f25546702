"""SIGKILL training and distillation at random moments, resume, and check nothing was lost or half written.

Each trial starts ``tbps-compress train`` (or ``distill``) as a subprocess on a tiny recipe (``test-tiny`` on a
tiny SynthPedes, a checkpoint every step), kills it with SIGKILL after a random delay, then continues with
``--resume`` (killed again now and then). When a kill landed before the first checkpoint, ``--resume`` must say
there is no checkpoint; the run then starts afresh without it. After every kill:

- the output folder either does not exist or is a complete artifact (``lineage.json`` present and every file
  matching its hash: :func:`tbps_compress.artifacts.verify_artifact`);
- leftovers next to it are only hidden temporaries (``.NAME.tmp-*``, ``.NAME.old-*``), never at the output path;
- ``NAME.ckpt/last.ckpt``, when present, is a whole checkpoint matching its recorded SHA-256.

When the trial finishes, every tensor of ``weights.safetensors`` must equal (``torch.equal``) that of an
uninterrupted reference run, the training logs must agree, and no temporary is left behind.

    python benchmarks/kill_resume.py [--trials 5] [--stages train,distill] [--seed 0] [--keep DIR] [--out FILE]

Exit code 0 when every trial passed, 1 otherwise. CPU only; about 30 s per trial on 2 cores.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CLI = Path(sys.executable).parent / "tbps-compress"
NO_CHECKPOINT = "no checkpoint to resume from"
FINISHED = "this run already finished"


# ------------------------------------------------------------------------------------------------ setup
def make_dataset(root: Path) -> Path:
    """Tiny SynthPedes: 16 identities x 3 images x 2 captions at 64x32 (train 72 captions)."""
    from tbps_compress.data.synthpedes import generate

    generate(root, identities=16, images_per_id=3, captions_per_image=2, size=(64, 32), seed=0, workers=1)
    return root


def train_recipe(data: Path, output: Path, every: int) -> dict[str, Any]:
    return {
        "output": str(output), "seed": 0, "device": "cpu", "data": {"root": str(data)},
        "model": {"config": "test-tiny"},
        "losses": {"n_itc": {"weight": 1.0}, "r_itc": {"weight": 1.0}},
        "tricks": {"text_attn_dropout": 0.1},
        "optim": {"epochs": 2, "batch_size": 8, "lr": 1e-3, "min_lr": 1e-5, "warmup_epochs": 0.5},
        "eval": {"batch_size": 64},
        "checkpoint_every_steps": every,
    }


def distill_recipe(data: Path, output: Path, teacher: Path, every: int) -> dict[str, Any]:
    return {
        "output": str(output), "seed": 0, "device": "cpu", "data": {"root": str(data)},
        "teacher": {"artifact": str(teacher), "cache": str(output.parent / "teacher-cache.safetensors"),
                    "cache_dtype": "float32"},
        "student": {"config": "test-tiny", "inline": {"vision": {"width": 32, "heads": 2}, "text": {"width": 32}},
                    "init": "inherit", "vocab_prune": True},
        "losses": {"n_itc": {"weight": 0.5}, "r_itc": {}, "kd_feature": {}, "kd_affinity": {}, "kd_interactive": {}},
        "optim": {"epochs": 2, "batch_size": 8, "lr": 1e-4, "min_lr": 1e-6},
        "eval": {"batch_size": 64},
        "checkpoint_every_steps": every,
    }


def write_recipe(path: Path, data: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------ running
def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "120"}


@dataclass
class Run:
    code: int | None  # None: killed
    seconds: float
    stderr: str
    first_ckpt_s: float | None = None
    in_ckpt_write: bool = False  # last.ckpt.tmp existed when the kill landed


def run_cli(stage: str, recipe: Path, *, resume: bool, kill_after: float | None, log_dir: Path,
            at_write: bool = False) -> Run:
    """Run ``tbps-compress STAGE RECIPE [--resume]``; SIGKILL it after ``kill_after`` seconds (None: let it end),
    with ``at_write`` at the first moment after that when a checkpoint is being written (``last.ckpt.tmp``)."""
    out = Path(yaml.safe_load(recipe.read_text())["output"])
    ckpt = out.parent / f"{out.name}.ckpt" / "last.ckpt"
    log_dir.mkdir(parents=True, exist_ok=True)
    err_path = log_dir / f"stderr-{time.monotonic_ns()}.txt"
    args = [str(CLI), stage, str(recipe), *(["--resume"] if resume else [])]
    t0 = time.monotonic()
    first = None
    with open(os.devnull, "w") as devnull, open(err_path, "w") as err:
        proc = subprocess.Popen(args, stdout=devnull, stderr=err, env=_env())
        while proc.poll() is None:
            now = time.monotonic() - t0
            if first is None and ckpt.exists():
                first = now
            if kill_after is not None and now >= kill_after:
                during = ckpt.with_name(ckpt.name + ".tmp").exists()
                if during or not at_write:
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    return Run(None, now, err_path.read_text(), first, during)
            time.sleep(0.001 if at_write and kill_after is not None and now >= kill_after else 0.01)
    return Run(proc.returncode, time.monotonic() - t0, err_path.read_text(), first)


def check_after_kill(out: Path) -> dict[str, Any]:
    """The invariants a kill must keep; returns what was found (raises AssertionError on a violation)."""
    import torch

    from tbps_compress.artifacts import LINEAGE, open_artifact, verify_artifact
    from tbps_compress.errors import ArtifactError

    found: dict[str, Any] = {"artifact": False, "checkpoint_step": None, "temporaries": []}
    if out.exists():
        assert (out / LINEAGE).is_file(), f"{out} exists without {LINEAGE}: a half-written artifact"
        verify_artifact(out)
        found["artifact"] = True
    else:
        try:
            open_artifact(out)
        except ArtifactError:
            pass
        else:
            raise AssertionError(f"{out} is missing yet opened as an artifact")
    for p in out.parent.iterdir():
        if p.name.startswith(f".{out.name}.tmp-") or p.name.startswith(f".{out.name}.old-"):
            found["temporaries"].append(p.name)
        elif p.name.startswith(out.name) and p.name not in (out.name, f"{out.name}.ckpt"):
            raise AssertionError(f"unexpected {p} next to the output")
    ckpt = out.parent / f"{out.name}.ckpt" / "last.ckpt"
    if ckpt.exists():
        from tbps_compress.artifacts import sha256_file

        digests = json.loads(ckpt.with_name("last.ckpt.sha256").read_text())["sha256"]
        assert sha256_file(ckpt) in digests, f"{ckpt} does not match its recorded digest"
        state = torch.load(ckpt, map_location="cpu", weights_only=True)["state"]
        found["checkpoint_step"] = int(state["global_step"])
    return found


def _log_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return [{k: v for k, v in row.items() if k != "samples_per_s"} for row in csv.DictReader(f)]


def compare(reference: Path, result: Path) -> list[str]:
    """Differences between two finished artifacts (weights bit for bit, step count, training log)."""
    import torch
    from safetensors.torch import load_file

    problems = []
    a, b = load_file(str(reference / "weights.safetensors")), load_file(str(result / "weights.safetensors"))
    if a.keys() != b.keys():
        problems.append(f"tensor names differ: {sorted(set(a) ^ set(b))[:5]}")
    problems += [f"tensor {k} differs" for k in a if k in b and not torch.equal(a[k], b[k])]
    ma, mb = (json.loads((p / "metrics.json").read_text()) for p in (reference, result))
    for key in ("steps", "test", "val_best"):
        if ma.get(key) != mb.get(key):
            problems.append(f"metrics.json '{key}' differs: {ma.get(key)} vs {mb.get(key)}")
    if _log_rows(reference / "train_log.csv") != _log_rows(result / "train_log.csv"):
        problems.append("train_log.csv differs")
    return problems


@dataclass
class Trial:
    stage: str
    index: int
    kills: list[dict[str, Any]] = field(default_factory=list)
    fresh_restarts: int = 0
    runs: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def kill_resume_trial(stage: str, index: int, recipe: Path, reference: Path, rng: random.Random,
                      window: list[float], max_kills: int = 3) -> Trial:
    """Kill once (and again with probability 1/2 per run, up to ``max_kills``), resume to the end, compare.
    ``window``: [earliest, first checkpoint, end] in seconds after the start; a kill lands in the first part with
    probability 1/4, else in the second (a third of those at the next checkpoint write). When the first run of the
    trial ends before its kill (the machine got faster), the window shrinks to that run and the trial starts over."""
    trial = Trial(stage, index)
    out = Path(yaml.safe_load(recipe.read_text())["output"])
    logs = out.parent / "logs"
    resume = False
    while True:
        kill = len(trial.kills) == 0 or (len(trial.kills) < max_kills and rng.random() < 0.5)
        delay, at_write = None, False
        if kill:  # mostly while training (checkpoints exist), sometimes during start-up (none yet)
            lo, first, end = window
            late = rng.random() < 0.75
            delay = rng.uniform(first, end) if late else rng.uniform(lo, first)
            at_write = late and rng.random() < 1 / 3
        run = run_cli(stage, recipe, resume=resume, kill_after=delay, log_dir=logs, at_write=at_write)
        trial.runs += 1
        if run.code is None:
            state = check_after_kill(out)
            trial.kills.append({"after_s": round(run.seconds, 2), "resume_run": resume,
                                "during_checkpoint_write": run.in_ckpt_write, **state})
            resume = True
            continue
        if run.code == 0 and not trial.kills:  # ended before its kill: recalibrate and start over
            window[2] = 0.95 * run.seconds
            window[1] = min(window[1], run.first_ckpt_s or window[1], 0.8 * window[2])
            window[0] = min(window[0], 0.5 * window[1])
            shutil.rmtree(out)
            trial.runs = 0
            continue
        if run.code == 0:
            break
        if resume and run.code == 2 and NO_CHECKPOINT in run.stderr:
            ckpt = out.parent / f"{out.name}.ckpt" / "last.ckpt"
            if ckpt.exists():
                trial.problems.append(f"--resume said there is no checkpoint but {ckpt} exists")
                return trial
            trial.fresh_restarts += 1
            resume = False
            continue
        if resume and run.code == 2 and FINISHED in run.stderr and (out / "lineage.json").is_file():
            break  # the kill landed after the artifact was complete (while cleaning up the checkpoint folder)
        lines = [ln for ln in run.stderr.splitlines() if ln.strip()]
        trial.problems.append(f"run {trial.runs} exited {run.code}: {lines[-3:]}")
        return trial
    trial.problems += compare(reference, out)
    left = sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))
    if left:
        trial.problems.append(f"temporaries left behind after completion: {left}")
    if (out.parent / f"{out.name}.ckpt" / "last.ckpt").exists():
        trial.problems.append("the checkpoint folder was not cleaned up")
    return trial


# ------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=5, help="Trials per stage.")
    ap.add_argument("--stages", default="train,distill", help="train and/or distill, comma-separated.")
    ap.add_argument("--seed", type=int, default=0, help="Seed of the kill delays.")
    ap.add_argument("--every", type=int, default=1, help="checkpoint_every_steps of the recipes.")
    ap.add_argument("--keep", type=Path, default=None, help="Work here and keep the files (default: a temp dir).")
    ap.add_argument("--out", type=Path, default=None, help="Also write the results as JSON here.")
    args = ap.parse_args(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    if not set(stages) <= {"train", "distill"} or args.trials < 1:
        ap.error("--stages takes train and/or distill; --trials must be >= 1")
    rng = random.Random(args.seed)
    work = args.keep or Path(tempfile.mkdtemp(prefix="kill_resume-"))
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    results: dict[str, Any] = {"trials": [], "reference": {}}
    try:
        data = make_dataset(work / "data") if not (work / "data" / "reid_raw.json").exists() else work / "data"
        ref_train = work / "ref" / "train"
        teacher = ref_train
        for stage in ["train", *[s for s in stages if s == "distill"]]:
            out = work / "ref" / stage
            shutil.rmtree(out, ignore_errors=True)
            recipe = write_recipe(work / "recipes" / f"ref-{stage}.yaml",
                                  train_recipe(data, out, args.every) if stage == "train"
                                  else distill_recipe(data, out, teacher, args.every))
            run = run_cli(stage, recipe, resume=False, kill_after=None, log_dir=work / "ref" / "logs")
            if run.code != 0:
                print(f"reference {stage} run failed ({run.code}):\n{run.stderr[-2000:]}", file=sys.stderr)
                return 1
            results["reference"][stage] = {"seconds": round(run.seconds, 1),
                                           "first_checkpoint_s": round(run.first_ckpt_s or 0.0, 1)}
            print(f"reference {stage}: {run.seconds:.1f} s, first checkpoint after {run.first_ckpt_s or 0:.1f} s",
                  flush=True)
        for stage in stages:
            ref = results["reference"][stage]
            # from well before the first checkpoint (import, data, model) to the very end (eval, artifact write)
            window = [0.3 * ref["first_checkpoint_s"], ref["first_checkpoint_s"], ref["seconds"]]
            for i in range(args.trials):
                out = work / f"{stage}-{i}" / "out"
                shutil.rmtree(out.parent, ignore_errors=True)
                recipe = write_recipe(out.parent / "recipe.yaml",
                                      train_recipe(data, out, args.every) if stage == "train"
                                      else distill_recipe(data, out, teacher, args.every))
                trial = kill_resume_trial(stage, i, recipe, work / "ref" / stage, rng, window)
                results["trials"].append({"stage": stage, "trial": i, "ok": trial.ok, "runs": trial.runs,
                                          "fresh_restarts": trial.fresh_restarts, "kills": trial.kills,
                                          "problems": trial.problems})
                kills = ", ".join(
                    f"{k['after_s']:.1f}s->" + ("artifact" if k["artifact"] else
                                               f"ckpt@{k['checkpoint_step']}" if k["checkpoint_step"] is not None
                                               else "no ckpt") + ("(mid-write)" if k["during_checkpoint_write"] else "")
                    for k in trial.kills)
                print(f"{stage} trial {i}: {'PASS' if trial.ok else 'FAIL'}  kills [{kills}]  runs {trial.runs}  "
                      f"fresh restarts {trial.fresh_restarts}" + (f"  problems {trial.problems}" if trial.problems
                                                                   else ""), flush=True)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    trials = results["trials"]
    passed = sum(t["ok"] for t in trials)
    all_kills = [k for t in trials for k in t["kills"]]
    results["summary"] = {
        "trials": len(trials), "passed": passed, "kills": len(all_kills),
        "kills_before_first_checkpoint": sum(k["checkpoint_step"] is None and not k["artifact"] for k in all_kills),
        "kills_during_checkpoint_write": sum(k["during_checkpoint_write"] for k in all_kills),
        "kills_after_artifact_complete": sum(k["artifact"] for k in all_kills),
        "seconds": round(time.monotonic() - t_start, 1),
    }
    print(json.dumps(results["summary"]))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0 if passed == len(trials) else 1


if __name__ == "__main__":
    sys.exit(main())
