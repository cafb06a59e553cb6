"""Figures shared by the command line and the notebooks (matplotlib, imported lazily)."""

from __future__ import annotations

from pathlib import Path

from cmpagl.data.dataset import CaptionDataset
from cmpagl.data.validation import load_image


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
