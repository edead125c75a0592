"""DDP plumbing: the process group from torchrun's environment, and the few collectives the trainer
and the methods need (each a no-op in a single process)."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn


def setup_distributed(device_name: str = "auto") -> tuple[int, int, torch.device]:
    """(rank, world_size, device). Initialises the process group from torchrun's environment."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_name == "auto":
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    if device_name == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device(device_name)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    return rank, world, device


def is_distributed() -> bool:
    """More than one rank in an initialised process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over the ranks (unchanged in a single process); returns ``tensor``."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_buffers(model: nn.Module) -> None:
    # DDP broadcasts rank 0's BN running statistics at the start of every training forward, so after
    # the last step each rank holds its own; evaluate and save rank 0's everywhere.
    if is_distributed():
        for buffer in model.buffers():
            dist.broadcast(buffer, 0)


def broadcast_object(obj, world: int):
    """Rank 0's ``obj`` on every rank (as it is with one rank)."""
    if world <= 1:
        return obj
    objects = [obj]
    dist.broadcast_object_list(objects, 0)
    return objects[0]


def all_gather_objects(obj, world: int) -> list:
    """Every rank's ``obj``, in rank order."""
    if world == 1:
        return [obj]
    gathered = [None] * world
    dist.all_gather_object(gathered, obj)
    return gathered
