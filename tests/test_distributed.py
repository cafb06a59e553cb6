"""Two processes under torchrun (gloo, CPU): each trains on its own shard, gradients are
averaged so the weights stay identical, the queue holds both processes' batches, and only rank 0
writes files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist
from test_train import tiny_config  # tests/ is on sys.path under pytest

from cmpagl.config import ExperimentConfig, save_config
from cmpagl.runlog import read_log

HELPER = Path(__file__).with_name("train_helper.py")
PER_RANK_BATCH = 4


def _config(data_root: Path, output_dir: Path) -> ExperimentConfig:
    # The tiny experiment of test_train; 20 images a process / 4 = 5 steps an epoch, so
    # max_steps 3 stops mid-epoch.
    return tiny_config(
        data_root,
        output_dir,
        epochs=1,
        batch_size=PER_RANK_BATCH,
        max_steps=3,
        warmup_steps=1,
        checkpoint_every=0,
        num_threads=1,
    )


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available in this build")
    from cmpagl.data.synthetic import generate_synthetic_dataset

    tmp = tmp_path_factory.mktemp("dist")
    data = generate_synthetic_dataset(
        tmp / "data", n_train=40, n_val=8, n_test=8, image_size=32, seed=5
    )
    config = save_config(_config(data, tmp / "run"), tmp / "dist.yaml")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--standalone",
        str(HELPER),
        str(config),
        "--debug-dir",
        str(tmp / "debug"),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((tmp / "debug" / f"rank{r}.json").read_text()) for r in range(2)]
    return tmp / "run", ranks


def test_only_rank0_writes(two_process_run):
    out, _ = two_process_run
    assert sorted(p.name for p in out.iterdir()) == [
        "best",
        "config.yaml",
        "last",
        "train_log.jsonl",
    ]
    log = read_log(out)
    # two writers would have appended every line twice
    assert [(r["kind"], r["step"]) for r in log] == [
        ("train", 1),
        ("train", 2),
        ("train", 3),
        ("val", 3),
    ]
    assert not log[-1]["end_of_epoch"]  # max_steps stopped mid-epoch and still validated


def test_ranks_train_on_disjoint_shards(two_process_run):
    _, ranks = two_process_run
    seen = [{i for batch in r["ids"] for i in batch} for r in ranks]
    assert all(
        len(r["ids"]) == 3 and all(len(b) == PER_RANK_BATCH for b in r["ids"]) for r in ranks
    )
    assert len(seen[0]) == len(seen[1]) == 3 * PER_RANK_BATCH
    assert not seen[0] & seen[1]


def test_queue_gathers_both_ranks(two_process_run):
    _, ranks = two_process_run
    expected = ranks[0]["ids"][0] + ranks[1]["ids"][0]  # rank order, after one step
    assert len(expected) == 2 * PER_RANK_BATCH
    assert ranks[0]["queue_ids_after_step1"] == ranks[1]["queue_ids_after_step1"] == expected


def test_gradients_averaged_weights_identical(two_process_run):
    """Different data on each rank, yet identical weights after 3 steps: the update used the
    same (averaged) gradient everywhere, and both ranks agree on the validation result."""
    _, ranks = two_process_run
    assert ranks[0]["checksum"] == ranks[1]["checksum"]
    assert ranks[0]["checksum_after_step1"] == ranks[1]["checksum_after_step1"]
    assert ranks[0]["checksum"] != ranks[0]["checksum_after_step1"]  # the steps did change them
    assert ranks[0]["best_r_mean"] == ranks[1]["best_r_mean"] is not None
    assert ranks[0]["steps"] == ranks[1]["steps"] == 3
