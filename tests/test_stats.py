"""Dataset statistics and the cross-split duplicate image check."""

from __future__ import annotations

import numpy as np
from PIL import Image

from cmpagl.data import CaptionDataset, load_dataset
from cmpagl.data.stats import (
    caption_repetition,
    caption_statistics,
    cross_split_duplicates,
    dataset_statistics,
    format_statistics,
    perceptual_hash,
    tokenize,
)
from cmpagl.metrics import normalize_caption


def test_caption_statistics_by_hand(tmp_path):
    caps = [["A red car.", "a red car", "Two planes"], ["A red car .", "one ship"]]
    ds = CaptionDataset("t", tmp_path, ["a", "b"], ["train", "test"], caps)
    st = caption_statistics(ds)
    assert st["length_histogram"] == {2: 2, 3: 3}
    assert st["vocabulary_size"] == len({"a", "red", "car", "two", "planes", "one", "ship"})
    # "a red car" (3 spellings) is one distinct text, shared by both images
    assert st["distinct_captions"] == 3
    assert st["shared_captions"] == 1 and st["captions_in_shared"] == 3
    full = dataset_statistics(ds)
    assert full.splits["train"].captions == 3 and full.splits["test"].images == 1
    assert full.captions_per_image == {2: 1, 3: 1}
    assert "distinct captions: 3 of 5" in format_statistics(full)
    assert tokenize("It's a plane, near 2 cars.") == ["it's", "a", "plane", "near", "2", "cars"]


def test_caption_repetition_by_hand_and_against_a_naive_count(tmp_path):
    caps = [["A red car.", "a red car", "Two planes"], ["A red car .", "one ship"], ["Two  planes"]]
    ds = CaptionDataset("t", tmp_path, ["a", "b", "c"], ["train", "test", "test"], caps)
    rep = caption_repetition(ds)
    # "a red car" is on images a and b (twice on a: counted once), "two planes" on a and c
    assert rep.tolist() == [2, 2, 2, 2, 1, 2] and rep.dtype == np.int64
    assert caption_repetition(ds.split("test")).tolist() == [1, 1, 1]  # within the split only

    # A naive count on random captions from a small vocabulary (many exact repeats).
    rng = np.random.default_rng(0)
    words = ["a", "red", "car", "Car.", "plane", "."]
    caps = [
        [" ".join(rng.choice(words, size=2)) for _ in range(int(rng.integers(1, 4)))]
        for _ in range(30)
    ]
    ds = CaptionDataset("r", tmp_path, [f"{i}" for i in range(30)], ["train"] * 30, caps)
    norm = [[normalize_caption(c) for c in cs] for cs in caps]
    naive = [sum(normalize_caption(t) in n for n in norm) for cs in caps for t in cs]
    assert caption_repetition(ds).tolist() == naive and max(naive) > 1


def test_perceptual_hash_finds_reencoded_copy_across_splits(tmp_path):
    rng = np.random.default_rng(0)
    imgs = [
        rng.integers(0, 255, (8, 8, 3), dtype=np.uint8).repeat(16, 0).repeat(16, 1)
        for _ in range(4)
    ]
    for i, a in enumerate(imgs):
        Image.fromarray(a).save(tmp_path / f"{i}.png")
    # image 0 again, resized and saved as JPEG, in the test split
    Image.fromarray(imgs[0]).resize((100, 100)).save(tmp_path / "copy.jpg", quality=85)
    names = ["0.png", "1.png", "2.png", "3.png", "copy.jpg"]
    ds = CaptionDataset("t", tmp_path, names, ["train"] * 4 + ["test"], [["x"]] * 5)
    assert (
        bin(perceptual_hash(tmp_path / "0.png") ^ perceptual_hash(tmp_path / "copy.jpg")).count("1")
        <= 4
    )
    pairs = cross_split_duplicates(ds)
    assert [(p["a"], p["b"]) for p in pairs] == [("0.png", "copy.jpg")]
    # in the same split it is not reported
    same = CaptionDataset("t", tmp_path, names, ["train"] * 5, [["x"]] * 5)
    assert cross_split_duplicates(same) == []


def test_real_ucm_statistics(ucm_subset):
    st = dataset_statistics(load_dataset(ucm_subset))
    assert st.images == 1600 and st.captions == 8000
    assert st.labels is not None and sum(st.labels.values()) == 1600
    assert sum(st.length_histogram.values()) == 8000
    # Captions repeat heavily across UCM images (PROVENANCE.md): far fewer distinct texts.
    assert st.distinct_captions < 0.3 * st.captions and st.shared_captions > 100
