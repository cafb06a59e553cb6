"""Reading a study back: the tables, intervals and verdicts the book's ablation chapter shows,
computed from a sweep's committed records (:mod:`cmpagl.experiments` runs the sweep and writes
them); nothing here trains or evaluates.

    report = load_report("experiments/sweeps/ucm_ablations.yaml")
    long_table(report)                      # one row per (variant, seed, re-ranker): plots
    paired_interval(report, "baseline", "cmpagl")           # a difference, paired by seed
    claims_markdown(report, [Claim("the global window helps", "cmpagl", "no_global")])
    target_verdict(paired_interval(report, "baseline", "cmpagl"), 5.0)
    budget_markdown(report, ["cmpagl"])     # was the budget long enough?
    compute_markdown(report), machines_lines(report)   # what it cost, and on which machines
    setting_table(report, "loss.lambda_intra", ["add_pool", "lambda_intra_0"])  # a sweep
    grid_edges_markdown(report)             # re-ranker settings chosen at an end of their grid
    grid_widening_markdown(json.load(open("results/decisions/ucm_smr_grid.json")))  # and a wider
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cmpagl.experiments import (
    SweepReport,
    _by_variant,
    _interval,
    _metrics,
    load_spec,
    run_sweep,
)
from cmpagl.report import KEYS, hardware_text

__all__ = [
    "Claim",
    "budget_markdown",
    "claim_verdict",
    "claims_markdown",
    "compute_markdown",
    "findings",
    "grid_edges_markdown",
    "grid_widening_markdown",
    "late_gain",
    "load_report",
    "long_table",
    "machines_lines",
    "paired_interval",
    "setting_table",
    "target_verdict",
]


def load_report(spec_path: str | Path) -> SweepReport:
    """A sweep's spec and committed records, nothing run (a study unfinished, or whose tuning
    is unfinished, reads as far as it goes)."""
    return run_sweep(load_spec(spec_path), dry_run=True)


def long_table(report: SweepReport):
    """One row per (variant, seed, re-ranker) of the ``ok`` records: a pandas DataFrame with
    ``variant``, ``seed``, ``reranker``, the metric columns (:data:`cmpagl.report.KEYS`) and
    ``val_r_mean`` (the score that selected the checkpoint); for plots and custom tables."""
    import pandas as pd

    rows = []
    for run, rec in report.finished():
        for r, m in _metrics(rec).items():
            rows.append(
                {
                    "variant": run.variant.name,
                    "seed": run.seed,
                    "reranker": r,
                    **{k: m.get(k) for k in KEYS},
                    "val_r_mean": rec["training"]["best_val_r_mean"],
                }
            )
    columns = ["variant", "seed", "reranker", *KEYS, "val_r_mean"]
    return pd.DataFrame(rows, columns=columns)


def setting_table(report: SweepReport, key: str, variants: Sequence[str], reranker: str = "none"):
    """Test mR against one setting swept by ``variants``: a pandas DataFrame with ``variant``,
    ``seed``, ``value`` (the dotted ``key``, e.g. ``loss.lambda_intra``, as the run's resolved
    config holds it) and ``r_mean`` (re-ranker ``reranker``), one row per finished run, sorted
    by value then seed; for plotting a sweep such as λ_intra's.

    Raises:
        KeyError: a record's resolved config has no ``key``.
    """
    import pandas as pd

    wanted = set(variants)
    rows = []
    for run, rec in report.finished():
        if run.variant.name not in wanted or reranker not in _metrics(rec):
            continue
        value: Any = rec.get("config_resolved", {})
        for part in key.split("."):
            if not isinstance(value, Mapping) or part not in value:
                raise KeyError(f"{run.record_path}: its resolved config has no {key!r}")
            value = value[part]
        rows.append(
            {
                "variant": run.variant.name,
                "seed": run.seed,
                "value": value,
                "r_mean": _metrics(rec)[reranker]["r_mean"],
            }
        )
    frame = pd.DataFrame(rows, columns=["variant", "seed", "value", "r_mean"])
    return frame.sort_values(["value", "seed"], ignore_index=True)


def paired_interval(report: SweepReport, a: str, b: str, r_a: str = "none", r_b: str = "none"):
    """Test mR of variant ``b`` (re-ranker ``r_b``) minus variant ``a`` (``r_a``), paired by
    seed over the seeds both finished, as a :class:`cmpagl.report.PairedInterval`; None if
    they share no seed."""
    by_variant = _by_variant(report)
    return _interval(by_variant.get(a, {}), by_variant.get(b, {}), r_a, r_b)


def findings(
    report: SweepReport, labels: Mapping[str, str] = (), reranker: str = "none"
) -> list[str]:
    """A sentence per variant: its test mR minus the reference's, seed by seed, with the 95 %
    interval and whether it is resolved; ``labels`` names what each variant changes."""
    by_variant = _by_variant(report)
    ref = by_variant.get(report.spec.reference, {})
    labels = dict(labels)
    out = []
    for name, seeds in by_variant.items():
        if name == report.spec.reference:
            continue
        what = labels.get(name, name)
        iv = _interval(ref, seeds, reranker, reranker)
        if iv is None:
            out.append(f"{what}: no finished seed pairs yet.")
            continue
        if iv.half_width is None:
            out.append(
                f"{what}: {iv.value()} mR against {report.spec.reference} with one seed "
                f"({reranker}); no interval yet."
            )
            continue
        plan, limit = "", 30
        if not iv.resolved:
            need = iv.seeds_to_resolve(limit)
            plan = (
                f"; at this mean and spread about {need} seeds would resolve it"
                if need
                else f"; at this mean and spread not even {limit} seeds would resolve it"
            )
        out.append(
            f"{what}: {iv.describe()} mR against {report.spec.reference} over {iv.n} "
            f"seeds ({reranker}); {iv.verdict()}{plan}."
        )
    return out


@dataclass(frozen=True)
class Claim:
    """A claim the study tests: ``higher`` (re-ranker ``r_higher``) scores above ``lower``
    (``r_lower``) in test mR. A part of the method helps when the full model is ``higher``
    than the row without it; a re-ranker helps when the full model with it is ``higher`` than
    without."""

    text: str
    higher: str
    lower: str
    r_higher: str = "none"
    r_lower: str = "none"

    def evidence(self) -> str:
        return f"{self.higher} ({self.r_higher}) − {self.lower} ({self.r_lower})"


def claim_verdict(interval) -> str:
    """``supported`` / ``contradicted`` (the 95 % interval of higher − lower excludes 0 on
    that side), ``not resolved`` (it holds 0), or why there is no interval yet."""
    if interval is None:
        return "no finished seed pairs yet"
    if interval.half_width is None:
        return "undecided: one seed, no interval"
    if not interval.resolved:
        return "not resolved: the interval holds 0"
    return "supported" if interval.mean > 0 else "contradicted"


def target_verdict(interval, target: float, signed: bool = True) -> str:
    """How a measured mean (a :class:`cmpagl.report.PairedInterval`: of paired differences, or
    of test mR values with ``signed=False``) stands against the value we set for it, in words:
    met where the whole 95 % interval is at or above it, met on the mean where only the mean
    is, else missed (by how much, and whether the interval still reaches it); one seed has no
    interval."""
    goal = f"(target {target:{'+' if signed else ''}g})"
    if interval is None:
        return f"no finished {'seed pairs' if signed else 'run'} yet {goal}"
    mean, half, shown = interval.mean, interval.half_width, interval.value(signed)
    if half is None:
        side = "above" if mean >= target else "below"
        return f"{shown} with one seed {goal}: {side} it, no interval yet"
    head = f"{shown} over {interval.n} seeds {goal}: "
    if mean - half >= target:
        return head + "met, the whole interval at or above it"
    if mean >= target:
        return head + "met on the mean; the interval reaches below it"
    reach = "; the interval reaches it" if mean + half >= target else ""
    return head + f"missed by {target - mean:.2f}{reach}"


def claims_markdown(report: SweepReport, claims: Sequence[Claim]) -> str:
    """A Markdown table: each claim, the paired difference that tests it (mean and 95 %
    interval over the seeds both sides finished) and its verdict (:func:`claim_verdict`)."""
    lines = [
        "| claim | measured as | difference in test mR | seeds | verdict |",
        "|---|---|---|---|---|",
    ]
    for c in claims:
        iv = paired_interval(report, c.lower, c.higher, c.r_lower, c.r_higher)
        diff, n = ("–", 0) if iv is None else (iv.value(), iv.n)
        lines.append(f"| {c.text} | {c.evidence()} | {diff} | {n} | {claim_verdict(iv)} |")
    return "\n".join(lines)


def compute_markdown(report: SweepReport) -> str:
    """A Markdown table of the compute the finished runs took, per variant and in total:
    training wall-clock hours (summed over a run's attempts, as its training log counts them),
    mean training samples/s, and the devices they ran on (with the processor model and the
    torch threads a run had, where its record says: runners side by side share the cores, and
    a study resumed on other machines can mix machines of different speed)."""
    per: dict[str, dict[str, Any]] = {}
    for run, rec in report.finished():
        row = per.setdefault(run.variant.name, {"runs": 0, "s": 0.0, "rates": [], "dev": set()})
        training = rec.get("training", {})
        row["runs"] += 1
        row["s"] += float(training.get("wall_time_s") or 0.0)
        if training.get("samples_per_s"):
            row["rates"].append(float(training["samples_per_s"]))
        hardware = rec.get("hardware") or {}
        threads, cpu = hardware.get("torch_threads"), hardware.get("cpu")
        device = str(rec.get("device", "?"))
        if cpu and device == "cpu":
            device = f"cpu ({cpu})"
        row["dev"].add(f"{device}, {threads} thread{'s' * (threads != 1)}" if threads else device)
    lines = [
        "| variant | finished runs | training hours | samples/s (mean) | device |",
        "|---|---|---|---|---|",
    ]
    for name, row in per.items():
        rate = f"{sum(row['rates']) / len(row['rates']):.2f}" if row["rates"] else "–"
        dev = "; ".join(sorted(row["dev"]))
        lines.append(f"| {name} | {row['runs']} | {row['s'] / 3600:.2f} | {rate} | {dev} |")
    runs, hours = sum(r["runs"] for r in per.values()), sum(r["s"] for r in per.values()) / 3600
    lines.append(f"| **total** | {runs} of {len(report.runs)} | {hours:.2f} | | |")
    return "\n".join(lines)


def machines_lines(report: SweepReport) -> list[str]:
    """A line per machine the finished runs trained on, as their records name it: processor,
    cores, torch threads and torch version, with how many runs each; records that do not name
    the processor are counted on one line of their own, last."""
    counts: Counter[str] = Counter()
    for _, rec in report.finished():
        h = rec.get("hardware") or {}
        counts[f"{h['cpu']}: {hardware_text(h)}" if h.get("cpu") else ""] += 1
    unnamed = counts.pop("", 0)
    lines = [f"{machine} ({n} run{'s' * (n != 1)})" for machine, n in sorted(counts.items())]
    if unnamed:
        lines.append(f"{unnamed} run{'s' * (unnamed != 1)} without a record of the processor")
    return lines


def grid_edges_markdown(report: SweepReport) -> str:
    """A Markdown table: per re-ranker, in how many finished runs its settings (chosen on
    validation from a grid) had a value at the smallest or largest end of its grid, where the
    best setting may lie outside the grid, and which settings; runs where "no re-ranking" won on
    validation, and records made before runs kept this (no ``on_edge``), counted apart."""
    from cmpagl.report import SETTING_SYMBOLS

    rows: dict[str, dict[str, Any]] = {}
    for _, rec in report.finished():
        for name, params in (rec.get("choices") or {}).items():
            row = rows.setdefault(
                name, {"runs": 0, "edge": 0, "off": 0, "unknown": 0, "axes": Counter()}
            )
            row["runs"] += 1
            if params is None:
                row["off"] += 1
            elif "on_edge" not in rec:
                row["unknown"] += 1
            else:
                axes = [a for a, on in (rec["on_edge"].get(name) or {}).items() if on]
                row["edge"] += bool(axes)
                row["axes"].update(axes)
    lines = [
        "| re-ranker | runs | a setting at an end of its grid | which (runs) "
        "| no gain on validation | not recorded |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        which = ", ".join(f"{SETTING_SYMBOLS.get(a, a)} {n}" for a, n in row["axes"].items())
        lines.append(
            f"| {name} | {row['runs']} | {row['edge']} | {which or '–'} | {row['off']} "
            f"| {row['unknown']} |"
        )
    return "\n".join(lines)


def grid_widening_markdown(record: Mapping[str, Any]) -> str:
    """A Markdown table from the record of ``experiments/smr_evidence.py grid``: per checkpoint,
    SMR's best validation mR (and the k it chose) from today's grids and from wider ones, and
    the two-fold cross-fit within val of each; then a line with the mean differences."""
    lines = [
        "| run | val mR, none | SMR, today's grids (k) | SMR, wider grids (k) "
        "| held-out halves: none | today's | wider |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in record["runs"]:
        d, w = r["default"], r["wide"]
        cells = [
            f"{v['val_value']:.2f} ({'off' if v['params'] is None else v['params']['k']})"
            for v in (d, w)
        ]
        name = "/".join(Path(r["checkpoint"]).parts[-2:])
        fits = [d["cross_fit"]["none"], d["cross_fit"]["chosen"], w["cross_fit"]["chosen"]]
        lines.append(
            f"| {name} | {d['val_off_value']:.2f} | {cells[0]} | {cells[1]} | "
            + " | ".join(f"{v:.2f}" for v in fits)
            + " |"
        )
    val, fit = record["wide_minus_default_val"], record["wide_minus_default_cross_fit"]
    lines += [
        "",
        f"Wider minus today's grids over {len(val)} checkpoints, mean (range): "
        f"{statistics.fmean(val):+.2f} ({min(val):+.2f} to {max(val):+.2f}) validation mR "
        "chosen and scored on the same split; "
        f"{statistics.fmean(fit):+.2f} ({min(fit):+.2f} to {max(fit):+.2f}) in the cross-fit.",
    ]
    return "\n".join(lines)


def late_gain(curve: Sequence[Mapping[str, Any]], tail: float = 0.3) -> float | None:
    """How much a run still improved at the end of its budget: the best validation mR among the
    evaluations in the last ``tail`` of the steps minus the best one before them (a
    ``val_curve`` of a record: dicts with ``step`` and ``r_mean``). Positive where the last
    stretch found a better checkpoint than anything earlier; None where either side is empty."""
    if not curve:
        return None
    cut = (1.0 - tail) * max(v["step"] for v in curve)
    before = [v["r_mean"] for v in curve if v["step"] <= cut]
    after = [v["r_mean"] for v in curve if v["step"] > cut]
    return max(after) - max(before) if before and after else None


def budget_markdown(report: SweepReport, variants: Sequence[str], tail: float = 0.3) -> str:
    """A Markdown table, one row per finished (variant, seed) of ``variants``, in that order:
    the steps trained, the best validation mR and the step it came at, and :func:`late_gain`
    (what the last ``tail`` of the steps added over the best before them)."""
    lines = [
        f"| variant | seed | steps | best validation mR | at step | gain in the last "
        f"{tail * 100:g} % of the steps |",
        "|---|---|---|---|---|---|",
    ]
    shown = [(run, rec) for run, rec in report.finished() if run.variant.name in variants]
    shown.sort(key=lambda pair: (list(variants).index(pair[0].variant.name), pair[0].seed))
    for run, rec in shown:
        curve, training = rec.get("val_curve") or [], rec["training"]
        gain = late_gain(curve, tail)
        lines.append(
            f"| {run.variant.name} | {run.seed} | {training.get('steps', '–')} | "
            f"{training['best_val_r_mean']:.2f} | {training.get('best_step', '–')} | "
            + ("–" if gain is None else f"{gain:+.2f}")
            + " |"
        )
    return "\n".join(lines)
