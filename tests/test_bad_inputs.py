"""A catalogue of malformed inputs driven through the real CLI: recipes, datasets, checkpoints, ONNX artifacts,
artifacts and command-line arguments.

Every case must end with exit code 2 and exactly one line on stderr that starts with ``error:`` and names the file
and the field or key at fault, without a traceback; the scratch folder the command works in (inputs, a
pre-existing output folder and the output paths) must hash the same before and after: nothing overwritten, nothing
left behind. Each case is a row of ``CASES``: (name, setup, argv, expected substrings); ``{w}`` in argv and in the
expected substrings is the scratch folder, ``{data}`` / ``{teacher}`` the session's tiny dataset and teacher.
A few rows also run through the installed console script in a fresh process.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

# ------------------------------------------------------------------------------------------------ helpers


@dataclass
class Ctx:
    w: Path  # scratch folder: inputs and outputs of the case
    data: Path  # the session's tiny dataset (read only)
    teacher: Path  # the session's tiny teacher artifact (read only)
    recipe: Callable[..., dict[str, Any]]  # conftest's train_recipe_data(output, **sections)

    def fmt(self, text: str) -> str:
        return text.format(w=self.w, data=self.data, teacher=self.teacher)

    def fmt_tree(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.fmt(value)
        if isinstance(value, dict):
            return {k: self.fmt_tree(v) for k, v in value.items()}
        return value


def tree_digest(root: Path) -> dict[str, str]:
    """Every file and folder under ``root`` (relative path -> content hash, 'dir' for folders)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_symlink():
            out[rel] = f"link:{p.readlink()}"
        elif p.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def assert_one_line_error(code: int, out: str, err: str, expect: list[str]) -> str:
    assert code == 2, (code, out[-2000:], err[-2000:])
    assert "Traceback" not in err and "Traceback" not in out, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error:"), lines[0]
    for needle in expect:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def write_recipe(ctx: Ctx, **changes: Any) -> None:
    """``{w}/r.yaml``: a valid test-tiny train recipe writing ``{w}/run``, with top-level ``changes`` merged."""
    data = ctx.recipe(ctx.w / "run")
    for key, value in ctx.fmt_tree(changes).items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    (ctx.w / "r.yaml").write_text(yaml.safe_dump(data), encoding="utf-8")


def recipe_text(text: str | bytes) -> Callable[[Ctx], None]:
    def setup(ctx: Ctx) -> None:
        f = ctx.w / "r.yaml"
        f.write_bytes(text) if isinstance(text, bytes) else f.write_text(text, encoding="utf-8")

    return setup


def recipe_with(**changes: Any) -> Callable[[Ctx], None]:
    return lambda ctx: write_recipe(ctx, **changes)


def copy_dataset(ctx: Ctx) -> tuple[Path, list[dict[str, Any]]]:
    ds = ctx.w / "ds"
    shutil.copytree(ctx.data, ds)
    return ds, json.loads((ds / "reid_raw.json").read_text())


def dataset_edit(edit: Callable[[list[dict[str, Any]]], Any]) -> Callable[[Ctx], None]:
    """Copy the tiny dataset to ``{w}/ds`` and rewrite its annotation with ``edit(entries)`` (the returned object
    is written when not None)."""

    def setup(ctx: Ctx) -> None:
        ds, entries = copy_dataset(ctx)
        result = edit(entries)
        (ds / "reid_raw.json").write_text(json.dumps(result if result is not None else entries), encoding="utf-8")

    return setup


def dataset_bytes(raw: bytes) -> Callable[[Ctx], None]:
    def setup(ctx: Ctx) -> None:
        ds, _ = copy_dataset(ctx)
        (ds / "reid_raw.json").write_bytes(raw)

    return setup


def _set(i: int, **fields: Any) -> Callable[[list[dict[str, Any]]], None]:
    def edit(entries: list[dict[str, Any]]) -> None:
        entries[i].update(fields)

    return edit


def _drop(i: int, field: str) -> Callable[[list[dict[str, Any]]], None]:
    def edit(entries: list[dict[str, Any]]) -> None:
        del entries[i][field]

    return edit


def _conflicting_duplicate(entries: list[dict[str, Any]]) -> None:
    entries.append({**entries[0], "id": entries[0]["id"] + 1000})


def _broken_test_image(ctx: Ctx) -> None:
    ds, entries = copy_dataset(ctx)
    rel = next(e["file_path"] for e in entries if e["split"] == "test")
    (ds / "imgs" / rel).write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    (ctx.w / "broken.txt").write_text(rel)


def tiny_state_dict() -> dict[str, torch.Tensor]:
    from tbps_compress.models.factory import build_model

    torch.manual_seed(0)
    return build_model("test-tiny").state_dict()


def ckpt_truncated(ctx: Ctx) -> None:
    torch.save(tiny_state_dict(), ctx.w / "ck.pt")
    raw = (ctx.w / "ck.pt").read_bytes()
    (ctx.w / "ck.pt").write_bytes(raw[: len(raw) // 2])


def ckpt_wrong_architecture(ctx: Ctx) -> None:
    state = tiny_state_dict()
    state["token_embedding.weight"] = state["token_embedding.weight"][:, :8].clone()
    state["extra.weight"] = torch.zeros(2)
    torch.save(state, ctx.w / "ck.pt")


class _Payload:
    """Unpickling this calls ``Path.touch(marker)``: code run by the loader (it must be refused)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def ckpt_pickle_payload(ctx: Ctx) -> None:
    torch.save({"state_dict": {"w": torch.zeros(1)}, "x": _Payload(ctx.w.parent / "PWNED")}, ctx.w / "ck.pt")


def ckpt_not_tensors(ctx: Ctx) -> None:
    torch.save({"weights": [1, 2, 3], "name": "x"}, ctx.w / "ck.pt")


def ckpt_text(ctx: Ctx) -> None:
    (ctx.w / "ck.pt").write_text("definitely not a checkpoint\n")


def ckpt_empty(ctx: Ctx) -> None:
    (ctx.w / "ck.bin").write_bytes(b"")


def safetensors_truncated(ctx: Ctx) -> None:
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(1000)}, str(ctx.w / "ck.safetensors"))
    raw = (ctx.w / "ck.safetensors").read_bytes()
    (ctx.w / "ck.safetensors").write_bytes(raw[:100])


def truncated_last_ckpt(ctx: Ctx) -> None:
    write_recipe(ctx)
    work = ctx.w / "run.ckpt"
    work.mkdir()
    torch.save({"model": tiny_state_dict()}, work / "last.ckpt")
    raw = (work / "last.ckpt").read_bytes()
    (work / "last.ckpt").write_bytes(raw[: len(raw) // 3])


def copy_teacher(ctx: Ctx) -> Path:
    art = ctx.w / "art"
    shutil.copytree(ctx.teacher, art)
    return art


def tampered_artifact(ctx: Ctx) -> None:
    f = copy_teacher(ctx) / "weights.safetensors"
    raw = bytearray(f.read_bytes())
    raw[-10] ^= 0xFF
    f.write_bytes(bytes(raw))


def artifact_without_lineage(ctx: Ctx) -> None:
    (copy_teacher(ctx) / "lineage.json").unlink()


def artifact_corrupt_lineage(ctx: Ctx) -> None:
    (copy_teacher(ctx) / "lineage.json").write_text("{not json")


def artifact_bad_model_config(ctx: Ctx) -> None:
    """``model_config.json`` with a negative width, re-hashed so the lineage check passes."""
    from tbps_compress.artifacts import write_artifact

    cfg = json.loads((ctx.teacher / "model_config.json").read_text())
    cfg["vision_cfg"]["width"] = -4
    with write_artifact(ctx.w / "art", stage="train") as tmp:
        (tmp / "model_config.json").write_text(json.dumps(cfg))
        shutil.copyfile(ctx.teacher / "weights.safetensors", tmp / "weights.safetensors")


# ------------------------------------------------------------------------------------------------ ONNX
def onnx_model(tower: str, input_name: str | None = None, hw: tuple[int, int] = (64, 32)) -> bytes:
    """A tiny valid ONNX encoder: image (N,3,64,32) -> mean colour, or text (N,77) int64 -> a linear map; output
    ``embedding`` (N,3)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    if tower == "image":
        inp = helper.make_tensor_value_info(input_name or "image", TensorProto.FLOAT, ["N", 3, *hw])
        nodes = [helper.make_node("GlobalAveragePool", [inp.name], ["p"]),
                 helper.make_node("Flatten", ["p"], ["embedding"])]
        inits = []
    else:
        inp = helper.make_tensor_value_info(input_name or "text", TensorProto.INT64, ["N", 77])
        w = numpy_helper.from_array(np.linspace(-1, 1, 77 * 3, dtype=np.float32).reshape(77, 3), "w")
        nodes = [helper.make_node("Cast", [inp.name], ["f"], to=TensorProto.FLOAT),
                 helper.make_node("MatMul", ["f", "w"], ["embedding"])]
        inits = [w]
    out = helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", 3])
    graph = helper.make_graph(nodes, f"{tower}_encoder", [inp], [out], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model.SerializeToString()


def write_onnx_artifact(out: Path, image: bytes | None = None, text: bytes | None = None) -> Path:
    """An export-stage artifact (lineage hashes included) holding the given encoder bytes."""
    from tbps_compress.artifacts import write_artifact
    from tbps_compress.runtime.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    from tbps_compress.runtime.tokenizer import default_vocab_path

    vocab = default_vocab_path()
    with write_artifact(out, stage="export") as tmp:
        (tmp / "image_encoder.onnx").write_bytes(image if image is not None else onnx_model("image"))
        (tmp / "text_encoder.onnx").write_bytes(text if text is not None else onnx_model("text"))
        (tmp / "preprocess.json").write_text(json.dumps({"image_size": [64, 32], "mean": list(OPENAI_CLIP_MEAN),
                                                         "std": list(OPENAI_CLIP_STD), "resize": "bicubic"}))
        (tmp / "tokenizer.json").write_text(json.dumps({"context_length": 77, "vocab_file": vocab.name}))
        shutil.copyfile(vocab, tmp / vocab.name)
    return out


def onnx_truncated(ctx: Ctx) -> None:
    good = onnx_model("image")
    write_onnx_artifact(ctx.w / "onnx", image=good[: len(good) // 2])


def onnx_wrong_inputs(ctx: Ctx) -> None:
    write_onnx_artifact(ctx.w / "onnx", image=onnx_model("image", input_name="pixels"))


def onnx_preprocess_disagrees(ctx: Ctx) -> None:
    write_onnx_artifact(ctx.w / "onnx", image=onnx_model("image", hw=(32, 32)))
    gallery = ctx.w / "gallery"
    shutil.copytree(ctx.data / "imgs" / "test", gallery)


def onnx_truncated_with_gallery(ctx: Ctx) -> None:
    onnx_truncated(ctx)
    gallery = ctx.w / "gallery"
    shutil.copytree(ctx.data / "imgs" / "test", gallery)


def nothing(ctx: Ctx) -> None:
    pass


def a_file(name: str) -> Callable[[Ctx], None]:
    def setup(ctx: Ctx) -> None:
        (ctx.w / name).write_text("a file, not a folder\n")

    return setup


def good_checkpoint(ctx: Ctx) -> None:
    torch.save(tiny_state_dict(), ctx.w / "ck.pt")


def good_checkpoint_and(other: Callable[[Ctx], None]) -> Callable[[Ctx], None]:
    def setup(ctx: Ctx) -> None:
        good_checkpoint(ctx)
        other(ctx)

    return setup


# ------------------------------------------------------------------------------------------------ pipelines
def write_pipeline(ctx: Ctx, *stages: dict[str, Any], second: dict[str, Any] | None = None) -> None:
    """``{w}/p.yaml``: run_dir ``{w}/run``, no dataset (every check runs before the data is looked at), a valid
    first train stage (``{w}/r.yaml``), a second train stage on ``{w}/r2.yaml`` (the valid recipe with ``second``
    merged) and ``stages``."""
    write_recipe(ctx)
    data = ctx.recipe(ctx.w / "run")
    data.update(ctx.fmt_tree(second or {}))
    (ctx.w / "r2.yaml").write_text(yaml.safe_dump(data), encoding="utf-8")
    pipe = {"run_dir": str(ctx.w / "run"), "data": str(ctx.w / "nodata"), "synth": None,
            "stages": [{"name": "teacher", "kind": "train", "recipe": str(ctx.w / "r.yaml")},
                       {"name": "second", "kind": "train", "recipe": str(ctx.w / "r2.yaml")},
                       *[ctx.fmt_tree(st) for st in stages]]}
    (ctx.w / "p.yaml").write_text(yaml.safe_dump(pipe, sort_keys=False), encoding="utf-8")


def pipeline_with(*stages: dict[str, Any], second: dict[str, Any] | None = None,
                  edit: Callable[[dict[str, Any], Ctx], Any] | None = None) -> Callable[[Ctx], None]:
    def setup(ctx: Ctx) -> None:
        write_pipeline(ctx, *stages, second=second)
        if edit is not None:
            pipe = yaml.safe_load((ctx.w / "p.yaml").read_text())
            edit(pipe, ctx)
            (ctx.w / "p.yaml").write_text(yaml.safe_dump(pipe, sort_keys=False), encoding="utf-8")

    return setup


def _second_stage(**fields: Any) -> Callable[[dict[str, Any], Ctx], None]:
    def edit(pipe: dict[str, Any], ctx: Ctx) -> None:
        pipe["stages"][1].update(ctx.fmt_tree(fields))

    return edit


def pipeline_foreign_stage_folder(ctx: Ctx) -> None:
    write_pipeline(ctx)
    (ctx.w / "run" / "second").mkdir(parents=True)
    (ctx.w / "run" / "second" / "notes.txt").write_text("my own results\n")


_EXPORT = {"name": "onnx", "kind": "export", "source": "teacher"}
_QUANT = {"name": "int8", "kind": "quantize", "source": "onnx"}


def pruned_vocabulary_without_unk(ctx: Ctx) -> None:
    """A torch artifact whose vocab_map.json has no unknown-token id (the exported graph needs one)."""
    from tbps_compress.artifacts import write_artifact
    from tbps_compress.models.factory import build_model
    from tbps_compress.models.io import save_model

    torch.manual_seed(0)
    with write_artifact(ctx.w / "art", stage="train") as tmp:
        save_model(build_model("test-tiny"), tmp)
        (tmp / "vocab_map.json").write_text(json.dumps({"0": 0, "320": 1, "49406": 2, "49407": 3}))



# ------------------------------------------------------------------------------------------------ outputs, images
def _png_claiming(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header claims ``width`` x ``height`` pixels (CRC fixed): Pillow refuses it at open time as a
    decompression bomb when it claims more than twice ``Image.MAX_IMAGE_PIXELS``."""
    import io
    import struct
    import zlib

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, "PNG")
    raw = bytearray(buf.getvalue())
    assert raw[12:16] == b"IHDR"
    raw[16:24] = struct.pack(">II", width, height)
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(raw[12:29])) & 0xFFFFFFFF)
    return bytes(raw)


def _bomb_test_image(ctx: Ctx) -> None:
    """The tiny dataset with its first test image replaced by a PNG claiming 20,000 x 20,000 pixels."""
    ds, entries = copy_dataset(ctx)
    rel = next(e["file_path"] for e in entries if e["split"] == "test")
    (ds / "imgs" / rel).write_bytes(_png_claiming(20_000, 20_000))


def _bomb_test_image_and_onnx(ctx: Ctx) -> None:
    _bomb_test_image(ctx)
    write_onnx_artifact(ctx.w / "onnx")


def a_folder(name: str) -> Callable[[Ctx], None]:
    def setup(ctx: Ctx) -> None:
        (ctx.w / name).mkdir()
        (ctx.w / name / "mine.txt").write_text("a file of the user's\n")

    return setup


def onnx_artifact_and(other: Callable[[Ctx], None]) -> Callable[[Ctx], None]:
    def setup(ctx: Ctx) -> None:
        write_onnx_artifact(ctx.w / "onnx")
        other(ctx)

    return setup


# ------------------------------------------------------------------------------------------------ the catalogue
R = "{w}/r.yaml"
DS = "{w}/ds"
RAW = "{w}/ds/reid_raw.json"
CASES: list[tuple[str, Callable[[Ctx], None], list[str], list[str]]] = [
    # -- recipes (train fails at validation or data loading, before any training)
    ("recipe-unknown-key", recipe_with(optimizer={"epochs": 1}), ["train", R], [R, "unknown key 'optimizer'"]),
    ("recipe-unknown-nested-key", recipe_with(optim={"epochz": 2}), ["train", R], [R, "optim.epochz"]),
    ("recipe-wrong-type", recipe_with(optim={"epochs": "many"}), ["train", R], [R, "optim.epochs", "many"]),
    ("recipe-out-of-range", recipe_with(optim={"lr": -0.5}), ["train", R], [R, "optim.lr", "-0.5"]),
    ("recipe-bad-choice", recipe_with(optim={"precision": "fp8"}), ["train", R], [R, "optim.precision", "fp8"]),
    ("recipe-nested-section-not-mapping", recipe_with(data="somewhere"), ["train", R], [R, "'data'"]),
    ("recipe-yaml-syntax", recipe_text("optim:\n  epochs: [1, 2\nseed: 3\n"), ["train", R], [R, "YAML syntax error"]),
    ("recipe-empty", recipe_text(""), ["train", R], [R, "empty"]),
    ("recipe-not-utf8", recipe_text(b"output: \xff\xfe runs\n"), ["train", R], [R, "not UTF-8"]),
    ("recipe-top-level-list", recipe_text("- output: x\n- seed: 1\n"), ["train", R], [R, "mapping"]),
    ("recipe-unknown-loss", recipe_with(losses={"bogus_loss": {"weight": 1}}), ["train", R],
     [R, "losses", "bogus_loss"]),
    ("recipe-unknown-model-config", recipe_with(model={"config": "vit-z-99"}), ["train", R],
     [R, "model.config", "vit-z-99"]),
    ("recipe-bad-set-value", recipe_with(), ["train", R, "--set", "optim.epochs=abc"], [R, "optim.epochs", "abc"]),
    ("recipe-malformed-set", recipe_with(), ["train", R, "--set", "optim.epochs"], ["optim.epochs", "key.path=value"]),
    ("recipe-missing-file", nothing, ["train", "{w}/nope.yaml"], ["{w}/nope.yaml", "not found"]),
    ("recipe-data-root-missing", recipe_with(data={"root": "{w}/nowhere"}), ["train", R], ["{w}/nowhere"]),
    ("recipe-checkpoint-missing", recipe_with(model={"config": "test-tiny", "checkpoint": "{w}/no.pt"}),
     ["train", R], ["{w}/no.pt", "not found"]),
    ("recipe-output-under-a-file", lambda ctx: (a_file("afile")(ctx), write_recipe(ctx, output="{w}/afile/run")),
     ["train", R], ["{w}/afile/run"]),
    ("recipe-output-under-proc", recipe_with(output="/proc/tbps-compress-test/run"), ["train", R],
     ["/proc/tbps-compress-test/run"]),
    ("recipe-dataset-bad-entry", lambda ctx: (dataset_edit(_set(2, id="seven"))(ctx),
                                              write_recipe(ctx, data={"root": str(ctx.w / "ds")})),
     ["train", R], [RAW, "entry 2", "'id'"]),
    # -- datasets
    ("data-missing-field", dataset_edit(_drop(0, "captions")), ["data", "stats", DS],
     [RAW, "entry 0", "'captions'", "missing"]),
    ("data-id-not-integer", dataset_edit(_set(1, id="0001")), ["data", "stats", DS], [RAW, "entry 1", "'id'"]),
    ("data-id-float", dataset_edit(_set(1, id=3.5)), ["data", "stats", DS], [RAW, "entry 1", "'id'"]),
    ("data-empty-caption", dataset_edit(_set(3, captions=["a man", "   "])), ["data", "stats", DS],
     [RAW, "entry 3", "'captions'[1]"]),
    ("data-no-captions", dataset_edit(_set(0, captions=[])), ["data", "stats", DS], [RAW, "entry 0", "'captions'"]),
    ("data-captions-not-list", dataset_edit(_set(0, captions="a man in red")), ["data", "stats", DS],
     [RAW, "entry 0", "'captions'"]),
    ("data-caption-not-string", dataset_edit(_set(0, captions=["ok", 42])), ["data", "stats", DS],
     [RAW, "entry 0", "'captions'[1]"]),
    ("data-not-utf8", dataset_bytes(b'[{"captions": ["caf\xe9"]}]'), ["data", "stats", DS], [RAW, "not UTF-8"]),
    ("data-json-syntax", dataset_bytes(b'[{"id": 1,, }]'), ["data", "stats", DS], [RAW, "JSON syntax error"]),
    ("data-not-a-list", dataset_bytes(b'{"entries": []}'), ["data", "stats", DS], [RAW, "list"]),
    ("data-empty-list", dataset_bytes(b"[]"), ["data", "stats", DS], [RAW, "empty"]),
    ("data-entry-not-object", dataset_edit(lambda e: [*e, "oops"]), ["data", "stats", DS], [RAW, "entry 48"]),
    ("data-unknown-split", dataset_edit(_set(0, split="holdout")), ["data", "stats", DS],
     [RAW, "entry 0", "'split'", "holdout"]),
    ("data-missing-image", dataset_edit(_set(0, file_path="imgs/train/nope.jpg")), ["data", "stats", DS],
     [RAW, "'file_path'", "nope.jpg"]),
    ("data-conflicting-duplicate", dataset_edit(_conflicting_duplicate), ["data", "stats", DS], [RAW, "already"]),
    ("data-unknown-format", nothing, ["data", "stats", "{data}", "--format", "coco"], ["coco", "cuhk-pedes"]),
    ("data-broken-image", _broken_test_image, ["eval", "{teacher}", "--data", DS, "--device", "cpu"],
     ["{w}/ds/imgs/test/", "cannot read image"]),
    # -- checkpoints
    ("ckpt-truncated", ckpt_truncated, ["import", "{w}/ck.pt", "--config", "test-tiny", "--out", "{w}/out"],
     ["{w}/ck.pt", "truncated or corrupt"]),
    ("ckpt-wrong-architecture", ckpt_wrong_architecture,
     ["import", "{w}/ck.pt", "--config", "test-tiny", "--out", "{w}/out"],
     ["{w}/ck.pt", "do not fit the architecture", "token_embedding.weight"]),
    ("ckpt-pickle-payload", ckpt_pickle_payload, ["import", "{w}/ck.pt", "--config", "test-tiny", "--out", "{w}/out"],
     ["{w}/ck.pt", "refused"]),
    ("ckpt-not-tensors", ckpt_not_tensors, ["import", "{w}/ck.pt", "--config", "test-tiny", "--out", "{w}/out"],
     ["{w}/ck.pt", "state dict of tensors"]),
    ("ckpt-text-file", ckpt_text, ["import", "{w}/ck.pt", "--config", "test-tiny", "--out", "{w}/out"],
     ["{w}/ck.pt"]),
    ("ckpt-empty-file", ckpt_empty, ["import", "{w}/ck.bin", "--config", "test-tiny", "--out", "{w}/out"],
     ["{w}/ck.bin"]),
    ("ckpt-safetensors-truncated", safetensors_truncated,
     ["import", "{w}/ck.safetensors", "--config", "test-tiny", "--out", "{w}/out"], ["{w}/ck.safetensors"]),
    ("ckpt-unknown-config", good_checkpoint, ["import", "{w}/ck.pt", "--config", "vit-z-99", "--out", "{w}/out"],
     ["vit-z-99", "test-tiny"]),
    ("ckpt-resume-truncated", truncated_last_ckpt, ["train", R, "--resume"], ["{w}/run.ckpt/last.ckpt"]),
    # -- ONNX artifacts
    ("onnx-truncated-eval", onnx_truncated, ["eval", "{w}/onnx", "--data", "{data}", "--device", "cpu"],
     ["{w}/onnx/image_encoder.onnx"]),
    ("onnx-wrong-inputs-eval", onnx_wrong_inputs, ["eval", "{w}/onnx", "--data", "{data}", "--device", "cpu"],
     ["{w}/onnx/image_encoder.onnx", "'image'", "pixels"]),
    ("onnx-preprocess-disagrees-eval", onnx_preprocess_disagrees,
     ["eval", "{w}/onnx", "--data", "{data}", "--device", "cpu"],
     ["{w}/onnx/preprocess.json", "[64, 32]", "[32, 32]"]),
    ("onnx-preprocess-disagrees-search", onnx_preprocess_disagrees,
     ["search", "{w}/onnx", "a man in a red jacket", "--gallery", "{w}/gallery"],
     ["{w}/onnx/preprocess.json", "[64, 32]", "[32, 32]"]),
    ("onnx-truncated-quantize", onnx_truncated, ["quantize", "{w}/onnx", "--out", "{w}/out"],
     ["{w}/onnx/image_encoder.onnx"]),
    ("onnx-truncated-search", onnx_truncated_with_gallery,
     ["search", "{w}/onnx", "a man in a red jacket", "--gallery", "{w}/gallery"], ["{w}/onnx/image_encoder.onnx"]),
    ("onnx-export-of-onnx-artifact", lambda ctx: write_onnx_artifact(ctx.w / "onnx"),
     ["export", "--onnx", "{w}/onnx", "--out", "{w}/out"], ["{w}/onnx"]),
    # -- artifacts
    ("artifact-tampered-eval", tampered_artifact, ["eval", "{w}/art", "--data", "{data}", "--device", "cpu"],
     ["{w}/art/weights.safetensors", "does not match"]),
    ("artifact-no-lineage", artifact_without_lineage, ["eval", "{w}/art", "--data", "{data}", "--device", "cpu"],
     ["{w}/art/lineage.json", "missing"]),
    ("artifact-corrupt-lineage", artifact_corrupt_lineage, ["export", "--onnx", "{w}/art", "--out", "{w}/out"],
     ["{w}/art/lineage.json", "corrupt"]),
    ("artifact-bad-model-config", artifact_bad_model_config,
     ["eval", "{w}/art", "--data", "{data}", "--device", "cpu"], ["{w}/art/model_config.json", "width"]),
    ("artifact-is-a-file", a_file("art"), ["eval", "{w}/art", "--data", "{data}", "--device", "cpu"], ["{w}/art"]),
    # -- command-line arguments
    ("cli-synth-bad-size", nothing, ["synth", "{w}/s", "--size", "tall"], ["--size", "tall"]),
    ("cli-synth-zero-size", nothing, ["synth", "{w}/s", "--size", "0x32", "--identities", "4"], ["size"]),
    ("cli-synth-too-few-identities", nothing, ["synth", "{w}/s", "--identities", "2"],
     ["synth: --identities must be at least 5 (got 2)", "80/10/10", "--test-ids"]),
    ("cli-synth-zero-train-ids", nothing, ["synth", "{w}/s", "--train-ids", "0"],
     ["synth: --train-ids must be at least 1 (got 0)"]),
    ("cli-synth-one-test-id", nothing, ["synth", "{w}/s", "--test-ids", "1", "--train-ids", "3"],
     ["synth: --test-ids must be at least 2 (got 1)", "R@1 100"]),
    ("cli-synth-one-val-id", nothing, ["synth", "{w}/s", "--preset", "benchmark", "--val-ids", "1"],
     ["synth: --val-ids must be 0 (no val split) or at least 2 (got 1)", "R@1 100"]),
    ("cli-synth-negative-val-ids", nothing, ["synth", "{w}/s", "--val-ids", "-2"],
     ["synth: --val-ids must be 0", "(got -2)"]),
    ("cli-synth-unknown-preset", nothing, ["synth", "{w}/s", "--preset", "huge"],
     ["synth: --preset must be one of demo, benchmark (got 'huge')"]),
    ("cli-export-bad-opset", nothing, ["export", "--onnx", "{teacher}", "--out", "{w}/out", "--opset", "7"],
     ["--opset", "7"]),
    ("cli-export-out-inside-source", copy_teacher, ["export", "--onnx", "{w}/art", "--out", "{w}/art/onnx"],
     ["{w}/art"]),
    ("cli-quantize-bad-mode", lambda ctx: write_onnx_artifact(ctx.w / "onnx"),
     ["quantize", "{w}/onnx", "--out", "{w}/out", "--mode", "int3"], ["--mode", "int3"]),
    ("cli-eval-unknown-split", nothing, ["eval", "{teacher}", "--data", "{data}", "--split", "dev"], ["'dev'"]),
    ("cli-eval-batch-size-zero", nothing, ["eval", "{teacher}", "--data", "{data}", "--batch-size", "0"],
     ["--batch-size"]),
    ("cli-unknown-option", recipe_with(), ["train", R, "--epochs", "3"], ["--epochs"]),
    ("cli-search-no-query", nothing, ["search", "{teacher}", "--gallery", "{data}/imgs/test"], ["query"]),
    ("cli-search-missing-gallery", nothing, ["search", "{teacher}", "a man", "--gallery", "{w}/nogallery"],
     ["{w}/nogallery"]),
    ("cli-search-sheet-exists", a_file("sheet.png"), ["search", "{teacher}", "a man", "--gallery",
                                                      "{data}/imgs/test", "--sheet", "{w}/sheet.png"],
     ["{w}/sheet.png: file already exists; choose another --sheet or pass --force to replace it"]),
    ("cli-search-html-exists", a_file("r.html"), ["search", "{teacher}", "a man", "--gallery", "{data}/imgs/test",
                                                  "--html", "{w}/r.html"],
     ["{w}/r.html: file already exists; choose another --html or pass --force to replace it"]),
    ("cli-search-unknown-device", nothing, ["search", "{teacher}", "a man", "--gallery", "{data}/imgs/test",
                                            "--device", "tpu"],
     ["--device 'tpu': not a device; choose auto, cpu, cuda or cuda:N"]),
    ("cli-import-out-exists", good_checkpoint, ["import", "{w}/ck.pt", "--config", "test-tiny", "--out", "{w}/keep"],
     ["{w}/keep", "--force"]),
    ("cli-import-out-parent-is-file", good_checkpoint_and(a_file("afile")),
     ["import", "{w}/ck.pt", "--config", "test-tiny", "--out", "{w}/afile/out"], ["{w}/afile"]),
    ("cli-import-out-under-proc", good_checkpoint,
     ["import", "{w}/ck.pt", "--config", "test-tiny", "--out", "/proc/tbps-compress-test/out"],
     ["/proc/tbps-compress-test"]),
    # -- pipelines (`run` checks every stage before the first runs, and writes nothing when a check fails)
    ("pipeline-later-recipe-missing", pipeline_with(edit=_second_stage(recipe="{w}/nope.yaml")),
     ["run", "{w}/p.yaml"], ["{w}/p.yaml: stage 'second' (train): recipe file {w}/nope.yaml not found"]),
    ("pipeline-later-recipe-unknown-key", pipeline_with(second={"optimizer": {"epochs": 1}}),
     ["run", "{w}/p.yaml"], ["{w}/p.yaml: stage 'second' (train): recipe {w}/r2.yaml", "unknown key 'optimizer'"]),
    ("pipeline-misspelled-bench-option",
     pipeline_with(_EXPORT, {"name": "bench", "kind": "bench", "artifacts": ["onnx"], "options": {"rep": 2}}),
     ["run", "{w}/p.yaml"], ["{w}/p.yaml: stage 'bench' (bench): unknown option 'rep'", "did you mean 'reps'",
                             "valid options:", "warmup"]),
    ("pipeline-misspelled-quantize-option", pipeline_with(_EXPORT, {**_QUANT, "options": {"mdoe": "dynamic"}}),
     ["run", "{w}/p.yaml"], ["{w}/p.yaml: stage 'int8' (quantize): unknown option 'mdoe'", "did you mean 'mode'",
                             "valid options: backend, calib_data, calib_method, calib_size, mode, op_types, towers"]),
    ("pipeline-bad-set-value", pipeline_with(edit=_second_stage(set=["optim.epochs=abc"])), ["run", "{w}/p.yaml"],
     ["{w}/p.yaml: stage 'second' (train): recipe {w}/r2.yaml with the stage's set: overrides",
      "optim.epochs", "abc"]),
    ("pipeline-stage-name-escapes", pipeline_with(edit=_second_stage(name="../escaped")), ["run", "{w}/p.yaml"],
     ["{w}/p.yaml", "stages.1.name", "stage name '../escaped' must be one plain folder name"]),
    ("pipeline-foreign-stage-folder", pipeline_foreign_stage_folder, ["run", "{w}/p.yaml"],
     ["{w}/run/second: exists but was not written by this pipeline", "stage 'second' would replace it", "--force"]),
    # -- export of a vocabulary-pruned model (the id remap goes into the graph: it needs an unknown-token row)
    ("export-pruned-vocabulary-without-unk", pruned_vocabulary_without_unk,
     ["export", "--onnx", "{w}/art", "--out", "{w}/out"], ["{w}/art/vocab_map.json", "no unknown-token id"]),
    # -- outputs: checked before any work; an existing target is replaced only with --force, and a folder where a
    # file is wanted (or a file where a folder is) never, not even with --force; images that do not decode
    ("cli-eval-out-exists", a_file("m.json"), ["eval", "{teacher}", "--data", "{data}", "--out", "{w}/m.json"],
     ["{w}/m.json: file already exists; choose another --out or pass --force to replace it"]),
    ("cli-eval-out-missing-folder", nothing, ["eval", "{teacher}", "--data", "{data}", "--out", "{w}/no/m.json"],
     ["{w}/no/m.json: folder {w}/no does not exist; create it or choose another --out"]),
    ("cli-eval-out-is-a-folder-even-with-force", nothing,
     ["eval", "{teacher}", "--data", "{data}", "--out", "{w}/keep", "--force"],
     ["{w}/keep: is a folder, not a file; give --out a file path such as {w}/keep/metrics.json"]),
    ("cli-eval-out-under-a-file", a_file("afile"), ["eval", "{teacher}", "--data", "{data}", "--out", "{w}/afile/m"],
     ["{w}/afile/m: cannot be created: {w}/afile is not a folder; choose another --out"]),
    ("cli-eval-unknown-device", nothing, ["eval", "{teacher}", "--data", "{data}", "--device", "tpu"],
     ["--device 'tpu': not a device; choose auto, cpu, cuda or cuda:N (N: a GPU index, e.g. cuda:0)"]),
    ("cli-eval-device-bad-index", nothing, ["eval", "{teacher}", "--data", "{data}", "--device", "cuda:one"],
     ["--device 'cuda:one': not a device; choose auto, cpu, cuda or cuda:N"]),
    ("cli-bench-out-exists", nothing, ["bench", "{teacher}", "--out", "{w}/keep"],
     ["{w}/keep: output already exists; choose another --out or pass --force to replace it"]),
    ("cli-bench-out-force-keeps-other-files", nothing, ["bench", "{teacher}", "--out", "{w}/keep", "--force"],
     ["{w}/keep: holds files it was not written with (e.g. result.txt); --force replaces only a folder holding "
      "bench.csv, bench.json, bench.md, pareto.png; move them away or choose another --out"]),
    ("cli-bench-out-is-a-file-even-with-force", a_file("afile"),
     ["bench", "{teacher}", "--out", "{w}/afile", "--force"],
     ["{w}/afile: exists and is not a folder; choose another --out (it is not replaced, even with --force)"]),
    ("cli-bench-out-under-a-file", a_file("afile"), ["bench", "{teacher}", "--out", "{w}/afile/report"],
     ["{w}/afile/report: cannot be created: {w}/afile is not a folder; choose another --out"]),
    ("cli-bench-unknown-device", nothing, ["bench", "{teacher}", "--device", "auto"],
     ["--device 'auto': not a device; choose cpu, cuda or cuda:N"]),
    ("cli-synth-preview-exists", a_file("sheet.png"), ["synth", "{w}/s", "--identities", "5", "--preview",
                                                       "{w}/sheet.png"],
     ["{w}/sheet.png: file already exists; choose another --preview or pass --force to replace it"]),
    ("cli-synth-preview-no-extension", nothing, ["synth", "{w}/s", "--identities", "5", "--preview", "{w}/sheet"],
     ["{w}/sheet: --preview needs an image file name ending in .png, .jpg, .jpeg, .bmp, .tif, .tiff (extension: "
      "none); use e.g. {w}/sheet.png"]),
    ("cli-synth-preview-not-an-image-name", nothing,
     ["synth", "{w}/s", "--identities", "5", "--preview", "{w}/sheet.json"],
     ["{w}/sheet.json: --preview needs an image file name ending in .png", "(extension: '.json'); use e.g. "
      "{w}/sheet.png"]),
    ("cli-synth-preview-is-a-folder", a_folder("sheet.png"), ["synth", "{w}/s", "--identities", "5", "--preview",
                                                              "{w}/sheet.png", "--force"],
     ["{w}/sheet.png: is a folder, not a file; give --preview a file path such as {w}/sheet.png/preview.png"]),
    ("cli-synth-preview-missing-folder", nothing,
     ["synth", "{w}/s", "--identities", "5", "--preview", "{w}/no/sheet.png"],
     ["{w}/no/sheet.png: folder {w}/no does not exist; create it or choose another --preview"]),
    ("cli-quantize-out-exists", lambda ctx: write_onnx_artifact(ctx.w / "onnx"),
     ["quantize", "{w}/onnx", "--out", "{w}/keep"],
     ["{w}/keep: output already exists; choose another --out or pass --force to replace it"]),
    ("cli-quantize-out-is-a-file-even-with-force", onnx_artifact_and(a_file("afile")),
     ["quantize", "{w}/onnx", "--out", "{w}/afile", "--force"],
     ["{w}/afile: exists and is not a folder; choose another --out (it is not replaced, even with --force)"]),
    ("cli-import-out-is-a-file-even-with-force", good_checkpoint_and(a_file("afile")),
     ["import", "{w}/ck.pt", "--config", "test-tiny", "--out", "{w}/afile", "--force"],
     ["{w}/afile: exists and is not a folder; choose another --out (it is not replaced, even with --force)"]),
    ("data-decompression-bomb", _bomb_test_image, ["eval", "{teacher}", "--data", DS, "--device", "cpu"],
     ["{w}/ds/imgs/test/", ": cannot read image: refused as a possible decompression bomb (", "pixels",
      "); shrink or remove the file"]),
    ("data-decompression-bomb-onnx", _bomb_test_image_and_onnx, ["eval", "{w}/onnx", "--data", DS],
     ["{w}/ds/imgs/test/", ": cannot read image: refused as a possible decompression bomb (", "pixels",
      "); shrink or remove the file"]),
]
# Rows also run through the installed console script (a fresh process).
SUBPROCESS = {"cli-unknown-option", "data-id-not-integer", "ckpt-pickle-payload"}


@pytest.fixture
def ctx(tmp_path: Path, tiny_dataset: Path, tiny_teacher_artifact: Path, train_recipe_data) -> Ctx:
    w = tmp_path / "w"
    w.mkdir()
    keep = w / "keep"  # a pre-existing output folder: must not be touched
    keep.mkdir()
    (keep / "result.txt").write_text("an earlier result\n")
    return Ctx(w, tiny_dataset, tiny_teacher_artifact, train_recipe_data)


def _check(ctx: Ctx, setup: Callable[[Ctx], None], argv: list[str], expect: list[str], run) -> str:
    setup(ctx)
    teacher_before = tree_digest(ctx.teacher)
    before = tree_digest(ctx.w)
    siblings = sorted(p.name for p in ctx.w.parent.iterdir())
    code, out, err = run([ctx.fmt(a) for a in argv])
    line = assert_one_line_error(code, out, err, [ctx.fmt(e) for e in expect])
    assert tree_digest(ctx.w) == before, "the failed command changed or left files in its folder"
    assert sorted(p.name for p in ctx.w.parent.iterdir()) == siblings
    assert tree_digest(ctx.teacher) == teacher_before
    assert not (ctx.w.parent / "PWNED").exists(), "a pickle payload ran"
    return line


def test_catalogue_is_large_and_names_are_unique() -> None:
    names = [c[0] for c in CASES]
    assert len(names) == len(set(names)) and len(names) >= 25
    assert SUBPROCESS <= set(names)


@pytest.mark.parametrize(("name", "setup", "argv", "expect"), CASES, ids=[c[0] for c in CASES])
def test_bad_input(name: str, setup, argv: list[str], expect: list[str], ctx: Ctx, run_cli) -> None:
    _check(ctx, setup, argv, expect, run_cli)


@pytest.mark.parametrize(("name", "setup", "argv", "expect"), [c for c in CASES if c[0] in SUBPROCESS],
                         ids=[c[0] for c in CASES if c[0] in SUBPROCESS])
def test_bad_input_console_script(name: str, setup, argv: list[str], expect: list[str], ctx: Ctx,
                                  run_cli_subprocess) -> None:
    _check(ctx, setup, argv, expect, run_cli_subprocess)


# ------------------------------------------------------------------------------------------------ accepted inputs
def test_the_fake_onnx_artifact_itself_works(ctx: Ctx, run_cli) -> None:
    """The ONNX rows fail because of their defect: the intact artifact evaluates."""
    write_onnx_artifact(ctx.w / "onnx")
    code, out, err = run_cli(["eval", ctx.w / "onnx", "--data", ctx.data, "--device", "cpu"])
    assert code == 0, err
    assert "mAP" in out and "test" in out and "error" not in err


def test_huge_caption_is_truncated_not_fatal(ctx: Ctx, run_cli) -> None:
    """A 1 MB caption is valid input: stats count it and evaluation truncates it to the context length."""

    def edit(entries: list[dict[str, Any]]) -> None:
        i = next(i for i, e in enumerate(entries) if e["split"] == "test")
        entries[i]["captions"][0] = "a man in a red jacket " * 50_000

    dataset_edit(edit)(ctx)
    code, out, err = run_cli(["data", "stats", ctx.w / "ds"])
    assert code == 0, err
    entries = json.loads((ctx.w / "ds" / "reid_raw.json").read_text())
    test = [e for e in entries if e["split"] == "test"]
    assert json.loads(out)["splits"]["test"]["captions"] == sum(len(e["captions"]) for e in test)
    code, out, err = run_cli(["eval", ctx.teacher, "--data", ctx.w / "ds", "--device", "cpu"])
    assert code == 0, err
    assert "mAP" in out and "test" in out and "error" not in err


def test_pickle_payload_class_really_runs_when_unpickled(tmp_path: Path) -> None:
    """Guard for the payload rows: plain pickle does run it (so its absence above means it was refused)."""
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(_Payload(marker)))  # noqa: S301 - the point of the test
    assert marker.exists()
