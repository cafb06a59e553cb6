"""Turn a :class:`~cmpagl.config.DataConfig` into a loaded, validated dataset and transforms.

Loading never renders images. A config naming the synthetic dataset (``name: synthetic``) needs
its folder written first, by ``cmpagl data synthetic FOLDER`` (``make data``) or, as an explicit
step of a command, by :func:`prepare_synthetic_dataset`.
"""

from __future__ import annotations

import time
from pathlib import Path

from cmpagl.config import ConfigError, DataConfig
from cmpagl.data.dataset import CaptionDataset, DataError, split_off_val
from cmpagl.data.images import ImageReading
from cmpagl.data.readers import load_dataset

__all__ = [
    "dataset_from_config",
    "image_reading_from_config",
    "prepare_synthetic_dataset",
    "synthetic_dataset_problem",
    "transforms_from_config",
]


def _synthetic_params(cfg: DataConfig) -> dict[str, int]:
    """The generator's parameters a synthetic data config asks for."""
    return {
        "n_train": cfg.synthetic_n_train,
        "n_val": cfg.synthetic_n_val,
        "n_test": cfg.synthetic_n_test,
        "image_size": cfg.image_size,
        "seed": cfg.synthetic_seed,
    }


def synthetic_dataset_problem(cfg: DataConfig) -> str | None:
    """Why ``cfg.root`` does not hold the synthetic dataset ``cfg`` asks for, in one line that
    names the command writing it; None when it does (or when ``cfg`` is not synthetic)."""
    from cmpagl.data.synthetic import generation_command, generator_record, read_generator_record

    if cfg.name != "synthetic":
        return None
    params = _synthetic_params(cfg)
    wanted, found = generator_record(**params), read_generator_record(cfg.root)
    if found == wanted:
        return None
    command = generation_command(cfg.root, **params)
    if found is None:
        root = Path(cfg.root)
        if not root.exists():
            what = "does not exist"
        elif (root / "dataset.json").is_file():
            what = "holds a dataset.json the synthetic generator did not write"
        else:
            what = "holds no synthetic dataset"
        return f"synthetic dataset folder {cfg.root} {what}; write it first with: {command}"
    diff = ", ".join(
        f"{k} {found.get(k)!r} on disk, {v!r} in the config"
        for k, v in wanted.items()
        if found.get(k) != v
    )
    return (
        f"synthetic dataset folder {cfg.root} holds another generation ({diff}); "
        f"write the one the config asks for with: {command}"
    )


def prepare_synthetic_dataset(cfg: DataConfig, announce: bool = True) -> bool:
    """Generate the synthetic dataset ``cfg`` names unless its folder already holds it.

    The explicit step a command runs before it loads the data (the loaders never generate).
    When it generates and ``announce``, it prints one line: what, where, and how long it took.

    Returns:
        Whether it generated (False for a non-synthetic config or a folder already complete).
    """
    from cmpagl.data.synthetic import generate_synthetic_dataset

    if synthetic_dataset_problem(cfg) is None:
        return False
    p = _synthetic_params(cfg)
    if announce:  # the start first, so a long generation is not a silent wait
        print(
            f"generating the synthetic dataset ({p['n_train']}/{p['n_val']}/{p['n_test']} "
            f"train/val/test images, {p['image_size']} px, seed {p['seed']}) in {cfg.root} ...",
            end="",
            flush=True,
        )
    start = time.perf_counter()
    generate_synthetic_dataset(cfg.root, **p)
    if announce:
        print(f" done in {time.perf_counter() - start:.1f} s", flush=True)
    return True


def dataset_from_config(cfg: DataConfig) -> CaptionDataset:
    """Load the dataset a config describes (reading only: nothing is generated here).

    Raises:
        DataError: for ``name: synthetic``, the folder does not hold the generation the config
            asks for (the message names the ``cmpagl data synthetic`` command that writes it);
            otherwise whatever the reader finds wrong with the files.
    """
    problem = synthetic_dataset_problem(cfg)
    if problem is not None:
        raise DataError(problem)
    ds = load_dataset(
        Path(cfg.root),
        format=cfg.format,
        image_dir=cfg.image_dir,
        name=cfg.name,
        empty_captions=cfg.empty_captions,
        check_images=cfg.check_images,
        captions_per_image=cfg.captions_per_image,
        image_reading=image_reading_from_config(cfg),
    )
    if cfg.val_from_train:
        ds = split_off_val(ds, cfg.val_from_train, seed=0)  # fixed: the split is data, not a run
    return ds


def image_reading_from_config(cfg: DataConfig) -> ImageReading:
    """How the config's images that are not 8-bit RGB become 8-bit RGB (``data.image_*``).

    Raises:
        ConfigError: a value out of range, naming the key (e.g. percentiles not increasing).
    """
    try:
        return ImageReading(
            scaling=cfg.image_scaling,
            percentiles=tuple(cfg.image_percentiles),
            bits=cfg.image_bits,
            bands=None if cfg.image_bands is None else tuple(cfg.image_bands),
        )
    except ValueError as e:  # ImageReading names the attribute first: "bits must be ..."
        key = "data.image_" + str(e).split()[0]
        raise ConfigError(f"{key} {str(e).split(maxsplit=1)[1]}", key=key) from e


def transforms_from_config(cfg: DataConfig):
    """``(train_transform, eval_transform)`` for a data config (see :mod:`.transforms`), each a
    :class:`~cmpagl.data.transforms.ReadingTransform` carrying the config's image reading rule
    to the datasets that read the files."""
    from cmpagl.data.transforms import ReadingTransform, build_eval_transform, build_train_transform

    train = build_train_transform(
        cfg.image_size,
        cfg.aug_random_resized_crop,
        cfg.aug_hflip,
        cfg.aug_vflip,
        cfg.aug_rot90,
        cfg.normalize_mean,
        cfg.normalize_std,
    )
    evaluation = build_eval_transform(cfg.image_size, cfg.normalize_mean, cfg.normalize_std)
    reading = image_reading_from_config(cfg)
    return ReadingTransform(train, reading), ReadingTransform(evaluation, reading)
