"""How far information travels through the Gswin encoder: the effective receptive field of one
token (Luo et al. 2016), measured as the gradient of that token with respect to the input image.

Swin's window attention lets a token see only its own M×M window; shifted windows widen that a
little with every second block. The global window (GWG + GLWA, :mod:`cmpagl.models.gswin`) lets
every token see a summary of the whole map in every block. This module measures the difference
on a given encoder, instead of drawing it:

* :func:`forward_to_block` runs the encoder up to (and including) its n-th Gswin block;
* :func:`measure_receptive_field` takes one output token there and returns
  ``|∂ Σ_c y[row, col, c] / ∂ image|`` summed over the colour channels, per image;
* :class:`ReceptiveField` summarises such a map by two numbers: the share of gradient mass that
  lies outside the token's own window, and the radius around the token holding 90 % of it;
* :func:`global_window_off` runs the same encoder, with the same weights, as a Swin: every block
  skips its GWG and GLWA (for ``global_mode="add"`` this is exactly γ = 0);
* :func:`global_branch_norms` says how loud the global path is in each block: the size of
  γ ⊙ GLWA next to the size of W-MSA, the two terms the block adds to X.

Example::

    enc = model.visual.eval()
    rf = measure_receptive_field(enc, images, n_blocks=2)       # after stage 0
    with global_window_off(enc):
        rf_swin = measure_receptive_field(enc, images, n_blocks=2)
    rf.outside_window().mean(), rf_swin.outside_window().mean()  # > 0 vs a shift's worth
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from cmpagl.models.gswin import GswinBlock, GswinTransformer

__all__ = [
    "ReceptiveField",
    "block_geometry",
    "forward_to_block",
    "global_branch_norms",
    "global_window_off",
    "measure_receptive_field",
]


@contextlib.contextmanager
def global_window_off(encoder: GswinTransformer) -> Iterator[GswinTransformer]:
    """Within the ``with``, every Gswin block of ``encoder`` runs as a Swin block.

    The GWG and GLWA modules are detached from their blocks (and put back afterwards, also on an
    error), so the blocks compute W-MSA + MLP with their own weights: the function of a
    ``global_mode="off"`` encoder holding the same local weights, i.e. of timm's Swin. For
    ``"add"`` this equals setting every γ to 0; for ``"concat"`` the global keys/values leave
    the softmax.
    """
    saved: list[tuple[GswinBlock, object, object, str]] = []
    try:
        for _, _, blk in encoder.gswin_blocks():
            saved.append((blk, blk.gwg, blk.glwa, blk.global_mode))
            blk.gwg = blk.glwa = None
            blk.global_mode = "off"
        yield encoder
    finally:
        for blk, gwg, glwa, mode in saved:
            blk.gwg, blk.glwa, blk.global_mode = gwg, glwa, mode


def forward_to_block(
    encoder: GswinTransformer, images: torch.Tensor, n_blocks: int
) -> torch.Tensor:
    """Images [B, 3, H, W] -> the block output after the first ``n_blocks`` Gswin blocks, in
    forward order over the stages: [B, h, w, C] (no final norm).

    A stage's patch merging runs before its first block, as in the encoder's forward.
    """
    total = len(encoder.gswin_blocks())
    if not 1 <= n_blocks <= total:
        raise ValueError(f"n_blocks must be between 1 and {total}, got {n_blocks}")
    x = encoder.patch_embed(images)
    done = 0
    for stage in encoder.layers:
        x = stage.downsample(x)
        for blk in stage.blocks:
            x = blk(x)
            done += 1
            if done == n_blocks:
                return x
    raise AssertionError("unreachable: n_blocks was checked against the block count")


def block_geometry(encoder: GswinTransformer, n_blocks: int) -> tuple[tuple[int, int], int, int]:
    """``((h, w), token_px, window)`` of the n-th block: its token map, the pixels per token
    side (patch size · 2^stage) and its window side M (clipped to the map, as timm does)."""
    stage, _, blk = encoder.gswin_blocks()[n_blocks - 1]
    token_px = encoder.cfg.patch_size * 2**stage
    return tuple(blk.input_resolution), token_px, int(blk.window_size[0])


@dataclass(frozen=True)
class ReceptiveField:
    """One output token's effective receptive field on a batch of images.

    Attributes:
        maps: ``[B, H_img, W_img]``, |gradient of the token| summed over colour channels.
        n_blocks: the token is taken after this many Gswin blocks.
        row, col: the token on that block's ``[h, w]`` map.
        token_px: pixels per token side at that block.
        window: ``(top, left, bottom, right)`` in pixels of the token's own (unshifted) window
            at that block, bottom/right exclusive.
    """

    maps: torch.Tensor
    n_blocks: int
    row: int
    col: int
    token_px: int
    window: tuple[int, int, int, int]

    @property
    def centre(self) -> tuple[float, float]:
        """The token's centre in pixels (row, column)."""
        return ((self.row + 0.5) * self.token_px, (self.col + 0.5) * self.token_px)

    def outside_window(self) -> torch.Tensor:
        """[B] share of each map's gradient mass outside the token's window (0 for a pure
        window attention block, up to 1 - window area / image area for a uniform map)."""
        top, left, bottom, right = self.window
        outside = self.maps.clone()
        outside[:, top:bottom, left:right] = 0  # masked, not subtracted: exact 0 stays 0
        return outside.sum(dim=(1, 2)) / self.maps.sum(dim=(1, 2))

    def radius(self, q: float = 0.9) -> torch.Tensor:
        """[B] float64: the smallest distance r (pixels, from the token's centre to pixel
        centres) such that the pixels within r hold at least ``q`` of each map's gradient
        mass."""
        if not 0.0 < q <= 1.0:
            raise ValueError(f"q must be in (0, 1], got {q}")
        b, h, w = self.maps.shape
        ys = torch.arange(h, dtype=torch.float64) + 0.5 - self.centre[0]
        xs = torch.arange(w, dtype=torch.float64) + 0.5 - self.centre[1]
        dist = torch.sqrt(ys[:, None] ** 2 + xs[None, :] ** 2).flatten()  # [H·W]
        order = torch.argsort(dist)
        mass = self.maps.flatten(1).double()[:, order]  # [B, H·W], nearest pixel first
        cum = mass.cumsum(dim=1) / mass.sum(dim=1, keepdim=True)
        # first index where the cumulative share reaches q (a small tolerance for rounding)
        first = (cum < q - 1e-12).sum(dim=1).clamp(max=h * w - 1)
        return dist[order][first]


def measure_receptive_field(
    encoder: GswinTransformer,
    images: torch.Tensor,
    n_blocks: int,
    row: int | None = None,
    col: int | None = None,
) -> ReceptiveField:
    """The gradient of one token after ``n_blocks`` blocks with respect to the input images.

    The measured unit is the sum over channels of token (``row``, ``col``) of the block output
    (:func:`forward_to_block`); its gradient is taken per image (images of a batch do not mix)
    and |·| is summed over the 3 colour channels, as in Luo et al. (2016).

    Args:
        encoder: in eval mode (drop path would make the map random).
        images: [B, 3, H, W], normalised as the encoder expects.
        n_blocks: 1 .. number of Gswin blocks.
        row, col: the token on that block's map; default the token at offset (M - 1) // 2
            inside the window holding the map's centre (h // 2, w // 2), i.e. near the middle
            of its window rather than on its border.

    Raises:
        ValueError: the encoder is in training mode, or the token is off the map.
    """
    if encoder.training:
        raise ValueError("put the encoder in eval mode: drop path would make the gradient random")
    (h, w), token_px, m = block_geometry(encoder, n_blocks)
    row = (h // 2) // m * m + (m - 1) // 2 if row is None else row
    col = (w // 2) // m * m + (m - 1) // 2 if col is None else col
    if not (0 <= row < h and 0 <= col < w):
        raise ValueError(f"token ({row}, {col}) is off the {h}x{w} map of block {n_blocks}")
    x = images.detach().clone().requires_grad_(True)
    y = forward_to_block(encoder, x, n_blocks)  # [B, h, w, C]
    (grad,) = torch.autograd.grad(y[:, row, col].sum(), x)
    top, left = (row // m) * m * token_px, (col // m) * m * token_px
    window = (top, left, top + m * token_px, left + m * token_px)
    return ReceptiveField(grad.abs().sum(dim=1), n_blocks, row, col, token_px, window)


@torch.no_grad()
def global_branch_norms(encoder: GswinTransformer, images: torch.Tensor) -> list[dict[str, float]]:
    """How strongly each block's global path speaks, in one forward pass over ``images``.

    For every Gswin block with GLWA (``global_mode="add"``): the mean over tokens and images of
    ‖W-MSA(LN(X))‖₂ (``local``) and of ‖γ ⊙ GLWA(LN(X), G)‖₂ (``global``), the two terms the
    block adds to its input X, and ``ratio`` = global / local. The values are read with forward
    hooks from the encoder's own forward (window outputs hold the same tokens as the map when
    the map is a multiple of the window, as in every preset).

    Returns:
        One dict per such block: ``stage``, ``block``, ``local``, ``global``, ``ratio``.
    """
    found: dict[tuple[int, int], dict[str, float]] = {}
    hooks = []

    def mean_norm(out: torch.Tensor, scale: torch.Tensor | None = None) -> float:
        return float((out if scale is None else out * scale).norm(dim=-1).mean())

    for i, j, blk in encoder.gswin_blocks():
        if blk.glwa is None:
            continue
        row = found.setdefault((i, j), {"stage": i, "block": j})
        hooks.append(
            blk.attn.register_forward_hook(
                lambda _m, _a, out, row=row: row.__setitem__("local", mean_norm(out))
            )
        )
        hooks.append(
            blk.glwa.register_forward_hook(
                lambda _m, _a, out, row=row, g=blk.gamma: row.__setitem__(
                    "global", mean_norm(out, g)
                )
            )
        )
    try:
        encoder.forward_features(images)
    finally:
        for hook in hooks:
            hook.remove()
    rows = list(found.values())
    for row in rows:
        row["ratio"] = row["global"] / row["local"]
    return rows
