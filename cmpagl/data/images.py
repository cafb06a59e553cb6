"""Image files as remote sensing delivers them, decoded to the 8-bit RGB the encoder takes.

Every image the library reads goes through :func:`read_image`, by these rules:

* **8-bit images Pillow reads** (RGB, grey, palette, CMYK, YCbCr, 1-bit): Pillow's conversion
  to RGB; a grey image is replicated to the three channels.
* **Alpha** (RGBA, LA, PA, a palette's transparent colour, a TIFF's alpha sample) is
  *composited on black*: each colour value is multiplied by alpha / its maximum. In remote
  sensing alpha marks nodata outside a scene's footprint; black makes those pixels the same
  whatever fill the producer left under them, which dropping alpha would keep.
* **More than 8 bits per sample** (16- or 32-bit integers, floats) is scaled to 0..255 by
  :attr:`ImageReading.scaling`, never clipped silently (what was done is in the
  :class:`ImageKind` that ``cmpagl data check`` counts):

  - ``percentile`` (default): per image, over the bands used *together* (one stretch for all
    three keeps the colour balance between them), the ``percentiles[0]`` value maps to 0 and
    the ``percentiles[1]`` value to 255, linearly between; the tails beyond are saturated (2 %
    at each end by default: that is the stretch). An image whose percentiles coincide is
    stretched between its minimum and maximum; an image of one value becomes black.
  - ``bits``: integer value / (2^bits - 1) x 255, the sensor's fixed range (``bits: 12`` for
    12-bit data stored in 16-bit words). Values outside the range are saturated and said so
    once per process (and in the image's kind). Floats have no bit depth: an error.

  NaN, infinities and a GeoTIFF's nodata value (``GDAL_NODATA``) are left out of the
  percentiles and become 0 (black), like alpha-masked pixels.
* **Bands**: 1 band is grey (replicated); 3 bands are R, G, B; 2 bands use band 1 as grey; more
  than 3 use :attr:`ImageReading.bands` (1-based numbers, as GDAL counts them), by default the
  first three, noted once per process.
* **Readers**: Pillow, except for TIFFs it would read with loss, as their tags tell (16-bit
  RGB reduced to its high byte, only the first band of a multi-band file) or not at all (float
  RGB, 4+ grey bands): those are read with ``tifffile``. LZW- or JPEG-compressed ones need the
  ``imagecodecs`` package there (the error says so). Pillow reduces a 16-bit RGB *PNG* to its
  high byte (the ``bits: 16`` rule whatever ``scaling`` says); its kind says so.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, UnidentifiedImageError

from cmpagl.data.dataset import DataError

__all__ = ["ImageKind", "ImageReading", "read_image"]

Scaling = Literal["percentile", "bits"]
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF
_GDAL_NODATA = 42113  # the TIFF tag GDAL writes a band's nodata value to
_PIL_HIGH_BIT = {"I;16": 16, "I;16L": 16, "I;16B": 16, "I;16N": 16, "I": 32, "F": 32}
_PIL_NAMES = {"L": "grey", "1": "grey", "P": "palette"}
# 8-bit modes Pillow decodes a TIFF to without loss (RGBX, I;16S, ... go to tifffile)
_PIL_8BIT = {"1", "L", "P", "LA", "PA", "RGB", "RGBA", "RGBa", "CMYK", "YCbCr"}
_PIL_ALPHA_NAMES = {
    "RGBA": "RGBA",
    "RGBa": "RGBA",
    "LA": "grey + alpha",
    "La": "grey + alpha",
    "PA": "palette + alpha",
    "P": "palette + transparency",
}
_NOTED: set[str] = set()  # notes already given in this process (see _note_once)


@dataclass(frozen=True)
class ImageReading:
    """How images that are not 8-bit RGB become 8-bit RGB (``data.image_*`` in the config).

    Attributes:
        scaling: ``percentile`` (a per-image stretch) or ``bits`` (a fixed bit depth).
        percentiles: low and high percentile of the stretch, 0 <= low < high <= 100.
        bits: the bit depth of integer data for ``scaling="bits"`` (1..32).
        bands: 1-based band numbers used as R, G, B for images with more than 3 bands; None:
            the first three.
    """

    scaling: Scaling = "percentile"
    percentiles: tuple[float, float] = (2.0, 98.0)
    bits: int = 16
    bands: tuple[int, int, int] | None = None

    def __post_init__(self) -> None:
        if self.scaling not in ("percentile", "bits"):
            raise ValueError(f"scaling must be 'percentile' or 'bits', got {self.scaling!r}")
        low, high = self.percentiles
        if not 0 <= low < high <= 100:
            raise ValueError(f"percentiles must be 0 <= low < high <= 100, got {low}, {high}")
        if not 1 <= self.bits <= 32:
            raise ValueError(f"bits must be 1..32, got {self.bits}")
        if self.bands is not None and (len(self.bands) != 3 or min(self.bands) < 1):
            raise ValueError(f"bands must be three band numbers >= 1, got {self.bands}")

    def describe(self) -> str:
        """The scaling rule in words, as ``cmpagl data check`` prints it."""
        if self.scaling == "percentile":
            low, high = (f"{p:g}" for p in self.percentiles)
            return f"scaled by percentile stretch {low}–{high} %"
        return f"scaled as {self.bits}-bit (value / {2**self.bits - 1})"


@dataclass(frozen=True)
class ImageKind:
    """What a file held and what was done to make it 8-bit RGB; ``cmpagl data check`` counts
    images by kind.

    Attributes:
        bits: bits per sample in the file (1, 8, 16, 32, 64).
        bands: samples per pixel, alpha included.
        name: the colour model (``RGB``, ``grey``, ``palette``, ``CMYK``, ...) or, for data
            read as an array, ``float`` / ``integer``.
        notes: what was done besides a plain conversion, in words.
    """

    bits: int
    bands: int
    name: str
    notes: tuple[str, ...] = ()

    def describe(self) -> str:
        """E.g. ``8-bit RGB``, ``16-bit 1-band (scaled by percentile stretch 2–98 %)``."""
        if self.name in ("float", "integer"):
            kind = f"{self.bits}-bit {'float ' if self.name == 'float' else ''}{self.bands}-band"
        else:
            kind = f"{self.bits}-bit {self.name}"
        return kind + (f" ({'; '.join(self.notes)})" if self.notes else "")


def read_image(
    path: str | Path, reading: ImageReading | None = None
) -> tuple[Image.Image, ImageKind]:
    """Decode an image file to an 8-bit RGB image by the rules of this module.

    Args:
        path: the image file.
        reading: the rule for high bit depths and band selection; None: the defaults.

    Returns:
        ``(image, kind)``: a fully loaded PIL image in mode ``RGB`` ``[H, W, 3]`` uint8, and
        what the file held.

    Raises:
        DataError: missing, unreadable or unsupported file; the message names it.
    """
    path, reading = Path(path), reading or ImageReading()
    if not path.is_file():
        raise DataError(f"image file not found: {path}")
    with open(path, "rb") as f:
        is_tiff = f.read(4) in _TIFF_MAGIC
    pillow_problem = None
    try:
        with Image.open(path) as img:
            if not is_tiff or _pillow_reads_as_it_is(img):
                tile = img.tile[0].args if img.tile else None  # gone after load()
                rawmode = tile[0] if isinstance(tile, tuple) else tile
                img.load()
                return _from_pillow(path, img, reading, rawmode)
            pillow_problem = f"Pillow would lose bits or bands (it reads {img.mode})"
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        if not is_tiff:
            raise DataError(f"cannot read image {path}: {e}") from e
        pillow_problem = f"Pillow: {e}"
    # A TIFF Pillow cannot read, or would read wrongly (16-bit RGB, multi-band, float RGB)
    try:
        array = _read_tiff_array(path)
    except (ValueError, OSError, KeyError, IndexError, RuntimeError) as e:
        fix = " (pip install imagecodecs)" if "imagecodecs" in str(e) else ""
        raise DataError(f"cannot read image {path}: tifffile: {e}{fix}; {pillow_problem}") from e
    return _from_array(path, reading, *array)


def _pillow_reads_as_it_is(img: Image.Image) -> bool:
    """Whether Pillow decodes an opened TIFF without losing bits or bands (its tags say)."""
    tags = img.tag_v2
    bits = tags.get(258, 1)
    bits = set(bits) if isinstance(bits, tuple) else {bits}
    samples, n_bands = tags.get(277, 1), len(img.getbands())
    if img.mode in _PIL_HIGH_BIT:
        return samples == 1 and bits == {_PIL_HIGH_BIT[img.mode]}
    return bits <= {1, 8} and samples == n_bands and img.mode in _PIL_8BIT


# -- Pillow ------------------------------------------------------------------------------------
def _from_pillow(
    path: Path, img: Image.Image, reading: ImageReading, rawmode: object
) -> tuple[Image.Image, ImageKind]:
    """An image Pillow opened (``rawmode``: how its pixels were stored) -> 8-bit RGB."""
    mode = img.mode
    if mode in _PIL_HIGH_BIT:
        data = np.asarray(img)[..., None]
        tags = getattr(img, "tag_v2", None)  # a TIFF's, where GDAL writes nodata
        nodata = _nodata(tags.get(_GDAL_NODATA)) if tags is not None else None
        return _from_array(path, reading, data, _PIL_HIGH_BIT[mode], alpha=None, nodata=nodata)
    n_bands = len(img.getbands())
    if "A" in mode or mode in ("La", "RGBa") or (mode == "P" and "transparency" in img.info):
        rgba = np.asarray(img.convert("RGBA"), dtype=np.uint16)
        rgb = (rgba[..., :3] * rgba[..., 3:] + 127) // 255  # composited on black
        name = _PIL_ALPHA_NAMES.get(mode, f"{mode} + alpha")
        kind = ImageKind(8, n_bands, name, ("alpha composited on black",))
        return Image.fromarray(rgb.astype(np.uint8), "RGB"), kind
    bits, notes = (1 if mode == "1" else 8), ()
    if isinstance(rawmode, str) and ";16" in rawmode:  # 48-bit RGB PNG: Pillow keeps the high byte
        bits, notes = 16, ("Pillow keeps the high 8 bits: scaled as 16-bit",)
        _note_once(
            "pillow-16",
            f"{path}: Pillow reduces this 16-bit {mode} file to its high 8 bits (the 16-bit rule "
            "whatever data.image_scaling says); save it as TIFF to have that apply",
        )
    return img.convert("RGB"), ImageKind(bits, n_bands, _PIL_NAMES.get(mode, mode), notes)


# -- tifffile ----------------------------------------------------------------------------------
def _read_tiff_array(path: Path) -> tuple[np.ndarray, int, int | None, float | None]:
    """``(data [H, W, C], bits, alpha band index or None, nodata or None)`` of a grey, RGB or
    multi-band TIFF of any data type, read with tifffile."""
    import tifffile
    from tifffile import EXTRASAMPLE, PHOTOMETRIC

    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        bits, samples = int(page.bitspersample), int(page.samplesperpixel)
        photometric = page.photometric
        extra = tuple(page.extrasamples or ())
        alpha_extra = bool(extra) and extra[0] in (EXTRASAMPLE.ASSOCALPHA, EXTRASAMPLE.UNASSALPHA)
        colours = samples - int(alpha_extra)
        if photometric not in (PHOTOMETRIC.MINISBLACK, PHOTOMETRIC.RGB):
            raise ValueError(f"{bits}-bit {photometric.name} TIFF is not supported")
        series = tif.series[0]
        data, axes = series.asarray(), series.axes
        tag = page.tags.get(_GDAL_NODATA)
        nodata = _nodata(tag.value) if tag is not None else None
    for i in reversed(range(data.ndim)):  # drop length-1 axes (e.g. a single page)
        if data.shape[i] == 1 and axes[i] not in "YX":
            data, axes = data.squeeze(i), axes[:i] + axes[i + 1 :]
    if data.ndim == 2:
        data = data[..., None]
    elif data.ndim == 3 and "Y" in axes and "X" in axes:
        band_axis = next(i for i, a in enumerate(axes) if a not in "YX")
        data = np.moveaxis(data, band_axis, -1)
    else:
        raise ValueError(f"a {data.ndim}-D TIFF (axes {axes}) is not one image")
    alpha = colours if alpha_extra else None
    return data, bits, alpha, nodata


def _nodata(value: object) -> float | None:
    """GDAL's nodata tag (ASCII, e.g. ``"-9999"``, ``"nan"``) as a number; None if absent."""
    if value is None:
        return None
    try:
        return float(str(value).strip("\x00 "))
    except ValueError:
        return None


# -- arrays: bands, alpha, scaling -------------------------------------------------------------
def _from_array(
    path: Path,
    reading: ImageReading,
    data: np.ndarray,
    bits: int,
    alpha: int | None,
    nodata: float | None,
) -> tuple[Image.Image, ImageKind]:
    """``data`` ``[H, W, C]`` -> 8-bit RGB by the module's rules for bands, alpha and scaling."""
    n_bands = data.shape[-1]
    is_float = np.issubdtype(data.dtype, np.floating)
    notes: list[str] = []
    valid = np.ones(data.shape[:2], dtype=bool)
    if alpha is not None:
        a = data[..., alpha].astype(np.float64)
        a = a / (1.0 if is_float else float(2**bits - 1))
        data = np.delete(data, alpha, axis=-1)
        notes.append("alpha composited on black")
    else:
        a = None
    data = _select_bands(path, data, reading, notes)
    values = data.astype(np.float64)
    if nodata is not None:
        valid &= ~(values == nodata).any(axis=-1)
    valid &= np.isfinite(values).all(axis=-1)
    if data.dtype == np.uint8:
        out = values
    elif data.dtype == np.bool_:
        out = values * 255
    else:
        out = _scale(path, values, valid, reading, is_float, notes)
    out = np.where(valid[..., None], out, 0.0)
    if a is not None:
        out = out * np.clip(a, 0, 1)[..., None]
    if out.shape[-1] == 1:
        out = np.repeat(out, 3, axis=-1)
    rgb = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    name = "float" if is_float else "integer"
    kind = ImageKind(bits if not is_float else data.dtype.itemsize * 8, n_bands, name, tuple(notes))
    if data.dtype == np.uint8 and n_bands in (1, 3) and not notes:
        kind = ImageKind(8, n_bands, "grey" if n_bands == 1 else "RGB")
    return Image.fromarray(np.ascontiguousarray(rgb), "RGB"), kind


def _select_bands(
    path: Path, data: np.ndarray, reading: ImageReading, notes: list[str]
) -> np.ndarray:
    """``[H, W, C]`` -> ``[H, W, 1]`` or ``[H, W, 3]``: the bands used (see the module doc)."""
    n = data.shape[-1]
    if n in (1, 3):
        return data
    if n == 2:
        notes.append("band 1 of 2 as grey")
        _note_once("two-bands", f"{path} has 2 bands; band 1 is used as grey (noted once)")
        return data[..., :1]
    bands = reading.bands or (1, 2, 3)
    if max(bands) > n:
        raise DataError(
            f"cannot read image {path}: data.image_bands {list(bands)} asks for band "
            f"{max(bands)}, the file has {n} bands"
        )
    notes.append(f"bands {', '.join(map(str, bands))} of {n} as RGB")
    if reading.bands is None:
        _note_once(
            "bands",
            f"{path} has {n} bands; bands 1, 2, 3 are used as RGB (set data.image_bands to "
            "choose others; noted once per process)",
        )
    return data[..., [b - 1 for b in bands]]


def _scale(
    path: Path,
    values: np.ndarray,
    valid: np.ndarray,
    reading: ImageReading,
    is_float: bool,
    notes: list[str],
) -> np.ndarray:
    """Values of more than 8 bits -> floats in [0, 255] (see the module doc)."""
    if reading.scaling == "bits":
        if is_float:
            raise DataError(
                f"cannot read image {path}: float data has no bit depth for data.image_scaling "
                "'bits'; use 'percentile'"
            )
        top = float(2**reading.bits - 1)
        notes.append(reading.describe())
        out = values / top * 255.0
        outside = valid & ((values > top) | (values < 0)).any(axis=-1)
        if outside.any():
            notes.append(f"values outside 0–{top:.0f} saturated")
            _note_once(
                "bits-range",
                f"{path} has values outside the {reading.bits}-bit range 0–{top:.0f} "
                "(data.image_bits); they are saturated (noted once per process)",
            )
        return out
    notes.append(reading.describe())
    sample = values[valid]
    if sample.size == 0:
        return np.zeros_like(values)
    low, high = np.percentile(sample, reading.percentiles)
    if high <= low:
        low, high = sample.min(), sample.max()
    if high <= low:
        return np.zeros_like(values)
    return (values - low) * (255.0 / (high - low))


def _note_once(key: str, message: str) -> None:
    """A :class:`UserWarning` the first time ``key`` comes up in this process, not per image."""
    if key in _NOTED:
        return
    _NOTED.add(key)
    warnings.warn(message, UserWarning, stacklevel=2)
