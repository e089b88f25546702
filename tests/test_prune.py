"""Structured pruning: heads, widths, depth, per-block configs round-trip, ONNX export, recipe errors before work,
and a tiny end-to-end ``run_prune`` with recovery by distillation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from tbps_compress.artifacts import write_artifact
from tbps_compress.compress import prune
from tbps_compress.config import validate
from tbps_compress.errors import ConfigError
from tbps_compress.models.factory import build_model, config_from_model, count_parameters, tower_blocks
from tbps_compress.models.io import load_model, save_model

REPO = Path(__file__).resolve().parents[1]


def _batch(n: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    text = torch.randint(1, 5000, (n, 32), generator=g)
    text[:, 12] = 49407  # end of text: the pooled position
    text[:, 13:] = 0
    return {"image": torch.randn(n, 3, 64, 32, generator=g), "text": text}


def _tiny(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("test-tiny").eval()


def _forward_backward(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    model.train()
    img, txt = model.encode_image(batch["image"]), model.encode_text(batch["text"])
    assert torch.isfinite(img).all() and torch.isfinite(txt).all()
    (img.square().sum() + txt.square().sum()).backward()
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad and n != "logit_scale"]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    model.eval()
    return img, txt


def test_head_pruning_removes_heads() -> None:
    model = _tiny()
    cfg = prune.PruneCfg(vision={"head_ratio": 0.5}, text={"head_ratio": 0.5})
    prune.prune_model(model, cfg, _batch())
    for tower in ("vision", "text"):
        for blk in tower_blocks(model, tower):
            assert blk.attn.num_heads == 1
            assert blk.attn.qkv.out_features == 3 * 32  # one head of 32 channels left (of 2)
            assert blk.attn.proj.in_features == 32
            assert blk.mlp.c_fc.out_features in (128, 256)  # MLP untouched
    img, txt = _forward_backward(model, _batch())
    assert img.shape == (4, 32) and txt.shape == (4, 32)  # the joint embedding is never pruned
    cfg_after = config_from_model(model)
    assert [b["heads"] for b in cfg_after["vision_blocks"]] == [1, 1]


def test_width_pruning_shapes_consistent() -> None:
    model = _tiny()
    model.visual.conv1.weight.requires_grad_(False)  # a frozen patch embedding (tricks.freeze_patch_embed) too
    prune.prune_model(model, prune.PruneCfg(vision={"width_ratio": 0.5}, text={"width_ratio": 0.25}), _batch())
    v = model.visual
    assert v.conv1.out_channels == 32
    assert v.class_embedding.shape == (32,)
    assert v.positional_embedding.shape == (9, 32)
    assert v.ln_pre.weight.shape == (32,) and v.ln_post.weight.shape == (32,)
    assert v.proj.shape == (32, 32)
    for blk in tower_blocks(model, "vision"):
        assert blk.attn.qkv.in_features == 32 and blk.attn.proj.out_features == 32
        assert blk.mlp.c_fc.in_features == 32 and blk.mlp.c_proj.out_features == 32
        assert blk.attn.num_heads == 2  # heads are kept: the attention width is independent of the residual width
    assert model.token_embedding.embedding_dim == 48
    assert model.positional_embedding.shape == (32, 48)
    assert model.text_projection.shape == (48, 32)
    assert model.ln_final.weight.shape == (48,)
    assert not model.visual.conv1.weight.requires_grad  # frozen flags survive pruning
    model.visual.conv1.weight.requires_grad_(True)
    _forward_backward(model, _batch())


def test_mlp_global_and_round_to() -> None:
    model = _tiny()
    cfg = prune.PruneCfg(criterion="taylor", global_pruning=True, round_to=8,
                         vision={"mlp_ratio": 0.5, "width_ratio": 0.3}, text={"mlp_ratio": 0.5})
    prune.prune_model(model, cfg, _batch())
    assert model.visual.conv1.out_channels == 40  # floor(64 * 0.7) = 44, rounded down to 40
    for tower in ("vision", "text"):
        dims = [b.mlp.c_fc.out_features for b in tower_blocks(model, tower)]
        assert all(d % 8 == 0 for d in dims)
    _forward_backward(model, _batch())


def test_kept_sizes_of_rounded_fractions() -> None:
    # a sixth of 192 typed with 7 decimals keeps 160 (not 159 -> 144 after round_to 16); floors stay floors
    assert prune._keep(192, 0.1666667, 16) == 160
    assert prune._keep(192, 1 / 6, None) == 160
    assert prune._keep(64, 0.3, None) == 44 and prune._keep(64, 0.3, 8) == 40
    assert prune._keep(768, 0.5, 16) == 384 and prune._keep(100, 0.0, 16) == 100


@pytest.mark.parametrize("criterion", ["l1", "lamp", "random"])
def test_criteria_run(criterion: str) -> None:
    model = _tiny()
    cfg = prune.PruneCfg(criterion=criterion, vision={"width_ratio": 0.25, "mlp_ratio": 0.5},
                         text={"head_ratio": 0.5, "mlp_ratio": 0.25})
    prune.prune_model(model, cfg, _batch())
    _forward_backward(model, _batch())


def test_drop_layers_and_ranking() -> None:
    model = _tiny()
    prune.drop_layers(model, "text", [0])
    assert len(tower_blocks(model, "text")) == 1
    assert config_from_model(model)["text_cfg"]["layers"] == 1
    t = prune.TowerPruneCfg(drop_layers=1)
    assert prune.layers_to_drop(t, [0.9, 0.1, 0.5], "vision") == [1]
    with pytest.raises(ConfigError, match="prune.vision.drop_layers"):
        prune.layers_to_drop(t, None, "vision")
    _forward_backward(model, _batch())


def test_save_load_roundtrip_exact(tmp_path: Path) -> None:
    model = _tiny()
    cfg = prune.PruneCfg(global_pruning=True, vision={"width_ratio": 0.25, "mlp_ratio": 0.5, "head_ratio": 0.5,
                                                      "drop_layers": [1]},
                         text={"width_ratio": 0.5, "mlp_ratio": 0.25, "head_ratio": 0.5})
    prune.prune_model(model, cfg, _batch())
    out = tmp_path / "pruned"
    with write_artifact(out, stage="prune") as tmp:
        save_model(model, tmp)
    saved = json.loads((out / "model_config.json").read_text())
    assert saved["vision_cfg"]["layers"] == 1 and "vision_blocks" in saved
    again = load_model(out).eval()
    batch = _batch()
    with torch.no_grad():
        assert torch.equal(model.encode_image(batch["image"]), again.encode_image(batch["image"]))
        assert torch.equal(model.encode_text(batch["text"]), again.encode_text(batch["text"]))
    assert count_parameters(again) == count_parameters(model)


def test_pruned_model_exports_with_parity(tmp_path: Path) -> None:
    from tbps_compress.export import onnx_export

    model = _tiny()
    prune.prune_model(model, prune.PruneCfg(vision={"width_ratio": 0.25, "head_ratio": 0.5},
                                            text={"mlp_ratio": 0.5, "head_ratio": 0.5, "drop_layers": [0]}), _batch())
    src = tmp_path / "pruned"
    with write_artifact(src, stage="prune") as tmp:
        save_model(model, tmp)
    report = onnx_export.export_onnx(src, tmp_path / "onnx")
    assert report["max_diff"] < 1e-4


# ------------------------------------------------------------------------------------------ recipe errors
def _recipe_data(**prune_cfg) -> dict:
    return {"output": "runs/x", "teacher": {"artifact": "runs/t"}, "prune": prune_cfg}


@pytest.mark.parametrize("prune_cfg, key", [
    ({"vision": {"width_ratio": 1.0}}, "prune.vision.width_ratio"),
    ({"text": {"mlp_ratio": -0.1}}, "prune.text.mlp_ratio"),
    ({"criterion": "l3"}, "prune.criterion"),
    ({"vision": {"drop_layers": [1, 1]}}, "prune.vision.drop_layers"),
    ({"iterative_steps": 0}, "prune.iterative_steps"),
])
def test_bad_recipe_values(prune_cfg: dict, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        validate(prune.PruneRecipe, _recipe_data(**prune_cfg), "recipe.yaml")
    msg = str(err.value)
    assert key in msg and "\n" not in msg
    if key == "prune.criterion":
        assert "magnitude" in msg and "taylor" in msg and "random" in msg


def test_heads_that_do_not_divide() -> None:
    model = _tiny()
    with pytest.raises(ConfigError, match=r"prune\.text\.head_ratio.*whole") as err:
        prune.check_prune_cfg(prune.PruneCfg(text={"head_ratio": 0.3}), model)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=r"prune\.vision\.drop_layers"):
        prune.check_prune_cfg(prune.PruneCfg(vision={"drop_layers": 2}), model)
    with pytest.raises(ConfigError, match=r"prune\.vision\.width_ratio"):
        prune.check_prune_cfg(prune.PruneCfg(round_to=64, vision={"width_ratio": 0.5}), model)


def test_committed_recipes_load() -> None:
    files = sorted((REPO / "recipes" / "prune").glob("*.yaml"))
    assert files
    for f in files:
        r = prune.load_prune_recipe(f)
        again = validate(prune.PruneRecipe, yaml.safe_load(yaml.safe_dump(r.model_dump(mode="json"))), str(f))
        assert again == r


# ------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def tiny_setup(tiny_dataset: Path, tiny_teacher_artifact: Path,
               tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The shared tiny dataset and briefly trained test-tiny teacher (conftest), and a scratch folder."""
    return {"data": tiny_dataset, "teacher": tiny_teacher_artifact, "root": tmp_path_factory.mktemp("prune")}


def _e2e_recipe(setup: dict[str, Path], out: Path, **prune_cfg) -> prune.PruneRecipe:
    data = {
        "output": str(out), "device": "cpu", "seed": 0,
        "teacher": {"artifact": str(setup["teacher"])},
        "data": {"root": str(setup["data"]), "cache_images": False},
        "augment": {"image": {"num_ops": 0}, "text": {"back_translation_p": 0.0, "deletion_p": 0.0}},
        "optim": {"batch_size": 4, "lr": 1e-4, "min_lr": 1e-5, "warmup_epochs": 0},
        "eval": {"batch_size": 16},
        "prune": {"iterative_steps": 2, "recovery_steps": 1, **prune_cfg},
    }
    return validate(prune.PruneRecipe, data, "test-recipe")


def test_run_prune_end_to_end(tiny_setup: dict[str, Path]) -> None:
    out = tiny_setup["root"] / "pruned"
    recipe = _e2e_recipe(tiny_setup, out, vision={"width_ratio": 0.5, "mlp_ratio": 0.5, "head_ratio": 0.5},
                         text={"width_ratio": 0.25, "head_ratio": 0.5, "drop_layers": 1})
    assert prune.run_prune(recipe) == out
    metrics = json.loads((out / "metrics.json").read_text())
    rep = metrics["prune"]
    assert rep["before"]["parameters"]["non_embedding"] > rep["after"]["parameters"]["non_embedding"]
    for tower in ("vision", "text"):
        assert rep["before"]["macs"][tower] > rep["after"]["macs"][tower]
        assert rep["before"]["parameters"][tower] > rep["after"]["parameters"][tower]
    assert rep["removed"]["parameters.non_embedding"] > 0
    assert len(rep["dropped_layers"]["text"]) == 1 and rep["dropped_layers"]["vision"] == []
    assert len(rep["rounds"]) == 1  # the first round (the second is this artifact)
    assert "R1" in metrics["test"]
    lineage = json.loads((out / "lineage.json").read_text())
    assert lineage["stage"] == "prune"
    assert lineage["parent"]["path"] == str(tiny_setup["teacher"].resolve())
    assert not (out.parent / "pruned.steps").exists()
    model = load_model(out)
    assert model.visual.conv1.out_channels == 32 and len(tower_blocks(model, "text")) == 1
    assert all(b.attn.num_heads == 1 for b in tower_blocks(model, "vision"))
    resolved = yaml.safe_load((out / "recipe.resolved.yaml").read_text())
    assert resolved["stage"] == "prune" and resolved["prune"]["iterative_steps"] == 2


def test_run_prune_rejects_before_work(tiny_setup: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    from tbps_compress.engine import train

    def boom(*_a, **_k):
        raise AssertionError("training started")

    monkeypatch.setattr(train.Trainer, "run", boom)
    out = tiny_setup["root"] / "bad"
    recipe = _e2e_recipe(tiny_setup, out, text={"head_ratio": 0.3})
    with pytest.raises(ConfigError, match="prune.text.head_ratio"):
        prune.run_prune(recipe)
    assert not out.exists() and not (out.parent / "bad.steps").exists()


def test_run_prune_without_recovery(tiny_setup: dict[str, Path]) -> None:
    out = tiny_setup["root"] / "norecovery"
    recipe = _e2e_recipe(tiny_setup, out, iterative_steps=2, recovery_steps=0, vision={"mlp_ratio": 0.5})
    prune.run_prune(recipe)
    m = json.loads((out / "metrics.json").read_text())
    assert m["steps"] == 0 and m["prune"]["removed"]["parameters.vision"] > 0
    cfg = json.loads((out / "model_config.json").read_text())
    assert [b["mlp_dim"] for b in cfg["vision_blocks"]] == [64, 64]


def test_prune_study_script_reports_holdout_and_acceptance(tiny_setup: dict[str, Path], benchmark_script) -> None:
    """benchmarks/prune_study.py on the tiny teacher: one row per setting, holdout columns, acceptance on combined."""
    study = benchmark_script("prune_study")
    out = tiny_setup["root"] / "study"
    recipe = tiny_setup["root"] / "study-recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "device": "cpu", "teacher": {"artifact": "unused"},
        "data": {"root": "unused", "cache_images": False},
        "optim": {"batch_size": 4, "lr": 1e-4, "min_lr": 1e-5, "warmup_epochs": 0},
        "prune": {"criterion": "magnitude", "iterative_steps": 1, "recovery_steps": 0,
                  "vision": {"width_ratio": 0.5}, "text": {"mlp_ratio": 0.5}},
    }))
    args = ["--recipe", str(recipe), "--teacher", str(tiny_setup["teacher"]), "--data", str(tiny_setup["data"]),
            "--out", str(out), "--settings", "width", "heads", "depth", "combined", "--criteria", "magnitude",
            "--heads-ratio", "0.5", "--holdout", str(tiny_setup["data"]), "--holdout-split", "val",
            "--bench-iters", "1", "--bench-batch", "2"]
    assert study.main(args) == 0
    result = json.loads((out / "prune_study.json").read_text())
    # depth has nothing to drop in this recipe, so it is skipped, not reported as a no-op row
    assert [r["setting"] for r in result["rows"]] == ["width", "heads", "combined"]
    heads = result["rows"][1]["after"]
    assert heads["vision_width"] == 64 and heads["text_width"] == 64  # --heads-ratio: heads only, widths kept
    for r in result["rows"]:
        assert r["non_embedding_removed"] > 0 and r["image_speedup_b32"] > 0
        assert 0 <= r["holdout_R1"] <= 100 and "holdout_mAP_kept" in r
    assert result["unpruned"]["holdout"]["R1"] >= 0
    assert [c["run"] for c in result["acceptance"]] == ["combined-magnitude"]
    md = (out / "prune_study.md").read_text()
    assert "holdout R@1 kept" in md and "combined | magnitude" in md
    # a second run reuses the finished artifacts instead of pruning again
    mtime = (out / "runs" / "width-magnitude" / "lineage.json").stat().st_mtime
    assert study.main(args) == 0
    assert (out / "runs" / "width-magnitude" / "lineage.json").stat().st_mtime == mtime
