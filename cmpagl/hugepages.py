"""New large CPU matrices on 2 MB transparent huge pages, where Linux offers them.

A new [1,093 x 5,465] float64 matrix (48 MB, the RSICD test size) is a fresh anonymous mapping:
the first write to each of its 4 KB pages traps into the kernel, which zeroes the page, about
11,700 traps. Advised with ``MADV_HUGEPAGE``, the same matrix takes 24 traps of 2 MB each: on 2
idle cores, two such new matrices filled with a copy took 0.032 s on 4 KB pages and 0.011 s on
huge pages (``benchmarks/rerank_speed.py``, its ``floor`` rows), against 0.059 s for all of SMR.
PyTorch can do this for every allocation of a process (``THP_MEM_ALLOC_ENABLE=1``, read once
when torch starts); :func:`empty` does it for the matrices the re-rankers return, whatever the
environment.

Where the kernel has no transparent huge pages (``never``, another OS), :func:`empty` is
``torch.empty``: the same tensor, only slower to fill.
"""

from __future__ import annotations

import math
import mmap

import torch
from torch import Tensor

#: x86-64 and arm64 (4 KB base pages) huge-page size
HUGE_PAGE = 2 << 20

#: below this size a matrix takes ``torch.empty`` (the few traps it saves do not pay for a mapping)
MIN_BYTES = 4 * HUGE_PAGE


def empty(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype = torch.float64) -> Tensor:
    """An uninitialised contiguous CPU tensor of ``shape``, its pages advised as huge pages.

    The tensor views a private anonymous mapping (aligned to :data:`HUGE_PAGE` within it) that
    lives as long as the tensor does. Unlike ``torch.empty``'s, its storage cannot be resized
    (an ``out=`` of another shape raises).
    """
    shape = tuple(int(n) for n in shape)
    itemsize = torch.empty((), dtype=dtype).element_size()
    nbytes = math.prod(shape) * itemsize
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is None or nbytes < MIN_BYTES:
        return torch.empty(shape, dtype=dtype)
    region = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        region.madvise(advice)
    except OSError:  # a kernel without transparent huge pages: plain pages, same tensor
        pass
    raw = torch.frombuffer(region, dtype=torch.uint8)  # holds ``region`` while it lives
    start = -raw.data_ptr() % HUGE_PAGE
    return raw[start : start + nbytes].view(dtype).view(shape)
