"""A Hugging Face cache written in the hub's own layout, for offline-loading tests."""

from __future__ import annotations

from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from safetensors.torch import save_file


def write_hub_cache(
    cache: Path, monkeypatch: pytest.MonkeyPatch, repo: str, state_dict: dict[str, torch.Tensor]
) -> Path:
    """Store ``state_dict`` as ``repo``'s ``model.safetensors`` in a cache at ``cache`` (the
    ``models--org--name/snapshots/<rev>`` layout with ``refs/main``), and make it THE cache of
    this test, offline. Returns the weights file."""
    snapshot = cache / f"models--{repo.replace('/', '--')}" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("abc123")
    weights = snapshot / "model.safetensors"
    save_file({k: v.contiguous() for k, v in state_dict.items()}, weights)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return weights
