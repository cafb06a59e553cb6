"""cmpagl.hugepages: new matrices on huge pages hold their numbers as torch.empty's do."""

from __future__ import annotations

import gc
import mmap
from pathlib import Path

import pytest
import torch

from cmpagl import hugepages

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def test_a_large_matrix_is_an_aligned_writable_contiguous_tensor():
    shape = (1093, 1093)  # 9.6 MB float64
    x = hugepages.empty(shape)
    assert x.shape == shape and x.dtype == torch.float64 and x.is_contiguous()
    if hasattr(mmap, "MADV_HUGEPAGE"):
        assert x.data_ptr() % hugepages.HUGE_PAGE == 0
    s = torch.rand(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.div(s, 0.05, out=x)  # an out= of its own shape, as SMR's normalizers write it
    assert torch.equal(x, s / 0.05)
    f = hugepages.empty(shape, torch.float32).copy_(s)
    assert f.dtype == torch.float32 and torch.equal(f, s.float())


def test_the_mapping_lives_as_long_as_the_tensor():
    x = hugepages.empty((512, 4096)).fill_(3.0)
    view = x[7:9]
    del x
    gc.collect()
    hugepages.empty((512, 4096)).fill_(-1.0)  # a new mapping must not land under the old one
    assert torch.equal(view, torch.full((2, 4096), 3.0, dtype=torch.float64))


def test_a_small_matrix_is_torch_empty():
    x = hugepages.empty((10, 10), torch.float32)
    assert x.shape == (10, 10) and x.dtype == torch.float32
    x.resize_(200)  # torch.empty's storage is resizable; a mapping's is not
    assert x.numel() == 200


def _anon_huge_kb(address: int) -> int:
    """AnonHugePages (kB) of the mapping of this process that holds ``address``."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(v, 16) for v in head.split("-"))
            inside = lo <= address < hi
        elif inside and head == "AnonHugePages:":
            return int(line.split()[1])
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.skipif(
    not THP.exists() or "[never]" in THP.read_text(),
    reason="this kernel offers no transparent huge pages (Linux with THP 'madvise' or 'always')",
)
def test_the_pages_are_huge_where_the_kernel_offers_them():
    x = hugepages.empty((2048, 2048)).fill_(1.0)  # 32 MB
    huge = _anon_huge_kb(x.data_ptr())
    # the kernel may fall short of huge pages when memory is fragmented; most are huge here
    assert huge >= 16 * 1024, f"only {huge} kB of 32 MB on huge pages"
