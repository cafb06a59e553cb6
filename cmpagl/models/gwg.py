"""GWG: the global window generation block of the Gswin transformer (METHOD.md §1.1, Fig. 2a).

A GWG block turns a block input X [B, H, W, C] into a small set of *global tokens*
G [B, n_global, C] that summarise the whole feature map. Every local window of the image then
attends to the same G (GLWA, :mod:`cmpagl.models.gswin`), which is how information crosses the
window borders within one block.

The paper names the block but its equations are not available, so the construction is a
[decision] behind ``GswinConfig.gwg``:

- ``"pool"``: G = Norm(Linear(AdaptiveAvgPool_{M×M}(X))), M the block's window side, so the
  global window has exactly the shape of a local window (M·M tokens).
- ``"conv"``: a strided depth-wise convolution reduces H×W to M×M before Linear and Norm. Its
  kernel starts as an average (1/k²), so at initialisation it equals ``"pool"`` and can only
  learn to re-weight the cells from there.
- ``"multiscale"``: adaptive pools at ``gwg_scales`` sides (default 1, 2, 4), concatenated:
  sum(s²) tokens, from one whole-image token to a coarse grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GlobalWindowGeneration"]

GwgMode = Literal["pool", "conv", "multiscale"]


class GlobalWindowGeneration(nn.Module):
    """GWG block: block input X [B, H, W, C] -> global tokens G [B, n_global, C] (Fig. 2a).

    Args:
        dim: channels C.
        window_size: the block's local window (M_h, M_w); "pool" and "conv" give M_h·M_w tokens.
        feat_size: the block's feature map (H, W); sets the stride of the "conv" variant.
        mode: "pool", "conv" or "multiscale" (``GswinConfig.gwg``).
        scales: pooled sides of the "multiscale" variant (``GswinConfig.gwg_scales``).
    """

    def __init__(
        self,
        dim: int,
        window_size: tuple[int, int],
        feat_size: tuple[int, int],
        mode: GwgMode = "pool",
        scales: Sequence[int] = (1, 2, 4),
    ):
        super().__init__()
        if mode not in ("pool", "conv", "multiscale"):
            raise ValueError(f"gwg must be 'pool', 'conv' or 'multiscale', got {mode!r}")
        self.mode = mode
        if mode == "multiscale":
            if not scales or min(scales) < 1:
                raise ValueError(f"gwg_scales must be positive sides, got {tuple(scales)}")
            self.out_sizes = [(int(s), int(s)) for s in scales]
        else:
            self.out_sizes = [tuple(window_size)]
        self.num_tokens = sum(h * w for h, w in self.out_sizes)
        self.reduce = self._make_reduce(dim, window_size, feat_size) if mode == "conv" else None
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)

    @staticmethod
    def _make_reduce(
        dim: int, window_size: tuple[int, int], feat_size: tuple[int, int]
    ) -> nn.Conv2d:
        """Depth-wise conv with kernel = stride = H // M (per side), initialised as an average."""
        stride = tuple(max(1, f // w) for f, w in zip(feat_size, window_size, strict=True))
        conv = nn.Conv2d(dim, dim, kernel_size=stride, stride=stride, groups=dim)
        with torch.no_grad():
            conv.weight.fill_(1.0 / (stride[0] * stride[1]))
            conv.bias.zero_()
        return conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """X [B, H, W, C] -> G [B, n_global, C]."""
        x = x.permute(0, 3, 1, 2)  # [B, C, H, W]
        if self.reduce is not None:
            # The adaptive pool below is the identity when H is a multiple of M; otherwise (or at
            # another input size) it brings the conv output to exactly M×M.
            x = self.reduce(x)
        pooled = [F.adaptive_avg_pool2d(x, size).flatten(2) for size in self.out_sizes]
        g = pooled[0] if len(pooled) == 1 else torch.cat(pooled, dim=2)
        g = g.transpose(1, 2)  # [B, n_global, C]
        return self.norm(self.proj(g))

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, out_sizes={self.out_sizes}, num_tokens={self.num_tokens}"
