"""Data parallelism over processes (torch DistributedDataParallel), as launched by torchrun.

    torchrun --nproc_per_node=K -m zigspark train-generator --batch-size B ...

torchrun starts K processes with RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT set; each joins
the process group through env:// (NCCL on CUDA, Gloo on the CPU) and drives one device (cuda:LOCAL_RANK).
The global batch of B images is split into K slices of B/K; DDP averages the gradients over the slices, so
a step equals a single-process step on the whole global batch (up to the order of floating-point sums).
Every rank draws the same seeds, so replicas start, and stay, identical; only rank 0 writes files and prints.
Without WORLD_SIZE (a plain `python -m zigspark ...`) everything runs in one process with no process group.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: rank in [0, world_size), its device, and whether it writes (rank 0)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    """True when the environment describes a multi-process launch (torchrun or an equivalent)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _env_int(name: str) -> int:
    value = os.environ.get(name)
    if value is None:
        raise RuntimeError(f"WORLD_SIZE > 1 but {name} is not set: launch with torchrun, which sets RANK, "
                           f"LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT")
    return int(value)


def init_distributed(device: Optional[str] = None, backend: Optional[str] = None,
                     timeout_s: float = 600.0) -> DistContext:
    """Join the process group described by the environment, or return a single-process context.

    Args:
        device: "cpu", "cuda" or None (CUDA when available). Under torchrun with CUDA, rank r uses
            cuda:LOCAL_RANK.
        backend: process-group backend; default "nccl" on CUDA, "gloo" on the CPU.
        timeout_s: how long collectives wait for a missing rank before failing.
    """
    device_type = torch.device(device).type if device else ("cuda" if torch.cuda.is_available() else "cpu")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but torch sees no CUDA device; use --device cpu")
    if dist.is_available() and dist.is_initialized():
        return current_context(device_type)
    if not launched_by_torchrun():
        return DistContext(device=torch.device(device) if device else torch.device(device_type))
    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed; run a single process")
    rank, world, local_rank = _env_int("RANK"), _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK")
    if device_type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA device(s): "
                             f"use --nproc_per_node <= {torch.cuda.device_count()}")
        torch.cuda.set_device(local_rank)
    backend = backend or ("nccl" if device_type == "cuda" else "gloo")
    kwargs = {"backend": backend, "init_method": "env://", "rank": rank, "world_size": world,
              "timeout": datetime.timedelta(seconds=timeout_s)}
    if device_type == "cuda" and backend == "nccl":
        kwargs["device_id"] = torch.device("cuda", local_rank)   # binds NCCL to our GPU at once
    dist.init_process_group(**kwargs)
    return current_context(device_type)


def current_context(device_type: Optional[str] = None) -> DistContext:
    """The context of an already-initialised process group (or the single-process one)."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistContext(device=torch.device(device_type or ("cuda" if torch.cuda.is_available() else "cpu")))
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if device_type is None:
        device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
    device = torch.device("cuda", local_rank) if device_type == "cuda" else torch.device("cpu")
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, device=device)


def shutdown() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def wrap_model(model: torch.nn.Module, ctx: DistContext) -> torch.nn.Module:
    """DistributedDataParallel(model) when running on several processes, else the model itself.

    DDP broadcasts rank 0's weights at construction, so the replicas start identical however they were
    initialised.
    """
    if not ctx.distributed:
        return model
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def all_reduce_mean(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """The mean of `tensor` over ranks (the tensor itself on one process); returns a new tensor."""
    if not ctx.distributed:
        return tensor
    out = tensor.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / ctx.world_size


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


def broadcast_flag(flag: bool, ctx: DistContext) -> bool:
    """Rank 0's boolean, on every rank (e.g. whether a checkpoint exists to resume from)."""
    if not ctx.distributed:
        return flag
    t = torch.tensor([1 if flag else 0], device=ctx.device)
    dist.broadcast(t, src=0)
    return bool(t.item())
