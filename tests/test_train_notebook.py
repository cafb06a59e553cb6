"""The training notebook (05_train.ipynb) and the library under it (cmpagl.runs): every notebook's
parameters cell is typed for papermill; the notebook trains, evaluates and writes its record,
and executed again on a finished run it skips training and reads its evaluation back; a folder
holding another config's run is refused; the log is read into curves."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from cmpagl.config import ConfigError
from cmpagl.runs import (
    evaluate_best,
    override_list,
    plan_run,
    result_record,
    train_or_resume,
    training_curves,
)

NOTEBOOK = "05_train.ipynb"


def tiny_overrides(synthetic: Path) -> list[str]:
    """A model and data small enough for a few optimizer steps in seconds on 2 CPU cores."""
    return [
        f"data.root={synthetic}",
        "data.image_size=64",
        "data.synthetic_n_train=40",
        "data.synthetic_n_val=10",
        "data.synthetic_n_test=10",
        "data.synthetic_seed=3",
        "model.gswin.img_size=64",
        "model.gswin.embed_dim=16",
        "model.gswin.depths=[2,2]",
        "model.gswin.num_heads=[2,4]",
        "model.queue_size=32",
        "train.batch_size=8",
        "train.warmup_steps=2",
        "train.device=cpu",
        # one thread: two threads busy-wait on each other when other processes share the cores
        "train.num_threads=1",
        "retrieval.itm_grid_k=[2,4]",
        "retrieval.smr_grid_tau=[0.05]",
        "retrieval.smr_grid_k=[5]",
        "retrieval.smr_grid_lambda=[0.1]",
        "retrieval.galr_grid_k=[2,5]",
        "retrieval.galr_grid_wp1=[0.5]",
        "retrieval.galr_grid_wp2=[0.7]",
        "retrieval.galr_grid_decay=[0.05]",
    ]


def small_parameters(tmp: Path, synthetic: Path) -> dict:
    """The training notebook's smallest parameters (also used by test_notebooks.py)."""
    return {
        "config": "configs/synthetic_tiny.yaml",
        "overrides": tiny_overrides(synthetic),
        "max_steps": 3,
        "log_every": 1,
        "output_dir": str(tmp / "run05"),
        "rerankers": ["none", "itm", "smr"],
    }


def _outputs(path: Path) -> list[dict]:
    nb = json.loads(path.read_text())
    return [o for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])]


def _stdout(outputs: list[dict]) -> str:
    return "".join("".join(o["text"]) for o in outputs if o.get("name") == "stdout")


# ----------------------------------------------------------------------------------------------
# Every notebook's parameters cell, as papermill reads it
# ----------------------------------------------------------------------------------------------
def test_every_parameters_cell_is_typed_for_papermill(repo_root):
    """``papermill --help-notebook`` lists every assignment of the cell with a type and a help
    text (a help comment holding "=" used to make papermill skip the line)."""
    import papermill as pm

    for path in sorted((repo_root / "notebooks").glob("*.ipynb")):
        nb = json.loads(path.read_text())
        cell = next(c for c in nb["cells"] if c["cell_type"] == "code")
        tree = ast.parse("".join(cell["source"]))
        assigned = [
            n.target.id if isinstance(n, ast.AnnAssign) else n.targets[0].id
            for n in tree.body
            if isinstance(n, (ast.Assign, ast.AnnAssign))
        ]
        inferred = pm.inspect_notebook(str(path))
        assert list(inferred) == assigned, path.name
        for name, p in inferred.items():
            assert p["inferred_type_name"] != "None", f"{path.name}: {name} has no type"
            assert p["help"], f"{path.name}: {name} has no help"


# ----------------------------------------------------------------------------------------------
# The notebook end to end
# ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_training_notebook_writes_its_record_then_reads_it_back(
    repo_root, tmp_path, small_synthetic
):
    import papermill as pm

    params = small_parameters(tmp_path, small_synthetic)
    run = Path(params["output_dir"])

    def execute(out: Path) -> list[dict]:
        pm.execute_notebook(
            str(repo_root / "notebooks" / NOTEBOOK),
            str(out),
            parameters=params,
            kernel_name="python3",
            cwd=str(repo_root / "notebooks"),
            progress_bar=False,
        )
        outputs = _outputs(out)
        assert not [o for o in outputs if o["output_type"] == "error"]
        # a reader sees results, not warnings or the build machine's stderr
        assert not [o for o in outputs if o.get("name") == "stderr"], out.name
        assert any("image/png" in o.get("data", {}) for o in outputs), "no figure"
        return outputs

    first = execute(tmp_path / "first.ipynb")
    record = json.loads((run / "result.json").read_text())
    assert record["status"] == "ok" and record["seed"] == 0
    assert record["training"]["action"] == "trained"
    assert record["training"]["steps"] == 3 and record["budget"]["max_steps"] == 3
    # the checkpoint was selected by the best validation in the log, and the record says so
    val = [
        r
        for r in map(json.loads, (run / "train_log.jsonl").read_text().splitlines())
        if r["kind"] == "val"
    ]
    assert record["training"]["best_val_r_mean"] == max(r["r_mean"] for r in val)
    assert [v["r_mean"] for v in record["val_curve"]] == [r["r_mean"] for r in val]
    assert list(record["test"]) == ["none", "itm", "smr"]
    for metrics in record["test"].values():
        assert 0.0 <= metrics["r_mean"] <= 100.0
    assert set(record["choices"]) == {"itm", "smr"}  # the settings each re-ranker chose on val
    # and, per setting, whether the chosen value is at an end of its grid (None: one value)
    assert set(record["on_edge"]) == {"itm", "smr"}
    assert set(record["on_edge"]["smr"]) <= {"tau_s", "k", "lam"}
    assert {type(v) for e in record["on_edge"].values() for v in e.values()} <= {bool, type(None)}
    assert record["device"] == "cpu" and record["git_commit"]
    assert record["config"] == "configs/synthetic_tiny.yaml"
    assert "evaluated now" in _stdout(first)

    # executed again: the run is finished, so nothing is trained and the evaluation is read
    mtime = (run / "best" / "model.safetensors").stat().st_mtime_ns
    second = execute(tmp_path / "second.ipynb")
    again = json.loads((run / "result.json").read_text())
    assert again["training"]["action"] == "skipped"
    assert again["test"] == record["test"]
    assert (run / "best" / "model.safetensors").stat().st_mtime_ns == mtime
    assert "read from the earlier evaluation" in _stdout(second)

    # the same folder with another config is refused, naming the key that differs
    plan = plan_run(params["config"], params["overrides"], output_dir=run, max_steps=3)
    assert plan.state == "finished" and plan.checkpoint_step == 3
    # a tuning run (split "val") records validation metrics under "val" and no test metrics;
    # best/ re-evaluated on val gives the score that selected it
    plan.rerankers = ["none"]
    evaluation, _ = evaluate_best(plan, "val")
    tuned = result_record(plan, train_or_resume(plan), evaluation)
    assert tuned["split"] == "val" and "test" not in tuned
    assert tuned["val"]["none"]["r_mean"] == pytest.approx(record["training"]["best_val_r_mean"])
    with pytest.raises(ValueError, match="split must be 'test' or 'val'"):
        evaluate_best(plan, "train")
    with pytest.raises(ConfigError, match=r"loss\.w_tri: 1\.0 -> 0\.0"):
        plan_run(
            params["config"], [*params["overrides"], "loss.w_tri=0"], output_dir=run, max_steps=3
        )
    # a longer budget is another run too (its schedule differs), not a silent continuation
    with pytest.raises(ConfigError, match=r"train\.max_steps: 3 -> 5"):
        plan_run(params["config"], params["overrides"], output_dir=run, max_steps=5)


# ----------------------------------------------------------------------------------------------
# The library pieces that need no training
# ----------------------------------------------------------------------------------------------
def test_plan_run_rejects_an_unknown_reranker_before_training(tmp_path, small_synthetic):
    with pytest.raises(ValueError, match="unknown re-ranker.*smrr"):
        plan_run(
            "configs/synthetic_tiny.yaml",
            tiny_overrides(small_synthetic),
            output_dir=tmp_path / "r",
            rerankers=["none", "smrr"],
        )
    assert not (tmp_path / "r").exists()


def test_overrides_as_papermill_passes_them():
    """``-p overrides`` hands the notebook a string; ``-y`` a list. Both mean the same."""
    assert override_list("[train.epochs=3, loss.w_tri=0]") == ["train.epochs=3", "loss.w_tri=0"]
    assert override_list(["train.epochs=3"]) == ["train.epochs=3"]
    assert override_list("train.epochs=3") == ["train.epochs=3"]
    assert override_list("") == override_list([]) == []
    with pytest.raises(ConfigError, match=r"not a YAML list.*write e.g. \[train.epochs=3"):
        override_list("[train.epochs=3")
    with pytest.raises(ConfigError, match="must be key=value strings, got 3"):
        override_list("[3]")
    plan = plan_run("configs/synthetic_tiny.yaml", "[train.epochs=2, loss.w_tri=0]", max_steps=1)
    assert plan.cfg.train.epochs == 2 and plan.cfg.loss.w_tri == 0


def test_plan_run_reads_relative_paths_from_the_repository_root(repo_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the kernel's folder must not matter
    plan = plan_run("configs/synthetic_tiny.yaml", seed=2, max_steps=30)
    assert plan.config_path == repo_root / "configs" / "synthetic_tiny.yaml"
    assert plan.cfg.data.root == str(repo_root / "data" / "synthetic")
    assert plan.output_dir == repo_root / "runs" / "synthetic_tiny" / "seed2-steps30"
    assert plan.cfg.seed == 2 and plan.cfg.train.max_steps == 30
    # rerankers default to all, the ITM ones only where ITM is trained
    assert "itm" in plan.rerankers
    no_itm = plan_run("configs/synthetic_tiny.yaml", ["loss.w_itm=0"], output_dir=tmp_path / "x")
    assert no_itm.rerankers and not [r for r in no_itm.rerankers if "itm" in r]


def test_training_curves_orders_dedupes_and_finds_the_selected_checkpoint(tmp_path):
    lines = [
        {"kind": "train", "step": 2, "itc": 2.0, "lr_new": 2e-4, "temp": 0.07, "wall_time": 1},
        {"kind": "train", "step": 4, "itc": 1.5, "lr_new": 4e-4, "temp": 0.06, "wall_time": 2},
        {"kind": "val", "step": 4, "epoch": 0, "r_mean": 30.0, "best": True},
        # a resumed run's log (written by an older version) repeating step 4 with new values
        {"kind": "train", "step": 4, "itc": 1.4, "lr_new": 4e-4, "temp": 0.06, "wall_time": 3},
        {"kind": "train", "step": 6, "itc": 1.0, "lr_new": 3e-4, "temp": 0.05, "wall_time": 4},
        {"kind": "val", "step": 6, "epoch": 1, "r_mean": 35.0, "best": True},
        {"kind": "val", "step": 8, "epoch": 2, "r_mean": 35.0, "best": False},  # a tie: not best
    ]
    text = "".join(json.dumps(r) + "\n" for r in lines) + '{"kind": "train", "st'  # torn line
    (tmp_path / "train_log.jsonl").write_text(text)
    curves = training_curves(tmp_path)
    assert curves.step == [2, 4, 6]
    assert curves.series["itc"] == [2.0, 1.4, 1.0]
    assert set(curves.series) == {"itc", "lr_new", "temp"}  # no bookkeeping keys
    assert curves.val_step == [4, 6, 8] and curves.val["r_mean"] == [30.0, 35.0, 35.0]
    assert curves.best_step == 6  # the first highest, as training keeps best/
    assert training_curves(lines).step == [2, 4, 6]  # records work as well as a folder


def test_a_config_key_added_since_a_checkpoint_is_not_a_difference():
    """A run folder written before a config key existed is still that run: the key's default
    keeps the old behaviour, so resuming or reading it back must not refuse the folder."""
    import copy

    from cmpagl.config import load_config, to_dict
    from cmpagl.runs import _with_defaults, training_differences

    wanted = to_dict(load_config("configs/synthetic_tiny.yaml"))
    old = copy.deepcopy(wanted)
    del old["data"]["image_scaling"], old["loss"]["itc_alpha_warmup"]
    assert training_differences(old, wanted)  # compared as saved, the new keys differ
    assert training_differences(_with_defaults(old), wanted) == []
    changed = copy.deepcopy(old)
    changed["loss"]["w_tri"] = 0.0  # a real change is still one
    assert training_differences(_with_defaults(changed), wanted) == ["loss.w_tri: 0.0 -> 1.0"]
