"""Loss registry, task losses and KD losses on tiny hand-checkable inputs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tbps_compress.errors import ConfigError
from tbps_compress.losses import (
    LossInputs,
    LossSet,
    hidden_proj_key,
    list_losses,
    loss_needs,
    make_modules,
    register_loss,
)
from tbps_compress.losses.tbps import identity_targets, ramp_alpha

D = 8
PIDS = torch.tensor([0, 0, 1, 2, 2, 2])


def unit(n: int, d: int = D, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=-1)


def make_inputs(**overrides) -> LossInputs:
    base = dict(image=unit(6, seed=1), text=unit(6, seed=2), pids=PIDS.clone(), logit_scale=torch.tensor(math.log(20)))
    base.update(overrides)
    return LossInputs(**base)


def run(name: str, inputs: LossInputs, **params) -> torch.Tensor:
    total, terms = LossSet({name: {"weight": 1.0, **params}})(inputs)
    assert torch.allclose(total.detach(), terms[f"{name}_loss"])
    return total


def manual_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return -(target * logits.log_softmax(1)).sum(1).mean()


# ------------------------------------------------------------------------------------------------ targets / ramp


def test_identity_targets_rows_sum_to_one_with_duplicates() -> None:
    t = identity_targets(PIDS, PIDS)
    assert torch.allclose(t.sum(1), torch.ones(6))
    assert torch.allclose(t[0], torch.tensor([0.5, 0.5, 0, 0, 0, 0]))
    assert torch.allclose(t[2], torch.tensor([0.0, 0, 1, 0, 0, 0]))
    assert torch.allclose(t[3, 3:], torch.full((3,), 1 / 3))


def test_ramp_alpha() -> None:
    assert ramp_alpha(0.5, 0.0, 1.0) == 0.0
    assert ramp_alpha(0.5, 0.5, 1.0) == pytest.approx(0.25)
    assert ramp_alpha(0.5, 3.0, 1.0) == 0.5
    assert ramp_alpha(0.5, 0.0, 0.0) == 0.5


# ------------------------------------------------------------------------------------------------ N-ITC / MVS-I


def test_n_itc_alpha_zero_is_ce_with_identity_targets() -> None:
    inp = make_inputs()
    s = 20.0
    t = identity_targets(PIDS, PIDS)
    expected = 0.5 * (manual_ce(s * inp.image @ inp.text.t(), t) + manual_ce(s * inp.text @ inp.image.t(), t))
    assert run("n_itc", inp, alpha=0.0).item() == pytest.approx(expected.item(), rel=1e-5)
    assert run("n_itc", inp, soft_labels=False).item() == pytest.approx(expected.item(), rel=1e-5)
    # ramp: alpha is 0 at progress 0
    inp0 = make_inputs(progress=0.0)
    assert run("n_itc", inp0).item() == pytest.approx(expected.item(), rel=1e-5)


def test_n_itc_soft_target_mix_and_no_gradient_through_target() -> None:
    image = unit(6, seed=1).requires_grad_()
    inp = make_inputs(image=image, progress=0.5)  # a = 0.5 * 0.5
    loss = run("n_itc", inp)
    (grad,) = torch.autograd.grad(loss, image)

    image2 = image.detach().clone().requires_grad_()
    a, s, t = 0.25, 20.0, identity_targets(PIDS, PIDS)
    li2t, lt2i = s * image2 @ inp.text.t(), s * inp.text @ image2.t()
    ti2t = a * li2t.detach().softmax(1) + (1 - a) * t
    tt2i = a * lt2i.detach().softmax(1) + (1 - a) * t
    expected = 0.5 * (manual_ce(li2t, ti2t) + manual_ce(lt2i, tt2i))
    (grad2,) = torch.autograd.grad(expected, image2)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert torch.allclose(grad, grad2, atol=1e-6)


def test_mvs_i_is_n_itc_on_second_view() -> None:
    inp = make_inputs(image_mvs=unit(6, seed=3))
    same_view = make_inputs(image=unit(6, seed=3))
    assert run("mvs_i", inp).item() == pytest.approx(run("n_itc", same_view).item(), rel=1e-6)
    assert loss_needs("mvs_i") == ("image_mvs",)


# ------------------------------------------------------------------------------------------------ R-ITC / SDM


def test_r_itc_bounded_below_and_minimal_when_p_matches_target() -> None:
    eps = 0.01
    basis = torch.eye(D)[:6]
    pids = torch.arange(6)
    aligned = make_inputs(image=basis, text=basis, pids=pids, logit_scale=torch.tensor(math.log(100)))
    low = run("r_itc", aligned).item()
    assert low == pytest.approx(-math.log(1 + eps), abs=1e-3)
    rand = run("r_itc", make_inputs(pids=pids)).item()
    assert rand > low + 1.0
    assert run("r_itc", make_inputs()).item() >= -math.log(1 + eps)


def test_sdm_uses_fixed_temperature() -> None:
    a = run("sdm", make_inputs(logit_scale=torch.tensor(0.0))).item()
    b = run("sdm", make_inputs(logit_scale=torch.tensor(4.0))).item()
    assert a == pytest.approx(b)
    inp = make_inputs()
    t = identity_targets(PIDS, PIDS)
    logits = 50.0 * inp.image @ inp.text.t()
    p = logits.softmax(1)
    expected_i2t = (p * (logits.log_softmax(1) - torch.log(t + 1e-8))).sum(1).mean()
    logits_t = 50.0 * inp.text @ inp.image.t()
    pt = logits_t.softmax(1)
    expected_t2i = (pt * (logits_t.log_softmax(1) - torch.log(t + 1e-8))).sum(1).mean()
    assert a == pytest.approx(0.5 * (expected_i2t + expected_t2i).item(), rel=1e-5)


# ------------------------------------------------------------------------------------------------ C-ITC


def test_c_itc_zero_when_modalities_equal_and_positive_otherwise() -> None:
    emb = unit(6, seed=4)
    assert run("c_itc", make_inputs(image=emb, text=emb)).item() == pytest.approx(0.0, abs=1e-7)
    inp = make_inputs()
    i, t = inp.image, inp.text
    expected = 0.25 * ((i @ i.t() - t @ t.t()) ** 2).mean() + 0.25 * ((i @ t.t() - t @ i.t()) ** 2).mean()
    assert run("c_itc", inp).item() == pytest.approx(expected.item(), rel=1e-5)
    assert run("c_itc", inp, in_modal=0.0, cross_modal=0.0).item() == 0.0


# ------------------------------------------------------------------------------------------------ SS-I / ID / ITC


def test_ss_i_lower_for_identical_views() -> None:
    torch.manual_seed(0)
    spec = {"ss_i": {"weight": 0.4}}
    mods = make_modules(spec, embed_dim=D, num_classes=0, teacher_dim=None)
    a = torch.randn(6, D)
    same = run("ss_i", make_inputs(ssl_a=a, ssl_b=a.clone(), modules=dict(mods))).item()
    diff = run("ss_i", make_inputs(ssl_a=a, ssl_b=torch.randn(6, D), modules=dict(mods))).item()
    assert same < diff
    assert loss_needs("ss_i") == ("ssl_a", "ssl_b", "modules.ssl_head")


def test_id_loss_is_mean_of_two_cross_entropies() -> None:
    mods = make_modules({"id": {}}, embed_dim=D, num_classes=3, teacher_dim=None)
    inp = make_inputs(modules=dict(mods))
    cls = mods["id_classifier"]
    expected = 0.5 * (F.cross_entropy(cls(inp.image), PIDS) + F.cross_entropy(cls(inp.text), PIDS))
    assert run("id", inp).item() == pytest.approx(expected.item(), rel=1e-6)


def test_itc_is_clip_infonce() -> None:
    inp = make_inputs()
    logits = 20.0 * inp.image @ inp.text.t()
    target = torch.arange(6)
    expected = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))
    assert run("itc", inp).item() == pytest.approx(expected.item(), rel=1e-5)


# ------------------------------------------------------------------------------------------------ KD


def teacher_inputs(student_dim: int = D, teacher_dim: int = D, same: bool = False, **kw) -> LossInputs:
    t_img, t_txt = unit(6, teacher_dim, seed=5), unit(6, teacher_dim, seed=6)
    if same:
        s_img, s_txt = t_img.clone(), t_txt.clone()
    else:
        s_img, s_txt = unit(6, student_dim, seed=7), unit(6, student_dim, seed=8)
    return make_inputs(image=s_img, text=s_txt, teacher_image=t_img, teacher_text=t_txt, **kw)


def test_kd_feature_zero_when_student_equals_teacher() -> None:
    assert run("kd_feature", teacher_inputs(same=True)).item() == pytest.approx(0.0, abs=1e-7)
    inp = teacher_inputs()
    expected = 0.5 * (
        (2 - 2 * (inp.image * inp.teacher_image).sum(1)).mean() + (2 - 2 * (inp.text * inp.teacher_text).sum(1)).mean()
    )
    assert run("kd_feature", inp).item() == pytest.approx(expected.item(), rel=1e-5)


def test_kd_projection_when_widths_differ() -> None:
    spec = {"kd_feature": {}, "kd_interactive": {}}
    assert len(make_modules(spec, embed_dim=D, num_classes=0, teacher_dim=D)) == 0
    mods = make_modules(spec, embed_dim=4, num_classes=0, teacher_dim=D)
    assert tuple(mods["kd_image_proj"].weight.shape) == (D, 4)
    inp = teacher_inputs(student_dim=4, modules=dict(mods))
    total, _ = LossSet(spec)(inp)
    total.backward()
    assert mods["kd_image_proj"].weight.grad is not None
    assert torch.isfinite(mods["kd_text_proj"].weight.grad).all()
    with pytest.raises(RuntimeError, match="kd_image_proj"):
        LossSet({"kd_feature": {}})(teacher_inputs(student_dim=4))
    with pytest.raises(ConfigError, match="teacher"):
        make_modules(spec, embed_dim=4, num_classes=0, teacher_dim=None)


def test_kd_affinity_zero_when_equal() -> None:
    assert run("kd_affinity", teacher_inputs(same=True)).item() == pytest.approx(0.0, abs=1e-6)
    assert run("kd_affinity", teacher_inputs(), temperature=0.1).item() > 0.01


def test_kd_interactive_with_teacher_equal_to_student_is_hard_n_itc() -> None:
    inp = teacher_inputs(same=True)
    assert run("kd_interactive", inp).item() == pytest.approx(run("n_itc", inp, alpha=0.0).item(), rel=1e-5)


def test_kd_hidden() -> None:
    h = {"text.3": torch.randn(6, 5, 4), "image.1": torch.randn(6, 7, 4)}
    inp = make_inputs(student_hidden=h, teacher_hidden={k: v.clone() for k, v in h.items()})
    assert run("kd_hidden", inp).item() == pytest.approx(0.0)
    assert run("kd_hidden", inp, normalize=True).item() == pytest.approx(0.0, abs=1e-6)

    teacher = {"text.3": torch.randn(6, 5, 6), "image.1": torch.randn(6, 7, 6)}
    widths = {"text.3": (4, 6), "image.1": (4, 6)}
    spec = {"kd_hidden": {"layers": ["text.3"]}}
    mods = make_modules(spec, embed_dim=D, num_classes=0, teacher_dim=None, hidden_widths=widths)
    assert list(mods) == [hidden_proj_key("text.3")] == ["kd_hidden_proj_text_3"]
    inp = make_inputs(student_hidden=h, teacher_hidden=teacher, modules=dict(mods))
    proj = mods[hidden_proj_key("text.3")]
    expected = F.mse_loss(proj(h["text.3"]), teacher["text.3"])
    assert run("kd_hidden", inp, layers=["text.3"]).item() == pytest.approx(expected.item(), rel=1e-6)
    with pytest.raises(ConfigError, match="no hidden state shared"):
        run("kd_hidden", make_inputs(student_hidden={"a": h["text.3"]}, teacher_hidden={"b": h["text.3"]}))


# ------------------------------------------------------------------------------------------------ registry / LossSet


def test_unknown_loss_lists_valid_names() -> None:
    with pytest.raises(ConfigError, match="unknown loss 'nitc'") as err:
        LossSet({"nitc": {"weight": 1.0}})
    for name in ("n_itc", "r_itc", "c_itc", "ss_i", "mvs_i", "kd_feature"):
        assert name in str(err.value)
    with pytest.raises(ConfigError):
        loss_needs("nope")


def test_bad_params_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"losses\.n_itc\.alpah: unknown parameter .*allowed: weight, alpha"):
        LossSet({"n_itc": {"alpah": 0.3}})
    with pytest.raises(ConfigError, match=r"losses\.n_itc\.alpha: .*got 2\.0"):
        LossSet({"n_itc": {"alpha": 2.0}})
    with pytest.raises(ConfigError, match=r"losses\.id\.scale: unknown parameter"):
        LossSet({"id": {"scale": 3}})
    with pytest.raises(ConfigError, match=r"losses\.r_itc\.weight"):
        LossSet({"r_itc": {"weight": "heavy"}})
    with pytest.raises(ConfigError):
        LossSet({})


def test_missing_input_is_reported() -> None:
    with pytest.raises(ConfigError, match="mvs_i.*image_mvs"):
        LossSet({"mvs_i": {}})(make_inputs())
    with pytest.raises(ConfigError, match="kd_affinity.*teacher"):
        LossSet({"kd_affinity": {}})(make_inputs())


def test_register_duplicate_rejected() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_loss("n_itc")(lambda inputs: {})


def test_lossset_total_is_weighted_sum_and_gradients_finite() -> None:
    spec = {
        "n_itc": {"weight": 0.5},
        "mvs_i": {"weight": 0.5},
        "r_itc": {"weight": 1.0},
        "c_itc": {"weight": 0.1},
        "ss_i": {"weight": 0.4},
        "sdm": {"weight": 0.3},
        "id": {"weight": 0.2},
        "itc": {"weight": 0.7},
        "kd_feature": {"weight": 1.5},
        "kd_affinity": {"weight": 2.0},
        "kd_interactive": {"weight": 0.6},
    }
    losses = LossSet(spec)
    assert losses.names == list(spec)
    assert "teacher" in losses.needs and "image_mvs" in losses.needs
    mods = make_modules(losses, embed_dim=D, num_classes=3, teacher_dim=16)
    assert tuple(mods["ssl_head"][0].weight.shape) == (D // 4, D)
    image = unit(6, seed=1).requires_grad_()
    text = unit(6, seed=2).requires_grad_()
    scale = torch.tensor(math.log(1 / 0.07), requires_grad=True)
    inp = LossInputs(
        image=image,
        text=text,
        pids=PIDS,
        logit_scale=scale,
        image_mvs=unit(6, seed=3),
        ssl_a=torch.randn(6, D),
        ssl_b=torch.randn(6, D),
        progress=0.4,
        modules=dict(mods),
        teacher_image=unit(6, 16, seed=9),
        teacher_text=unit(6, 16, seed=10),
    )
    total, terms = losses(inp)
    assert set(terms) == {f"{n}_loss" for n in spec}
    assert all(not v.requires_grad for v in terms.values())
    expected = sum(spec[n]["weight"] * terms[f"{n}_loss"] for n in spec)
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    total.backward()
    for g in (image.grad, text.grad, scale.grad, *(p.grad for p in mods.parameters())):
        assert g is not None and torch.isfinite(g).all()


def test_ssl_head_default_is_quarter_width() -> None:
    mods = make_modules({"ss_i": {}}, embed_dim=512, num_classes=0, teacher_dim=None)
    assert [m.weight.shape for m in mods["ssl_head"] if hasattr(m, "weight")] == [(128, 512), (512, 128)]
    mods = make_modules({"ss_i": {"head_hidden": 64}}, embed_dim=512, num_classes=0, teacher_dim=None)
    assert mods["ssl_head"][0].out_features == 64


def test_half_precision_inputs_give_float32_losses() -> None:
    inp = make_inputs(image=unit(6, seed=1).bfloat16(), text=unit(6, seed=2).bfloat16())
    total, _ = LossSet({"n_itc": {}, "r_itc": {}, "c_itc": {}})(inp)
    assert total.dtype == torch.float32 and torch.isfinite(total)


def test_list_losses_has_everything() -> None:
    names = set(list_losses())
    assert {"n_itc", "mvs_i", "r_itc", "sdm", "c_itc", "ss_i", "id", "itc"} <= names
    assert {"kd_feature", "kd_affinity", "kd_interactive", "kd_hidden"} <= names
