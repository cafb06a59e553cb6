"""Tests of the synthetic aerial-scene generator (cmpagl.data.synthetic): determinism, the
Karpathy JSON it writes, captions that are true of the scene, and images that show it."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shlex
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cmpagl.cli import main
from cmpagl.config import DataConfig
from cmpagl.data import DataError
from cmpagl.data import synthetic as sy
from cmpagl.data.build import dataset_from_config, prepare_synthetic_dataset

SMALL = {"n_train": 30, "n_val": 10, "n_test": 10}
COUNTS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6}
QUANTIFIERS = {"several": 3, "many": 5}  # the least count each may stand for
ADJECTIVES = {
    "small",
    "large",
    "white",
    "gray",
    "red",
    "blue",
    "green",
    "yellow",
    "black",
    "orange",
}
# Written out here rather than taken from the module, so a wrong synonym table is caught.
NOUN_KIND = {
    "plane": "plane",
    "planes": "plane",
    "airplane": "plane",
    "airplanes": "plane",
    "aircraft": "plane",
    "ship": "ship",
    "ships": "ship",
    "boat": "ship",
    "boats": "ship",
    "car": "car",
    "cars": "car",
    "vehicle": "car",
    "vehicles": "car",
    "tank": "tank",
    "tanks": "tank",
    "house": "house",
    "houses": "house",
    "building": "house",
    "buildings": "house",
    "tree": "tree",
    "trees": "tree",
    "court": "court",
    "courts": "court",
    "pool": "pool",
    "pools": "pool",
}
NOUN_MODIFIERS = {"storage", "oil", "tennis", "swimming"}


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return sy.generate_synthetic_dataset(tmp_path_factory.mktemp("synth"), **SMALL)


def _load(root: Path) -> dict:
    return json.loads((root / "dataset.json").read_text(encoding="utf-8"))


def _mentions(caption: str) -> list[tuple[str, int, list[str], bool]]:
    """(determiner, least count, adjectives, kind) of every '<count> <adjs> <noun>' phrase."""
    toks = sy.tokenize(caption)
    out = []
    for i, tok in enumerate(toks):
        if tok not in COUNTS and tok not in QUANTIFIERS:
            continue
        j = i + 1
        while j < len(toks) and toks[j] in ADJECTIVES:
            j += 1
        k = j + 1 if j < len(toks) and toks[j] in NOUN_MODIFIERS else j
        if k < len(toks) and toks[k] in NOUN_KIND:
            out.append(
                (tok, COUNTS.get(tok, QUANTIFIERS.get(tok)), toks[i + 1 : j], NOUN_KIND[toks[k]])
            )
    return out


def _random_specs(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    for k in range(n):
        spec = sy.sample_scene(rng, sy.SCENE_CLASSES[k % len(sy.SCENE_CLASSES)])
        yield spec, sy.captions_for(spec, rng)


def test_scene_classes() -> None:
    assert len(sy.SCENE_CLASSES) >= 12
    assert len(set(sy.SCENE_CLASSES)) == len(sy.SCENE_CLASSES)
    for c in ("farmland", "forest", "river", "airport", "harbour", "parking_lot"):
        assert c in sy.SCENE_CLASSES
    with pytest.raises(ValueError, match="unknown scene class"):
        sy.sample_scene(np.random.default_rng(0), "volcano")


def test_same_seed_same_bytes_other_seed_other_data(tmp_path: Path, small_dataset: Path) -> None:
    again = sy.generate_synthetic_dataset(tmp_path / "again", **SMALL)
    assert (again / "dataset.json").read_bytes() == (small_dataset / "dataset.json").read_bytes()
    for name in ("00000.png", "00017.png", "00049.png"):
        a = np.asarray(Image.open(small_dataset / "images" / name))
        b = np.asarray(Image.open(again / "images" / name))
        assert np.array_equal(a, b)
    other = sy.generate_synthetic_dataset(tmp_path / "other", seed=1, **SMALL)
    caps = [[s["raw"] for s in im["sentences"]] for im in _load(other)["images"]]
    assert caps != [[s["raw"] for s in im["sentences"]] for im in _load(small_dataset)["images"]]
    a = np.asarray(Image.open(small_dataset / "images" / "00000.png"))
    assert not np.array_equal(a, np.asarray(Image.open(other / "images" / "00000.png")))


def test_worker_processes_write_the_same_bytes(tmp_path: Path) -> None:
    """Rendering in two processes (what a 2-core machine does by default) writes the same
    files as one: each image draws from its own random stream."""
    size = dict(n_train=380, n_val=10, n_test=10, image_size=24, seed=5)
    one = sy.generate_synthetic_dataset(tmp_path / "one", workers=1, **size)
    two = sy.generate_synthetic_dataset(tmp_path / "two", workers=2, **size)
    assert (one / "dataset.json").read_bytes() == (two / "dataset.json").read_bytes()
    names = sorted(p.name for p in (one / "images").iterdir())
    assert len(names) == 400 and names == sorted(p.name for p in (two / "images").iterdir())
    for name in names:
        assert (one / "images" / name).read_bytes() == (two / "images" / name).read_bytes()
    with pytest.raises(ValueError, match="workers must be >= 0"):
        sy.generate_synthetic_dataset(tmp_path / "bad", workers=-1, **size)


def test_karpathy_json_structure(small_dataset: Path) -> None:
    data = _load(small_dataset)
    assert data["dataset"] == "synthetic"
    assert data["generator"] == {
        "name": "cmpagl.synthetic",
        "version": 1,
        "n_train": 30,
        "n_val": 10,
        "n_test": 10,
        "seed": 0,
        "image_size": 128,
    }
    images = data["images"]
    assert [im["split"] for im in images] == ["train"] * 30 + ["val"] * 10 + ["test"] * 10
    next_sentid = 0
    for k, im in enumerate(images):
        assert im["imgid"] == k and im["filename"] == f"{k:05d}.png"
        assert (small_dataset / "images" / im["filename"]).is_file()
        assert im["class"] in sy.SCENE_CLASSES
        assert len(im["sentences"]) == 5
        assert im["sentids"] == list(range(next_sentid, next_sentid + 5))
        for s, sid in zip(im["sentences"], im["sentids"], strict=True):
            assert s["sentid"] == sid and s["imgid"] == k
            assert s["tokens"] == s["raw"].lower().replace(".", "").replace(",", "").split()
            assert s["tokens"] and all(t.isalpha() and t.islower() for t in s["tokens"])
        assert len({s["raw"] for s in im["sentences"]}) == 5  # no caption twice for one image
        next_sentid += 5


def test_every_class_appears_balanced(small_dataset: Path) -> None:
    images = _load(small_dataset)["images"]
    train = Counter(im["class"] for im in images if im["split"] == "train")
    assert set(train) == set(sy.SCENE_CLASSES)
    assert max(train.values()) - min(train.values()) <= 1
    test = Counter(im["class"] for im in images if im["split"] == "test")
    assert len(test) == 10 and max(test.values()) == 1  # 10 < 16 classes: all different


def test_project_reader_serves_it(small_dataset: Path) -> None:
    from cmpagl.data.readers import read_karpathy

    ds = read_karpathy(small_dataset / "dataset.json")
    assert len(ds.filenames) == 50 and all(len(c) == 5 for c in ds.captions)
    assert ds.splits.count("test") == 10 and ds.labels is not None


def test_sampled_scenes_are_well_formed() -> None:
    counts, kinds_in = Counter(), defaultdict(set)
    for spec, _ in _random_specs(320):
        counts.update(g.count for g in spec.groups)
        for g in spec.groups:
            kinds_in[g.kind].add(spec.scene_class)
        assert 1 <= len(spec.groups) <= 2
        assert len({g.kind for g in spec.groups}) == len(spec.groups)  # counts are per kind
        for gi, g in enumerate(spec.groups):
            objs = [o for o in spec.objects if o.group == gi]
            assert len(objs) == g.count and 1 <= g.count <= 6
            assert g.color in sy.KIND_COLORS[g.kind] and g.size in sy.OBJECT_SIZES[g.kind]
            assert all(o.kind == g.kind and o.color == g.color for o in objs)
            assert all(0 < o.x < 1 and 0 < o.y < 1 for o in objs)
    assert set(counts) == {1, 2, 3, 4, 5, 6}  # images of a class differ by object counts
    # Object kinds are shared by classes, so objects alone do not give the scene away.
    for kind in ("car", "ship", "tree", "house"):
        assert len(kinds_in[kind]) >= 4, (kind, kinds_in[kind])


def _region_holds(direction: str, xs: np.ndarray, ys: np.ndarray) -> bool:
    checks = {
        "left": xs < 0.5,
        "right": xs > 0.5,
        "top": ys < 0.5,
        "bottom": ys > 0.5,
        "center": (np.abs(xs - 0.5) < 0.2) & (np.abs(ys - 0.5) < 0.2),
    }
    return all(checks[word].all() for word in direction.split())


def test_group_regions_are_where_the_objects_are() -> None:
    checked = 0
    for spec, _ in _random_specs(480, seed=1):
        for gi, g in enumerate(spec.groups):
            if not g.direction:
                continue
            xs = np.array([o.x for o in spec.objects if o.group == gi])
            ys = np.array([o.y for o in spec.objects if o.group == gi])
            assert _region_holds(g.direction, xs, ys), (spec.scene_class, g, xs, ys)
            checked += 1
    assert checked > 300


def test_caption_counts_colours_sizes_match_the_scene() -> None:
    checked = 0
    for spec, captions in _random_specs(640, seed=2):
        groups = {g.kind: g for g in spec.groups}
        for cap in captions:
            for det, count, adjs, kind in _mentions(cap):
                if det in QUANTIFIERS and kind not in groups:
                    continue  # "many green trees are in the forest": the background texture
                assert kind in groups, (cap, spec.groups)  # no counted object the scene lacks
                g = groups[kind]
                if det in COUNTS:
                    assert count == g.count, (cap, g)
                else:
                    assert g.count >= count, (cap, g)
                colours = [a for a in adjs if a not in ("small", "large")]
                assert colours in ([], [g.color]), (cap, g)
                assert [a for a in adjs if a in ("small", "large")] in ([], [g.size]), (cap, g)
                checked += 1
    assert checked > 1000


def test_caption_position_words_are_true() -> None:
    words = {
        "left": "left",
        "right": "right",
        "top": "top",
        "upper": "top",
        "above": "top",
        "bottom": "bottom",
        "lower": "bottom",
        "below": "bottom",
        "middle": "center",
        "center": "center",
    }
    checked = 0
    for spec, captions in _random_specs(640, seed=3):
        for cap in captions:
            found = [m for m in _mentions(cap) if m[0] in COUNTS]  # object-level sentences
            if len(found) != 1:
                continue
            gi = next(i for i, g in enumerate(spec.groups) if g.kind == found[0][3])
            xs = np.array([o.x for o in spec.objects if o.group == gi])
            ys = np.array([o.y for o in spec.objects if o.group == gi])
            for tok in sy.tokenize(cap):
                if tok in words:
                    assert _region_holds(words[tok], xs, ys), (cap, spec.scene_class, xs, ys)
                    checked += 1
    assert checked > 500


def test_scene_captions_repeat_object_captions_differ() -> None:
    images = defaultdict(list)  # class -> caption lists
    for spec, captions in _random_specs(16 * 12, seed=4):
        images[spec.scene_class].append(captions)
    all_caps = [c for caps_list in images.values() for caps in caps_list for c in caps]
    assert len(set(all_caps)) < 0.75 * len(all_caps)
    for scene_class, caps_list in images.items():
        per_caption = Counter(c for caps in caps_list for c in set(caps))
        assert per_caption.most_common(1)[0][1] >= 3, scene_class  # a scene sentence repeats
        object_level = [frozenset(c for c in caps if _mentions(c)) for caps in caps_list]
        assert all(object_level), scene_class  # every image has some object-level captions
        # The object-level captions tell the images of one class apart.
        assert len(set(object_level)) == len(object_level), scene_class


def test_images_are_rgb_and_textured(small_dataset: Path) -> None:
    for name in ("00000.png", "00031.png", "00049.png"):
        with Image.open(small_dataset / "images" / name) as img:
            assert img.mode == "RGB" and img.size == (128, 128)
            arr = np.asarray(img, np.float32)
        assert arr.std() > 8 and len(np.unique(arr.reshape(-1, 3), axis=0)) > 500


def test_rerun_is_a_no_op_and_overwrite_regenerates(tmp_path: Path) -> None:
    params = {"n_train": 3, "n_val": 1, "n_test": 1, "image_size": 32}
    root = sy.generate_synthetic_dataset(tmp_path / "d", **params)
    json_path, png = root / "dataset.json", root / "images" / "00002.png"
    old = 1_000_000_000
    for p in (json_path, png):
        os.utime(p, ns=(old, old))
    assert sy.generate_synthetic_dataset(tmp_path / "d", **params) == root
    assert json_path.stat().st_mtime_ns == old and png.stat().st_mtime_ns == old
    sy.generate_synthetic_dataset(tmp_path / "d", overwrite=True, **params)
    assert json_path.stat().st_mtime_ns != old and png.stat().st_mtime_ns != old
    # Other parameters are another dataset: regenerated, and stale images removed.
    sy.generate_synthetic_dataset(tmp_path / "d", **{**params, "n_train": 1})
    assert _load(root)["generator"]["n_train"] == 1
    assert sorted(p.name for p in (root / "images").iterdir()) == [
        "00000.png",
        "00001.png",
        "00002.png",
    ]


def _mean_blue_minus_red(scene_class: str, n: int = 8) -> float:
    rng = np.random.default_rng(5)
    values = []
    for _ in range(n):
        arr = sy.render_scene(sy.sample_scene(rng, scene_class), 64, rng).astype(np.float32)
        values.append(float((arr[..., 2] - arr[..., 0]).mean()))
    return float(np.mean(values))


def test_water_scenes_are_bluer_than_farmland() -> None:
    farmland = _mean_blue_minus_red("farmland")
    assert _mean_blue_minus_red("harbour") > farmland + 30
    assert _mean_blue_minus_red("river") > farmland + 10


def _red_fraction(arr: np.ndarray) -> np.ndarray:
    a = arr.astype(np.float32)
    return (a[..., 0] - (a[..., 1] + a[..., 2]) / 2 > 60).mean(axis=0)  # per column


@pytest.mark.parametrize("x", [0.25, 0.75])
def test_objects_are_drawn_where_and_in_the_colour_the_spec_says(x: float) -> None:
    rng = np.random.default_rng(6)
    layout = {"transform": (0, 0, 0)}
    group = sy.ObjectGroup(
        "house", "red", "large", 3, "row", "left" if x < 0.5 else "right", True, (), ("located",)
    )
    objects = [sy.SceneObject("house", "red", x, y, 0.0, 0.16, 0.12, 0) for y in (0.2, 0.5, 0.8)]
    spec = sy.SceneSpec("meadow", layout, [group], objects)
    red = _red_fraction(sy.render_scene(spec, 128, rng))
    left, right = red[:64].mean(), red[64:].mean()
    assert (left > 0.1 and right < 0.01) if x < 0.5 else (right > 0.1 and left < 0.01)


# --- the exact output, pinned -----------------------------------------------------------------
# sha256 of dataset.json and of every image's pixels (decoded, in file order) for a tiny
# generation: any change to what the generator writes, even one pixel, changes them. PNG bytes
# are not pinned (they depend on the zlib build); the pixels are the data.
GOLDEN = {
    "json": "ba83f990670d1a20eb5607a76029a51d89e5e64dc0556c23993600f45ec21cdc",
    "pixels": "16ab2652ec17a8ed9126ab68a1acbf7fd1d7b26d51422e5d77372cf4fa5e21c0",
}


def test_output_is_pinned_byte_for_byte(tmp_path: Path) -> None:
    root = sy.generate_synthetic_dataset(
        tmp_path / "g", n_train=6, n_val=2, n_test=2, image_size=32, seed=3
    )
    pixels = hashlib.sha256()
    for png in sorted((root / "images").glob("*.png")):
        with Image.open(png) as img:
            pixels.update(np.asarray(img).tobytes())
    assert hashlib.sha256((root / "dataset.json").read_bytes()).hexdigest() == GOLDEN["json"]
    assert pixels.hexdigest() == GOLDEN["pixels"]
    assert [p.name for p in root.iterdir() if p.name.startswith(".")] == []  # no temp file left


# --- generation is an explicit step; loading never renders --------------------------------------
TINY = {"n_train": 24, "n_val": 4, "n_test": 4, "image_size": 32, "seed": 3}


def _tiny_data_config(root: Path) -> DataConfig:
    return DataConfig(
        name="synthetic",
        root=str(root),
        image_size=TINY["image_size"],
        synthetic_n_train=TINY["n_train"],
        synthetic_n_val=TINY["n_val"],
        synthetic_n_test=TINY["n_test"],
        synthetic_seed=TINY["seed"],
        num_workers=0,
    )


def test_loader_names_the_command_instead_of_generating(tmp_path: Path) -> None:
    cfg = _tiny_data_config(tmp_path / "syn")
    command = f"cmpagl data synthetic {cfg.root} --n-train 24 --n-val 4 --n-test 4 "
    command += "--image-size 32 --seed 3"
    with pytest.raises(DataError) as info:
        dataset_from_config(cfg)
    assert str(info.value) == (
        f"synthetic dataset folder {cfg.root} does not exist; write it first with: {command}"
    )
    assert not (tmp_path / "syn").exists()  # nothing was written

    # The command it names writes exactly the dataset the config asks for.
    assert main(shlex.split(command)[1:]) == 0
    ds = dataset_from_config(cfg)
    assert [ds.split(s).num_images for s in ("train", "val", "test")] == [24, 4, 4]

    # Another generation in the folder is named, and left as it is.
    other = dataclasses.replace(cfg, synthetic_seed=4, image_size=48)
    json_path = tmp_path / "syn" / "dataset.json"
    before = json_path.stat().st_mtime_ns
    with pytest.raises(
        DataError, match=r"holds another generation \(seed 3 on disk, 4 in the "
    ) as e:
        dataset_from_config(other)
    assert "image_size 32 on disk, 48 in the config" in str(e.value)
    assert str(e.value).endswith("--image-size 48 --seed 4") and "\n" not in str(e.value)
    assert json_path.stat().st_mtime_ns == before


def test_default_config_error_names_the_make_data_command(tmp_path: Path) -> None:
    cfg = DataConfig(root=str(tmp_path / "data" / "synthetic"))  # the defaults: name synthetic
    with pytest.raises(DataError, match=r"write it first with: cmpagl data synthetic \S+$"):
        dataset_from_config(cfg)


def test_cli_train_generates_and_announces_before_anything_else(
    tmp_path: Path, repo_root: Path, capsys
) -> None:
    """``cmpagl train`` on a synthetic config: the data step comes first, as one announced
    line, before training starts (here training then stops at once on a device that does not
    exist, so no model is built); the folder it wrote is what the loader reads."""
    root = tmp_path / "syn"
    sets = [
        f"data.root={root}",
        f"output_dir={tmp_path / 'run'}",
        *(f"data.synthetic_{k}={TINY[k]}" for k in ("n_train", "n_val", "n_test", "seed")),
        "data.image_size=32",
        "model.gswin.img_size=32",
        "train.device=cuda:99",
    ]
    config = str(repo_root / "configs" / "synthetic_tiny.yaml")
    assert main(["train", "--config", config, *(a for s in sets for a in ("--set", s))]) == 2
    captured = capsys.readouterr()
    assert re.fullmatch(
        r"generating the synthetic dataset \(24/4/4 train/val/test images, 32 px, seed 3\) "
        rf"in {re.escape(str(root))} \.\.\. done in \d+\.\d s\n",
        captured.out,
    ), captured.out
    assert "train.device=cuda:99" in captured.err  # training started after the data step
    assert sy.read_generator_record(root) == sy.generator_record(**TINY)
    cfg = _tiny_data_config(root)
    assert dataset_from_config(cfg).num_images == 32
    assert prepare_synthetic_dataset(cfg) is False  # complete: nothing done, nothing printed
    assert capsys.readouterr().out == ""
