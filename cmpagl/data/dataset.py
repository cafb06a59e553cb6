"""One in-memory representation of an image-caption retrieval dataset.

Every reader (Karpathy JSON, "precomp" text files, the synthetic generator's output) produces a
:class:`CaptionDataset`: a list of images, each with its captions, split and optional class label.
Nothing assumes 5 captions per image, although all four benchmarks have 5.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

#: Split names a dataset may use. Karpathy's "restval" is read as "train"; "dev" as "val".
SPLITS = ("train", "val", "test")
SPLIT_ALIASES = {"restval": "train", "dev": "val", "valid": "val", "validation": "val"}


class DataError(ValueError):
    """A dataset on disk is inconsistent; the message says what, where and how many."""


def canonical_split(name: str, source: str = "") -> str:
    """Map a split name as found on disk to one of :data:`SPLITS`, or raise :class:`DataError`."""
    key = str(name).strip().lower()
    key = SPLIT_ALIASES.get(key, key)
    if key not in SPLITS:
        where = f" in {source}" if source else ""
        known = ", ".join(SPLITS + tuple(SPLIT_ALIASES))
        raise DataError(f"unknown split name {name!r}{where}; known split names: {known}")
    return key


def _first(items: list[str], n: int = 5) -> str:
    shown = ", ".join(repr(x) for x in items[:n])
    return shown + (f", ... ({len(items) - n} more)" if len(items) > n else "")


@dataclass
class CaptionDataset:
    """Images with their captions, ids, splits and optional class labels.

    Attributes:
        name: dataset name used in reports.
        image_dir: folder the file names are relative to.
        filenames: ``[N_img]`` image file names (unique).
        splits: ``[N_img]`` one of ``train``/``val``/``test``.
        captions: ``[N_img]`` lists of caption strings (any number >= 1 per image).
        image_ids: ``[N_img]`` stable integer ids (used as ITC positives: same id, same image).
        labels: ``[N_img]`` class names, or ``None`` when the format has none.
        source: the annotation file(s) read, for messages.
    """

    name: str
    image_dir: Path
    filenames: list[str]
    splits: list[str]
    captions: list[list[str]]
    image_ids: list[int] = field(default_factory=list)
    labels: list[str] | None = None
    source: str = ""

    def __post_init__(self) -> None:
        self.image_dir = Path(self.image_dir)
        if not self.image_ids:
            self.image_ids = list(range(len(self.filenames)))
        self.validate()

    # -- validation -------------------------------------------------------------------------
    def validate(self) -> None:
        """Check the annotations themselves (not the image files): see :func:`check_images`."""
        n = len(self.filenames)
        where = f" in {self.source}" if self.source else ""
        for attr in ("splits", "captions", "image_ids"):
            if len(getattr(self, attr)) != n:
                raise DataError(
                    f"{attr} has {len(getattr(self, attr))} entries for {n} images{where}"
                )
        if self.labels is not None and len(self.labels) != n:
            raise DataError(f"labels has {len(self.labels)} entries for {n} images{where}")
        dup = [f for f, c in Counter(self.filenames).items() if c > 1]
        if dup:
            raise DataError(f"{len(dup)} duplicate image file names{where}: {_first(dup)}")
        if len(set(self.image_ids)) != n:
            raise DataError(f"image ids are not unique{where}")
        self.splits = [canonical_split(s, self.source) for s in self.splits]
        no_caps = [f for f, caps in zip(self.filenames, self.captions, strict=True) if not caps]
        if no_caps:
            raise DataError(f"{len(no_caps)} images have no caption{where}: {_first(no_caps)}")
        empty = [
            f"{f} (caption {j})"
            for f, caps in zip(self.filenames, self.captions, strict=True)
            for j, c in enumerate(caps)
            if not str(c).strip()
        ]
        if empty:
            raise DataError(f"{len(empty)} empty captions{where}: {_first(empty)}")

    # -- views ------------------------------------------------------------------------------
    @property
    def num_images(self) -> int:
        return len(self.filenames)

    @property
    def num_captions(self) -> int:
        return sum(len(c) for c in self.captions)

    @property
    def all_captions(self) -> list[str]:
        """``[N_txt]`` captions flattened image by image (the order of :attr:`txt2img`)."""
        return [c for caps in self.captions for c in caps]

    @property
    def txt2img(self) -> np.ndarray:
        """``[N_txt]`` int64: the index (into this dataset's images) of each caption's image."""
        counts = [len(c) for c in self.captions]
        return np.repeat(np.arange(self.num_images, dtype=np.int64), counts)

    def image_path(self, i: int) -> Path:
        return self.image_dir / self.filenames[i]

    def split_names(self) -> list[str]:
        """Splits present, in the order train, val, test."""
        present = set(self.splits)
        return [s for s in SPLITS if s in present]

    def subset(self, indices: list[int] | np.ndarray, name: str | None = None) -> CaptionDataset:
        """A new dataset with the images at ``indices`` (in that order)."""
        idx = [int(i) for i in indices]
        return CaptionDataset(
            name=name or self.name,
            image_dir=self.image_dir,
            filenames=[self.filenames[i] for i in idx],
            splits=[self.splits[i] for i in idx],
            captions=[list(self.captions[i]) for i in idx],
            image_ids=[self.image_ids[i] for i in idx],
            labels=None if self.labels is None else [self.labels[i] for i in idx],
            source=self.source,
        )

    def split(self, split: str) -> CaptionDataset:
        """The images of one split (``train``, ``val`` or ``test``); raises if it is empty."""
        key = canonical_split(split, self.source)
        idx = [i for i, s in enumerate(self.splits) if s == key]
        if not idx:
            raise DataError(
                f"dataset {self.name!r} has no {key!r} images (splits present: "
                f"{', '.join(self.split_names()) or 'none'})"
            )
        return self.subset(idx, name=f"{self.name}/{key}")

    def __len__(self) -> int:
        return self.num_images

    def __repr__(self) -> str:
        per = ", ".join(f"{s}={self.splits.count(s)}" for s in self.split_names())
        return (
            f"CaptionDataset({self.name!r}, {self.num_images} images, "
            f"{self.num_captions} captions, {per})"
        )


def split_off_val(ds: CaptionDataset, n_val: int, seed: int = 0) -> CaptionDataset:
    """Move ``n_val`` random train images to ``val`` (for precomp data, published without one).

    Model selection needs a validation split that is not the test split; the precomp files of
    RSICD/RSITMD/UCM ship only train and test, so a fixed-seed part of train becomes val.
    """
    train = [i for i, s in enumerate(ds.splits) if s == "train"]
    if not 0 < n_val < len(train):
        raise DataError(f"cannot move {n_val} of {len(train)} train images to val")
    chosen = set(np.random.default_rng(seed).choice(train, size=n_val, replace=False).tolist())
    splits = ["val" if i in chosen else s for i, s in enumerate(ds.splits)]
    return CaptionDataset(
        ds.name,
        ds.image_dir,
        list(ds.filenames),
        splits,
        [list(c) for c in ds.captions],
        list(ds.image_ids),
        None if ds.labels is None else list(ds.labels),
        ds.source,
    )
