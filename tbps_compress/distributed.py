"""Distributed helpers: process-group setup from torchrun's environment and feature gathering.

``all_gather_with_grad`` implements TBPS-CLIP's "global gradients": every rank's loss sees the whole batch as
columns, and in backward the gradient arriving at the gathered tensor is summed over ranks (all_reduce) before
this rank keeps its own slice. With each rank's loss the mean over its own rows and DDP averaging parameter
gradients, the parameter update equals the single-process gradient on the concatenated batch.

Every function degrades to the single-process answer when ``torch.distributed`` is unavailable or not
initialised.
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta

import torch
import torch.distributed as tdist
from torch import Tensor

logger = logging.getLogger(__name__)


def is_dist() -> bool:
    """True when a process group is initialised."""
    return tdist.is_available() and tdist.is_initialized()


def rank() -> int:
    return tdist.get_rank() if is_dist() else 0


def world_size() -> int:
    return tdist.get_world_size() if is_dist() else 1


def local_rank() -> int:
    """This process's index on its node (``LOCAL_RANK`` from torchrun), 0 when not launched by torchrun."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """True on rank 0 (and when not distributed)."""
    return rank() == 0


def barrier() -> None:
    if is_dist():
        tdist.barrier()


def setup_from_env(backend: str | None = None, timeout_s: float = 1800.0) -> bool:
    """Initialise the default process group from torchrun's variables (RANK, WORLD_SIZE, MASTER_ADDR, ...).

    Returns True when running distributed (world size > 1 or a group already exists), False for a plain
    single-process run. ``backend`` defaults to nccl when CUDA is available, else gloo. With CUDA the current
    device is set to ``LOCAL_RANK``.
    """
    if is_dist():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not tdist.is_available():
        return False
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
    tdist.init_process_group(backend=backend, init_method="env://", timeout=timedelta(seconds=timeout_s))
    logger.info("distributed: rank %d of %d, backend %s", rank(), world_size(), backend)
    return True


def cleanup() -> None:
    """Destroy the process group if one exists."""
    if is_dist():
        tdist.destroy_process_group()


def _gather_sizes(x: Tensor) -> list[int]:
    size = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
    sizes = [torch.zeros_like(size) for _ in range(world_size())]
    tdist.all_gather(sizes, size)
    return [int(s.item()) for s in sizes]


def _gather(x: Tensor) -> tuple[Tensor, list[int]]:
    """All-gather along dim 0; local batch sizes may differ between ranks (padded to the largest)."""
    x = x.contiguous()
    sizes = _gather_sizes(x)
    biggest = max(sizes)
    if x.shape[0] < biggest:
        pad = x.new_zeros((biggest - x.shape[0], *x.shape[1:]))
        x = torch.cat([x, pad], dim=0)
    parts = [torch.empty_like(x) for _ in sizes]
    tdist.all_gather(parts, x)
    return torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)], dim=0), sizes


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        out, sizes = _gather(x)
        start = sum(sizes[: rank()])
        ctx.bounds = (start, start + sizes[rank()])
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        tdist.all_reduce(grad, op=tdist.ReduceOp.SUM)
        start, end = ctx.bounds
        return grad[start:end]


def all_gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` from all ranks along dim 0 (rank order), keeping the autograd graph.

    Backward sums the incoming gradient over ranks and returns this rank's slice. Identity when not distributed.
    """
    if world_size() == 1:
        return x
    return _AllGatherWithGrad.apply(x)


@torch.no_grad()
def all_gather_nograd(x: Tensor) -> Tensor:
    """Concatenate ``x`` from all ranks along dim 0 (rank order), without gradient. Identity when not distributed."""
    if world_size() == 1:
        return x.detach()
    return _gather(x.detach())[0]
