"""Captions of the synthetic scenes: scene-level sentences from each class's fixed pool (they
repeat across images, as in UCM) and object-level sentences that state the count, colour, size
and position of a group (they tell the images of a class apart)."""

from __future__ import annotations

import re

import numpy as np

from cmpagl.data.synthetic.classes import class_table
from cmpagl.data.synthetic.scene import ObjectGroup, SceneSpec

CAPTIONS_PER_IMAGE = 5

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


def tokenize(raw: str) -> list[str]:
    """Lowercase words of a caption, punctuation dropped (Karpathy ``tokens``)."""
    return re.findall(r"[a-z]+", raw.lower())


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
