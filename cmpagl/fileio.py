"""Writing files so that a crash never leaves half of one (the "loses nothing" rule).

:func:`atomic_write` is the one way the library writes a single file that someone may read
while it is being replaced (configs, result JSON, score tensors, logs, dataset indexes).
Checkpoint *folders* are swapped into place by :mod:`cmpagl.checkpoint`.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write", "atomic_write_text"]


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it over ``path``.

    The temporary file lives in the same folder (a rename within one file system is atomic),
    is readable like any other file (0o644, not mkstemp's 0o600) and is removed if ``write``
    raises, so a reader sees either the old file or the complete new one, never a torn one.

    Args:
        path: the final file; its folder is created if missing.
        write: writes the content to the path it is given (``torch.save``, ``json.dump``, ...).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """:func:`atomic_write` of a UTF-8 text."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
