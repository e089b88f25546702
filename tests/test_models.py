"""Model configs, the prunable-attention factory, artifact save/load and checkpoint import."""

from __future__ import annotations

import copy
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch

from tbps_compress.artifacts import write_artifact
from tbps_compress.errors import CheckpointError, ConfigError
from tbps_compress.models import factory
from tbps_compress.models.attention import PrunableAttention
from tbps_compress.models.config import get_model_config, image_size_hw, list_models, validate_model_config
from tbps_compress.models.factory import build_model, config_from_model, count_parameters, is_blockwise, tower_blocks
from tbps_compress.models.io import import_checkpoint, load_model, read_checkpoint, save_model
from tbps_compress.models.meta import meta_of
from tbps_compress.models.tokenizer import get_tokenizer

VIT_B = {"tbps-vit-b-16", "tbps-vit-b-16-224"}
CAPTIONS = ["a man in a red coat and black trousers", "a woman carrying a white bag"]


def _inputs(cfg: dict[str, Any], n_images: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h, w = image_size_hw(cfg)
    return torch.randn(n_images, 3, h, w, generator=g), get_tokenizer(cfg)(CAPTIONS)


def _encode(model: torch.nn.Module, images: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return model.encode_image(images), model.encode_text(text)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach() - b.detach()).abs().max())


# ----------------------------------------------------------------------------------------------- configs
@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in VIT_B else n for n in list_models()]
)
def test_registered_config_builds_and_runs(name: str) -> None:
    """Every registered config builds, encodes both modalities to embed_dim and reads back to its own config.
    (The ViT-B/16 configs are also built, faster, by the checkpoint-import tests below.)"""
    cfg = get_model_config(name)
    torch.manual_seed(0)
    model = build_model(name).eval()
    if is_blockwise(model):
        assert all(isinstance(b.attn, PrunableAttention) for t in ("vision", "text") for b in tower_blocks(model, t))
    images, text = _inputs(cfg, n_images=1)
    with torch.no_grad():
        img, txt = _encode(model, images, text)
    assert img.shape == (1, cfg["embed_dim"]) and txt.shape == (2, cfg["embed_dim"])
    assert torch.isfinite(img).all() and torch.isfinite(txt).all()
    assert config_from_model(model) == cfg


def test_registry_has_test_tiny_and_unknown_name_lists_registered() -> None:
    assert "test-tiny" in list_models() and VIT_B <= set(list_models())
    with pytest.raises(ConfigError) as exc:
        get_model_config("vit-huge-unknown")
    assert "vit-huge-unknown" in str(exc.value) and "test-tiny" in str(exc.value)


@pytest.mark.parametrize(
    ("patch", "needle"),
    [
        ({"vision_cfg": {"image_size": [60, 32]}}, "divisible by patch_size"),
        ({"text_cfg": {"heads": 3}}, "not divisible by heads"),
        ({"vision_cfg": {"colour": 1}}, "colour"),
        ({"vision_blocks": [{"heads": 2, "head_dim": 32, "mlp_dim": 64}]}, "one entry per layer"),
    ],
)
def test_invalid_model_config_is_named(patch: dict[str, Any], needle: str) -> None:
    cfg = get_model_config("test-tiny")
    for key, value in patch.items():
        if isinstance(value, dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    with pytest.raises(ConfigError, match=needle):
        validate_model_config(cfg, source="my.json")


# ----------------------------------------------------------------------------------------------- attention
@pytest.mark.parametrize("train_mode", [False, True])
def test_prunable_attention_matches_open_clip_mha(train_mode: bool) -> None:
    """The factory's swap to PrunableAttention keeps open_clip's outputs (both the MHA fast path in eval/no-grad
    and the slow path with autograd) and its gradients."""
    cfg = get_model_config("test-tiny")
    torch.manual_seed(0)
    ref = factory._open_clip_model(cfg)
    assert isinstance(tower_blocks(ref, "text")[0].attn, torch.nn.MultiheadAttention)
    ours = copy.deepcopy(ref)
    factory._apply_blocks(ours, cfg, "vision")
    factory._apply_blocks(ours, cfg, "text")
    assert all(isinstance(b.attn, PrunableAttention) for t in ("vision", "text") for b in tower_blocks(ours, t))
    ref.train(train_mode)
    ours.train(train_mode)
    images, text = _inputs(cfg)
    with torch.set_grad_enabled(train_mode):
        ri, rt = _encode(ref, images, text)
        oi, ot = _encode(ours, images, text)
    assert _max_diff(ri, oi) < 1e-6 and _max_diff(rt, ot) < 1e-6
    if train_mode:
        (ri.square().sum() + rt.square().sum()).backward()
        (oi.square().sum() + ot.square().sum()).backward()
        for blk_ref, blk_ours in zip(tower_blocks(ref, "text"), tower_blocks(ours, "text"), strict=True):
            assert _max_diff(blk_ref.attn.in_proj_weight.grad, blk_ours.attn.qkv.weight.grad) < 1e-5
            assert _max_diff(blk_ref.attn.out_proj.weight.grad, blk_ours.attn.proj.weight.grad) < 1e-5


def test_text_tower_is_causal() -> None:
    """Changing a token after the end-of-text token must not change the text embedding (causal mask kept)."""
    model = build_model("test-tiny").eval()
    cfg = meta_of(model).config
    tokens = get_tokenizer(cfg)(["a person in a blue shirt"])
    eot = int(tokens.argmax(dim=-1))
    other = tokens.clone()
    other[0, eot + 1] = 1234
    with torch.no_grad():
        assert torch.equal(model.encode_text(tokens), model.encode_text(other))


# ----------------------------------------------------------------------------------------------- per-block sizes
def _non_uniform_config() -> dict[str, Any]:
    cfg = get_model_config("test-tiny")
    cfg["vision_blocks"] = [{"heads": 1, "head_dim": 16, "mlp_dim": 40}, {"heads": 3, "head_dim": 8, "mlp_dim": 100}]
    cfg["text_blocks"] = [{"heads": 2, "head_dim": 24, "mlp_dim": 96}, {"heads": 1, "head_dim": 32, "mlp_dim": 8}]
    return validate_model_config(cfg)


def test_config_from_model_round_trips() -> None:
    uniform = get_model_config("test-tiny")
    assert config_from_model(build_model(uniform)) == uniform
    pruned = _non_uniform_config()
    assert config_from_model(build_model(pruned)) == pruned


def test_per_block_model_trains_and_saves_exactly(tmp_path: Path) -> None:
    cfg = _non_uniform_config()
    torch.manual_seed(0)
    model = build_model(cfg)
    for tower in ("vision", "text"):
        for blk, size in zip(tower_blocks(model, tower), cfg[f"{tower}_blocks"], strict=True):
            assert blk.attn.num_heads == size["heads"]
            assert blk.attn.qkv.out_features == 3 * size["heads"] * size["head_dim"]
            assert blk.mlp.c_fc.out_features == size["mlp_dim"]
    images, text = _inputs(cfg)
    img, txt = _encode(model, images, text)
    (img @ txt.t()).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == ["logit_scale"]  # only the temperature is unused by this toy loss
    model.eval()
    with torch.no_grad():
        before = _encode(model, images, text)
    out = tmp_path / "art"
    with write_artifact(out, stage="test") as tmp:
        written = save_model(model, tmp)
    assert written == cfg
    loaded = load_model(out).eval()
    assert config_from_model(loaded) == cfg
    with torch.no_grad():
        after = _encode(loaded, images, text)
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])


# ----------------------------------------------------------------------------------------------- import (ViT-B/16)
def _linear_field(n_pos: int, width: int, seed: int, grid: tuple[int, int] | None = None) -> torch.Tensor:
    """Position embeddings linear in the normalised pixel-centre coordinate(s): bilinear / linear resizing with
    align_corners=False maps them onto the same linear function at the new positions (away from clamped edges)."""
    g = torch.Generator().manual_seed(seed)
    if grid is None:
        a = torch.randn(width, generator=g)
        u = (torch.arange(n_pos) + 0.5) / n_pos
        return u[:, None] * a[None, :]
    gh, gw = grid
    a, b, c = (torch.randn(width, generator=g) for _ in range(3))
    u = ((torch.arange(gh) + 0.5) / gh)[:, None, None]
    v = ((torch.arange(gw) + 0.5) / gw)[None, :, None]
    field = (u * a + v * b).reshape(gh * gw, width)
    return torch.cat([c[None, :], field])


@pytest.fixture(scope="module")
def vitb(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A randomly initialised open_clip ViT-B/16 (weights rounded to fp16 precision, as OpenAI ships them) saved
    as a state-dict .bin, a safetensors file and a TorchScript archive, plus its reference embeddings."""
    open_clip = pytest.importorskip("open_clip")
    from safetensors.torch import save_file

    torch.manual_seed(0)
    ref = open_clip.create_model("ViT-B-16", pretrained=None, force_quick_gelu=True).eval()
    with torch.no_grad():
        ref.visual.positional_embedding.copy_(_linear_field(197, 768, seed=1, grid=(14, 14)))
        ref.positional_embedding.copy_(_linear_field(77, 512, seed=2))
        for p in ref.parameters():
            p.copy_(p.half().float())
    state = ref.state_dict()
    n_params = sum(p.numel() for p in ref.parameters())
    d = tmp_path_factory.mktemp("vitb")
    files = {"bin": d / "open_clip_model.bin", "safetensors": d / "open_clip_model.safetensors",
             "torchscript": d / "ViT-B-16.pt"}
    torch.save(state, files["bin"])
    save_file({k: v.half().contiguous() for k, v in state.items()}, str(files["safetensors"]))
    cfg = get_model_config("tbps-vit-b-16-224")
    images, text = _inputs(cfg, n_images=1)
    with torch.no_grad():
        ref_img, ref_txt = _encode(ref, images, text)
        # OpenAI's ViT-B-16.pt is a TorchScript archive of the whole model in fp16; tracing only encode_text keeps
        # this fast while the archive still holds every tensor (the importer reads the tensors, never the code).
        # The traced module shares ref's parameters, so .half() below makes ref unusable afterwards.
        traced = torch.jit.trace_module(ref, {"encode_text": text}, check_trace=False)
        traced.half()
        traced.save(str(files["torchscript"]))
    del traced, ref
    return {"files": files, "state": state, "images": images, "text": text, "img": ref_img, "txt": ref_txt,
            "n_params": n_params}


def test_import_torchscript_archive_matches_open_clip(vitb: dict[str, Any]) -> None:
    with zipfile.ZipFile(vitb["files"]["torchscript"]) as zf:
        assert any("/code/" in n for n in zf.namelist()), "fixture should be a real TorchScript archive"
    model = import_checkpoint(vitb["files"]["torchscript"], get_model_config("tbps-vit-b-16-224")).eval()
    assert count_parameters(model)["total"] == vitb["n_params"]
    with torch.no_grad():
        img, txt = _encode(model, vitb["images"], vitb["text"])
    assert _max_diff(img, vitb["img"]) < 1e-5
    assert _max_diff(txt, vitb["txt"]) < 1e-5


@pytest.mark.parametrize("kind", ["bin", "safetensors", "torchscript"])
def test_read_checkpoint_returns_the_tensors(vitb: dict[str, Any], kind: str) -> None:
    """Each file kind yields exactly the model's tensors (plus, for TorchScript, the rebuilt attn_mask buffer);
    the conversion after reading is shared, so the full embedding check above covers all kinds."""
    tensors = read_checkpoint(vitb["files"][kind])
    state = vitb["state"]
    assert set(state) <= set(tensors) and set(tensors) - set(state) <= {"attn_mask"}
    for k, v in state.items():
        assert torch.equal(tensors[k].float(), v), k


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["bin", "safetensors"])
def test_import_state_dict_files_match_open_clip(vitb: dict[str, Any], kind: str) -> None:
    model = import_checkpoint(vitb["files"][kind], get_model_config("tbps-vit-b-16-224")).eval()
    with torch.no_grad():
        img, txt = _encode(model, vitb["images"], vitb["text"])
    assert _max_diff(img, vitb["img"]) < 1e-5 and _max_diff(txt, vitb["txt"]) < 1e-5


def test_import_resizes_position_embeddings(vitb: dict[str, Any]) -> None:
    """224x224 -> 384x128 (14x14 -> 24x8 patch grid, bilinear) and context 77 -> 64 (linear)."""
    cfg = get_model_config("tbps-vit-b-16")
    assert image_size_hw(cfg) == (384, 128)
    cfg["text_cfg"]["context_length"] = 64
    model = import_checkpoint(vitb["files"]["safetensors"], cfg).eval()
    vis = model.visual.positional_embedding.detach()
    assert tuple(vis.shape) == (193, 768)
    expected = _linear_field(193, 768, seed=1, grid=(24, 8))
    assert torch.equal(vis[0], vitb["state"]["visual.positional_embedding"][0])  # class token kept
    grid, want = vis[1:].reshape(24, 8, 768), expected[1:].reshape(24, 8, 768)
    # rows 0 and 23 sample outside the old grid's centres (clamped); everything inside is exact bilinear up to the
    # fp16 rounding of the stored values (|x| < 3, so < 2e-3); a transposed or mis-ordered grid errs by O(1)
    assert _max_diff(grid[1:23], want[1:23]) < 4e-3
    txt = model.positional_embedding.detach()
    assert tuple(txt.shape) == (64, 512)
    assert _max_diff(txt, _linear_field(64, 512, seed=2)) < 4e-3
    tokens = get_tokenizer(cfg)(CAPTIONS)
    assert tokens.shape == (2, 64)
    with torch.no_grad():
        img, emb = _encode(model, torch.randn(1, 3, 384, 128), tokens)
    assert img.shape == (1, 512) and emb.shape == (2, 512)
    assert torch.isfinite(img).all() and torch.isfinite(emb).all()


def test_import_into_wrong_architecture_lists_keys_and_shapes(vitb: dict[str, Any]) -> None:
    with pytest.raises(CheckpointError) as exc:
        import_checkpoint(vitb["files"]["bin"], get_model_config("test-tiny"))
    msg = str(exc.value)
    assert str(vitb["files"]["bin"]) in msg
    assert "unexpected key" in msg and "resblocks.2." in msg  # ViT-B has 12 layers, test-tiny 2
    assert "shape mismatch" in msg and "768" in msg


# ----------------------------------------------------------------------------------------------- import (tiny, errors)
def test_import_missing_and_unexpected_keys_are_listed(tmp_path: Path) -> None:
    state = build_model("test-tiny").state_dict()
    state.pop("ln_final.weight")
    state["extra.head.weight"] = torch.zeros(3)
    path = tmp_path / "bad.bin"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as exc:
        import_checkpoint(path, get_model_config("test-tiny"))
    assert "ln_final.weight" in str(exc.value) and "extra.head.weight" in str(exc.value)


def test_import_tiny_state_dict_with_wrappers(tmp_path: Path) -> None:
    """A DDP-style checkpoint ({'state_dict': {'module.<key>': ...}}) loads into the same architecture."""
    torch.manual_seed(3)
    src = build_model("test-tiny").eval()
    path = tmp_path / "ddp.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}, "epoch": 3}, path)
    model = import_checkpoint(path, get_model_config("test-tiny")).eval()
    images, text = _inputs(meta_of(model).config)
    with torch.no_grad():
        a, b = _encode(src, images, text), _encode(model, images, text)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
def test_truncated_checkpoint_is_a_checkpoint_error(tmp_path: Path, suffix: str) -> None:
    state = build_model("test-tiny").state_dict()
    full = tmp_path / f"full{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(full))
    else:
        torch.save(state, full)
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(CheckpointError) as exc:
        import_checkpoint(cut, get_model_config("test-tiny"))
    assert str(cut) in str(exc.value)


def test_missing_checkpoint_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        read_checkpoint(tmp_path / "nope.pt")


class _Payload:
    """Unpickling this object opens (creates) the marker file: a stand-in for arbitrary code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


def test_pickle_payload_is_refused_without_running(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"visual.proj": torch.zeros(2, 2), "payload": _Payload(marker)}, path)
    with pytest.raises(CheckpointError, match="refused"):
        read_checkpoint(path)
    with pytest.raises(CheckpointError):
        import_checkpoint(path, get_model_config("test-tiny"))
    assert not marker.exists()
    # the payload is live: an unrestricted load would have run it
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_pickle_payload_disguised_as_torchscript_is_refused(tmp_path: Path) -> None:
    """A zip that looks like a TorchScript archive goes to torch.jit.load, which must not run the payload."""
    marker = tmp_path / "pwned"
    plain = tmp_path / "plain.pt"
    torch.save({"payload": _Payload(marker)}, plain)
    disguised = tmp_path / "ViT-B-16.pt"
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(disguised, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            dst.writestr(item, data)
            if item.filename.endswith("data.pkl"):
                dst.writestr(item.filename.replace("data.pkl", "constants.pkl"), data)
    with pytest.raises(CheckpointError):
        read_checkpoint(disguised)
    assert not marker.exists()


def test_model_metadata_is_one_object(tmp_path: Path) -> None:
    """build_model / vocabulary pruning / save + load keep config, vocabulary map and unknown id in one
    ModelMeta on the module (``tbps_meta``), and nothing else."""
    from torch import nn

    from tbps_compress.models.factory import build_model
    from tbps_compress.models.io import load_model, save_model
    from tbps_compress.models.meta import ModelMeta, meta_of, set_meta
    from tbps_compress.models.tokenizer import get_tokenizer
    from tbps_compress.models.vocab import prune_vocabulary

    model = build_model("test-tiny")
    assert isinstance(model.tbps_meta, ModelMeta) and meta_of(model).config["embed_dim"] > 0
    assert meta_of(model).vocab_map is None and meta_of(model).unk_id is None
    assert not [k for k in vars(model) if k.startswith("tbps_") and k != "tbps_meta"]
    prune_vocabulary(model, ["a man in a red coat", "a woman"], get_tokenizer(meta_of(model).config))
    vm, unk = meta_of(model).vocab_map, meta_of(model).unk_id
    assert vm and unk is not None and meta_of(model).config["text_cfg"]["vocab_size"] == len(vm) + 1
    with write_artifact(tmp_path / "a", stage="test") as tmp:
        save_model(model, tmp)
    back = meta_of(load_model(tmp_path / "a"))
    assert back.vocab_map == vm and back.unk_id == unk and back.config == meta_of(model).config
    assert meta_of(nn.Linear(2, 2)) == ModelMeta()  # a module built elsewhere carries none
    with pytest.raises(TypeError, match="unknown model metadata field"):
        set_meta(model, tokenizer="x")
