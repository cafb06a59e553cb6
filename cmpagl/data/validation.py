"""Checks of image files against a dataset's annotations, with messages that say what to fix."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, UnidentifiedImageError

from cmpagl.data.dataset import CaptionDataset, DataError, _first


def load_image(path: str | Path) -> Image.Image:
    """Open an image as RGB, fully decoded; a missing or corrupt file raises :class:`DataError`
    naming the file (a truncated JPEG only fails on decode, hence ``load()``)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"image file not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"cannot read image {path}: {e}") from e


def missing_images(ds: CaptionDataset) -> list[str]:
    """File names of ``ds`` that do not exist under ``ds.image_dir``."""
    return [f for f in ds.filenames if not (ds.image_dir / f).is_file()]


def check_images(ds: CaptionDataset, decode: bool = True) -> None:
    """Raise :class:`DataError` if image files are missing (how many, the first few names) or,
    with ``decode``, if any cannot be decoded (the message names each bad file)."""
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
    if not decode:
        return
    bad = []
    for f in ds.filenames:
        try:
            load_image(ds.image_dir / f)
        except DataError as e:
            bad.append(str(e))
    if bad:
        raise DataError(f"{len(bad)} unreadable images in {ds.image_dir}: " + "; ".join(bad[:5]))
