"""Seeds tables: mean ± std over seeds, differences paired by seed, and the Markdown the book
shows (METHOD.md §4: every result over ≥ 3 seeds, selected on validation, tested once).

``experiments/seeds_table.py`` trains and evaluates every (config, seed) and writes a
``summary.json`` with :func:`summarize`; ``notebooks/04_seed_tables.ipynb`` reads those files
back with :func:`load_tables` and shows them with the other functions here. An *entry* is one
(config, seed) run as ``seeds_table.py`` records it: ``config``, ``seed``, ``test`` (re-ranker ->
metrics), ``best_val_r_mean``, ``wall_time_s``, ``samples_per_s``, ``oracle_r_mean``,
``config_resolved`` and, in a summary file, ``val_curve`` and ``train_commit``.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "KEYS",
    "PairedInterval",
    "RERANKERS",
    "TargetCheck",
    "check_targets",
    "config_diff",
    "flatten",
    "group_by_config",
    "load_tables",
    "mean_sd",
    "paired",
    "paired_differences_markdown",
    "provenance_lines",
    "seed_table_markdown",
    "settings_text",
    "summarize",
    "val_curve",
]

#: The retrieval metrics a table entry keeps per re-ranker (R@K both ways and their mean).
KEYS = ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean")
#: The re-rankers a seeds table evaluates, in column order.
RERANKERS = ("none", "itm", "smr", "itm+smr")

Entry = Mapping[str, Any]

#: How the book writes the re-rankers' settings (keys of ``tuning[name]["params"]``).
SETTING_SYMBOLS = {
    "tau_s": "τ_s",
    "lam": "λ",
    "tau": "τ",
    "itm_k": "k",
    "wp1": "w_p1",
    "wp2": "w_p2",
}


def settings_text(tuning: Mapping[str, Any] | None) -> str:
    """One re-ranker's chosen settings as the book writes them, from its entry in an
    evaluation's ``tuning`` (:func:`cmpagl.evaluate.evaluate_model`): ``"τ_s 0.002*, k 50*,
    λ 2"``, where * marks a value on the edge of its validation grid; ``"off (no gain on val)"``
    when no setting beat no re-ranking on validation; ``" (fixed)"`` appended for settings taken
    from the config rather than searched; ``"ITM k 16; "`` first for ITM + SMR. ``""`` for None
    (no re-ranker, or nothing recorded).
    """
    if tuning is None:
        return ""
    if tuning.get("params") is None:
        return "off (no gain on val)"
    edge = tuning.get("on_edge") or {}

    def value(key: str, v: Any) -> str:
        text = f"{v:g}" if isinstance(v, float) else str(v)
        return SETTING_SYMBOLS.get(key, key) + " " + text + ("*" if edge.get(key) else "")

    text = ", ".join(value(k, v) for k, v in tuning["params"].items())
    if tuning.get("itm_k") is not None:
        text = f"ITM k {tuning['itm_k']}; " + text
    return text + (" (fixed)" if tuning.get("source") == "config" else "")


def mean_sd(values: Sequence[float], digits: int = 2, signed: bool = False) -> str:
    """``"12.34 ± 0.56"``: the mean and the sample standard deviation (0 for one value)."""
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    sign = "+" if signed else ""
    return f"{statistics.mean(values):{sign}.{digits}f} ± {sd:.{digits}f}"


def flatten(d: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``{"a": {"b": 1}}`` -> ``("a.b", 1)``: dotted keys of a nested mapping (a resolved
    config), leaves in order."""
    for k, v in d.items():
        if isinstance(v, Mapping):
            yield from flatten(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def config_diff(
    a: Mapping[str, Any], b: Mapping[str, Any], ignore: Sequence[str] = ("seed", "output_dir")
) -> list[str]:
    """``"key: a -> b"`` for every dotted key of resolved config ``b`` whose value differs from
    ``a``'s (``None`` where ``a`` lacks it), in ``b``'s order; ``ignore`` lists keys that differ
    between any two runs."""
    ref = dict(flatten(a))
    return [
        f"{k}: {ref.get(k)} -> {v}" for k, v in flatten(b) if ref.get(k) != v and k not in ignore
    ]


def paired(es_a: Sequence[Entry], es_b: Sequence[Entry], r_a: str, r_b: str) -> list[float]:
    """Test mR of (``es_b``, re-ranker ``r_b``) minus (``es_a``, ``r_a``), seed by seed, for
    the seeds both have (in seed order). Seed ``s`` of two configs sees the same data order,
    so the difference within a seed removes the spread that the seeds share."""
    a = {e["seed"]: e["test"][r_a]["r_mean"] for e in es_a if r_a in e["test"]}
    b = {e["seed"]: e["test"][r_b]["r_mean"] for e in es_b if r_b in e["test"]}
    return [b[s] - a[s] for s in sorted(a.keys() & b.keys())]


def val_curve(run_dir: str | Path) -> list[dict[str, Any]]:
    """(epoch, step, val r_mean) of every validation in a run's log, in order; ``[]`` without
    a log."""
    from cmpagl.runlog import read_log  # torch: only for reading a run, not a summary

    log = Path(run_dir) / "train_log.jsonl"
    if not log.is_file():
        return []
    return [
        {"epoch": r["epoch"], "step": r["step"], "r_mean": r["r_mean"]}
        for r in read_log(log)
        if r.get("kind") == "val"
    ]


def _shown_rerankers(es: Sequence[Entry]) -> list[str]:
    """Re-rankers every entry of a config has; no ITM ones for a model trained without ITM (an
    entry of an older run may hold ITM columns of a baseline)."""
    used = [r for r in RERANKERS if all(r in e["test"] for e in es)]
    loss = es[0]["config_resolved"]["loss"]
    if "w_itm" in loss and not loss["w_itm"]:
        used = [r for r in used if "itm" not in r]
    return used


def summarize(entries: Sequence[Entry]) -> tuple[dict[str, Any], str]:
    """Per config (in first-seen order): mean, std and values of the test mR per re-ranker,
    the mean of every metric, the val mR, wall times and throughputs; and the Markdown table
    ``seeds_table.py`` prints and writes to ``summary.md``.

    Returns:
        ``(summary, markdown)``; ``summary[config]`` is what ``summary.json`` stores under
        ``configs``.
    """
    by_config: dict[str, list[Entry]] = {}
    for e in entries:
        by_config.setdefault(e["config"], []).append(e)
    summary: dict[str, Any] = {}
    lines = [
        "| config | seeds | "
        + " | ".join(f"mR {r}" for r in RERANKERS)
        + " | val mR | wall time (s) | samples/s |",
        "|---" * (5 + len(RERANKERS)) + "|",
    ]
    for config, es in by_config.items():
        used = _shown_rerankers(es)
        row = {r: [e["test"][r]["r_mean"] for e in es] for r in used}
        summary[config] = {
            "seeds": [e["seed"] for e in es],
            "test_r_mean": {
                r: {
                    "mean": statistics.mean(v),
                    "std": statistics.stdev(v) if len(v) > 1 else 0.0,
                    "values": v,
                }
                for r, v in row.items()
            },
            "test_metrics_mean": {
                r: {k: statistics.mean(e["test"][r][k] for e in es) for k in KEYS} for r in used
            },
            "val_r_mean": [e["best_val_r_mean"] for e in es],
            "wall_time_s": [e["wall_time_s"] for e in es],
            "samples_per_s": [e["samples_per_s"] for e in es],
            "oracle_r_mean": es[0]["oracle_r_mean"],
        }
        lines.append(
            f"| {Path(config).stem} | {len(es)} | "
            + " | ".join(mean_sd(row[r]) if r in row else "–" for r in RERANKERS)
            + f" | {mean_sd([e['best_val_r_mean'] for e in es])}"
            + f" | {statistics.mean(e['wall_time_s'] for e in es):.0f}"
            + f" | {statistics.mean(e['samples_per_s'] for e in es):.1f} |"
        )
    return summary, "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Reading summaries back (the book)
# ---------------------------------------------------------------------------------------------
def load_tables(results_dir: str | Path, names: Sequence[str] = ()) -> dict[str, dict]:
    """``{folder name: summary.json content}`` of ``results_dir/<name>/summary.json``; all
    folders holding one (sorted) when ``names`` is empty."""
    root = Path(results_dir)
    names = list(names) or sorted(p.parent.name for p in root.glob("*/summary.json"))
    return {name: json.loads((root / name / "summary.json").read_text()) for name in names}


def group_by_config(record: Mapping[str, Any]) -> dict[str, list[Entry]]:
    """A summary's entries by config file stem (``configs/ucm_cpu.yaml`` -> ``ucm_cpu``), each
    list in the order the entries were written (seed order)."""
    groups: dict[str, list[Entry]] = {}
    for e in record["entries"]:
        groups.setdefault(Path(e["config"]).stem, []).append(e)
    return groups


def hardware_text(hw: Mapping[str, Any]) -> str:
    """A hardware record (:func:`cmpagl.evaluate.hardware_info`) as its cores, torch threads and
    torch version, e.g. ``"2 cores, 1 torch thread, torch 2.14.1"``."""
    threads = hw.get("torch_threads")
    return (
        f"{hw.get('cpu_count')} cores, {threads} torch thread{'s' * (threads != 1)}, "
        f"torch {hw.get('torch')}"
    )


def provenance_lines(record: Mapping[str, Any]) -> list[str]:
    """Where a table's numbers came from: command, commit and date, training commit(s),
    hardware; then, per config after the first, how its resolved config differs from the
    first's."""
    hw = record["hardware"]
    trained = sorted({str(e.get("train_commit")) for e in record["entries"]})
    lines = [
        f"command : {record['command']}",
        f"summary : commit {record['commit']}, {record['date']}",
        f"trained : commit {', '.join(trained)}",
        f"hardware: {hw['cpu']}, {hardware_text(hw)}, {hw['device']}",
    ]
    by_config = group_by_config(record)
    configs = list(by_config)
    ref = by_config[configs[0]][0]["config_resolved"]
    for config in configs[1:]:
        diff = config_diff(ref, by_config[config][0]["config_resolved"])
        lines.append(f"{configs[0]} -> {config}: " + "; ".join(diff))
    return lines


def seed_table_markdown(record: Mapping[str, Any]) -> str:
    """The book's table of one summary: per config, mean ± std over seeds of the test mR per
    re-ranker (– where the summary has none), val mR, wall time and samples/s.

    Each mean and std is recomputed from the per-seed entries, so the stored summary is checked
    against them.

    Raises:
        ValueError: a config's per-seed test mR differs from what its stored summary holds.
    """
    rows = [
        "| config | seeds | "
        + " | ".join(f"test mR {r}" for r in RERANKERS)
        + " | val mR | wall time (s) | samples/s |",
        "|---" * 9 + "|",
    ]
    for config, es in group_by_config(record).items():
        stored = record["configs"][es[0]["config"]]["test_r_mean"]
        cells = []
        for r in RERANKERS:
            if r not in stored:
                cells.append("–")
                continue
            values = [e["test"][r]["r_mean"] for e in es]
            if values != stored[r]["values"]:
                raise ValueError(
                    f"{config}, {r}: per-seed test mR {values} differ from the stored summary "
                    f"{stored[r]['values']}"
                )
            cells.append(mean_sd(values))
        rows.append(
            f"| {config} | {', '.join(str(e['seed']) for e in es)} | "
            + " | ".join(cells)
            + f" | {mean_sd([e['best_val_r_mean'] for e in es])}"
            + f" | {mean_sd([e['wall_time_s'] for e in es], 0)}"
            + f" | {mean_sd([e['samples_per_s'] for e in es], 1)} |"
        )
    return "\n".join(rows)


def _baselines(by_config: Mapping[str, Sequence[Entry]]) -> Iterator[tuple[str, str]]:
    """(baseline, full) config stems: ``X_baseline`` pairs with ``X``."""
    for base in by_config:
        if base.endswith("_baseline"):
            yield base, base.removesuffix("_baseline")


def paired_differences_markdown(by_config: Mapping[str, Sequence[Entry]]) -> str:
    """Differences paired by seed, as a Markdown table: full − baseline (``X`` − ``X_baseline``)
    without re-ranking and with SMR, then what each re-ranker adds over none within a config;
    mean ± std over the seeds and the per-seed values."""
    rows = ["| difference | seeds | mean ± std | per seed |", "|---|---|---|---|"]

    def add(label: str, d: list[float]) -> None:
        if d:
            per_seed = ", ".join(f"{x:+.2f}" for x in d)
            rows.append(f"| {label} | {len(d)} | {mean_sd(d, signed=True)} | {per_seed} |")

    for base, full in _baselines(by_config):
        for r in ("none", "smr"):
            add(f"{full} − {base}, {r}", paired(by_config[base], by_config.get(full, []), r, r))
    for config, es in by_config.items():
        for r in RERANKERS[1:]:
            add(f"{config}: {r} − none", paired(es, es, "none", r))
    return "\n".join(rows)


# Two-sided 95 % quantiles of Student's t, t_{0.975}(df), df = 1..30 (beyond: the normal 1.960,
# less than 2 % below the exact value).
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


def _t975(df: int) -> float:
    """Student's t 0.975 quantile for ``df`` degrees of freedom (the normal's beyond the table)."""
    return _T975[df - 1] if df <= len(_T975) else 1.960


@dataclass(frozen=True)
class PairedInterval:
    """The mean of per-seed differences with its 95 % confidence interval (t over seeds):
    ``mean ± t_{0.975}(n - 1) · sd / √n``; no interval for one seed."""

    differences: tuple[float, ...]

    @property
    def n(self) -> int:
        return len(self.differences)

    @property
    def mean(self) -> float:
        return statistics.mean(self.differences)

    @property
    def half_width(self) -> float | None:
        if self.n < 2:
            return None
        return _t975(self.n - 1) * statistics.stdev(self.differences) / self.n**0.5

    @property
    def resolved(self) -> bool:
        """Whether the interval excludes 0 (never with one seed)."""
        h = self.half_width
        return h is not None and abs(self.mean) > h

    def value(self, signed: bool = True) -> str:
        """``"+1.23 [−0.40, +2.86]"`` (the mean and its interval), or ``"+1.23"`` for one seed;
        ``signed=False`` for values that are not differences (``"22.00 [17.03, 26.97]"``)."""
        f, h = ("+.2f" if signed else ".2f"), self.half_width
        if h is None:
            return f"{self.mean:{f}}"
        return f"{self.mean:{f}} [{self.mean - h:{f}}, {self.mean + h:{f}}]"

    def describe(self) -> str:
        """``"+1.23 [−0.40, +2.86]"``, or ``"+1.23 (1 seed, no interval)"``."""
        return self.value() + (" (1 seed, no interval)" if self.half_width is None else "")

    def seeds_to_resolve(self, limit: int = 30) -> int | None:
        """The fewest seeds whose interval would exclude 0 if more seeds kept today's mean and
        spread of the differences: the smallest ``n`` with ``t_{0.975}(n - 1) · sd / √n <
        |mean|``. A planning figure, not a promise (the mean moves as seeds come in); None with
        one seed or when more than ``limit`` seeds would be needed."""
        if self.n < 2:
            return None
        sd, mean = statistics.stdev(self.differences), abs(self.mean)
        return next((n for n in range(2, limit + 1) if _t975(n - 1) * sd / n**0.5 < mean), None)

    def verdict(self) -> str:
        if self.half_width is None:
            return "not resolved (1 seed)"
        if not self.resolved:
            return "not resolved (the interval holds 0)"
        return "resolved: " + ("higher" if self.mean > 0 else "lower")


@dataclass(frozen=True)
class TargetCheck:
    """One measured target: the mean of per-seed differences against the value it should
    reach."""

    table: str
    label: str
    differences: tuple[float, ...]
    target: float

    @property
    def mean(self) -> float:
        return statistics.mean(self.differences)

    @property
    def met(self) -> bool:
        return self.mean >= self.target

    def __str__(self) -> str:
        verdict = "met" if self.met else f"missed by {self.target - self.mean:.2f}"
        return (
            f"{self.table:<22} {self.label:<22} {self.mean:+6.2f} mR over "
            f"{len(self.differences)} seeds (target +{self.target:.0f}): {verdict}"
        )


def check_targets(
    table: str,
    by_config: Mapping[str, Sequence[Entry]],
    configs: Sequence[str],
    gain: float = 5.0,
    smr_gain: float = 1.0,
) -> list[TargetCheck]:
    """The two targets, for each config of ``configs`` that has its ``_baseline`` in the table:
    full − baseline test mR (no re-ranking) at least ``gain``, and SMR − none within the full
    model at least ``smr_gain``, both as means of per-seed differences."""
    checks = []
    for base, full in _baselines(by_config):
        if full not in by_config or full not in configs:
            continue
        model_gain = paired(by_config[base], by_config[full], "none", "none")
        smr = paired(by_config[full], by_config[full], "none", "smr")
        checks.append(TargetCheck(table, "CMPAGL - baseline", tuple(model_gain), gain))
        checks.append(TargetCheck(table, "SMR - none (CMPAGL)", tuple(smr), smr_gain))
    return checks
