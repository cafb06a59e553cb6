"""The sweep runner (cmpagl.experiments): spec checking, notebook parameter checking, and on a
tiny sweep (2 variants x 2 seeds, a few steps each) the skip / resume / retry / report logic,
including a runner process killed with SIGKILL in the middle of a run."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_train_notebook import tiny_overrides

from cmpagl.config import ConfigError
from cmpagl.experiments import load_spec, main, run_sweep

MAX_STEPS = 4


def write_spec(tmp: Path, synthetic: Path, variants: dict, **extra) -> Path:
    spec = {
        "name": "tiny",
        "config": "configs/synthetic_tiny.yaml",
        "overrides": [*tiny_overrides(synthetic), "train.checkpoint_every=1", "train.log_every=1"],
        "seeds": [0, 1],
        "budget": {"max_steps": MAX_STEPS},
        "rerankers": ["none", "smr"],
        "out": str(tmp / "runs"),
        "results": str(tmp / "results"),
        "variants": variants,
        **extra,
    }
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------------------------------------
# Specs and parameters: checked before anything runs
# ----------------------------------------------------------------------------------------------
def test_spec_variants_lists_or_another_base_config(tmp_path, repo_root):
    path = tmp_path / "s.yaml"
    path.write_text(
        "config: configs/ucm_cpu.yaml\nseeds: [0, 2]\nbudget: {epochs: 3}\nvariants:\n"
        "  full: []\n  no_tri: [loss.w_tri=0]\n"
        "  baseline: {config: configs/ucm_cpu_baseline.yaml}\n"
    )
    spec = load_spec(path)
    assert spec.name == "s" and spec.out == repo_root / "runs" / "sweeps" / "s"
    assert spec.results == repo_root / "results" / "s"
    by_name = {v.name: v for v in spec.variants}
    assert by_name["no_tri"].overrides == ("loss.w_tri=0",)
    assert by_name["baseline"].config == repo_root / "configs" / "ucm_cpu_baseline.yaml"
    assert by_name["full"].config == repo_root / "configs" / "ucm_cpu.yaml"
    runs = spec.runs()  # seed by seed
    assert [(r.variant.name, r.seed) for r in runs[:3]] == [
        ("full", 0),
        ("no_tri", 0),
        ("baseline", 0),
    ]
    assert runs[0].record_path == spec.results / "full" / "seed0.json"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("config: configs/ucm_cpu.yaml\nseed: [0]\nvariants: {a: []}\n", "did you mean 'seeds'"),
        ("config: configs/nope.yaml\nvariants: {a: []}\n", "config file .* not found"),
        ("config: configs/ucm_cpu.yaml\n", "variants: expected a mapping"),
        ("config: configs/ucm_cpu.yaml\nvariants: {a/b: []}\n", "a folder name"),
        ("config: configs/ucm_cpu.yaml\nvariants: {a: [loss.w_tri]}\n", "key=value strings"),
        ("config: configs/ucm_cpu.yaml\nvariants: {a: {cfg: x.yaml}}\n", "unknown key"),
        ("config: configs/ucm_cpu.yaml\nseeds: [1, 1]\nvariants: {a: []}\n", "distinct seeds"),
        ("config: configs/ucm_cpu.yaml\nrerankers: [smrr]\nvariants: {a: []}\n", "smrr"),
    ],
)
def test_bad_specs_are_rejected_with_the_key(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_spec(path)


def test_a_misspelled_notebook_parameter_is_an_error_before_anything_runs(
    tmp_path, small_synthetic, capsys
):
    spec_path = write_spec(tmp_path, small_synthetic, {"a": []}, parameters={"sed": 1})
    with pytest.raises(ConfigError, match=r"no parameter 'sed' \(did you mean 'seed'\?\)"):
        run_sweep(load_spec(spec_path))
    assert not (tmp_path / "runs").exists() and not (tmp_path / "results").exists()
    # the same from the command line (-p), and a value of the wrong type: status 2, one line
    spec_path = write_spec(tmp_path, small_synthetic, {"a": []})
    assert main([str(spec_path), "-p", "max_step", "3"]) == 2
    assert "did you mean 'max_steps'" in capsys.readouterr().err
    assert main([str(spec_path), "-p", "seed", "one"]) == 2
    assert "parameter 'seed' is int, got 'one'" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_cmpagl_sweep_command(tmp_path, small_synthetic, capsys):
    from cmpagl.cli import main as cmpagl

    spec_path = write_spec(tmp_path, small_synthetic, {"a": [], "b": ["loss.w_tri=0"]})
    assert cmpagl(["sweep", str(spec_path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "sweep tiny" in out and "4 runs" in out
    assert out.count("pending") == 4 and "loss.w_tri=0" in out
    assert cmpagl(["sweep", str(spec_path), "-p", "sed", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cmpagl: error:") and "did you mean 'seed'" in err
    assert not (tmp_path / "runs").exists()


def test_the_committed_specs_load_and_check(repo_root):
    """``make ablations`` runs these; every variant's config must load with its overrides."""
    from cmpagl.config import load_config

    for path in sorted((repo_root / "experiments" / "sweeps").glob("*.yaml")):
        spec = load_spec(path)
        assert len(spec.seeds) >= 3, path.name
        assert run_sweep(spec, dry_run=True).executed == 0  # the parameters check passes
        for v in spec.variants:
            load_config(v.config, overrides=[*spec.overrides, *v.overrides])


# ----------------------------------------------------------------------------------------------
# A tiny sweep end to end
# ----------------------------------------------------------------------------------------------
def _descendants(pid: int) -> list[int]:
    """Processes started by ``pid``, recursively (the papermill kernel runs in a session of
    its own, so killing the runner's process group would not reach it)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):  # a process that just ended
            continue
        if ppid == pid:
            child = int(stat.parent.name)
            out += [child, *_descendants(child)]
    return out


def _wait_for_checkpoint(run_dir: Path, proc: subprocess.Popen, timeout: float = 240.0) -> int:
    """Poll until the run has a checkpoint before its last step; its step."""
    meta = run_dir / "last" / "meta.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the sweep ended before it could be killed"
        if meta.is_file():
            try:
                return json.loads(meta.read_text())["step"]
            except ValueError:  # meta.json is written last in a temporary folder; retry
                pass
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint in {run_dir} after {timeout} s")


@pytest.mark.slow
def test_sweep_resumes_a_killed_run_and_skips_finished_ones(repo_root, tmp_path, small_synthetic):
    spec_path = write_spec(tmp_path, small_synthetic, {"full": [], "no_tri": ["loss.w_tri=0"]})
    spec = load_spec(spec_path)
    first = spec.runs()[0]  # (full, seed 0)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "cmpagl.experiments", str(spec_path)],
        cwd=repo_root,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        killed_at = _wait_for_checkpoint(first.run_dir, proc)
    finally:
        # the runner and the kernel training in it, at once: no cleanup, no flushing, as when
        # the machine goes down (a kernel left alone exits within a second by itself)
        for pid in [proc.pid, *_descendants(proc.pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait()
    assert 1 <= killed_at < MAX_STEPS
    assert not first.record_path.exists()

    lines: list[str] = []
    report = run_sweep(spec, log=lines.append)
    assert report.executed == 4 and not report.with_status("failed")
    pairs = zip(report.runs, report.records, strict=True)
    records = {(r.variant.name, r.seed): rec for r, rec in pairs}
    resumed = records[("full", 0)]["training"]
    # the killed run continued from a checkpoint at or after the one seen before the kill
    assert resumed["action"] == "resumed" and resumed["resumed_from_step"] >= killed_at
    assert resumed["steps"] == MAX_STEPS
    log = [json.loads(x) for x in (first.run_dir / "train_log.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in log if r["kind"] == "train"]
    assert train_steps == sorted(set(train_steps)) and train_steps[-1] == MAX_STEPS
    for key, rec in records.items():
        assert rec["status"] == "ok" and rec["attempts"] == 1, key
        assert list(rec["test"]) == ["none", "smr"]
        if key != ("full", 0):
            assert rec["training"]["action"] == "trained", key
    for run in report.runs:  # a browsable executed notebook per run
        assert run.notebook_path.is_file()
    # only small files under results/: the records, the CSV and the table
    files = sorted(p.relative_to(spec.results) for p in spec.results.rglob("*") if p.is_file())
    assert [str(p) for p in files] == [
        "full/seed0.json",
        "full/seed1.json",
        "no_tri/seed0.json",
        "no_tri/seed1.json",
        "runs.csv",
        "table.md",
    ]
    rows = read_csv(spec.results / "runs.csv")
    assert [(r["variant"], r["seed"], r["status"]) for r in rows] == [
        ("full", "0", "ok"),
        ("no_tri", "0", "ok"),
        ("full", "1", "ok"),
        ("no_tri", "1", "ok"),
    ]
    row = rows[1]
    assert row["overrides"].endswith("loss.w_tri=0")
    assert float(row["smr.r_mean"]) == records[("no_tri", 0)]["test"]["smr"]["r_mean"]
    assert float(row["best_val_r_mean"]) == records[("no_tri", 0)]["training"]["best_val_r_mean"]
    assert row["smr.settings"] and row["device"] == "cpu" and row["commit"]
    assert float(row["samples_per_s"]) > 0 and float(row["wall_time_s"]) > 0

    # run again: everything is finished, nothing executes, no record is rewritten
    stamps = {p: p.stat().st_mtime_ns for p in spec.results.rglob("*.json")}
    again = run_sweep(spec, log=lines.append)
    assert again.executed == 0
    assert {p: p.stat().st_mtime_ns for p in spec.results.rglob("*.json")} == stamps


@pytest.mark.slow
def test_a_failing_variant_is_retried_once_and_reported(tmp_path, small_synthetic, capsys):
    spec_path = write_spec(
        tmp_path, small_synthetic, {"broken": ["model.no_such_key=1"]}, seeds=[0]
    )
    assert main([str(spec_path)]) == 1  # non-zero: a run failed
    out = capsys.readouterr().out
    assert out.count("FAILED broken seed 0 (attempt") == 2
    assert "(attempt 1 of 2)" in out and "trying again" in out
    assert "FAILED broken seed 0 after 2 attempt(s)" in out  # in the final report
    assert "no_such_key" in out
    spec = load_spec(spec_path)
    record = json.loads(spec.runs()[0].record_path.read_text())
    assert record["status"] == "failed" and record["attempts"] == 2
    assert record["error"].startswith("ConfigError") and "no_such_key" in record["error"]
    assert spec.runs()[0].notebook_path.is_file()  # the failed notebook shows the traceback
    rows = read_csv(spec.results / "runs.csv")
    assert [(r["variant"], r["status"], r["attempts"]) for r in rows] == [("broken", "failed", "2")]
    assert "no_such_key" in rows[0]["error"]
    assert "| broken | 0/1 |" in (spec.results / "table.md").read_text()
