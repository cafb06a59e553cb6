"""experiments/seeds_table.py end to end on a tiny config: every (config, seed) trained and scored
on test, a baseline shown without ITM columns, a self-contained summary.json, and a second call
that reuses finished entries instead of training again."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_train import tiny_config

from cmpagl.config import save_config

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "seeds_table.py"


def run_table(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    from cmpagl.data.synthetic import generate_synthetic_dataset

    tmp = tmp_path_factory.mktemp("seeds_table")
    data = generate_synthetic_dataset(
        tmp / "data", n_train=24, n_val=8, n_test=8, image_size=32, seed=3
    )
    full = tiny_config(data, tmp / "unused", epochs=2)
    full.retrieval = dataclasses.replace(
        full.retrieval, itm_k=4, smr_grid_tau=(0.05,), smr_grid_k=(3,), smr_grid_lambda=(0.1,)
    )
    base = dataclasses.replace(
        full,
        model=dataclasses.replace(
            full.model, gswin=dataclasses.replace(full.model.gswin, global_mode="off")
        ),
        loss=dataclasses.replace(full.loss, w_tri=0.0, w_itm=0.0, w_mlm=0.0),
    )
    configs = [save_config(base, tmp / "tiny_baseline.yaml"), save_config(full, tmp / "tiny.yaml")]
    out = tmp / "table"
    args = [a for c in configs for a in ("--config", str(c))]
    args += ["--seeds", "0", "1", "--set", "train.log_every=2", "--out", str(out)]
    first = run_table(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    return out, args, first


def test_summary_is_self_contained(table):
    out, _, _ = table
    record = json.loads((out / "summary.json").read_text())
    assert set(record) == {
        "command", "commit", "date", "hardware", "overrides", "configs", "entries"
    }  # fmt: skip
    assert record["overrides"] == ["train.log_every=2"]
    assert "seeds_table.py" in record["command"] and "--seeds 0 1" in record["command"]
    assert record["hardware"]["cpu"] and record["hardware"]["cpu_count"] >= 1
    assert len(record["entries"]) == 4  # 2 configs x 2 seeds
    for e in record["entries"]:
        assert [v["epoch"] for v in e["val_curve"]] == [0, 1]  # one validation per epoch
        assert max(v["r_mean"] for v in e["val_curve"]) == pytest.approx(e["best_val_r_mean"])
        assert e["config_resolved"]["seed"] == e["seed"]
        assert e["config_resolved"]["train"]["log_every"] == 2
        assert e["train_commit"] == record["commit"]  # trained and summarised from one tree


def test_baseline_has_no_itm_columns_and_stats_are_right(table):
    out, _, _ = table
    record = json.loads((out / "summary.json").read_text())
    base, full = (record["configs"][k] for k in record["configs"])
    assert set(base["test_r_mean"]) == {"none", "smr"}
    assert set(full["test_r_mean"]) == {"none", "itm", "smr", "itm+smr"}
    for name, summary in record["configs"].items():
        values = [e["test"]["none"]["r_mean"] for e in record["entries"] if e["config"] == name]
        stats = summary["test_r_mean"]["none"]
        assert stats["values"] == values and summary["seeds"] == [0, 1]
        assert stats["mean"] == pytest.approx(sum(values) / 2)
        assert stats["std"] == pytest.approx(abs(values[0] - values[1]) / 2**0.5)
    md = (out / "summary.md").read_text().splitlines()
    assert md[0].startswith("| config | seeds | mR none | mR itm")
    assert md[2].startswith("| tiny_baseline | 2 |") and "| – |" in md[2]
    assert md[3].startswith("| tiny | 2 |") and "| – |" not in md[3]


def test_a_second_call_reuses_finished_entries(table):
    out, args, first = table
    best = out / "tiny" / "seed1" / "best" / "model.safetensors"
    before = best.stat().st_mtime_ns
    again = run_table(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert best.stat().st_mtime_ns == before  # nothing trained again
    assert again.stdout.splitlines()[-4:] == first.stdout.splitlines()[-4:]  # the same table
