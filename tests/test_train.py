"""The teacher trainer: gradient caching, resume determinism, global gradients across processes, the artifact a run
writes, and its user-facing checks."""

from __future__ import annotations

import copy
import csv
import json
import os
import random
import signal
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from tbps_compress import distributed as dist
from tbps_compress.artifacts import open_artifact
from tbps_compress.config import load_recipe
from tbps_compress.data.loader import identity_subset
from tbps_compress.engine.train import Interrupted, LossInputProvider, Progress, Trainer, lr_at
from tbps_compress.errors import CheckpointError, ConfigError, UserError
from tbps_compress.models.meta import meta_of
from tbps_compress.recipes import TrainRecipe

ALL_LOSSES = {"n_itc": {"weight": 0.5}, "mvs_i": {"weight": 0.5}, "ss_i": {"weight": 0.4}, "r_itc": {"weight": 1.0},
              "c_itc": {"weight": 0.1}, "id": {"weight": 0.3}}
METRIC_KEYS = {"R1", "R5", "R10", "mAP", "mINP"}


def _named_params(tr: Trainer) -> list[tuple[str, torch.nn.Parameter]]:
    return list(tr.model.named_parameters()) + [(f"heads.{n}", p) for n, p in tr.heads.named_parameters()]


def _grads(tr: Trainer) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in _named_params(tr) if p.grad is not None}


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, str]:
    assert set(a) == set(b), set(a) ^ set(b)
    return max(((a[k] - b[k]).abs().max().item(), k) for k in a)


class _Snapshot:
    """Model, loss-head and RNG state, to replay one step under another setting."""

    def __init__(self, tr: Trainer) -> None:
        self.model = copy.deepcopy(tr.model.state_dict())
        self.heads = copy.deepcopy(tr.heads.state_dict())
        self.torch_rng = torch.get_rng_state()
        self.py_rng = random.getstate()

    def restore(self, tr: Trainer) -> None:
        tr.model.load_state_dict(self.model)
        tr.heads.load_state_dict(self.heads)
        torch.set_rng_state(self.torch_rng)
        random.setstate(self.py_rng)
        tr.optimizer.zero_grad(set_to_none=True)


def _prepared(recipe: TrainRecipe) -> Trainer:
    tr = Trainer(recipe)
    tr.prepare()
    tr.model.train()
    tr.heads.train()
    return tr


# ----------------------------------------------------------------------------------------------- gradient caching
def test_gradient_caching_equals_the_full_batch(make_train_recipe, tmp_path: Path) -> None:
    tr = _prepared(make_train_recipe(tmp_path / "out", losses=ALL_LOSSES, tricks={"text_attn_dropout": 0.0},
                                     optim={"batch_size": 8}))
    batch = next(iter(tr.loader))
    assert {"image", "image_mvs", "ssl_a", "ssl_b", "text", "pid"} <= set(batch)
    assert batch["pid"].shape == (8,)
    snap = _Snapshot(tr)
    full_terms = tr.step(batch, progress=0.5)
    full = _grads(tr)
    snap.restore(tr)
    tr.recipe.optim.grad_cache_chunk = 2
    cached_terms = tr.step(batch, progress=0.5)
    cached = _grads(tr)
    assert set(full_terms) >= {f"{k}_loss" for k in ALL_LOSSES}
    for k, v in full_terms.items():
        assert cached_terms[k] == pytest.approx(v, abs=1e-5), k
    assert any(k.startswith("heads.") for k in full), "the loss heads (SS-I MLP, ID classifier) get gradients"
    diff, name = _max_diff(full, cached)
    assert diff < 1e-5, f"{name}: {diff}"


def test_gradient_caching_replays_text_dropout(make_train_recipe, tmp_path: Path) -> None:
    """With attention dropout on, each re-embedded chunk must see the masks of its cached pass: the cached gradients
    equal those of one loss over chunk-wise embeddings computed with gradient from the same random state."""
    tr = _prepared(make_train_recipe(tmp_path / "out", losses=ALL_LOSSES, tricks={"text_attn_dropout": 0.1},
                                     optim={"batch_size": 8, "grad_cache_chunk": 2}))
    assert all(b.attn.attn_dropout == 0.1 for b in tr.model.transformer.resblocks)
    batch = next(iter(tr.loader))
    snap = _Snapshot(tr)
    tr.step(batch, progress=0.5)
    cached = _grads(tr)

    snap.restore(tr)
    keys = [k for k in ("image", "text", "image_mvs", "ssl_a", "ssl_b") if k in batch]
    parts = [tr._embed({k: batch[k][s:s + 2] for k in keys}) for s in range(0, 8, 2)]
    emb = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    loss, _ = tr._loss(emb, batch["pid"], {}, 0.5)
    loss.backward()
    reference = _grads(tr)
    diff, name = _max_diff(cached, reference)
    assert diff < 1e-5, f"{name}: {diff}"

    # the dropout is real: one un-chunked pass draws other masks and gives other text-tower gradients
    snap.restore(tr)
    tr.recipe.optim.grad_cache_chunk = None
    tr.step(batch, progress=0.5)
    other = _grads(tr)
    text = [k for k in other if k.startswith("transformer.")]
    assert max((other[k] - cached[k]).abs().max().item() for k in text) > 1e-4


# ----------------------------------------------------------------------------------------------- providers
class _FixedTarget(LossInputProvider):
    """A loss-input provider: a fixed 'teacher' embedding per batch, a student hook, random draws in its set-up."""

    student_capture = "the test provider's hook"

    def __init__(self, dim: int = 7, extra: dict[str, Any] | None = None, draw: bool = True) -> None:
        self.dim, self.extra, self.draw, self.calls = dim, extra or {}, draw, []

    def setup(self, trainer: Trainer) -> None:
        self.calls.append(("setup", trainer.model is not None, trainer.per_epoch))
        if self.draw:  # must not move the trainer's random streams
            torch.rand(100), random.random()

    def loss_module_args(self) -> dict[str, Any]:
        return {"teacher_dim": self.dim}

    def batch_inputs(self, batch: dict[str, torch.Tensor], epoch: int) -> dict[str, Any]:
        self.calls.append(("batch", epoch))
        n = batch["pid"].shape[0]
        target = torch.nn.functional.normalize(torch.ones(n, self.dim), dim=-1)
        return {"teacher_image": target, "teacher_text": target, **self.extra}

    def hook_student(self, model: torch.nn.Module, fields: dict[str, Any]) -> list:
        def hook(_m, _i, o):
            self.calls.append(("hook", tuple(o.shape)))

        return [model.visual.ln_post.register_forward_hook(hook)]


def test_loss_input_providers_feed_the_losses(make_train_recipe, tmp_path: Path) -> None:
    recipe = make_train_recipe(tmp_path / "out", losses={"n_itc": {}, "kd_feature": {}}, optim={"batch_size": 8})
    plain = Trainer(make_train_recipe(tmp_path / "o2", losses={"n_itc": {}, "kd_feature": {}}, optim={"batch_size": 8}),
                    providers=[LossInputProvider()])
    with pytest.raises(ConfigError, match="need a teacher"):
        plain.prepare()  # kd_feature without a provider of the teacher's width
    prov = _FixedTarget()
    tr = Trainer(recipe, providers=[prov])
    tr.prepare()
    assert prov.calls == [("setup", True, tr.per_epoch)]
    assert tuple(tr.heads["kd_image_proj"].weight.shape) == (7, int(tr.model.visual.proj.shape[1]))
    after = torch.get_rng_state(), random.getstate()
    ref = Trainer(recipe.model_copy(update={"output": str(tmp_path / "o3")}), providers=[_FixedTarget(draw=False)])
    ref.prepare()
    assert torch.equal(after[0], torch.get_rng_state()) and after[1] == random.getstate()
    for name, p in tr.heads.named_parameters():  # the provider's draws in its set-up did not shift the heads' init
        assert torch.equal(p, dict(ref.heads.named_parameters())[name]), name
    batch = next(iter(tr.loader))
    terms = tr.step(batch, progress=0.5)
    assert terms["kd_feature_loss"] > 0 and ("batch", 0) in prov.calls
    assert any(c[0] == "hook" for c in prov.calls), "the student hook ran on the forward pass with gradient"
    assert not tr.model.visual.ln_post._forward_hooks, "the trainer removes the provider's hooks"
    tr.recipe.optim.grad_cache_chunk = 4
    with pytest.raises(ConfigError, match="grad_cache_chunk cannot be combined with the test provider's hook"):
        tr.step(batch, progress=0.5)
    tr.recipe.optim.grad_cache_chunk = None
    bad = Trainer(recipe.model_copy(update={"output": str(tmp_path / "o4")}),
                  providers=[_FixedTarget(extra={"teacher_logits": torch.zeros(1)})])
    bad.prepare()
    with pytest.raises(TypeError, match="teacher_logits"):
        bad.step(next(iter(bad.loader)), progress=0.5)


# ----------------------------------------------------------------------------------------------- resume
class _StopAt(Progress):
    """Asks the trainer to stop (as SIGTERM would) after ``step``."""

    def __init__(self, trainer: Trainer, step: int) -> None:
        self.trainer, self.step = trainer, step

    def update(self, step: int, info: dict[str, float]) -> None:
        if step == self.step:
            self.trainer._stop_signal = signal.SIGTERM


def _log_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return [{k: v for k, v in row.items() if k != "samples_per_s"} for row in csv.DictReader(f)]


def test_resume_reproduces_the_uninterrupted_run(make_train_recipe, tmp_path: Path) -> None:
    sections: dict[str, Any] = {
        "optim": {"epochs": 2},  # 72 training captions / 16 = 4 steps per epoch
        "data": {"hard_batches": 0.5, "hard_batch_group": 4},  # half the batches from nearest captions
        "losses": {"n_itc": {"weight": 1.0}, "r_itc": {"weight": 1.0}, "mvs_i": {"weight": 0.5}},
        "tricks": {"text_attn_dropout": 0.1},
    }
    torch.use_deterministic_algorithms(False)  # a caller's setting (tests that drive prepare() directly set it)
    a = Trainer(make_train_recipe(tmp_path / "a", **sections)).run()
    assert not torch.are_deterministic_algorithms_enabled()  # the run's own setting does not leak to the caller

    recipe_b = make_train_recipe(tmp_path / "b", **sections)
    tr = Trainer(recipe_b)
    tr.progress = _StopAt(tr, 6)  # epoch 2, mid-epoch
    with pytest.raises(Interrupted, match="--resume"):
        tr.run()
    work = tmp_path / "b.ckpt"
    assert (work / "last.ckpt").is_file() and not (tmp_path / "b").exists()
    assert len(_log_rows(work / "train_log.csv")) == 6

    with pytest.raises(UserError, match="--resume"):  # a leftover checkpoint is not silently overwritten
        Trainer(recipe_b).run()

    other = json.loads(json.dumps(meta_of(tr.model).config))
    other["text_cfg"]["layers"] = 1
    other_path = tmp_path / "tiny-1-text-layer.json"
    other_path.write_text(json.dumps(other))
    with pytest.raises(CheckpointError, match="architecture"):
        Trainer(make_train_recipe(tmp_path / "b", **sections, model={"config": str(other_path)})).run(resume=True)
    assert (work / "last.ckpt").is_file()

    b = Trainer(recipe_b).run(resume=True)
    assert not work.exists(), "the checkpoint folder is cleaned up after the artifact is written"
    wa, wb = load_file(str(a / "weights.safetensors")), load_file(str(b / "weights.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    ma, mb = (json.loads((p / "metrics.json").read_text()) for p in (a, b))
    assert ma["test"] == mb["test"] and ma["val_best"] == mb["val_best"] and ma["steps"] == mb["steps"] == 8
    assert _log_rows(a / "train_log.csv") == _log_rows(b / "train_log.csv")


# ----------------------------------------------------------------------------------------------- distributed
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dist_worker(rank: int, world: int, port: int, tr: Trainer, snap: _Snapshot, batch: dict[str, torch.Tensor],
                 out_dir: str) -> None:
    """A forked rank: the parent's prepared trainer (same weights) steps on this rank's half of the batch."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    assert dist.setup_from_env(backend="gloo")
    try:
        assert dist.world_size() == world and dist.rank() == rank
        b = batch["pid"].shape[0] // world
        local = {k: v[rank * b:(rank + 1) * b] for k, v in batch.items()}
        snap.restore(tr)
        tr.step(local, progress=0.5)
        torch.save(_grads(tr), Path(out_dir) / f"global{rank}.pt")
        snap.restore(tr)
        tr.recipe.tricks.global_gradients = False
        tr.step(local, progress=0.5)
        torch.save(_grads(tr), Path(out_dir) / f"local{rank}.pt")
    finally:
        dist.cleanup()


def _relative_errors(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per tensor: max |actual - expected| / max |expected| (float32 sums in another order differ by ~1e-6)."""
    assert set(actual) == set(expected), set(actual) ^ set(expected)
    return {k: float((actual[k] - expected[k]).abs().max() / expected[k].abs().max().clamp(min=1e-12))
            for k in expected}


def _dist_launcher(_index: int, recipe_json: str, out_dir: str) -> None:
    """Runs in a fresh (spawned) process: one step on the whole batch as the reference, then two forked gloo ranks.
    Forking from the pytest process itself is unsafe once any earlier test has started autograd's worker threads;
    forking the ranks from here keeps them cheap (no re-import, no re-prepare)."""
    torch.set_num_threads(1)
    tr = _prepared(TrainRecipe.model_validate_json(recipe_json))
    batch = next(iter(tr.loader))
    snap = _Snapshot(tr)
    tr.step(batch, progress=0.5)
    torch.save(_grads(tr), Path(out_dir) / "reference.pt")
    mp.start_processes(_dist_worker, args=(2, _free_port(), tr, snap, batch, out_dir), nprocs=2, join=True,
                       start_method="fork")


def test_two_processes_with_global_gradients_match_one_process(make_train_recipe, tmp_path: Path) -> None:
    """Two gloo ranks, each stepping on half of a batch with features gathered WITH gradient, end up (after the
    trainer's all-reduce average) with the gradients of one process stepping on the whole batch."""
    recipe = make_train_recipe(tmp_path / "out", losses={"n_itc": {"weight": 1.0}, "r_itc": {"weight": 1.0}},
                               tricks={"text_attn_dropout": 0.0, "global_gradients": True}, optim={"batch_size": 8})
    mp.start_processes(_dist_launcher, args=(recipe.model_dump_json(), str(tmp_path)), nprocs=1, join=True,
                       start_method="spawn")
    reference = torch.load(tmp_path / "reference.pt", weights_only=True)
    g0, g1 = (torch.load(tmp_path / f"global{r}.pt", weights_only=True) for r in (0, 1))
    assert _max_diff(g0, g1)[0] == 0.0, "ranks must hold identical gradients after the all-reduce"
    errors = _relative_errors(g0, reference)
    worst = max(errors, key=errors.get)
    assert errors[worst] < 1e-5, f"{worst}: relative error {errors[worst]:.2e}"
    # without global gradients the other rank's features are constants: the gradients differ
    local = torch.load(tmp_path / "local0.pt", weights_only=True)
    assert max(_relative_errors(local, reference).values()) > 0.1


def test_batch_smaller_than_the_number_of_processes(make_train_recipe, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dist, "world_size", lambda: 4)
    recipe = make_train_recipe(tmp_path / "out", optim={"batch_size": 2})
    with pytest.raises(ConfigError, match=r"optim\.batch_size.*processes"):
        Trainer(recipe).run()
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------- artifact
def test_a_run_writes_a_complete_artifact(tiny_teacher_artifact: Path, train_recipe_data) -> None:
    art = open_artifact(tiny_teacher_artifact)
    assert art.stage == "train" and art.kind == "torch"
    m = art.metrics
    assert METRIC_KEYS <= set(m["test"])
    assert METRIC_KEYS <= set(m["val_best"]) and m["val_best"]["epoch"] == 1
    assert m["steps"] == 4 and m["split"] == "test" and m["parameters"]["total"] > 0
    for v in list(m["test"].values()) + [m["val_best"][k] for k in METRIC_KEYS]:
        assert 0.0 <= v <= 100.0

    recipe = load_recipe(tiny_teacher_artifact / "recipe.resolved.yaml", TrainRecipe)
    assert recipe.model_dump() == TrainRecipe.model_validate(train_recipe_data(tiny_teacher_artifact)).model_dump()

    with open(tiny_teacher_artifact / "train_log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {"step", "epoch", "loss", "n_itc_loss", "r_itc_loss", "lr", "temperature"} <= set(rows[0])
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    for i, row in enumerate(rows):
        assert float(row["loss"]) == pytest.approx(float(row["n_itc_loss"]) + float(row["r_itc_loss"]), rel=1e-4)
        assert float(row["lr"]) == pytest.approx(lr_at(i, 4, 4, recipe.optim), rel=1e-4)
    assert float(rows[0]["temperature"]) == pytest.approx(0.07, rel=1e-3)

    with pytest.raises(UserError, match="already finished"):
        Trainer(recipe).run(resume=True)


def test_train_fraction_uses_half_the_identities(make_train_recipe, tmp_path: Path, tiny_dataset: Path) -> None:
    tr = Trainer(make_train_recipe(tmp_path / "out", data={"train_fraction": 0.5}))
    tr.prepare()
    all_train = tr.dataset.split("train")
    all_ids = {r.pid for r in all_train}
    ids = {r.pid for r in tr.train_records}
    assert len(ids) == len(all_ids) // 2 and ids < all_ids
    assert len(tr.labels) == len(ids) and sorted(tr.labels.values()) == list(range(len(ids)))
    assert tr.train_records == [r for r in all_train if r.pid in ids], "whole identities, all their images"
    assert len(tr.trainset) == sum(len(r.captions) for r in tr.train_records)
    assert {r.pid for r in tr.val_records} and {r.pid for r in tr.test_records}, "eval splits are not subsampled"
    again = identity_subset(all_train, 0.5, seed=0)
    assert again == tr.train_records, "the subset is fixed by the seed"
    assert {r.pid for r in identity_subset(all_train, 0.5, seed=1)} != ids
