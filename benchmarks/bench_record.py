"""What every benchmark record in ``results/bench/`` carries, written in one place.

A record is the benchmark's own result plus the machine it ran on (platform, CPU model and
count, torch and its thread count: :func:`cmpagl.evaluate.hardware_info`), the load average
before and after (2 shared cores make timings noisy: a loaded machine is visible in the
record), the git commit of the library (``-dirty`` when the working tree differs) and the date.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from cmpagl.checkpoint import git_commit
from cmpagl.evaluate import hardware_info


def load_average() -> float:
    """The 1-minute load average (runnable processes; 2 cores are busy at 2.0)."""
    return round(os.getloadavg()[0], 2)


def record(
    result: dict[str, Any], load_before: float | None = None, device: str | None = None
) -> dict[str, Any]:
    """``result`` with ``hardware`` (of ``device``, default the CPU), ``load_average``,
    ``git_commit``, ``date`` and ``command``."""
    return {
        **result,
        "hardware": hardware_info(device or "cpu"),
        "load_average": {"before": load_before, "after": load_average()},
        "git_commit": git_commit(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }


def write_record(path: str | os.PathLike[str], result: dict[str, Any], **kw: Any) -> Path:
    """Write :func:`record` of ``result`` as indented JSON (folders made as needed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record(result, **kw), indent=1) + "\n")
    return path
