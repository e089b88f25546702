"""Faults: SIGKILL at random moments during training and distillation (resume reaches the uninterrupted run's
weights bit for bit, no artifact is ever half written), checkpoints and artifacts changed after writing (refused
on load), a full disk or an unwritable output (a clear one-line error, the previous checkpoint kept).

The fast tests kill each stage once, shortly after its first checkpoint; the ``slow`` ones run more trials at
random delays (also before the first checkpoint) as ``benchmarks/kill_resume.py`` does.
"""

from __future__ import annotations

import csv
import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

CONSOLE_SCRIPT = Path(sys.executable).parent / "tbps-compress"
TEST_THREADS = os.environ.get("TBPS_TEST_THREADS", "1")  # as in conftest: the same threads in-process and out
KILL_TIMEOUT_S = 120


# ------------------------------------------------------------------------------------------------ helpers
def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": TEST_THREADS, "COLUMNS": "120"}


def _work(out: Path) -> Path:
    return out.parent / f"{out.name}.ckpt"


def start(stage: str, recipe: Path, *extra: str, log: Path) -> subprocess.Popen:
    with open(log, "ab") as f:
        return subprocess.Popen([str(CONSOLE_SCRIPT), stage, str(recipe), *extra], stdout=subprocess.DEVNULL,
                                stderr=f, env=_env())


def kill_after_first_checkpoint(proc: subprocess.Popen, out: Path, extra_delay: float) -> dict[str, Any]:
    """SIGKILL ``proc`` ``extra_delay`` seconds after ``OUT.ckpt/last.ckpt`` first appears."""
    ckpt = _work(out) / "last.ckpt"
    t0 = time.monotonic()
    while not ckpt.exists():
        assert proc.poll() is None, f"the run ended (code {proc.returncode}) before its first checkpoint"
        assert time.monotonic() - t0 < KILL_TIMEOUT_S, "no checkpoint within the time limit"
        time.sleep(0.01)
    time.sleep(extra_delay)
    mid_write = ckpt.with_name("last.ckpt.tmp").exists()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return {"after_first_checkpoint_s": extra_delay, "mid_write": mid_write}


def kill_at(proc: subprocess.Popen, delay: float) -> bool:
    """SIGKILL ``proc`` after ``delay`` seconds; False when it ended by itself before."""
    try:
        proc.wait(timeout=delay)
        return False
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return True


def check_after_kill(out: Path) -> int | None:
    """The output is absent or a complete, hash-verified artifact; temporaries are hidden siblings; the checkpoint,
    if any, matches its recorded digest and loads. Returns the checkpoint's step (None: no checkpoint)."""
    from tbps_compress.artifacts import open_artifact, sha256_file, verify_artifact
    from tbps_compress.errors import ArtifactError

    if out.exists():
        assert (out / "lineage.json").is_file(), f"{out} exists without lineage.json: half written"
        verify_artifact(out)
    else:
        with pytest.raises(ArtifactError):
            open_artifact(out)
    for p in out.parent.iterdir():
        if p.name.startswith(out.name) and p.name not in (out.name, f"{out.name}.ckpt"):
            raise AssertionError(f"{p}: looks like the output but is not it")
        if ".tmp-" in p.name:
            assert p.name.startswith(f".{out.name}.tmp-"), p
            with pytest.raises(ArtifactError):  # never loadable under the output's name
                open_artifact(out.parent / p.name.split(".tmp-")[0].lstrip("."))
    ckpt = _work(out) / "last.ckpt"
    if not ckpt.exists():
        return None
    digests = json.loads(ckpt.with_name("last.ckpt.sha256").read_text())["sha256"]
    assert sha256_file(ckpt) in digests
    return int(torch.load(ckpt, map_location="cpu", weights_only=True)["state"]["global_step"])


def _log_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return [{k: v for k, v in row.items() if k != "samples_per_s"} for row in csv.DictReader(f)]


def assert_same_run(reference: Path, result: Path) -> None:
    wa, wb = load_file(str(reference / "weights.safetensors")), load_file(str(result / "weights.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"tensor {k} differs from the uninterrupted run"
    ma, mb = (json.loads((p / "metrics.json").read_text()) for p in (reference, result))
    assert ma["steps"] == mb["steps"] and ma["test"] == mb["test"] and ma["val_best"] == mb["val_best"]
    assert _log_rows(reference / "train_log.csv") == _log_rows(result / "train_log.csv")
    left = [p.name for p in result.parent.iterdir() if p.name.startswith(f".{result.name}.")]
    assert not left, f"temporaries left behind: {left}"
    assert not _work(result).exists(), "the checkpoint folder is removed once the artifact is written"


def train_recipe(data: Path, out: Path) -> dict[str, Any]:
    return {  # 72 training captions / 8 = 9 steps an epoch, 27 in all, a checkpoint after each
        "output": str(out), "seed": 0, "device": "cpu", "data": {"root": str(data)}, "model": {"config": "test-tiny"},
        "losses": {"n_itc": {"weight": 1.0}, "r_itc": {"weight": 1.0}}, "tricks": {"text_attn_dropout": 0.1},
        "optim": {"epochs": 3, "batch_size": 8, "lr": 1e-3, "min_lr": 1e-5, "warmup_epochs": 0.5},
        "eval": {"batch_size": 64}, "checkpoint_every_steps": 1,
    }


def distill_recipe(data: Path, teacher: Path, out: Path) -> dict[str, Any]:
    return {
        "output": str(out), "seed": 0, "device": "cpu", "data": {"root": str(data)},
        "teacher": {"artifact": str(teacher), "cache": str(out.parent / "teacher-cache.safetensors"),
                    "cache_dtype": "float32"},
        "student": {"config": "test-tiny", "inline": {"vision": {"width": 32, "heads": 2}, "text": {"width": 32}},
                    "init": "inherit", "vocab_prune": True},
        "losses": {"n_itc": {"weight": 0.5}, "r_itc": {}, "kd_feature": {}, "kd_affinity": {}, "kd_interactive": {}},
        "optim": {"epochs": 3, "batch_size": 8, "lr": 1e-4, "min_lr": 1e-6},
        "eval": {"batch_size": 64},
        "checkpoint_every_steps": 1,
    }


def _recipe(folder: Path, data: dict[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def references(tiny_dataset: Path, tiny_teacher_artifact: Path, tmp_path_factory: pytest.TempPathFactory):
    """Uninterrupted train and distill runs (in-process; same code path and thread count as the console script)."""
    from tbps_compress.compress.distill import DistillRecipe, run_distill
    from tbps_compress.engine.train import Trainer
    from tbps_compress.recipes import TrainRecipe

    root = tmp_path_factory.mktemp("reference")
    train = Trainer(TrainRecipe.model_validate(train_recipe(tiny_dataset, root / "train"))).run()
    distill = run_distill(DistillRecipe.model_validate(distill_recipe(tiny_dataset, tiny_teacher_artifact,
                                                                      root / "distill")))
    return {"train": train, "distill": distill}


def _stage_recipe(stage: str, refs, tiny_dataset: Path, teacher: Path, out: Path) -> Path:
    data = train_recipe(tiny_dataset, out) if stage == "train" else distill_recipe(tiny_dataset, teacher, out)
    return _recipe(out.parent, data)


# ------------------------------------------------------------------------------------------------ SIGKILL + resume
@pytest.mark.parametrize("stage", ["train", "distill"])
def test_sigkill_then_resume_reaches_the_uninterrupted_weights(stage: str, references, tiny_dataset: Path,
                                                                tiny_teacher_artifact: Path, tmp_path: Path,
                                                                run_cli) -> None:
    out = tmp_path / "run" / "out"
    recipe = _stage_recipe(stage, references, tiny_dataset, tiny_teacher_artifact, out)
    proc = start(stage, recipe, log=tmp_path / "stderr.txt")
    # the kill must land before the run ends: 26 more steps follow the first checkpoint
    info = kill_after_first_checkpoint(proc, out, extra_delay=random.uniform(0.0, 0.15))
    step = check_after_kill(out)
    assert step is not None and not out.exists(), info
    # what a kill in the middle of the next checkpoint write leaves: partial temporaries, ignored on resume
    ckpt = _work(out) / "last.ckpt"
    ckpt.with_name("last.ckpt.tmp").write_bytes(ckpt.read_bytes()[:1000])
    ckpt.with_name("last.ckpt.sha256.tmp").write_text('{"sha256": ["0')
    code, _, err = run_cli([stage, recipe, "--resume"])
    assert code == 0, (info, err)
    assert_same_run(references[stage], out)


@pytest.mark.slow
@pytest.mark.parametrize("trial", [0, 1])
@pytest.mark.parametrize("stage", ["train", "distill"])
def test_sigkill_at_random_moments(stage: str, trial: int, references, tiny_dataset: Path,
                                   tiny_teacher_artifact: Path, tmp_path: Path) -> None:
    """Kill at a random moment (start-up included), again now and then; resume (or start afresh when the kill
    came before the first checkpoint: --resume must say so) until the run ends."""
    rng = random.Random(1000 * trial + (stage == "distill"))
    out = tmp_path / "run" / "out"
    recipe = _stage_recipe(stage, references, tiny_dataset, tiny_teacher_artifact, out)
    log = tmp_path / "stderr.txt"
    kills: list[tuple[float, int | None]] = []
    resume = False
    latest = 10.0  # seconds; shortened when a run ends before its first kill (a faster machine)
    for _ in range(10):
        delay = rng.uniform(1.0, latest) if len(kills) < 1 or (len(kills) < 3 and rng.random() < 0.5) else None
        log.write_text("")
        proc = start(stage, recipe, *(["--resume"] if resume else []), log=log)
        if delay is not None and kill_at(proc, delay):
            kills.append((delay, check_after_kill(out)))
            resume = True
            continue
        proc.wait(timeout=KILL_TIMEOUT_S)
        err = log.read_text()
        if proc.returncode == 0 and not kills:  # not killed yet: start over, killing sooner
            shutil.rmtree(out)
            latest *= 0.6
            continue
        if proc.returncode == 0:
            break
        assert proc.returncode == 2 and resume, (kills, err)
        if "no checkpoint to resume from" in err:
            assert not (_work(out) / "last.ckpt").exists(), (kills, err)
            resume = False
            continue
        assert "this run already finished" in err and (out / "lineage.json").is_file(), (kills, err)
        break
    else:
        raise AssertionError(f"did not finish: kills {kills}")
    assert kills
    assert_same_run(references[stage], out)


# ------------------------------------------------------------------------------------------------ changed bytes
@pytest.fixture
def prepared(make_train_recipe, tmp_path: Path):
    """A prepared trainer (no training) whose run writes ``tmp_path/run``; its checkpoint path."""
    from tbps_compress.engine.train import Trainer

    recipe = make_train_recipe(tmp_path / "run")
    tr = Trainer(recipe)
    tr.prepare()
    ckpt = _work(tmp_path / "run") / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    return tr, ckpt, recipe


def test_checkpoint_changed_after_writing_is_refused(prepared, tmp_path: Path, run_cli) -> None:
    from tbps_compress.config import dump_recipe
    from tbps_compress.engine.train import TrainState

    tr, ckpt, recipe = prepared
    tr._save_checkpoint(ckpt, TrainState(epoch=0, step_in_epoch=1, global_step=1), None)
    raw = bytearray(ckpt.read_bytes())
    raw[len(raw) // 2] ^= 0x01  # one bit in the tensor data: torch.load alone would not notice
    ckpt.write_bytes(bytes(raw))
    dump_recipe(recipe, tmp_path / "r.yaml")
    code, out, err = run_cli(["train", tmp_path / "r.yaml", "--resume"])
    assert code == 2 and "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert str(ckpt) in lines[0] and "does not match" in lines[0] and "last.ckpt.sha256" in lines[0]
    assert ckpt.read_bytes() == bytes(raw), "the refused checkpoint is left for the user to inspect"
    assert not (tmp_path / "run").exists()


def test_artifact_changed_after_writing_is_refused_by_eval(tiny_teacher_artifact: Path, tiny_dataset: Path,
                                                           tmp_path: Path, run_cli) -> None:
    art = tmp_path / "art"
    shutil.copytree(tiny_teacher_artifact, art)
    cfg = art / "model_config.json"
    data = json.loads(cfg.read_text())
    data["description"] = "edited after writing"
    cfg.write_text(json.dumps(data))
    code, out, err = run_cli(["eval", art, "--data", tiny_dataset, "--device", "cpu"])
    assert code == 2 and "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert str(cfg) in lines[0] and "lineage.json" in lines[0]


# ------------------------------------------------------------------------------------------------ full disk
def _no_space(*_args: Any, **_kwargs: Any) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def _read_only(*_args: Any, **_kwargs: Any) -> None:
    raise OSError(errno.EROFS, "Read-only file system")


def _torch_runtime_error(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
    f.write(b"PK\x03\x04 partial")  # what torch's zip writer does on a full disk given a path
    raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")


@pytest.mark.parametrize(("target", "fake", "needle"), [
    ("torch.save", _no_space, "No space left on device"),
    ("os.replace", _read_only, "Read-only file system"),
    ("torch.save", _torch_runtime_error, "unexpected pos"),
], ids=["disk-full", "read-only", "torch-writer-error"])
def test_failed_checkpoint_write_keeps_the_previous_one(prepared, monkeypatch, target: str, fake, needle: str) -> None:
    from tbps_compress.artifacts import sha256_file
    from tbps_compress.engine.train import TrainState
    from tbps_compress.errors import UserError

    tr, ckpt, _ = prepared
    tr._save_checkpoint(ckpt, TrainState(global_step=1), None)
    before = {p.name: p.read_bytes() for p in ckpt.parent.iterdir()}
    assert set(before) == {"last.ckpt", "last.ckpt.sha256"}
    module, name = target.split(".")
    monkeypatch.setattr({"torch": torch, "os": os}[module], name, fake)
    with pytest.raises(UserError) as info:
        tr._save_checkpoint(ckpt, TrainState(global_step=2), None)
    monkeypatch.undo()
    msg = str(info.value)
    assert str(ckpt) in msg and needle in msg and "previous checkpoint is kept" in msg and "\n" not in msg
    after = {p.name: p.read_bytes() for p in ckpt.parent.iterdir()}
    assert after == before, "the previous checkpoint (and its digest) must be intact, no temporary left"
    digests = json.loads((ckpt.parent / "last.ckpt.sha256").read_text())["sha256"]
    assert sha256_file(ckpt) in digests
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state"]
    assert state["global_step"] == 1


def test_full_disk_while_training_is_one_line(monkeypatch, train_recipe_data, tmp_path: Path, run_cli) -> None:
    """A full disk anywhere in the loop (here: the training log) ends the command with a one-line error."""
    from tbps_compress.engine import train as train_mod

    def full(self, row):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.path))

    monkeypatch.setattr(train_mod._CsvLog, "write", full)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(train_recipe_data(tmp_path / "run", optim={"max_steps": 1})))
    code, out, err = run_cli(["train", recipe])
    assert code == 2 and "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert "train_log.csv" in lines[0] and "No space left on device" in lines[0]
    assert not (tmp_path / "run").exists()


def test_full_disk_leaves_no_half_row_in_the_training_log(tmp_path: Path) -> None:
    """A full disk in the middle of a log row cuts the file back to its last whole row, so a resumed run's log
    (appended to the same file) still parses."""
    from tbps_compress.engine.train import _CsvLog

    path = tmp_path / "train_log.csv"
    log = _CsvLog(path)
    log.write({"step": 1, "loss": 4.5})
    before = path.read_bytes()

    class HalfWrite:
        def __init__(self, raw):
            self.raw = raw

        def write(self, data):
            self.raw.write(bytes(data[: len(data) // 2]))
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.raw, name)

    log._f = HalfWrite(log._f)
    with pytest.raises(OSError, match="No space left"):
        log.write({"step": 2, "loss": 4.25})
    assert path.read_bytes() == before
    log._f = log._f.raw
    log.write({"step": 3, "loss": 4.0})
    log.close()
    assert path.read_text().splitlines() == ["step,loss", "1,4.5", "3,4"]


def _tiny_checkpoint(path: Path) -> Path:
    from tbps_compress.models.factory import build_model

    torch.manual_seed(0)
    torch.save(build_model("test-tiny").state_dict(), path)
    return path


def test_full_disk_while_writing_an_artifact_keeps_the_previous_one(monkeypatch, tmp_path: Path, run_cli) -> None:
    import safetensors.torch
    from safetensors import SafetensorError

    from tbps_compress.artifacts import verify_artifact

    ck = _tiny_checkpoint(tmp_path / "ck.pt")
    out = tmp_path / "art"
    code, _, err = run_cli(["import", ck, "--config", "test-tiny", "--out", out])
    assert code == 0, err
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def full(*_args: Any, **_kwargs: Any) -> None:
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    code, _, err = run_cli(["import", ck, "--config", "test-tiny", "--out", out, "--force"])
    assert code == 2 and "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert "weights.safetensors" in lines[0] and "No space left on device" in lines[0]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    verify_artifact(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art", "ck.pt"], "no temporary left"


def test_stale_temporaries_of_a_killed_writer_are_removed(tmp_path: Path) -> None:
    """A writer killed mid-artifact leaves ``.NAME.tmp-PID-*``; the next writer of NAME removes it (its PID is
    gone) and never touches a live writer's."""
    from tbps_compress.artifacts import write_artifact

    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f".art.tmp-{dead.pid}-abc"
    stale.mkdir()
    (stale / "lineage.json").write_text("{}")
    live = tmp_path / f".art.tmp-{os.getppid()}-xyz"
    live.mkdir()
    with write_artifact(tmp_path / "art", stage="test") as tmp:
        (tmp / "x.txt").write_text("x")
    assert not stale.exists() and live.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["art", live.name])


# ------------------------------------------------------------------------------------------------ full disk: results
def _error_line(code: int, err: str) -> str:
    assert code == 2 and "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def _full_disk_for(prefix: str, real: Any) -> Any:
    """A stand-in for a write method that, for files whose name starts with ``prefix``, writes half and then
    fails the way a full disk does."""

    def write(self: Path, data: Any, *args: Any, **kwargs: Any) -> Any:
        if self.name.startswith(prefix):
            real(self, data[: len(data) // 2], *args, **kwargs)
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real(self, data, *args, **kwargs)

    return write


def test_full_disk_while_writing_eval_out_keeps_the_previous_file(monkeypatch, tiny_teacher_artifact: Path,
                                                                  tiny_dataset: Path, tmp_path: Path,
                                                                  run_cli) -> None:
    out = tmp_path / "m.json"
    out.write_text('{"R1": 1.0}\n')
    monkeypatch.setattr(Path, "write_text", _full_disk_for(".m.json.tmp-", Path.write_text))
    code, _, err = run_cli(["eval", tiny_teacher_artifact, "--data", tiny_dataset, "--device", "cpu", "--out", out,
                            "--force"])
    line = _error_line(code, err)
    assert line == (f"error: {out}: not written (No space left on device); the previous file is unchanged; free "
                    "space or choose a writable --out")
    assert out.read_text() == '{"R1": 1.0}\n' and sorted(p.name for p in tmp_path.iterdir()) == ["m.json"]


def test_full_disk_while_writing_bench_out_leaves_no_partial_folder(monkeypatch, tiny_teacher_artifact: Path,
                                                                    tmp_path: Path, run_cli) -> None:
    """The report's files are written into a hidden temporary folder: a full disk on the last of them (bench.md)
    leaves no folder named --out, and no temporary."""
    out = tmp_path / "results" / "bench"
    monkeypatch.setattr(Path, "write_text", _full_disk_for("bench.md", Path.write_text))
    code, _, err = run_cli(["bench", tiny_teacher_artifact, "--runtimes", "torch", "--batch", "1", "--warmup", "0",
                            "--reps", "1", "--gallery-size", "10", "--threads", "1", "--out", out])
    line = _error_line(code, err)
    assert line == (f"error: {out}: not written ({out / 'bench.md'}: No space left on device); no partial folder was "
                    "left; free space or choose a writable --out")
    assert list(tmp_path.iterdir()) == [], "neither the report folder nor the folder made for it is left"


def test_full_disk_while_writing_the_synth_preview(monkeypatch, tmp_path: Path, run_cli) -> None:
    from PIL import Image

    real = Image.Image.save

    def full(self: Image.Image, fp: Any, *args: Any, **kwargs: Any) -> None:
        if not Path(fp).name.startswith(".sheet.png.tmp-"):  # the dataset's own images
            return real(self, fp, *args, **kwargs)
        Path(fp).write_bytes(b"\x89PNG partial")
        raise OSError(errno.ENOSPC, "No space left on device", str(fp))

    monkeypatch.setattr(Image.Image, "save", full)
    sheet = tmp_path / "sheet.png"
    code, _, err = run_cli(["synth", tmp_path / "ds", "--identities", "5", "--images-per-id", "1",
                            "--captions-per-image", "1", "--size", "64x32", "--workers", "1", "--preview", sheet])
    monkeypatch.undo()
    line = _error_line(code, err)
    assert line == (f"error: {sheet}: not written (No space left on device); no partial file was left; free space "
                    "or choose a writable --preview")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"], "no partial or temporary sheet"
