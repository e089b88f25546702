"""Benchmark stage: rows (fields, statuses, skip reasons), report files, Pareto front, timing helpers and the CI
latency floor logic, on tiny random artifacts and a small SynthPedes."""

from __future__ import annotations

import csv
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from tbps_compress.bench import runner
from tbps_compress.bench.latency import PeakMemory, interleaved, measure
from tbps_compress.bench.report import markdown_table, pareto_front, pareto_plot, write_report
from tbps_compress.bench.runner import ROW_FIELDS, batch_fields, parse_int_list, parse_runtimes, plan_cases, run_bench
from tbps_compress.errors import UserError
from tbps_compress.models.meta import meta_of

ROOT = Path(__file__).resolve().parents[1]
BATCHES = [1, 4]
FAST = dict(batches=BATCHES, gallery_size=300, warmup=1, reps=2, threads=1)


@pytest.fixture(scope="module")
def arts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny dataset, a random test-tiny PyTorch artifact, its ONNX export and a dynamic int8 quantisation."""
    import torch

    from tbps_compress.artifacts import write_artifact
    from tbps_compress.data.synthpedes import generate
    from tbps_compress.export.onnx_export import export_onnx
    from tbps_compress.export.quantize import quantize_artifact
    from tbps_compress.models.factory import build_model
    from tbps_compress.models.io import save_model

    root = tmp_path_factory.mktemp("bench")
    generate(root / "ds", identities=20, images_per_id=2, captions_per_image=2, size=(64, 32), seed=1, workers=1)
    torch.manual_seed(0)
    with write_artifact(root / "tiny", stage="test") as tmp:
        save_model(build_model("test-tiny"), tmp)
    export_onnx(root / "tiny", root / "tiny-onnx")
    quantize_artifact(root / "tiny-onnx", root / "tiny-int8", mode="dynamic")
    return {"data": root / "ds", "torch": root / "tiny", "onnx": root / "tiny-onnx", "int8": root / "tiny-int8",
            "root": root}


@pytest.fixture(scope="module")
def cpu_run(arts: dict[str, Path]) -> tuple[list[dict], Path]:
    out = arts["root"] / "report"
    rows = run_bench([arts["torch"], arts["onnx"], arts["int8"]], arts["data"], runtimes=["torch", "onnxruntime"],
                     device="cpu", out=out, **FAST)
    return rows, out


def _by_label(rows: list[dict]) -> dict[str, dict]:
    return {r["label"]: r for r in rows}


def test_rows_have_every_field_and_expected_statuses(cpu_run: tuple[list[dict], Path]) -> None:
    rows, _ = cpu_run
    assert len(rows) == 6  # 3 artifacts x (torch, onnxruntime CPU)
    fields = set(ROW_FIELDS) | set(batch_fields(BATCHES))
    for r in rows:
        assert fields <= set(r), fields - set(r)
        assert r["status"] == "ok" or r["status"].startswith("skipped: "), r["status"]
        if r["status"] != "ok":
            assert len(r["status"]) > len("skipped: ") + 10, "a skipped row must say why"
    by = _by_label(rows)
    assert by["tiny [pt/fp32]"]["status"] == "ok"
    assert "export" in by["tiny [ort-cpu/fp32]"]["status"]  # torch artifact in onnxruntime without --export-torch
    assert "ONNX artifact" in by["tiny-onnx [pt/fp32]"]["status"]
    assert by["tiny-onnx [ort-cpu/fp32]"]["status"] == "ok"
    assert by["tiny-int8 [ort-cpu/int8-dynamic]"]["status"] == "ok"


def test_ok_rows_are_measured(cpu_run: tuple[list[dict], Path]) -> None:
    rows, _ = cpu_run
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) == 3
    for r in ok:
        for k in ("R1", "R5", "R10", "mAP", "mINP"):
            assert 0.0 <= r[k] <= 100.0
        assert r["R1"] <= r["R5"] <= r["R10"]
        for k in ("text_p50_ms", "search_p50_ms", "image_ips", "image_b1_ips", "image_b4_ips", "image_b4_p50_ms",
                  "ceiling_tflops", "image_tflops", "text_tflops", "image_pct_of_ceiling", "file_mb"):
            assert isinstance(r[k], float) and r[k] > 0, (r["label"], k, r[k])
        assert r["text_p90_ms"] >= r["text_p50_ms"]
        assert r["image_ips"] == r["image_b4_ips"]  # no batch 32 given: the largest batch
        assert r["peak_mem_mb"] >= 0 and r["mem_method"]
        assert r["params_total"] > 0 and r["macs_image"] > 0 and r["macs_text"] > 0
        assert r["embed_dim"] == 32 and r["image_size"] == [64, 32] and r["context_length"] == 32
        assert r["warmup"] == 1 and r["reps"] == 2 and r["threads"] == 1 and r["min_timed"] >= 2
        assert r["torch_version"] and r["onnxruntime_version"] and r["device_name"]
        assert r["split"] == "test" and r["gallery_size"] == 300
    # Same weights: the exported and the PyTorch models have the same parameter count and near-equal retrieval.
    by = _by_label(rows)
    pt, ort = by["tiny [pt/fp32]"], by["tiny-onnx [ort-cpu/fp32]"]
    assert pt["params_total"] == ort["params_total"]
    assert abs(pt["mAP"] - ort["mAP"]) < 1.0
    assert by["tiny-int8 [ort-cpu/int8-dynamic]"]["notes"]


def test_report_files(cpu_run: tuple[list[dict], Path]) -> None:
    rows, out = cpu_run
    with open(out / "bench.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows) and set(ROW_FIELDS) <= set(table[0])
    data = json.loads((out / "bench.json").read_text())
    assert len(data["rows"]) == len(rows)
    meta = data["meta"]
    assert meta["warmup"] == 1 and meta["reps"] == 2 and meta["threads"] == 1
    assert meta["environment"]["torch"] and meta["environment"]["onnxruntime"]
    assert meta["ceilings"]["fp32"]["gflops"] > 0
    md = (out / "bench.md").read_text()
    assert md.startswith("| model | status | R@1") and "How it was measured" in md and "skipped" in md
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_export_torch_on_the_fly(arts: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """--export-torch: a PyTorch artifact is exported into a temporary folder and benched in onnxruntime.
    (export_onnx itself is tested elsewhere; here a copy of the real export stands in for speed.)"""
    from tbps_compress.export import onnx_export

    calls = []

    def fake_export(src: Path, out: Path, **kw: object) -> dict:
        calls.append((src, out))
        shutil.copytree(arts["onnx"], out)
        return {}

    monkeypatch.setattr(onnx_export, "export_onnx", fake_export)
    rows = run_bench([arts["torch"]], None, runtimes=["onnxruntime"], export_torch=True, **FAST)
    assert len(rows) == 1 and len(calls) == 1
    r = rows[0]
    assert r["status"] == "ok" and r["runtime"] == "onnxruntime" and "on the fly" in r["notes"]
    assert r["R1"] is None and r["split"] is None  # no data: latency only
    assert r["text_p50_ms"] > 0
    assert not calls[0][1].exists(), "the temporary export must be removed"


def test_cuda_without_gpu_skips_with_reasons(arts: dict[str, Path]) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here; this checks the CPU-only behaviour")
    rows = run_bench([arts["torch"], arts["onnx"]], None, device="cuda", **FAST)
    assert rows and all(r["status"].startswith("skipped: ") for r in rows)
    torch_rows = [r for r in rows if r["runtime"] == "torch" and r["kind"] == "torch"]
    assert {r["precision"] for r in torch_rows} == {"fp32", "fp16", "bf16"}
    assert all("CUDA is not available" in r["status"] for r in torch_rows)
    ort = [r for r in rows if r["runtime"] == "onnxruntime" and r["kind"] == "onnx"]
    assert {r["provider"] for r in ort} == {"CUDAExecutionProvider", "TensorrtExecutionProvider"}
    assert all("not available" in r["status"] for r in ort)


def test_plan_cases_matrix() -> None:
    gpu = dict(cuda_available=True, ort_providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    cases = plan_cases("torch", None, ["torch", "onnxruntime"], "cuda", compile=True, export_torch=True, **gpu)
    torch_cases = [(c.runtime, c.precision) for c in cases if c.runtime.startswith("torch")]
    assert torch_cases == [("torch", p) for p in ("fp32", "fp16", "bf16")] + [
        ("torch.compile", p) for p in ("fp32", "fp16", "bf16")]
    assert all(c.skip is None for c in cases if c.runtime.startswith("torch"))
    ort = {c.provider: c for c in cases if c.runtime == "onnxruntime"}
    assert ort["CUDAExecutionProvider"].skip is None
    assert "TensorrtExecutionProvider is not available" in ort["TensorrtExecutionProvider"].skip
    only = plan_cases("torch", None, ["torch"], "cuda", precisions=["fp16"], **gpu)
    assert [c.precision for c in only] == ["fp16"]
    cpu = dict(cuda_available=False, ort_providers=["CPUExecutionProvider"])
    fp16 = plan_cases("onnx", "fp16", ["onnxruntime"], "cpu", **cpu)
    assert len(fp16) == 1 and "GPU format" in fp16[0].skip
    missing = plan_cases("onnx", "fp32", ["onnxruntime"], "cpu", cuda_available=False, ort_providers=None)
    assert "not installed" in missing[0].skip
    no_export = plan_cases("torch", None, ["onnxruntime"], "cpu", **cpu)
    assert "--export-torch" in no_export[0].skip


def test_argument_checks(arts: dict[str, Path]) -> None:
    assert parse_int_list("1, 32,1") == [1, 32]
    assert parse_runtimes("ort,torch") == ["onnxruntime", "torch"]
    for bad in ("0", "a", ""):
        with pytest.raises(UserError):
            parse_int_list(bad)
    with pytest.raises(UserError, match="unknown runtime"):
        parse_runtimes("tensorflow")
    with pytest.raises(UserError, match="--device"):
        run_bench([arts["torch"]], device="tpu")
    with pytest.raises(UserError, match="no records in split"):
        run_bench([arts["torch"]], arts["data"], split="nope")


# ---------------------------------------------------------------------------------------------------------------------
# Pareto front and report from fake rows
# ---------------------------------------------------------------------------------------------------------------------


def test_pareto_front_latency() -> None:
    # (latency, R@1): b dominates c (faster and better); a is slowest but best; d fastest but worst.
    xs = [10.0, 5.0, 6.0, 1.0]
    ys = [60.0, 55.0, 50.0, 30.0]
    assert pareto_front(xs, ys, x_lower_better=True) == [3, 1, 0]


def test_pareto_front_throughput_ties_and_nan() -> None:
    xs = [100.0, 200.0, 200.0, 50.0, float("nan"), None]
    ys = [70.0, 65.0, 65.0, 70.0, 99.0, 99.0]
    # Throughput: higher is better. 3 is dominated by 0 (same R@1, lower throughput); equal points 1 and 2 stay.
    assert pareto_front(xs, ys, x_lower_better=False) == [0, 1, 2]
    assert pareto_front([], []) == []
    with pytest.raises(ValueError):
        pareto_front([1.0], [])


def _fake_row(label: str, r1: float | None, lat: float, ips: float, status: str = "ok") -> dict:
    row = dict.fromkeys(ROW_FIELDS)
    row.update(label=label, status=status, R1=r1, text_p50_ms=lat, text_p90_ms=lat * 1.1, image_ips=ips,
               image_b32_ips=ips, params_total=1e6, macs_image=2e9, file_mb=3.0)
    return row


def test_report_on_fake_rows(tmp_path: Path) -> None:
    rows = [_fake_row("teacher [pt/fp32]", 60, 20, 100), _fake_row("student [ort-cpu/int8-dynamic]", 55, 4, 900),
            _fake_row("student [pt/fp32]", 54, 8, 300), _fake_row("x [ort-cuda/fp32]", None, math.nan, math.nan,
                                                                    status="skipped: no CUDA provider")]
    md = markdown_table(rows)
    assert "| teacher [pt/fp32] | ok | 60.00 |" in md and "img/s @32" in md and "x [ort-cuda/fp32]: skipped" in md
    paths = write_report(rows, {"device": "cpu"}, tmp_path)
    assert all(p is not None and p.exists() for p in paths.values())
    no_acc = [_fake_row("a", None, 1.0, 10.0)]
    assert pareto_plot(no_acc, tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()


def _fake_rows() -> list[dict]:
    return [_fake_row("teacher [pt/fp32]", 60, 20, 100), _fake_row("student [pt/fp32]", 54, 8, 300)]


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_report_folder_is_refused_replaced_with_force_and_gets_the_umask_modes(tmp_path: Path) -> None:
    import os
    import stat

    out = tmp_path / "report"
    old = os.umask(0o022)
    try:
        write_report(_fake_rows(), {"device": "cpu"}, out)
    finally:
        os.umask(old)
    assert sorted(p.name for p in out.iterdir()) == ["bench.csv", "bench.json", "bench.md", "pareto.png"]
    assert stat.S_IMODE(out.stat().st_mode) == 0o755, "not the temporary folder's 0700"
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {0o644}
    before = _tree(out)
    with pytest.raises(UserError) as info:
        write_report(_fake_rows()[:1], {"device": "cpu"}, out)
    assert str(info.value) == f"{out}: output already exists; choose another --out or pass --force to replace it"
    assert _tree(out) == before
    write_report(_fake_rows()[:1], {"device": "cpu"}, out, force=True)
    assert len(json.loads((out / "bench.json").read_text())["rows"]) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"], "no temporary or replaced folder left"


def test_full_disk_while_writing_the_report_changes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The plot is written last: a full disk there leaves the previous report whole, and no partial new one."""
    import errno

    from tbps_compress.bench import report

    out = tmp_path / "report"
    write_report(_fake_rows(), {"device": "cpu"}, out)
    before = _tree(out)

    def full(rows: list[dict], path: Path, title: str | None = None) -> None:
        Path(path).write_bytes(b"\x89PNG partial")
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(report, "pareto_plot", full)
    for target, force, kept in ((out, True, "the previous folder is unchanged"),
                                (tmp_path / "new", False, "no partial folder was left")):
        with pytest.raises(UserError) as info:
            write_report(_fake_rows()[:1], {"device": "cpu"}, target, force=force)
        assert str(info.value) == (f"{target}: not written ({target / 'pareto.png'}: No space left on device); "
                                   f"{kept}; free space or choose a writable --out")
    assert _tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"], "no temporary or partial folder left"


def test_out_is_checked_before_anything_is_opened_or_measured(tmp_path: Path) -> None:
    out = tmp_path / "report"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    with pytest.raises(UserError) as info:  # the artifact does not exist either: --out is looked at first
        run_bench([tmp_path / "no-artifact"], out=out)
    assert str(info.value) == f"{out}: output already exists; choose another --out or pass --force to replace it"
    with pytest.raises(UserError) as info:  # --force replaces an earlier report, never the user's other files
        run_bench([tmp_path / "no-artifact"], out=out, force=True)
    assert str(info.value) == (f"{out}: holds files it was not written with (e.g. notes.txt); --force replaces only "
                               "a folder holding bench.csv, bench.json, bench.md, pareto.png; move them away or "
                               "choose another --out")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UserError) as info:
        run_bench([tmp_path / "no-artifact"], out=tmp_path / "afile", force=True)
    assert str(info.value) == (f"{tmp_path / 'afile'}: exists and is not a folder; choose another --out (it is not "
                               "replaced, even with --force)")
    with pytest.raises(UserError) as info:
        run_bench([tmp_path / "no-artifact"], device="cuda:x")
    assert str(info.value) == ("--device 'cuda:x': not a device; choose cpu, cuda or cuda:N (N: a GPU index, e.g. "
                               "cuda:0)")
    assert (out / "notes.txt").read_text() == "mine\n" and sorted(p.name for p in tmp_path.iterdir()) == [
        "afile", "report"]


# ---------------------------------------------------------------------------------------------------------------------
# timing helpers
# ---------------------------------------------------------------------------------------------------------------------


def test_measure_and_interleaved() -> None:
    calls = []
    t = measure(lambda: calls.append(1), warmup=2, reps=5)
    assert len(calls) == 7 and t.n == 5 and t.p50 >= 0 and t.p90 >= t.p50
    slow = measure(lambda: time.sleep(0.01), warmup=0, reps=100, max_time_s=0.03)
    assert 3 <= slow.n < 100 and slow.p50 >= 9.0
    order = []
    res = interleaved({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, warmup=0, rounds=3)
    assert order == ["a", "b"] * 3 and res["a"].n == res["b"].n == 3
    with pytest.raises(ValueError):
        measure(lambda: None, reps=0)


def test_peak_memory_sees_an_allocation() -> None:
    with PeakMemory("cpu", interval_s=0.001) as pm:
        block = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
        time.sleep(0.02)
    del block
    assert pm.peak_mb is not None and pm.peak_mb >= 48, pm.peak_mb
    assert "RSS" in pm.method


def test_onnx_precision_detection(arts: dict[str, Path]) -> None:
    onnx_files = ["image_encoder.onnx", "text_encoder.onnx"]
    assert runner.onnx_precision([arts["onnx"] / f for f in onnx_files]) == "fp32"
    assert runner.onnx_precision([arts["int8"] / f for f in onnx_files]) == "int8-dynamic"


# ---------------------------------------------------------------------------------------------------------------------
# CI latency floors
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def ci(benchmark_script):  # noqa: ANN001, ANN201 - the loader fixture and a module
    return benchmark_script("ci_latency")


def test_ci_ratios_and_floors(ci) -> None:
    medians = {"image": {"teacher_pt": 300.0, "student_pt": 100.0, "student_ort": 80.0, "student_int8": 64.0},
               "text": {"teacher_pt": 30.0, "student_pt": 10.0, "student_ort": 5.0, "student_int8": 5.0}}
    ratios = ci.compute_ratios(medians)
    assert ratios == pytest.approx({"student_vs_teacher_image": 3.0, "student_vs_teacher_text": 3.0,
                                    "int8_vs_fp32_image": 1.25, "int8_vs_fp32_text": 1.0,
                                    "ort_vs_torch_image": 1.25, "ort_vs_torch_text": 2.0})
    base = ci.make_baseline(ratios, 0.7)
    assert base["floors"]["student_vs_teacher_image"] == 2.1 and base["floors"]["int8_vs_fp32_text"] == 0.7
    assert ci.check_floors(ratios, base) == []
    # The student got as slow as the teacher, and the int8 text tower slower than fp32: two clear failures.
    worse = dict(ratios, student_vs_teacher_image=1.0, int8_vs_fp32_text=0.5)
    fails = ci.check_floors(worse, base)
    assert len(fails) == 2
    assert "student_vs_teacher_image = 1.00 is below its floor 2.10" in fails[0] and "baseline" in fails[0]
    assert "int8_vs_fp32_text" in fails[1]
    missing = {k: v for k, v in ratios.items() if k != "ort_vs_torch_text"}
    assert ci.check_floors(missing, base) == [f"ort_vs_torch_text: not measured (the baseline expects it; "
                                              f"{ci.RATIOS['ort_vs_torch_text'][2]})"]
    assert ci.check_floors(dict(ratios, ort_vs_torch_text=float("nan")), base)
    assert "no 'floors'" in ci.check_floors(ratios, {})[0]
    assert "FAIL" in ci.format_table(medians, worse, base)
    with pytest.raises(ValueError):
        ci.make_baseline(ratios, 1.5)


def test_ci_main_fails_on_missing_baseline(ci, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert ci.main(["--baseline", str(tmp_path / "absent.json")]) == 1
    assert "--update-baseline" in capsys.readouterr().err


def test_committed_ci_baseline(ci) -> None:
    base = json.loads((ROOT / "benchmarks" / "ci_baseline.json").read_text())
    assert set(base["floors"]) == set(ci.RATIOS)
    for name, floor in base["floors"].items():
        assert 0 < floor < base["measured"][name], name


def test_gpu_bench_builds_the_product_model_and_needs_cuda(benchmark_script, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture) -> None:
    """gpu_bench.py measures the product's own model (no copy of the architecture); without CUDA it says so."""
    import torch

    from tbps_compress.models.config import get_model_config

    gb = benchmark_script("gpu_bench")
    cfg = get_model_config("test-tiny")
    model = gb.build(cfg)
    assert meta_of(model).config["embed_dim"] == cfg["embed_dim"]
    assert gb.caption_tokens(32, 12)[0, 11] == gb.EOT
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gb.main(["--out", str(tmp_path / "gpu")]) == 1
    assert "CUDA is not available" in capsys.readouterr().err and not (tmp_path / "gpu").exists()


def test_ci_main_exit_codes(ci, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                            capsys: pytest.CaptureFixture) -> None:
    """The whole main() flow with the measurement replaced by fixed medians: pass, then a regression fails."""
    medians = {"image": {"teacher_pt": 300.0, "student_pt": 100.0, "student_ort": 80.0, "student_int8": 64.0},
               "text": {"teacher_pt": 30.0, "student_pt": 10.0, "student_ort": 5.0, "student_int8": 5.0}}
    monkeypatch.setattr(ci, "build_candidates", lambda work, threads: {})
    monkeypatch.setattr(ci, "measure_medians", lambda fns, deadline, rounds=30: medians)
    base = tmp_path / "base.json"
    assert ci.main(["--update-baseline", "--baseline", str(base)]) == 0
    assert json.loads(base.read_text())["floors"]["student_vs_teacher_image"] == 2.1
    assert ci.main(["--baseline", str(base), "--json", str(tmp_path / "m.json")]) == 0
    assert "all ratios are above their floors" in capsys.readouterr().out
    medians["image"]["student_pt"] = 250.0  # the student became almost as slow as the teacher
    assert ci.main(["--baseline", str(base)]) == 1
    err = capsys.readouterr().err
    assert "FAILED" in err and "student_vs_teacher_image = 1.20 is below its floor 2.10" in err
