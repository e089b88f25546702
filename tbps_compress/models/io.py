"""Saving and loading model weights without pickled code.

- Artifacts store ``model_config.json`` + ``weights.safetensors``; models are rebuilt from the config alone.
- Local CLIP checkpoints: open_clip state dicts (``.safetensors``, or ``.bin`` / ``.pt`` / ``.pth`` read with
  ``torch.load(weights_only=True)``) and OpenAI's TorchScript archives (``ViT-B-16.pt``, read with
  ``torch.jit.load``, which runs no Python pickle; only its tensors are kept).
- Visual position embeddings are resized bilinearly on the patch grid, text ones linearly over the context.
"""

from __future__ import annotations

import logging
import math
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..artifacts import MODEL_CONFIG, WEIGHTS, Artifact, open_artifact, write_json
from ..errors import ArtifactError, CheckpointError
from .config import dump_model_config, image_size_hw, validate_model_config
from .factory import build_model, config_from_model
from .meta import meta_of, set_meta

log = logging.getLogger(__name__)

VOCAB_MAP = "vocab_map.json"
TOKENIZER_CFG = "tokenizer.json"


def read_vocab_map(folder: Path) -> tuple[dict[int, int] | None, int | None]:
    """The vocabulary mapping of a vocabulary-pruned artifact (``vocab_map.json`` {original: new}, optionally with an
    ``unk_id`` entry, or a list of original ids in new-id order; else ``tokenizer.json``'s ``unk_id``); (None, None)
    when there is none."""
    import json

    f = Path(folder) / VOCAB_MAP
    if not f.exists():
        return None, None
    raw = json.loads(f.read_text())
    unk = None
    if isinstance(raw, dict):
        for key in ("unk_id", "unk", "<unk>"):  # an unk entry may sit in the map itself
            if key in raw:
                unk = int(raw.pop(key))
        vm = {int(k): int(v) for k, v in raw.items()}
    else:
        vm = {int(o): i for i, o in enumerate(raw)}
    t = Path(folder) / TOKENIZER_CFG
    if unk is None and t.exists():
        unk = json.loads(t.read_text()).get("unk_id")
    return vm, unk


def save_model(model: nn.Module, folder: Path, cfg: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``model_config.json`` (read back from the module, so pruned shapes are exact) and
    ``weights.safetensors``. Returns the config written."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    cfg = config_from_model(model, cfg if cfg is not None else meta_of(model).config)
    folder = Path(folder)
    dump_model_config(cfg, folder / MODEL_CONFIG)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    try:
        save_file(state, str(folder / WEIGHTS), metadata={"format": "tbps_compress"})
    except SafetensorError as exc:  # disk full etc. (safetensors reports I/O errors with its own type)
        raise ArtifactError(f"{folder / WEIGHTS}: cannot write the weights ({exc}); free space or choose "
                            "another output folder") from exc
    vocab_map = meta_of(model).vocab_map
    if vocab_map:
        write_json(folder / VOCAB_MAP, {str(k): v for k, v in vocab_map.items()})
        write_json(folder / TOKENIZER_CFG, {"unk_id": meta_of(model).unk_id})
    return cfg


def load_model(source: Path | Artifact, *, device: str | torch.device = "cpu", verify: bool = True) -> nn.Module:
    """Rebuild a model from an artifact folder (config + safetensors), hash-verified by default; in eval mode (a
    convolutional stem's BatchNorm uses its running statistics), as every reader of an artifact wants."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    art = source if isinstance(source, Artifact) else open_artifact(Path(source), verify=verify)
    if art.model_config is None or not (art.path / WEIGHTS).exists():
        raise ArtifactError(
            f"{art.path}: not a PyTorch artifact ({MODEL_CONFIG} and {WEIGHTS} expected); "
            "ONNX artifacts are used through tbps_compress.runtime"
        )
    cfg = validate_model_config(art.model_config, source=str(art.path / MODEL_CONFIG))
    model = build_model(cfg)
    try:
        state = load_file(str(art.path / WEIGHTS), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise ArtifactError(f"{art.path / WEIGHTS}: cannot be read as safetensors ({exc})") from exc
    load_state_dict_checked(model, state, source=str(art.path / WEIGHTS))
    vocab_map, unk_id = read_vocab_map(art.path)
    if vocab_map:
        set_meta(model, vocab_map=vocab_map, unk_id=unk_id)
    return model.to(device).eval()


def load_state_dict_checked(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """``load_state_dict(strict=True)`` with an error that lists missing, unexpected and mis-shaped keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s) e.g. {missing[:3]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s) e.g. {unexpected[:3]}")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatch(es) e.g. {shapes[:3]} (checkpoint vs model)")
        raise CheckpointError(f"{source}: weights do not fit the architecture: {'; '.join(parts)}")
    model.load_state_dict(state, strict=True)


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in zf.namelist())


def unpickling_reason(exc: BaseException) -> str:
    """The specific reason in a ``torch.load(weights_only=True)`` refusal (torch's advice, which suggests turning
    the safety off, and its terminal colour codes dropped)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    m = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\.\s|\n\n|$)", text, re.S)
    reason = m.group(1) if m else (text.splitlines() or [""])[0]
    return " ".join(reason.split()) or type(exc).__name__


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a local checkpoint file, never unpickling arbitrary code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc
    if _is_torchscript(path):
        try:
            scripted = torch.jit.load(str(path), map_location="cpu")
        except (RuntimeError, ValueError) as exc:
            raise CheckpointError(f"{path}: TorchScript archive cannot be read ({exc})") from exc
        return {k: v.detach().clone() for k, v in scripted.state_dict().items()}
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the checkpoint file is empty")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path}: refused: the file holds pickled objects other than tensors (possibly code); only plain "
            f"state dicts are loaded ({unpickling_reason(exc)})"
        ) from exc
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): {reason}") from exc
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def convert_open_clip_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename open_clip / OpenAI ``nn.MultiheadAttention`` keys to :class:`PrunableAttention` ones and drop
    buffers the model rebuilds itself."""
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if k in ("input_resolution", "context_length", "vocab_size", "attn_mask"):
            continue
        k = k.replace(".attn.in_proj_weight", ".attn.qkv.weight").replace(".attn.in_proj_bias", ".attn.qkv.bias")
        k = k.replace(".attn.out_proj.", ".attn.proj.")
        out[k] = v
    return out


def resize_position_embeddings(state: dict[str, torch.Tensor], cfg: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Interpolate visual position embeddings (bilinear on the patch grid) and text ones (linear) to the config."""
    state = dict(state)
    key = "visual.positional_embedding"
    if key in state:
        pe = state[key]
        h, w = image_size_hw(cfg)
        p = cfg["vision_cfg"]["patch_size"]
        gh, gw = h // p, w // p
        if pe.shape[0] != gh * gw + 1:
            old = pe.shape[0] - 1
            side = int(math.isqrt(old))
            if side * side != old:
                raise CheckpointError(f"{key}: cannot infer the patch grid of {old} positions (not square)")
            grid = pe[1:].reshape(1, side, side, -1).permute(0, 3, 1, 2).float()
            grid = F.interpolate(grid, size=(gh, gw), mode="bilinear", align_corners=False)
            grid = grid.permute(0, 2, 3, 1).reshape(gh * gw, -1).to(pe.dtype)
            state[key] = torch.cat([pe[:1], grid], dim=0)
            log.info("resized visual position embeddings from %dx%d to %dx%d", side, side, gh, gw)
    key = "positional_embedding"
    if key in state:
        pe = state[key]
        n = cfg["text_cfg"]["context_length"]
        if pe.shape[0] != n:
            seq = pe.t().unsqueeze(0).float()
            seq = F.interpolate(seq, size=n, mode="linear", align_corners=False)
            state[key] = seq[0].t().to(pe.dtype).contiguous()
            log.info("resized text position embeddings from %d to %d", pe.shape[0], n)
    return state


def import_checkpoint(path: Path, cfg: dict[str, Any]) -> nn.Module:
    """A model of architecture ``cfg`` initialised from a local OpenAI / open_clip checkpoint file."""
    state = read_checkpoint(Path(path))
    state = convert_open_clip_state(state)
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    state = resize_position_embeddings(state, cfg)
    model = build_model(cfg)
    load_state_dict_checked(model, state, source=str(path))
    return model
