"""The sweep runner (cmpagl.experiments): spec checking, notebook parameter checking, and on a
tiny sweep (2 variants x 2 seeds, a few steps each) the skip / resume / retry / report logic,
including a runner process killed with SIGKILL in the middle of a run, and two runners sharing
one sweep."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from test_lock import hold
from test_train_notebook import tiny_overrides

from cmpagl.config import ConfigError
from cmpagl.experiments import load_spec, main, run_sweep, table_markdown

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


def test_a_variant_with_more_seeds_runs_them_after_every_variant_has_the_spec_seeds(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(
        f"config: configs/ucm_cpu.yaml\nseeds: [0, 1]\nresults: {tmp_path}\nvariants:\n"
        "  full: {seeds: [0, 1, 2, 3]}\n  no_tri: [loss.w_tri=0]\n"
        "  baseline: {seeds: [0, 1, 3]}\n"
    )
    spec = load_spec(path)
    assert spec.all_seeds() == (0, 1, 2, 3)
    assert [(r.variant.name, r.seed) for r in spec.runs()] == [
        ("full", 0),
        ("no_tri", 0),
        ("baseline", 0),
        ("full", 1),
        ("no_tri", 1),
        ("baseline", 1),
        ("full", 2),
        ("full", 3),
        ("baseline", 3),
    ]
    report = run_sweep(spec, dry_run=True)
    assert "| full | 0/4 |" in table_markdown(report)
    assert "| no_tri | 0/2 |" in table_markdown(report)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("config: configs/ucm_cpu.yaml\nseed: [0]\nvariants: {a: []}\n", "did you mean 'seeds'"),
        ("config: configs/nope.yaml\nvariants: {a: []}\n", "config file .* not found"),
        ("config: configs/ucm_cpu.yaml\n", "variants: expected a mapping"),
        ("config: configs/ucm_cpu.yaml\nvariants: {a/b: []}\n", "a folder name"),
        ("config: configs/ucm_cpu.yaml\nvariants: {a: [loss.w_tri]}\n", "key=value strings"),
        ("config: configs/ucm_cpu.yaml\nvariants: {a: {cfg: x.yaml}}\n", "unknown key"),
        ("config: configs/ucm_cpu.yaml\nseeds: [1, 1]\nvariants: {a: []}\n", "distinct integer"),
        ("config: configs/ucm_cpu.yaml\nvariants: {a: {seeds: [3, 3]}}\n", "a.seeds: expected"),
        ("config: configs/ucm_cpu.yaml\nvariants: {a: {seeds: 3}}\n", "a.seeds: expected"),
        ("config: configs/ucm_cpu.yaml\nvariants: {a: {seeds: []}}\n", "a.seeds: expected"),
        ("config: configs/ucm_cpu.yaml\nvariants: {a: {seed: [3]}}\n", "did you mean 'seeds'"),
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

    paths = sorted((repo_root / "experiments" / "sweeps").glob("*.yaml"))
    # `make ablations` runs every spec, each tuning sweep before the study that reads it
    make = (repo_root / "Makefile").read_text()
    order = [make.index(f"experiments/sweeps/{p.name}") for p in paths]
    for path, position in zip(paths, order, strict=True):
        spec = load_spec(path)
        if spec.tuned_by is not None:
            assert make.index(f"experiments/sweeps/{spec.tuned_by.name}") < position
        # a study reports means over >= 3 seeds; a tuning sweep may use fewer (validation only)
        assert len(spec.seeds) >= 3 or spec.split == "val", path.name
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
    # only small files under results/: the records, the CSV and the two tables
    files = sorted(p.relative_to(spec.results) for p in spec.results.rglob("*") if p.is_file())
    assert [str(p) for p in files] == [
        "full/seed0.json",
        "full/seed1.json",
        "no_tri/seed0.json",
        "no_tri/seed1.json",
        "paired.md",
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


def test_a_run_held_by_another_process_is_passed_over(tmp_path, capsys):
    """A second runner, or a training started by hand in a run's folder, holds that run: the
    runner passes over it (one line naming the holder) instead of executing it a second time,
    and runs it once the holder is gone."""
    from cmpagl.experiments import CLAIM_FILE
    from cmpagl.lock import LOCK_FILE

    spec_path = tmp_path / "study.yaml"
    spec_path.write_text(
        f"config: configs/ucm_cpu.yaml\nseeds: [0, 1, 2]\nresults: {tmp_path / 'results'}\n"
        f"out: {tmp_path / 'runs'}\nvariants:\n  full: []\n"
    )
    runs = load_spec(spec_path).runs()
    record = {"status": "ok", "split": "test", "overrides": [], "test": {"none": {"r_mean": 1}}}
    runs[0].record_path.parent.mkdir(parents=True)
    runs[0].record_path.write_text(json.dumps(record | {"training": {"best_val_r_mean": 1}}))
    holders = [hold(runs[1].run_dir, CLAIM_FILE), hold(runs[2].run_dir, LOCK_FILE)]
    try:
        lines: list[str] = []
        report = run_sweep(load_spec(spec_path), log=lines.append)
    finally:
        for proc in holders:
            proc.kill()
            proc.wait()
    assert report.executed == 0 and [r.label for r in report.with_status("pending")] == [
        "full seed 1",
        "full seed 2",
    ]
    pids = [proc.pid for proc in holders]
    assert lines[0].startswith(f"passed full seed 1: held by another sweep runner (pid {pids[0]}")
    assert lines[1].startswith(
        f"passed full seed 2: held by a training in its folder (pid {pids[1]}"
    )
    assert lines[2] == "still held elsewhere, not run by this call: full seed 1, full seed 2"
    assert "| full | 1/3 |" in (tmp_path / "results" / "study" / "table.md").read_text()
    # the holders are gone: a dry run lists both as to do, and a runner would take them
    plan = run_sweep(load_spec(spec_path), dry_run=True)
    assert [r.label for r in plan.with_status("pending")] == ["full seed 1", "full seed 2"]
    from cmpagl.experiments import _claim

    with _claim(runs[1]) as holder:
        assert holder == ""


def test_the_tables_have_the_records_other_runners_wrote_while_this_one_trained(
    tmp_path, monkeypatch
):
    """Two runners share a sweep, one with ``--only``: while it trains a run, the other's
    records land (a run it selected, and one it did not). The tables it writes and commits
    right after its run have them all, not the view it had when the run began."""
    import cmpagl.experiments as experiments

    spec_path = tmp_path / "study.yaml"
    spec_path.write_text(
        f"config: configs/ucm_cpu.yaml\nseeds: [0, 1]\nresults: {tmp_path / 'results'}\n"
        f"out: {tmp_path / 'runs'}\nvariants:\n  full: []\n  other: [loss.w_tri=0]\n"
    )
    runs = {r.label: r for r in load_spec(spec_path).runs()}

    def result(r_mean: float, overrides: list[str]) -> dict:
        return {
            "split": "test",
            "overrides": overrides,
            "test": {"none": {"r_mean": r_mean}},
            "training": {"best_val_r_mean": r_mean},
        }

    def execute(spec, run, params):  # the other runner finishes two runs meanwhile
        for label, overrides in [("full seed 1", []), ("other seed 0", ["loss.w_tri=0"])]:
            runs[label].record_path.parent.mkdir(parents=True, exist_ok=True)
            record = {"status": "ok", **result(7.0, overrides)}
            runs[label].record_path.write_text(json.dumps(record))
        return result(5.0, list(params["overrides"]))

    committed: list[str] = []
    monkeypatch.setattr(experiments, "_execute", execute)
    monkeypatch.setattr(
        experiments,
        "commit_results",
        lambda spec, what, log: committed.append((spec.results / "table.md").read_text()),
    )
    report = run_sweep(load_spec(spec_path), only=["full"], commit=True, log=lambda line: None)
    assert report.executed == 1  # full seed 1 landed meanwhile: not run a second time
    assert len(committed) == 1
    for table in [committed[0], (tmp_path / "results" / "study" / "table.md").read_text()]:
        assert "| full | 2/2 | 6.00 ± 1.41 |" in table, table
        assert "| other | 1/2 | 7.00 |" in table, table


@pytest.mark.slow
def test_two_runners_share_a_sweep_and_run_each_run_once(repo_root, tmp_path, small_synthetic):
    """``cmpagl sweep SPEC`` started twice at once: each run is executed by exactly one of them,
    both work, and the table written last has all four runs."""
    spec_path = write_spec(tmp_path, small_synthetic, {"full": [], "no_tri": ["loss.w_tri=0"]})
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "cmpagl.experiments", str(spec_path)],
            cwd=repo_root,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [proc.communicate(timeout=900)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outs
    executed = [
        sorted(line.split(":")[0][7:] for line in out.splitlines() if line.startswith("ok     "))
        for out in outs
    ]
    assert all(executed), outs  # both runners executed runs
    labels = ["full seed 0", "full seed 1", "no_tri seed 0", "no_tri seed 1"]
    assert sorted(executed[0] + executed[1]) == labels, outs  # each run exactly once
    spec = load_spec(spec_path)
    for run in spec.runs():
        record = json.loads(run.record_path.read_text())
        assert record["status"] == "ok" and record["attempts"] == 1, run.label
        assert record["training"]["action"] == "trained", run.label
        assert record["hardware"]["torch_threads"] == 1
        assert not (run.run_dir / ".cmpagl-sweep.lock").exists()  # claims released
    rows = read_csv(spec.results / "runs.csv")
    assert sorted((r["variant"], r["seed"], r["status"]) for r in rows) == [
        ("full", "0", "ok"),
        ("full", "1", "ok"),
        ("no_tri", "0", "ok"),
        ("no_tri", "1", "ok"),
    ]


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


# ----------------------------------------------------------------------------------------------
# Tuning on validation, then the study with each system's best trial
# ----------------------------------------------------------------------------------------------
def _tuning_specs(tmp: Path) -> tuple[Path, Path]:
    """A tuning sweep (two groups; validation only) and a study that takes its choices."""
    tuning = tmp / "tune.yaml"
    tuning.write_text(
        f"config: configs/ucm_cpu.yaml\nseeds: [0, 1]\nsplit: val\nresults: {tmp / 'results'}\n"
        "overrides: [train.log_every=20]\nvariants:\n"
        "  m: {group: m}\n"
        "  m.fast: {group: m, overrides: [train.lr_new=1.0e-3]}\n"
        "  m.slow: {group: m, overrides: [train.lr_new=2.5e-4]}\n"
        "  b: {group: b, config: configs/ucm_cpu_baseline.yaml}\n"
        "  b.pre: {group: b, config: configs/ucm_cpu_baseline.yaml,"
        " overrides: [train.lr_pretrained=1.0e-4]}\n"
    )
    study = tmp / "study.yaml"
    study.write_text(
        f"config: configs/ucm_cpu.yaml\nseeds: [0]\ntuned_by: {tuning}\n"
        f"results: {tmp / 'results'}\nvariants:\n"
        "  full: {tuned: m}\n"
        "  no_tri: {tuned: m, overrides: [loss.w_tri=0]}\n"
        "  plain: []\n"
        "  base: {tuned: b, config: configs/ucm_cpu_baseline.yaml}\n"
        "  base_long: {tuned: b, config: configs/ucm_cpu_baseline.yaml, budget: {epochs: 20}}\n"
    )
    return tuning, study


def _write_val_records(spec, scores: dict[tuple[str, int], float]) -> None:
    for run in spec.runs():
        if (run.variant.name, run.seed) in scores:
            run.record_path.parent.mkdir(parents=True, exist_ok=True)
            rec = {
                "status": "ok",
                "split": "val",
                "overrides": [*spec.overrides, *run.variant.overrides],
                "training": {"best_val_r_mean": scores[run.variant.name, run.seed]},
                "val": {"none": {"r_mean": scores[run.variant.name, run.seed]}},
            }
            run.record_path.write_text(json.dumps(rec))


def test_a_study_takes_each_systems_best_validation_trial(tmp_path, repo_root):
    from cmpagl.experiments import resolve_tuning, run_parameters, tuning_choices

    tuning_path, study_path = _tuning_specs(tmp_path)
    tuning, study = load_spec(tuning_path), load_spec(study_path)
    # before the tuning sweep has finished: an error naming the command, a dry run says so
    _write_val_records(tuning, {("m", 0): 10.0, ("m", 1): 12.0})
    with pytest.raises(ConfigError, match=r"not finished \(2 of 10 runs ok.*cmpagl sweep"):
        resolve_tuning(study)
    report = run_sweep(study, dry_run=True)
    assert "not finished" in report.tuning_pending
    # m.fast has the best mean (13 > 11); m.slow ties it and loses (the earliest wins);
    # b.pre wins its group on the mean over seeds (9.5 > 9.0)
    _write_val_records(
        tuning,
        {
            ("m", 0): 10.0, ("m", 1): 12.0,
            ("m.fast", 0): 14.0, ("m.fast", 1): 12.0,
            ("m.slow", 0): 12.0, ("m.slow", 1): 14.0,
            ("b", 0): 9.0, ("b", 1): 9.0,
            ("b.pre", 0): 10.0, ("b.pre", 1): 9.0,
        },
    )  # fmt: skip
    choices = tuning_choices(tuning)
    assert choices["m"].variant == "m.fast" and choices["m"].val_r_mean == 13.0
    assert choices["m"].trials == 3 and choices["b"].trials == 2
    assert choices["b"].variant == "b.pre"
    resolved, used = resolve_tuning(study)
    by_name = {v.name: v for v in resolved.variants}
    assert by_name["full"].overrides == ("train.lr_new=1.0e-3",)
    assert by_name["no_tri"].overrides == ("train.lr_new=1.0e-3", "loss.w_tri=0")
    assert by_name["plain"].overrides == ()
    assert by_name["base"].overrides == ("train.lr_pretrained=1.0e-4",)
    assert set(used) == {"m", "b"}
    # a variant's own budget goes to the notebook; the others get the spec's
    runs = {r.variant.name: r for r in resolved.runs()}
    assert run_parameters(resolved, runs["base_long"])["epochs"] == 20
    assert run_parameters(resolved, runs["base"])["epochs"] == 0
    # the choice is written under the study's table
    report = run_sweep(study, dry_run=True)
    assert not report.tuning_pending and "m.fast" in "\n".join(
        c.describe() for c in report.tuning.values()
    )


def test_a_record_made_with_other_settings_is_not_reused(tmp_path):
    """When the tuning chooses again, the study's earlier records are stale: done again."""
    from cmpagl.experiments import resolve_tuning

    tuning_path, study_path = _tuning_specs(tmp_path)
    tuning = load_spec(tuning_path)
    scores = {(v.name, s): 10.0 for v in tuning.variants for s in (0, 1)}
    _write_val_records(tuning, scores)  # all tie: the first trial of each group wins
    study, _ = resolve_tuning(load_spec(study_path))
    full = next(r for r in study.runs() if r.variant.name == "full")
    full.record_path.parent.mkdir(parents=True, exist_ok=True)
    full.record_path.write_text(json.dumps({"status": "ok", "overrides": []}))
    assert run_sweep(load_spec(study_path), dry_run=True).records[0] is not None
    _write_val_records(tuning, {**scores, ("m.slow", 1): 11.0})  # m.slow wins now
    assert run_sweep(load_spec(study_path), dry_run=True).records[0] is None


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (("split: val\n", ""), "must have split: val"),
        (("tuned_by: ", "#"), "name the tuning sweep"),
        (("  full: {tuned: m}", "  full: {tuned: q}"), "no group 'q'"),
        (("  base: {tuned: b, config: configs/ucm_cpu_baseline.yaml}", "  base: {tuned: b}"),
         "tuned on configs/ucm_cpu_baseline.yaml, but the variant trains configs/ucm_cpu.yaml"),
    ],
)  # fmt: skip
def test_tuning_mistakes_are_named(tmp_path, edit, message):
    from cmpagl.experiments import resolve_tuning

    tuning_path, study_path = _tuning_specs(tmp_path)
    _write_val_records(load_spec(tuning_path), {(v, s): 1.0 for v in
                       ("m", "m.fast", "m.slow", "b", "b.pre") for s in (0, 1)})  # fmt: skip
    for path in (tuning_path, study_path):
        path.write_text(path.read_text().replace(*edit))
    with pytest.raises(ConfigError, match=message):
        resolve_tuning(load_spec(study_path))


def test_table_regenerates_paired_intervals_from_the_records(tmp_path, capsys):
    """``--table`` runs nothing and writes runs.csv, table.md and paired.md from the records;
    differences are paired by seed (a seed missing on one side is left out)."""
    spec_path = tmp_path / "study.yaml"
    spec_path.write_text(
        f"config: configs/ucm_cpu.yaml\nseeds: [0, 1, 2]\nresults: {tmp_path / 'results'}\n"
        f"out: {tmp_path / 'runs'}\nreference: full\n"
        "variants:\n  worse: [loss.w_tri=0]\n  full: []\n"
    )
    spec = load_spec(spec_path)
    assert main([str(spec_path), "--table"]) == 0  # no records yet: says so, writes nothing
    assert "study: no records yet in" in capsys.readouterr().out
    assert not (tmp_path / "results").exists()
    mr = {  # (variant, seed) -> (none, smr)
        ("full", 0): (20.0, 21.0), ("full", 1): (22.0, 23.2), ("full", 2): (18.0, 18.8),
        ("worse", 0): (15.0, 16.0), ("worse", 1): (17.5, 18.0),
    }  # fmt: skip
    for run in spec.runs():
        if (run.variant.name, run.seed) in mr:
            none, smr = mr[run.variant.name, run.seed]
            run.record_path.parent.mkdir(parents=True, exist_ok=True)
            run.record_path.write_text(
                json.dumps(
                    {
                        "status": "ok",
                        "split": "test",
                        "overrides": list(run.variant.overrides),
                        "training": {"best_val_r_mean": none},
                        "test": {"none": {"r_mean": none}, "smr": {"r_mean": smr}},
                    }
                )
            )
    assert main([str(spec_path), "--table"]) == 0
    out = capsys.readouterr().out
    paired = (tmp_path / "results" / "study" / "paired.md").read_text()
    assert paired in out and not (tmp_path / "runs").exists()
    # worse − full over seeds 0 and 1: (−5, −4.5): mean −4.75, sd 0.354, t(1) = 12.706
    row = next(line for line in paired.splitlines() if line.startswith("| worse |"))
    half = 12.706 * statistics.stdev([-5.0, -4.5]) / 2**0.5
    assert f"-4.75 [{-4.75 - half:+.2f}, {-4.75 + half:+.2f}]" in row and "(n=2)" in row
    # smr − none within full: (+1, +1.2, +0.8): [+0.50, +1.50], resolved with 3 seeds
    row = next(line for line in paired.splitlines() if line.startswith("| full |"))
    assert "+1.00 [+0.50, +1.50] * (n=3)" in row
    assert (tmp_path / "results" / "study" / "runs.csv").is_file()
    table = (tmp_path / "results" / "study" / "table.md").read_text()
    assert "| worse | 2/3 | 16.25 ± 1.77 | 17.00 ± 1.41 | 16.25 ± 1.77 |" in table
    assert table.startswith("Test mR per re-ranker") and "| variant | ok | none | smr |" in table
    # read back for the book: a long table and a sentence per variant
    from cmpagl.study import findings, load_report, long_table

    report = load_report(spec_path)
    frame = long_table(report)
    assert len(frame) == 2 * 5 and set(frame["reranker"]) == {"none", "smr"}
    assert (
        frame.query("variant == 'worse' and seed == 1 and reranker == 'smr'")["r_mean"].item()
        == 18.0
    )
    (sentence,) = findings(report, {"worse": "without the triplet loss"})
    assert sentence.startswith("without the triplet loss: -4.75 [")
    assert sentence.endswith("over 2 seeds (none); resolved: lower.")
    from cmpagl.study import paired_interval

    assert paired_interval(report, "full", "worse").mean == -4.75
    assert paired_interval(report, "full", "full", "none", "smr").n == 3
    spec_path.write_text(spec_path.read_text().replace("[0, 1, 2]", "[0]"))  # one seed each
    assert main([str(spec_path), "--table"]) == 0
    table = (tmp_path / "results" / "study" / "table.md").read_text()
    assert "| worse | 1/1 | 15.00 | 16.00 | 15.00 |" in table and "± 0" not in table
    paired = (tmp_path / "results" / "study" / "paired.md").read_text()
    assert "| worse | -5.00 (n=1) | -5.00 (n=1) |" in paired
    (sentence,) = findings(load_report(spec_path), {"worse": "without the triplet loss"})
    assert (
        sentence
        == "without the triplet loss: -5.00 mR against full with one seed (none); no interval yet."
    )


def test_claims_and_compute_are_read_from_the_records(tmp_path):
    """A claim is supported or contradicted only where its interval excludes 0 on that side;
    the compute table sums each run's training time."""
    from cmpagl.study import Claim, claims_markdown, compute_markdown, load_report

    spec_path = tmp_path / "study.yaml"
    spec_path.write_text(
        f"config: configs/ucm_cpu.yaml\nseeds: [0, 1, 2]\nresults: {tmp_path / 'results'}\n"
        f"out: {tmp_path / 'runs'}\nreference: full\n"
        "variants:\n  full: []\n  a: [loss.w_tri=0]\n  b: [loss.w_itm=0]\n  c: [loss.w_mlm=0]\n"
    )
    mr = {  # (variant, seed) -> (none, smr)
        ("full", 0): (20.0, 21.0), ("full", 1): (22.0, 23.2), ("full", 2): (18.0, 18.8),
        ("a", 0): (15.0, 15.0), ("a", 1): (17.5, 17.5), ("a", 2): (14.0, 14.0),  # lower
        ("b", 0): (23.0, 23.0), ("b", 1): (25.5, 25.5), ("b", 2): (21.2, 21.2),  # higher
        ("c", 0): (21.0, 21.0), ("c", 1): (20.0, 20.0),  # mixed
    }  # fmt: skip
    for run in load_spec(spec_path).runs():
        if (run.variant.name, run.seed) in mr:
            none, smr = mr[run.variant.name, run.seed]
            run.record_path.parent.mkdir(parents=True, exist_ok=True)
            record = {
                "status": "ok",
                "split": "test",
                "device": "cpu",
                "training": {"best_val_r_mean": none, "wall_time_s": 1800.0, "samples_per_s": 8},
                "test": {"none": {"r_mean": none}, "smr": {"r_mean": smr}},
            }
            if run.variant.name == "a":  # two runners side by side, one core each
                record["hardware"] = {"torch_threads": 1 + (run.seed == 2)}
            if run.variant.name == "b":  # resumed on another machine after seed 0
                cpu = "Intel Xeon" if run.seed == 0 else "AMD EPYC"
                record["hardware"] = {
                    "cpu": cpu, "cpu_count": 2, "torch_threads": 1, "torch": "2.14.1"
                }  # fmt: skip
            run.record_path.write_text(json.dumps(record))
    report = load_report(spec_path)
    claims = [
        Claim("a's part helps", "full", "a"),
        Claim("b's part helps", "full", "b"),
        Claim("c's part helps", "full", "c"),
        Claim("SMR helps", "full", "full", "smr", "none"),
        Claim("a one-seed claim", "full", "d"),
    ]
    rows = claims_markdown(report, claims).splitlines()[2:]
    verdicts = [row.split(" | ")[-1].rstrip(" |") for row in rows]
    assert verdicts == [
        "supported",
        "contradicted",
        "not resolved: the interval holds 0",
        "supported",
        "no finished seed pairs yet",
    ]
    # full − a: (5, 4.5, 4) -> +4.50; SMR − none: (1, 1.2, 0.8) -> [+0.50, +1.50]
    assert "| full (none) − a (none) | +4.50 [" in rows[0] and rows[0].count("| 3 |") == 1
    assert "| +1.00 [+0.50, +1.50] | 3 | supported |" in rows[3]
    # an unresolved row says how many seeds its mean and spread would need (c − full):
    # none (+1, −2): mean −0.5, sd 2.12, beyond 30 seeds; smr (0, −3.2): mean −1.6, sd 2.26,
    # 2.228 · 2.26 / √11 = 1.52 < 1.6 first at 11 seeds (10: 2.262 · 2.26 / √10 = 1.62)
    from cmpagl.study import findings

    (none,) = [s for s in findings(report, {"c": "without c"}) if s.startswith("without c")]
    assert none.endswith(
        "(the interval holds 0); at this mean and spread not even 30 seeds would resolve it."
    )
    (smr,) = [s for s in findings(report, {"c": "without c"}, "smr") if s.startswith("without c")]
    assert smr.endswith("at this mean and spread about 11 seeds would resolve it.")
    compute = compute_markdown(report).splitlines()
    assert "| full | 3 | 1.50 | 8.00 | cpu |" in compute
    assert "| a | 3 | 1.50 | 8.00 | cpu, 1 thread; cpu, 2 threads |" in compute
    assert (
        "| b | 3 | 1.50 | 8.00 | cpu (AMD EPYC), 1 thread; cpu (Intel Xeon), 1 thread |" in compute
    )
    assert compute[-1] == "| **total** | 11 of 12 | 5.50 | | |"
    from cmpagl.study import machines_lines

    assert machines_lines(report) == [
        "AMD EPYC: 2 cores, 1 torch thread, torch 2.14.1 (2 runs)",
        "Intel Xeon: 2 cores, 1 torch thread, torch 2.14.1 (1 run)",
        "8 runs without a record of the processor",  # full, c, and a (threads only)
    ]
    from cmpagl.report import PairedInterval
    from cmpagl.study import claim_verdict

    assert claim_verdict(PairedInterval((3.0,))) == "undecided: one seed, no interval"


def test_the_grid_edge_table_counts_settings_chosen_at_an_end_of_their_grid(tmp_path):
    from cmpagl.study import grid_edges_markdown, load_report

    spec_path = tmp_path / "study.yaml"
    spec_path.write_text(
        f"config: configs/ucm_cpu.yaml\nseeds: [0, 1, 2, 3]\nresults: {tmp_path / 'results'}\n"
        f"out: {tmp_path / 'runs'}\nvariants:\n  full: []\n"
    )
    smr = {"tau_s": 0.05, "k": 50, "lam": 2.0}
    records = [  # (choices, on_edge); None: a record from before runs kept on_edge
        ({"smr": smr, "galr": {"k": 5}}, {"smr": {"tau_s": False, "k": True, "lam": True},
                                          "galr": {"k": False}}),
        ({"smr": smr, "galr": {"k": 5}}, {"smr": {"tau_s": False, "k": True, "lam": False},
                                          "galr": {"k": None}}),
        ({"smr": None, "galr": {"k": 5}}, {"smr": {}, "galr": {"k": False}}),  # none won
        ({"smr": smr, "galr": {"k": 5}}, None),
    ]  # fmt: skip
    for run, (choices, edges) in zip(load_spec(spec_path).runs(), records, strict=True):
        record = {"status": "ok", "split": "test", "training": {}, "choices": choices}
        if edges is not None:
            record["on_edge"] = edges
        run.record_path.parent.mkdir(parents=True, exist_ok=True)
        run.record_path.write_text(json.dumps(record))
    rows = grid_edges_markdown(load_report(spec_path)).splitlines()
    assert rows[2:] == ["| smr | 4 | 2 | k 2, λ 1 | 1 | 1 |", "| galr | 4 | 0 | – | 0 | 1 |"]


def test_the_budget_table_says_whether_runs_were_still_improving(tmp_path):
    """``late_gain``: the best validation mR after 70 % of the steps minus the best before;
    the budget table shows it per finished run of the variants asked for."""
    from cmpagl.study import budget_markdown, late_gain, load_report

    scores = [5.3, 4.9, 6.3, 6.8, 10.6, 12.6, 12.2, 15.9, 16.2, 15.1]
    rising = [{"step": 40 * (i + 1), "r_mean": v} for i, v in enumerate(scores)]
    assert late_gain(rising) == pytest.approx(16.2 - 12.6)  # steps 320-400 against 40-280
    flat = rising[:7] + [{"step": s, "r_mean": 10.0} for s in (320, 360, 400)]
    assert late_gain(flat) == pytest.approx(10.0 - 12.6)
    assert late_gain(rising, tail=0.5) == pytest.approx(16.2 - 10.6)
    assert late_gain([]) is None and late_gain(rising[:1]) is None
    spec_path = tmp_path / "study.yaml"
    spec_path.write_text(
        f"config: configs/ucm_cpu.yaml\nseeds: [0, 1]\nresults: {tmp_path / 'results'}\n"
        f"out: {tmp_path / 'runs'}\nreference: full\nvariants:\n  full: []\n  other: []\n"
    )
    curves = {("full", 0): rising, ("full", 1): flat, ("other", 0): rising}
    for run in load_spec(spec_path).runs():
        curve = curves.get((run.variant.name, run.seed))
        if curve is None:
            continue
        run.record_path.parent.mkdir(parents=True, exist_ok=True)
        best = max(curve, key=lambda v: v["r_mean"])
        training = {"steps": 400, "best_val_r_mean": best["r_mean"], "best_step": best["step"]}
        record = {"status": "ok", "split": "test", "training": training, "val_curve": curve}
        run.record_path.write_text(json.dumps(record))
    rows = budget_markdown(load_report(spec_path), ["full"]).splitlines()
    assert rows[0].endswith("| gain in the last 30 % of the steps |")
    assert rows[2:] == [
        "| full | 0 | 400 | 16.20 | 360 | +3.60 |",
        "| full | 1 | 400 | 12.60 | 240 | -2.60 |",
    ]


@pytest.mark.parametrize(
    ("values", "target", "words"),
    [
        ((), 5, "no finished seed pairs yet (target +5)"),
        ((2.27,), 1, "+2.27 with one seed (target +1): above it, no interval yet"),
        ((18.72,), 30, "+18.72 with one seed (target +30): below it, no interval yet"),
        ((6.0, 6.2, 6.4), 5, "met, the whole interval at or above it"),
        ((4.0, 6.0, 8.0), 5, "met on the mean; the interval reaches below it"),
        ((3.0, 3.2, 3.4), 5, "missed by 1.80"),
        ((1.0, 4.0, 7.0), 5, "missed by 1.00; the interval reaches it"),
    ],
)  # fmt: skip
def test_a_target_is_met_only_as_far_as_the_interval_says(values, target, words):
    from cmpagl.report import PairedInterval
    from cmpagl.study import target_verdict

    verdict = target_verdict(PairedInterval(values) if values else None, target)
    assert verdict.endswith(words)
    if len(values) > 1:
        assert f"over {len(values)} seeds (target +{target})" in verdict
    absolute = target_verdict(PairedInterval((20.0, 22.0, 24.0)), 30, signed=False)
    assert absolute == "22.00 [17.03, 26.97] over 3 seeds (target 30): missed by 8.00"


def test_the_progress_bar_counts_the_selected_runs(tmp_path, capsys):
    """--only/--seeds: the bar's total is the runs selected (2 of 6 here, both finished), not
    the whole sweep, so its count and time left are those of what this call runs."""
    from cmpagl.experiments import run_sweep

    spec_path = tmp_path / "study.yaml"
    spec_path.write_text(
        f"config: configs/ucm_cpu.yaml\nseeds: [0, 1, 2]\nresults: {tmp_path / 'results'}\n"
        f"out: {tmp_path / 'runs'}\nvariants:\n  full: []\n  other: [loss.w_tri=0]\n"
    )
    spec = load_spec(spec_path)
    for run in spec.runs():
        if run.variant.name == "full" and run.seed < 2:
            run.record_path.parent.mkdir(parents=True, exist_ok=True)
            record = {"status": "ok", "split": "test", "overrides": [], "test": {}}
            run.record_path.write_text(json.dumps(record | {"training": {"best_val_r_mean": 1}}))
    run_sweep(spec, only=["full"], seeds=[0, 1])
    bar = capsys.readouterr().err
    assert "2/2" in bar and "/6" not in bar


def test_time_left_counts_each_pending_run_as_its_variants_latest_run(tmp_path, capsys):
    """The estimate comes from the records: a resumed sweep has one before any run of this call
    finished, and a variant that trains twice as fast counts half as long."""
    from cmpagl.experiments import time_left

    spec_path = tmp_path / "study.yaml"
    spec_path.write_text(
        f"config: configs/ucm_cpu.yaml\nseeds: [0, 1, 2]\nresults: {tmp_path / 'results'}\n"
        f"out: {tmp_path / 'runs'}\nvariants:\n  full: []\n  fast: [loss.w_tri=0]\n"
        "  new: [loss.w_itm=0]\n"
    )
    spec = load_spec(spec_path)
    done = {  # (variant, seed): (created, run_wall_s, training wall_time_s)
        ("full", 0): ("2026-11-01T10:00:00+0000", 3000.0, 2900.0),  # an old, slow machine
        ("full", 1): ("2026-11-02T10:00:00+0000", 100.0, 1000.0),  # resumed: 1000 s in all
        ("fast", 0): ("2026-11-02T09:00:00+0000", 500.0, 450.0),
    }
    for run in spec.runs():
        if (run.variant.name, run.seed) in done:
            created, wall, train_s = done[run.variant.name, run.seed]
            record = {
                "status": "ok",
                "split": "test",
                "overrides": list(run.variant.overrides),
                "test": {},
                "created": created,
                "run_wall_s": wall,
                "training": {"best_val_r_mean": 1, "wall_time_s": train_s},
            }
            run.record_path.parent.mkdir(parents=True, exist_ok=True)
            run.record_path.write_text(json.dumps(record))
    report = run_sweep(spec, dry_run=True)
    todo = [i for i, r in enumerate(report.records) if r is None]
    assert [report.runs[i].label for i in todo] == [
        "new seed 0",
        "fast seed 1",
        "new seed 1",
        "full seed 2",
        "fast seed 2",
        "new seed 2",
    ]
    # new: none finished, so the latest of all (full seed 1, 1000 s); fast 500; full 1000
    assert time_left(report, todo) == 1000 + 500 + 1000 + 1000 + 500 + 1000
    assert time_left(report, []) == 0
    nothing_yet = replace(spec, results=tmp_path / "elsewhere")
    assert time_left(run_sweep(nothing_yet, dry_run=True), todo) is None
    main([str(spec_path), "--dry-run"])
    assert "6 runs to go, ≈ 1 h 23 min" in capsys.readouterr().out


def test_the_plan_tells_a_run_training_now_from_one_left_half_way(tmp_path, capsys):
    import socket

    from cmpagl.lock import LOCK_FILE

    spec_path = tmp_path / "study.yaml"
    spec_path.write_text(
        f"config: configs/ucm_cpu.yaml\nseeds: [0, 1, 2]\nresults: {tmp_path / 'results'}\n"
        f"out: {tmp_path / 'runs'}\nvariants:\n  full: []\n"
    )
    first, second, third = load_spec(spec_path).runs()
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    for run, pid in ((first, os.getpid()), (second, int(dead.stdout))):
        (run.run_dir / "last").mkdir(parents=True)
        owner = {"pid": pid, "host": socket.gethostname(), "started": "2026-12-01 02:00:00 +0000"}
        (run.run_dir / LOCK_FILE).write_text(json.dumps(owner))
    from cmpagl.experiments import CLAIM_FILE

    runner = hold(third.run_dir, CLAIM_FILE)  # another sweep runner has it, just started
    try:
        main([str(spec_path), "--dry-run"])
    finally:
        runner.kill()
        runner.wait()
    out = capsys.readouterr().out
    assert f"full seed 0                  training now (pid {os.getpid()} on host" in out
    assert "full seed 1                  started, not finished (resumes from its checkpoint)" in out
    assert f"full seed 2                  running in a sweep runner (pid {runner.pid} on" in out


def test_commit_results_commits_the_results_folder_only(tmp_path):
    """--commit: each run's record and tables go into one commit; the user's other changes,
    staged or not, stay out of it; without a repository or with nothing new, one line."""
    from cmpagl.experiments import commit_results

    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], cwd=tmp_path, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        return out.stdout

    tuning_path, _ = _tuning_specs(tmp_path)
    spec = load_spec(tuning_path)
    lines: list[str] = []
    spec.results.mkdir(parents=True)
    assert not commit_results(spec, "m seed 0: ok", lines.append)  # not a repository yet
    assert lines[-1].startswith("commit skipped")

    git("init", "-q")
    git("config", "user.email", "sweep@example.org")
    git("config", "user.name", "sweep")
    (tmp_path / "notes.txt").write_text("mine\n")
    git("add", "notes.txt")
    git("commit", "-q", "-m", "start")
    (tmp_path / "notes.txt").write_text("mine, edited and staged\n")
    git("add", "notes.txt")
    (tmp_path / "draft.txt").write_text("untracked\n")
    _write_val_records(spec, {("m", 0): 5.0})
    (spec.results / "runs.csv").write_text("variant\nm\n")

    assert commit_results(spec, "m seed 0: ok", lines.append)
    assert git("log", "-1", "--format=%s").strip() == f"Sweep {spec.name}: m seed 0: ok"
    committed = set(git("show", "--name-only", "--format=", "HEAD").split())
    results = spec.results.relative_to(tmp_path).as_posix()
    assert committed == {f"{results}/runs.csv", f"{results}/m/seed0.json"}
    assert git("diff", "--cached", "--name-only").split() == ["notes.txt"]  # still staged
    assert "draft.txt" in git("status", "--porcelain")
    assert not commit_results(spec, "m seed 0: ok", lines.append)  # nothing new
    assert lines[-1].startswith("commit: nothing new")

    # another git process (a second runner committing) holds the index for a moment: wait
    import threading

    lock = tmp_path / ".git" / "index.lock"
    lock.write_text("")
    threading.Timer(0.8, lock.unlink).start()
    _write_val_records(spec, {("m", 1): 4.0})
    assert commit_results(spec, "m seed 1: ok", lines.append), lines[-1]
    assert git("log", "-1", "--format=%s").strip() == f"Sweep {spec.name}: m seed 1: ok"
    lock.write_text("")  # held for good: after five tries, one line and the sweep goes on
    _write_val_records(spec, {("m", 2): 3.0})
    assert not commit_results(spec, "m seed 2: ok", lines.append)
    assert lines[-1].startswith("commit skipped") and "index.lock" in lines[-1]
    lock.unlink()


def test_a_setting_sweep_reads_each_runs_value_from_its_resolved_config(tmp_path):
    """``setting_table`` takes the swept value from what the run trained with (its resolved
    config), not from the variant's name, and keeps only the variants asked for."""
    from cmpagl.study import load_report, setting_table

    spec_path = tmp_path / "study.yaml"
    spec_path.write_text(
        f"config: configs/synthetic_tiny.yaml\nseeds: [0, 1]\nresults: {tmp_path / 'results'}\n"
        f"out: {tmp_path / 'runs'}\nvariants:\n  base: []\n  lam_0: [loss.lambda_intra=0.0]\n"
        "  lam_0.5: [loss.lambda_intra=0.5]\n  concat: [model.gswin.global_mode=concat]\n"
    )
    lam = {"base": 0.1, "lam_0": 0.0, "lam_0.5": 0.5, "concat": 0.1}
    for run in load_spec(spec_path).runs():
        if (run.variant.name, run.seed) == ("lam_0.5", 1):
            continue  # not finished
        record = {
            "status": "ok",
            "split": "test",
            "training": {},
            "config_resolved": {"loss": {"lambda_intra": lam[run.variant.name]}},
            "test": {"none": {"r_mean": 10 * lam[run.variant.name] + run.seed}},
        }
        run.record_path.parent.mkdir(parents=True, exist_ok=True)
        run.record_path.write_text(json.dumps(record))
    report = load_report(spec_path)
    frame = setting_table(report, "loss.lambda_intra", ["lam_0.5", "base", "lam_0"])
    assert list(frame["variant"]) == ["lam_0", "lam_0", "base", "base", "lam_0.5"]
    assert list(frame["value"]) == [0.0, 0.0, 0.1, 0.1, 0.5]
    assert list(frame["r_mean"]) == pytest.approx([0.0, 1.0, 1.0, 2.0, 5.0])
    assert setting_table(report, "loss.lambda_intra", ["base"], reranker="smr").empty
    with pytest.raises(KeyError, match="model.gswin.gamma_init"):
        setting_table(report, "model.gswin.gamma_init", ["base"])
