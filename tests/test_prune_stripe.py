"""Structured pruning of the stripe-gru family's image tower: the channels a criterion picks are the ones removed
(down to the stripe projection's rows), the pruned architecture round-trips through its config, the schedule
runs through `tbps-compress prune`, and what the family cannot prune is refused in one line."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from torch import nn

from tbps_compress.artifacts import open_artifact, write_artifact
from tbps_compress.compress.prune import PruneCfg, check_prune_cfg, prune_model, recalibrate_batchnorm, tower_sizes
from tbps_compress.errors import ConfigError
from tbps_compress.models.config import get_model_config
from tbps_compress.models.factory import build_model, count_macs, count_parameters
from tbps_compress.models.io import load_model, save_model
from tbps_compress.models.meta import meta_of

# two blocks in the last stage: an identity shortcut carries the pruned channels too
CFG: dict[str, Any] = {**copy.deepcopy(get_model_config("test-tiny-stripe-gru")), "name": "t"}
CFG["vision_cfg"]["blocks"] = [1, 2]


def _zero(t: torch.Tensor, idx: list[int], dim: int) -> None:
    t.data.index_fill_(dim, torch.tensor(idx), 0.0)


def _kill_stage_channels(visual: nn.Module, stage: int, idx: list[int]) -> None:
    """Make channels ``idx`` of ``stage`` (-1: the stem) zero everywhere and their weights zero wherever read."""
    stages = list(visual.stages)
    if stage < 0:
        producers = [(visual.conv1, visual.bn1)]
    else:
        producers = [(b.conv2, b.bn2) for b in stages[stage]]
        producers += [(b.shortcut[0], b.shortcut[1]) for b in stages[stage] if isinstance(b.shortcut, nn.Sequential)]
    for conv, bn in producers:
        _zero(conv.weight, idx, 0)
        _zero(bn.weight, idx, 0)
        _zero(bn.bias, idx, 0)
    readers = [b.conv1 for b in stages[stage][1:]] if stage >= 0 else []
    if stage + 1 < len(stages):
        first = stages[stage + 1][0]
        readers += [first.conv1, first.shortcut[0]]
    for conv in readers:
        _zero(conv.weight, idx, 1)


def _kill_inner_channels(block: nn.Module, idx: list[int]) -> None:
    _zero(block.conv1.weight, idx, 0)
    _zero(block.bn1.weight, idx, 0)
    _zero(block.bn1.bias, idx, 0)
    _zero(block.conv2.weight, idx, 1)


def _random_bn_statistics(model: nn.Module) -> None:
    for m in model.modules():  # non-trivial BN statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)


def _kill_a_quarter(visual: nn.Module, stem: list[int], stages: tuple[list[int], list[int]], inner: list[int],
                    inner_last: tuple[list[int], list[int]]) -> None:
    """Dead channels in every group of CFG's image tower: 2 of the stem's 8, 4 and 8 of the stages' 16 and 32, 4 of
    the first block's 16 inner channels and 8 of each last-stage block's 32."""
    _kill_stage_channels(visual, -1, stem)
    for i, idx in enumerate(stages):
        _kill_stage_channels(visual, i, idx)
    _kill_inner_channels(visual.stages[0][0], inner)
    for block, idx in zip(visual.stages[1], inner_last, strict=True):
        _kill_inner_channels(block, idx)


def test_magnitude_removes_exactly_the_dead_channels_and_the_embeddings_stay(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model(CFG).eval()
    _random_bn_statistics(model)
    v = model.visual
    before = tower_sizes(model, "vision")
    assert before == {"channels": [8, 16, 32], "inner": [[16], [32, 32]]}
    # a quarter of every group, spread over the channels (the last stage's pick is not a contiguous run, so a
    # wrong mapping to the projection's rows would change the embedding)
    _kill_a_quarter(v, [1, 6], ([0, 5, 9, 14], [2, 3, 11, 17, 20, 26, 29, 31]), [4, 7, 8, 15],
                    ([1, 9, 10, 12, 18, 22, 25, 30], [0, 4, 8, 13, 19, 21, 27, 28]))
    images = torch.randn(3, 3, 64, 32)
    tokens = torch.randint(1, 200, (3, 32))
    with torch.no_grad():
        want = model.encode_image(images)
    full = count_parameters(model)
    prune_model(model, PruneCfg(criterion="magnitude", vision={"width_ratio": 0.25, "mlp_ratio": 0.25}),
                {"image": images, "text": tokens})
    after = tower_sizes(model, "vision")
    assert after == {"channels": [6, 12, 24], "inner": [[12], [24, 24]]}
    assert tuple(v.proj.shape) == (24 * 5, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images), want, atol=1e-5, rtol=1e-5)
    params = count_parameters(model)
    assert params["text"] == full["text"] and params["vision"] < 0.6 * full["vision"]
    # the pruned architecture is its config: build from it, load the weights, same embeddings
    cfg = meta_of(model).config
    assert cfg["vision_cfg"]["channels"] == [6, 12, 24] and "inner" not in cfg["vision_cfg"]
    with write_artifact(tmp_path / "p", stage="prune") as tmp:
        save_model(model, tmp)
    back = load_model(tmp_path / "p").eval()
    assert count_parameters(back) == params
    with torch.no_grad():
        torch.testing.assert_close(back.encode_image(images), want, atol=1e-5, rtol=1e-5)


def _kill_gru_units(model: nn.Module, layer: int, direction: int, idx: list[int]) -> None:
    """GRU hidden units whose gates have no weights stay 0 from the zero initial state: zero them and their readers."""
    gru, h = model.gru, model.gru.hidden_size
    d = "_reverse" if direction else ""
    rows = [u + g * h for g in range(3) for u in idx]
    for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
        _zero(getattr(gru, f"{name}_l{layer}{d}"), rows, 0)
    _zero(getattr(gru, f"weight_hh_l{layer}{d}"), idx, 1)
    cols = [u + direction * h for u in idx]
    if layer + 1 < gru.num_layers:
        for nd in ("", "_reverse"):
            _zero(getattr(gru, f"weight_ih_l{layer + 1}{nd}"), cols, 1)
    else:
        _zero(model.text_projection, cols, 0)


@pytest.mark.parametrize("criterion", ["magnitude", "l1", "lamp", "bn_scale"])
def test_the_gru_loses_exactly_its_dead_units_and_the_text_embeddings_stay(criterion: str) -> None:
    cfg = copy.deepcopy(CFG)
    cfg["text_cfg"].update({"layers": 2, "width": 16, "hidden": 8})
    torch.manual_seed(1)
    model = build_model(cfg).eval()
    dead = {(0, 0): [1, 6], (0, 1): [0, 3], (1, 0): [2, 7], (1, 1): [4, 5]}  # (layer, direction): units
    for (layer, direction), idx in dead.items():
        _kill_gru_units(model, layer, direction, idx)
    _zero(model.token_embedding.weight, [3, 8, 9, 12], 1)  # embedding columns nobody reads
    for d in ("", "_reverse"):
        _zero(getattr(model.gru, f"weight_ih_l0{d}"), [3, 8, 9, 12], 1)
    tokens = torch.randint(1, 200, (4, 32))
    tokens[:, 20:] = 0
    with torch.no_grad():
        want = model.encode_text(tokens)
    prune_model(model, PruneCfg(criterion=criterion, text={"width_ratio": 0.25, "mlp_ratio": 0.25}),
                {"image": torch.randn(2, 3, 64, 32), "text": tokens})
    assert tower_sizes(model, "text") == {"width": 12, "hidden": 6, "layers": 2}
    assert tuple(model.text_projection.shape) == (12, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(tokens), want, atol=1e-5, rtol=1e-5)
    t = meta_of(model).config["text_cfg"]
    assert (t["width"], t["hidden"]) == (12, 6)
    assert count_parameters(build_model(meta_of(model).config)) == count_parameters(model)


def test_taylor_and_random_prune_the_gru_to_the_asked_size() -> None:
    from tbps_compress.compress.prune import taylor_gradients

    images, tokens = torch.randn(4, 3, 64, 32), torch.randint(1, 200, (4, 32))
    for criterion in ("taylor", "random"):
        torch.manual_seed(0)
        model = build_model(CFG)
        cfg = PruneCfg(criterion=criterion, text={"mlp_ratio": 0.5}, vision={"width_ratio": 0.5})
        prune_model(model, cfg, {"image": images, "text": tokens})
        assert tower_sizes(model, "text")["hidden"] == 16 and tower_sizes(model, "vision")["channels"] == [4, 8, 16]
        with torch.no_grad():
            assert model.encode_text(tokens).shape == (4, 32)
    model = build_model(CFG)
    taylor_gradients(model, {"image": images, "text": tokens})
    assert model.gru.weight_hh_l0.grad is not None


def test_uneven_inner_widths_are_written_and_counted() -> None:
    model = build_model(CFG).eval()
    images, tokens = torch.randn(2, 3, 64, 32), torch.randint(1, 200, (2, 32))
    macs = count_macs(CFG)["vision"]
    prune_model(model, PruneCfg(criterion="l1", vision={"mlp_ratio": 0.5}), {"image": images, "text": tokens})
    v = meta_of(model).config["vision_cfg"]
    assert v["channels"] == [8, 16, 32] and v["inner"] == [[8], [16, 16]]
    new = count_macs(meta_of(model).config)["vision"]
    # the inner convolutions' MACs halve, nothing else changes: count them from the modules
    halved = 0
    for stage, hw in zip(model.visual.stages, (16 * 8, 8 * 4), strict=True):
        for b in stage:
            halved += hw * 9 * (b.conv1.in_channels * b.conv1.out_channels + b.conv2.in_channels * b.conv2.out_channels)
    assert macs - new == halved
    rebuilt = build_model(meta_of(model).config)
    assert count_parameters(rebuilt) == count_parameters(model)


@pytest.mark.parametrize("prune, needle", [
    ({"text": {"head_ratio": 0.25}}, "prune.text.head_ratio: .* a GRU without attention heads"),
    ({"text": {"mlp_ratio": 0.99}}, "prune.text.mlp_ratio: 0.99 of 32 channels leaves none"),
    ({"vision": {"head_ratio": 0.5}}, "prune.vision.head_ratio: .* without attention heads"),
    ({"vision": {"drop_layers": 1}}, "prune.vision.drop_layers: .* no transformer blocks"),
    ({"global_pruning": True, "vision": {"mlp_ratio": 0.2}}, "prune.global_pruning: .* set it to false"),
    ({"vision": {"width_ratio": 0.9}}, "prune.vision.width_ratio: 0.9 of 8 channels leaves none"),
])
def test_what_the_family_cannot_prune_is_refused_naming_the_key(prune: dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        check_prune_cfg(PruneCfg.model_validate(prune), build_model(CFG))


def test_prune_command_prunes_and_recovers_in_rounds(sg_teacher: Path, tiny_dataset: Path, tmp_path: Path,
                                                     run_cli: Any) -> None:
    recipe = yaml.safe_load(Path("recipes/prune/synth-stripe-gru.yaml").read_text())
    recipe.update({"output": str(tmp_path / "pruned"), "device": "cpu", "data": {"root": str(tiny_dataset)},
                   "teacher": {"artifact": str(sg_teacher)}, "eval": {"batch_size": 16}})
    recipe["prune"].update({"recovery_steps": 2, "taylor_batch": 8, "bn_recalibration": 16})
    recipe["optim"]["batch_size"] = 8
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    code, out, err = run_cli(["prune", str(tmp_path / "p.yaml")])
    assert code == 0, err
    art = open_artifact(tmp_path / "pruned")
    report = art.metrics["prune"]
    assert [r["step"] for r in report["rounds"]] == [1] and art.metrics["steps"] == 2
    assert report["removed"]["parameters.text"] > 0.4 and report["removed"]["parameters.vision"] > 0.4
    teacher = load_model(sg_teacher)
    pruned = load_model(art.path)
    assert pruned.visual.conv1.out_channels == 5 < teacher.visual.conv1.out_channels  # 8 channels, 31% removed
    assert pruned.gru.hidden_size == 22 < teacher.gru.hidden_size  # 32 units
    # heads asked of the GRU: one line, exit 2, nothing written
    recipe["prune"]["text"]["head_ratio"] = 0.5
    recipe["output"] = str(tmp_path / "pruned-heads")
    (tmp_path / "q.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    code, out, err = run_cli(["prune", str(tmp_path / "q.yaml")])
    assert code == 2 and "prune.text.head_ratio" in err and "Traceback" not in err
    assert not (tmp_path / "pruned-heads").exists()


def test_batchnorm_recalibration_measures_the_pruned_model() -> None:
    torch.manual_seed(0)
    model = build_model(CFG)
    prune_model(model, PruneCfg(criterion="l1", vision={"width_ratio": 0.5, "mlp_ratio": 0.5}),
                {"image": torch.randn(2, 3, 64, 32), "text": torch.randint(1, 200, (2, 32))})
    bn = model.visual.bn1
    bn.running_mean.fill_(5.0)
    bn.running_var.fill_(9.0)
    images = torch.randn(12, 3, 64, 32)
    model.train()
    assert recalibrate_batchnorm(model, images, batch_size=4) == sum(
        isinstance(m, nn.BatchNorm2d) for m in model.modules())
    with torch.no_grad():
        pre = model.visual.conv1(images)
    # three equal batches, a cumulative average: the mean over all 12 images
    torch.testing.assert_close(bn.running_mean, pre.mean(dim=(0, 2, 3)), atol=1e-5, rtol=1e-4)
    assert model.training and bn.momentum == 0.1  # the model's mode and the layer's momentum are restored
    assert recalibrate_batchnorm(model, images[:0]) == 0


def test_bn_scale_prunes_the_channels_of_smallest_batchnorm_scale_and_refuses_transformers() -> None:
    torch.manual_seed(0)
    model = build_model(CFG).eval()
    bn = model.visual.stages[0][0].bn1  # inner channels of the first block: 16
    with torch.no_grad():
        bn.weight.copy_(torch.linspace(1.0, 2.0, 16))
        bn.weight[[3, 11, 12, 14]] = 1e-3
    conv2 = model.visual.stages[0][0].conv2
    kept_cols = [i for i in range(16) if i not in (3, 11, 12, 14)]
    want = conv2.weight.detach()[:, kept_cols].clone()
    prune_model(model, PruneCfg(criterion="bn_scale", vision={"mlp_ratio": 0.25}),
                {"image": torch.randn(2, 3, 64, 32), "text": torch.randint(1, 200, (2, 32))})
    torch.testing.assert_close(model.visual.stages[0][0].conv2.weight.detach(), want)
    with pytest.raises(ConfigError, match="bn_scale scores BatchNorm scales"):
        check_prune_cfg(PruneCfg(criterion="bn_scale"), build_model("test-tiny"))


# ------------------------------------------------------------------ student.init: inherit (the teacher pruned)
def test_inheritance_keeps_the_live_channels_and_units_of_a_stripe_gru_teacher() -> None:
    """A student at narrower widths inherits the teacher pruned by weight magnitude: with the teacher's surplus
    channels and units dead by construction, the student embeds exactly as the teacher does."""
    from tbps_compress.compress.distill import InheritancePlan, inherit_weights

    cfg = copy.deepcopy(CFG)
    cfg["text_cfg"].update({"layers": 2, "width": 16, "hidden": 8})
    torch.manual_seed(2)
    teacher = build_model(cfg).eval()
    _random_bn_statistics(teacher)
    _kill_a_quarter(teacher.visual, [0, 5], ([1, 4, 10, 13], [0, 7, 8, 15, 16, 23, 24, 31]), [2, 3, 9, 11],
                    ([3, 5, 6, 14, 17, 19, 27, 29], [1, 2, 11, 12, 20, 24, 26, 30]))
    for (layer, direction), idx in {(0, 0): [0, 5], (0, 1): [2, 7], (1, 0): [1, 3], (1, 1): [6, 4]}.items():
        _kill_gru_units(teacher, layer, direction, idx)
    _zero(teacher.token_embedding.weight, [0, 5, 7, 15], 1)
    for d in ("", "_reverse"):
        _zero(getattr(teacher.gru, f"weight_ih_l0{d}"), [0, 5, 7, 15], 1)
    images, tokens = torch.randn(3, 3, 64, 32), torch.randint(1, 200, (3, 32))
    tokens[:, 24:] = 0
    with torch.no_grad():
        want_i, want_t = teacher.encode_image(images), teacher.encode_text(tokens)
    s_cfg = copy.deepcopy(cfg)
    s_cfg["vision_cfg"]["channels"] = [6, 12, 24]
    s_cfg["text_cfg"].update({"width": 12, "hidden": 6})
    plan = InheritancePlan()
    student = inherit_weights(teacher, s_cfg, teacher_name="runs/t", plan=plan).eval()
    assert tower_sizes(student, "vision") == {"channels": [6, 12, 24], "inner": [[12], [24, 24]]}
    assert plan.widths["text"] == {"width": 12, "hidden": 6, "layers": 2}
    assert all(p.requires_grad for p in student.parameters())
    with torch.no_grad():
        torch.testing.assert_close(student.encode_image(images), want_i, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(student.encode_text(tokens), want_t, atol=1e-5, rtol=1e-5)
    assert tower_sizes(teacher, "vision")["channels"] == [8, 16, 32] and teacher.gru.hidden_size == 8  # untouched
    assert count_parameters(build_model(meta_of(student).config)) == count_parameters(student)


@pytest.mark.parametrize("change, selection, needle", [
    ({"vision_cfg": {"blocks": [1, 1]}}, "uniform", r"vision_cfg.blocks: \[1, 1\] is different from .*\[1, 2\]"),
    ({"text_cfg": {"hidden": 64}}, "uniform", "student text_cfg.hidden: 64 is wider than the teacher's 32"),
    ({"embed_dim": 16}, "uniform", "student embed_dim: 16 is different from the teacher's 32"),
    ({}, "importance", "student.layer_selection: 'importance' ranks transformer blocks"),
])
def test_stripe_gru_inheritance_refuses_what_does_not_fit(change: dict[str, Any], selection: str,
                                                          needle: str) -> None:
    from tbps_compress.compress.distill import InheritanceError, inherit_weights

    s_cfg = copy.deepcopy(CFG)
    for key, value in change.items():
        s_cfg[key] = {**s_cfg[key], **value} if isinstance(value, dict) else value
    with pytest.raises(InheritanceError, match=needle):
        inherit_weights(build_model(CFG), s_cfg, teacher_name="runs/t", layer_selection=selection)


def test_inheritance_across_families_is_refused() -> None:
    from tbps_compress.compress.distill import InheritanceError, inherit_weights

    with pytest.raises(InheritanceError, match="student.config is of model family 'clip' and the teacher .* "
                                               "'stripe-gru'"):
        inherit_weights(build_model(CFG), get_model_config("test-tiny"), teacher_name="runs/t")
