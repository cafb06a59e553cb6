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
    # the 3rd and 4th steps are timed: after the skipped one and the stamp that starts the
    # clock, before the last (whose stamp follows the final validation and checkpoint)
    assert (row["steps"], row["timed_steps"], row["batch_size"], row["world_size"]) == (5, 2, 8, 1)
    assert row["device"] == "cpu" and row["amp_dtype"] is None and row["peak_gpu_gib"] is None
    assert row["steady_samples_per_s"] > 0 and row["median_step_ms"] > 0
    # 2 timed steps of 8 samples: their total time is twice their median
    timed_s = 2 * 8 / row["steady_samples_per_s"]
    assert abs(timed_s - 2 * row["median_step_ms"] / 1000) < 1e-6
    assert row["trainable_params_m"] > 0 and row["hardware"]["device"] == "cpu"
    assert row["peak_rss_mib"] > 100 and row["git_commit"] and row["date"]
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


BENCH = SCRIPT.parent


def test_rerank_speed_times_both_side_by_side_and_finds_them_identical(tmp_path):
    out = tmp_path / "rerank.json"
    args = ["--images", "40", "--repeats", "2", "--threads", "1", "--profile", "3"]
    proc = run_script(BENCH / "rerank_speed.py", [*args, "--out", str(out)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = json.loads(out.read_text())
    assert row["shape"] == [40, 200] and row["threads"] == 1
    for name in ("smr", "galr"):
        r = row[name]
        assert r["identical"] and r["same_ranking"]
        assert len(r["ref"]["wall_runs_s"]) == len(r["ours"]["wall_runs_s"]) == 2
        assert r["ratio"] == r["ref"]["wall_s"] / r["ours"]["wall_s"]
        assert "Self CPU" in row["profile"][name]
    assert 0 < row["smr"]["floor"]["wall_s"] and 0 < row["smr"]["floor_4k"]["wall_s"]
    assert "floor" not in row["galr"]
    assert "floor" in proc.stdout
    assert row["hardware"]["torch_threads"] == 1 and row["git_commit"] and row["date"]
    assert "ratio" in proc.stdout and "identical" in proc.stdout


def test_eval_scaling_fits_each_stage(tmp_path):
    out = tmp_path / "eval.json"
    args = ["--sizes", "20", "40", "80", "--itm-sizes", "2", "4", "--repeats", "1"]
    proc = run_script(BENCH / "eval_scaling.py", [*args, "--out", str(out)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    stages = json.loads(out.read_text())["stages"]
    assert set(stages) == {"itc", "itm", "smr", "recall"}
    assert [r["n_img"] for r in stages["itc"]["rows"]] == [20, 40, 80]
    assert [r["n_txt"] for r in stages["itm"]["rows"]] == [10, 20]
    for stage in stages.values():
        assert all(r["seconds"] > 0 and r["cost"] > 0 for r in stage["rows"])
        assert set(stage["fit"]) >= {"seconds_per_unit", "fixed_seconds", "r2"}
    # the cost model's own exponent over 20, 40, 80 images: N_img · 5 N_img · d grows as N^2
    assert abs(stages["itc"]["fit"]["exponent_model"] - 2.0) < 1e-9
    assert abs(stages["recall"]["fit"]["exponent_model"] - 2.0) < 1e-9
    assert "cost model" in proc.stdout


def test_train_scaling_runs_one_process_per_batch_size(tiny_data, tmp_path):  # noqa: F811
    config = save_config(tiny_config(tiny_data, tmp_path / "unused"), tmp_path / "tiny.yaml")
    out = tmp_path / "scaling.json"
    args = ["--config", str(config), "--batch-sizes", "2", "4", "--steps", "3", "--skip", "0"]
    proc = run_script(BENCH / "train_scaling.py", [*args, "--out", str(out)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = json.loads(out.read_text())
    assert [r["batch_size"] for r in row["rows"]] == [2, 4]
    for r in row["rows"]:
        assert r["samples_per_s"] == r["batch_size"] / r["median_step_s"]
        assert r["peak_rss_mib"] > 100 and r["timed_steps"] == 1
    assert set(row["rss_mib_fit"]) == {"fixed", "per_sample"} and row["hardware"]["cpu_count"]


def test_runner_scaling_starts_the_runners_side_by_side(tiny_data, tmp_path):  # noqa: F811
    """Each layout NxT runs N train_throughput.py processes at once with T threads each; the
    total is the sum of their steady rates, compared with the first layout."""
    config = save_config(tiny_config(tiny_data, tmp_path / "unused"), tmp_path / "tiny.yaml")
    out = tmp_path / "runners.json"
    args = ["--config", str(config), "--layouts", "1x1", "2x1", "--steps", "4", "--skip", "0"]
    proc = run_script(BENCH / "runner_scaling.py", [*args, "--out", str(out)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["runners"], r["threads_each"]) for r in rows] == [(1, 1), (2, 1)]
    assert [len(r["samples_per_s_each"]) for r in rows] == [1, 2]
    for r in rows:
        assert r["total_samples_per_s"] == sum(r["samples_per_s_each"]) > 0
    assert rows[0]["vs_first"] == 1.0
    assert rows[1]["vs_first"] == rows[1]["total_samples_per_s"] / rows[0]["total_samples_per_s"]
    bad = run_script(BENCH / "runner_scaling.py", ["--layouts", "2by1"])
    assert bad.returncode == 2 and "a layout is RUNNERSxTHREADS" in bad.stderr
