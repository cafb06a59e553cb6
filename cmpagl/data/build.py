"""Turn a :class:`~cmpagl.config.DataConfig` into a loaded, validated dataset and transforms."""

from __future__ import annotations

from pathlib import Path

from cmpagl.config import DataConfig
from cmpagl.data.dataset import CaptionDataset, split_off_val
from cmpagl.data.readers import load_dataset


def dataset_from_config(cfg: DataConfig) -> CaptionDataset:
    """Load (and, for ``name: synthetic``, first generate) the dataset a config describes."""
    root = Path(cfg.root)
    if cfg.name == "synthetic":
        from cmpagl.data.synthetic import generate_synthetic_dataset

        # Idempotent: returns at once when the folder holds the same generation already.
        generate_synthetic_dataset(
            root,
            n_train=cfg.synthetic_n_train,
            n_val=cfg.synthetic_n_val,
            n_test=cfg.synthetic_n_test,
            image_size=cfg.image_size,
            seed=cfg.synthetic_seed,
        )
    ds = load_dataset(
        root,
        format=cfg.format,
        image_dir=cfg.image_dir,
        name=cfg.name,
        empty_captions=cfg.empty_captions,
        check_images=cfg.check_images,
        captions_per_image=cfg.captions_per_image,
    )
    if cfg.val_from_train:
        ds = split_off_val(ds, cfg.val_from_train, seed=0)  # fixed: the split is data, not a run
    return ds


def transforms_from_config(cfg: DataConfig):
    """``(train_transform, eval_transform)`` for a data config (see :mod:`.transforms`)."""
    from cmpagl.data.transforms import build_eval_transform, build_train_transform

    train = build_train_transform(
        cfg.image_size,
        cfg.aug_random_resized_crop,
        cfg.aug_hflip,
        cfg.aug_vflip,
        cfg.aug_rot90,
        cfg.normalize_mean,
        cfg.normalize_std,
    )
    return train, build_eval_transform(cfg.image_size, cfg.normalize_mean, cfg.normalize_std)
