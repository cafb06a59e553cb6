"""PyTorch datasets and loaders over a :class:`~cmpagl.data.dataset.CaptionDataset`.

Training iterates over images and samples one of the image's captions each time (so one epoch
shows every image once). Evaluation embeds all images and all captions separately; the caption
-> image index (``txt2img``) joins them for the metrics.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from cmpagl.data.dataset import CaptionDataset
from cmpagl.data.images import ImageReading
from cmpagl.data.validation import load_image

Transform = Callable[[object], torch.Tensor]


def _reading(transform: Transform, reading: ImageReading | None) -> ImageReading | None:
    """The image reading rule: given, or the one a config's transform carries
    (:class:`~cmpagl.data.transforms.ReadingTransform`), else None (the defaults)."""
    return reading if reading is not None else getattr(transform, "reading", None)


class TrainPairs(Dataset):
    """Item ``i``: ``(image [3, H, W], caption: str, image_id: int)``, the caption drawn
    uniformly from image ``i``'s captions with torch's RNG (seeded per worker by the loader).

    Files are read by ``reading`` (default: the one ``transform`` carries, see
    :func:`~cmpagl.data.build.transforms_from_config`; else :mod:`cmpagl.data.images`' defaults).
    """

    def __init__(
        self, ds: CaptionDataset, transform: Transform, reading: ImageReading | None = None
    ) -> None:
        self.ds, self.transform = ds, transform
        self.reading = _reading(transform, reading)

    def __len__(self) -> int:
        return self.ds.num_images

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str, int]:
        caps = self.ds.captions[i]
        caption = caps[int(torch.randint(len(caps), ()).item())]
        image = self.transform(load_image(self.ds.image_path(i), self.reading))
        return image, caption, self.ds.image_ids[i]


class EvalImages(Dataset):
    """Item ``i``: ``(image [3, H, W], i)`` for every image of the dataset, in order; files
    read as for :class:`TrainPairs`."""

    def __init__(
        self, ds: CaptionDataset, transform: Transform, reading: ImageReading | None = None
    ) -> None:
        self.ds, self.transform = ds, transform
        self.reading = _reading(transform, reading)

    def __len__(self) -> int:
        return self.ds.num_images

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(load_image(self.ds.image_path(i), self.reading)), i


class EvalCaptions(Dataset):
    """Item ``j``: ``(caption: str, image index)`` for every caption (``txt2img`` order)."""

    def __init__(self, ds: CaptionDataset) -> None:
        self.captions = ds.all_captions
        self.txt2img: np.ndarray = ds.txt2img

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, j: int) -> tuple[str, int]:
        return self.captions[j], int(self.txt2img[j])


def _seed_worker(worker_id: int) -> None:
    # torch seeds each worker from the loader's generator; numpy and random follow it so that
    # any augmentation using them is reproducible too.
    import random

    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    num_workers: int = 2,
    seed: int = 0,
    drop_last: bool = False,
) -> DataLoader:
    """A :class:`DataLoader` with worker processes, reproducible for a given ``seed``."""
    gen = torch.Generator()
    gen.manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        drop_last=drop_last,
        generator=gen,
        worker_init_fn=_seed_worker if num_workers > 0 else None,
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(),
    )
