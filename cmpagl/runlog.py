"""The training log (``train_log.jsonl``: one JSON object a line, written by the main process
only), the meter that averages step logs between log lines, and the RNG states a checkpoint
saves so that a resumed run continues bit for bit.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from cmpagl.distributed import Dist
from cmpagl.fileio import atomic_write_text

__all__ = [
    "LOG_FILE",
    "JsonLog",
    "Meter",
    "read_log",
    "rng_state",
    "seed_everything",
    "set_rng_state",
]

LOG_FILE = "train_log.jsonl"


def _jsonable(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return str(value)


class JsonLog:
    """``train_log.jsonl``, one JSON object a line; only the main process writes."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = path, enabled

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record, default=_jsonable) + "\n")

    def reset(self) -> None:
        """Start empty: a fresh run drops the lines a run killed before its first checkpoint
        left in the same folder (nothing of it could be resumed)."""
        if self.enabled:
            self.path.unlink(missing_ok=True)

    def truncate_after(self, step: int) -> None:
        """Drop lines of steps after ``step``: a resumed run rewrites them."""
        if not (self.enabled and self.path.exists()):
            return
        keep = [r for r in read_log(self.path) if r.get("step", 0) <= step]
        # atomically: a crash here must leave the old log, not a torn one
        atomic_write_text(self.path, "".join(json.dumps(r, default=_jsonable) + "\n" for r in keep))


def read_log(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a ``train_log.jsonl`` (a run folder or the file); a torn last line, from a
    process killed mid-write, is skipped."""
    path = Path(path)
    if path.is_dir():
        path = path / LOG_FILE
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            records.append(json.loads(line))
    return records


class Meter:
    """Sums of the step logs since the last log line (their means go into the line)."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.count = 0

    def add(self, logs: dict[str, float]) -> None:
        for k, v in logs.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
        self.count += 1

    def means(self, ctx: Dist) -> dict[str, float]:
        keys = sorted(self.sums)
        values = torch.tensor([self.sums[k] / self.count for k in keys], dtype=torch.float64)
        if ctx.world > 1:  # the mean over processes too
            values = values.to(ctx.device)
            dist.all_reduce(values)
            values = values.cpu() / ctx.world
        self.sums, self.count = {}, 0
        return dict(zip(keys, values.tolist(), strict=True))

    def state_dict(self) -> dict[str, Any]:
        return {"sums": dict(self.sums), "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sums, self.count = dict(state["sums"]), int(state["count"])


# ----------------------------------------------------------------------------------------------
# RNG state
# ----------------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)  # all CUDA devices too
    np.random.seed(seed % 2**32)
    random.seed(seed)


def rng_state(generator: torch.Generator) -> dict[str, Any]:
    """RNG states as tensors and plain values (``state.pt`` is read with weights_only=True)."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "random": {
            "version": version,
            "state": torch.tensor(py_state, dtype=torch.int64),
            "gauss": py_gauss,
        },
        "generator": generator.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    npy = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            npy["keys"].numpy().astype(np.uint32),
            npy["pos"],
            npy["has_gauss"],
            npy["gauss"],
        )
    )
    py = state["random"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    generator.set_state(state["generator"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
