"""Readers for the two published annotation formats, with the format detected from a folder.

* **Karpathy JSON** (RSICD / RSITMD / UCM / Sydney, and our synthetic data): one ``*.json`` with
  ``images[].filename``, ``images[].split`` and ``images[].sentences[].raw``.
* **precomp** (PE-RSITR, AMFMN, GaLR, ...): ``{split}_caps.txt`` (one caption a line) and
  ``{split}_filename.txt``. As published, test files have ONE NAME PER CAPTION (each name repeated
  5 times) while train files have ONE NAME PER IMAGE (consecutive caption lines belong to it).
  Both layouts are accepted; counts that match neither are an error that says so.
"""

from __future__ import annotations

import json
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from cmpagl.data.dataset import SPLIT_ALIASES, SPLITS, CaptionDataset, DataError, _first

if TYPE_CHECKING:
    from cmpagl.data.images import ImageReading

Format = Literal["auto", "karpathy", "precomp"]
EmptyCaptions = Literal["error", "drop"]
_PRECOMP_SPLITS = SPLITS + tuple(SPLIT_ALIASES)
_IMAGE_DIR_NAMES = ("images", "imgs", "image", "img")


def detect_format(root: str | Path) -> tuple[str, Path]:
    """Return ``("karpathy", json_path)`` or ``("precomp", root)`` for a dataset folder.

    A path to a ``.json`` file is taken as Karpathy directly.
    """
    root = Path(root)
    if root.is_file() and root.suffix == ".json":
        return "karpathy", root
    if not root.is_dir():
        raise DataError(f"dataset path {str(root)!r} does not exist or is not a folder")
    if any((root / f"{s}_caps.txt").is_file() for s in _PRECOMP_SPLITS):
        return "precomp", root
    candidates = sorted(root.glob("*.json"))
    preferred = [p for p in candidates if p.name.startswith("dataset")]
    ordered = preferred + [p for p in candidates if p not in preferred]
    for path in ordered:
        if _looks_karpathy(path):
            return "karpathy", path
    for path in ordered:  # none looks right: a file that is not JSON at all is the likely cause
        _parse_json(path)
    raise DataError(
        f"no dataset found in {str(root)!r}: expected a Karpathy JSON (e.g. dataset.json with "
        f"'images') or precomp files ({{split}}_caps.txt + {{split}}_filename.txt)"
    )


def _looks_karpathy(path: Path) -> bool:
    # Cheap check on the head of the file so a large unrelated JSON is not parsed twice; bytes,
    # so a file that is not UTF-8 gets read_karpathy's message rather than a decode error here.
    with open(path, "rb") as f:
        head = f.read(4096)
    return b'"images"' in head


def read_text(path: Path) -> str:
    """A UTF-8 text file's content (a leading byte-order mark dropped).

    Raises:
        DataError: the file is not UTF-8; the message names the byte, its offset and line, and
            the command that converts the file.
    """
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        utf16 = data[:2] in (b"\xff\xfe", b"\xfe\xff")
        source = "utf-16" if utf16 else "latin1"
        guess = "it looks like UTF-16" if utf16 else "if it is Latin-1"
        raise DataError(
            f"{path} is not UTF-8: byte 0x{data[e.start]:02x} at offset {e.start} (line {line}); "
            f"save it as UTF-8, e.g. ({guess}) iconv -f {source} -t utf-8 {path.name} > "
            f"{path.stem}.utf8{path.suffix} and put that in its place"
        ) from e


def _parse_json(path: Path) -> object:
    """The JSON value in ``path``; :class:`DataError` naming the file, line and column if it is
    not JSON, or the byte if it is not UTF-8."""
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise DataError(
            f"{path} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}"
        ) from e


def _default_image_dir(root: Path) -> Path:
    for name in _IMAGE_DIR_NAMES:
        if (root / name).is_dir():
            return root / name
    return root / "images"


def _drop_empty(
    captions: list[list[str]], filenames: list[str], policy: EmptyCaptions, source: str
) -> tuple[list[list[str]], list[int]]:
    """Apply the empty-caption policy; return cleaned captions and the image indices kept."""
    empty = [
        f"{f} (caption {j})"
        for f, caps in zip(filenames, captions, strict=True)
        for j, c in enumerate(caps)
        if not c.strip()
    ]
    if not empty:
        return captions, list(range(len(filenames)))
    if policy == "error":
        raise DataError(
            f"{len(empty)} empty captions in {source}: {_first(empty)}. "
            "Fix the file, or read it with empty_captions='drop' (config: data.empty_captions) "
            "to drop empty captions and images left without any."
        )
    cleaned = [[c for c in caps if c.strip()] for caps in captions]
    keep = [i for i, caps in enumerate(cleaned) if caps]
    dropped = [filenames[i] for i in range(len(filenames)) if i not in set(keep)]
    warnings.warn(
        f"{source}: dropped {len(empty)} empty captions"
        + (
            f" and {len(dropped)} images left without captions: {_first(dropped)}"
            if dropped
            else ""
        ),
        stacklevel=3,
    )
    return cleaned, keep


def read_karpathy(
    path: str | Path,
    image_dir: str | Path | None = None,
    name: str | None = None,
    empty_captions: EmptyCaptions = "error",
) -> CaptionDataset:
    """Read a Karpathy-style JSON (``images[].filename/split/sentences[].raw``).

    Optional per-image fields used when present: ``filepath`` (COCO-style sub-folder),
    ``imgid`` (image id), ``class`` (label). A sentence without ``raw`` uses its ``tokens``.
    """
    path = Path(path)
    data = _parse_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError(f"{path}: expected a JSON object with an 'images' list (Karpathy format)")
    filenames, splits, captions, ids, labels = [], [], [], [], []
    for k, img in enumerate(data["images"]):
        missing = [key for key in ("filename", "split", "sentences") if key not in img]
        if missing:
            raise DataError(f"{path}: images[{k}] lacks {', '.join(missing)}")
        fn = img["filename"] if not img.get("filepath") else f"{img['filepath']}/{img['filename']}"
        filenames.append(fn)
        splits.append(img["split"])
        captions.append([_sentence_text(s) for s in img["sentences"]])
        ids.append(int(img.get("imgid", k)))
        labels.append(img.get("class"))
    captions, keep = _drop_empty(captions, filenames, empty_captions, str(path))
    has_labels = all(lab is not None for lab in labels)
    return CaptionDataset(
        name=name or str(data.get("dataset") or path.parent.name),
        image_dir=Path(image_dir) if image_dir else _default_image_dir(path.parent),
        filenames=[filenames[i] for i in keep],
        splits=[splits[i] for i in keep],
        captions=[captions[i] for i in keep],
        image_ids=[ids[i] for i in keep],
        labels=[labels[i] for i in keep] if has_labels else None,
        source=str(path),
    )


def _sentence_text(sentence: dict | str) -> str:
    if isinstance(sentence, str):
        return sentence
    if "raw" in sentence:
        return str(sentence["raw"])
    return " ".join(sentence.get("tokens", []))


def _read_lines(path: Path) -> list[str]:
    # universal newlines, as text-mode open() reads them: \r\n and a lone \r end a line too
    lines = read_text(path).replace("\r\n", "\n").replace("\r", "\n").split("\n")
    if lines and lines[-1] == "":  # a final newline is not an extra record
        lines.pop()
    return lines


def _group_precomp(
    caps: list[str], names: list[str], caps_path: Path, names_path: Path
) -> tuple[list[str], list[list[str]], str]:
    """Group caption lines by image for either published layout -> (names, captions, layout)."""
    n_caps, n_names = len(caps), len(names)
    if n_names == 0:
        raise DataError(f"{names_path} is empty")
    if n_caps == n_names:  # one name per caption (the published test files)
        grouped: OrderedDict[str, list[str]] = OrderedDict()
        for name, cap in zip(names, caps, strict=True):
            grouped.setdefault(name.strip(), []).append(cap)
        return list(grouped), list(grouped.values()), "one name per caption"
    if n_caps % n_names == 0:  # one name per image (the published train files)
        k = n_caps // n_names
        groups = [caps[i * k : (i + 1) * k] for i in range(n_names)]
        return [n.strip() for n in names], groups, f"one name per image, {k} captions each"
    raise DataError(
        f"caption count does not match file names: {caps_path.name} has {n_caps} lines and "
        f"{names_path.name} has {n_names}. Neither layout fits: one name per caption needs equal "
        f"counts; one name per image needs the captions to be a multiple of the names "
        f"({n_caps} / {n_names} = {n_caps / n_names:.2f})."
    )


def read_precomp(
    root: str | Path,
    image_dir: str | Path | None = None,
    name: str | None = None,
    empty_captions: EmptyCaptions = "error",
) -> CaptionDataset:
    """Read every ``{split}_caps.txt`` + ``{split}_filename.txt`` pair in ``root``.

    The layout of each pair (one name per caption, or per image) is detected from the counts and
    recorded in :attr:`CaptionDataset.source`.
    """
    root = Path(root)
    filenames, splits, captions, sources = [], [], [], []
    for split in _PRECOMP_SPLITS:
        caps_path, names_path = root / f"{split}_caps.txt", root / f"{split}_filename.txt"
        if not caps_path.is_file():
            continue
        if not names_path.is_file():
            raise DataError(f"{caps_path} has no matching {names_path.name}")
        names, groups, layout = _group_precomp(
            _read_lines(caps_path), _read_lines(names_path), caps_path, names_path
        )
        filenames += names
        splits += [split] * len(names)
        captions += groups
        sources.append(f"{caps_path.name} ({layout})")
    if not filenames:
        raise DataError(f"no {{split}}_caps.txt files in {root}")
    source = f"{root} [{'; '.join(sources)}]"
    captions, keep = _drop_empty(captions, filenames, empty_captions, source)
    return CaptionDataset(
        name=name or root.name,
        image_dir=Path(image_dir) if image_dir else _default_image_dir(root),
        filenames=[filenames[i] for i in keep],
        splits=[splits[i] for i in keep],
        captions=[[c.strip() for c in captions[i]] for i in keep],
        labels=None,
        source=source,
    )


def load_dataset(
    root: str | Path,
    format: Format = "auto",
    image_dir: str | Path | None = None,
    name: str | None = None,
    empty_captions: EmptyCaptions = "error",
    check_images: bool = False,
    captions_per_image: int | None = None,
    image_reading: ImageReading | None = None,
) -> CaptionDataset:
    """Load a dataset folder in either format; optionally check every image file.

    Args:
        root: a folder (or a Karpathy ``.json`` file).
        format: ``auto`` detects it from the folder's files.
        image_dir: image folder if not ``<root>/images`` (or ``imgs``).
        empty_captions: ``error`` (default) or ``drop`` (see RSITMD's published train file).
        check_images: open every image and report missing or corrupt files.
        captions_per_image: if set, every image must have exactly this many captions.
        image_reading: how ``check_images`` reads 16-bit and multi-band files (default rules).
    """
    detected, path = detect_format(root)
    if format != "auto" and format != detected:
        raise DataError(f"{root} looks like {detected!r} data, but format={format!r} was asked")
    reader = read_karpathy if detected == "karpathy" else read_precomp
    ds = reader(path, image_dir=image_dir, name=name, empty_captions=empty_captions)
    if captions_per_image is not None:
        bad = [
            f
            for f, c in zip(ds.filenames, ds.captions, strict=True)
            if len(c) != captions_per_image
        ]
        if bad:
            raise DataError(
                f"{len(bad)} images in {ds.source} do not have {captions_per_image} captions: "
                f"{_first(bad)}"
            )
    if check_images:
        from cmpagl.data.validation import check_images as _check

        _check(ds, reading=image_reading)
    return ds
