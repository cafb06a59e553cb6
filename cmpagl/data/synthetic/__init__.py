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

Modules: :mod:`.classes` (the 16 classes: layouts, object options, sentence pools),
:mod:`.scene` (records, symmetries, sampling), :mod:`.captions`, :mod:`.draw` (drawing
primitives) and :mod:`.generate` (rendering and the dataset on disk). Loading a dataset never
generates one: run ``cmpagl data synthetic OUT`` (or :func:`generate_synthetic_dataset`) first.
"""

from cmpagl.data.synthetic.captions import CAPTIONS_PER_IMAGE, captions_for, tokenize
from cmpagl.data.synthetic.classes import SCENE_CLASSES
from cmpagl.data.synthetic.generate import (
    GENERATOR_NAME,
    GENERATOR_VERSION,
    generate_synthetic_dataset,
    generation_command,
    generator_record,
    read_generator_record,
    render_scene,
)
from cmpagl.data.synthetic.scene import (
    KIND_COLORS,
    OBJECT_SIZES,
    ObjectGroup,
    SceneObject,
    SceneSpec,
    sample_scene,
)

__all__ = [
    "CAPTIONS_PER_IMAGE",
    "GENERATOR_NAME",
    "GENERATOR_VERSION",
    "KIND_COLORS",
    "OBJECT_SIZES",
    "SCENE_CLASSES",
    "ObjectGroup",
    "SceneObject",
    "SceneSpec",
    "captions_for",
    "generate_synthetic_dataset",
    "generation_command",
    "generator_record",
    "read_generator_record",
    "render_scene",
    "sample_scene",
    "tokenize",
]
