"""cmpagl.report: seeds-table statistics against naive references, the summaries kept in
results/ recomputed from their own entries, and the Markdown the book shows."""

from __future__ import annotations

import copy
import json
import statistics
from pathlib import Path

import pytest

from cmpagl.report import (
    KEYS,
    RERANKERS,
    check_targets,
    config_diff,
    flatten,
    group_by_config,
    load_tables,
    mean_sd,
    paired,
    paired_differences_markdown,
    provenance_lines,
    seed_table_markdown,
    settings_text,
    summarize,
    val_curve,
)

RESULTS = Path(__file__).resolve().parents[1] / "results"


def entry(config: str, seed: int, r_means: dict[str, float], w_itm: float = 1.0) -> dict:
    """One (config, seed) entry as experiments/seeds_table.py records it."""
    return {
        "config": config,
        "seed": seed,
        "test": {
            r: {k: v + i for i, k in enumerate(KEYS[:-1])} | {"r_mean": v}
            for r, v in r_means.items()
        },
        "best_val_r_mean": 10.0 + seed,
        "wall_time_s": 100.0 + 10 * seed,
        "samples_per_s": 20.0 - seed,
        "oracle_r_mean": 70.0,
        "config_resolved": {"seed": seed, "output_dir": f"runs/{seed}", "loss": {"w_itm": w_itm}},
    }


@pytest.fixture
def entries() -> list[dict]:
    """A baseline without ITM (an older run's stray ITM column included) and the full model,
    seeds 0-2; the full model lacks seed 2's SMR."""
    base = [
        entry("configs/x_baseline.yaml", s, {"none": 10.0 + s, "itm": 1.0, "smr": 12.0 + 2 * s}, 0)
        for s in range(3)
    ]
    full = [entry("configs/x.yaml", s, {r: 20.0 + s * s for r in RERANKERS}) for s in range(3)]
    del full[2]["test"]["smr"]
    return base + full


def test_mean_sd_by_hand() -> None:
    assert mean_sd([1.0, 2.0, 3.0]) == "2.00 ± 1.00"
    assert mean_sd([5.0]) == "5.00 ± 0.00"  # one seed: no spread
    assert mean_sd([1.0, 2.0, 3.0], digits=0) == "2 ± 1"
    assert mean_sd([-1.0, -3.0], signed=True) == "-2.00 ± 1.41"
    assert mean_sd([1.0, 3.0], signed=True) == "+2.00 ± 1.41"


def test_flatten_and_config_diff() -> None:
    a = {"seed": 0, "data": {"root": "x", "aug": {"hflip": True}}, "loss": {"w_itm": 1.0}}
    b = {"seed": 1, "data": {"root": "x", "aug": {"hflip": False}}, "loss": {"w_itm": 0.0}}
    b["model"] = {"gamma": 0.1}
    assert list(flatten(a)) == [
        ("seed", 0), ("data.root", "x"), ("data.aug.hflip", True), ("loss.w_itm", 1.0)
    ]  # fmt: skip
    assert config_diff(a, b) == [
        "data.aug.hflip: True -> False",
        "loss.w_itm: 1.0 -> 0.0",
        "model.gamma: None -> 0.1",
    ]
    assert config_diff(a, b, ignore=())[0] == "seed: 0 -> 1"


def test_paired_differences_are_within_seeds(entries) -> None:
    groups = {Path(e["config"]).stem: [] for e in entries}
    for e in entries:
        groups[Path(e["config"]).stem].append(e)
    base, full = groups["x_baseline"], groups["x"]
    assert paired(base, full, "none", "none") == [10.0, 10.0, 12.0]  # (20 + s²) - (10 + s)
    assert paired(full, full, "none", "smr") == [0.0, 0.0]  # seed 2 has no smr: left out
    assert paired(base, full, "itm", "itm") == [19.0, 20.0, 23.0]
    assert paired(list(reversed(base)), full, "none", "none") == [10.0, 10.0, 12.0]  # by seed


def test_summarize_against_naive_statistics(entries) -> None:
    summary, md = summarize(entries)
    assert list(summary) == ["configs/x_baseline.yaml", "configs/x.yaml"]
    base = summary["configs/x_baseline.yaml"]
    assert set(base["test_r_mean"]) == {"none", "smr"}  # w_itm = 0: no ITM column shown
    assert base["test_r_mean"]["smr"] == {
        "mean": 14.0, "std": statistics.stdev([12.0, 14.0, 16.0]), "values": [12.0, 14.0, 16.0]
    }  # fmt: skip
    assert base["test_metrics_mean"]["none"]["txt_r5"] == pytest.approx(11.0 + 1)
    full = summary["configs/x.yaml"]
    assert set(full["test_r_mean"]) == {"none", "itm", "itm+smr"}  # smr missing for one seed
    assert full["val_r_mean"] == [10.0, 11.0, 12.0] and full["oracle_r_mean"] == 70.0
    lines = md.splitlines()
    assert lines[0].startswith("| config | seeds | mR none | mR itm | mR smr | mR itm+smr |")
    assert lines[2] == (
        "| x_baseline | 3 | 11.00 ± 1.00 | – | 14.00 ± 2.00 | – | 11.00 ± 1.00 | 110 | 19.0 |"
    )
    assert lines[3].startswith("| x | 3 | 21.67 ± 2.08 | 21.67 ± 2.08 | – | 21.67 ± 2.08 |")


@pytest.mark.parametrize("name", ["synthetic_tiny", "ucm_cpu_10ep"])
def test_stored_summaries_are_recomputed_from_their_entries(name) -> None:
    record = load_tables(RESULTS, [name])[name]
    assert summarize(record["entries"])[0] == record["configs"]
    table = seed_table_markdown(record).splitlines()
    assert table[0].startswith("| config | seeds | test mR none |") and len(table) == 4
    for row, (config, stored) in zip(table[2:], record["configs"].items(), strict=True):
        none = stored["test_r_mean"]["none"]["values"]
        assert row.startswith(f"| {Path(config).stem} | 0, 1, 2 | {mean_sd(none)} |")
    tampered = copy.deepcopy(record)
    tampered["entries"][0]["test"]["none"]["r_mean"] += 1.0
    with pytest.raises(ValueError, match=r"per-seed test mR .* differ from the stored summary"):
        seed_table_markdown(tampered)


def test_load_tables_finds_every_summary(tmp_path) -> None:
    for name in ("b", "a"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(json.dumps({"name": name}))
    (tmp_path / "no_summary").mkdir()
    assert list(load_tables(tmp_path)) == ["a", "b"]
    assert load_tables(tmp_path, ["b"]) == {"b": {"name": "b"}}


def test_provenance_and_paired_markdown(entries) -> None:
    record = {
        "command": "experiments/seeds_table.py --seeds 0 1 2",
        "commit": "abc",
        "date": "2026-01-01",
        "hardware": {
            "cpu": "EPYC",
            "cpu_count": 2,
            "torch_threads": 2,
            "torch": "2",
            "device": "cpu",
        },
        "entries": [{**e, "train_commit": "abc"} for e in entries],
    }
    lines = provenance_lines(record)
    assert lines[0] == "command : experiments/seeds_table.py --seeds 0 1 2"
    assert lines[2] == "trained : commit abc"
    assert lines[3] == "hardware: EPYC, 2 cores, 2 torch threads, torch 2, cpu"
    assert lines[4] == "x_baseline -> x: loss.w_itm: 0 -> 1.0"
    rows = paired_differences_markdown(group_by_config(record)).splitlines()
    assert rows[2] == "| x − x_baseline, none | 3 | +10.67 ± 1.15 | +10.00, +10.00, +12.00 |"
    assert rows[3] == "| x − x_baseline, smr | 2 | +7.50 ± 0.71 | +8.00, +7.00 |"
    assert "| x_baseline: smr − none | 3 | +3.00 ± 1.00 | +2.00, +3.00, +4.00 |" in rows
    assert not any("x_baseline: itm+smr" in r for r in rows)  # no such column for the baseline


def test_targets_are_means_of_paired_differences(entries) -> None:
    groups = {"x_baseline": entries[:3], "x": entries[3:]}
    assert check_targets("t", groups, ["other"]) == []  # only the configs asked for
    gain, smr = check_targets("t", groups, ["x"], gain=10.0, smr_gain=1.0)
    assert gain.differences == (10.0, 10.0, 12.0) and gain.met
    assert smr.differences == (0.0, 0.0) and not smr.met
    assert str(gain).endswith("+10.67 mR over 3 seeds (target +10): met")
    assert str(smr).endswith("+0.00 mR over 2 seeds (target +1): missed by 1.00")


def test_val_curve_reads_validations_of_a_log(tmp_path) -> None:
    assert val_curve(tmp_path) == []  # no log
    log = [
        {"kind": "train", "epoch": 0, "step": 1, "loss": 1.0},
        {"kind": "val", "epoch": 0, "step": 3, "r_mean": 12.5, "txt_r1": 1.0},
        {"kind": "val", "epoch": 1, "step": 6, "r_mean": 14.0},
    ]
    text = "\n".join(json.dumps(r) for r in log) + '\n{"kind": "val", "epo'  # a torn last line
    (tmp_path / "train_log.jsonl").write_text(text)
    assert val_curve(tmp_path) == [
        {"epoch": 0, "step": 3, "r_mean": 12.5},
        {"epoch": 1, "step": 6, "r_mean": 14.0},
    ]


def test_paired_interval_is_the_t_interval_over_seeds():
    from cmpagl.report import PairedInterval

    iv = PairedInterval((1.0, 2.0, 3.0))  # mean 2, sd 1, n 3: 2 ± 4.303 / √3
    assert iv.mean == 2.0 and iv.half_width == pytest.approx(4.303 / 3**0.5, rel=1e-4)
    assert not iv.resolved and "holds 0" in iv.verdict()
    assert iv.describe() == "+2.00 [-0.48, +4.48]"
    tight = PairedInterval((1.0, 1.1, 0.9))
    assert tight.resolved and tight.verdict() == "resolved: higher"
    assert PairedInterval((-1.0, -1.1, -0.9)).verdict() == "resolved: lower"
    one = PairedInterval((5.0,))
    assert one.half_width is None and not one.resolved and "1 seed" in one.describe()


def test_seeds_to_resolve_keeps_the_mean_and_spread_and_asks_the_t_interval():
    """Mean 1, sd 1: t(n - 1) / √n first drops below 1 at n = 7 (2.447 / √7 = 0.925; at n = 6
    2.571 / √6 = 1.050); an interval that is already resolved needs no more seeds than it has."""
    from cmpagl.report import PairedInterval

    iv = PairedInterval((2.0, 0.0, 1.0))
    assert not iv.resolved and iv.seeds_to_resolve() == 7
    assert iv.seeds_to_resolve(limit=6) is None
    # with 7 seeds of that mean and spread, the interval does exclude 0
    seven = PairedInterval((1.0, 1.0, 1.0, 1.0, 1.0, 1.0 + 3**0.5, 1.0 - 3**0.5))  # sd 1
    assert statistics.stdev(seven.differences) == pytest.approx(1.0) and seven.resolved
    assert PairedInterval((1.0, 1.1, 0.9)).seeds_to_resolve() == 2
    assert PairedInterval((0.1, -0.1)).seeds_to_resolve() is None  # mean 0: never
    assert PairedInterval((5.0,)).seeds_to_resolve() is None


def test_t_quantiles_match_scipy():
    stats = pytest.importorskip("scipy.stats", reason="scipy is not installed (optional here)")
    from cmpagl.report import _T975

    for df, t in enumerate(_T975, start=1):
        assert t == pytest.approx(stats.t.ppf(0.975, df), abs=5e-4), df


def test_settings_text_writes_what_validation_chose():
    smr = {
        "source": "val grid search",
        "params": {"tau_s": 0.002, "k": 50, "lam": 2.0},
        "on_edge": {"tau_s": True, "k": True, "lam": False},
    }
    assert settings_text(smr) == "τ_s 0.002*, k 50*, λ 2"
    assert settings_text({**smr, "itm_k": 16}) == "ITM k 16; τ_s 0.002*, k 50*, λ 2"
    fixed = {"source": "config", "params": {"tau": 0.01}, "on_edge": None}
    assert settings_text(fixed) == "τ 0.01 (fixed)"
    assert settings_text({"source": "val grid search", "params": None}) == "off (no gain on val)"
    assert settings_text(None) == ""
