"""PyTorch datasets, transforms for overhead imagery, and the worker data loader."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from cmpagl.config import DataConfig
from cmpagl.data import CaptionDataset
from cmpagl.data.build import dataset_from_config, transforms_from_config
from cmpagl.data.torch_data import EvalCaptions, EvalImages, TrainPairs, make_loader
from cmpagl.data.transforms import (
    RandomRot90,
    build_eval_transform,
    build_train_transform,
    denormalize,
)


@pytest.fixture()
def toy(tmp_path) -> CaptionDataset:
    """6 images with distinct colours, a different number of captions each."""
    names, caps = [], []
    for i in range(6):
        arr = np.zeros((40, 48, 3), np.uint8)
        arr[..., i % 3] = 40 * i + 20
        Image.fromarray(arr).save(tmp_path / f"{i}.png")
        names.append(f"{i}.png")
        caps.append([f"img {i} cap {j}" for j in range(1 + i % 3)])
    return CaptionDataset(
        "toy", tmp_path, names, ["train"] * 6, caps, image_ids=[10 + i for i in range(6)]
    )


def test_train_pairs_sample_own_captions(toy):
    pairs = TrainPairs(toy, build_eval_transform(32))
    torch.manual_seed(0)
    seen = set()
    for _ in range(20):
        image, caption, image_id = pairs[2]
        assert image.shape == (3, 32, 32) and image.dtype == torch.float32
        assert caption in toy.captions[2] and image_id == 12
        seen.add(caption)
    assert seen == set(toy.captions[2])  # every caption gets sampled


def test_eval_datasets_cover_everything_in_order(toy):
    images = EvalImages(toy, build_eval_transform(16))
    assert len(images) == 6 and images[4][1] == 4
    caps = EvalCaptions(toy)
    assert len(caps) == toy.num_captions == 12
    assert [caps[j][1] for j in range(len(caps))] == toy.txt2img.tolist()
    assert caps[3] == ("img 2 cap 0", 2)


def test_eval_transform_resizes_and_normalises(toy):
    x = build_eval_transform(32)(Image.open(toy.image_path(5)).convert("RGB"))
    back = denormalize(x)
    # image 5 has only its blue channel set, to 220/255
    assert torch.allclose(back[2], torch.full((32, 32), 220 / 255), atol=1e-5)
    assert back[0].abs().max() < 1e-5 and back[1].abs().max() < 1e-5


def test_rot90_and_flips_preserve_pixels():
    img = torch.arange(16.0).view(1, 4, 4)
    torch.manual_seed(0)
    outs = {tuple(RandomRot90()(img).flatten().tolist()) for _ in range(50)}
    expected = {tuple(torch.rot90(img, k, (-2, -1)).flatten().tolist()) for k in range(4)}
    assert outs == expected
    # The full train transform without cropping only permutes pixels (a flip/rotation group).
    arr = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    t = build_train_transform(32, crop_scale=(1.0, 1.0), mean=(0, 0, 0), std=(1, 1, 1))
    out = t(Image.fromarray(arr))
    ref = torch.from_numpy(arr).permute(2, 0, 1).float() / 255
    assert torch.allclose(out.sum(), ref.sum(), atol=1e-3)
    assert sorted(out.flatten().tolist()) == pytest.approx(sorted(ref.flatten().tolist()), abs=1e-6)


def test_loader_with_workers_is_reproducible(toy):
    pairs = TrainPairs(toy, build_train_transform(16))

    def run(seed):
        loader = make_loader(pairs, batch_size=4, shuffle=True, num_workers=2, seed=seed)
        return [(b[0].sum().item(), tuple(b[1]), b[2].tolist()) for b in loader]

    a, b = run(0), run(0)
    assert a == b
    assert run(1) != a
    ids = sorted(i for batch in a for i in batch[2])
    assert ids == [10, 11, 12, 13, 14, 15]  # one epoch = every image once


def test_config_to_dataset_and_transforms(small_synthetic):
    cfg = DataConfig(
        name="synthetic",
        root=str(small_synthetic),
        image_size=64,
        synthetic_n_train=40,
        synthetic_n_val=10,
        synthetic_n_test=10,
        synthetic_seed=3,
        captions_per_image=5,
    )
    ds = dataset_from_config(cfg)
    assert [ds.split(s).num_images for s in ("train", "val", "test")] == [40, 10, 10]
    train_t, eval_t = transforms_from_config(cfg)
    assert TrainPairs(ds, train_t)[0][0].shape == (3, 64, 64)
    assert EvalImages(ds, eval_t)[0][0].shape == (3, 64, 64)
