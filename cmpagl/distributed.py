"""Processes for training: one, or several launched by ``torchrun`` (gloo on the CPU, NCCL on
GPUs). Gradients are averaged in flat buckets, rank 0's weights are broadcast at the start, and
small Python objects (per-rank RNG states for a checkpoint) are gathered.

Nothing here touches ``torch.distributed`` when the world size is 1.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from cmpagl.config import ConfigError, TrainConfig

__all__ = [
    "Dist",
    "all_reduce_gradients",
    "broadcast_model",
    "gather_objects",
    "pick_device",
    "setup_processes",
]


@dataclass
class Dist:
    """Where this process runs: rank, world size and device."""

    rank: int = 0
    world: int = 1
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False  # initialised here, so destroyed here

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def pick_device(name: str) -> torch.device:
    """``train.device``: ``auto`` is the GPU where torch sees one, else the CPU.

    Raises:
        ConfigError: a CUDA device torch does not see (no GPU, or an index past the last).
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        _check_cuda(device.index or 0, f"train.device={name}")
    return device


def _check_cuda(index: int, what: str) -> None:
    count = torch.cuda.device_count()  # 0 without CUDA
    if index >= count:
        raise ConfigError(
            f"{what} needs CUDA device {index}, but torch sees {count} "
            "(use train.device=cpu, or fewer processes than GPUs)",
            key="train.device",
        )


def setup_processes(cfg: TrainConfig) -> Dist:
    """Join the process group when launched by ``torchrun`` (WORLD_SIZE > 1), else nothing."""
    device = pick_device(cfg.device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(device=device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        _check_cuda(local_rank, f"torchrun process with LOCAL_RANK={local_rank}")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank=rank, world=world, device=device, owns_group=owns)


@torch.no_grad()
def all_reduce_gradients(
    params: list[nn.Parameter], world: int, bucket_numel: int = 1 << 25
) -> None:
    """Average ``.grad`` over processes (sum / world); nothing when ``world == 1``.

    A parameter without a gradient on some process (a loss term that had nothing to work on)
    counts as zero there; one with no gradient anywhere keeps ``grad = None``, as in a single
    process. Gradients travel in flat buckets: a few large collectives, not hundreds of small.
    """
    if world == 1 or not params:
        return
    has = torch.tensor(
        [p.grad is not None for p in params], dtype=torch.int32, device=params[0].device
    )
    dist.all_reduce(has)
    todo = [p for p, n in zip(params, has.tolist(), strict=True) if n > 0]
    for p in todo:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    for bucket in _buckets(todo, bucket_numel):
        flat = torch.cat([p.grad.reshape(-1) for p in bucket])
        dist.all_reduce(flat)
        flat.div_(world)
        offset = 0
        for p in bucket:
            p.grad.copy_(flat[offset : offset + p.numel()].view_as(p.grad))
            offset += p.numel()


def _buckets(params: list[nn.Parameter], max_numel: int) -> Iterator[list[nn.Parameter]]:
    """Consecutive runs of parameters of one dtype and device, at most ``max_numel`` each."""
    bucket: list[nn.Parameter] = []
    size = 0
    for p in params:
        if bucket and (
            size + p.numel() > max_numel
            or p.grad.dtype != bucket[0].grad.dtype
            or p.device != bucket[0].device
        ):
            yield bucket
            bucket, size = [], 0
        bucket.append(p)
        size += p.numel()
    if bucket:
        yield bucket


@torch.no_grad()
def broadcast_model(model: nn.Module, ctx: Dist) -> None:
    """Every process starts from rank 0's weights (identical seeds should give them anyway)."""
    if ctx.world > 1:
        for tensor in model.state_dict().values():
            dist.broadcast(tensor, src=0)


def gather_objects(obj: Any, ctx: Dist) -> list[Any]:
    if ctx.world == 1:
        return [obj]
    out: list[Any] = [None] * ctx.world
    dist.all_gather_object(out, obj)
    return out
