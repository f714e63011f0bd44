"""torchrun in one place: this process's rank and world size, and joining the process group.

Training, detection and sharded embedding all start the same way under `torchrun`: `init_from_env()`
joins the group torchrun describes (WORLD_SIZE, RANK, MASTER_ADDR, ...) and returns this process's device.
Alone (no torchrun) every function here is a no-op answering rank 0 of 1.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """A process group is up."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """The process group's size when one is up, else torchrun's WORLD_SIZE (1 alone)."""
    # The environment answers too, so a caller can ask before the group is up or after it is destroyed.
    return dist.get_world_size() if is_distributed() else int(os.environ.get("WORLD_SIZE", 1))


def rank() -> int:
    """This process's rank in the group when one is up, else torchrun's RANK (0 alone)."""
    return dist.get_rank() if is_distributed() else int(os.environ.get("RANK", 0))


def init_from_env(device: str | torch.device | None = None) -> torch.device:
    """Join torchrun's process group (when WORLD_SIZE > 1 and none is up yet) and return this process's device.

    `device` None means CUDA when available, else CPU. On CUDA, torchrun's LOCAL_RANK picks the GPU (one
    per process) and makes it current; an explicit `device` is kept when LOCAL_RANK is not set. The
    backend is nccl on CUDA and gloo on CPU.
    """
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda" and (device is None or "LOCAL_RANK" in os.environ):
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(dev)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and dist.is_available() and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return dev
