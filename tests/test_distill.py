"""Distillation stage: recipes, weight inheritance, vocabulary pruning, teacher cache, a tiny end-to-end run.

Uses the shared fixtures ``tiny_dataset`` and ``tiny_teacher_artifact`` (tests/conftest.py)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from tbps_compress.artifacts import open_artifact, write_artifact, write_json
from tbps_compress.compress import importance as imp
from tbps_compress.compress.distill import (
    DistillRecipe,
    InheritanceError,
    TeacherCacheError,
    build_teacher_cache,
    cache_key,
    inherit_weights,
    load_teacher_cache,
    resolve_cache_path,
    run_distill,
    student_config,
    teacher_adapter,
)
from tbps_compress.config import dump_recipe, load_recipe
from tbps_compress.errors import ConfigError
from tbps_compress.models.config import get_model_config
from tbps_compress.models.factory import EOT_TOKEN, build_model, count_parameters, tower_blocks
from tbps_compress.models.io import save_model
from tbps_compress.models.meta import meta_of
from tbps_compress.models.tokenizer import get_tokenizer
from tbps_compress.models.vocab import prune_vocabulary

ROOT = Path(__file__).resolve().parents[1]


def _save_teacher(model: torch.nn.Module, out: Path) -> Path:
    with write_artifact(out, stage="train") as tmp:
        save_model(model, tmp)
        write_json(tmp / "metrics.json", {"test": {"R1": 50.0}})
    return out


def _tiny_recipe(tmp: Path, data: Path, teacher: Path, **student) -> DistillRecipe:
    return DistillRecipe.model_validate({
        "output": str(tmp / "student"), "device": "cpu", "data": {"root": str(data)},
        "teacher": {"artifact": str(teacher), "cache": str(tmp / "cache.safetensors"), "cache_dtype": "float32"},
        "student": {"config": "test-tiny", "inline": {"vision": {"width": 32, "heads": 2}, "text": {"width": 32}},
                    "init": "inherit", "vocab_prune": True, **student},
        "losses": {"n_itc": {"weight": 0.5}, "r_itc": {}, "kd_feature": {}, "kd_affinity": {}, "kd_interactive": {}},
        "optim": {"epochs": 2, "batch_size": 8, "max_steps": 3, "lr": 1e-4, "min_lr": 1e-6},
        "eval": {"batch_size": 16},
    })


# ------------------------------------------------------------------------------------------------ recipes


@pytest.mark.parametrize("path", sorted((ROOT / "recipes" / "distill").glob("*.yaml")), ids=lambda p: p.name)
def test_distill_recipes_load_and_round_trip(path: Path, tmp_path: Path) -> None:
    recipe = load_recipe(path, DistillRecipe)
    assert recipe.stage == "distill"
    dump_recipe(recipe, tmp_path / "r.yaml")
    assert load_recipe(tmp_path / "r.yaml", DistillRecipe) == recipe
    t = get_model_config("tbps-vit-b-16") if "vit" in path.name else get_model_config("synth-teacher")
    student_config(recipe.student, t)  # the student architecture resolves


def test_recipe_errors_name_the_key() -> None:
    base = {"teacher": {"artifact": "t"}, "student": {"config": "test-tiny"}}
    DistillRecipe.model_validate(base)
    with pytest.raises(ValueError, match="student"):
        DistillRecipe.model_validate({**base, "model": {"config": "test-tiny"}})
    with pytest.raises(ValueError, match="teacher.hidden"):
        DistillRecipe.model_validate({**base, "losses": {"kd_hidden": {}}})
    with pytest.raises(ValueError, match="init_artifact"):
        DistillRecipe.model_validate({**base, "student": {"config": "test-tiny", "init": "artifact"}})
    with pytest.raises(ValueError, match="unknown|extra"):
        DistillRecipe.model_validate({**base, "student": {"config": "test-tiny", "widht": 3}})


def test_inline_student_config() -> None:
    t = get_model_config("synth-teacher")
    r = DistillRecipe.model_validate({"teacher": {"artifact": "t"}, "student": {
        "inline": {"embed_dim": 128, "vision": {"depth": 4, "width": 128, "heads": 4}, "text": {"layers": 3}}}})
    cfg = student_config(r.student, t)
    assert cfg["embed_dim"] == 128 and cfg["vision_cfg"]["layers"] == 4 and cfg["vision_cfg"]["head_width"] == 32
    assert cfg["text_cfg"]["layers"] == 3 and cfg["text_cfg"]["width"] == t["text_cfg"]["width"]
    bad = DistillRecipe.model_validate({"teacher": {"artifact": "t"},
                                        "student": {"inline": {"vision": {"width": 100, "heads": 3}}}})
    with pytest.raises(ConfigError, match="student.inline.vision.heads"):
        student_config(bad.student, t)


# ------------------------------------------------------------------------------------------------ inheritance


def _four_head_teacher() -> torch.nn.Module:
    cfg = get_model_config("test-tiny")
    cfg["vision_cfg"]["head_width"] = 16
    cfg["text_cfg"]["heads"] = 4
    torch.manual_seed(1)
    return build_model(cfg)


def test_inheritance_of_the_full_architecture_is_exact() -> None:
    teacher = _four_head_teacher().eval()
    student = inherit_weights(teacher, copy.deepcopy(meta_of(teacher).config)).eval()
    img = torch.randn(2, 3, 64, 32)
    tok = get_tokenizer(meta_of(teacher).config)(["a man in a red coat", "a woman"])
    with torch.no_grad():
        assert torch.allclose(student.encode_image(img), teacher.encode_image(img), atol=1e-6)
        assert torch.allclose(student.encode_text(tok), teacher.encode_text(tok), atol=1e-6)


def test_inheritance_keeps_the_most_important_heads_and_channels() -> None:
    teacher = _four_head_teacher()
    blk_t = tower_blocks(teacher, "text")[0]
    blk_v = tower_blocks(teacher, "vision")[1]
    strong_heads = [1, 3]
    strong_mlp = [5, 9, 40, 100]
    with torch.no_grad():
        for blk in (blk_t, blk_v):
            for h in strong_heads:
                for part in range(3):
                    blk.attn.qkv.weight[part * 64 + h * 16:part * 64 + (h + 1) * 16] *= 4
                blk.attn.proj.weight[:, h * 16:(h + 1) * 16] *= 4
            blk.mlp.c_fc.weight[strong_mlp] *= 10
    cfg = copy.deepcopy(meta_of(teacher).config)
    for tower in ("vision", "text"):
        cfg[f"{tower}_blocks"] = [{"heads": 2, "head_dim": 16, "mlp_dim": 4}] * 2
    student = inherit_weights(teacher, cfg)
    for s_blk, t_blk in ((tower_blocks(student, "text")[0], blk_t), (tower_blocks(student, "vision")[1], blk_v)):
        assert s_blk.attn.num_heads == 2
        q_s = s_blk.attn.qkv.weight[:32]
        q_t = torch.cat([t_blk.attn.qkv.weight[h * 16:(h + 1) * 16] for h in strong_heads])
        assert torch.equal(q_s, q_t)  # same width: every residual channel kept, in order
        assert torch.equal(s_blk.attn.proj.weight, torch.cat([t_blk.attn.proj.weight[:, h * 16:(h + 1) * 16]
                                                              for h in strong_heads], dim=1))
        assert torch.equal(s_blk.mlp.c_fc.weight, t_blk.mlp.c_fc.weight[strong_mlp])
        assert torch.equal(s_blk.mlp.c_proj.weight, t_blk.mlp.c_proj.weight[:, strong_mlp])


def test_inheritance_keeps_important_residual_channels_and_narrow_heads() -> None:
    teacher = build_model("test-tiny")
    strong = sorted(torch.randperm(64, generator=torch.Generator().manual_seed(0))[:32].tolist())
    with torch.no_grad():
        teacher.token_embedding.weight[:, strong] *= 3
        teacher.positional_embedding[:, strong] *= 3
        teacher.text_projection[strong] *= 3
        for blk in tower_blocks(teacher, "text"):
            blk.attn.qkv.weight[:, strong] *= 3
            blk.attn.proj.weight[strong] *= 3
            blk.mlp.c_fc.weight[:, strong] *= 3
            blk.mlp.c_proj.weight[strong] *= 3
    assert imp.top_k(imp.residual_channel_scores(teacher, "text"), 32) == strong
    cfg = copy.deepcopy(meta_of(teacher).config)
    cfg["text_cfg"]["width"] = 32  # 2 heads of 16 (teacher: 2 of 32)
    student = inherit_weights(teacher, cfg)
    assert torch.equal(student.token_embedding.weight, teacher.token_embedding.weight[:, strong])
    assert tower_blocks(student, "text")[0].attn.head_dim == 16
    student.eval()
    with torch.no_grad():
        student.encode_text(get_tokenizer(meta_of(student).config)(["a person"]))


def test_student_wider_than_teacher_is_refused() -> None:
    teacher = build_model("test-tiny")
    cfg = copy.deepcopy(meta_of(teacher).config)
    cfg["vision_cfg"]["width"] = 128
    with pytest.raises(InheritanceError, match=r"vision_cfg.width: 128 is larger than the teacher's 64"):
        inherit_weights(teacher, cfg, teacher_name="runs/t")
    cfg = copy.deepcopy(meta_of(teacher).config)
    cfg["text_blocks"] = [{"heads": 4, "head_dim": 16, "mlp_dim": 64}] * 2
    with pytest.raises(InheritanceError, match="heads: 4 is larger"):
        inherit_weights(teacher, cfg)
    cfg = copy.deepcopy(meta_of(teacher).config)
    cfg["text_cfg"]["layers"] = 3
    with pytest.raises(InheritanceError, match="text_cfg.layers"):
        inherit_weights(teacher, cfg)


def test_layer_selection() -> None:
    assert imp.uniform_layers(6, 3) == [0, 2, 5]
    assert imp.uniform_layers(12, 4) == [0, 4, 7, 11]
    assert imp.uniform_layers(4, 4) == [0, 1, 2, 3]
    teacher = build_model("test-tiny")
    tok = get_tokenizer(meta_of(teacher).config)(["a man", "a woman in red"])
    scores = imp.layer_scores(teacher, torch.randn(2, 3, 64, 32), tok)
    assert scores["vision"].shape == (2,) and scores["text"].shape == (2,) and (scores["text"] > 0).all()
    cfg = copy.deepcopy(meta_of(teacher).config)
    cfg["vision_cfg"]["layers"] = 1
    scores["vision"] = torch.tensor([0.1, 0.9])
    student = inherit_weights(teacher, cfg, layer_selection="importance", layer_scores=scores)
    s, t = tower_blocks(student, "vision")[0], tower_blocks(teacher, "vision")[1]
    assert torch.equal(s.mlp.c_fc.weight, t.mlp.c_fc.weight)


# ------------------------------------------------------------------------------------------------ vocabulary


def test_vocabulary_pruning_keeps_outputs_and_saves_parameters() -> None:
    from tbps_compress.runtime.tokenizer import BPETokenizer

    torch.manual_seed(0)
    model = build_model("test-tiny").eval()
    tok = get_tokenizer(meta_of(model).config)
    train = ["a man in a red coat and black trousers", "a woman carrying a white bag", "a red bag"]
    before = count_parameters(model)
    with torch.no_grad():
        ref = model.encode_text(tok(train))
    _, vm, unk = prune_vocabulary(model, train, tok)
    after = count_parameters(model)
    assert model.token_embedding.num_embeddings == len(vm) + 1 == meta_of(model).config["text_cfg"]["vocab_size"]
    assert after["total"] < before["total"] - 49000 * 64
    assert vm[EOT_TOKEN] == max(max(vm.values()), unk)
    new_tok = get_tokenizer(meta_of(model).config, vm, unk)
    with torch.no_grad():
        assert torch.allclose(model.encode_text(new_tok(train)), ref, atol=1e-6)
        model.encode_text(new_tok(["a zebra"]))  # unseen token -> unk, no error
    rt = BPETokenizer(context_length=32, vocab_map=vm, unk_id=unk)
    ids = new_tok(train + ["zebra"])
    assert (torch.from_numpy(rt(train + ["zebra"])) == ids).all()
    assert unk in ids[-1].tolist()
    # the teacher (full vocabulary, longer context) gets back its own token ids
    teacher_cfg = copy.deepcopy(meta_of(model).config)
    teacher_cfg["text_cfg"].update(vocab_size=49408, context_length=40)
    teacher = build_model(teacher_cfg)
    adapt = teacher_adapter(model, teacher)
    got = adapt({"text": new_tok(train), "image": torch.zeros(3, 3, 64, 32)})["text"]
    assert torch.equal(got, get_tokenizer(teacher_cfg)(train))


def test_cached_teacher_outputs_skip_the_teacher_forward() -> None:
    from tbps_compress.compress.distill import TeacherCache
    from tbps_compress.compress.teacher import Teacher

    class NoForward(torch.nn.Module):
        def encode_image(self, x):
            raise AssertionError("teacher forward should not run")

        encode_text = encode_image

    n, d = 6, 4
    cache = TeacherCache(path=Path("c"), text=torch.randn(1, n, d), image=torch.randn(2, n, d),
                         meta={"epochs": 2, "text_invariant": True, "image_invariant": False})
    teacher = Teacher(NoForward(), artifact=Path("t"), cache=cache)  # on the CPU, no autocast until set up
    idx = torch.tensor([4, 1])
    out = teacher.batch_inputs({"index": idx, "image": torch.zeros(2), "text": torch.zeros(2)}, epoch=1)
    assert torch.allclose(out["teacher_image"], torch.nn.functional.normalize(cache.image[1][idx], dim=-1))
    assert torch.allclose(out["teacher_text"], torch.nn.functional.normalize(cache.text[0][idx], dim=-1))


# ------------------------------------------------------------------------------------------------ teacher cache


def test_teacher_cache_matches_online_and_refuses_another_teacher(tiny_dataset: Path, tiny_teacher_artifact: Path,
                                                                   tmp_path: Path) -> None:
    from tbps_compress.data.loader import ImageStore, TrainSet
    from tbps_compress.data.readers import load_dataset
    from tbps_compress.data.records import remap_ids
    from tbps_compress.models.io import load_model
    from tbps_compress.runtime.tokenizer import clean_caption

    recipe = _tiny_recipe(tmp_path, tiny_dataset, tiny_teacher_artifact)
    teacher = load_model(tiny_teacher_artifact).eval()
    thash = open_artifact(tiny_teacher_artifact).lineage["content_hash"]
    ds = load_dataset(tiny_dataset)
    recs = ds.split("train")[:6]
    paths = [ds.image_path(r) for r in recs]
    path = tmp_path / "c.safetensors"
    cache = build_teacher_cache(path, teacher, thash, recs, paths, recipe, views=("image",), image_size=(64, 32),
                                epochs=2, device=torch.device("cpu"), batch_size=4)
    assert cache.text.shape[:2] == (2, 12) and cache.image.shape[:2] == (2, 12)
    # the cache holds exactly what the teacher computes online for the training sample (epoch, index)
    tok = get_tokenizer(meta_of(teacher).config)
    ts = TrainSet(recs, ImageStore(paths, (64, 32)), remap_ids(recs), tok, recipe.augment, seed=recipe.seed,
                  clean=clean_caption)
    ts.epoch = 1
    sample = ts[5]
    got = cache.lookup(1, torch.tensor([5]))
    with torch.no_grad():
        img = torch.nn.functional.normalize(teacher.encode_image(sample["image"][None]), dim=-1)
        txt = torch.nn.functional.normalize(teacher.encode_text(sample["text"][None]), dim=-1)
    assert torch.allclose(got["image"], img, atol=1e-5) and torch.allclose(got["text"], txt, atol=1e-5)
    key = cache_key(recipe, recs, ("image",), (64, 32))
    assert load_teacher_cache(path, thash, key).epochs == 2
    with pytest.raises(TeacherCacheError, match=r"c\.safetensors: built for another teacher"):
        load_teacher_cache(path, "0" * 64, key, tmp_path / "other")
    with pytest.raises(TeacherCacheError, match="different 'data'"):
        load_teacher_cache(path, thash, cache_key(recipe, recs[:4], ("image",), (64, 32)))
    a = resolve_cache_path("c/t-{teacher}-{key}.st", thash, key)
    assert a.name.startswith(f"t-{thash[:12]}-") and a != resolve_cache_path("c/t-{teacher}-{key}.st", "1" * 64, key)
    (tmp_path / "junk.safetensors").write_bytes(b"not a cache")
    with pytest.raises(TeacherCacheError, match="junk.safetensors"):
        load_teacher_cache(tmp_path / "junk.safetensors", thash)


# ------------------------------------------------------------------------------------------------ end to end


def test_distill_end_to_end(tiny_dataset: Path, tiny_teacher_artifact: Path, tmp_path: Path) -> None:
    from tbps_compress.evaluation import evaluate_artifact
    from tbps_compress.models.io import load_model, read_vocab_map

    recipe = _tiny_recipe(tmp_path, tiny_dataset, tiny_teacher_artifact)
    out = run_distill(recipe)
    art = open_artifact(out)
    teacher_lineage = open_artifact(tiny_teacher_artifact).lineage
    assert art.stage == "distill"
    assert art.lineage["parent"]["content_hash"] == teacher_lineage["content_hash"]
    assert Path(art.lineage["parent"]["path"]) == tiny_teacher_artifact.resolve()
    m = art.metrics
    assert m["steps"] == 3 and "R1" in m["test"]
    assert m["distill"]["cache"]["built"] and m["distill"]["inheritance"]["layers"]["vision"] == [0, 1]
    vp = m["vocab_prune"]
    assert vp["vocab_size_after"] < 1000 and vp["parameters_saved"] > 0
    assert vp["weights_file_bytes"] < vp["weights_file_bytes_unpruned"]
    vm, unk = read_vocab_map(out)
    assert vm[EOT_TOKEN] == max(vm.values()) and unk is not None
    assert json.loads((out / "tokenizer.json").read_text())["unk_id"] == unk
    model = load_model(out)
    assert model.token_embedding.num_embeddings == vp["vocab_size_after"] == art.model_config["text_cfg"]["vocab_size"]
    teacher_params = count_parameters(load_model(tiny_teacher_artifact))
    assert count_parameters(model)["non_embedding"] < teacher_params["non_embedding"]
    assert set(evaluate_artifact(out, tiny_dataset, device="cpu")) >= {"R1", "mAP", "mINP"}

    # a second student reuses the cache; a cache of another teacher is refused
    again = recipe.model_copy(update={"output": str(tmp_path / "student2")})
    again.student = again.student.model_copy(update={"init": "random", "vocab_prune": False})
    m2 = open_artifact(run_distill(again)).metrics
    assert m2["distill"]["cache"]["built"] is False and "vocab_prune" not in m2
    torch.manual_seed(5)
    other = _save_teacher(build_model("test-tiny"), tmp_path / "other-teacher")
    third = recipe.model_copy(update={"output": str(tmp_path / "student3")})
    third.teacher = third.teacher.model_copy(update={"artifact": str(other)})
    with pytest.raises(TeacherCacheError, match="built for another teacher"):
        run_distill(third)
    with pytest.raises(ConfigError, match="larger than"):
        wide = recipe.model_copy(update={"output": str(tmp_path / "student4")})
        wide.student = wide.student.model_copy(update={"inline": None, "config": "synth-student"})
        run_distill(wide)
