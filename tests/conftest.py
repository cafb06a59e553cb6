"""Shared fixtures. Real data is found through ``CMPAGL_DATA`` (default ``../shared/data``);
tests that need it skip with the reason when it is absent."""

from __future__ import annotations

import os

# Nothing is fetched at test time (set before transformers/huggingface_hub are imported).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from cmpagl.paths import REPO_ROOT, annotations_dir, ucm_subset_dir  # noqa: E402


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def annotations() -> Path:
    path = annotations_dir()
    if not path.is_dir():
        pytest.skip(f"shared annotation files not found at {path} (set CMPAGL_DATA)")
    return path


@pytest.fixture(scope="session")
def ucm_subset() -> Path:
    path = ucm_subset_dir()
    if not (path / "dataset.json").is_file():
        pytest.skip(f"real UCM subset not found at {path} (set CMPAGL_DATA)")
    return path


@pytest.fixture(scope="session")
def small_synthetic(tmp_path_factory) -> Path:
    """A small synthetic dataset (40/10/10 images at 64 px), generated once per session."""
    from cmpagl.data.synthetic import generate_synthetic_dataset

    out = tmp_path_factory.mktemp("synthetic")
    return generate_synthetic_dataset(out, n_train=40, n_val=10, n_test=10, image_size=64, seed=3)


@pytest.fixture(scope="session")
def tiny_trained_run(tmp_path_factory, small_synthetic) -> Path:
    """A run folder (``best/``, ``last/``, log) of a tiny CMPAGL trained 4 steps on
    ``small_synthetic``: what a chapter's ``model_dir`` parameter points to in the tests."""
    from test_train_notebook import tiny_overrides

    from cmpagl.runs import plan_run, train_or_resume

    out = tmp_path_factory.mktemp("tiny_run") / "run"
    plan = plan_run(
        "configs/synthetic_tiny.yaml",
        [*tiny_overrides(small_synthetic), "train.checkpoint_every=2", "train.log_every=1"],
        output_dir=out,
        max_steps=4,
    )
    train_or_resume(plan)
    return out
