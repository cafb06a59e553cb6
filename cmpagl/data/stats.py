"""Dataset checks and statistics: counts, caption lengths, vocabulary, repeated captions, and the
same image appearing in two splits (a perceptual hash), as used by ``cmpagl data stats``."""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from cmpagl.data.dataset import CaptionDataset
from cmpagl.data.validation import load_image
from cmpagl.metrics import normalize_caption

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def tokenize(text: str) -> list[str]:
    """Lower-case word tokens (punctuation dropped), as used for lengths and vocabulary."""
    return _WORD.findall(text.lower())


@dataclass
class SplitCounts:
    images: int
    captions: int


@dataclass
class DatasetStats:
    """What ``cmpagl data stats`` prints; every field is plain data (JSON-able via asdict)."""

    name: str
    splits: dict[str, SplitCounts]
    images: int
    captions: int
    captions_per_image: dict[int, int]  # number of captions -> number of images
    length_histogram: dict[int, int]  # caption length in words -> number of captions
    mean_length: float
    vocabulary_size: int
    distinct_captions: int  # after normalisation (case, spaces, final punctuation)
    shared_captions: int  # distinct captions that belong to more than one image
    captions_in_shared: int  # captions whose text also describes another image
    labels: dict[str, int] | None = None
    cross_split_duplicates: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _images_of_texts(ds: CaptionDataset) -> dict[str, set[int]]:
    """Normalised caption text -> the images (indices) that carry it."""
    images_of: dict[str, set[int]] = defaultdict(set)
    for text, img in zip(ds.all_captions, ds.txt2img, strict=True):
        images_of[normalize_caption(text)].add(int(img))
    return images_of


def caption_repetition(ds: CaptionDataset) -> np.ndarray:
    """``[N_txt]`` int: for each caption of ``ds`` (``ds.all_captions`` order), how many images
    carry the same text after normalisation (case, spaces, final punctuation); 1 = the text is
    unique to its image. A caption repeated within one image still counts that image once.

    Identical texts get identical embeddings, so a caption with repetition ``n`` cannot rank its
    own image above the other ``n - 1`` (the oracle bound of METHOD.md §4)."""
    images_of = _images_of_texts(ds)
    counts = [len(images_of[normalize_caption(t)]) for t in ds.all_captions]
    return np.array(counts, dtype=np.int64)


def caption_statistics(ds: CaptionDataset) -> dict:
    """Caption-level statistics of ``ds`` (no image is read)."""
    texts = ds.all_captions
    lengths = [len(tokenize(t)) for t in texts]
    vocab = {w for t in texts for w in tokenize(t)}
    images_of = _images_of_texts(ds)
    shared = {t for t, imgs in images_of.items() if len(imgs) > 1}
    return {
        "length_histogram": dict(sorted(Counter(lengths).items())),
        "mean_length": float(np.mean(lengths)) if lengths else 0.0,
        "vocabulary_size": len(vocab),
        "distinct_captions": len(images_of),
        "shared_captions": len(shared),
        "captions_in_shared": sum(normalize_caption(t) in shared for t in texts),
    }


def dataset_statistics(ds: CaptionDataset, with_images: bool = False) -> DatasetStats:
    """All statistics of ``ds``; ``with_images`` also hashes every image to find the same image
    in two splits (reads every file)."""
    splits = {
        s: SplitCounts(
            images=ds.splits.count(s),
            captions=sum(len(c) for c, sp in zip(ds.captions, ds.splits, strict=True) if sp == s),
        )
        for s in ds.split_names()
    }
    return DatasetStats(
        name=ds.name,
        splits=splits,
        images=ds.num_images,
        captions=ds.num_captions,
        captions_per_image=dict(sorted(Counter(len(c) for c in ds.captions).items())),
        labels=dict(sorted(Counter(ds.labels).items())) if ds.labels else None,
        cross_split_duplicates=cross_split_duplicates(ds) if with_images else [],
        **caption_statistics(ds),
    )


def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)[:, None]
    x = np.arange(n)[None, :]
    m = np.cos(np.pi * (2 * x + 1) * k / (2 * n)) * np.sqrt(2 / n)
    m[0] /= np.sqrt(2)
    return m


def perceptual_hash(path: str | Path, hash_size: int = 8, highfreq: int = 4) -> int:
    """pHash of an image: the signs (vs the median) of the lowest ``hash_size²`` DCT frequencies
    of a ``(hash_size·highfreq)²`` grey thumbnail, as a 64-bit integer. Robust to re-encoding and
    resizing, so it finds the same scene saved twice."""
    n = hash_size * highfreq
    grey = load_image(path).convert("L").resize((n, n), resample=3)  # 3 = BICUBIC
    a = np.asarray(grey, dtype=np.float64)
    d = _dct_matrix(n)
    low = (d @ a @ d.T)[:hash_size, :hash_size].ravel()
    bits = low > np.median(low[1:])  # the DC term would dominate the median
    return int(sum(1 << i for i, b in enumerate(bits) if b))


def cross_split_duplicates(ds: CaptionDataset, max_distance: int = 4) -> list[dict]:
    """Pairs of images in different splits whose perceptual hashes differ in at most
    ``max_distance`` of 64 bits: ``[{"a", "split_a", "b", "split_b", "distance"}]``."""
    hashes = np.array(
        [perceptual_hash(ds.image_path(i)) for i in range(ds.num_images)], dtype=np.uint64
    )
    splits = np.array(ds.splits)
    pairs = []
    for i in range(ds.num_images):  # one vectorised row at a time: O(N) memory
        dist = np.bitwise_count(hashes[i] ^ hashes[i + 1 :])
        for j in np.nonzero((dist <= max_distance) & (splits[i + 1 :] != splits[i]))[0]:
            k = i + 1 + int(j)
            pairs.append(
                {
                    "a": ds.filenames[i],
                    "split_a": ds.splits[i],
                    "b": ds.filenames[k],
                    "split_b": ds.splits[k],
                    "distance": int(dist[j]),
                }
            )
    return pairs


def format_statistics(st: DatasetStats) -> str:
    """A human-readable report of :class:`DatasetStats`."""
    lines = [f"dataset: {st.name}", f"{'split':<8}{'images':>10}{'captions':>12}"]
    for name, c in st.splits.items():
        lines.append(f"{name:<8}{c.images:>10,}{c.captions:>12,}")
    lines.append(f"{'total':<8}{st.images:>10,}{st.captions:>12,}")
    cpi = ", ".join(f"{k}: {v}" for k, v in st.captions_per_image.items())
    lines += [
        f"captions per image: {cpi}",
        f"caption length (words): mean {st.mean_length:.1f}, "
        f"min {min(st.length_histogram, default=0)}, max {max(st.length_histogram, default=0)}",
        f"vocabulary: {st.vocabulary_size:,} words",
        f"distinct captions: {st.distinct_captions:,} of {st.captions:,} "
        f"({100 * st.distinct_captions / max(st.captions, 1):.1f} %)",
        f"captions shared by several images: {st.shared_captions:,} distinct texts, "
        f"covering {st.captions_in_shared:,} captions",
    ]
    if st.labels:
        lines.append(f"classes: {len(st.labels)} ({', '.join(st.labels)})")
    lines.append(
        "length histogram: " + " ".join(f"{k}:{v}" for k, v in st.length_histogram.items())
    )
    if st.cross_split_duplicates:
        lines.append(f"same image in two splits: {len(st.cross_split_duplicates)} pairs, e.g.")
        for p in st.cross_split_duplicates[:5]:
            lines.append(
                f"  {p['a']} ({p['split_a']}) ~ {p['b']} ({p['split_b']}), distance {p['distance']}"
            )
    return "\n".join(lines)
