"""Export a PyTorch artifact to ONNX: one file per tower, then prove it.

The artifact written (stage ``export``) can be used without this package (onnxruntime, numpy, Pillow and
``tokenizers``; see ``tests/outside_client.py``), and is what :class:`tbps_compress.runtime.OnnxEncoder` reads:

- ``image_encoder.onnx``: input ``image`` float32 ``(N, 3, H, W)`` -> output ``embedding`` ``(N, D)``, L2-normalised.
- ``text_encoder.onnx``: input ``text`` int64 ``(N, L)`` of STANDARD CLIP BPE ids (0..49407, as open_clip and
  ``tokenizer.json`` write them) -> output ``embedding`` ``(N, D)``, L2-normalised. A vocabulary-pruned model maps
  the ids inside the graph (a constant lookup table and a Gather before the token embedding; ids outside the pruned
  vocabulary go to its unknown-token row), so no remapping file is needed.
  Weights above :data:`EXTERNAL_DATA_THRESHOLD` bytes go to ``<file>.data`` beside the model (ONNX's 2 GB limit).
- ``tokenizer.json``: a Hugging Face ``tokenizers`` file: CLIP's byte-level BPE with the caption cleaning as its
  normaliser, SOT/EOT added, truncated and zero-padded to the context length
  (:mod:`tbps_compress.export.hf_tokenizer`). Its ids are checked against the runtime tokenizer before writing.
- ``preprocess.json``: what a client must do (:func:`preprocess_document`): image size ``[height, width]``, bicubic
  resize, RGB, NCHW float32 in 0..1 normalised with OpenAI CLIP's mean/std; the caption cleaning rule and the
  context length; input and output names, and that the outputs are L2-normalised.
- ``model_config.json`` (copy, for reference), ``source_metrics.json`` (the source's ``metrics.json``),
  ``export_report.json`` (what :func:`export_onnx` returns).

Exports of earlier versions (``tokenizer.json`` holding ``{"context_length", "vocab_file", ...}``, a copy of
``bpe_simple_vocab_16e6.txt.gz`` and, for pruned models, ``vocab_map.json`` applied by the runtime tokenizer) still
load through :mod:`tbps_compress.runtime`.

Each tower is exported by the dynamo exporter with a dynamic batch axis. Before the folder is renamed into place
the ONNX checker runs (path-based, so external data works) and onnxruntime is compared with PyTorch on random
inputs at batch 1 and 3 (and, for a pruned vocabulary, on ids it kept) and, with ``parity_data``, on real dataset
samples: a mismatch raises :class:`~tbps_compress.errors.ParityError` and leaves nothing behind.

``optimize=True`` (``--optimize``) fuses each checked float32 tower for the CPU provider (:mod:`.fusion`: one
``com.microsoft`` ``Attention`` node per block with that block's head count, Gelu / BiasGelu, LayerNorm and bias
fusions) and proves the fused graph with the same parity inputs; a tower that fails keeps its unfused graph, with
the reason logged and in the report (``optimize``: operator counts per op type before and after, per tower).
Quantise the fused export (``quantize --mode dynamic``): the Attention nodes become ``QAttention``.

``fp16=True`` converts the checked float32 graphs to float16 weights and arithmetic with float32 inputs and
outputs (:func:`convert_to_float16`), a GPU format; its parity (tolerance ``max(atol, FP16_ATOL)``) runs on the
CPU provider with graph optimisations off, and is skipped with a logged reason when the CPU provider lacks a
float16 kernel.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

from ..artifacts import METRICS, MODEL_CONFIG, check_output_dir, open_artifact, write_json
from ..config import Strict
from ..errors import ArtifactError, ParityError, UserError
from ..runtime.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from .parity import (
    Case,
    ParityResult,
    check_max_abs,
    dataset_samples,
    make_session,
    onnx_file_size,
    random_images,
    random_tokens,
    run_session,
)

log = logging.getLogger(__name__)

__all__ = [
    "EXTERNAL_DATA_THRESHOLD",
    "FP16_ATOL",
    "IMAGE_FILE",
    "TEXT_FILE",
    "check_output_location",
    "convert_to_float16",
    "export_onnx",
    "load_onnx",
    "preprocess_document",
    "save_onnx",
]

IMAGE_FILE = "image_encoder.onnx"
TEXT_FILE = "text_encoder.onnx"
PREPROCESS_FILE = "preprocess.json"
TOKENIZER_FILE = "tokenizer.json"  # Hugging Face tokenizers file (a PyTorch source's tokenizer.json holds its unk_id)
VOCAB_MAP_FILE = "vocab_map.json"  # read from a vocabulary-pruned source; folded into the text graph
VOCAB_SIZE = 49408
SOURCE_METRICS_FILE = "source_metrics.json"
REPORT_FILE = "export_report.json"
SOT_ID = 49406
EOT_ID = 49407
MIN_OPSET = 18

# Initializer bytes above which a model's weights are saved as external data (``<file>.data``); below ONNX's 2 GB
# protobuf limit with room for the graph itself (torch's exporter uses the same value).
EXTERNAL_DATA_THRESHOLD = 1536 * 1024 * 1024
FP16_ATOL = 1e-2
PARITY_BATCHES = (1, 3)
PARITY_DATA_SAMPLES = 4
# Captions whose tokenizer.json ids are compared with the runtime tokenizer's before the export is written.
TOKENIZER_PROBES = (
    "A woman wearing a red T-shirt, blue jeans and white sneakers.",
    "The man's bag is BLACK; he wears glasses!!! (maybe) #2 ~ok: yes*",
    "she's carrying 3 bags -- a 12-inch laptop & a “big” umbrella",
    "Zoë's café-style coat, ﬁne ＡＢＣ１２３ and a 红色 hat 😀",
    " ".join(["a person in a long grey coat"] * 12),
)

_TOWERS = {"image": (IMAGE_FILE, "image"), "text": (TEXT_FILE, "text")}


def check_output_location(src: Path, out: Path, flag: str = "--out") -> None:
    """Refuse an output folder equal to, inside, or containing the input artifact (replacing it would destroy
    the input)."""
    s, o = Path(src).resolve(), Path(out).resolve()
    if o == s or s in o.parents:
        raise UserError(f"{out}: {flag} must not be the input artifact {src} or a folder inside it; "
                        "choose a new folder beside it")
    if o in s.parents:
        raise UserError(f"{out}: {flag} contains the input artifact {src}; replacing it would delete the input; "
                        "choose a new folder beside it")


# ---------------------------------------------------------------------------------------------------------------------
# ONNX file helpers
# ---------------------------------------------------------------------------------------------------------------------


def load_onnx(path: Path) -> Any:
    """Load an ONNX model (with its external data), or raise :class:`UserError` naming the file."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: ONNX file not found")
    try:
        return onnx.load(str(path))
    except Exception as exc:  # protobuf DecodeError, OSError for missing external data, ...
        raise UserError(f"{path}: not a readable ONNX model (corrupt or truncated?): {str(exc)[:300]}") from exc


def check_onnx(path: Path) -> None:
    """``onnx.checker.check_model`` on the path (works with external data); :class:`UserError` naming the file."""
    import onnx

    try:
        onnx.checker.check_model(str(path))
    except Exception as exc:
        raise UserError(f"{path}: the ONNX checker rejects the model: {str(exc)[:500]}") from exc


def _initializer_bytes(model: Any) -> int:
    return sum(_tensor_bytes(t) for t in model.graph.initializer)


def _tensor_bytes(t: Any) -> int:
    import onnx

    if t.raw_data:
        return len(t.raw_data)
    n = int(np.prod(t.dims)) if len(t.dims) else 1
    try:
        size = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    except (KeyError, TypeError, ValueError):
        size = 4
    return n * size


def save_onnx(model: Any, path: Path) -> bool:
    """Save a ModelProto; weights go to ``<file>.data`` when above :data:`EXTERNAL_DATA_THRESHOLD`. Returns whether
    external data was used. Any old ``<file>.data`` is removed first."""
    import onnx

    path = Path(path)
    data = path.parent / f"{path.name}.data"
    if data.exists():
        data.unlink()
    external = _initializer_bytes(model) > EXTERNAL_DATA_THRESHOLD
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)
    else:
        onnx.save_model(model, str(path))
    return external


# ---------------------------------------------------------------------------------------------------------------------
# float16 conversion
# ---------------------------------------------------------------------------------------------------------------------

# Ops computed in float32 inside a float16 graph (input 0 cast up, outputs cast down): the L2 norm of the
# embedding sums squares, which can overflow float16.
FP32_OPS = ("ReduceL2", "ReduceSumSquare")
# Inputs that ONNX requires to stay float32 (by op type: input indices).
_FLOAT32_INPUTS = {"Resize": {2}, "Upsample": {1}}


def convert_to_float16(model: Any, fp32_ops: tuple[str, ...] = FP32_OPS) -> Any:
    """Convert a float32 ModelProto to float16 weights and arithmetic, keeping float32 graph inputs and outputs
    (Cast nodes at the edges) and computing ``fp32_ops`` in float32. Returns the converted copy.

    Float initializers and constant tensors become float16 (finite values clipped to +-65504, infinities such as
    the causal mask's kept), ``Cast(to=float)`` becomes ``Cast(to=float16)``, stale ``value_info`` is dropped.
    """
    import copy

    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = copy.deepcopy(model)
    graph = model.graph
    f32, f16 = TensorProto.FLOAT, TensorProto.FLOAT16
    for node in graph.node:
        for attr in node.attribute:
            if attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
                raise UserError(f"float16 conversion does not support control flow (node {node.name!r}, "
                                f"{node.op_type}); export without --fp16")
    if any(t.data_type == f16 for t in graph.initializer):
        raise UserError("the model already holds float16 weights; convert the float32 export")

    keep32 = {node.input[i] for node in graph.node for i in _FLOAT32_INPUTS.get(node.op_type, ())
              if i < len(node.input)}

    def to16(t: Any) -> None:
        arr = numpy_helper.to_array(t)
        arr = np.where(np.isfinite(arr), np.clip(arr, -65504.0, 65504.0), arr).astype(np.float16)
        t.CopyFrom(numpy_helper.from_array(np.asarray(arr), t.name))

    for init in graph.initializer:
        if init.data_type == f32 and init.name not in keep32:
            to16(init)
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == f32:
                to16(attr.t)
            elif attr.type == onnx.AttributeProto.TENSORS:
                for t in attr.tensors:
                    if t.data_type == f32:
                        to16(t)
            if node.op_type == "Cast" and attr.name == "to" and attr.i == f32:
                attr.i = f16
    del graph.value_info[:]

    head, body, tail = [], [], []
    float_inputs = {i.name for i in graph.input if i.type.tensor_type.elem_type == f32}
    float_outputs = {o.name for o in graph.output if o.type.tensor_type.elem_type == f32}
    renamed = {name: f"{name}__fp16" for name in float_inputs | float_outputs}
    for name in float_inputs:
        head.append(helper.make_node("Cast", [name], [renamed[name]], to=f16, name=f"{name}__to_fp16"))
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in renamed:
                node.input[i] = renamed[name]
        for i, name in enumerate(node.output):
            if name in float_outputs:
                node.output[i] = renamed[name]
        if node.op_type in fp32_ops and node.input:
            src, up = node.input[0], f"{node.input[0]}__fp32_{len(body)}"
            body.append(helper.make_node("Cast", [src], [up], to=f32, name=f"{up}__cast"))
            node.input[0] = up
            outs = list(node.output)
            for i, name in enumerate(outs):
                node.output[i] = f"{name}__fp32"
            body.append(node)
            for name in outs:
                body.append(helper.make_node("Cast", [f"{name}__fp32"], [name], to=f16, name=f"{name}__to_fp16"))
            continue
        body.append(node)
    for name in float_outputs:
        tail.append(helper.make_node("Cast", [renamed[name]], [name], to=f32, name=f"{name}__to_fp32"))
    del graph.node[:]
    graph.node.extend(head + body + tail)
    return model


# ---------------------------------------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------------------------------------


def _wrappers() -> tuple[type, type]:
    from torch import nn

    class ImageEncoder(nn.Module):
        """``image`` (N, 3, H, W) -> L2-normalised ``embedding`` (N, D)."""

        def __init__(self, model: nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(self, image):  # noqa: ANN001, ANN201 - traced
            return self.model.encode_image(image, normalize=True)

    class TextEncoder(nn.Module):
        """``text`` (N, L) int64 standard CLIP ids -> L2-normalised ``embedding`` (N, D), pooled at the end-of-text
        (argmax) id. ``lookup`` (a vocabulary-pruned model): standard id -> token-embedding row, applied first (kept
        as a (V, 1) table so that the exporter writes one Gather and a Squeeze)."""

        def __init__(self, model: nn.Module, lookup: Any = None) -> None:
            super().__init__()
            self.model = model
            if lookup is not None:
                self.register_buffer("lookup", lookup.reshape(-1, 1), persistent=False)
            else:
                self.lookup = None

        def forward(self, text):  # noqa: ANN001, ANN201 - traced
            if self.lookup is not None:
                text = nn.functional.embedding(text, self.lookup).squeeze(-1)
            return self.model.encode_text(text, normalize=True)

    return ImageEncoder, TextEncoder


def _rename_output(program: Any, name: str) -> None:
    """Name the graph output ``name``. torch's ``output_names`` collides with internal values of the same name
    (the token embedding's Gather is called ``embedding``) and then breaks SSA, so rename by hand."""
    graph = program.model.graph
    out = graph.outputs[0]
    taken = {v.name for node in graph for v in node.outputs} | {v.name for v in graph.inputs}
    taken |= set(graph.initializers)
    for node in graph:
        for value in node.outputs:
            if value.name == name and value is not out:
                new, i = f"{name}_internal", 0
                while new in taken:
                    i += 1
                    new = f"{name}_internal{i}"
                value.name = new
                taken.add(new)
    out.name = name


def _export_tower(module: Any, example: Any, input_name: str, path: Path, opset: int) -> bool:
    """Export one tower with the dynamo exporter (dynamic batch axis); returns whether external data was used."""
    import torch

    batch = torch.export.Dim("batch", min=1)
    # onnxscript / onnx_ir log every optimisation step at INFO; keep them out of the stage's log.
    noisy = [logging.getLogger(name) for name in ("onnxscript", "onnx_ir")]
    levels = [lg.level for lg in noisy]
    for lg in noisy:
        lg.setLevel(max(lg.getEffectiveLevel(), logging.WARNING))
    try:
        with torch.no_grad():
            program = torch.onnx.export(
                module.eval(), (example,), input_names=[input_name], dynamic_shapes={input_name: {0: batch}},
                dynamo=True, opset_version=opset, verbose=False, optimize=True,
            )
    finally:
        for lg, level in zip(noisy, levels, strict=True):
            lg.setLevel(level)
    _rename_output(program, "embedding")
    graph = program.model.graph
    size = sum(v.const_value.nbytes for v in graph.initializers.values() if v.const_value is not None)
    external = size > EXTERNAL_DATA_THRESHOLD
    program.save(str(path), external_data=external)
    return external


def _read_vocab_map(path: Path) -> tuple[dict[int, int], int | None]:
    """Read a source ``vocab_map.json``: returns ({original id: row}, unk id or None). Accepts ``{original: new}``
    (with an optional ``"unk"`` / ``"unk_id"`` entry) or a list of original ids in new-id order."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path}: not valid JSON ({exc}); re-run the stage that wrote it") from exc
    unk: int | None = None
    try:
        if isinstance(data, list):
            mapping = {int(orig): new for new, orig in enumerate(data)}
        elif isinstance(data, dict):
            data = dict(data)
            for key in ("unk_id", "unk", "<unk>"):
                if key in data:
                    unk = int(data.pop(key))
            mapping = {int(k): int(v) for k, v in data.items()}
        else:
            raise TypeError(type(data).__name__)
    except (TypeError, ValueError) as exc:
        raise ArtifactError(f"{path}: expected an object original id -> new id (or a list of original ids), "
                            f"with integer entries ({exc})") from exc
    return mapping, unk


def _vocab_lookup(path: Path, mapping: dict[int, int], unk: int | None, n_tokens: int) -> np.ndarray:
    """The in-graph lookup table of a pruned vocabulary: standard id -> row (unknown ids -> ``unk``)."""
    if unk is None:
        raise ArtifactError(f"{path}: no unknown-token id (an \"unk_id\" entry here or in {TOKENIZER_FILE}); the "
                            "exported text tower sends ids outside the pruned vocabulary to that row; add it or "
                            "re-run the stage that pruned the vocabulary")
    bad = sorted(o for o in mapping if not 0 <= o < VOCAB_SIZE)
    if bad:
        raise ArtifactError(f"{path}: original ids {bad[:5]} are outside CLIP's vocabulary [0, {VOCAB_SIZE})")
    rows = sorted({v for v in mapping.values()} | {unk})
    if rows[0] < 0 or rows[-1] >= n_tokens:
        raise ArtifactError(f"{path}: rows must lie in [0, {n_tokens}) (the model's token embeddings), found "
                            f"{rows[0] if rows[0] < 0 else rows[-1]}; the map does not belong to these weights")
    if EOT_ID not in mapping:
        raise ArtifactError(f"{path}: the end-of-text id {EOT_ID} is not mapped; the text tower pools at it")
    eot = mapping[EOT_ID]
    if rows[-1] > eot:
        log.warning("%s: end-of-text maps to %d, not the largest row; argmax pooling will pick the wrong token",
                    path, eot)
    lookup = np.full(VOCAB_SIZE, unk, dtype=np.int64)
    for orig, row in mapping.items():
        lookup[orig] = row
    lookup[0] = mapping.get(0, 0)  # padding
    return lookup


def _kept_tokens(n: int, context_length: int, kept: np.ndarray, seed: int) -> np.ndarray:
    """Like :func:`random_tokens` (standard ids, EOT at a random place, zero padding), the ids drawn from ``kept``."""
    tokens = random_tokens(n, context_length, EOT_ID, seed=seed)
    body = (tokens != 0) & (tokens != EOT_ID)
    tokens[body] = np.random.default_rng(seed).choice(kept, size=int(body.sum()))
    return tokens


def preprocess_document(height: int, width: int, context_length: int, embed_dim: int,
                        normalized: bool = True) -> dict[str, Any]:
    """``preprocess.json`` of an export: everything a client outside this package must do (module docs).
    ``normalized``: whether the graphs' outputs are L2-normalised (export measures it on its parity inputs)."""
    from ..runtime.preprocess import PREPROCESS_FORMAT
    from ..runtime.tokenizer import CAPTION_CLEAN_CHARS

    chars = " ".join(CAPTION_CLEAN_CHARS)
    return {
        "format": PREPROCESS_FORMAT,
        "image": {
            "input": "image",
            "image_size_hw": [height, width],
            "resize": "bicubic",
            "resize_rule": f"resize to exactly {height} x {width} (height x width; PIL: image.resize(({width}, "
                           f"{height}), Image.BICUBIC)), no crop, aspect ratio not kept",
            "channel_order": "RGB",
            "layout": "NCHW",
            "dtype": "float32",
            "scale": "pixel / 255 (0..1), then (x - mean) / std per channel",
            "mean": list(OPENAI_CLIP_MEAN),
            "std": list(OPENAI_CLIP_STD),
        },
        "text": {
            "input": "text",
            "dtype": "int64",
            "context_length": context_length,
            "tokenizer": TOKENIZER_FILE,
            "ids": f"standard CLIP BPE ids: [{SOT_ID}] tokens [{EOT_ID}] padded with 0 to context_length; a longer "
                   f"caption keeps its first context_length - 2 tokens and ends with {EOT_ID}",
            "sot_id": SOT_ID,
            "eot_id": EOT_ID,
            "pad_id": 0,
            "caption_cleaning": {
                "rule": f"lower-case, replace each of {chars} by a space, collapse runs of whitespace into one "
                        "space, strip; tokenizer.json's normaliser applies it, so pass raw captions",
                "lowercase": True,
                "replace_with_space": list(CAPTION_CLEAN_CHARS),
                "collapse_whitespace": True,
                "tokenizer_json_limits": "tokenizer.json gives the runtime's ids except for HTML character "
                                         "references (&amp;) and mojibake, which the runtime's ftfy cleaning "
                                         "repairs first",
            },
        },
        "output": {
            "name": "embedding",
            "dtype": "float32",
            "shape": ["batch", embed_dim],
            "l2_normalized": normalized,
            "similarity": "dot product of the embeddings (cosine similarity)" if normalized else
                          "cosine similarity (L2-normalise the embeddings first)",
        },
    }


def _check_tokenizer(path: Path, context_length: int, probes: list[str], captions: list[str]) -> dict[str, Any]:
    """Compare ``tokenizer.json``'s ids of raw captions with the runtime's (``clean_caption`` then open_clip's BPE).

    A fixed probe that differs is a bug: :class:`ParityError`. Dataset ``captions`` that differ belong to a class
    the file cannot reproduce (HTML character references, mojibake; see :mod:`.hf_tokenizer`): logged and counted
    in the report, the export goes on."""
    from tokenizers import Tokenizer

    from ..runtime.tokenizer import BPETokenizer, clean_caption

    hf_tok, runtime = Tokenizer.from_file(str(path)), BPETokenizer(path, context_length=context_length)

    def differing(texts: list[str]) -> list[str]:
        if not texts:
            return []
        hf = [e.ids for e in hf_tok.encode_batch(texts)]
        ref = runtime([clean_caption(c) for c in texts]).tolist()
        return [c for c, a, b in zip(texts, hf, ref, strict=True) if a != b]

    bad = differing(probes)
    if bad:
        raise ParityError(f"{path.name}: {len(bad)} of {len(probes)} probe captions tokenise differently from the "
                          f"runtime tokenizer, e.g. {bad[0][:80]!r}; report this with the caption")
    bad = differing(captions)
    if bad:
        log.warning("%s: %d of %d dataset captions tokenise differently from the runtime (e.g. %r): HTML entities "
                    "or mojibake, which only the runtime's ftfy cleaning repairs", path.name, len(bad),
                    len(captions), bad[0][:80])
    return {"checked": len(probes) + len(captions), "dataset_differ": len(bad), "examples": bad[:3]}


def export_onnx(
    artifact: Path,
    out: Path,
    *,
    opset: int = 18,
    fp16: bool = False,
    force: bool = False,
    parity_data: Path | None = None,
    atol: float = 1e-4,
    optimize: bool = False,
) -> dict:
    """Export the PyTorch artifact ``artifact`` to an ONNX artifact ``out`` and prove it (see the module docs).

    Args:
        artifact: a PyTorch artifact folder (``model_config.json`` + ``weights.safetensors``), hash-verified.
        out: the new artifact folder; must not be ``artifact`` or inside it; replaced only with ``force``.
        opset: ONNX opset (>= 18, the dynamo exporter's minimum).
        fp16: store float16 graphs (GPU format) instead of float32.
        parity_data: optional dataset root; a few real images and captions are added to the parity inputs.
        atol: max absolute difference allowed between onnxruntime and PyTorch embeddings (float32).
        optimize: fuse each tower for the CPU provider (:mod:`.fusion`: attention, Gelu, LayerNorm, bias); a
            tower whose fused graph fails the same parity checks keeps its unfused graph (logged, in the report).

    Returns:
        The report also saved as ``export_report.json``: ``parity`` (max abs diff per output and input set;
        ``fused``: of the fused graphs), ``max_diff`` (over the graphs written), ``files`` (bytes per file),
        ``opset``, ``fp16``, shapes and, with ``optimize``, ``optimize`` (per tower: ``fused``, ``ops_before`` /
        ``ops_after`` per op type, attention blocks fused with their head counts, ``max_diff``,
        ``fallback_reason``).

    Raises:
        UserError: bad ``out``/``opset``; ArtifactError: missing or corrupt source; ParityError: mismatch.
    """
    import onnx
    import torch

    from ..artifacts import write_artifact
    from ..models.config import image_size_hw
    from ..models.factory import context_length as text_context_length
    from ..models.io import load_model
    from ..runtime.tokenizer import BPETokenizer
    from .hf_tokenizer import build_hf_tokenizer, write_hf_tokenizer

    src, out = Path(artifact), Path(out)
    check_output_location(src, out)
    check_output_dir(out, force)
    max_opset = onnx.defs.onnx_opset_version()
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= max_opset:
        raise UserError(f"--opset {opset!r}: choose an integer from {MIN_OPSET} to {max_opset} (the dynamo "
                        f"exporter writes opset {MIN_OPSET} or newer)")
    if not atol > 0:
        raise UserError(f"atol must be positive, got {atol!r}")
    if optimize and fp16:
        raise UserError("--optimize fuses float32 graphs for the CPU provider and --fp16 writes a GPU format; "
                        "choose one")
    art = open_artifact(src)
    model = load_model(art, verify=False).float().eval()
    cfg = art.model_config or {}
    height, width = image_size_hw(cfg)
    context_length = text_context_length(model)
    n_tokens = int(model.token_embedding.num_embeddings)

    lookup: np.ndarray | None = None
    kept: list[int] = []
    if (src / VOCAB_MAP_FILE).is_file():
        mapping, unk_id = _read_vocab_map(src / VOCAB_MAP_FILE)
        if unk_id is None and (src / TOKENIZER_FILE).is_file():
            unk_id = art.read_json(TOKENIZER_FILE).get("unk_id")
        lookup = _vocab_lookup(src / VOCAB_MAP_FILE, mapping, unk_id, n_tokens)
        kept = sorted(set(mapping) - {0, SOT_ID, EOT_ID})
    elif n_tokens <= EOT_ID:
        raise ArtifactError(f"{src}: the text tower has {n_tokens} token embeddings but the end-of-text id is "
                            f"{EOT_ID} and there is no {VOCAB_MAP_FILE}")

    hf_tokenizer = build_hf_tokenizer(context_length)  # before any work: fails at once without tokenizers / ftfy

    def rows(tokens: np.ndarray) -> np.ndarray:
        """Standard ids -> the model's token rows (what PyTorch is fed)."""
        return tokens if lookup is None else lookup[tokens]

    preprocess_cfg = {"image_size": [height, width], "mean": list(OPENAI_CLIP_MEAN), "std": list(OPENAI_CLIP_STD),
                      "resize": "bicubic"}

    # Inputs: fresh random batches, plus real samples when a dataset is given (read before any work is done).
    cases: list[Case] = []
    for i, n in enumerate(PARITY_BATCHES):
        cases.append(Case("image", f"random-b{n}", random_images(n, (height, width), seed=100 + i)))
        cases.append(Case("text", f"random-b{n}", random_tokens(n, context_length, EOT_ID, seed=200 + i)))
    if kept:  # random standard ids are mostly unknown to a pruned vocabulary: try the kept ones too
        cases.append(Case("text", "kept-b3", _kept_tokens(3, context_length, np.array(kept), seed=210)))
    captions: list[str] = []
    if parity_data is not None:
        from ..runtime.preprocess import PreprocessConfig

        tok = BPETokenizer(context_length=context_length)
        images, tokens = dataset_samples(Path(parity_data), PreprocessConfig.from_dict(preprocess_cfg), tok,
                                         PARITY_DATA_SAMPLES, PARITY_DATA_SAMPLES)
        if len(images):
            cases.append(Case("image", f"dataset-b{len(images)}", images))
        if len(tokens):
            cases.append(Case("text", f"dataset-b{len(tokens)}", tokens))
        captions = _dataset_captions(Path(parity_data), 64)

    @torch.no_grad()
    def torch_ref(case: Case) -> np.ndarray:
        if case.tower == "image":
            emb = model.encode_image(torch.from_numpy(case.array), normalize=True)
        else:
            emb = model.encode_text(torch.from_numpy(rows(case.array)), normalize=True)
        return emb.float().numpy()

    refs = {case.key: torch_ref(case) for case in cases}
    embed_dim = int(refs[cases[0].key].shape[1])
    image_enc, text_enc = _wrappers()
    examples = {"image": torch.randn(2, 3, height, width),
                "text": torch.from_numpy(random_tokens(2, context_length, EOT_ID, seed=7))}
    modules = {"image": image_enc(model),
               "text": text_enc(model, None if lookup is None else torch.from_numpy(lookup))}
    options = {"opset": opset, "fp16": fp16, "atol": atol, "parity_data": str(parity_data) if parity_data else None,
               "optimize": optimize}

    with write_artifact(out, stage="export", parent=src, force=force, extra_lineage={"export": options}) as tmp:
        external: dict[str, bool] = {}
        for tower, (filename, input_name) in _TOWERS.items():
            log.info("exporting the %s tower to %s (opset %d)", tower, filename, opset)
            external[tower] = _export_tower(modules[tower], examples[tower], input_name, tmp / filename, opset)
            check_onnx(tmp / filename)

        def onnx_run(disable: bool) -> Any:
            sessions: dict[str, Any] = {}

            def run(case: Case) -> np.ndarray:
                if case.tower not in sessions:
                    sessions[case.tower] = make_session(tmp / _TOWERS[case.tower][0], disable_optimizations=disable)
                return run_session(sessions[case.tower], case.array)

            return run

        fp32_run = onnx_run(False)
        fp32 = check_max_abs(cases, lambda c: refs[c.key], fp32_run, atol, "ONNX export vs PyTorch (float32)")
        log.info("float32 parity: max abs diff %.3g over %d outputs", fp32.max_diff, len(fp32.diffs))
        norms = np.concatenate([np.linalg.norm(fp32_run(case), axis=1) for case in cases])
        normalized = bool(np.all(np.abs(norms - 1.0) < 1e-4))  # preprocess.json tells clients
        fused = _optimize_towers(tmp, cases, lambda c: refs[c.key], atol, external) if optimize else None
        fp16_result: ParityResult | None = None
        fp16_skipped: str | None = None
        if fp16:
            for filename, _ in _TOWERS.values():
                converted = convert_to_float16(load_onnx(tmp / filename))
                external[filename] = save_onnx(converted, tmp / filename)
                check_onnx(tmp / filename)
            fp16_atol = max(atol, FP16_ATOL)
            try:
                fp16_result = check_max_abs(cases, lambda c: refs[c.key], onnx_run(True), fp16_atol,
                                            "ONNX float16 export vs PyTorch")
            except UserError as exc:
                if "NOT_IMPLEMENTED" not in str(exc) and "Could not find an implementation" not in str(exc):
                    raise
                fp16_skipped = f"the CPU provider lacks a float16 kernel ({str(exc)[:200]}); check on a GPU"
                log.warning("float16 parity skipped: %s", fp16_skipped)

        write_hf_tokenizer(tmp / TOKENIZER_FILE, context_length, tokenizer=hf_tokenizer)
        tokenizer_check = _check_tokenizer(tmp / TOKENIZER_FILE, context_length, list(TOKENIZER_PROBES), captions)
        write_json(tmp / PREPROCESS_FILE, preprocess_document(height, width, context_length, embed_dim, normalized))
        shutil.copyfile(src / MODEL_CONFIG, tmp / MODEL_CONFIG)
        if (src / METRICS).is_file():
            shutil.copyfile(src / METRICS, tmp / SOURCE_METRICS_FILE)
        files = {f: onnx_file_size(tmp / f) for f, _ in _TOWERS.values()}
        report: dict[str, Any] = {
            "source": str(src.resolve()),
            "opset": opset,
            "fp16": fp16,
            "atol": atol,
            "parity": {"float32": fp32.diffs, "float16": fp16_result.diffs if fp16_result else None},
            "max_diff": fp32.max_diff,
            "optimize": fused,
            "max_diff_fp16": fp16_result.max_diff if fp16_result else None,
            "fp16_atol": max(atol, FP16_ATOL) if fp16 else None,
            "fp16_parity_skipped": fp16_skipped,
            "tokenizer_check": tokenizer_check,
            "vocab_lookup_in_graph": lookup is not None,
            "files": files,
            "external_data": any(external.values()),
            "image_size": [height, width],
            "context_length": context_length,
            "embed_dim": embed_dim,
        }
        if fused is not None:
            diffs = {k: v for entry in fused.values() if entry["fused"] for k, v in entry["parity"].items()}
            report["parity"]["fused"] = diffs
            report["max_diff"] = max(fp32.max_diff, max(diffs.values(), default=0.0))
        write_json(tmp / REPORT_FILE, report)
    report["path"] = str(out)
    log.info("exported %s -> %s (max abs diff %.3g)", src, out, report["max_diff"])
    return report


def _optimize_towers(folder: Path, cases: list[Case], reference: Any, atol: float,
                     external: dict[str, bool]) -> dict[str, Any]:
    """Fuse each tower file in ``folder`` (:func:`.fusion.fuse_tower`) and keep the fused graph only when it passes
    the same parity checks (``cases`` against the PyTorch ``reference``, ``atol``) as the unfused one; otherwise
    the unfused file stays and ``fallback_reason`` says why. Returns the per-tower report entries."""
    import tempfile

    from .fusion import fuse_tower, op_counts

    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="tbps_fuse_") as work:
        for tower, (filename, _) in _TOWERS.items():
            path, candidate = folder / filename, Path(work) / filename
            model = load_onnx(path)
            entry: dict[str, Any] = {"fused": False, "fallback_reason": None, "ops_before": op_counts(model)}
            try:
                fused, info = fuse_tower(model)
                entry.update(info)
                save_onnx(fused, candidate)
                check_onnx(candidate)
                session = make_session(candidate)
                result = check_max_abs([c for c in cases if c.tower == tower], reference,
                                       lambda c, s=session: run_session(s, c.array), atol,
                                       f"fused {tower} tower vs PyTorch")
            except ParityError as exc:
                entry["parity"] = exc.diffs
                entry["fallback_reason"] = f"the fused graph fails parity ({str(exc)[:300]}); kept the unfused one"
            except Exception as exc:  # onnxruntime's optimiser and loaders raise assorted types
                entry["fallback_reason"] = (f"fusion failed ({type(exc).__name__}: {str(exc)[:300]}); kept the "
                                            "unfused graph")
            else:
                entry.update(fused=True, parity=result.diffs, max_diff=result.max_diff)
                # install the very files that passed (saving with external data moved the tensors out of `fused`)
                data, new_data = folder / f"{filename}.data", Path(work) / f"{filename}.data"
                if data.exists():
                    data.unlink()
                shutil.copyfile(candidate, path)
                if new_data.is_file():
                    shutil.copyfile(new_data, data)
                external[tower] = new_data.is_file()
                check_onnx(path)
                log.info("%s tower fused: %d attention blocks (heads %s), %d -> %d nodes, max abs diff %.3g", tower,
                         info["attention"]["fused"], info["attention"]["heads"], sum(entry["ops_before"].values()),
                         sum(info["ops_after"].values()), result.max_diff)
            if entry["fallback_reason"]:
                log.warning("%s tower not fused: %s", tower, entry["fallback_reason"])
            out[tower] = entry
    return out


def _dataset_captions(root: Path, n: int) -> list[str]:
    """Up to ``n`` raw captions of a dataset folder, in record order (for the tokenizer check)."""
    from ..data.readers import load_dataset

    return [c for r in load_dataset(root).records for c in r.captions][:n]


# --------------------------------------------------------------------------------------------------------- config
# The stage's settings (``tbps_compress.stages``): built from the CLI's flags or a pipeline stage's ``options``.


class ExportCfg(Strict):
    """``tbps-compress export``: ONNX export with parity checks."""

    opset: int = Field(18, ge=18, description="ONNX opset (>= 18, the dynamo exporter's minimum).")
    fp16: bool = Field(False, description="Also write fp16 graphs (a GPU format).")
    atol: float = Field(1e-4, gt=0, description="Largest absolute difference allowed against PyTorch.")
    optimize: bool = Field(False, description="Fuse attention, Gelu, LayerNorm and biases for the CPU provider "
                                              "(per-tower parity; a tower that fails stays unfused).")
