"""Distributed helpers: global-gradient gathering matches single-process training on the concatenated batch."""

from __future__ import annotations

import copy
import math
import os
import socket

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp
import torch.nn.functional as F

from tbps_compress import distributed as dist
from tbps_compress.losses import LossInputs, LossSet

WORLD = 2
BATCH = 8  # global; 4 per rank
SPEC = {"n_itc": {"weight": 1.0}, "r_itc": {"weight": 1.0}, "c_itc": {"weight": 0.1}, "itc": {"weight": 0.3}}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model() -> tuple[torch.nn.Linear, torch.nn.Linear, torch.nn.Parameter]:
    torch.manual_seed(0)
    return torch.nn.Linear(6, 4), torch.nn.Linear(6, 4), torch.nn.Parameter(torch.tensor(math.log(10.0)))


def _data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    pids = torch.tensor([0, 1, 2, 3, 0, 1, 4, 4])  # identities shared across the two ranks' halves
    return torch.randn(BATCH, 6, generator=g), torch.randn(BATCH, 6, generator=g), pids


def _forward(enc_i, enc_t, x_img, x_txt):
    img = F.normalize(enc_i(x_img), dim=-1)
    txt = F.normalize(enc_t(x_txt), dim=-1)
    img.retain_grad()
    txt.retain_grad()
    return img, txt


def _worker(rank: int, world: int, port: int) -> None:
    torch.set_num_threads(1)
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    assert dist.setup_from_env(backend="gloo")
    try:
        assert dist.is_dist() and dist.rank() == rank and dist.world_size() == world
        assert dist.is_main() == (rank == 0)
        enc_i, enc_t, scale = _model()
        ref_i, ref_t, ref_scale = copy.deepcopy(enc_i), copy.deepcopy(enc_t), copy.deepcopy(scale)
        x_img, x_txt, pids = _data()
        losses = LossSet(SPEC)

        # distributed: local rows, gathered columns with gradient
        b = BATCH // world
        sl = slice(rank * b, (rank + 1) * b)
        img, txt = _forward(enc_i, enc_t, x_img[sl], x_txt[sl])
        inputs = LossInputs(
            image=img,
            text=txt,
            pids=pids[sl],
            logit_scale=scale,
            all_image=dist.all_gather_with_grad(img),
            all_text=dist.all_gather_with_grad(txt),
            all_pids=dist.all_gather_nograd(pids[sl]),
            progress=0.5,
        )
        assert torch.equal(inputs.all_pids, pids)
        total, _ = losses(inputs)
        total.backward()
        params = [enc_i.weight, enc_i.bias, enc_t.weight, enc_t.bias, scale]
        for p in params:  # what DDP does: average parameter gradients over ranks
            tdist.all_reduce(p.grad)
            p.grad /= world
        dist.barrier()

        # single process on the concatenated batch (the dist helpers are not consulted without all_*)
        r_img, r_txt = _forward(ref_i, ref_t, x_img, x_txt)
        ref_total, _ = losses(LossInputs(image=r_img, text=r_txt, pids=pids, logit_scale=ref_scale, progress=0.5))
        ref_total.backward()

        # global loss = mean of the per-rank losses
        all_totals = dist.all_gather_nograd(total.detach().view(1))
        torch.testing.assert_close(all_totals.mean(), ref_total.detach(), rtol=1e-5, atol=1e-6)
        # parameter gradients (DDP-averaged) equal the single-process gradients
        refs = [ref_i.weight, ref_i.bias, ref_t.weight, ref_t.bias, ref_scale]
        for p, r in zip(params, refs, strict=True):
            torch.testing.assert_close(p.grad, r.grad, rtol=1e-4, atol=1e-6)
        # local feature gradients sum every rank's loss: world_size x the single-process (mean) gradient
        torch.testing.assert_close(img.grad, world * r_img.grad[sl], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(txt.grad, world * r_txt.grad[sl], rtol=1e-4, atol=1e-6)

        # uneven local batch sizes: rank r contributes r + 1 rows
        x = torch.full((rank + 1, 2), float(rank), requires_grad=True)
        gathered = dist.all_gather_with_grad(x)
        assert gathered.shape == (3, 2)
        torch.testing.assert_close(gathered[:, 0], torch.tensor([0.0, 1.0, 1.0]))
        weights = torch.arange(6.0).view(3, 2)
        (gathered * weights).sum().backward()
        start = 0 if rank == 0 else 1
        torch.testing.assert_close(x.grad, world * weights[start : start + rank + 1])
    finally:
        dist.cleanup()


@pytest.mark.timeout(120)
def test_global_gradients_match_single_process() -> None:
    mp.spawn(_worker, args=(WORLD, _free_port()), nprocs=WORLD, join=True)


def test_single_process_fallbacks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not dist.is_dist()
    assert dist.setup_from_env() is False
    assert dist.rank() == 0 and dist.world_size() == 1 and dist.is_main()
    dist.barrier()
    dist.cleanup()
    x = torch.randn(3, 2, requires_grad=True)
    assert dist.all_gather_with_grad(x) is x
    y = dist.all_gather_nograd(x)
    assert torch.equal(y, x) and not y.requires_grad
