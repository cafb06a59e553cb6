"""Figures shared by the command line and the notebooks (matplotlib, imported lazily), and the
index arithmetic that finds one token in a Gswin block's attention maps."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cmpagl.data.dataset import CaptionDataset
from cmpagl.data.validation import load_image

if TYPE_CHECKING:
    import torch


def token_window(
    row: int,
    col: int,
    hw: tuple[int, int],
    window: tuple[int, int],
    shift: tuple[int, int] = (0, 0),
    batch_index: int = 0,
) -> tuple[int, int]:
    """Where token (``row``, ``col``) of an ``[H, W]`` map sits in a block's window attention.

    Windows are numbered as timm's ``window_partition`` orders them (image-major, then row-major
    over the ``H/M_h × W/M_w`` windows), tokens inside a window row-major. A shifted block
    (SW-MSA) first rolls the map by ``-shift``, so the token moves to
    ``((row - s_h) mod H, (col - s_w) mod W)`` before the map is cut.

    Returns:
        ``(window, position)``: the index into the ``B·nW`` windows of the ``local`` attention
        ``[B·nW, heads, M_h·M_w, M_h·M_w]`` and the token's row there.
    """
    (h, w), (mh, mw) = hw, window
    r, c = (row - shift[0]) % h, (col - shift[1]) % w
    n_windows = (h // mh) * (w // mw)
    return batch_index * n_windows + (r // mh) * (w // mw) + c // mw, (r % mh) * mw + c % mw


def window_origin(row: int, col: int, window: tuple[int, int]) -> tuple[int, int]:
    """(row, column) of the top-left token of the unshifted window holding (``row``, ``col``)."""
    return (row // window[0]) * window[0], (col // window[1]) * window[1]


def token_attention(
    maps: Mapping[str, Any], row: int, col: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One token's attention in one block, averaged over heads (batch element 0).

    Args:
        maps: one block's entry of ``GswinEncoder.forward_with_attention`` (``hw``, ``window``,
            ``shift``, ``local``, ``global_local``).
        row, col: the token on the block's ``[H, W]`` map.

    Returns:
        ``(local, global_local)``: W-MSA weights ``[M_h, M_w]`` over the token's own window (in
        the shifted frame for a shifted block; for ``global_mode="concat"`` only the local
        keys) and GLWA weights ``[n_global]`` over the global tokens, or None without GLWA.
    """
    mh, mw = maps["window"]
    win, pos = token_window(row, col, maps["hw"], maps["window"], maps["shift"])
    local = maps["local"][win].mean(0)[pos, : mh * mw].reshape(mh, mw)
    if maps["global_local"] is None:
        return local, None
    return local, maps["global_local"][0].mean(0)[row * maps["hw"][1] + col]


def save_gallery(
    query: str,
    hits: list,
    ds: CaptionDataset,
    path: str | Path,
    query_image: str | Path | None = None,
) -> Path:
    """A PNG with the query (text, or an image) and the ranked hits: images with their rank and
    score for a text query, captions for an image query."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    if query_image is None:  # text -> images
        fig, axes = plt.subplots(1, len(hits), figsize=(3 * len(hits), 3.6), squeeze=False)
        for ax, (rank, hit) in zip(axes[0], enumerate(hits, 1), strict=True):
            ax.imshow(load_image(ds.image_path(hit.index)))
            ax.set_title(f"#{rank} {hit.label}\nscore {hit.score:.3f}", fontsize=8)
            ax.axis("off")
        fig.suptitle(f"query: {query}", fontsize=10)
    else:  # image -> captions
        fig, (ax_img, ax_txt) = plt.subplots(
            1, 2, figsize=(10, 3.6), gridspec_kw={"width_ratios": [1, 2]}
        )
        ax_img.imshow(load_image(query_image))
        ax_img.set_title(Path(query_image).name, fontsize=9)
        ax_img.axis("off")
        lines = [f"#{r}  {h.score:.3f}  {h.label}" for r, h in enumerate(hits, 1)]
        ax_txt.text(0, 1, "\n".join(lines), va="top", fontsize=9, family="monospace", wrap=True)
        ax_txt.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
