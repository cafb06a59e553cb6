"""Rendering the synthetic scenes and writing the dataset to disk (Karpathy JSON + PNGs).

Image ``i`` of a dataset draws everything from its own random stream (seed, i), so a dataset is
byte-for-byte reproducible. Nothing here runs unless called: loading a dataset never generates
one (:func:`generation_command` gives the command line that writes a missing one).
"""

from __future__ import annotations

import functools
import json
import multiprocessing
import os
import re
import shlex
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cmpagl.data.synthetic import draw
from cmpagl.data.synthetic.captions import CAPTIONS_PER_IMAGE, captions_for, tokenize
from cmpagl.data.synthetic.classes import SCENE_CLASSES
from cmpagl.data.synthetic.scene import SceneSpec, Transform, sample_scene, turn_image, unturn_vec
from cmpagl.fileio import atomic_write

GENERATOR_NAME = "cmpagl.synthetic"
GENERATOR_VERSION = 1
_SHADOW = (1.0, 1.0)  # sun from the top left in the final image
MIN_IMAGES_PER_WORKER = 200  # about 5 s of rendering: worth a process start


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
    img = draw.background(spec.scene_class, spec.layout, size, rng, unturn_vec(*_SHADOW, t))
    img = turn_image(img, t)
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


def _worker_count(workers: int, n_images: int) -> int:
    """Processes for ``n_images``: ``workers``, or (0) one per available core, and one where a
    process start (about half a second) would cost more than it saves."""
    if workers < 0:
        raise ValueError(f"workers must be >= 0 (0: one per core), got {workers}")
    if workers == 0:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    return max(1, min(workers, n_images // MIN_IMAGES_PER_WORKER))


def _render_images(
    image_dir: Path, plan: list[tuple[int, tuple[str, str]]], image_size: int, seed: int
) -> list[dict[str, Any]]:
    """Render and write the images of ``plan`` ((index, (split, class)) pairs); their records."""
    records = []
    for index, (split, scene_class) in plan:
        rng = _image_rng(seed, index)
        spec = sample_scene(rng, scene_class)
        captions = captions_for(spec, rng)
        Image.fromarray(render_scene(spec, image_size, rng)).save(image_dir / f"{index:05d}.png")
        records.append(_record(index, split, scene_class, captions, CAPTIONS_PER_IMAGE * index))
    return records


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


def generator_record(
    n_train: int = 2000, n_val: int = 250, n_test: int = 250, image_size: int = 128, seed: int = 0
) -> dict[str, Any]:
    """The ``"generator"`` entry of ``dataset.json``: every parameter the output depends on."""
    return {
        "name": GENERATOR_NAME,
        "version": GENERATOR_VERSION,
        "n_train": n_train,
        "n_val": n_val,
        "n_test": n_test,
        "seed": seed,
        "image_size": image_size,
    }


def read_generator_record(out_dir: str | Path) -> dict[str, Any] | None:
    """The ``"generator"`` entry of ``out_dir/dataset.json``; None when the file is missing, is
    not JSON, or was not written by this generator."""
    try:
        with open(Path(out_dir) / "dataset.json", encoding="utf-8") as f:
            record = json.load(f).get("generator")
    except (OSError, ValueError, AttributeError):
        return None
    return record if isinstance(record, dict) else None


def generation_command(
    out_dir: str | Path,
    n_train: int = 2000,
    n_val: int = 250,
    n_test: int = 250,
    image_size: int = 128,
    seed: int = 0,
) -> str:
    """The ``cmpagl data synthetic`` command line that writes this dataset, with an option only
    where a parameter differs from the command's default (error messages quote it)."""
    given = {"n_train": n_train, "n_val": n_val, "n_test": n_test}
    given |= {"image_size": image_size, "seed": seed}
    defaults = generator_record()
    options = [f"--{k.replace('_', '-')} {v}" for k, v in given.items() if v != defaults[k]]
    return " ".join(["cmpagl data synthetic", shlex.quote(str(out_dir)), *options])


def generate_synthetic_dataset(
    out_dir: str | Path,
    n_train: int = 2000,
    n_val: int = 250,
    n_test: int = 250,
    image_size: int = 128,
    seed: int = 0,
    overwrite: bool = False,
    workers: int = 0,
) -> Path:
    """Write ``out_dir/images/{i:05d}.png`` and ``out_dir/dataset.json`` (Karpathy format).

    Images ``0 .. n_train-1`` are train, then val, then test. Returns ``out_dir``. ``workers``
    processes render them (0: one per available core; small datasets render in this process);
    the files are the same bytes whatever the number. When
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
    generator = generator_record(n_train, n_val, n_test, image_size, seed)
    if not overwrite and read_generator_record(out) == generator:
        return out
    image_dir = out / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    json_path.unlink(missing_ok=True)  # stale until the new one is complete
    plan = list(enumerate(_split_plan(n_train, n_val, n_test, seed)))
    workers = _worker_count(workers, len(plan))
    if workers == 1:
        records = _render_images(image_dir, plan, image_size, seed)
    else:  # images are independent (each its own random stream): the same bytes in any order
        chunks = [plan[i :: 4 * workers] for i in range(4 * workers)]
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            render = functools.partial(_render_images, image_dir, image_size=image_size, seed=seed)
            done = pool.map(render, chunks)
            records = sorted((r for part in done for r in part), key=lambda r: r["imgid"])
    expected = {r["filename"] for r in records}
    for stale in image_dir.glob("*.png"):  # left over from a larger earlier generation
        if re.fullmatch(r"\d{5,}\.png", stale.name) and stale.name not in expected:
            stale.unlink()
    data = {"dataset": "synthetic", "generator": generator, "images": records}

    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, separators=(",", ":"))
            f.write("\n")

    # Written last and atomically: its presence means the images are complete, and an
    # interrupted run leaves no dataset.json, so the next run regenerates.
    atomic_write(json_path, write)
    return out
