"""benchmarks/train_throughput.py on the tiny experiment: it trains the asked number of steps in a
temporary folder, times the steps after the skipped ones and writes its record."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from test_train import tiny_config, tiny_data  # noqa: F401 (a fixture)

from cmpagl.config import save_config

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "train_throughput.py"


def run_script(script: Path, args: list[str]) -> subprocess.CompletedProcess:
    """A benchmark script in its own process, offline, its output captured."""
    return subprocess.run(
        [sys.executable, str(script), *args],
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_train_throughput_writes_its_record(tiny_data, tmp_path):  # noqa: F811
    # 24 images / batch 8: 3 steps an epoch, so 5 steps cross an epoch end and its validation
    cfg = tiny_config(tiny_data, tmp_path / "not_written", epochs=3)
    config = save_config(cfg, tmp_path / "tiny.yaml")
    out = tmp_path / "row.json"
    args = ["--config", str(config), "--steps", "5", "--skip", "1", "--out", str(out)]
    proc = run_script(SCRIPT, args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = json.loads(out.read_text())
    assert (row["steps"], row["timed_steps"], row["batch_size"], row["world_size"]) == (5, 3, 8, 1)
    assert row["device"] == "cpu" and row["amp_dtype"] is None and row["peak_gpu_gib"] is None
    assert row["steady_samples_per_s"] > 0 and row["median_step_ms"] > 0
    # 3 timed steps of 8 samples; two of the three step times are at least their median
    timed_s = 3 * 8 / row["steady_samples_per_s"]
    assert timed_s >= 2 * row["median_step_ms"] / 1000 * (1 - 1e-9)
    assert row["trainable_params_m"] > 0 and row["hardware"]["device"] == "cpu"
    assert not (tmp_path / "not_written").exists()  # it trained in a temporary folder


STEP = SCRIPT.with_name("train_step.py")


def test_train_step_benchmark_times_flops_and_profile(tiny_data, tmp_path):  # noqa: F811
    """benchmarks/train_step.py: median step, samples/s = batch / median, GFLOP from the
    flop counter, a fraction of the matmul peak consistent with those, a profiler table."""
    config = save_config(tiny_config(tiny_data, tmp_path / "unused"), tmp_path / "tiny.yaml")
    out = tmp_path / "step.json"
    args = ["--config", str(config), "--batch", "4", "--steps", "2", "--profile", "5"]
    proc = run_script(STEP, [*args, "--out", str(out)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = json.loads(out.read_text())
    assert row["batch"] == 4 and len(row["step_times_s"]) == 2
    assert row["samples_per_s"] == 4 / row["median_step_s"]
    assert row["gflop_per_step"] > 0 and row["matmul_peak_gflops"] > 0
    achieved = row["gflop_per_step"] / row["median_step_s"]
    assert abs(row["fraction_of_matmul_peak"] - achieved / row["matmul_peak_gflops"]) < 1e-9
    assert "Self CPU" in row["profile"] and row["deterministic"] == "cpu"
    assert "samples/s" in proc.stdout
