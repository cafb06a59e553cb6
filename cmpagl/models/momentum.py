"""Momentum (EMA) encoders and the feature queues of ITC (METHOD.md §1.3).

The momentum encoders are slowly moving copies of the online encoders; their embeddings of past
batches wait in a queue, so ITC compares each sample against many more than one batch (the
paper's Fig. 5: ITC looks at "more samples ... from a global perspective"). Image ids travel
with the queued features, so a queued caption of the same image counts as a positive.
``torch.distributed`` is touched only when the world size is above 1.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn


def world_size() -> int:
    """Number of processes, 1 when not running distributed."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@torch.no_grad()
def gather_across_ranks(x: Tensor) -> Tensor:
    """``[B, ...]`` -> ``[world·B, ...]``, rank order; the input itself when single-process."""
    if world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def momentum_copy(module: nn.Module) -> nn.Module:
    """A frozen deep copy of ``module`` that :func:`ema_update` keeps following it."""
    twin = copy.deepcopy(module)
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin


@torch.no_grad()
def ema_update(online: Sequence[nn.Module], momentum: Sequence[nn.Module], m: float) -> None:
    """θ_m ← m·θ_m + (1 − m)·θ for every parameter pair (buffers are copied).

    One multi-tensor ``lerp`` over all pairs (θ_m + (1 − m)(θ − θ_m), the same update) instead
    of two small ops per tensor: the twins hold a few hundred tensors, and on the CPU the
    per-op overhead, not the arithmetic, was the cost.
    """
    params, params_m, buffers, buffers_m = [], [], [], []
    for src, dst in zip(online, momentum, strict=True):
        for p, p_m in zip(src.parameters(), dst.parameters(), strict=True):
            params.append(p.detach())
            params_m.append(p_m)
        for b, b_m in zip(src.buffers(), dst.buffers(), strict=True):
            buffers.append(b)
            buffers_m.append(b_m)
    if params:
        torch._foreach_lerp_(params_m, params, 1.0 - m)
    if buffers:
        torch._foreach_copy_(buffers_m, buffers)


class FeatureQueue(nn.Module):
    """A ring buffer of ``size`` momentum image and text embeddings with their image ids.

    Empty slots hold id ``-1``; :meth:`contents` leaves them out, so a queue that is still
    filling up adds no fake negatives to the ITC softmax.
    """

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        if size < 0:
            raise ValueError(f"queue size must be >= 0, got {size}")
        self.size = size
        self.register_buffer("image", torch.zeros(size, dim))
        self.register_buffer("text", torch.zeros(size, dim))
        self.register_buffer("ids", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, image: Tensor, text: Tensor, ids: Tensor) -> None:
        """Add ``[B, D]`` image/text embeddings and ``[B]`` ids of every rank, oldest out."""
        if self.size == 0:
            return
        image, text, ids = (gather_across_ranks(x) for x in (image, text, ids))
        n = min(image.shape[0], self.size)
        # Under autocast the embeddings arrive in bf16/fp16; the queue stays float32.
        image, text, ids = image[-n:].to(self.image.dtype), text[-n:].to(self.text.dtype), ids[-n:]
        slots = (self.ptr + torch.arange(n, device=self.ptr.device)) % self.size
        self.image[slots], self.text[slots], self.ids[slots] = image, text, ids
        self.ptr.copy_((self.ptr + n) % self.size)

    def contents(self) -> tuple[Tensor, Tensor, Tensor]:
        """The filled slots: image ``[Q', D]``, text ``[Q', D]``, ids ``[Q']``."""
        keep = self.ids >= 0
        return self.image[keep], self.text[keep], self.ids[keep]
