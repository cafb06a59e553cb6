"""cmpagl.viz: finding one token in a Gswin block's window attention, checked against the very
roll and window partition the block applies (timm's ``window_partition``)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from timm.models.swin_transformer import window_partition

from cmpagl.models.gswin import build_gswin, gswin_config
from cmpagl.viz import token_attention, token_window, window_origin

H, W = 8, 12


def partitioned_ids(batch: int, window: tuple[int, int], shift: tuple[int, int]) -> torch.Tensor:
    """[B·nW, M_h·M_w] ids ``b·H·W + r·W + c`` of the tokens in each window, as a block sees
    them: rolled by ``-shift`` (SW-MSA), then cut by ``window_partition``."""
    ids = torch.arange(batch * H * W, dtype=torch.float32).view(batch, H, W, 1)
    ids = torch.roll(ids, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    return window_partition(ids, window).reshape(-1, window[0] * window[1])


@pytest.mark.parametrize("window", [(4, 4), (2, 4)])
@pytest.mark.parametrize("shift", [(0, 0), (2, 2), (1, 2)])
def test_token_window_matches_the_partition(window, shift) -> None:
    windows = partitioned_ids(2, window, shift)
    for b in range(2):
        for r in range(H):
            for c in range(W):
                win, pos = token_window(r, c, (H, W), window, shift, batch_index=b)
                assert windows[win, pos] == b * H * W + r * W + c, (b, r, c)


def test_window_origin() -> None:
    assert window_origin(13, 18, (4, 4)) == (12, 16)
    assert window_origin(3, 5, (2, 4)) == (2, 4)
    r, c = 6, 9  # the origin's window is the token's window (unshifted)
    assert (
        token_window(*window_origin(r, c, (4, 4)), (H, W), (4, 4))[0]
        == token_window(r, c, (H, W), (4, 4))[0]
    )


@pytest.mark.parametrize("shift", [(0, 0), (2, 2)])
def test_token_attention_picks_the_token_row(shift) -> None:
    """Attention maps whose every row holds the id of its query token: the token's local and
    global rows, averaged over heads, hold its own id everywhere."""
    window, heads, n_global = (4, 4), 3, 5
    ids = partitioned_ids(1, window, shift)  # [nW, 16]
    local = ids[:, None, :, None].expand(-1, heads, -1, 16 + n_global)  # concat: local + global
    glob = torch.arange(H * W, dtype=torch.float32)[None, None, :, None]
    glob = glob.expand(1, heads, -1, n_global)
    maps = {"hw": (H, W), "window": window, "shift": shift, "local": local}
    for r, c in ((0, 0), (5, 10), (7, 11)):
        lo, gl = token_attention({**maps, "global_local": glob}, r, c)
        assert lo.shape == (4, 4) and torch.all(lo == r * W + c)
        assert gl.shape == (n_global,) and torch.all(gl == r * W + c)
        assert token_attention({**maps, "global_local": None}, r, c)[1] is None


def test_token_attention_on_a_real_encoder() -> None:
    """On the tiny Gswin: both rows are probability distributions over the right keys."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(gswin_config("tiny", img_size=32), drop_path_rate=0.0)
    with torch.no_grad():
        _, maps = build_gswin(cfg).eval().forward_with_attention(torch.randn(1, 3, 32, 32))
    first, second = maps[0], maps[1]  # stage 0: an unshifted and a shifted block
    assert first["shift"] == (0, 0) and second["shift"] != (0, 0)
    for block in (first, second):
        local, glob = token_attention(block, 5, 6)
        assert local.shape == block["window"]
        assert torch.allclose(local.sum(), torch.tensor(1.0))
        assert glob.shape == (block["global_local"].shape[-1],)
        assert torch.allclose(glob.sum(), torch.tensor(1.0))
