"""Device selection and torchrun / DistributedDataParallel set-up, in one place."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


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


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums the gradients of every rank and returns each rank its own slice."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.contiguous()
        gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, tensor)
        ctx.rank, ctx.batch = dist.get_rank(), tensor.shape[0]
        return torch.cat(gathered, dim=0)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)  # every rank's loss depends on every slice
        return grad[ctx.rank * ctx.batch:(ctx.rank + 1) * ctx.batch]


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` [b, ...] from every rank into [world·b, ...], keeping the gradient path.

    Every rank must hold the same b (the training sampler guarantees it).  Every rank then computes the
    same global loss ``L`` over all N·b samples.  The backward sums, over all ranks, the gradients
    reaching each slice and gives the sum to the slice's owner, so rank r receives ``N · ∂L/∂x_r`` for its own features; DDP's gradient
    average (sum over ranks / N) then gives exactly ``∂L/∂θ`` of one process with batch N·b: no extra
    scaling of the loss is needed (tests/test_distributed.py checks this against a single process).
    Gathering without gradients and keeping only the local slice's graph (open_clip's
    ``gather_with_grad=False``) would instead give ``∂L/∂θ / N``.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    return _AllGatherWithGrad.apply(tensor)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def wrap_model(model: nn.Module, env: DistributedEnv) -> nn.Module:
    """DistributedDataParallel over ``model`` in a multi-process run, else the model itself.

    Call it again after changing which parameters require gradients (FashionIQ's vision freezing): DDP
    registers its gradient hooks on the parameters that require gradients when it is built.
    """
    if not env.is_distributed:
        return model
    device_ids = [env.device.index] if env.device.type == "cuda" else None
    return DistributedDataParallel(unwrap_model(model), device_ids=device_ids)


def any_rank(flag: bool, env: DistributedEnv) -> bool:
    """True on every rank if ``flag`` is True on any (e.g. a pre-emption signal seen by one process)."""
    if not env.is_distributed:
        return flag
    tensor = torch.tensor([float(flag)], device=env.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def barrier(env: DistributedEnv) -> None:
    """Wait for every rank (no-op in a single process)."""
    if env.is_distributed:
        dist.barrier()


def cleanup_distributed() -> None:
    """Destroy the process group, if one was started."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
