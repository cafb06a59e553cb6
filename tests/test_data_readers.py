"""Readers against the real published annotation files, and every bad-input error."""

from __future__ import annotations

import io
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cmpagl.data import DataError, detect_format, load_dataset, split_off_val
from cmpagl.data.validation import check_images, load_image


def _png_bytes(size: int = 4) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (90, 120, 60)).save(buf, format="PNG")
    return buf.getvalue()


def placeholder_images(folder: Path, names: list[str]) -> Path:
    """Tiny valid images with the given names (the real images are not shipped)."""
    data = _png_bytes()
    for name in names:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return folder


# Published counts (shared/data/annotations/PROVENANCE.md, METHOD.md §5).
PRECOMP = {
    "rsitmd_precomp": {"test": (452, 2260), "train": (4291, 21455)},
    "rsicd_precomp": {"test": (1093, 5465), "train": (9828, 49140)},
    "ucm_precomp": {"test": (210, 1050), "train": (1890, 9450)},
}


@pytest.mark.parametrize("name", sorted(PRECOMP))
def test_real_precomp_counts_and_layouts(annotations, tmp_path, name):
    root = annotations / name
    assert detect_format(root) == ("precomp", root)
    # RSITMD's train file has 20 empty lines (4 images x 5); "drop" reads the rest, and says so.
    if name == "rsitmd_precomp":
        with pytest.warns(UserWarning, match="dropped 20 empty captions and 4 images"):
            ds = load_dataset(root, image_dir=tmp_path, empty_captions="drop")
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the other two files have nothing to drop
            ds = load_dataset(root, image_dir=tmp_path, empty_captions="drop")
    test = ds.split("test")
    assert (test.num_images, test.num_captions) == PRECOMP[name]["test"]
    assert all(len(c) == 5 for c in test.captions)
    # Both published layouts are recognised, and the source says which was found.
    assert "test_caps.txt (one name per caption)" in ds.source
    assert "train_caps.txt (one name per image, 5 captions each)" in ds.source
    n_train, n_train_caps = PRECOMP[name]["train"]
    dropped = 4 if name == "rsitmd_precomp" else 0
    assert ds.split("train").num_images == n_train - dropped
    assert ds.split("train").num_captions == n_train_caps - 5 * dropped
    # The captions are aligned with their images: spot-check the first lines of each file.
    first_cap = (root / "test_caps.txt").read_text().split("\n")[0].strip()
    first_name = (root / "test_filename.txt").read_text().split("\n")[0].strip()
    assert test.filenames[0] == first_name and test.captions[0][0] == first_cap
    # With placeholder images in a temporary folder the image check passes.
    placeholder_images(tmp_path, ds.filenames)
    check_images(ds, decode=False)


def test_rsitmd_empty_captions_are_an_error_by_default(annotations):
    with pytest.warns(UserWarning, match="mountain_2378.tif"):
        load_dataset(annotations / "rsitmd_precomp", empty_captions="drop")
    with pytest.raises(DataError, match=r"20 empty captions.*mountain_2378\.tif.*drop"):
        load_dataset(annotations / "rsitmd_precomp")


def test_real_sydney_karpathy(annotations, tmp_path):
    path = annotations / "sydney"
    assert detect_format(path)[0] == "karpathy"
    ds = load_dataset(path, image_dir=tmp_path)
    assert ds.num_images == 613 and ds.num_captions == 613 * 5
    assert [ds.splits.count(s) for s in ("train", "val", "test")] == [497, 58, 58]
    placeholder_images(tmp_path, ds.filenames)
    check_images(ds)  # decodes the placeholders too


def test_real_ucm_subset(ucm_subset):
    ds = load_dataset(ucm_subset, check_images=True, captions_per_image=5)
    assert [ds.split(s).num_images for s in ("train", "val", "test")] == [1283, 157, 160]
    assert ds.num_captions == 8000
    assert ds.labels is not None and len(set(ds.labels)) == 16
    assert ds.filenames[0] == "1.jpg" and ds.captions[0][0] == "There is a piece of farmland ."
    img = load_image(ds.image_path(0))
    assert img.mode == "RGB" and img.size == (256, 256)
    # txt2img follows the captions image by image.
    test = ds.split("test")
    t2i = test.txt2img
    assert t2i.shape == (800,) and (np.bincount(t2i) == 5).all()
    assert test.all_captions[5 * 7] == test.captions[7][0]


# ---- bad input ------------------------------------------------------------------------------
def write_karpathy(root: Path, images: list[dict]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset.json").write_text(json.dumps({"dataset": "toy", "images": images}))
    return root


def toy_images(n: int = 4, caps: int = 3) -> list[dict]:
    return [
        {
            "filename": f"{i}.png",
            "split": ["train", "val", "test", "train"][i % 4],
            "sentences": [{"raw": f"image {i} caption {j}"} for j in range(caps)],
        }
        for i in range(n)
    ]


def test_karpathy_any_number_of_captions(tmp_path):
    imgs = toy_images(4, caps=3)
    imgs[1]["sentences"].append({"tokens": ["from", "tokens"]})  # no "raw": tokens are joined
    ds = load_dataset(write_karpathy(tmp_path, imgs))
    assert [len(c) for c in ds.captions] == [3, 4, 3, 3]
    assert ds.captions[1][-1] == "from tokens"
    assert ds.txt2img.tolist() == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    with pytest.raises(DataError, match=r"1 images .* do not have 3 captions: '1.png'"):
        load_dataset(tmp_path, captions_per_image=3)


def test_missing_images_reports_count_and_names(tmp_path):
    root = write_karpathy(tmp_path / "ds", toy_images(4))
    placeholder_images(root / "images", ["0.png", "2.png"])
    with pytest.raises(DataError, match=r"2 of 4 image files are missing .*'1.png', '3.png'"):
        load_dataset(root, check_images=True)
    with pytest.raises(DataError, match="image folder .* does not exist"):
        load_dataset(root, image_dir=tmp_path / "nowhere", check_images=True)


def test_corrupt_image_is_named(tmp_path):
    root = write_karpathy(tmp_path / "ds", toy_images(4))
    placeholder_images(root / "images", ["0.png", "1.png", "2.png", "3.png"])
    good = (root / "images" / "2.png").read_bytes()
    (root / "images" / "2.png").write_bytes(good[: len(good) // 2])  # truncated file
    (root / "images" / "3.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"2 unreadable images.*2\.png.*3\.png"):
        load_dataset(root, check_images=True)
    with pytest.raises(DataError, match=r"cannot read image .*3\.png"):
        load_image(root / "images" / "3.png")


@pytest.mark.parametrize(
    ("mutate", "pattern"),
    [
        (lambda im: im[2].update(split="holdout"), r"unknown split name 'holdout'"),
        (lambda im: im[3].update(filename="0.png"), r"1 duplicate image file names.*'0.png'"),
        (
            lambda im: im[1]["sentences"][2].update(raw="  "),
            r"1 empty captions.*1.png \(caption 2\)",
        ),
        (lambda im: im[0].update(sentences=[]), r"1 images have no caption.*'0.png'"),
        (lambda im: im[0].pop("split"), r"images\[0\] lacks split"),
    ],
)
def test_karpathy_annotation_errors(tmp_path, mutate, pattern):
    imgs = toy_images(4)
    mutate(imgs)
    with pytest.raises(DataError, match=pattern):
        load_dataset(write_karpathy(tmp_path, imgs))


def test_split_aliases(tmp_path):
    imgs = toy_images(4)
    imgs[0]["split"], imgs[1]["split"] = "restval", "dev"
    ds = load_dataset(write_karpathy(tmp_path, imgs))
    assert ds.splits[:2] == ["train", "val"]


def write_precomp(root: Path, split: str, caps: list[str], names: list[str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{split}_caps.txt").write_text("\n".join(caps) + "\n")
    (root / f"{split}_filename.txt").write_text("\n".join(names) + "\n")
    return root


def test_precomp_layouts_without_hard_coded_five(tmp_path):
    caps = [f"cap {i}" for i in range(6)]
    # one name per image, 3 captions each
    ds = load_dataset(write_precomp(tmp_path / "a", "train", caps, ["a.tif", "b.tif"]))
    assert ds.captions == [caps[:3], caps[3:]] and "3 captions each" in ds.source
    # one name per caption, grouped by name
    names = ["a.tif", "a.tif", "b.tif", "b.tif", "c.tif", "c.tif"]
    ds = load_dataset(write_precomp(tmp_path / "b", "test", caps, names))
    assert ds.filenames == ["a.tif", "b.tif", "c.tif"] and ds.captions[2] == caps[4:]


def test_precomp_count_mismatch_names_both_layouts(tmp_path):
    root = write_precomp(tmp_path, "test", [f"c{i}" for i in range(7)], ["a", "b", "c"])
    with pytest.raises(DataError) as err:
        load_dataset(root)
    msg = str(err.value)
    assert "test_caps.txt has 7 lines" in msg and "test_filename.txt has 3" in msg
    assert "one name per caption" in msg and "one name per image" in msg


def test_precomp_missing_filename_file_and_empty_folder(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "train_caps.txt").write_text("x\n")
    with pytest.raises(DataError, match="no matching train_filename.txt"):
        load_dataset(tmp_path / "a")
    (tmp_path / "b").mkdir()
    with pytest.raises(DataError, match="no dataset found"):
        load_dataset(tmp_path / "b")
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(tmp_path / "missing")


def test_invalid_json_and_wrong_format(tmp_path):
    root = write_karpathy(tmp_path, toy_images(4))
    with pytest.raises(DataError, match="looks like 'karpathy'"):
        load_dataset(root, format="precomp")
    (root / "dataset.json").write_text('{"images": [')
    with pytest.raises(DataError, match="not valid JSON"):
        load_dataset(root)


def test_split_off_val_is_deterministic_and_leaves_test(tmp_path, annotations):
    ds = load_dataset(annotations / "ucm_precomp")
    a, b = split_off_val(ds, 210, seed=0), split_off_val(ds, 210, seed=0)
    assert a.splits == b.splits
    assert a.split("val").num_images == 210 and a.split("train").num_images == 1680
    assert a.split("test").filenames == ds.split("test").filenames
    assert split_off_val(ds, 210, seed=1).splits != a.splits
    with pytest.raises(DataError):
        split_off_val(ds, 5000)


def test_the_image_folder_can_be_elsewhere(tmp_path, ucm_subset):
    # A copy of the annotation file in another folder, images pointed to explicitly.
    shutil.copy(ucm_subset / "dataset.json", tmp_path / "dataset.json")
    ds = load_dataset(tmp_path, image_dir=ucm_subset / "images")
    check_images(ds.split("test"), decode=False)


# ---- text files that are not UTF-8, JSON that is not JSON -------------------------------------
def test_caption_file_not_utf8_names_the_byte_and_the_fix(tmp_path):
    caps = "a plane near the runway\nthe café by a river\n".encode("latin1")
    root = write_precomp(tmp_path, "test", ["x", "y"], ["a.png", "b.png"])
    (root / "test_caps.txt").write_bytes(caps)
    with pytest.raises(DataError) as err:
        load_dataset(root)
    assert str(err.value).startswith(
        f"{root / 'test_caps.txt'} is not UTF-8: byte 0xe9 at offset 31 (line 2); save it as "
        "UTF-8, e.g. (if it is Latin-1) iconv -f latin1 -t utf-8 test_caps.txt > "
    )
    # the same text saved as UTF-8 (with a byte-order mark, as Windows editors write it) reads
    (root / "test_caps.txt").write_bytes(b"\xef\xbb\xbf" + caps.decode("latin1").encode())
    assert load_dataset(root).captions == [["a plane near the runway"], ["the café by a river"]]


@pytest.mark.parametrize(
    ("encoding", "pattern"),
    [
        ("latin1", r"dataset\.json is not UTF-8: byte 0xe9 at offset \d+ .*iconv -f latin1"),
        ("utf-16", r"dataset\.json is not UTF-8: byte 0xff at offset 0 .*UTF-16.*iconv -f utf-16"),
    ],
)
def test_karpathy_json_not_utf8(tmp_path, encoding, pattern):
    imgs = toy_images(2)
    imgs[0]["sentences"][0]["raw"] = "une église près du fleuve"
    text = json.dumps({"images": imgs}, ensure_ascii=False)
    (tmp_path / "dataset.json").write_bytes(text.encode(encoding))
    with pytest.raises(DataError, match=pattern):
        load_dataset(tmp_path)


@pytest.mark.parametrize(
    ("text", "where"),
    [
        # a Python repr saved as .json: no '"images"' in it, once reported as "no dataset found"
        ("{'images': []}", "Expecting property name enclosed in double quotes at line 1, column 2"),
        (
            '{\n "images": [\n  {"filename": "a.png", "split": "test",\n'
            '   "sentences": [],}\n ]\n}',
            "Expecting property name enclosed in double quotes at line 4, column 20",
        ),
        ("", "Expecting value at line 1, column 1"),
    ],
)
def test_json_error_names_file_line_and_column(tmp_path, text, where):
    (tmp_path / "dataset.json").write_text(text)
    with pytest.raises(DataError) as err:
        load_dataset(tmp_path)
    assert str(err.value) == f"{tmp_path / 'dataset.json'} is not valid JSON: {where}"


def test_a_broken_json_beside_a_good_one_is_not_blamed(tmp_path):
    write_karpathy(tmp_path, toy_images(4))
    (tmp_path / "notes.json").write_text("{'not': 'json'}")
    assert load_dataset(tmp_path).num_images == 4
