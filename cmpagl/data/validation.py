"""Checks of image files against a dataset's annotations, with messages that say what to fix."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from PIL import Image

from cmpagl.data.dataset import CaptionDataset, DataError, _first
from cmpagl.data.images import ImageKind, ImageReading, read_image


def load_image(path: str | Path, reading: ImageReading | None = None) -> Image.Image:
    """Open an image as 8-bit RGB, fully decoded (a truncated JPEG only fails on decode).

    16-bit, float and multi-band files are made 8-bit RGB by ``reading`` (default: a 2-98 %
    percentile stretch, bands 1-3); alpha is composited on black, grey replicated to three
    channels: the rules are in :mod:`cmpagl.data.images`. A missing, corrupt or unsupported
    file raises :class:`DataError` naming it.
    """
    return read_image(path, reading)[0]


def missing_images(ds: CaptionDataset) -> list[str]:
    """File names of ``ds`` that do not exist under ``ds.image_dir``."""
    return [f for f in ds.filenames if not (ds.image_dir / f).is_file()]


def check_images(
    ds: CaptionDataset, decode: bool = True, reading: ImageReading | None = None
) -> Counter[ImageKind]:
    """Raise :class:`DataError` if image files are missing (how many, the first few names) or,
    with ``decode``, if any cannot be decoded (the message names each bad file).

    Returns:
        With ``decode``, how many images of each kind (bit depth, bands, colour model, and how
        ``reading`` made them 8-bit RGB) were read; empty without.
    """
    if not ds.image_dir.is_dir():
        raise DataError(
            f"image folder {ds.image_dir} does not exist (dataset {ds.name!r}, {ds.num_images} "
            "images); pass image_dir / set data.image_dir"
        )
    missing = missing_images(ds)
    if missing:
        raise DataError(
            f"{len(missing)} of {ds.num_images} image files are missing in {ds.image_dir}: "
            f"{_first(missing)}"
        )
    kinds: Counter[ImageKind] = Counter()
    if not decode:
        return kinds
    bad = []
    for f in ds.filenames:
        try:
            kinds[read_image(ds.image_dir / f, reading)[1]] += 1
        except DataError as e:
            bad.append(str(e))
    if bad:
        raise DataError(f"{len(bad)} unreadable images in {ds.image_dir}: " + "; ".join(bad[:5]))
    return kinds


def describe_kinds(kinds: Counter[ImageKind]) -> list[str]:
    """``["1,600 × 8-bit RGB", "3 × 16-bit 1-band (scaled by ...)"]``, most frequent first."""
    rows = kinds.most_common()
    width = max((len(f"{n:,}") for _, n in rows), default=0)
    return [f"{n:>{width},} × {kind.describe()}" for kind, n in rows]
