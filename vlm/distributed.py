"""Which process this is: the one rank and world-size rule of the library, the trainer and the indexer."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

__all__ = ["dist_info", "launched_without_device"]


def dist_info() -> tuple[int, int]:
    """(rank, world size) of this process: from the initialised `torch.distributed` process group, else
    from the launcher's environment (``RANK``, ``WORLD_SIZE``: torchrun and `accelerate launch` set them
    before any group exists, and the indexer never starts one), else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def launched_without_device() -> bool:
    """Several processes were launched and none has a device with a collective backend (MPS has none).
    accelerate alone takes such processes (torchrun's on a CPU machine) for independent single-process
    runs unless told `cpu=True`; training and the indexer both ask here."""
    if dist_info()[1] < 2:
        return False
    return not (torch.accelerator.is_available() and torch.accelerator.current_accelerator().type != "mps")
