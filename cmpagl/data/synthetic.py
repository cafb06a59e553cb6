"""Procedurally generated aerial scenes with captions: the embedded default dataset of cmpagl.

Real remote-sensing caption sets (RSICD, RSITMD, UCM) need downloads; this generator gives every
test, notebook and CPU smoke run a dataset of the same *shape*, written in the Karpathy JSON
format so the ordinary reader (:func:`cmpagl.data.readers.read_karpathy`) serves it.

What makes it a fair retrieval test of the CMPAGL thesis (global scene + local objects):

* 16 scene classes typical of RSICD/UCM, each a textured background with landmarks (fields,
  canopy, water, sand, asphalt, runway, roads, track, bridge, ...).
* Groups of objects (planes, ships, cars, storage tanks, houses, trees, tennis courts, swimming
  pools) with a count (1-6), colour, size, arrangement and position. Object kinds are shared
  across classes (cars in parking lots, crossroads, residential and industrial areas; ships in
  rivers, lakes, harbours, beaches; trees and houses almost everywhere).
* 5 captions per image: scene-level sentences come from a small fixed pool per class (so they
  repeat across images, as in UCM where 1,050 test captions hold 377 distinct strings) and
  object-level sentences state count, colour, size and position of a group. A model that sees
  only the scene cannot tell images of a class apart; one that sees only objects confuses classes.

Geometry is sampled in a *canonical* frame (river vertical, runway vertical, ...) and the whole
scene is then turned by one of the 8 symmetries of the square; position words are derived after
the turn, so they are true of the final image. Image ``i`` of a dataset draws everything from its
own random stream (seed, i), so a dataset is byte-for-byte reproducible.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cmpagl.data import _synthetic_draw as draw
from cmpagl.data._synthetic_classes import SCENE_CLASSES, ClassDef, Option, Place, class_table

__all__ = [
    "SCENE_CLASSES",
    "ObjectGroup",
    "SceneObject",
    "SceneSpec",
    "captions_for",
    "generate_synthetic_dataset",
    "render_scene",
    "sample_scene",
    "tokenize",
]

GENERATOR_NAME = "cmpagl.synthetic"
GENERATOR_VERSION = 1
CAPTIONS_PER_IMAGE = 5


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
# Vocabulary
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
NOUNS: dict[str, tuple[tuple[str, str], ...]] = {  # (singular, plural) synonyms
    "plane": (("plane", "planes"), ("airplane", "airplanes"), ("aircraft", "aircraft")),
    "ship": (("ship", "ships"), ("boat", "boats")),
    "car": (("car", "cars"), ("vehicle", "vehicles")),
    "tank": (("storage tank", "storage tanks"), ("oil tank", "oil tanks"), ("tank", "tanks")),
    "house": (("house", "houses"), ("building", "buildings")),
    "tree": (("tree", "trees"),),
    "court": (("tennis court", "tennis courts"),),
    "pool": (("swimming pool", "swimming pools"), ("pool", "pools")),
}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six")
_COLOR_MENTION = {"tree": 0.4, "pool": 0.3}  # how often a caption names the colour (else 0.85)
_REGION_WORDS = {
    "left": ("on the left", "on the left side", "on the left side of the image"),
    "right": ("on the right", "on the right side", "on the right side of the image"),
    "top": ("at the top", "at the top of the image", "in the upper part of the image"),
    "bottom": ("at the bottom", "at the bottom of the image", "in the lower part of the image"),
    "center": ("in the middle", "in the center", "in the middle of the image"),
    "top left": ("in the top left corner", "at the upper left of the image"),
    "top right": ("in the top right corner", "at the upper right of the image"),
    "bottom left": ("in the bottom left corner", "at the lower left of the image"),
    "bottom right": ("in the bottom right corner", "at the lower right of the image"),
}
_BESIDE_WORDS = {
    "left": ("to the left of the {}", "on the left side of the {}"),
    "right": ("to the right of the {}", "on the right side of the {}"),
    "top": ("above the {}", "on the upper side of the {}"),
    "bottom": ("below the {}", "on the lower side of the {}"),
}
_RELATION_WORDS = {
    "beside": ("beside the {}", "next to the {}"),
    "near": ("near the {}", "next to the {}"),
    "on": ("on the {}",),
    "in": ("in the {}",),
    "along": ("along the {}",),
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
_SHADOW = (1.0, 1.0)  # sun from the top left in the final image


def tokenize(raw: str) -> list[str]:
    """Lowercase words of a caption, punctuation dropped (Karpathy ``tokens``)."""
    return re.findall(r"[a-z]+", raw.lower())


# ---------------------------------------------------------------------------------------------
# The 8 symmetries of the square: (transpose, flip left-right, flip top-bottom), in that order
# ---------------------------------------------------------------------------------------------
Transform = tuple[int, int, int]


def _turn_vec(dx: float, dy: float, t: Transform) -> tuple[float, float]:
    if t[0]:
        dx, dy = dy, dx
    return (-dx if t[1] else dx), (-dy if t[2] else dy)


def _unturn_vec(dx: float, dy: float, t: Transform) -> tuple[float, float]:
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


def _turn_image(img: Image.Image, t: Transform) -> Image.Image:
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


# ---------------------------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------------------------
def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _noun_phrase(g: ObjectGroup, rng: np.random.Generator) -> tuple[str, bool]:
    """("three large white ships", plural?) with count, optional size and colour."""
    singular, plural = NOUNS[g.kind][int(rng.integers(len(NOUNS[g.kind])))]
    adjs = [g.size] if g.size and rng.random() < 0.6 else []
    if rng.random() < _COLOR_MENTION.get(g.kind, 0.85):
        adjs.append(g.color)
    if g.count == 1:
        words = [*adjs, singular]
        det = "one" if rng.random() < 0.25 else _article(words[0])
        return " ".join([det, *words]), False
    det, r = NUMBER_WORDS[g.count], rng.random()
    if r < 0.1 and g.count >= 3:
        det = "several"
    elif r < 0.15 and g.count >= 5:
        det = "many"
    return " ".join([det, *adjs, plural]), True


def _place_phrases(g: ObjectGroup) -> list[str]:
    """Every position phrase true of the group (image region and landmark relations)."""
    out = list(_REGION_WORDS[g.direction]) if g.generic and g.direction else []
    for relation, landmark in g.anchors:
        if relation == "beside" and g.direction in _BESIDE_WORDS:
            out += [p.format(landmark) for p in _BESIDE_WORDS[g.direction]]
        out += [p.format(landmark) for p in _RELATION_WORDS[relation]]
    return out


def _object_sentence(g: ObjectGroup, nps: tuple[str, ...], rng: np.random.Generator) -> str:
    """One object-level sentence about group ``g`` (lowercase, no final period)."""
    noun_phrase, plural = _noun_phrase(g, rng)
    be = "are" if plural else "is"
    phrases = _place_phrases(g)
    where = phrases[int(rng.integers(len(phrases)))]
    verb = g.verbs[int(rng.integers(len(g.verbs)))]
    if g.arrangement == "scattered" and g.count >= 3 and rng.random() < 0.4:
        verb = "scattered"
    elif g.arrangement == "row" and rng.random() < 0.5:
        verb += " in a row"
    form = int(rng.integers(4))
    if form == 0:
        return f"{noun_phrase} {be} {verb} {where}"
    if form == 1:
        return f"there {be} {noun_phrase} {where}"
    if form == 2:
        return f"{nps[int(rng.integers(len(nps)))]} with {noun_phrase} {where}"
    return f"{where} there {be} {noun_phrase}"


def captions_for(
    spec: SceneSpec, rng: np.random.Generator, n: int = CAPTIONS_PER_IMAGE
) -> list[str]:
    """``n`` captions of a scene: 2-3 scene-level sentences from the class's fixed pool (they
    repeat across images) and object-level ones about its groups (image-specific)."""
    cdef = class_table()[spec.scene_class]
    pool = cdef.sentences
    n_scene = min(n, len(pool)) if not spec.groups else min(n - 1, int(rng.choice((2, 2, 3))))
    n_scene = max(0, min(n_scene, len(pool)))
    captions = [pool[i] for i in rng.choice(len(pool), size=n_scene, replace=False)]
    order = rng.permutation(len(spec.groups)) if spec.groups else []
    for k in range(n - n_scene):
        if not spec.groups:  # more captions wanted than the pool holds: repeat the pool
            captions.append(pool[k % len(pool)])
            continue
        group = spec.groups[order[k % len(order)]]
        for _ in range(8):  # avoid saying exactly the same thing twice about one image
            sentence = _object_sentence(group, cdef.nps, rng)
            if sentence not in captions:
                break
        captions.append(sentence)
    return [c[0].upper() + c[1:] + "." for c in (captions[i] for i in rng.permutation(n))]


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------
def render_scene(spec: SceneSpec, image_size: int, rng: np.random.Generator) -> np.ndarray:
    """Draw a scene: [image_size, image_size, 3] uint8 RGB.

    Drawn at twice the size and halved (a 2×2 box filter antialiases edges), then given a random
    illumination, colour cast and sensor noise so no two images are pixel-identical.
    """
    size = 2 * image_size
    t: Transform = spec.layout["transform"]
    img = draw.background(spec.scene_class, spec.layout, size, rng, _unturn_vec(*_SHADOW, t))
    img = _turn_image(img, t)
    parts = []
    for o in spec.objects:
        # Brightness varies more than hue, so that "gray" stays gray and "white" white.
        base = np.asarray(draw.COLORS[o.color], np.float32) * rng.uniform(0.9, 1.08)
        rgb = tuple(int(c) for c in np.clip(draw.jitter(rng, base, 4), 0, 255))
        parts.append(
            (
                o.kind,
                draw.object_parts(
                    o.kind, o.x * size, o.y * size, o.angle, o.length * size, o.width * size, rgb
                ),
            )
        )
    img = draw.composite(img, parts, _SHADOW).reduce(2)
    return _photometric(np.asarray(img), rng)


def _photometric(arr: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Brightness, per-channel gain and Gaussian noise on a [H, W, 3] uint8 image."""
    gain = np.clip(rng.normal(1.0, 0.02, 3), 0.95, 1.05) * rng.uniform(0.85, 1.12)
    noisy = arr.astype(np.float32) * gain.astype(np.float32) + float(rng.normal(0.0, 4.0))
    noisy += float(rng.uniform(1.0, 3.0)) * rng.standard_normal(arr.shape, dtype=np.float32)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# The dataset on disk
# ---------------------------------------------------------------------------------------------
def _split_plan(n_train: int, n_val: int, n_test: int, seed: int) -> list[tuple[str, str]]:
    """(split, class) per image: each split cycles through its own shuffled class list, so the
    classes are balanced within a split (counts differ by at most one)."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1,)))
    plan = []
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        classes: list[str] = []
        while len(classes) < n:
            classes += [SCENE_CLASSES[i] for i in rng.permutation(len(SCENE_CLASSES))]
        plan += [(split, c) for c in classes[:n]]
    return plan


def _image_rng(seed: int, index: int) -> np.random.Generator:
    """The random stream of image ``index``: independent of every other image."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0, index)))


def _record(
    index: int, split: str, scene_class: str, captions: list[str], first_sentid: int
) -> dict[str, Any]:
    sentids = list(range(first_sentid, first_sentid + len(captions)))
    return {
        "filename": f"{index:05d}.png",
        "imgid": index,
        "split": split,
        "class": scene_class,
        "sentids": sentids,
        "sentences": [
            {"raw": raw, "tokens": tokenize(raw), "imgid": index, "sentid": sid}
            for raw, sid in zip(captions, sentids, strict=True)
        ],
    }


def _existing_generator(json_path: Path) -> dict[str, Any] | None:
    try:
        with open(json_path, encoding="utf-8") as f:
            return json.load(f).get("generator")
    except (OSError, ValueError, AttributeError):
        return None


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    # A reader never sees a half-written file, and an interrupted run leaves no dataset.json,
    # so the next run regenerates instead of trusting partial output.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, separators=(",", ":"))
        f.write("\n")
    os.replace(tmp, path)


def generate_synthetic_dataset(
    out_dir: str | Path,
    n_train: int = 2000,
    n_val: int = 250,
    n_test: int = 250,
    image_size: int = 128,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write ``out_dir/images/{i:05d}.png`` and ``out_dir/dataset.json`` (Karpathy format).

    Images ``0 .. n_train-1`` are train, then val, then test. Returns ``out_dir``. When
    ``dataset.json`` already records the same generation parameters (its ``"generator"`` entry)
    nothing is done, unless ``overwrite``; the json is written last, so its presence means the
    images are complete.
    """
    if min(n_train, n_val, n_test) < 0 or n_train + n_val + n_test == 0:
        raise ValueError("n_train, n_val and n_test must be >= 0 and not all 0")
    if image_size < 16:
        raise ValueError(f"image_size must be at least 16, got {image_size}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    out = Path(out_dir)
    json_path = out / "dataset.json"
    generator = {
        "name": GENERATOR_NAME,
        "version": GENERATOR_VERSION,
        "n_train": n_train,
        "n_val": n_val,
        "n_test": n_test,
        "seed": seed,
        "image_size": image_size,
    }
    if not overwrite and _existing_generator(json_path) == generator:
        return out
    image_dir = out / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    json_path.unlink(missing_ok=True)  # stale until the new one is complete
    records = []
    for index, (split, scene_class) in enumerate(_split_plan(n_train, n_val, n_test, seed)):
        rng = _image_rng(seed, index)
        spec = sample_scene(rng, scene_class)
        captions = captions_for(spec, rng)
        Image.fromarray(render_scene(spec, image_size, rng)).save(image_dir / f"{index:05d}.png")
        records.append(_record(index, split, scene_class, captions, CAPTIONS_PER_IMAGE * index))
    expected = {r["filename"] for r in records}
    for stale in image_dir.glob("*.png"):  # left over from a larger earlier generation
        if re.fullmatch(r"\d{5,}\.png", stale.name) and stale.name not in expected:
            stale.unlink()
    _write_json_atomic(
        json_path, {"dataset": "synthetic", "generator": generator, "images": records}
    )
    return out
