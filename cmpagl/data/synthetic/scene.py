"""Scenes of the synthetic dataset: the records a scene is made of, the 8 symmetries of the
square, and :func:`sample_scene`, which lays out one scene of a class.

Geometry is sampled in a *canonical* frame (river vertical, runway vertical, ...) and the whole
scene is then turned by one of the 8 symmetries of the square; directions are turned with it, so
what a caption later says about positions is true of the final image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from cmpagl.data.synthetic.classes import SCENE_CLASSES, ClassDef, Option, Place, class_table


# ---------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SceneObject:
    """One drawn object, in the final image frame.

    ``x``, ``y``: centre in [0, 1] (x to the right, y down); ``angle``: direction of the long axis
    in radians (0 = pointing right, pi/2 = pointing down); ``length``/``width``: fractions of the
    image side; ``group``: index into :attr:`SceneSpec.groups`.
    """

    kind: str
    color: str
    x: float
    y: float
    angle: float
    length: float
    width: float
    group: int


@dataclass(frozen=True)
class ObjectGroup:
    """Objects of one kind, colour and size placed together; what a caption describes.

    ``direction``: image region holding every object of the group ("left", "top right",
    "center", ... or "" for none); ``generic``: whether plain image-region words ("on the left")
    may describe it; ``anchors``: (relation, landmark) pairs such as ("beside", "runway");
    ``arrangement``: "row", "scattered" or "single".
    """

    kind: str
    color: str
    size: str
    count: int
    arrangement: str
    direction: str
    generic: bool
    anchors: tuple[tuple[str, str], ...]
    verbs: tuple[str, ...]


@dataclass
class SceneSpec:
    """A scene: its class, background layout (incl. ``"transform"``), groups and objects."""

    scene_class: str
    layout: dict[str, Any]
    groups: list[ObjectGroup]
    objects: list[SceneObject]


# ---------------------------------------------------------------------------------------------
# Sizes and colours of the object kinds
# ---------------------------------------------------------------------------------------------
# (length, width) as fractions of the image side; planes are as wide (wingspan) as long.
OBJECT_SIZES: dict[str, dict[str, tuple[float, float]]] = {
    "plane": {"small": (0.13, 0.13), "large": (0.2, 0.2)},
    "ship": {"small": (0.12, 0.036), "large": (0.2, 0.056)},
    "car": {"": (0.075, 0.038)},
    "tank": {"small": (0.09, 0.09), "large": (0.15, 0.15)},
    "house": {"small": (0.1, 0.075), "large": (0.16, 0.12)},
    "tree": {"": (0.075, 0.075)},
    "court": {"": (0.22, 0.11)},
    "pool": {"": (0.085, 0.05)},
}
KIND_COLORS: dict[str, tuple[str, ...]] = {
    "plane": ("white", "gray", "red", "blue"),
    "ship": ("white", "red", "blue", "gray", "orange"),
    "car": ("white", "red", "blue", "black", "gray", "yellow"),
    "tank": ("white", "gray"),
    "house": ("red", "white", "gray", "blue", "orange"),
    "tree": ("green",),
    "court": ("green", "blue", "red"),
    "pool": ("blue",),
}
_DIRECTION_VECTORS = {
    "left": (-1, 0),
    "right": (1, 0),
    "top": (0, -1),
    "bottom": (0, 1),
    "center": (0, 0),
    "top left": (-1, -1),
    "top right": (1, -1),
    "bottom left": (-1, 1),
    "bottom right": (1, 1),
}
_GAP = 0.02  # free space between neighbours in a row, fraction of the image side


# ---------------------------------------------------------------------------------------------
# The 8 symmetries of the square: (transpose, flip left-right, flip top-bottom), in that order
# ---------------------------------------------------------------------------------------------
Transform = tuple[int, int, int]


def _turn_vec(dx: float, dy: float, t: Transform) -> tuple[float, float]:
    if t[0]:
        dx, dy = dy, dx
    return (-dx if t[1] else dx), (-dy if t[2] else dy)


def unturn_vec(dx: float, dy: float, t: Transform) -> tuple[float, float]:
    """The inverse of the turn ``t`` on a vector: final frame -> canonical frame."""
    dx, dy = (-dx if t[1] else dx), (-dy if t[2] else dy)
    return (dy, dx) if t[0] else (dx, dy)


def _turn_point(x: float, y: float, t: Transform) -> tuple[float, float]:
    dx, dy = _turn_vec(x - 0.5, y - 0.5, t)
    return 0.5 + dx, 0.5 + dy


def _turn_angle(a: float, t: Transform) -> float:
    dx, dy = _turn_vec(math.cos(a), math.sin(a), t)
    return math.atan2(dy, dx)


def _turn_direction(direction: str, t: Transform) -> str:
    if not direction:
        return ""
    vec = _turn_vec(*_DIRECTION_VECTORS[direction], t)
    return next(k for k, v in _DIRECTION_VECTORS.items() if v == vec)


def turn_image(img: Image.Image, t: Transform) -> Image.Image:
    """Turn a canonical-frame image into the final frame (the pixel version of the turn)."""
    if t[0]:
        img = img.transpose(Image.Transpose.TRANSPOSE)
    if t[1]:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if t[2]:
        img = img.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    return img


# ---------------------------------------------------------------------------------------------
# Sampling a scene
# ---------------------------------------------------------------------------------------------
# A placed object in the canonical frame: (x, y, angle, length, width).
_Placed = tuple[float, float, float, float, float]


def _radius(kind: str, length: float, width: float) -> float:
    """Radius of a circle holding the object (for overlap tests)."""
    return (
        0.5 * max(length, width)
        if kind in ("plane", "tank", "tree")
        else 0.5 * math.hypot(length, width)
    )


def _half_extent(
    kind: str, length: float, width: float, angle: float | None
) -> tuple[float, float]:
    """Half sizes (x, y) of the object's bounding box; ``angle=None`` means any angle."""
    if angle is None or kind in ("tank", "tree"):
        r = _radius(kind, length, width)
        return r, r
    c, s = abs(math.cos(angle)), abs(math.sin(angle))
    return 0.5 * (c * length + s * width) + 0.004, 0.5 * (s * length + c * width) + 0.004


def _span(rng: np.random.Generator, lo: float, hi: float) -> float:
    """Uniform in [lo, hi], or the middle when the interval is empty (object as big as box)."""
    return float(rng.uniform(lo, hi)) if hi > lo else (lo + hi) / 2


def _free(x: float, y: float, r: float, taken: list[tuple[float, float, float]]) -> bool:
    return all(math.hypot(x - a, y - b) >= r + c + 0.006 for a, b, c in taken)


def _row_slots(
    rng: np.random.Generator, lo: float, hi: float, half: float, n: int, pitch: float
) -> list[float]:
    """Centres of ``n`` consecutive objects along [lo, hi] (fewer if they do not fit)."""
    if pitch:  # fixed slots (parking stalls): slot k has its centre at lo + (k + 0.5) * pitch
        slots = [lo + (k + 0.5) * pitch for k in range(int((hi - lo) / pitch + 1e-9))]
        n = min(n, len(slots))
        k = int(rng.integers(0, len(slots) - n + 1))
        return slots[k : k + n]
    step = 2 * half + _GAP
    n = max(1, min(n, int((hi - lo - 2 * half) / step + 1e-9) + 1))
    start = _span(rng, lo + half, hi - half - (n - 1) * step)
    return [start + k * step for k in range(n)]


def _place_row(
    rng: np.random.Generator, opt: Option, place: Place, n: int, dims: tuple[float, float]
) -> list[_Placed]:
    flip = math.pi if opt.flip and rng.random() < 0.5 else 0.0
    angle = place.axis + opt.rel + flip
    hx, hy = _half_extent(opt.kind, *dims, angle)
    x0, y0, x1, y1 = place.box
    if abs(math.cos(place.axis)) > 0.5:  # horizontal row
        ys = _span(rng, y0 + hy, y1 - hy)
        return [(x, ys, angle, *dims) for x in _row_slots(rng, x0, x1, hx, n, place.pitch)]
    xs = _span(rng, x0 + hx, x1 - hx)
    return [(xs, y, angle, *dims) for y in _row_slots(rng, y0, y1, hy, n, place.pitch)]


def _scatter_angle(rng: np.random.Generator, opt: Option, place: Place) -> float | None:
    if opt.scatter == "free":
        return None
    if opt.scatter == "axis":
        return place.axis + (math.pi if rng.random() < 0.5 else 0.0) + rng.normal(0, 0.06)
    return place.axis + (math.pi / 2 if rng.random() < 0.5 else 0.0) + rng.normal(0, 0.03)


def _place_scattered(
    rng: np.random.Generator,
    opt: Option,
    place: Place,
    n: int,
    dims: tuple[float, float],
    taken: list[tuple[float, float, float]],
) -> list[_Placed]:
    if place.pitch:  # stalls: a random subset of the slots of one row
        row = _place_row(rng, opt, place, 99, dims)
        keep = sorted(rng.choice(len(row), size=min(n, len(row)), replace=False))
        return [row[k] for k in keep]
    out: list[_Placed] = []
    mine = list(taken)
    x0, y0, x1, y1 = place.box
    for _ in range(80 * n):
        if len(out) == n:
            break
        length, width = dims if opt.kind != "tree" else (dims[0] * rng.uniform(0.8, 1.15),) * 2
        angle = _scatter_angle(rng, opt, place)
        hx, hy = _half_extent(opt.kind, length, width, angle)
        x, y = _span(rng, x0 + hx, x1 - hx), _span(rng, y0 + hy, y1 - hy)
        r = _radius(opt.kind, length, width)
        if _free(x, y, r, mine):
            a = float(rng.uniform(0, 2 * math.pi)) if angle is None else angle
            out.append((x, y, a, length, width))
            mine.append((x, y, r))
    return out


def _sample_group(
    rng: np.random.Generator, opt: Option, place: Place, taken: list[tuple[float, float, float]]
) -> tuple[str, str, list[_Placed]]:
    """Pick size, count and arrangement and place the objects (canonical frame)."""
    size = str(rng.choice(opt.sizes or tuple(OBJECT_SIZES[opt.kind])))
    length, width = OBJECT_SIZES[opt.kind][size]
    scale = float(rng.uniform(0.95, 1.05))
    dims = (length * scale, width * scale)
    n = int(rng.integers(1, 7))
    arrangement = str(rng.choice(opt.arrangements)) if n > 1 else "single"
    if arrangement == "row":
        placed = []
        for _ in range(8):  # a few tries to keep clear of the other group
            row = _place_row(rng, opt, place, n, dims)
            placed = [p for p in row if _free(p[0], p[1], _radius(opt.kind, *dims), taken)]
            if len(placed) == len(row):
                break
    else:
        placed = _place_scattered(rng, opt, place, n, dims, taken)
    if arrangement == "row" and len(placed) < 2:
        arrangement = "single"
    if place.pitch and arrangement == "scattered":  # stalls picked at random may be adjacent
        arrangement = "row" if _consecutive(placed, place.pitch) else "scattered"
    return size, arrangement if len(placed) > 1 else "single", placed


def _consecutive(placed: list[_Placed], pitch: float) -> bool:
    xs = sorted(p[0] for p in placed)
    return all(abs(b - a - pitch) < 1e-6 for a, b in zip(xs, xs[1:], strict=False))


def _choose_options(rng: np.random.Generator, cdef: ClassDef) -> list[Option]:
    """One group always; a second one of another kind half of the time."""
    first = [o for o in cdef.options if not cdef.primary or o.kind in cdef.primary]
    chosen = [first[int(rng.integers(len(first)))]]
    others = [o for o in cdef.options if o.kind != chosen[0].kind]
    if others and rng.random() < 0.5:
        chosen.append(others[int(rng.integers(len(others)))])
    return chosen


def sample_scene(rng: np.random.Generator, scene_class: str | None = None) -> SceneSpec:
    """Sample a scene of ``scene_class`` (a random class if None): layout, groups, objects.

    Positions are in the final image frame, after the scene's random symmetry
    (``layout["transform"]``).
    """
    table = class_table()
    if scene_class is None:
        scene_class = SCENE_CLASSES[int(rng.integers(len(SCENE_CLASSES)))]
    if scene_class not in table:
        raise ValueError(f"unknown scene class {scene_class!r}; known: {', '.join(table)}")
    cdef = table[scene_class]
    layout, places = cdef.layout(rng)
    flags = rng.integers(0, 2, 3)
    t: Transform = (int(flags[0]), int(flags[1]), int(flags[2]))
    layout["transform"] = t
    groups: list[ObjectGroup] = []
    objects: list[SceneObject] = []
    taken: list[tuple[float, float, float]] = []
    used: set[str] = set()
    for opt in _choose_options(rng, cdef):
        names = [p for p in opt.places if p not in used] or list(opt.places)
        name = names[int(rng.integers(len(names)))]
        used.add(name)
        place = places[name]
        color = str(rng.choice(KIND_COLORS[opt.kind]))
        size, arrangement, placed = _sample_group(rng, opt, place, taken)
        if not placed:
            continue
        for x, y, a, length, width in placed:
            taken.append((x, y, _radius(opt.kind, length, width)))
            fx, fy = _turn_point(x, y, t)
            objects.append(
                SceneObject(opt.kind, color, fx, fy, _turn_angle(a, t), length, width, len(groups))
            )
        groups.append(
            ObjectGroup(
                opt.kind,
                color,
                size,
                len(placed),
                arrangement,
                _turn_direction(place.direction, t),
                place.generic,
                place.anchors,
                opt.verbs,
            )
        )
    return SceneSpec(scene_class, layout, groups, objects)
