"""Where the project finds data that is not in the repository.

Real data (the UCM subset, the annotation files of the four benchmarks) lives outside the repo,
in ``../shared/data`` next to the checkout. ``CMPAGL_DATA`` points elsewhere.
"""

from __future__ import annotations

import os
from pathlib import Path

#: The repository root (the folder holding ``cmpagl/``), used for repo-relative defaults.
REPO_ROOT = Path(__file__).resolve().parents[1]

ENV_SHARED_DATA = "CMPAGL_DATA"


def repo_relative(path: str | os.PathLike[str]) -> str:
    """``path`` as a saved config holds it: relative to the repository root when it lies in the
    folder holding the checkout (the repository itself, or ``../shared`` beside it), so a run
    folder copied to another checkout or machine still finds its data; else absolute. A
    relative ``path`` is read from the working folder first. Inverse: :func:`from_repo`."""
    absolute = Path(os.path.abspath(Path(path).expanduser()))
    try:
        absolute.relative_to(REPO_ROOT.parent)
    except ValueError:
        return str(absolute)
    return os.path.relpath(absolute, REPO_ROOT)


def from_repo(path: str | os.PathLike[str]) -> str:
    """A saved path (:func:`repo_relative`) as an absolute path of this checkout."""
    path = Path(path).expanduser()
    return str(path if path.is_absolute() else Path(os.path.normpath(REPO_ROOT / path)))


def shared_data_dir() -> Path:
    """The shared real-data folder: ``$CMPAGL_DATA`` if set, else ``<repo>/../shared/data``.

    The folder may not exist (a clone without the shared data); callers check and say so.
    """
    env = os.environ.get(ENV_SHARED_DATA)
    if env:
        return Path(env).expanduser().resolve()
    return (REPO_ROOT.parent / "shared" / "data").resolve()


def ucm_subset_dir() -> Path:
    """The 1,600-image real UCM-Captions subset (16 classes, standard split)."""
    return shared_data_dir() / "ucm_captions_subset16"


def annotations_dir() -> Path:
    """Real caption files of RSICD, RSITMD, UCM-Captions and Sydney-Captions (no images)."""
    return shared_data_dir() / "annotations"


ENV_BOOK_MODEL = "CMPAGL_BOOK_MODEL"


def book_model_dir() -> Path:
    """The run folder of the book's model: ``$CMPAGL_BOOK_MODEL`` if set, else
    ``<repo>/runs/book_model`` (trained by ``make book`` through the training chapter, reused
    when it is there)."""
    env = os.environ.get(ENV_BOOK_MODEL)
    if env:
        return Path(env).expanduser().resolve()
    return REPO_ROOT / "runs" / "book_model"
