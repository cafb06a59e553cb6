"""Loading weights into a model of another architecture: one line that names the first key that
differs, both shapes, and the config settings behind it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cmpagl.checkpoint import WeightsMismatch, load_checkpoint, save_checkpoint, weights_mismatch
from cmpagl.config import ExperimentConfig, ModelConfig


class Tiny(nn.Module):
    """A stand-in model that, like CMPAGL, keeps the ModelConfig it was built from."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.proj = nn.Linear(4, cfg.embed_dim)
        if cfg.queue_size > 100:
            self.extra = nn.Linear(2, 2)


def test_weights_mismatch_names_the_first_key_and_both_shapes():
    own = {"a": torch.zeros(2), "b": torch.zeros(3, 4), "c": torch.zeros(1)}
    saved = {"a": torch.zeros(2), "b": torch.zeros(3, 5), "d": torch.zeros(7)}
    assert weights_mismatch(own, dict(own)) is None
    assert weights_mismatch(own, saved) == (
        "first mismatch: b is (3, 5) in the checkpoint, (3, 4) in the model (1 shapes differ, "
        "1 keys only in the model, 1 keys only in the checkpoint)"
    )
    del saved["b"]
    assert weights_mismatch(own, saved).startswith(
        "first mismatch: b (3, 4) is in the model, not in the checkpoint"
    )
    assert weights_mismatch({}, {"d": torch.zeros(7)}).startswith(
        "first mismatch: d (7,) is in the checkpoint, not in the model"
    )


def test_loading_into_another_architecture_names_key_shapes_and_settings(tmp_path):
    cfg = ExperimentConfig()
    cfg.model.embed_dim = 8
    save_checkpoint(tmp_path / "ckpt", Tiny(cfg.model), cfg)
    other = ModelConfig(embed_dim=6, queue_size=cfg.model.queue_size)
    with pytest.raises(WeightsMismatch) as err:
        load_checkpoint(tmp_path / "ckpt", model=Tiny(other))
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{tmp_path / 'ckpt' / 'model.safetensors'}: the weights do not fit")
    assert "first mismatch: proj.weight is (8, 4) in the checkpoint, (6, 4) in the model" in message
    assert message.endswith(
        "the checkpoint's model settings differ in model.embed_dim (8 in the checkpoint, 6 in "
        "the config)"
    )
    # the same architecture loads, whatever else differs
    same = Tiny(ModelConfig(embed_dim=8, queue_size=cfg.model.queue_size, momentum=0.9))
    load_checkpoint(tmp_path / "ckpt", model=same)


def test_a_run_folder_moved_to_another_checkout_finds_its_data(tmp_path, monkeypatch):
    """Saved configs hold paths relative to the repository root (the repository's own folders
    and ``../shared`` beside it), so a run folder copied to another checkout reads that
    checkout's data; a path elsewhere stays absolute."""
    import cmpagl.paths as paths

    first, second = tmp_path / "a" / "main", tmp_path / "b" / "clone"
    monkeypatch.setattr(paths, "REPO_ROOT", first)
    cfg = ExperimentConfig()
    cfg.model.embed_dim = 8
    cfg.output_dir = str(first / "runs" / "book_model")
    cfg.data.root = str(first / ".." / "shared" / "data" / "ucm")
    cfg.data.image_dir = str(tmp_path / "elsewhere" / "images")
    run = save_checkpoint(first / "runs" / "book_model" / "best", Tiny(cfg.model), cfg)
    saved = (run / "config.yaml").read_text()
    assert "output_dir: runs/book_model" in saved
    assert "root: ../shared/data/ucm" in saved
    assert str(first) not in saved  # no folder of the machine that wrote it
    assert f"image_dir: {tmp_path / 'elsewhere' / 'images'}" in saved

    moved = second / "runs" / "book_model"
    moved.parent.mkdir(parents=True)
    (first / "runs" / "book_model").rename(moved)
    monkeypatch.setattr(paths, "REPO_ROOT", second)
    _, loaded, _ = load_checkpoint(moved / "best", model=Tiny(cfg.model))
    assert loaded.data.root == str(tmp_path / "b" / "shared" / "data" / "ucm")
    assert loaded.output_dir == str(moved)
    assert loaded.data.image_dir == cfg.data.image_dir
