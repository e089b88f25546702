"""The stripe-gru model family: config validation, MAC count, training, vocabulary pruning, save/load, ONNX export,
and the block-level operations that refuse it (its structured pruning: ``test_prune_stripe.py``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from tbps_compress.artifacts import open_artifact, write_artifact
from tbps_compress.errors import ConfigError
from tbps_compress.models.config import get_model_config, model_family, validate_model_config
from tbps_compress.models.factory import build_model, count_macs, count_parameters, is_blockwise, tower_blocks
from tbps_compress.models.io import load_model, save_model
from tbps_compress.models.meta import meta_of
from tbps_compress.models.stripe_gru import StripeGRU
from tbps_compress.models.tokenizer import get_tokenizer, model_tokenizer
from tbps_compress.models.vocab import prune_vocabulary

TINY = "test-tiny-stripe-gru"
CAPTIONS = ["a woman in a red coat and black trousers", "a man with a blue backpack on his left shoulder"]


def _tiny() -> dict[str, Any]:
    return get_model_config(TINY)


def test_registered_configs_build_with_the_family_interface() -> None:
    for name in (TINY, "synth-stripe-gru"):
        cfg = get_model_config(name)
        model = build_model(name).eval()
        assert isinstance(model, StripeGRU) and model_family(cfg) == "stripe-gru" and not is_blockwise(model)
        h, w = cfg["vision_cfg"]["image_size"]
        with torch.no_grad():
            img = model.encode_image(torch.randn(3, 3, h, w), normalize=True)
            txt = model.encode_text(get_tokenizer(cfg)(CAPTIONS), normalize=True)
        assert img.shape == (3, cfg["embed_dim"]) and txt.shape == (2, cfg["embed_dim"])
        assert torch.allclose(img.norm(dim=-1), torch.ones(3)) and torch.allclose(txt.norm(dim=-1), torch.ones(2))
        params = count_parameters(model)
        assert params["vision"] + params["text"] + 1 == params["total"]  # + logit_scale
        assert params["non_embedding"] == params["total"] - model.token_embedding.weight.numel()


def test_padding_does_not_reach_the_text_embedding_through_the_pool() -> None:
    """Max pooling covers the caption's own tokens only: the pooled states at padded positions are masked."""
    torch.manual_seed(0)
    model = build_model(TINY).eval()
    tokens = get_tokenizer(_tiny())(CAPTIONS[:1])
    n = int((tokens != 0).sum())
    states, _ = model.gru(model.token_embedding(tokens))
    want = states[0, :n].amax(dim=0) @ model.text_projection
    with torch.no_grad():
        assert torch.allclose(model.encode_text(tokens)[0], want, atol=1e-6)


@pytest.mark.parametrize(
    ("patch", "needle"),
    [
        ({"vision_cfg": {"blocks": [1]}}, "vision_cfg.blocks"),
        ({"vision_cfg": {"stripes": 9}}, "vision_cfg.stripes"),
        ({"vision_cfg": {"image_size": [60, 32]}}, "trunk's stride 8"),
        ({"vision_cfg": {"channels": [8]}}, "vision_cfg.channels"),
        ({"text_cfg": {"hidden": 0}}, "text_cfg.hidden"),
        ({"text_cfg": {"heads": 2}}, "heads"),
        ({"vision_blocks": []}, "vision_blocks"),
        ({"family": "lstm"}, "'family'"),
    ],
)
def test_bad_config_names_the_key(patch: dict[str, Any], needle: str) -> None:
    cfg = _tiny()
    for key, value in patch.items():
        if isinstance(value, dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    with pytest.raises(ConfigError) as exc:
        validate_model_config(cfg, source="cfg.json")
    assert needle in str(exc.value) and str(exc.value).startswith("cfg.json")


def test_count_macs_matches_the_modules_it_counts() -> None:
    """The config-derived count equals one counted from the convolutions' outputs and the GRU's shapes."""
    cfg = get_model_config("synth-stripe-gru")
    model = build_model(cfg).eval()
    counted = {"vision": 0}

    def conv_hook(mod: nn.Conv2d, _inp: Any, out: torch.Tensor) -> None:
        k = mod.kernel_size[0] * mod.kernel_size[1]
        counted["vision"] += out[0].numel() * mod.in_channels * k

    hooks = [m.register_forward_hook(conv_hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    h, w = cfg["vision_cfg"]["image_size"]
    with torch.no_grad():
        model.encode_image(torch.randn(1, 3, h, w))
    for hk in hooks:
        hk.remove()
    counted["vision"] += model.visual.proj.numel()
    gru = model.gru
    steps = cfg["text_cfg"]["context_length"]
    text = sum(2 * steps * (getattr(gru, f"weight_ih_l{i}").numel() + getattr(gru, f"weight_hh_l{i}").numel())
               for i in range(gru.num_layers))
    assert count_macs(cfg) == {"vision": counted["vision"], "text": text + model.text_projection.numel()}


def test_vocab_prune_save_load_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model(TINY).eval()
    tok = get_tokenizer(_tiny())
    with torch.no_grad():
        before = model.encode_text(tok(CAPTIONS), normalize=True)
    prune_vocabulary(model, CAPTIONS, tok)
    assert model.token_embedding.num_embeddings < 40
    assert meta_of(model).config["text_cfg"]["vocab_size"] == model.token_embedding.num_embeddings
    with write_artifact(tmp_path / "m", stage="train") as tmp:
        save_model(model, tmp)
    back = load_model(tmp_path / "m").eval()
    images = torch.randn(2, 3, 64, 32)
    with torch.no_grad():
        after = back.encode_text(model_tokenizer(back)(CAPTIONS), normalize=True)
        assert torch.allclose(after, before, atol=1e-6)
        assert torch.allclose(back.encode_image(images), model.encode_image(images), atol=1e-6)


AUG = {"image": {"pool": ["hflip"], "num_ops": 1, "hflip_swaps_left_right": True}}
TRICKS = {"text_attn_dropout": 0.0, "freeze_patch_embed": False}


def test_trained_teacher_exports_and_the_onnx_graph_matches(sg_teacher: Path, tmp_path: Path, tiny_dataset: Path,
                                                            run_cli: Any) -> None:
    """`export` with its parity check; the runtime reproduces the torch embeddings (the GRU is an ONNX GRU node)."""
    import onnx

    from tbps_compress.runtime.encoder import OnnxEncoder

    model = load_model(sg_teacher).eval()
    assert isinstance(model, StripeGRU) and open_artifact(sg_teacher).metrics["test"]["R1"] >= 0
    code, out, err = run_cli(["export", str(sg_teacher), "--out", str(tmp_path / "onnx"), "--data", str(tiny_dataset)])
    assert code == 0, err
    graph = onnx.load(str(tmp_path / "onnx" / "text_encoder.onnx"))
    assert "GRU" in {n.op_type for n in graph.graph.node}
    enc = OnnxEncoder(tmp_path / "onnx")
    images = np.random.default_rng(0).standard_normal((2, 3, 64, 32)).astype(np.float32)
    with torch.no_grad():
        want_t = model.encode_text(model_tokenizer(model)(CAPTIONS), normalize=True).numpy()
        want_i = model.encode_image(torch.from_numpy(images), normalize=True).numpy()
    sess = enc.image_session
    got_i = sess.run(None, {sess.get_inputs()[0].name: images})[0]
    np.testing.assert_allclose(enc.encode_texts(CAPTIONS), want_t, atol=1e-4)
    np.testing.assert_allclose(got_i, want_i, atol=1e-4)


def _distill_recipe(tmp_path: Path, dataset: Path, teacher: Path, init: str, config: str = TINY) -> Path:
    recipe = {
        "output": str(tmp_path / f"student-{init}"), "seed": 0, "device": "cpu", "data": {"root": str(dataset)},
        "teacher": {"artifact": str(teacher)},
        "student": {"config": config, "init": init, "vocab_prune": True}, "augment": AUG, "tricks": TRICKS,
        "losses": {"n_itc": {"weight": 0.5}, "kd_feature": {"weight": 1.0}, "kd_affinity": {"weight": 1.0}},
        "optim": {"epochs": 1, "batch_size": 8, "max_steps": 3, "lr": 1e-3, "min_lr": 1e-5},
        "eval": {"batch_size": 16},
    }
    path = tmp_path / f"d-{init}.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


def test_distils_from_random_init_and_by_inheritance_and_refuses_the_probe(sg_teacher: Path, tmp_path: Path,
                                                                           tiny_dataset: Path, run_cli: Any) -> None:
    code, out, err = run_cli(["distill", str(_distill_recipe(tmp_path, tiny_dataset, sg_teacher, "random"))])
    assert code == 0, err
    art = open_artifact(tmp_path / "student-random")
    assert art.metrics["steps"] == 3 and isinstance(load_model(art.path), StripeGRU)
    # inheritance: the teacher pruned to a narrower student's widths, then distilled
    narrow = _tiny()
    narrow["vision_cfg"]["channels"] = [4, 8, 16]
    narrow["text_cfg"].update({"width": 16, "hidden": 12})
    (tmp_path / "narrow.json").write_text(json.dumps(narrow), encoding="utf-8")
    recipe = _distill_recipe(tmp_path, tiny_dataset, sg_teacher, "inherit", str(tmp_path / "narrow.json"))
    code, out, err = run_cli(["distill", str(recipe)])
    assert code == 0, err
    art = open_artifact(tmp_path / "student-inherit")
    inherited = art.metrics["distill"]["inheritance"]["widths"]
    assert inherited == {"vision": {"channels": [4, 8, 16], "inner": [[8], [16]]},
                         "text": {"width": 16, "hidden": 12, "layers": 1}}
    assert art.model_config["vision_cfg"]["channels"] == [4, 8, 16] and art.model_config["text_cfg"]["hidden"] == 12
    # a student wider than its teacher: one line naming the key, nothing written
    narrow["text_cfg"]["hidden"] = 64
    (tmp_path / "wide.json").write_text(json.dumps(narrow), encoding="utf-8")
    recipe = _distill_recipe(tmp_path, tiny_dataset, sg_teacher, "inherit", str(tmp_path / "wide.json"))
    shutil.rmtree(tmp_path / "student-inherit")
    code, out, err = run_cli(["distill", str(recipe)])
    assert code == 2 and "student text_cfg.hidden: 64 is wider than the teacher's 32" in err
    assert "Traceback" not in err and not (tmp_path / "student-inherit").exists()
    code, out, err = run_cli(["probe", str(sg_teacher), "--data", str(tiny_dataset)])
    assert code == 2 and "module-importance probe" in err and "'stripe-gru'" in err and "Traceback" not in err


def test_block_operations_refuse_the_family_in_one_line(tmp_path: Path) -> None:
    from tbps_compress.compress.distill import inherit_weights
    from tbps_compress.compress.prune import PruneCfg, check_prune_cfg

    model = build_model(TINY)
    with pytest.raises(ConfigError, match="model family 'stripe-gru'"):
        tower_blocks(model, "vision")
    with pytest.raises(ConfigError, match="prune.vision.drop_layers: the stripe-gru family has no transformer"):
        check_prune_cfg(PruneCfg(vision={"drop_layers": 1}), model)
    with pytest.raises(ConfigError, match="student.config is of model family 'stripe-gru' and the teacher "
                                          r"\(runs/t\) of 'clip'.*init: random"):
        inherit_weights(build_model("test-tiny"), _tiny(), teacher_name="runs/t")
