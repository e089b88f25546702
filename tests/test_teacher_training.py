"""What makes the from-scratch SynthPedes teacher learn: the convolutional stem of the image tower, vocabulary
pruning of the token table before training, and captions that follow a mirrored image (left <-> right)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from tbps_compress.artifacts import write_artifact
from tbps_compress.compress import prune
from tbps_compress.compress.distill import InheritanceError, inherit_weights
from tbps_compress.data.transforms import ImageAugment, swap_left_right
from tbps_compress.engine.train import Trainer
from tbps_compress.errors import ConfigError
from tbps_compress.export.onnx_export import export_onnx
from tbps_compress.models.config import get_model_config, validate_model_config
from tbps_compress.models.factory import build_model, config_from_model, count_macs
from tbps_compress.models.io import load_model, save_model
from tbps_compress.models.meta import meta_of
from tbps_compress.models.stem import ConvStem
from tbps_compress.recipes import ImageAugCfg


def _stem_cfg(channels: list[int] | None = None) -> dict:
    cfg = get_model_config("test-tiny")
    cfg["vision_cfg"]["stem_channels"] = [8, 16] if channels is None else channels
    return validate_model_config(cfg)


def _batch(n: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    text = torch.randint(1, 5000, (n, 32), generator=g)
    text[:, 10] = 49407
    text[:, 11:] = 0
    return {"image": torch.randn(n, 3, 64, 32, generator=g), "text": text}


def test_stem_replaces_the_patch_embedding_and_keeps_the_token_grid() -> None:
    torch.manual_seed(0)
    model = build_model(_stem_cfg()).eval()
    stem = model.visual.conv1
    assert isinstance(stem, ConvStem) and stem.out_channels == 64
    assert stem.proj.kernel_size == (4, 4)  # two stride-2 layers make up 4 of the patch's 16
    assert model.visual.positional_embedding.shape == (1 + 4 * 2, 64)
    assert model.encode_image(_batch()["image"]).shape == (3, 32)
    plain = count_macs(get_model_config("test-tiny"))["vision"]
    patchify = 8 * 3 * 16 * 16 * 64  # 8 patches through a 16x16 convolution to 64 channels
    stem = 32 * 16 * 8 * 3 * 9 + 16 * 8 * 16 * 8 * 9 + 8 * 64 * 16 * 4 * 4  # conv3x3/2, conv3x3/2, proj 4x4/4
    assert count_macs(_stem_cfg())["vision"] == plain - patchify + stem


@pytest.mark.parametrize("channels, needle", [([8, 16, 32, 64, 128], "divisible by 32"), ([8, 0], "positive")])
def test_bad_stem_is_named(channels: list[int], needle: str) -> None:
    cfg = get_model_config("test-tiny")
    cfg["vision_cfg"]["stem_channels"] = channels
    with pytest.raises(ConfigError, match="vision_cfg.stem_channels") as err:
        validate_model_config(cfg)
    assert needle in str(err.value)


def test_stem_model_round_trips_prunes_and_exports(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model(_stem_cfg()).eval()
    src = tmp_path / "a"
    with write_artifact(src, stage="train") as tmp:
        save_model(model, tmp)
    again = load_model(src)
    x = _batch()["image"]
    assert torch.equal(again.encode_image(x), model.encode_image(x))

    stem_before = {k: v.clone() for k, v in model.visual.conv1.stem.state_dict().items()}
    prune.prune_model(model, prune.PruneCfg(vision={"width_ratio": 0.5, "mlp_ratio": 0.5}), _batch())
    assert model.visual.conv1.out_channels == 32 and model.visual.class_embedding.shape == (32,)
    for k, v in model.visual.conv1.stem.state_dict().items():
        assert torch.equal(v, stem_before[k]), f"the stem is not pruned: {k}"
    cfg = config_from_model(model)
    assert cfg["vision_cfg"]["width"] == 32 and cfg["vision_cfg"]["stem_channels"] == [8, 16]
    pruned = tmp_path / "pruned"
    with write_artifact(pruned, stage="prune") as tmp:
        save_model(model, tmp)
    rebuilt = load_model(pruned)
    assert torch.allclose(rebuilt.encode_image(x), model.encode_image(x), atol=1e-6)
    report = export_onnx(pruned, tmp_path / "onnx")
    assert report["max_diff"] < 1e-4


def test_student_inherits_the_stem() -> None:
    torch.manual_seed(0)
    teacher = build_model(_stem_cfg()).eval()
    s_cfg = _stem_cfg()
    s_cfg["vision_cfg"].update(width=32, layers=1)
    student = inherit_weights(teacher, s_cfg)
    assert torch.equal(student.visual.conv1.stem[0].weight, teacher.visual.conv1.stem[0].weight)
    assert student.visual.conv1.proj.weight.shape[0] == 32
    for other in (_stem_cfg([8, 32]), _stem_cfg([8]), _stem_cfg([4, 8, 16])):  # wider, or other stage counts
        with pytest.raises(InheritanceError, match="stem_channels"):
            inherit_weights(teacher, other)


def test_student_inherits_a_narrower_stem_by_filter_norm() -> None:
    """Each stage keeps the teacher's channels with the largest filter L1 norm, the same ones through its residual
    blocks (their shortcuts add them); every kept tensor is the teacher's slice at those channels."""
    from tbps_compress.models.stem import BasicBlock

    torch.manual_seed(0)
    cfg = _stem_cfg([8, 16])
    cfg["vision_cfg"]["stem_blocks"] = 1
    teacher = build_model(validate_model_config(cfg)).eval()
    for m in teacher.visual.conv1.stem.modules():  # distinct statistics per channel
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    s_cfg = validate_model_config({**cfg, "vision_cfg": {**cfg["vision_cfg"], "stem_channels": [4, 8]}})
    student = inherit_weights(teacher, s_cfg).eval()
    t_stem, s_stem = teacher.visual.conv1.stem, student.visual.conv1.stem
    with torch.no_grad():
        k1 = sorted(sorted(range(8), key=lambda i: -float(t_stem[0].weight[i].abs().sum()))[:4])
        k2 = sorted(sorted(range(16), key=lambda i: -float(t_stem[4].weight[i].abs().sum()))[:8])
    assert isinstance(s_stem[3], BasicBlock) and isinstance(s_stem[7], BasicBlock)
    assert torch.equal(s_stem[0].weight, t_stem[0].weight[k1])
    assert torch.equal(s_stem[1].running_var, t_stem[1].running_var[k1])
    assert torch.equal(s_stem[3].conv1.weight, t_stem[3].conv1.weight[k1][:, k1])
    assert torch.equal(s_stem[3].bn2.running_mean, t_stem[3].bn2.running_mean[k1])
    assert torch.equal(s_stem[4].weight, t_stem[4].weight[k2][:, k1])
    assert torch.equal(s_stem[7].conv2.weight, t_stem[7].conv2.weight[k2][:, k2])
    assert torch.equal(student.visual.conv1.proj.weight, teacher.visual.conv1.proj.weight[:, k2])
    assert student.encode_image(torch.randn(2, 3, 64, 32)).shape == (2, 32)


def test_mirrored_view_swaps_left_and_right() -> None:
    assert swap_left_right("a bag on her left shoulder, phone in the right hand; leftover") == \
        "a bag on her right shoulder, phone in the left hand; leftover"
    aug = ImageAugment(ImageAugCfg(pool=["hflip"], num_ops=1, hflip_p=1.0), (4, 2))
    img = torch.arange(24, dtype=torch.uint8).view(3, 4, 2)
    view, flipped = aug.main_view_flipped(img, random.Random(0))
    assert flipped
    assert torch.equal(view, aug.eval_view(img.flip(-1)))
    twice = ImageAugment(ImageAugCfg(pool=["hflip"], num_ops=2, hflip_p=1.0), (4, 2))
    assert twice.main_view_flipped(img, random.Random(0))[1] is False  # two flips restore the image


def test_train_set_captions_follow_the_flip(make_train_recipe, tmp_path: Path) -> None:
    aug = {"image": {"pool": ["hflip"], "num_ops": 1, "hflip_p": 1.0, "hflip_swaps_left_right": True},
           "text": {"back_translation_p": 0.0, "deletion_p": 0.0}}
    tr = Trainer(make_train_recipe(tmp_path / "out", augment=aug))
    tr.prepare()
    seen: list[str] = []
    tr.trainset.tokenizer = lambda texts: (seen.extend(texts), torch.zeros(len(texts), 4, dtype=torch.long))[1]
    import dataclasses

    rec = tr.trainset.records[0]
    tr.trainset.records[0] = dataclasses.replace(rec, captions=("a person with a bag in the left hand",
                                                                 *rec.captions[1:]))
    k = tr.trainset.pairs.index((0, 0))
    tr.trainset[k]
    assert seen[-1] == "a person with a bag in the right hand"


def test_vocab_prune_before_training_shrinks_the_table(make_train_recipe, tmp_path: Path) -> None:
    tr = Trainer(make_train_recipe(tmp_path / "out", model={"config": "test-tiny", "vocab_prune": True}))
    tr.prepare()
    rows = tr.model.token_embedding.num_embeddings
    assert rows < 500 and meta_of(tr.model).config["text_cfg"]["vocab_size"] == rows
    assert max(meta_of(tr.model).vocab_map.values()) == rows - 1
    batch = next(iter(tr.loader))
    assert int(batch["text"].max()) == rows - 1  # EOT is the last row: argmax pooling still finds it
    n_opt = sum(p.numel() for g in tr.optimizer.param_groups for p in g["params"])
    assert n_opt < sum(p.numel() for p in build_model("test-tiny").parameters()) - 49000 * 64


def test_learning_curve_is_logged_and_kept(make_train_recipe, tmp_path: Path) -> None:
    import csv

    recipe = make_train_recipe(tmp_path / "out", optim={"max_steps": 4}, eval={"curve_every_steps": 2})
    out = Trainer(recipe).run()
    rows = list(csv.DictReader(open(out / "curve.csv", encoding="utf-8")))
    assert [int(r["step"]) for r in rows] == [2, 4]
    assert {r["split"] for r in rows} == {"test"}
    assert all(0 <= float(r["R1"]) <= 100 for r in rows)
    assert float(rows[1]["train_seconds"]) >= float(rows[0]["train_seconds"]) > 0


@pytest.mark.parametrize("learn", [False, True])
def test_temperature_starts_where_the_recipe_says_and_stays_when_fixed(make_train_recipe, tmp_path: Path,
                                                                       learn: bool) -> None:
    import math

    tr = Trainer(make_train_recipe(tmp_path / "out", optim={"max_steps": 2},
                                   tricks={"temperature": 0.03, "learn_temperature": learn}))
    out = tr.run()
    from tbps_compress.models.io import load_model

    scale = float(load_model(out).logit_scale)
    if learn:
        assert scale != pytest.approx(math.log(1 / 0.03), abs=1e-7)  # trained away from its start
    else:
        assert scale == pytest.approx(math.log(1 / 0.03), abs=1e-6)
