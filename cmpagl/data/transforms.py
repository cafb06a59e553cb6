"""Image transforms suited to overhead imagery.

Aerial and satellite scenes have no canonical "up": flips and 90-degree rotations are label
preserving, unlike for everyday photos. Random resized crops keep most of the scene (default
scale 0.5-1.0) because captions often describe objects near the border.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torchvision.transforms import v2 as T

from cmpagl.data.images import ImageReading

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class RandomRot90(torch.nn.Module):
    """Rotate a ``[..., H, W]`` image tensor by k·90°, k uniform in {0, 1, 2, 3}."""

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        k = int(torch.randint(4, ()).item())
        return torch.rot90(img, k, dims=(-2, -1)) if k else img


@dataclass(frozen=True)
class ReadingTransform:
    """A transform (PIL image -> tensor) together with the rule its image files are read by.

    :func:`~cmpagl.data.build.transforms_from_config` returns these, so the datasets of
    :mod:`cmpagl.data.torch_data` read 16-bit and multi-band files as the data config says
    (``data.image_*``) wherever the transform goes; called, it is just ``transform``.
    """

    transform: Callable[[object], torch.Tensor]
    reading: ImageReading

    def __call__(self, image: object) -> torch.Tensor:
        return self.transform(image)


def build_train_transform(
    image_size: int,
    crop_scale: Sequence[float] = (0.5, 1.0),
    hflip: bool = True,
    vflip: bool = True,
    rot90: bool = True,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> T.Compose:
    """PIL image -> normalised float tensor ``[3, image_size, image_size]`` with augmentation."""
    ops: list = [T.ToImage()]
    if tuple(crop_scale) == (1.0, 1.0):
        ops.append(T.Resize((image_size, image_size), antialias=True))
    else:
        ops.append(T.RandomResizedCrop(image_size, scale=tuple(crop_scale), antialias=True))
    if hflip:
        ops.append(T.RandomHorizontalFlip())
    if vflip:
        ops.append(T.RandomVerticalFlip())
    if rot90:
        ops.append(RandomRot90())
    ops += [T.ToDtype(torch.float32, scale=True), T.Normalize(list(mean), list(std))]
    return T.Compose(ops)


def build_eval_transform(
    image_size: int, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> T.Compose:
    """PIL image -> normalised float tensor ``[3, image_size, image_size]`` (resize only)."""
    return T.Compose(
        [
            T.ToImage(),
            T.Resize((image_size, image_size), antialias=True),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(list(mean), list(std)),
        ]
    )


def denormalize(
    x: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> torch.Tensor:
    """Undo :func:`build_eval_transform`'s normalisation: ``[..., 3, H, W]`` -> values in [0, 1]."""
    m = torch.tensor(mean, dtype=x.dtype).view(3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(3, 1, 1)
    return (x * s + m).clamp(0, 1)
