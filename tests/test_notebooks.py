"""Every notebook executes with small parameters (the book runs them with the defaults), is
committed without outputs, with kernel python3 and a cell tagged `parameters`."""

from __future__ import annotations

import json

import pytest
from test_train_notebook import small_parameters


def _executed_chapters(tmp) -> str:
    """Two executed chapters as papermill leaves them (their run time in the metadata)."""
    folder = tmp / "executed"
    folder.mkdir()
    for name, seconds in (("01_data", 95.0), ("07_losses", 48.5)):
        nb = {"cells": [], "metadata": {"papermill": {"duration": seconds}}, "nbformat": 4}
        (folder / f"{name}.ipynb").write_text(json.dumps(nb))
    return str(folder)


# Small parameters per notebook, so the suite stays fast on 2 CPU cores.
SMALL = {
    "01_data.ipynb": lambda tmp, synthetic: {
        "synthetic_root": str(tmp / "synthetic"),
        "synthetic_n_train": 24,
        "synthetic_n_val": 8,
        "synthetic_n_test": 8,
        "synthetic_image_size": 64,
        "n_show": 4,
    },
    "02_gswin_and_model.ipynb": lambda tmp, synthetic, run: {
        "synthetic_root": str(synthetic),
        "batch_size": 4,
        "model_dir": str(run),
    },
    "03_train_and_retrieve.ipynb": lambda tmp, synthetic, run: {
        "model_dir": str(run),
        "n_boot": 200,
    },
    # reads the committed results/ (no training), so the defaults are already small
    "04_seed_tables.ipynb": lambda tmp, synthetic: {},
    "05_train.ipynb": lambda tmp, synthetic: small_parameters(tmp, synthetic),
    # the chapters that read a trained model get a tiny one (the book's is trained by make book)
    "06_text_fusion.ipynb": lambda tmp, synthetic, run: {"model_dir": str(run)},
    "07_losses.ipynb": lambda tmp, synthetic, run: {"model_dir": str(run)},
    "08_course.ipynb": lambda tmp, synthetic: {
        "executed_dir": _executed_chapters(tmp),
        "chapters_at_once": 2,  # as make book runs them: the page must say so
    },
    # reads the committed results/bench/ (no timing), so the defaults are already small
    "09_benchmarks.ipynb": lambda tmp, synthetic: {},
    # reads the committed configs and results/ (no training), so the defaults are small
    "10_reproduce.ipynb": lambda tmp, synthetic: {},
}


def notebooks(repo_root):
    return sorted((repo_root / "notebooks").glob("*.ipynb"))


def test_every_notebook_has_small_parameters(repo_root):
    assert {p.name for p in notebooks(repo_root)} == set(SMALL)


def test_notebooks_are_clean(repo_root):
    for path in notebooks(repo_root):
        nb = json.loads(path.read_text())
        assert nb["metadata"]["kernelspec"]["name"] == "python3", path.name
        code = [c for c in nb["cells"] if c["cell_type"] == "code"]
        assert all(not c.get("outputs") and c.get("execution_count") is None for c in code), (
            f"{path.name} is committed with outputs"
        )
        assert "parameters" in code[0].get("metadata", {}).get("tags", []), path.name


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SMALL))
def test_notebook_executes(repo_root, tmp_path, small_synthetic, name, request):
    import inspect

    import papermill as pm

    small = SMALL[name]
    args = [tmp_path, small_synthetic]
    if len(inspect.signature(small).parameters) == 3:  # the chapter reads a trained model
        args.append(request.getfixturevalue("tiny_trained_run"))

    out = tmp_path / name
    pm.execute_notebook(
        str(repo_root / "notebooks" / name),
        str(out),
        parameters=small(*args),
        kernel_name="python3",
        cwd=str(repo_root / "notebooks"),
        progress_bar=False,
    )
    nb = json.loads(out.read_text())
    errors = [o for c in nb["cells"] for o in c.get("outputs", []) if o["output_type"] == "error"]
    assert not errors
    images = [
        o for c in nb["cells"] for o in c.get("outputs", []) if "image/png" in o.get("data", {})
    ]
    assert images, "the notebook drew no figure"
    if name == "08_course.ipynb":
        assert "2 chapters at a time (sharing the cores)" in out.read_text()


def _study_outputs(nb: dict) -> str:
    """Every printed and Markdown output of an executed notebook, as one text."""
    parts = []
    for cell in nb["cells"]:
        for o in cell.get("outputs", []):
            if o["output_type"] == "stream":
                parts.append("".join(o["text"]))
            elif "text/markdown" in o.get("data", {}):
                parts.append("".join(o["data"]["text/markdown"]))
    return "\n".join(parts)


@pytest.mark.slow
def test_ablation_chapter_reads_a_finished_study(repo_root, tmp_path):
    """The ablations chapter on a study with every run finished (3 seeds), whose records are
    copies of a committed record of the real study with their test mR shifted: the tables, the
    paired intervals, the verdicts and the targets must all come out, as they will once the
    study is done (the suite otherwise only sees the study as far as it has run)."""
    import copy

    import papermill as pm
    import yaml

    from cmpagl.config import ExperimentConfig, load_config, to_dict
    from cmpagl.experiments import load_spec, resolve_tuning, run_parameters

    real = repo_root / "experiments" / "sweeps" / "ucm_ablations.yaml"
    # a full CMPAGL record: it holds every re-ranker (the baseline's have no ITM)
    found = sorted((repo_root / "results" / "ucm_ablations" / "cmpagl").glob("seed*.json"))
    if not found:
        pytest.skip("no committed CMPAGL record of the ablation study yet (make ablations)")
    template = json.loads(found[0].read_text())
    raw = yaml.safe_load(real.read_text())
    raw.update(out=str(tmp_path / "runs"), results=str(tmp_path / "results"))
    raw["tuned_by"] = str(repo_root / raw["tuned_by"])
    for variant in raw["variants"].values():  # three seeds each, as the numbers below assume
        if isinstance(variant, dict):
            variant.pop("seeds", None)
    spec_path = tmp_path / "study.yaml"
    spec_path.write_text(yaml.safe_dump(raw, sort_keys=False))  # the first variant: reference
    spec, _ = resolve_tuning(load_spec(spec_path))
    # per variant: a shift of its test mR against the full model, and a little noise per seed
    shift = {v.name: -1.0 for v in spec.variants} | {"cmpagl": 0.0, "baseline": -3.0}
    for run in spec.runs():
        rec = copy.deepcopy(template)
        rec.update(variant=run.variant.name, seed=run.seed, status="ok")
        rec["overrides"] = run_parameters(spec, run)["overrides"]
        delta = shift[run.variant.name] + 0.2 * ((run.seed * (len(run.variant.name) + 1)) % 3)
        for metrics in rec["test"].values():
            metrics["r_mean"] += delta
        run.record_path.parent.mkdir(parents=True, exist_ok=True)
        run.record_path.write_text(json.dumps(rec))

    # the synthetic switches: every row 1 mR below the defaults, except λ (its own curve)
    arch_raw = yaml.safe_load((repo_root / "experiments/sweeps/synthetic_arch.yaml").read_text())
    arch_raw.update(out=str(tmp_path / "arch_runs"), results=str(tmp_path / "results"))
    arch_path = tmp_path / "arch.yaml"
    arch_path.write_text(yaml.safe_dump(arch_raw, sort_keys=False))
    arch_spec = load_spec(arch_path)
    lam_shift = {"lambda_intra_0": -2.0, "lambda_intra_0.05": -0.5, "lambda_intra_0.2": -0.5}
    for run in arch_spec.runs():
        rec = copy.deepcopy(template)
        rec.update(variant=run.variant.name, seed=run.seed, status="ok")
        rec["overrides"] = overrides = run_parameters(arch_spec, run)["overrides"]
        rec["config_resolved"] = to_dict(
            load_config(run.variant.config, ExperimentConfig, overrides)
        )
        name = run.variant.name
        delta = 0.0 if name == "add_pool" else lam_shift.get(name, -1.0)
        for metrics in rec["test"].values():
            metrics["r_mean"] += delta
        run.record_path.parent.mkdir(parents=True, exist_ok=True)
        run.record_path.write_text(json.dumps(rec))

    out = tmp_path / "04.ipynb"
    pm.execute_notebook(
        str(repo_root / "notebooks" / "04_seed_tables.ipynb"),
        str(out),
        parameters={"study": str(spec_path), "architecture": str(arch_path)},
        kernel_name="python3",
        cwd=str(repo_root / "notebooks"),
        progress_bar=False,
    )
    nb = json.loads(out.read_text())
    assert not [o for c in nb["cells"] for o in c.get("outputs", []) if o["output_type"] == "error"]
    # the synthetic section: its findings, its claims and the curves of the swept settings
    heads = [i for i, c in enumerate(nb["cells"]) if "".join(c["source"]).startswith("## ")]
    start = next(i for i in heads if "".join(nb["cells"][i]["source"]).startswith("## Arch"))
    end = heads[heads.index(start) + 1]
    arch_text = _study_outputs({"cells": nb["cells"][start:end]})
    m = len(arch_spec.variants)
    assert arch_text.count(" | 3/3 | ") == m
    assert "- no global path at all (a Swin): -1.00 [-1.00, -1.00] mR against add_pool" in arch_text
    assert "| add_pool (none) − swin (none) | +1.00 [+1.00, +1.00] | 3 | supported |" in arch_text
    assert "| add_pool (none) − lambda_intra_0 (none) | +2.00 [+2.00, +2.00] | 3 | supported |" in (
        arch_text
    )
    (curves,) = [c for c in nb["cells"][start:end] if "setting_table(" in "".join(c["source"])]
    assert [o for o in curves["outputs"] if "image/png" in o.get("data", {})]
    chance = template["chance"]["chance_r_mean"]  # printed, not drawn: the axis fits the runs
    printed = "".join("".join(o.get("text", "")) for o in curves["outputs"])
    assert f"chance level on this test split: mR {chance:.2f}" in printed
    text = _study_outputs({"cells": nb["cells"][:start] + nb["cells"][end:]})
    n = len(spec.variants)
    assert f"{3 * n} of {3 * n} runs finished" in text
    assert text.count(" | 3/3 | ") == n
    assert f"oracle bound: mR {template['oracle']['oracle_r_mean']:.2f}" in text
    assert "(n=3)" in text and "mR against cmpagl over 3 seeds (none)" in text
    # the noise is 0, 0.2, 0.4 over seeds 0-2 for cmpagl and 0 for baseline (name lengths)
    rows = [x.rstrip(" |") for x in text.splitlines() if "(target" in x]
    lines = {x.strip("| ").split(" | ")[0]: x for x in rows}
    assert "+3.20" in lines["CMPAGL − baseline (none)"]
    assert lines["CMPAGL − baseline (none)"].endswith("over 3 seeds (target +5): missed by 1.80")
    smr = template["test"]["smr"]["r_mean"] - template["test"]["none"]["r_mean"]
    verdict = "met, the whole interval at or above it" if smr >= 1 else f"missed by {1 - smr:.2f}"
    assert lines["SMR − none (CMPAGL)"].endswith(f"over 3 seeds (target +1): {verdict}")
    full = template["test"]["none"]["r_mean"] + 0.2
    absolute = lines["CMPAGL test mR (none)"]
    assert f" {full:.2f} [" in absolute and "over 3 seeds (target 30): missed by" in absolute
    # the claims: every ablated row is 1 mR below the full model (+0-0.4 noise), SMR as recorded
    assert "| cmpagl (none) − no_global (none) | +1.00 [+1.00, +1.00] | 3 | supported |" in text
    assert "| cmpagl (itm) − no_prealign (itm) |" in text
    # twice the steps: baseline_same_time (−1, noise 0, 0.2, 0.4) − baseline (−3, noise 0)
    assert "| baseline_same_time (none) − baseline (none) | +2.20 [" in text
    assert text.count(" | 3 | supported |") == 4 + (smr > 0)
    # the budget table: a row per seed of the full model and both baselines, from the records
    from cmpagl.study import late_gain

    gain = late_gain(template["val_curve"])
    best = f"{template['training']['best_val_r_mean']:.2f} | {template['training']['best_step']}"
    for name in ("cmpagl", "baseline", "baseline_same_time"):
        assert f"| {name} | 2 | {template['training']['steps']} | {best} | {gain:+.2f} |" in text
    assert f"| **total** | {3 * n} of {3 * n} |" in text
    # what both studies cost, each with the machines its records name
    assert f"| **total** | {3 * m} of {3 * m} |" in text
    hw = template["hardware"]
    threads = f"{hw['torch_threads']} torch thread{'s' * (hw['torch_threads'] != 1)}"
    machine = f"{hw['cpu']}: {hw['cpu_count']} cores, {threads}, torch {hw['torch']}"
    assert f"{machine} ({3 * n} runs)" in text and f"{machine} ({3 * m} runs)" in text
    # the re-rankers' grids: every run is a copy of the template, so all or none on an edge
    for name, edges in template["on_edge"].items():
        at_edge = 3 * n if any(edges.values()) else 0
        assert f"| {name} | {3 * n} | {at_edge} | " in text
