"""Processes: the one `Accelerator` of every training job, and the collectives of the contrastive loss.

`make_accelerator` sees the launch the same way under torchrun and `accelerate launch`, on CPU and GPU
(see there). `accelerator.gather` (like `torch.distributed.all_gather`) returns tensors cut off from autograd, so
the features of the other processes would be constants and each process would only learn from its
own rows of the similarity matrix. `gather_with_grad` sends the gradient of every gathered row back
to the process that produced it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import Tensor

from vlm.distributed import dist_info, launched_without_device

if TYPE_CHECKING:
    from accelerate import Accelerator

__all__ = [
    "make_accelerator",
    "resolve_mixed_precision",
    "Gathered",
    "gather_with_grad",
    "world_size",
    "rank",
    "all_reduce_mean",
    "all_reduce_sums",
]

logger = logging.getLogger(__name__)


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """The number of processes (`vlm.distributed.dist_info`: the process group, else the launcher's
    environment, else 1)."""
    return dist_info()[1]


def rank() -> int:
    """This process's rank (`vlm.distributed.dist_info`), 0 in a single process."""
    return dist_info()[0]


def resolve_mixed_precision(requested: str) -> str:
    """The precision accelerate should use for `requested` ("auto": bf16 or fp16 on a GPU, fp32 on CPU)."""
    has_gpu = torch.cuda.is_available()
    if requested == "auto":
        return ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if has_gpu else "no"
    if requested == "fp16" and not has_gpu:
        raise ValueError("mixed_precision=fp16 needs a GPU; on CPU use mixed_precision=no (or auto)")
    if requested == "bf16" and not has_gpu:
        logger.warning("mixed_precision=bf16 on CPU: bf16 matrix products are far slower than fp32 on most CPUs")
    return requested


def make_accelerator(mixed_precision: str) -> "Accelerator":
    """The `accelerate.Accelerator` of a training job with `mixed_precision` ("auto": bf16 or fp16 on a GPU,
    none on CPU); ValueError for fp16 without a GPU. Imports accelerate when called.

    Launched processes are seen the same way under torchrun and `accelerate launch`: accelerate alone
    takes torchrun's processes on a machine without a GPU for independent single-process runs (unless
    ACCELERATE_USE_CPU is set), so every rank would log, save and step as the main process.
    """
    from accelerate import Accelerator

    from .fsdp import enable_on_cpu  # here: training.fsdp imports this module

    accelerator = Accelerator(
        mixed_precision=resolve_mixed_precision(mixed_precision),
        cpu=launched_without_device(),
        # The schedule counts optimiser steps; accelerate would otherwise step it once per process.
        step_scheduler_with_optimizer=False,
    )
    enable_on_cpu(accelerator)
    return accelerator


@dataclass
class Gathered:
    """The rows of every process, in process order, and where this process's rows start."""

    features: Tensor  # (N_global, E)
    offset: int  # first row of this process in `features`
    count: int  # rows this process contributed
    world_size: int


class _AllGather(torch.autograd.Function):
    """Forward: concatenate every process's rows (sizes may differ). Backward: sum the gradient of
    the full matrix over processes, then keep this process's rows."""

    @staticmethod
    def forward(ctx, x: Tensor, sizes: list[int], offset: int) -> Tensor:
        padded = x.new_zeros((max(sizes), *x.shape[1:]))
        padded[: len(x)] = x
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.contiguous())
        ctx.rows = (offset, len(x))
        return torch.cat([p[:n] for p, n in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        # Every process's loss may depend on our rows: their gradients add up.
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        offset, n = ctx.rows
        return grad[offset : offset + n], None, None


def _sizes(n: int, device: torch.device) -> list[int]:
    local = torch.tensor([n], device=device, dtype=torch.long)
    parts = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, local)
    return [int(p) for p in parts]


def gather_with_grad(x: Tensor) -> Gathered:
    """Every process's rows of `x` (N_local, ...) concatenated, with gradients flowing back.

    One process: `x` itself. Processes may hold different numbers of rows (a batch that lost bad
    samples); every process must call this, in the same order.
    """
    if not _active():
        return Gathered(x, 0, len(x), 1)
    sizes = _sizes(len(x), x.device)
    offset = sum(sizes[: dist.get_rank()])
    return Gathered(_AllGather.apply(x, sizes, offset), offset, len(x), len(sizes))


def all_reduce_mean(value: Tensor) -> Tensor:
    """The mean of a tensor over processes (a copy; `value` itself one process)."""
    if not _active():
        return value.detach().clone()
    out = value.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / dist.get_world_size()


def all_reduce_sums(values: list[float], device: torch.device | str = "cpu") -> list[float]:
    """Element-wise sums of a few Python numbers over processes, in one collective."""
    if not _active():
        return [float(v) for v in values]
    t = torch.tensor(values, device=device, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()
