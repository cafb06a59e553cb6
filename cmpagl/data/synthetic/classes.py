"""The 16 scene classes of the synthetic dataset (:mod:`cmpagl.data.synthetic`): for each class
its layout in the canonical frame (where each kind of group may go), the object groups it may
hold, and its pool of scene-level sentences.

Kept apart from the sampler and caption writer so that adding or editing a class touches only
this table.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np

SCENE_CLASSES: tuple[str, ...] = (
    "farmland",
    "forest",
    "river",
    "lake",
    "beach",
    "dense_residential",
    "sparse_residential",
    "industrial",
    "airport",
    "harbour",
    "parking_lot",
    "playground",
    "crossroads",
    "desert",
    "bridge",
    "meadow",
)

_V, _H = math.pi / 2, 0.0  # row axes: vertical, horizontal


@dataclass(frozen=True)
class Place:
    """Where a group may go, in the canonical frame.

    ``box``: (x0, y0, x1, y1) that the objects' extents stay within; ``direction``: the image
    region of the whole box ("" if none); ``axis``: direction of a row; ``pitch``: rows snap
    to slots every ``pitch`` from x0 (parking stalls).
    """

    box: tuple[float, float, float, float]
    direction: str = ""
    anchors: tuple[tuple[str, str], ...] = ()
    axis: float = _H
    generic: bool = True
    pitch: float = 0.0


@dataclass(frozen=True)
class Option:
    """A kind of group a class may hold. ``rel``: object angle relative to the row axis;
    ``scatter``: angle of scattered objects, "free", "axis" (along it) or "grid" (0 or 90°)."""

    kind: str
    places: tuple[str, ...]
    verbs: tuple[str, ...]
    rel: float = math.pi / 2
    scatter: str = "grid"
    arrangements: tuple[str, ...] = ("row", "scattered")
    sizes: tuple[str, ...] | None = None
    flip: bool = True


@dataclass(frozen=True)
class ClassDef:
    layout: Callable[[np.random.Generator], tuple[dict[str, Any], dict[str, Place]]]
    options: tuple[Option, ...]
    nps: tuple[str, ...]  # noun phrases for "<scene> with <objects>"
    sentences: tuple[str, ...]  # scene-level captions (true whatever the objects)
    primary: tuple[str, ...] = ()  # kinds allowed for the first group (all if empty)


def _std_places() -> dict[str, Place]:
    return {
        "left": Place((0.03, 0.04, 0.46, 0.96), "left", axis=_V),
        "right": Place((0.54, 0.04, 0.97, 0.96), "right", axis=_V),
        "top": Place((0.04, 0.03, 0.96, 0.46), "top"),
        "bottom": Place((0.04, 0.54, 0.96, 0.97), "bottom"),
        "center": Place((0.29, 0.29, 0.71, 0.71), "center"),
    }


def _lay_plain(rng: np.random.Generator) -> tuple[dict[str, Any], dict[str, Place]]:
    return {}, _std_places()


def _lay_river(rng: np.random.Generator) -> tuple[dict[str, Any], dict[str, Place]]:
    w = float(rng.uniform(0.2, 0.28))
    e, beside = 0.5 - w / 2 - 0.025, (("beside", "river"),)
    return {"w": w}, {
        "river": Place(
            (0.5 - w / 2 + 0.03, 0.03, 0.5 + w / 2 - 0.03, 0.97),
            "",
            (("on", "river"), ("in", "river")),
            _V,
            False,
        ),
        "left": Place((0.03, 0.04, e, 0.96), "left", beside, _V),
        "right": Place((1 - e, 0.04, 0.97, 0.96), "right", beside, _V),
    }


def _lay_lake(rng: np.random.Generator) -> tuple[dict[str, Any], dict[str, Place]]:
    rx, ry = float(rng.uniform(0.25, 0.3)), float(rng.uniform(0.21, 0.26))
    ex, ey, by = 0.5 - rx - 0.04, 0.5 - ry - 0.04, (("beside", "lake"),)
    return {"rx": rx, "ry": ry}, {
        "lake": Place(
            (0.5 - 0.6 * rx, 0.5 - 0.6 * ry, 0.5 + 0.6 * rx, 0.5 + 0.6 * ry),
            "center",
            (("on", "lake"), ("in", "lake")),
        ),
        "left": Place((0.02, 0.04, ex, 0.96), "left", by, _V),
        "right": Place((1 - ex, 0.04, 0.98, 0.96), "right", by, _V),
        "top": Place((0.04, 0.02, 0.96, ey), "top", by),
        "bottom": Place((0.04, 1 - ey, 0.96, 0.98), "bottom", by),
    }


def _lay_beach(rng: np.random.Generator) -> tuple[dict[str, Any], dict[str, Place]]:
    s, b = float(rng.uniform(0.36, 0.44)), float(rng.uniform(0.17, 0.23))
    return {"s": s, "b": b}, {
        "sea": Place((0.03, 0.03, s - 0.05, 0.97), "left", (("in", "sea"), ("near", "beach")), _V),
        "land": Place((s + b + 0.04, 0.03, 0.97, 0.97), "right", (("beside", "beach"),), _V),
    }


def _road_places(y: float, half: float) -> dict[str, Place]:
    on = (("on", "road"),)
    return {
        "road_left": Place((0.03, y - half, 0.47, y + half), "left", on),
        "road_right": Place((0.53, y - half, 0.97, y + half), "right", on),
        "road": Place((0.03, y - half, 0.97, y + half), "", on + (("along", "road"),), _H, False),
    }


def _lay_dense(rng: np.random.Generator) -> tuple[dict[str, Any], dict[str, Place]]:
    streets = sorted(float(x) for x in rng.uniform(0.15, 0.85, 2))
    if streets[1] - streets[0] < 0.2:
        streets = [streets[0]]
    return {"streets": streets, "road_w": 0.1}, _road_places(0.5, 0.045)


def _lay_sparse(rng: np.random.Generator) -> tuple[dict[str, Any], dict[str, Place]]:
    by = (("beside", "road"),)
    return {"road_w": 0.08}, {
        "top": Place((0.04, 0.03, 0.96, 0.44), "top", by),
        "bottom": Place((0.04, 0.56, 0.96, 0.97), "bottom", by),
        **_road_places(0.5, 0.035),
    }


def _lay_industrial(rng: np.random.Generator) -> tuple[dict[str, Any], dict[str, Place]]:
    near = (("near", "factories"),)
    return {"split": float(rng.uniform(0.4, 0.6))}, {
        "yard": Place((0.03, 0.03, 0.46, 0.97), "left", near, _V),
        "front": Place((0.48, 0.04, 0.62, 0.96), "", near + (("beside", "factories"),), _V, False),
    }


def _lay_airport(rng: np.random.Generator) -> tuple[dict[str, Any], dict[str, Place]]:
    xr, rw = float(rng.uniform(0.62, 0.7)), 0.1
    return {"xr": xr, "rw": rw}, {
        # The apron reaches x = xr - 0.09 but planes stay left of 0.5 so "on the left" holds.
        "apron": Place((0.03, 0.03, 0.5, 0.97), "left", (("beside", "runway"),), _V),
        "runway": Place((xr - 0.1, 0.1, xr + 0.1, 0.9), "", (("on", "runway"),), _V, False),
    }


def _lay_harbour(rng: np.random.Generator) -> tuple[dict[str, Any], dict[str, Place]]:
    q = float(rng.uniform(0.55, 0.62))
    return {"q": q}, {
        "quay": Place(
            (0.03, q - 0.075, 0.97, q - 0.005),
            "",
            (("along", "dock"), ("in", "harbour")),
            _H,
            False,
        ),
        "water": Place((0.03, 0.03, 0.97, q - 0.13), "top", (("in", "harbour"),)),
        "land": Place((0.03, q + 0.04, 0.97, 0.97), "bottom", (("on", "dock"),)),
    }


def _lay_parking(rng: np.random.Generator) -> tuple[dict[str, Any], dict[str, Place]]:
    pitch, origin, stalls = 0.062, 0.06, 14
    x1, lot = origin + stalls * pitch, (("in", "parking lot"),)
    return {"rows": (0.3, 0.7), "pitch": pitch, "origin": origin, "stalls": stalls}, {
        "row_top": Place((origin, 0.245, x1, 0.355), "top", lot, _H, pitch=pitch),
        "row_bottom": Place((origin, 0.645, x1, 0.755), "bottom", lot, _H, pitch=pitch),
        "edge_top": Place((0.03, 0.0, 0.97, 0.135), "top", (("beside", "parking lot"),)),
        "edge_bottom": Place((0.03, 0.865, 0.97, 1.0), "bottom", (("beside", "parking lot"),)),
    }


def _lay_playground(rng: np.random.Generator) -> tuple[dict[str, Any], dict[str, Place]]:
    cx, hw = float(rng.uniform(0.62, 0.67)), float(rng.uniform(0.24, 0.27))
    return {"cx": cx, "hw": hw, "hh": 0.42}, {
        "side": Place(
            (0.03, 0.03, cx - hw - 0.03, 0.97),
            "left",
            (("beside", "playground"), ("near", "track")),
            _V,
        ),
    }


def _lay_crossroads(rng: np.random.Generator) -> tuple[dict[str, Any], dict[str, Place]]:
    on, near = (("on", "road"),), (("near", "crossroads"),)
    return {"paved": bool(rng.integers(2)), "road_w": 0.12}, {
        "arm_left": Place((0.03, 0.445, 0.4, 0.555), "left", on),
        "arm_right": Place((0.6, 0.445, 0.97, 0.555), "right", on),
        "arm_top": Place((0.445, 0.03, 0.555, 0.4), "top", on, _V),
        "arm_bottom": Place((0.445, 0.6, 0.555, 0.97), "bottom", on, _V),
        "q_tl": Place((0.03, 0.03, 0.43, 0.43), "top left", near),
        "q_tr": Place((0.57, 0.03, 0.97, 0.43), "top right", near),
        "q_bl": Place((0.03, 0.57, 0.43, 0.97), "bottom left", near),
        "q_br": Place((0.57, 0.57, 0.97, 0.97), "bottom right", near),
    }


def _lay_bridge(rng: np.random.Generator) -> tuple[dict[str, Any], dict[str, Place]]:
    w, b = float(rng.uniform(0.26, 0.32)), float(rng.uniform(0.46, 0.54))
    x0, x1, on = 0.5 - w / 2 + 0.03, 0.5 + w / 2 - 0.03, ("on", "river")
    return {"w": w, "b": b}, {
        "bridge": Place(
            (x0 - 0.05, b - 0.035, x1 + 0.05, b + 0.035), "", (("on", "bridge"),), _H, False
        ),
        "river_top": Place((x0, 0.03, x1, b - 0.08), "top", (("beside", "bridge"), on), _V),
        "river_bottom": Place((x0, b + 0.08, x1, 0.97), "bottom", (("beside", "bridge"), on), _V),
    }


def _houses(*places: str, sizes: tuple[str, ...] | None = None) -> Option:
    return Option("house", places, ("located", "built"), sizes=sizes)


def _trees(*places: str) -> Option:
    return Option("tree", places, ("growing", "planted"), rel=0.0, scatter="free")


def _cars(*places: str, moving: bool = False) -> Option:
    if moving:  # on a road: along it, in either direction
        return Option("car", places, ("driving", "moving"), rel=0.0, scatter="axis")
    return Option("car", places, ("parked",))


def _ships(
    *places: str,
    verbs: tuple[str, ...] = ("sailing", "moored"),
    sizes: tuple[str, ...] | None = None,
) -> Option:
    return Option("ship", places, verbs, rel=0.0, scatter="axis", sizes=sizes)


_STD = ("left", "right", "top", "bottom", "center")


@cache
def class_table() -> dict[str, ClassDef]:
    """The scene classes (built on first use, not at import)."""
    apron_planes = Option(
        "plane", ("apron",), ("parked", "standing"), rel=-math.pi / 2, scatter="free", flip=False
    )
    table = {
        "farmland": ClassDef(
            _lay_plain,
            (_houses(*_STD), _trees(*_STD[:4])),
            ("a piece of farmland", "some farmland"),
            (
                "there is a piece of farmland",
                "many pieces of farmland are arranged neatly",
                "the farmland is divided into fields of different colors",
                "green and brown fields are next to each other",
                "this is a large area of farmland",
            ),
        ),
        "forest": ClassDef(
            _lay_plain,
            (_houses(*_STD),),
            ("a dense forest", "a forest"),
            (
                "many green trees are in the forest",
                "this is a dense forest",
                "the forest is dark green and dense",
                "lots of trees grow closely in the forest",
                "a large forest with dense trees",
            ),
        ),
        "river": ClassDef(
            _lay_river,
            (_ships("river"), _trees("left", "right"), _houses("left", "right")),
            ("a river", "a long river"),
            (
                "a river runs through the area",
                "there is a river with green banks",
                "the river flows across the image",
                "a long river passes by the green land",
                "this is a river",
            ),
            primary=("ship", "tree", "house"),
        ),
        "lake": ClassDef(
            _lay_lake,
            (
                _ships("lake", sizes=("small",)),
                _trees("left", "right", "top", "bottom"),
                _houses("left", "right", "top", "bottom", sizes=("small",)),
            ),
            ("a lake", "a small lake"),
            (
                "there is a lake surrounded by green land",
                "a blue lake is in the middle of the image",
                "the lake is surrounded by grass",
                "this is a small lake",
                "a quiet lake with green grass around it",
            ),
        ),
        "beach": ClassDef(
            _lay_beach,
            (_ships("sea"), _trees("land"), _houses("land")),
            ("a beach", "a sandy beach"),
            (
                "a beach is between the sea and the land",
                "the yellow beach is next to the blue sea",
                "white waves hit the beach",
                "this is a long sandy beach",
                "the sea is beside a strip of sand",
            ),
        ),
        "dense_residential": ClassDef(
            _lay_dense,
            (_cars("road_left", "road_right", "road", moving=True),),
            ("a dense residential area", "a crowded residential area"),
            (
                "a dense residential area with many houses",
                "many houses are arranged densely",
                "lots of buildings are closely packed in the residential area",
                "this is a dense residential area",
                "a road passes through the dense residential area",
            ),
        ),
        "sparse_residential": ClassDef(
            _lay_sparse,
            (
                _houses("top", "bottom"),
                _trees("top", "bottom"),
                Option("pool", ("top", "bottom"), ("located",)),
                _cars("road_left", "road_right", "road", moving=True),
            ),
            ("a sparse residential area", "a residential area"),
            (
                "this is a sparse residential area",
                "a sparse residential area with green lawns",
                "the residential area is surrounded by grass",
                "a road goes through the sparse residential area",
                "there is a lot of green grass in the sparse residential area",
            ),
            primary=("house",),
        ),
        "industrial": ClassDef(
            _lay_industrial,
            (
                Option("tank", ("yard",), ("located", "standing"), scatter="free"),
                Option("car", ("front",), ("parked",), arrangements=("row",)),
            ),
            ("an industrial area", "a factory area"),
            (
                "this is an industrial area",
                "an industrial area with large factories",
                "two large factories are in the industrial area",
                "the industrial area has a large concrete ground",
                "a factory area with gray concrete ground",
            ),
            primary=("tank",),
        ),
        "airport": ClassDef(
            _lay_airport,
            (
                apron_planes,
                apron_planes,  # twice: an airport's first group is parked on the apron 2 in 3
                Option("plane", ("runway",), ("standing", "waiting"), rel=0.0, scatter="axis"),
            ),
            ("an airport", "an airport area"),
            (
                "this is an airport",
                "a runway is in the airport",
                "there is a long runway at the airport",
                "an airport with a gray runway and green grass",
                "the runway is beside the apron",
            ),
        ),
        "harbour": ClassDef(
            _lay_harbour,
            (
                _ships("quay", "quay", "water", verbs=("docked", "moored")),
                _cars("land"),
                Option("tank", ("land",), ("located", "standing"), scatter="free"),
            ),
            ("a harbour", "a port"),
            (
                "this is a harbour",
                "the harbour is beside the water",
                "the dark blue water is in the harbour",
                "a harbour with a long dock",
                "the dock is next to the water",
            ),
            primary=("ship",),
        ),
        "parking_lot": ClassDef(
            _lay_parking,
            (_cars("row_top", "row_bottom"), _trees("edge_top", "edge_bottom")),
            ("a parking lot", "a large parking lot"),
            (
                "this is a parking lot",
                "a large parking lot with white lines",
                "the parking lot is paved with gray asphalt",
                "many parking spaces are in the parking lot",
                "there is a parking lot",
            ),
            primary=("car",),
        ),
        "playground": ClassDef(
            _lay_playground,
            (
                Option("court", ("side",), ("located",), rel=math.pi / 2),
                _trees("side"),
                _cars("side"),
            ),
            ("a playground", "a sports field"),
            (
                "a playground with a red running track",
                "there is a football field in the playground",
                "a green football field is surrounded by a red track",
                "this is a playground",
                "the playground has a green field and a red track",
            ),
        ),
        "crossroads": ClassDef(
            _lay_crossroads,
            (
                _cars("arm_left", "arm_right", "arm_top", "arm_bottom", moving=True),
                _houses("q_tl", "q_tr", "q_bl", "q_br", sizes=("small",)),
                _trees("q_tl", "q_tr", "q_bl", "q_br"),
            ),
            ("a crossroads", "an intersection"),
            (
                "two roads cross each other",
                "this is a crossroads",
                "there is an intersection in the middle of the image",
                "two straight roads intersect in the center",
                "a crossroads with white zebra crossings",
            ),
        ),
        "desert": ClassDef(
            _lay_plain,
            (_trees(*_STD), _cars(*_STD), _houses(*_STD)),
            ("a desert", "a piece of desert"),
            (
                "this is a piece of desert",
                "a large yellow desert with sand dunes",
                "the desert is covered with sand",
                "there are many dunes in the desert",
                "a vast desert without much vegetation",
            ),
        ),
        "bridge": ClassDef(
            _lay_bridge,
            (_cars("bridge", moving=True), _ships("river_top", "river_bottom")),
            ("a bridge", "a bridge over a river"),
            (
                "a bridge is over the river",
                "there is a bridge across the river",
                "a long bridge spans the river",
                "a river with a bridge over it",
                "this is a bridge",
            ),
        ),
        "meadow": ClassDef(
            _lay_plain,
            (_trees(*_STD), _houses(*_STD)),
            ("a meadow", "a green meadow"),
            (
                "this is a green meadow",
                "a large piece of green meadow",
                "the meadow is covered with green grass",
                "there is a green meadow",
                "a large green grassland",
            ),
        ),
    }
    assert tuple(table) == SCENE_CLASSES
    return table
