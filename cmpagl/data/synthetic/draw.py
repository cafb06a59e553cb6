"""Drawing primitives of the synthetic aerial-scene generator (:mod:`cmpagl.data.synthetic`).

Everything here draws on a square canvas of side ``S`` pixels (the generator renders at twice the
output size and downsamples, which antialiases the edges). Geometry arrives in normalised image
coordinates in [0, 1] (x to the right, y down) and is scaled to pixels here, so the scene logic
never deals with pixels. Backgrounds are drawn in a *canonical* frame (rivers vertical, the runway
vertical, ...); the caller turns the finished background into the final frame.

Only numpy and Pillow: no torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

RGB = tuple[int, int, int]
# A drawable part: (shape, points in px, fill colour, line width). shape is "poly", "ellipse"
# (points = the two bbox corners) or "line" (points = the two ends, drawn with the width).
Part = tuple[str, list[tuple[float, float]], RGB, int]

COLORS: dict[str, RGB] = {
    "white": (236, 236, 230),
    "gray": (138, 140, 146),
    "red": (198, 46, 38),
    "blue": (42, 84, 198),
    "green": (40, 112, 46),
    "yellow": (228, 198, 44),
    "black": (30, 30, 34),
    "orange": (230, 122, 34),
}
ASPHALT: RGB = (78, 80, 84)
CONCRETE: RGB = (172, 170, 162)
TRACK: RGB = (176, 84, 62)


def shade(rgb: Sequence[float], f: float) -> RGB:
    """``rgb`` scaled by ``f`` and clipped to [0, 255]."""
    r, g, b = (int(min(255, max(0, c * f))) for c in rgb)
    return r, g, b


def jitter(rng: np.random.Generator, rgb: Sequence[float], amount: float) -> np.ndarray:
    """``rgb`` plus a uniform per-channel offset in [-amount, amount]; float32 [3]."""
    return np.asarray(rgb, np.float32) + rng.uniform(-amount, amount, 3).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Textures: float32 arrays [S, S, 3] in 0..255 (values may leave the range; clipped at the end)
# ---------------------------------------------------------------------------------------------
def smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Band-limited noise [size, size], float32, zero mean and unit std.

    ``cells`` random values per side are upsampled bicubically, so features are ~size/cells px.
    """
    coarse = rng.standard_normal((cells + 1, cells + 1)).astype(np.float32)
    up = np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC))
    return (up - up.mean()) / (up.std() + 1e-6)


def coords(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Normalised pixel-centre coordinates ``(x, y)``, each [size, size] float32."""
    t = (np.arange(size, dtype=np.float32) + 0.5) / size
    return np.broadcast_to(t[None, :], (size, size)), np.broadcast_to(t[:, None], (size, size))


def texture(
    rng: np.random.Generator,
    size: int,
    rgb: Sequence[float],
    tone: float = 0.08,
    grain: float = 5.0,
    cells: int = 5,
) -> np.ndarray:
    """Flat colour with slow tone variation (relative ``tone``) and pixel grain; [S, S, 3]."""
    slow = 1.0 + tone * smooth_noise(rng, size, cells)
    fine = grain * rng.standard_normal((size, size)).astype(np.float32)
    return np.asarray(rgb, np.float32)[None, None, :] * slow[..., None] + fine[..., None]


def blend(base: np.ndarray, top: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``base`` where mask is 0, ``top`` where it is 1 (mask [S, S] in [0, 1])."""
    m = mask[..., None]
    return base * (1.0 - m) + top * m


def grass(rng: np.random.Generator, size: int, light: bool = False) -> np.ndarray:
    """Lawn / meadow: green with mottled patches. [S, S, 3]."""
    base = jitter(rng, (118, 158, 76) if light else (88, 130, 62), 12)
    out = texture(rng, size, base, tone=0.10, grain=5.0, cells=4)
    return out + 7.0 * smooth_noise(rng, size, 24)[..., None]


def forest(rng: np.random.Generator, size: int) -> np.ndarray:
    """Closed canopy: blobs of tree crowns (~size/48 px) in dark greens. [S, S, 3]."""
    crowns = 1.0 / (1.0 + np.exp(-2.5 * smooth_noise(rng, size, 48)))
    dark, light = jitter(rng, (22, 48, 26), 6), jitter(rng, (62, 104, 46), 10)
    out = dark + (light - dark) * crowns[..., None]
    out *= (1.0 + 0.12 * smooth_noise(rng, size, 4))[..., None]
    return out + 4.0 * rng.standard_normal((size, size, 1)).astype(np.float32)


def water(rng: np.random.Generator, size: int) -> np.ndarray:
    """Open water: blue-teal with a gradient and faint ripples. [S, S, 3]."""
    palette = ((34, 72, 112), (28, 88, 112), (40, 82, 130), (30, 62, 96))
    base = jitter(rng, palette[rng.integers(len(palette))], 6)
    x, y = coords(size)
    a, b = rng.uniform(0, 2 * math.pi, 2)
    grad = 1.0 + rng.uniform(0.05, 0.2) * (x * math.cos(a) + y * math.sin(a) - 0.5)
    phase = 2 * math.pi * rng.uniform(10, 18) * (x * math.cos(b) + y * math.sin(b))
    ripple = 3.0 * np.sin(phase + 2.0 * smooth_noise(rng, size, 5))
    out = base[None, None, :] * grad[..., None] + ripple[..., None]
    return out + 2.5 * rng.standard_normal((size, size, 1)).astype(np.float32)


def sand(rng: np.random.Generator, size: int, dunes: float = 8.0) -> np.ndarray:
    """Sand with wind ripples / dunes of amplitude ``dunes``. [S, S, 3]."""
    base = jitter(rng, (210, 188, 140), 10)
    x, y = coords(size)
    a = rng.uniform(0, math.pi)
    phase = 2 * math.pi * rng.uniform(3, 7) * (x * math.cos(a) + y * math.sin(a))
    ridge = dunes * np.sin(phase + 2.5 * smooth_noise(rng, size, 4))
    return texture(rng, size, base, tone=0.06, grain=5.0) + ridge[..., None]


def paved(rng: np.random.Generator, size: int, rgb: RGB) -> np.ndarray:
    """Asphalt or concrete: flat with stains. [S, S, 3]."""
    return texture(rng, size, jitter(rng, rgb, 8), tone=0.06, grain=6.0, cells=8)


def farmland(rng: np.random.Generator, size: int) -> np.ndarray:
    """Parcels of crops in varied colours, with row stripes inside each parcel. [S, S, 3]."""
    palette = np.array(
        [
            (118, 150, 70),
            (172, 160, 92),
            (142, 112, 80),
            (92, 128, 60),
            (192, 176, 120),
            (150, 160, 84),
        ],
        np.float32,
    )
    x, y = coords(size)
    t = rng.uniform(0, math.pi)
    u = x * math.cos(t) + y * math.sin(t)  # across the parcels
    v = -x * math.sin(t) + y * math.cos(t)  # along the parcels
    cuts_u = np.cumsum(rng.uniform(0.1, 0.3, 12)) - 0.75
    cuts_v = np.cumsum(rng.uniform(0.25, 0.6, 6)) - 0.75
    i, j = np.searchsorted(cuts_u, u), np.searchsorted(cuts_v, v)
    table = palette[rng.integers(len(palette), size=(13, 7))] + rng.uniform(-10, 10, (13, 7, 3))
    out = table[i, j]
    stripes = 5.0 * np.sin(2 * math.pi * u * size / rng.uniform(4, 7))  # crop rows
    out += stripes[..., None] * (1.0 + 0.8 * (table[i, j, 1:2] > 150))
    return out + texture(rng, size, (0, 0, 0), tone=0.0, grain=4.0)


def to_image(arr: np.ndarray) -> Image.Image:
    """Float [S, S, 3] → PIL RGB image (clipped)."""
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


# ---------------------------------------------------------------------------------------------
# Objects: every kind is a list of parts; the same parts give the shadow silhouette
# ---------------------------------------------------------------------------------------------
_PLANE = (
    ((0.5, 0), (0.43, 0.05), (-0.46, 0.035), (-0.5, 0), (-0.46, -0.035), (0.43, -0.05)),
    ((0.12, 0.04), (-0.12, 0.5), (-0.22, 0.5), (-0.08, 0.04)),
    ((0.12, -0.04), (-0.12, -0.5), (-0.22, -0.5), (-0.08, -0.04)),
    ((-0.36, 0.03), (-0.47, 0.2), (-0.53, 0.2), (-0.46, 0.03)),
    ((-0.36, -0.03), (-0.47, -0.2), (-0.53, -0.2), (-0.46, -0.03)),
)
_SHIP_HULL = ((0.5, 0), (0.3, 0.5), (-0.5, 0.5), (-0.5, -0.5), (0.3, -0.5))
_RECT = ((0.5, 0.5), (-0.5, 0.5), (-0.5, -0.5), (0.5, -0.5))


def _poly(
    local: Sequence[tuple[float, float]],
    sx: float,
    sy: float,
    x: float,
    y: float,
    angle: float,
    ox: float = 0.0,
    oy: float = 0.0,
) -> list[tuple[float, float]]:
    """Local points scaled by (sx, sy), shifted by (ox, oy), rotated by angle, moved to (x, y)."""
    c, s = math.cos(angle), math.sin(angle)
    pts = []
    for u, v in local:
        u, v = u * sx + ox, v * sy + oy
        pts.append((x + c * u - s * v, y + s * u + c * v))
    return pts


def _rect(
    x: float, y: float, a: float, length: float, width: float, u0: float = 0.0, v0: float = 0.0
) -> list[tuple[float, float]]:
    return _poly(_RECT, length, width, x, y, a, u0, v0)


def _disc(x: float, y: float, r: float) -> list[tuple[float, float]]:
    return [(x - r, y - r), (x + r, y + r)]


def object_parts(
    kind: str, x: float, y: float, angle: float, length: float, width: float, rgb: RGB
) -> list[Part]:
    """The parts of one object at pixel centre (x, y), axis ``angle``, size length × width px."""
    L, W, a = length, width, angle
    if kind == "plane":
        parts: list[Part] = [("poly", _poly(p, L, L, x, y, a), rgb, 0) for p in _PLANE[1:]]
        return parts + [("poly", _poly(_PLANE[0], L, L, x, y, a), shade(rgb, 1.05), 0)]
    if kind == "ship":
        cabin = (235, 235, 230) if sum(rgb) < 600 else (120, 122, 128)
        return [
            ("poly", _poly(_SHIP_HULL, L, W, x, y, a), rgb, 0),
            ("poly", _rect(x, y, a, 0.24 * L, 0.6 * W, -0.22 * L), cabin, 0),
        ]
    if kind == "car":
        glass = (40, 44, 52) if sum(rgb) > 200 else (120, 130, 140)
        return [
            ("poly", _rect(x, y, a, L, W), rgb, 0),
            ("poly", _rect(x, y, a, 0.16 * L, 0.8 * W, 0.2 * L), glass, 0),
            ("poly", _rect(x, y, a, 0.12 * L, 0.8 * W, -0.32 * L), glass, 0),
        ]
    if kind == "tank":
        r = L / 2
        return [
            ("ellipse", _disc(x, y, r), shade(rgb, 0.75), 0),
            ("ellipse", _disc(x, y, 0.88 * r), rgb, 0),
            ("ellipse", _disc(x, y, 0.45 * r), shade(rgb, 0.9), 0),
        ]
    if kind == "house":
        return [
            ("poly", _rect(x, y, a, L, W / 2, 0, -W / 4), rgb, 0),
            ("poly", _rect(x, y, a, L, W / 2, 0, W / 4), shade(rgb, 0.8), 0),
        ]
    if kind == "tree":
        r = L / 2
        return [
            ("ellipse", _disc(x, y, r), (30, 78, 34), 0),
            ("ellipse", _disc(x - 0.2 * r, y - 0.2 * r, 0.55 * r), (58, 116, 50), 0),
        ]
    if kind == "court":
        line = (240, 240, 240)
        lw = max(1, round(W / 40))
        return [
            ("poly", _rect(x, y, a, L, W), shade(rgb, 0.7), 0),
            ("poly", _rect(x, y, a, 0.78 * L, 0.66 * W), rgb, 0),
            ("line", _poly(((0, -0.33), (0, 0.33)), L, W, x, y, a), line, lw),
            ("line", _poly(((-0.2, 0), (0.2, 0)), L, W, x, y, a), line, lw),
            ("line", _poly(((-0.2, -0.33), (-0.2, 0.33)), L, W, x, y, a), line, lw),
            ("line", _poly(((0.2, -0.33), (0.2, 0.33)), L, W, x, y, a), line, lw),
        ]
    if kind == "pool":
        return [
            ("poly", _rect(x, y, a, L, W), (232, 232, 226), 0),
            ("poly", _rect(x, y, a, 0.8 * L, 0.7 * W), (54, 156, 214), 0),
        ]
    raise ValueError(f"unknown object kind {kind!r}")


# How far an object casts its shadow, relative to the canvas (tall things cast longer ones).
SHADOW_LENGTH = {
    "plane": 0.012,
    "ship": 0.008,
    "car": 0.006,
    "tank": 0.02,
    "house": 0.018,
    "tree": 0.02,
    "court": 0.0,
    "pool": 0.0,
    "factory": 0.03,
}


def _draw_part(
    draw: ImageDraw.ImageDraw,
    part: Part,
    dx: float = 0.0,
    dy: float = 0.0,
    fill: int | RGB | None = None,
) -> None:
    shape, pts, rgb, width = part
    pts = [(px + dx, py + dy) for px, py in pts]
    col = rgb if fill is None else fill
    if shape == "poly":
        draw.polygon(pts, fill=col)
    elif shape == "ellipse":
        draw.ellipse(pts, fill=col)
    else:
        draw.line(pts, fill=col, width=width)


def composite(
    img: Image.Image,
    objects: Sequence[tuple[str, list[Part]]],
    shadow: tuple[float, float],
    strength: float = 0.45,
) -> Image.Image:
    """Draw shadows (darkening what lies under them), then the objects' parts, onto ``img``.

    ``objects`` is a list of (kind, parts); ``shadow`` the direction of the shadows (unit-ish
    vector in image axes). Shadows first for all objects so that no shadow lies on an object.
    """
    if not objects:
        return img
    size = img.size[0]
    mask = Image.new("L", img.size, 0)
    md = ImageDraw.Draw(mask)
    for kind, parts in objects:
        d = SHADOW_LENGTH.get(kind, 0.01) * size
        for part in parts:
            if part[0] != "line":
                _draw_part(md, part, shadow[0] * d, shadow[1] * d, fill=255)
    m = np.asarray(mask.filter(ImageFilter.BoxBlur(1)), np.float32) / 255.0
    arr = np.asarray(img, np.float32) * (1.0 - strength * m)[..., None]
    out = Image.fromarray(arr.astype(np.uint8))
    draw = ImageDraw.Draw(out)
    for _, parts in objects:
        for part in parts:
            _draw_part(draw, part)
    return out


def draw_road(
    draw: ImageDraw.ImageDraw,
    size: int,
    horizontal: bool,
    at: float,
    width: float,
    start: float = 0.0,
    end: float = 1.0,
    dashes: bool = True,
) -> None:
    """An axis-aligned road at normalised position ``at`` (its centre), from start to end."""
    s, h = size, width / 2
    box = (
        (start * s, (at - h) * s, end * s, (at + h) * s)
        if horizontal
        else ((at - h) * s, start * s, (at + h) * s, end * s)
    )
    draw.rectangle(box, fill=ASPHALT)
    if not dashes:
        return
    lw = max(1, round(0.006 * s))
    for t in np.arange(start + 0.02, end, 0.06):
        a, b = t * s, min(t + 0.03, end) * s
        seg = [(a, at * s), (b, at * s)] if horizontal else [(at * s, a), (at * s, b)]
        draw.line(seg, fill=(220, 220, 210), width=lw)


# ---------------------------------------------------------------------------------------------
# Scene backgrounds, in the canonical frame; ``p`` holds the layout sampled by the scene logic
# ---------------------------------------------------------------------------------------------
Params = dict


def bg_river(rng: np.random.Generator, size: int, p: Params) -> np.ndarray:
    """Grass with a vertical river of width p["w"] (slightly wobbly, with sandy banks)."""
    x, _ = coords(size)
    wobble = 0.01 * smooth_noise(rng, size, 5)[:, :1]  # one offset per row
    dist = p["w"] / 2 - np.abs(x - 0.5 - wobble)  # > 0 inside the river
    out = grass(rng, size)
    bank = texture(rng, size, (150, 140, 104), tone=0.05)
    out = blend(out, bank, np.clip((dist + 0.018) * size / 1.5, 0.0, 1.0))
    return blend(out, water(rng, size), np.clip(dist * size / 1.5, 0.0, 1.0))


def bg_lake(rng: np.random.Generator, size: int, p: Params) -> np.ndarray:
    x, y = coords(size)
    d = np.sqrt(((x - 0.5) / p["rx"]) ** 2 + ((y - 0.5) / p["ry"]) ** 2)
    d = d * (1.0 + 0.07 * smooth_noise(rng, size, 4))  # an irregular shore
    wet = np.clip((1.0 - d) * size * p["ry"] / 1.5, 0.0, 1.0)
    return blend(grass(rng, size), water(rng, size), wet)


def bg_beach(rng: np.random.Generator, size: int, p: Params) -> np.ndarray:
    x, _ = coords(size)
    edge = p["s"] + 0.015 * smooth_noise(rng, size, 6)[:, :1]
    inland = p["s"] + p["b"] + 0.025 * smooth_noise(rng, size, 5)[:, :1]
    out = blend(grass(rng, size), sand(rng, size, dunes=3.0), np.clip((inland - x) * size, 0, 1))
    foam = np.clip(1.0 - np.abs(x - edge + 0.006) * size / 2.5, 0.0, 1.0) * 0.8
    out = blend(out, water(rng, size), np.clip((edge - x) * size, 0, 1))
    return blend(out, np.full_like(out, 236.0), foam)


def bg_bridge(rng: np.random.Generator, size: int, p: Params) -> Image.Image:
    img = to_image(bg_river(rng, size, p))
    draw = ImageDraw.Draw(img)
    draw_road(draw, size, True, p["b"], 0.06, dashes=False)
    half, s = p["w"] / 2 + 0.04, size
    x0, x1, y0, y1 = (0.5 - half) * s, (0.5 + half) * s, (p["b"] - 0.04) * s, (p["b"] + 0.04) * s
    draw.rectangle((x0, y1, x1, y1 + 0.02 * s), fill=(22, 44, 62))  # shadow on the water
    draw.rectangle((x0, y0, x1, y1), fill=(176, 174, 168))
    for yy in (y0 + 1, y1 - 1):  # railings
        draw.line([(x0, yy), (x1, yy)], fill=(236, 236, 232), width=max(1, round(0.006 * s)))
    return img


def bg_residential(
    rng: np.random.Generator, size: int, p: Params, shadow: tuple[float, float]
) -> Image.Image:
    """Dense housing in rows on both sides of a horizontal main road and side streets."""
    img = to_image(paved(rng, size, (152, 150, 140)))
    draw = ImageDraw.Draw(img)
    for x in p["streets"]:
        draw_road(draw, size, False, x, 0.045, dashes=False)
    draw_road(draw, size, True, 0.5, p["road_w"])
    roofs = ((182, 72, 60), (204, 202, 196), (128, 130, 136), (92, 110, 160), (204, 132, 72))
    houses = []
    for y in (0.09, 0.19, 0.31, 0.41, 0.59, 0.69, 0.81, 0.91):
        x = rng.uniform(0.0, 0.04)
        while x < 0.98:
            length = rng.uniform(0.065, 0.085)
            cx = x + length / 2
            if all(abs(cx - s) > 0.022 + length / 2 for s in p["streets"]):
                rgb = shade(jitter(rng, roofs[rng.integers(len(roofs))], 12), 1.0)
                houses.append(
                    (
                        "house",
                        object_parts(
                            "house", cx * size, y * size, 0.0, length * size, 0.075 * size, rgb
                        ),
                    )
                )
            x += length + rng.uniform(0.012, 0.025)
    return composite(img, houses, shadow)


def bg_industrial(
    rng: np.random.Generator, size: int, p: Params, shadow: tuple[float, float]
) -> Image.Image:
    """Concrete yard with two large factory halls in the right strip."""
    img = to_image(paved(rng, size, CONCRETE))
    halls = []
    for y0, y1 in ((0.04, p["split"] - 0.03), (p["split"] + 0.03, 0.96)):
        roof = shade(
            jitter(rng, ((150, 156, 166), (112, 132, 162), (200, 200, 198))[rng.integers(3)], 8),
            1.0,
        )
        s, length, width = size, 0.31, y1 - y0
        x, y = 0.805 * s, (y0 + y1) / 2 * s
        parts: list[Part] = [("poly", _rect(x, y, 0.0, length * s, width * s), roof, 0)]
        for k in range(1, 6):  # roof ridges
            yy = (y0 + k * width / 6) * s
            parts.append(
                ("line", [(x - length * s / 2, yy), (x + length * s / 2, yy)], shade(roof, 0.8), 1)
            )
        halls.append(("factory", parts))
    return composite(img, halls, shadow)


def bg_airport(rng: np.random.Generator, size: int, p: Params) -> Image.Image:
    img = to_image(grass(rng, size))
    draw, s = ImageDraw.Draw(img), size
    left, right = p["xr"] - p["rw"] / 2, p["xr"] + p["rw"] / 2
    draw.rectangle((0.02 * s, 0.02 * s, (left - 0.04) * s, 0.98 * s), fill=CONCRETE)  # apron
    for y in (0.2, 0.8):  # taxiways
        draw.rectangle(
            ((left - 0.05) * s, (y - 0.025) * s, left * s, (y + 0.025) * s), fill=ASPHALT
        )
    draw.rectangle((left * s, 0, right * s, s), fill=(66, 68, 72))
    lw = max(1, round(0.006 * s))
    for xx in (left + 0.008, right - 0.008):
        draw.line([(xx * s, 0), (xx * s, s)], fill=(226, 226, 220), width=lw)
    for y in np.arange(0.14, 0.86, 0.08):
        draw.line(
            [(p["xr"] * s, y * s), (p["xr"] * s, (y + 0.04) * s)],
            fill=(236, 236, 230),
            width=2 * lw,
        )
    for y in (0.02, 0.9):  # threshold markings
        for xx in np.linspace(left + 0.02, right - 0.02, 6):
            draw.line(
                [(xx * s, y * s), (xx * s, (y + 0.07) * s)], fill=(236, 236, 230), width=2 * lw
            )
    return img


def bg_harbour(rng: np.random.Generator, size: int, p: Params) -> Image.Image:
    """Water above y = p["q"], a concrete quay below it with a lighter edge."""
    _, y = coords(size)
    out = blend(water(rng, size), paved(rng, size, CONCRETE), np.clip((y - p["q"]) * size, 0, 1))
    img = to_image(out)
    draw, s = ImageDraw.Draw(img), size
    draw.rectangle((0, p["q"] * s, s, (p["q"] + 0.012) * s), fill=(208, 206, 198))
    for x in np.arange(0.05, 1.0, 0.1):  # bollards
        draw.rectangle(
            (x * s, (p["q"] + 0.002) * s, (x + 0.008) * s, (p["q"] + 0.01) * s), fill=(60, 60, 60)
        )
    return img


def bg_parking(rng: np.random.Generator, size: int, p: Params) -> Image.Image:
    """Asphalt with two rows of stalls (lines every p["pitch"] from p["origin"]) and grass edges."""
    _, y = coords(size)
    edge = np.clip((np.minimum(y, 1.0 - y) - 0.13) * size, 0.0, 1.0)
    img = to_image(blend(grass(rng, size), paved(rng, size, ASPHALT), edge))
    draw, s = ImageDraw.Draw(img), size
    lw = max(1, round(0.005 * s))
    for row in p["rows"]:
        y0, y1 = (row - 0.055) * s, (row + 0.055) * s
        for k in range(p["stalls"] + 1):
            x = (p["origin"] + k * p["pitch"]) * s
            draw.line([(x, y0), (x, y1)], fill=(226, 226, 220), width=lw)
        x0, x1 = p["origin"] * s, (p["origin"] + p["stalls"] * p["pitch"]) * s
        draw.line(
            [(x0, y0 if row < 0.5 else y1), (x1, y0 if row < 0.5 else y1)],
            fill=(226, 226, 220),
            width=lw,
        )
    return img


def bg_playground(rng: np.random.Generator, size: int, p: Params) -> Image.Image:
    """A red running track (stadium shape) around a striped green football field."""
    img = to_image(grass(rng, size))
    draw, s = ImageDraw.Draw(img), size
    cx, hw, hh = p["cx"], p["hw"], p["hh"]
    draw.rounded_rectangle(
        ((cx - hw) * s, (0.5 - hh) * s, (cx + hw) * s, (0.5 + hh) * s),
        radius=hw * s,
        fill=shade(TRACK, rng.uniform(0.9, 1.1)),
    )
    lane = max(1, round(0.004 * s))
    for inset in (0.015, 0.03):
        draw.rounded_rectangle(
            (
                (cx - hw + inset) * s,
                (0.5 - hh + inset) * s,
                (cx + hw - inset) * s,
                (0.5 + hh - inset) * s,
            ),
            radius=(hw - inset) * s,
            outline=(220, 200, 190),
            width=lane,
        )
    i = 0.045
    draw.rounded_rectangle(
        ((cx - hw + i) * s, (0.5 - hh + i) * s, (cx + hw - i) * s, (0.5 + hh - i) * s),
        radius=(hw - i) * s,
        fill=(64, 136, 58),
    )
    top, bottom, step = 0.5 - hh + hw, 0.5 + hh - hw, (2 * (hh - hw)) / 8
    for k in range(0, 8, 2):  # mowing stripes
        y0 = top + k * step
        draw.rectangle(
            ((cx - hw + i) * s, y0 * s, (cx + hw - i) * s, (y0 + step) * s), fill=(78, 150, 66)
        )
    white = (236, 236, 232)
    draw.rectangle(
        ((cx - hw + 0.07) * s, top * s, (cx + hw - 0.07) * s, bottom * s), outline=white, width=lane
    )
    draw.line(
        [((cx - hw + 0.07) * s, 0.5 * s), ((cx + hw - 0.07) * s, 0.5 * s)], fill=white, width=lane
    )
    r = 0.06 * s
    draw.ellipse((cx * s - r, 0.5 * s - r, cx * s + r, 0.5 * s + r), outline=white, width=lane)
    return img


def bg_crossroads(rng: np.random.Generator, size: int, p: Params) -> Image.Image:
    """Two roads crossing at the centre, with zebra crossings on every arm."""
    base = paved(rng, size, (160, 158, 150)) if p["paved"] else grass(rng, size)
    img = to_image(base)
    draw, s = ImageDraw.Draw(img), size
    w = p["road_w"]
    draw_road(draw, size, True, 0.5, w)
    draw_road(draw, size, False, 0.5, w)
    draw.rectangle(
        ((0.5 - w / 2) * s, (0.5 - w / 2) * s, (0.5 + w / 2) * s, (0.5 + w / 2) * s), fill=ASPHALT
    )
    lw = max(1, round(0.008 * s))
    for k in np.linspace(-w / 2 + 0.012, w / 2 - 0.012, 6):
        for d in (-1, 1):
            a, b = (0.5 + d * (w / 2 + 0.01)) * s, (0.5 + d * (w / 2 + 0.04)) * s
            draw.line([(a, (0.5 + k) * s), (b, (0.5 + k) * s)], fill=(236, 236, 232), width=lw)
            draw.line([((0.5 + k) * s, a), ((0.5 + k) * s, b)], fill=(236, 236, 232), width=lw)
    return img


def bg_sparse(rng: np.random.Generator, size: int, p: Params) -> Image.Image:
    img = to_image(grass(rng, size, light=bool(rng.integers(2))))
    draw_road(ImageDraw.Draw(img), size, True, 0.5, p["road_w"])
    return img


def bg_meadow(rng: np.random.Generator, size: int) -> np.ndarray:
    """Light grass with scattered flowers."""
    out = grass(rng, size, light=True)
    flowers = rng.random((size, size)) < 0.003
    out[flowers] = jitter(rng, (230, 220, 150), 20)
    return out


def background(
    scene_class: str, p: Params, size: int, rng: np.random.Generator, shadow: tuple[float, float]
) -> Image.Image:
    """The background of a scene class in the canonical frame, as an RGB image of side ``size``.

    ``shadow`` is the shadow direction in the canonical frame (for drawn buildings).
    """
    simple = {
        "farmland": lambda: farmland(rng, size),
        "forest": lambda: forest(rng, size),
        "river": lambda: bg_river(rng, size, p),
        "lake": lambda: bg_lake(rng, size, p),
        "beach": lambda: bg_beach(rng, size, p),
        "desert": lambda: sand(rng, size, dunes=16.0),
        "meadow": lambda: bg_meadow(rng, size),
    }
    if scene_class in simple:
        return to_image(simple[scene_class]())
    drawn = {
        "bridge": lambda: bg_bridge(rng, size, p),
        "dense_residential": lambda: bg_residential(rng, size, p, shadow),
        "sparse_residential": lambda: bg_sparse(rng, size, p),
        "industrial": lambda: bg_industrial(rng, size, p, shadow),
        "airport": lambda: bg_airport(rng, size, p),
        "harbour": lambda: bg_harbour(rng, size, p),
        "parking_lot": lambda: bg_parking(rng, size, p),
        "playground": lambda: bg_playground(rng, size, p),
        "crossroads": lambda: bg_crossroads(rng, size, p),
    }
    if scene_class not in drawn:
        raise ValueError(f"no background for scene class {scene_class!r}")
    return drawn[scene_class]()
