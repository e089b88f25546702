"""The ``tbps-compress`` command line. Thin: parse, call the library, print. Heavy imports happen inside commands
so ``tbps-compress --help`` stays fast. User errors print one line and exit with code 2."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from .errors import UserError

app = typer.Typer(
    name="tbps-compress",
    help="Text-based person search: train a TBPS-CLIP teacher, distil, prune, export, quantise and benchmark it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"max_content_width": 120},
)
data_app = typer.Typer(help="Inspect datasets.", no_args_is_help=True)
list_app = typer.Typer(help="List registered models, losses and dataset formats.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(list_app, name="list")

SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Override a recipe key: key.path=value.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace an existing output.")]


def _setup_logging(verbose: bool = False) -> None:
    from rich.logging import RichHandler

    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s", datefmt="[%X]",
                        handlers=[RichHandler(show_path=False, markup=False)], force=True)


class RichProgress:
    """Rich progress bar for the training loop (implements engine.train.Progress)."""

    def __init__(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._p = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                           TimeRemainingColumn(), TextColumn("{task.fields[info]}"), transient=False)
        self._task = None

    def start(self, total: int, description: str) -> None:
        self._p.start()
        self._task = self._p.add_task(description, total=total, info="")

    def update(self, step: int, info: dict[str, float]) -> None:
        keys = [k for k in info if k.endswith("_loss")][:4]
        text = f"loss {info['loss']:.3f} " + " ".join(f"{k[:-5]} {info[k]:.3f}" for k in keys)
        text += f" | {info.get('samples_per_s', 0):.0f} samples/s"
        self._p.update(self._task, completed=step, info=text)

    def stop(self) -> None:
        self._p.stop()


def _print_json(data: object) -> None:
    typer.echo(json.dumps(data, indent=2, sort_keys=False))


def _metrics_table(rows: dict[str, dict[str, float]], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("split")
    for k in ("R1", "R5", "R10", "mAP", "mINP"):
        table.add_column(k, justify="right")
    for name, m in rows.items():
        table.add_row(name, *(f"{m[k]:.2f}" if k in m else "-" for k in ("R1", "R5", "R10", "mAP", "mINP")))
    Console().print(table)


@app.command()
def synth(
    out: Annotated[Path, typer.Argument(help="Folder to write: reid_raw.json (file_path relative to imgs/, as in "
                                             "CUHK-PEDES), synth_truth.json, synth_meta.json, imgs/.")],
    preset: Annotated[str | None, typer.Option(
        help="demo: 160/20/20 train/val/test identities, 4 images each (the default). benchmark: 10,000/200/1,000, "
             "4 images per train identity and 3 per val/test one (test: 3,000 images, 6,000 captions). Flags "
             "given explicitly override the preset.")] = None,
    identities: Annotated[int | None, typer.Option(
        help="Total identities, split 80/10/10 into train/val/test (at least 5); replaces the preset's counts, "
             "--train-ids/--val-ids/--test-ids override it.")] = None,
    train_ids: Annotated[int | None, typer.Option("--train-ids", help="Train identities (at least 1).")] = None,
    val_ids: Annotated[int | None, typer.Option("--val-ids", help="Val identities (0 or at least 2).")] = None,
    test_ids: Annotated[int | None, typer.Option(
        "--test-ids", help="Test identities (at least 2). The test and val splits do not change with --train-ids.",
    )] = None,
    images_per_id: Annotated[int | None, typer.Option(help="Images (views) per train identity (preset: 4).")] = None,
    eval_images_per_id: Annotated[int | None, typer.Option(
        help="Images per val/test identity (default: --images-per-id; preset benchmark: 3).")] = None,
    captions_per_image: Annotated[int | None, typer.Option(help="Captions per image (preset: 2).")] = None,
    size: Annotated[str, typer.Option(help="Image size HEIGHTxWIDTH.")] = "384x128",
    seed: Annotated[int, typer.Option(help="Random seed; same seed, same bytes.")] = 0,
    preview: Annotated[Path | None, typer.Option(help="Also save a contact sheet image here (.png, .jpg, ...); "
                                                      "an existing file is replaced only with --force.")] = None,
    workers: Annotated[int | None, typer.Option(min=1, help="Worker processes (default: up to 2).")] = None,
    force: ForceOpt = False,
) -> None:
    """Generate SynthPedes, the embedded procedural dataset (CUHK-PEDES format, with a ground-truth sidecar)."""
    from .data.synthpedes import generate, preset_settings, save_preview
    from .io_utils import IMAGE_SUFFIXES, atomic_file, check_output_file

    try:
        h, w = (int(x) for x in size.lower().split("x"))
    except ValueError as exc:
        raise UserError(f"--size: expected HEIGHTxWIDTH such as 384x128, got {size!r}") from exc
    settings = preset_settings(preset, identities, train_ids=train_ids, val_ids=val_ids, test_ids=test_ids,
                               images_per_id=images_per_id, eval_images_per_id=eval_images_per_id,
                               captions_per_image=captions_per_image)
    # The sheet may go into the dataset folder itself, which generate() creates.
    preview_opts = {"force": force, "flag": "--preview", "suffixes": IMAGE_SUFFIXES,
                    "make_parents": preview is not None and preview.resolve().parent.is_relative_to(out.resolve())}
    if preview is not None:  # checked before the dataset is generated
        check_output_file(preview, example="preview.png", **preview_opts)
    summary = generate(out, size=(h, w), seed=seed, workers=workers, force=force, **settings)
    if preview is not None:
        with atomic_file(preview, **preview_opts) as tmp:
            save_preview(out, tmp)
    _print_json(summary)


@data_app.command("stats")
def data_stats(
    root: Annotated[Path, typer.Argument(help="Dataset root.")],
    format: Annotated[str | None, typer.Option("--format", help="Dataset format (default: detect).")] = None,
) -> None:
    """Print identities, images and captions per split as JSON."""
    from .data.readers import load_dataset

    ds = load_dataset(root, format)
    _print_json({"format": ds.format, "annotation": str(ds.annotation), "splits": ds.stats()})


@list_app.command("models")
def list_models_cmd() -> None:
    """Registered model configs."""
    from .models.config import list_models

    for name in list_models():
        typer.echo(name)


@list_app.command("losses")
def list_losses_cmd() -> None:
    """Registered loss terms."""
    from .losses import list_losses

    for name in list_losses():
        typer.echo(name)


@list_app.command("criteria")
def list_criteria_cmd() -> None:
    """Pruning importance criteria."""
    from .compress.prune import list_criteria

    for name in list_criteria():
        typer.echo(name)


@list_app.command("formats")
def list_formats_cmd() -> None:
    """Dataset formats the readers accept."""
    from .data.readers import list_formats

    for name in list_formats():
        typer.echo(name)


@app.command()
def train(
    recipe: Annotated[Path, typer.Argument(help="Train recipe YAML (see recipes/teacher/).")],
    set_: SetOpt = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the run's last checkpoint.")] = False,
    force: ForceOpt = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Train a TBPS-CLIP teacher and write an artifact folder."""
    _setup_logging(verbose)
    from .config import load_recipe
    from .recipes import TrainRecipe
    from .stages import run_stage

    r = load_recipe(recipe, TrainRecipe, set_)
    _report_artifact(run_stage("train", r, resume=resume, force=force, progress=RichProgress()))


def _report_artifact(out: Path) -> None:
    m = json.loads((out / "metrics.json").read_text())
    rows = {}
    if m.get("val_best"):
        rows["val (best)"] = m["val_best"]
    if m.get("test"):
        rows["test"] = m["test"]
    _metrics_table(rows, f"{out}")


@app.command()
def distill(
    recipe: Annotated[Path, typer.Argument(help="Distill recipe YAML (see recipes/distill/).")],
    set_: SetOpt = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the run's last checkpoint.")] = False,
    force: ForceOpt = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Distil a teacher artifact into a smaller student (feature, affinity, interactive, hidden-state KD)."""
    _setup_logging(verbose)
    from .compress.distill import DistillRecipe
    from .config import load_recipe
    from .stages import run_stage

    r = load_recipe(recipe, DistillRecipe, set_)
    _report_artifact(run_stage("distill", r, resume=resume, force=force, progress=RichProgress()))


@app.command()
def export(
    artifact: Annotated[Path, typer.Argument(help="PyTorch artifact folder (teacher, student or pruned).")],
    out: Annotated[Path, typer.Option("--out", help="ONNX artifact folder to write.")],
    onnx: Annotated[bool, typer.Option("--onnx", help="Export to ONNX (the only format for now).")] = True,
    opset: Annotated[int, typer.Option("--opset", help="ONNX opset (>= 18).")] = 18,
    fp16: Annotated[bool, typer.Option("--fp16", help="Also write fp16 graphs (a GPU format).")] = False,
    parity_data: Annotated[Path | None, typer.Option("--data", help="Dataset root for real-sample parity.")] = None,
    atol: Annotated[float, typer.Option("--atol", help="Max abs difference allowed vs PyTorch.")] = 1e-4,
    optimize: Annotated[bool, typer.Option("--optimize", help="Fuse attention, Gelu, LayerNorm and biases for the "
                                           "CPU provider (per-tower parity; unfused on failure).")] = False,
    force: ForceOpt = False,
) -> None:
    """Export image and text encoders to ONNX and prove parity with PyTorch."""
    _setup_logging()
    from .stages import run_stage, stage_config

    if not onnx:
        raise UserError("export: only --onnx is supported")
    cfg = stage_config("export", {"opset": opset, "fp16": fp16, "atol": atol, "optimize": optimize}, "export",
                       {"opset": "--opset", "atol": "--atol"})
    report = run_stage("export", cfg, out=out, inputs={"source": artifact}, data=parity_data, force=force)
    typer.echo(f"wrote {out}: max abs diff vs PyTorch {report.get('max_diff')}")
    for tower, entry in (report.get("optimize") or {}).items():
        nodes = (sum(entry["ops_before"].values()), sum(entry.get("ops_after", entry["ops_before"]).values()))
        typer.echo(f"  {tower}: fused ({nodes[0]} -> {nodes[1]} nodes)" if entry["fused"] else
                   f"  {tower}: not fused: {entry['fallback_reason']}")


@app.command()
def quantize(
    artifact: Annotated[Path, typer.Argument(help="ONNX artifact folder (from export).")],
    out: Annotated[Path, typer.Option("--out", help="Quantised artifact folder to write.")],
    mode: Annotated[str, typer.Option("--mode", help="dynamic | static | fp16")] = "dynamic",
    calib_data: Annotated[Path | None, typer.Option("--calib-data", help="Dataset root for static calibration "
                                                    "(default: --data).")] = None,
    calib_method: Annotated[str, typer.Option("--calib-method", help="minmax | entropy | percentile")] = "minmax",
    calib_size: Annotated[int, typer.Option("--calib-size", min=1, help="Calibration samples per tower.")] = 64,
    backend: Annotated[str, typer.Option("--backend", help="ort | optimum")] = "ort",
    towers: Annotated[str, typer.Option("--towers", help="Towers to quantise: image,text")] = "image,text",
    eval_data: Annotated[Path | None, typer.Option("--data", help="Dataset root: record metrics.")] = None,
    force: ForceOpt = False,
) -> None:
    """Quantise an ONNX artifact (dynamic or static int8, fp16) into a new artifact."""
    _setup_logging()
    from .stages import run_stage, stage_config

    cfg = stage_config("quantize", {"mode": mode, "calib_data": str(calib_data) if calib_data else None,
                                    "calib_method": calib_method, "calib_size": calib_size, "backend": backend,
                                    "towers": towers}, "quantize",
                       {k: "--" + k.replace("_", "-") for k in ("mode", "calib_method", "calib_size", "backend",
                                                                 "towers")})
    report = run_stage("quantize", cfg, out=out, inputs={"source": artifact}, data=eval_data, force=force)
    summary = {"out": str(out), "mode": report.get("mode"), "metrics": report.get("metrics")}
    for tower, entry in report.get("towers", {}).items():
        keys = ("nodes", "cosine", "size_before", "size_after", "size_ratio")
        summary[tower] = {k: entry.get(k) for k in keys if k in entry}
    _print_json(summary)


@app.command()
def prune(
    recipe: Annotated[Path, typer.Argument(help="Prune recipe YAML (see recipes/prune/).")],
    set_: SetOpt = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue after the last finished round.")] = False,
    force: ForceOpt = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Prune widths, heads and layers (torch-pruning), recovering by distillation after each round."""
    _setup_logging(verbose)
    from .compress.prune import load_prune_recipe
    from .stages import run_stage

    r = load_prune_recipe(recipe, set_)
    _report_artifact(run_stage("prune", r, resume=resume, force=force, progress=RichProgress()))


@app.command()
def probe(
    artifact: Annotated[Path, typer.Argument(help="Artifact folder to probe.")],
    data: Annotated[Path, typer.Option("--data", help="Dataset root.")],
    split: Annotated[str, typer.Option(help="Split to measure R@1 on.")] = "val",
    threshold: Annotated[float, typer.Option(help="C2: largest R@1 drop allowed, in points.")] = 3.0,
    out: Annotated[Path | None, typer.Option("--out", help="Folder for probe.json/.md/.png.")] = None,
    parent: Annotated[Path | None, typer.Option("--parent", help="Initial weights for C2 (an artifact).")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 128,
    force: ForceOpt = False,
) -> None:
    """The paper's module-importance probe: C1 (R@1 drop when a layer is removed) and C2 per layer and tower."""
    _setup_logging()
    from .compress.probe import probe as run_probe

    run_probe(artifact, data, split=split, threshold=threshold, out_dir=out, parent=parent, device=device,
              batch_size=batch_size, force=force)
    typer.echo(f"wrote {out or str(artifact) + '-probe'}")


@app.command("run")
def run_cmd(
    pipeline: Annotated[Path, typer.Argument(help="Pipeline recipe YAML (see recipes/pipeline/).")],
    set_: SetOpt = None,
    from_stage: Annotated[str | None, typer.Option("--from", help="Force this stage and those after it.")] = None,
    only: Annotated[str | None, typer.Option("--only", help="Run only this stage.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace stage folders this pipeline did not write "
                                                        "(refused by default).")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Run a pipeline: data, teacher, students, ONNX, quantisation, benchmark; up-to-date stages are skipped.
    Every stage's recipe and options are checked before the first stage runs."""
    _setup_logging(verbose)
    import time

    from .pipeline import Pipeline, load_pipeline

    t0 = time.time()
    recipe = load_pipeline(pipeline, set_)
    result = Pipeline(recipe, pipeline, progress_factory=RichProgress).run(from_stage=from_stage, only=only,
                                                                           force=force)
    bench = [s for s in recipe.stages if s.kind == "bench"]
    if bench:
        table = Path(recipe.run_dir) / bench[-1].name / "bench.md"
        if table.exists():
            typer.echo(table.read_text())
    typer.echo(f"pipeline finished in {time.time() - t0:.0f} s; stage times (s): {result['timings_s']}")


@app.command()
def bench(
    artifacts: Annotated[list[Path], typer.Argument(help="Artifact folders (torch and/or ONNX).")],
    data: Annotated[Path | None, typer.Option("--data", help="Dataset root (retrieval metrics).")] = None,
    runtimes: Annotated[str, typer.Option(help="torch,onnxruntime")] = "torch,onnxruntime",
    device: Annotated[str, typer.Option(help="cpu | cuda | cuda:N")] = "cpu",
    batch: Annotated[str, typer.Option("--batch", help="Gallery batch sizes, e.g. 1,32.")] = "1,32",
    split: Annotated[str, typer.Option(help="Dataset split.")] = "test",
    gallery_size: Annotated[int, typer.Option(help="Embeddings in the search-latency gallery.")] = 10000,
    out: Annotated[Path | None, typer.Option("--out", help="Folder for CSV/JSON/Markdown/PNG (checked before "
                                                           "measuring; replaced only with --force).")] = None,
    warmup: Annotated[int, typer.Option(min=0)] = 3,
    reps: Annotated[int, typer.Option(min=1)] = 20,
    threads: Annotated[int | None, typer.Option(help="Intra-op threads (default: library default).")] = None,
    export_torch: Annotated[bool, typer.Option("--export-torch", help="Export torch artifacts for ORT.")] = False,
    compile: Annotated[bool, typer.Option("--compile", help="Also torch.compile (CUDA).")] = False,
    format: Annotated[str | None, typer.Option("--format", help="Dataset format.")] = None,
    force: ForceOpt = False,
) -> None:
    """Accuracy against latency for artifacts x runtimes x precisions: table, CSV/JSON and a Pareto plot. The options
    and --out are checked before anything is measured."""
    _setup_logging()
    from .bench.report import print_table
    from .stages import run_stage, stage_config

    cfg = stage_config("bench", {"runtimes": runtimes, "device": device, "batches": batch, "split": split,
                                 "gallery_size": gallery_size, "warmup": warmup, "reps": reps, "threads": threads,
                                 "export_torch": export_torch, "compile": compile, "format": format}, "bench",
                       {"batches": "--batch", "runtimes": "--runtimes", "threads": "--threads",
                        "gallery_size": "--gallery-size", "device": "--device", "reps": "--reps"})
    rows = run_stage("bench", cfg, out=out, inputs={"artifacts": list(artifacts)}, data=data, force=force)
    print_table(rows)
    if out is not None:
        typer.echo(f"wrote {out}")


@app.command("eval")
def eval_cmd(
    artifact: Annotated[Path, typer.Argument(help="Artifact folder (torch or ONNX).")],
    data: Annotated[Path, typer.Option("--data", help="Dataset root.")],
    split: Annotated[str, typer.Option(help="Split to evaluate.")] = "test",
    format: Annotated[str | None, typer.Option("--format", help="Dataset format (default: detect).")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Write the metrics JSON here (checked before the "
                                                           "evaluation; replaced only with --force).")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")] = "auto",
    batch_size: Annotated[int, typer.Option(min=1)] = 128,
    force: ForceOpt = False,
) -> None:
    """Evaluate text-to-image retrieval (R@1/5/10, mAP, mINP) of an artifact on a dataset split."""
    from .devices import check_device
    from .io_utils import check_output_file, write_text_atomic

    check_device(device)
    if out is not None:
        check_output_file(out, force=force, flag="--out")
    _setup_logging()
    from .evaluation import evaluate_artifact

    result = evaluate_artifact(artifact, data, split=split, format=format, device=device, batch_size=batch_size)
    _metrics_table({split: result}, f"{artifact} on {data}")
    if out is not None:
        write_text_atomic(out, json.dumps(result, indent=2) + "\n", force=force, flag="--out")
        typer.echo(f"wrote {out}")


@app.command("import")
def import_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="Local OpenAI (.pt TorchScript) or open_clip checkpoint.")],
    config: Annotated[str, typer.Option("--config", help="Model config name or JSON path.")],
    out: Annotated[Path, typer.Option("--out", help="Artifact folder to write.")],
    force: ForceOpt = False,
) -> None:
    """Turn a local CLIP checkpoint into an artifact (for zero-shot eval or as a teacher)."""
    _setup_logging()
    from .artifacts import write_artifact, write_json
    from .models.config import get_model_config
    from .models.factory import count_parameters
    from .models.io import import_checkpoint, save_model

    cfg = get_model_config(config)
    model = import_checkpoint(checkpoint, cfg)
    with write_artifact(out, stage="import", force=force,
                        extra_lineage={"source_checkpoint": str(checkpoint.resolve())}) as tmp:
        save_model(model, tmp, cfg)
        write_json(tmp / "metrics.json", {"parameters": count_parameters(model)})
    typer.echo(f"wrote {out}")


@app.command()
def search(
    artifact: Annotated[Path, typer.Argument(help="Artifact folder (torch or ONNX).")],
    query: Annotated[str | None, typer.Argument(help="Description of the person.")] = None,
    gallery: Annotated[Path | None, typer.Option("--gallery", help="Folder of person crops (recursive).")] = None,
    top_k: Annotated[int, typer.Option("--top-k", min=1, help="How many results to show.")] = 10,
    sheet: Annotated[Path | None, typer.Option("--sheet", help="Write a contact sheet PNG.")] = None,
    html: Annotated[Path | None, typer.Option("--html", help="Write a self-contained HTML page.")] = None,
    index: Annotated[str | None, typer.Option(
        "--index", help="Index kind: flat (exact, default for a new index) | flat16 (every vector compared, stored "
        "in float16: half the memory and time) | hnsw | ivfpq | ivfsq8 (approximate, for large galleries); "
        "default: keep the saved index's kind.")] = None,
    index_param: Annotated[list[str] | None, typer.Option(
        "--index-param", help="Index parameter KEY=VALUE, repeatable: hnsw M, ef_construction, ef_search; ivfpq "
        "nlist, m, nbits, nprobe; ivfsq8 nlist, nprobe.")] = None,
    index_dir: Annotated[Path | None, typer.Option("--index-dir", help="Index folder (default "
                                                   "DIR/.tbps_index/...).")] = None,
    where: Annotated[list[str] | None, typer.Option(
        "--where", help="Only images whose metadata match KEY=VALUE (camera, identity, path glob, size, mtime_ns); "
        "repeatable, ANDed; camera=1,3 means either.")] = None,
    device: Annotated[str, typer.Option("--device", help="auto | cpu | cuda (torch artifacts).")] = "auto",
    data: Annotated[Path | None, typer.Option("--data", help="Dataset root: identities, --query-index.")] = None,
    query_index: Annotated[int | None, typer.Option("--query-index", help="Use caption K of --split.")] = None,
    split: Annotated[str, typer.Option("--split", help="Dataset split for --data.")] = "test",
    expect_id: Annotated[int | None, typer.Option("--expect-id", "--query-id", help="Identity to mark.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 32,
    force: ForceOpt = False,
) -> None:
    """Search a gallery of person crops with a sentence (index built once, updated incrementally)."""
    from .devices import check_device
    from .io_utils import IMAGE_SUFFIXES, check_output_file
    from .retrieval.index import INDEX_KINDS
    from .retrieval.search import format_results, run_search

    check_device(device)
    if sheet is not None:
        check_output_file(sheet, force=force, flag="--sheet", suffixes=IMAGE_SUFFIXES, example="sheet.png")
    if html is not None:
        check_output_file(html, force=force, flag="--html", suffixes=(".html", ".htm"), example="results.html")
    if index is not None and index not in INDEX_KINDS:
        raise UserError(f"--index {index}: unknown index kind; choose one of {', '.join(INDEX_KINDS)} (an index "
                        "folder is now given with --index-dir)")
    report = run_search(artifact, query, gallery=gallery, top_k=top_k, sheet=sheet, html_out=html, index=index_dir,
                        device=device, data=data, query_index=query_index, split=split, expect_id=expect_id,
                        batch_size=batch_size, where=where or None, index_kind=index, index_params=index_param)
    typer.echo(format_results(report))
    if report.stats.unreadable:
        typer.echo(f"{report.stats.unreadable} unreadable image(s) skipped", err=True)


@app.command()
def serve(
    artifact: Annotated[Path, typer.Argument(help="ONNX artifact folder (tbps-compress export / quantize output).")],
    gallery: Annotated[Path, typer.Option("--gallery", help="Folder of person crops (recursive); uploads go to its "
                                          "uploads/ subfolder.")],
    host: Annotated[str, typer.Option("--host", help="Address to listen on; anything but a loopback address "
                                      "exposes the gallery to the network.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port (0 picks a free one; the address is printed).")] = 8000,
    token_file: Annotated[Path | None, typer.Option(
        "--token-file", help="File holding the bearer token that uploads and deletions need (default: the "
        "TBPS_SERVE_TOKEN environment variable; with neither, the server is read-only).")] = None,
    protect_reads: Annotated[bool, typer.Option(
        "--protect-reads", help="Searches, images and /stats need the token too.")] = False,
    index_dir: Annotated[Path | None, typer.Option("--index-dir", help="Index folder (default "
                                                   "DIR/.tbps_index/...).")] = None,
    data: Annotated[Path | None, typer.Option("--data", help="Dataset root giving identities / cameras (default: "
                                              "the gallery, when it is a dataset root).")] = None,
    threads: Annotated[int | None, typer.Option("--threads", min=1, help="onnxruntime threads per request "
                                                "(default: onnxruntime's).")] = None,
    max_upload_mb: Annotated[float, typer.Option("--max-upload-mb", min=0.01, help="Largest uploaded file.")] = 10.0,
    max_query_chars: Annotated[int, typer.Option("--max-query-chars", min=1, help="Longest query text.")] = 1000,
    access_log: Annotated[bool, typer.Option("--access-log", help="Log every request (method, path, status; "
                                             "never query texts).")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Serve text search over a gallery on HTTP (FastAPI + uvicorn, torch-free): a page at /, POST /search, uploads
    and deletions with a bearer token."""
    from .serve.server import run_server
    from .serve.service import Limits

    _setup_logging(verbose)
    limits = Limits(max_query_chars=max_query_chars, max_upload_bytes=int(max_upload_mb * 1024 * 1024))
    run_server(artifact, gallery, host=host, port=port, token_file=token_file, protect_reads=protect_reads,
               index_dir=index_dir, data=data, threads=threads, limits=limits, access_log=access_log)


def _fmt_auc(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _load_split_truth(root: Path, split: str) -> dict:
    """The dataset's ground truth, or one user-error line naming the file, the split and the splits present."""
    from .data.synthpedes import load_truth
    from .retrieval.diagnosis import TRUTH_FILE, truth_splits

    truth = load_truth(root)
    splits = truth_splits(truth)
    if split not in splits:
        raise UserError(f"{root / TRUTH_FILE}: no entries in split {split!r} (splits present: {', '.join(splits)}); "
                        "pass --split with one of them")
    return truth


@app.command("oracle")
def oracle_cmd(
    root: Annotated[Path, typer.Argument(help="SynthPedes dataset root (with synth_truth.json).")],
    split: Annotated[str, typer.Option(help="Split to score.")] = "test",
    as_json: Annotated[bool, typer.Option("--json", help="Print the full result as JSON.")] = False,
) -> None:
    """Ground-truth attribute oracle: the retrieval the captions' attributes alone allow, per family preset."""
    from rich.console import Console
    from rich.table import Table

    from .retrieval.diagnosis import oracle_table

    result = oracle_table(_load_split_truth(root, split), split)
    if as_json:
        _print_json(result)
        return
    console = Console()
    table = Table(title=f"attribute oracle on {root} ({split}: {result['queries']} queries, {result['images']} "
                        f"images, {result['identities']} identities)")
    for name in ("preset", "families", "R@1", "R@5", "R@10", "mAP", "R@1 s.e."):
        table.add_column(name, justify="left" if name == "preset" else "right")
    for name, m in result["presets"].items():
        table.add_row(name, str(len(m["families"])), *(f"{m[k]:.2f}" for k in ("R1", "R5", "R10", "mAP", "R1_se")))
    console.print(table)
    if result["attributes"]:
        auc = Table(title="oracle (all families): per-attribute AUC")
        for name in ("family", "queries", "pairs", "AUC"):
            auc.add_column(name, justify="left" if name == "family" else "right")
        for fam, row in result["attributes"].items():
            auc.add_row(fam, str(row["queries"]), str(row["pairs"]), _fmt_auc(row["auc"]))
        console.print(auc)


@app.command("diagnose")
def diagnose_cmd(
    artifact: Annotated[Path, typer.Argument(help="Artifact folder (torch or ONNX).")],
    data: Annotated[Path, typer.Option("--data", help="SynthPedes dataset root (with synth_truth.json).")],
    split: Annotated[str, typer.Option(help="Split to diagnose.")] = "test",
    out: Annotated[Path | None, typer.Option("--out", help="Write the diagnosis JSON here.")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    force: ForceOpt = False,
) -> None:
    """Per-attribute AUCs of an artifact against the ground truth, next to the oracle's (which attributes it loses)."""
    from .devices import check_device
    from .io_utils import check_output_file, write_text_atomic

    check_device(device)
    if out is not None:
        check_output_file(out, force=force, flag="--out", example="diagnosis.json")
    _setup_logging()
    from rich.console import Console
    from rich.table import Table

    from .retrieval.diagnosis import diagnose_artifact

    result = diagnose_artifact(artifact, data, split=split, device=device)
    _metrics_table({f"{split} (model)": result["metrics"], f"{split} (oracle)": result["oracle_metrics"]},
                   f"{artifact} on {data}")
    table = Table(title="per-attribute AUC: stated value ranked above a contradicting one")
    for name in ("family", "queries", "AUC model", "AUC oracle"):
        table.add_column(name, justify="left" if name == "family" else "right")
    oracle = result["oracle_attributes"]
    for fam, row in result["attributes"].items():
        table.add_row(fam, str(row["queries"]), _fmt_auc(row["auc"]), _fmt_auc(oracle.get(fam, {}).get("auc")))
    Console().print(table)
    if out is not None:
        write_text_atomic(out, json.dumps({"artifact": str(artifact), "data": str(data), **result}, indent=2) + "\n",
                          force=force, flag="--out")
        typer.echo(f"wrote {out}")


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the app, turning user errors into one line on stderr and exit code 2."""
    try:
        app(args=argv, standalone_mode=False, prog_name="tbps-compress")
    except UserError as exc:
        typer.echo(f"error: {exc}", err=True)
        return 2
    except typer.Exit as exc:
        return exc.exit_code
    except typer.Abort:
        typer.echo("aborted", err=True)
        return 130
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        return 130
    except OSError as exc:  # disk full, quota, read-only or forbidden output: the user's to fix, not a crash
        from .artifacts import WRITE_ERRNOS

        if exc.errno not in WRITE_ERRNOS:
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        typer.echo(f"error: {where}{exc.strerror or exc}; free space or fix the permissions, then run again",
                   err=True)
        return 2
    except Exception as exc:  # usage errors: click's, or those of the click copy vendored in typer >= 0.2x
        import click

        if isinstance(exc, click.ClickException | typer.TyperException) and callable(
                getattr(exc, "format_message", None)):
            # one line, like every user error: the message and where to read the usage
            ctx = getattr(exc, "ctx", None)
            hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
            typer.echo(f"error: {' '.join(exc.format_message().split()).rstrip('.')}{hint}", err=True)
            return int(getattr(exc, "exit_code", 2))
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
