"""Images as remote sensing delivers them: every kind becomes the 8-bit RGB its rule promises,
checked on pixel values (a 16-bit image once loaded as all white and passed as "readable")."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

import cmpagl.data.images as images
from cmpagl.config import ConfigError, DataConfig
from cmpagl.data import DataError
from cmpagl.data.build import image_reading_from_config, transforms_from_config
from cmpagl.data.images import ImageReading, read_image
from cmpagl.data.torch_data import EvalImages
from cmpagl.data.validation import load_image


@pytest.fixture(autouse=True)
def fresh_notes(monkeypatch):
    """Each test starts as a new process would: no once-per-process note given yet."""
    monkeypatch.setattr(images, "_NOTED", set())


def pixels(path: Path, reading: ImageReading | None = None) -> np.ndarray:
    img = load_image(path, reading)
    assert img.mode == "RGB"
    return np.asarray(img)


def ramp(width: int = 101, top: int = 4000, dtype=np.uint16) -> np.ndarray:
    """``[4, width]``: a horizontal gradient 0..top (12-bit-like data in 16-bit words)."""
    return np.tile(np.linspace(0, top, width), (4, 1)).astype(dtype)


# -- 8-bit kinds Pillow reads -------------------------------------------------------------------
def test_8bit_rgb_is_unchanged(tmp_path):
    data = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    Image.fromarray(data, "RGB").save(tmp_path / "a.png")
    assert np.array_equal(pixels(tmp_path / "a.png"), data)
    assert read_image(tmp_path / "a.png")[1].describe() == "8-bit RGB"


def test_rgba_is_composited_on_black(tmp_path):
    rgba = np.array([[[200, 100, 50, 255], [200, 100, 50, 128], [200, 100, 50, 0]]], np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    out = pixels(tmp_path / "a.png")
    assert out[0, 0].tolist() == [200, 100, 50]  # opaque: as it is
    assert out[0, 1].tolist() == [100, 50, 25]  # half transparent: half the value
    assert out[0, 2].tolist() == [0, 0, 0]  # transparent (nodata): black, not the hidden colour
    kind = read_image(tmp_path / "a.png")[1]
    assert kind.describe() == "8-bit RGBA (alpha composited on black)"


def test_palette_gives_the_palette_colours(tmp_path):
    img = Image.fromarray(np.array([[0, 1, 2, 1]], np.uint8), "P")
    img.putpalette([255, 0, 0, 0, 0, 255, 10, 200, 30] + [0] * (256 * 3 - 9))
    img.save(tmp_path / "a.png")
    out = pixels(tmp_path / "a.png")
    assert out[0].tolist() == [[255, 0, 0], [0, 0, 255], [10, 200, 30], [0, 0, 255]]
    assert read_image(tmp_path / "a.png")[1].describe() == "8-bit palette"


def test_grey_is_replicated_to_three_channels(tmp_path):
    grey = np.array([[0, 37, 255]], np.uint8)
    Image.fromarray(grey, "L").save(tmp_path / "a.png")
    out = pixels(tmp_path / "a.png")
    assert out[0].tolist() == [[0, 0, 0], [37, 37, 37], [255, 255, 255]]


def test_cmyk_is_converted(tmp_path):
    cmyk = np.array([[[0, 0, 0, 0], [255, 0, 0, 0], [0, 0, 0, 255]]], np.uint8)
    Image.fromarray(cmyk, "CMYK").save(tmp_path / "a.tif")
    out = pixels(tmp_path / "a.tif")
    assert out[0].tolist() == [[255, 255, 255], [0, 255, 255], [0, 0, 0]]  # white, cyan, black
    assert read_image(tmp_path / "a.tif")[1].describe() == "8-bit CMYK"


# -- more than 8 bits ---------------------------------------------------------------------------
def test_16bit_grey_is_stretched_not_saturated(tmp_path):
    tifffile.imwrite(tmp_path / "a.tif", ramp())
    out = pixels(tmp_path / "a.tif")
    row = out[0, :, 0].astype(int)
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 0] == out[..., 2]).all()
    # the 2-98 % stretch: the first and last 2 % saturate, the rest a full linear 0..255 ramp
    assert row[:3].tolist() == [0, 0, 0] and row[-3:].tolist() == [255, 255, 255]
    assert abs(row[50] - 128) <= 1 and (np.diff(row) >= 0).all()
    assert len(set(row.tolist())) > 90  # a gradient, not one value (all 255 before the fix)
    kind = read_image(tmp_path / "a.tif")[1]
    assert kind.describe() == "16-bit 1-band (scaled by percentile stretch 2–98 %)"


def test_16bit_grey_with_a_fixed_bit_depth(tmp_path):
    values = np.array([[0, 2048, 4095, 65535]], np.uint16)
    tifffile.imwrite(tmp_path / "a.tif", values)
    out16 = pixels(tmp_path / "a.tif", ImageReading(scaling="bits", bits=16))[0, :, 0]
    assert out16.tolist() == [0, 8, 16, 255]  # value / 65535 * 255
    with pytest.warns(UserWarning, match=r"outside the 12-bit range 0–4095"):
        img, kind = read_image(tmp_path / "a.tif", ImageReading(scaling="bits", bits=12))
    assert np.asarray(img)[0, :, 0].tolist() == [0, 128, 255, 255]  # 65535 saturates, said so
    assert "values outside 0–4095 saturated" in kind.describe()


def test_16bit_png_read_by_pillow_is_stretched(tmp_path):
    Image.fromarray(ramp()).save(tmp_path / "a.png")  # Pillow mode I;16
    row = pixels(tmp_path / "a.png")[0, :, 0]
    assert row[0] == 0 and row[-1] == 255 and abs(int(row[50]) - 128) <= 1


def test_16bit_rgb_png_keeps_pillows_high_byte_and_says_so(tmp_path):
    """Pillow has no 48-bit mode: a 16-bit RGB PNG is read as its high bytes (documented)."""
    import struct
    import zlib

    values = np.array([[[0, 4096, 65535], [512, 32768, 1000]]], ">u2")  # [1, 2, 3]
    raw = b"".join(b"\x00" + row.tobytes() for row in values)  # filter 0 before each row

    def chunk(tag: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
        return struct.pack(">I", len(data)) + tag + data + crc

    header = struct.pack(">IIBBBBB", 2, 1, 16, 2, 0, 0, 0)  # 2 x 1 pixels, 16-bit RGB
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
    (tmp_path / "a.png").write_bytes(png + chunk(b"IEND", b""))
    with pytest.warns(UserWarning, match="Pillow reduces this 16-bit RGB file"):
        img, kind = read_image(tmp_path / "a.png")
    assert np.asarray(img)[0].tolist() == [[0, 16, 255], [2, 128, 3]]  # value >> 8
    assert kind.describe() == "16-bit RGB (Pillow keeps the high 8 bits: scaled as 16-bit)"


def test_16bit_three_bands_share_one_stretch(tmp_path):
    grey = ramp().astype(np.float64)
    rgb16 = np.stack([grey, grey / 2, grey / 4], axis=-1).astype(np.uint16)
    tifffile.imwrite(tmp_path / "a.tif", rgb16, photometric="rgb")
    out = pixels(tmp_path / "a.tif").astype(int)
    assert out[0, 0].tolist() == [0, 0, 0]
    # one stretch for the three bands keeps their ratios: red ~ 2 x green ~ 4 x blue
    r, g, b = out[0, 80]
    assert r > g > b and abs(r - 2 * g) <= 8 and abs(g - 2 * b) <= 8
    assert out[..., 0].max() == 255
    assert read_image(tmp_path / "a.tif")[1].describe().startswith("16-bit 3-band (scaled by")


def test_float32_reflectance_and_nodata(tmp_path):
    data = np.tile(np.linspace(0.0, 0.5, 101, dtype=np.float32), (4, 1))
    data[3, 10] = np.nan  # nodata: black, and not part of the percentiles
    tifffile.imwrite(tmp_path / "a.tif", data)
    out = pixels(tmp_path / "a.tif")[..., 0].astype(int)
    assert out[0, 0] == 0 and out[0, -1] == 255 and abs(out[0, 50] - 128) <= 1
    assert out[3, 10] == 0
    assert read_image(tmp_path / "a.tif")[1].describe() == (
        "32-bit float 1-band (scaled by percentile stretch 2–98 %)"
    )
    with pytest.raises(DataError, match=r"a\.tif: float data has no bit depth.*'percentile'"):
        load_image(tmp_path / "a.tif", ImageReading(scaling="bits"))


def test_geotiff_nodata_value_is_black_and_ignored(tmp_path):
    data = ramp(top=1000)
    data[:, :20] = 65535  # a nodata border, as GDAL writes it
    tifffile.imwrite(tmp_path / "a.tif", data, extratags=[(42113, "s", 0, "65535", True)])
    out = pixels(tmp_path / "a.tif")[0, :, 0].astype(int)
    assert (out[:20] == 0).all()
    assert out[-1] == 255 and 100 < out[60] < 160  # stretched over the valid values only


@pytest.mark.parametrize("planar", ["contig", "separate"])
def test_more_than_three_bands_takes_the_chosen_ones(tmp_path, planar):
    levels = np.array([100, 150, 300, 400, 500], np.uint16)
    data = np.broadcast_to(levels, (6, 8, 5)).copy()  # band b holds levels[b - 1] everywhere
    if planar == "separate":  # band-interleaved, as GDAL writes INTERLEAVE=BAND
        data = np.moveaxis(data, -1, 0).copy()
    tifffile.imwrite(tmp_path / "a.tif", data, photometric="minisblack", planarconfig=planar)
    with pytest.warns(UserWarning, match=r"has 5 bands; bands 1, 2, 3 are used as RGB") as notes:
        first = pixels(tmp_path / "a.tif")
        pixels(tmp_path / "a.tif")  # a second image: no second note
    assert len(notes) == 1
    assert first[0, 0].tolist() == [0, 64, 255]  # bands 1, 2, 3 (100, 150, 300) stretched
    chosen = pixels(tmp_path / "a.tif", ImageReading(bands=(5, 2, 1)))
    assert chosen[0, 0].tolist() == [255, 32, 0]  # 500, 150, 100
    kind = read_image(tmp_path / "a.tif", ImageReading(bands=(5, 2, 1)))[1]
    assert kind.describe().startswith("16-bit 5-band (bands 5, 2, 1 of 5 as RGB; scaled")
    with pytest.raises(DataError, match=r"a\.tif: data\.image_bands \[1, 2, 6\].*has 5 bands"):
        load_image(tmp_path / "a.tif", ImageReading(bands=(1, 2, 6)))


def test_8bit_rgb_plus_nir_keeps_its_values(tmp_path):
    data = np.zeros((3, 4, 4), np.uint8)
    data[..., :] = [10, 20, 30, 40]
    # Pillow cannot read a 4-band grey TIFF
    tifffile.imwrite(tmp_path / "a.tif", data, photometric="minisblack", planarconfig="contig")
    with pytest.warns(UserWarning, match="4 bands"):
        assert pixels(tmp_path / "a.tif")[0, 0].tolist() == [10, 20, 30]  # 8-bit: no stretch


# -- configuration and threading ----------------------------------------------------------------
def test_reading_rule_comes_from_the_data_config_to_the_datasets(tmp_path):
    from cmpagl.data.dataset import CaptionDataset

    tifffile.imwrite(tmp_path / "a.tif", np.full((4, 4), 4095, np.uint16))
    cfg = DataConfig(image_size=4, image_scaling="bits", image_bits=12)
    cfg.normalize_mean, cfg.normalize_std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    ds = CaptionDataset("t", tmp_path, ["a.tif"], ["test"], [["a caption"]])
    _, eval_tf = transforms_from_config(cfg)
    image = EvalImages(ds, eval_tf)[0][0]  # what evaluation and training read
    assert image.shape == (3, 4, 4) and float(image.min()) == 1.0  # 4095 is white at 12 bits
    cfg.image_bits = 16
    image = EvalImages(ds, transforms_from_config(cfg)[1])[0][0]
    assert float(image.max()) < 0.1  # 4095 of 65535: dark


@pytest.mark.parametrize(
    ("field", "value", "pattern"),
    [
        ("image_percentiles", (98.0, 2.0), r"data\.image_percentiles must be 0 <= low < high"),
        ("image_bits", 0, r"data\.image_bits must be 1\.\.32, got 0"),
        ("image_bands", (0, 1, 2), r"data\.image_bands must be three band numbers >= 1"),
    ],
)
def test_bad_reading_settings_name_the_key(field, value, pattern):
    with pytest.raises(ConfigError, match=pattern):
        image_reading_from_config(DataConfig(**{field: value}))


def test_no_note_for_ordinary_images(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_image(tmp_path / "a.png")
