"""Device selection and torchrun / DistributedDataParallel set-up, in one place."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistributedEnv:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_master(self) -> bool:
        return self.rank == 0


def init_distributed(device: str | None = None) -> DistributedEnv:
    """Read torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE) and start the process group.

    ``device`` None picks CUDA when available (one GPU per local rank), else CPU; the backend is nccl on
    CUDA and gloo on CPU.  A plain ``python`` launch is a world of one and starts no process group.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_device = torch.device(device)
    if torch_device.type == "cuda":
        index = local_rank if torch_device.index is None else torch_device.index
        torch_device = torch.device("cuda", index)
        torch.cuda.set_device(torch_device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch_device.type == "cuda" else "gloo")
    return DistributedEnv(rank=rank, local_rank=local_rank, world_size=world_size, device=torch_device)


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` [b, ...] from every rank into [world·b, ...], keeping the gradient path.

    Every rank then computes the same global loss ``L`` over all N·b samples.  The backward of
    ``torch.distributed.nn.all_gather`` sums, over all ranks, the gradients reaching each slice and sends
    the sum to the slice's owner, so rank r receives ``N · ∂L/∂x_r`` for its own features; DDP's gradient
    average (sum over ranks / N) then gives exactly ``∂L/∂θ`` of one process with batch N·b: no extra
    scaling of the loss is needed (tests/test_distributed.py checks this against a single process).
    Gathering without gradients and keeping only the local slice's graph (open_clip's
    ``gather_with_grad=False``) would instead give ``∂L/∂θ / N``.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    from torch.distributed import nn as dist_nn  # imported lazily: needs an initialised process group

    return torch.cat(dist_nn.all_gather(tensor), dim=0)


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
