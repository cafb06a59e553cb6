"""Sweeps: every (variant, seed) of a YAML spec, each one training run executed as the training
notebook (``notebooks/05_train.ipynb``) by papermill, resumable across sessions and machines.

    cmpagl sweep experiments/sweeps/ucm_ablations.yaml     # or: python -m cmpagl.experiments
    cmpagl sweep SPEC.yaml --dry-run                       # the runs and the state of each
    cmpagl sweep SPEC.yaml --table                         # the tables again, from the records
    cmpagl sweep SPEC.yaml --seeds 1 --only cmpagl         # a part (another machine, say)
    cmpagl sweep SPEC.yaml --commit                        # git-commit each run's record
    OMP_NUM_THREADS=1 cmpagl sweep SPEC.yaml &             # twice: two runners share the runs
    cmpagl sweep SPEC.yaml -p rerankers '[none, smr]'      # a notebook parameter for every run

A spec (relative paths are read from the repository root)::

    name: ucm_ablations                 # default: the file's stem
    config: configs/ucm_cpu.yaml        # every variant's base config
    overrides: [train.log_every=20]     # for every variant, before the variant's own
    seeds: [0, 1, 2]
    budget: {epochs: 10}                # and/or max_steps; absent or 0: the config's
    rerankers: []                       # empty: all (the ITM ones only where ITM was trained)
    split: test                         # or val: a tuning sweep, which never reads the test split
    tuned_by: experiments/sweeps/ucm_tuning.yaml   # where `tuned` variants take their settings
    reference: cmpagl                   # paired.md compares every variant with it (default: first)
    out: runs/sweeps/ucm_ablations      # default runs/sweeps/<name>
    results: results                    # records go to <results>/<name>/
    notebook: notebooks/05_train.ipynb
    parameters: {}                      # further notebook parameters for every run
    retries: 1                          # a failed run is tried this many more times
    variants:
      cmpagl: []                        # a list of overrides
      no_global: [model.gswin.global_mode=off]
      baseline: {config: configs/ucm_cpu_baseline.yaml}   # another base config
      tuned_cmpagl: {tuned: cmpagl, overrides: [loss.w_tri=0]}  # the best trial's settings first
      longer: {budget: {epochs: 20}}    # its own budget
      headline: {seeds: [0, 1, 2, 3, 4]}  # its own seeds (more where 3 do not resolve it)

Tuning: in a ``split: val`` sweep each variant belongs to a ``group`` (default: its name), one
system's trials. Another sweep's variant with ``tuned: <group>`` trains with that group's best
trial on validation (mean over seeds, the earliest listed on a tie): the trial's overrides go
before the variant's own. The tuning sweep must be finished first; the choice is written under
the table. A record made with other overrides than the run now has (the tuning chose again) is
not reused: that run is done again.

Each (variant, seed) runs in ``<out>/<variant>/seed<k>/``: its checkpoints, log, evaluation and
the executed notebook, the run's browsable report. Only small files go to
``<results>/<name>/``: one JSON record per run (``<variant>/seed<k>.json``), ``runs.csv`` (one
row per run), ``table.md`` (mean ± std over seeds per variant) and ``paired.md`` (differences
paired by seed with 95 % confidence intervals: every variant against the reference, every
re-ranker against none).

Resuming: a run whose record says ``ok`` is skipped, so committed records carry a sweep to
another machine. A run interrupted mid-way has no record; it is executed again and the notebook
continues from its checkpoint. A failed run is tried again (``retries``), then recorded as
failed, shown in the table and listed at the end, and the command exits with status 1; the next
invocation tries it again.

The book reads a finished (or unfinished) study back with :mod:`cmpagl.study`.

``--commit`` commits the sweep's results folder to git after every run (that folder only,
whatever else is staged or changed), so that a machine lost half-way through a long sweep loses
at most the run in progress.

Several runners on one sweep: a runner claims a run before it executes it (a lock file in the
run's folder, :data:`CLAIM_FILE`, held for the run's whole execution and dropped by the kernel
when the runner dies), and passes over runs claimed by another runner, or where another process
trains by hand. So ``cmpagl sweep SPEC`` started N times on one machine runs N runs at a time,
each exactly once; give each runner its share of the cores (``OMP_NUM_THREADS``). Before each run
a runner reads every record again, so its tables include the other runners' runs.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import difflib
import io
import json
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from cmpagl.config import ConfigError, _read_yaml_mapping, _yaml_load, from_dict
from cmpagl.fileio import atomic_write_text
from cmpagl.lock import RunFolderInUse, read_lock, run_lock
from cmpagl.report import KEYS, mean_sd
from cmpagl.runs import RESULT_FILE, portable_path, resolve_path

__all__ = [
    "DEFAULT_NOTEBOOK",
    "Run",
    "SweepReport",
    "SweepSpec",
    "Variant",
    "check_parameters",
    "load_spec",
    "main",
    "paired_markdown",
    "resolve_tuning",
    "run_parameters",
    "run_sweep",
    "tuning_choices",
]

DEFAULT_NOTEBOOK = "notebooks/05_train.ipynb"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")  # a folder name on every system


# ----------------------------------------------------------------------------------------------
# The spec
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Budget:
    """Training budget of every run; 0 keeps the config's value."""

    epochs: int = 0
    max_steps: int = 0


@dataclass
class _SpecFields:
    """The typed keys of a spec file (``variants`` and ``parameters`` are read separately)."""

    config: str
    name: str = ""
    notebook: str = DEFAULT_NOTEBOOK
    overrides: tuple[str, ...] = ()
    seeds: tuple[int, ...] = (0,)
    budget: Budget = field(default_factory=Budget)
    rerankers: tuple[str, ...] = ()
    split: str = "test"
    tuned_by: str = ""
    reference: str = ""
    out: str = ""
    results: str = "results"
    retries: int = 1


@dataclass(frozen=True)
class Variant:
    """A named variant: its base config and its overrides (after the spec's own).

    ``group`` names the system a tuning sweep's trial belongs to (default: the variant's name);
    ``tuned`` the tuning group whose best trial on validation supplies overrides that go before
    the variant's own (see :func:`resolve_tuning`).
    """

    name: str
    config: Path
    overrides: tuple[str, ...]
    group: str = ""
    tuned: str = ""
    budget: Budget | None = None  # None: the spec's
    seeds: tuple[int, ...] = ()  # empty: the spec's


@dataclass(frozen=True)
class Run:
    """One (variant, seed): where it trains and where its record goes."""

    variant: Variant
    seed: int
    run_dir: Path
    record_path: Path
    notebook_path: Path

    @property
    def label(self) -> str:
        return f"{self.variant.name} seed {self.seed}"


@dataclass
class SweepSpec:
    """A loaded, checked spec (see the module docstring for the file format)."""

    name: str
    path: Path
    notebook: Path
    variants: tuple[Variant, ...]
    seeds: tuple[int, ...]
    budget: Budget
    overrides: tuple[str, ...]
    rerankers: tuple[str, ...]
    out: Path
    results: Path
    parameters: dict[str, Any]
    retries: int
    split: str = "test"
    tuned_by: Path | None = None
    reference: str = ""  # the variant others are compared with, seed by seed (default: first)

    def variant_seeds(self, variant: Variant) -> tuple[int, ...]:
        """The seeds ``variant`` runs: its own where it names them, else the spec's."""
        return variant.seeds or self.seeds

    def all_seeds(self) -> tuple[int, ...]:
        """The spec's seeds, then the further ones that some variants name, in order."""
        return tuple(dict.fromkeys([*self.seeds, *(s for v in self.variants for s in v.seeds)]))

    def runs(self) -> list[Run]:
        """Every (variant, seed), seed by seed: a sweep stopped half-way has whole seeds of
        every variant to compare rather than every seed of a few variants. Seeds that only
        some variants name come after the spec's."""
        return [
            Run(
                v,
                seed,
                self.out / v.name / f"seed{seed}",
                self.results / v.name / f"seed{seed}.json",
                self.out / v.name / f"seed{seed}" / self.notebook.name,
            )
            for seed in self.all_seeds()
            for v in self.variants
            if seed in self.variant_seeds(v)
        ]


def _spec_error(path: Path, key: str, message: str) -> ConfigError:
    return ConfigError(f"{path}: {key}: {message}", key=key, source=str(path))


_VARIANT_KEYS = ("config", "overrides", "group", "tuned", "budget", "seeds")


def _read_variants(path: Path, raw: Any, base: Path) -> tuple[Variant, ...]:
    """``variants:`` -> Variants; each a list of overrides or ``{config, overrides}``."""
    if not isinstance(raw, Mapping) or not raw:
        raise _spec_error(path, "variants", "expected a mapping of name -> list of overrides")
    out = []
    for name, value in raw.items():
        key = f"variants.{name}"
        if not isinstance(name, str) or not _NAME.match(name):
            raise _spec_error(path, key, "a name of letters, digits and _ . + - (a folder name)")
        config, overrides = base, value if value is not None else []
        group, tuned, budget, seeds = name, "", None, ()
        if isinstance(value, Mapping):
            unknown = sorted(set(value) - set(_VARIANT_KEYS))
            if unknown:
                close = difflib.get_close_matches(str(unknown[0]), _VARIANT_KEYS, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise _spec_error(
                    path,
                    key,
                    f"unknown key(s) {unknown}{hint}; known: {', '.join(_VARIANT_KEYS)}",
                )
            config = resolve_path(value.get("config") or base)
            overrides = value.get("overrides") or []
            group, tuned = str(value.get("group") or name), str(value.get("tuned") or "")
            if value.get("budget") is not None:
                budget = from_dict(Budget, value["budget"], f"{path}: {key}.budget")
                if min(budget.epochs, budget.max_steps) < 0:
                    raise _spec_error(path, f"{key}.budget", "epochs and max_steps must be >= 0")
            if value.get("seeds") is not None:
                seeds = _read_seeds(path, f"{key}.seeds", value["seeds"])
        if not isinstance(overrides, list) or not all(
            isinstance(o, str) and "=" in o for o in overrides
        ):
            raise _spec_error(path, key, f"expected a list of key=value strings, got {value!r}")
        if not config.is_file():
            raise _spec_error(path, key, f"config file {config} not found")
        out.append(Variant(name, config, tuple(overrides), group, tuned, budget, seeds))
    return tuple(out)


def _read_seeds(path: Path, key: str, raw: Any) -> tuple[int, ...]:
    """A non-empty list of distinct integer seeds."""
    ok = isinstance(raw, list) and all(isinstance(s, int) and not isinstance(s, bool) for s in raw)
    if not ok or not raw or len(set(raw)) != len(raw):
        raise _spec_error(path, key, f"expected a list of distinct integer seeds, got {raw!r}")
    return tuple(raw)


def load_spec(path: str | Path) -> SweepSpec:
    """Read and check a sweep spec.

    Raises:
        ConfigError: a YAML error, an unknown or mistyped key (with the closest valid one), a
            missing config or notebook, a bad variant, no seeds or repeated ones, a negative
            budget, an unknown re-ranker.
    """
    path = Path(path)
    if not path.is_absolute() and not path.exists():  # from a notebook's folder, say
        path = resolve_path(path)
    data = _read_yaml_mapping(path, None)
    raw_variants = data.pop("variants", None)
    parameters = data.pop("parameters", None) or {}
    fields = from_dict(_SpecFields, data, str(path))
    base = resolve_path(fields.config)
    if not base.is_file():
        raise _spec_error(path, "config", f"config file {base} not found")
    name = fields.name or path.stem
    if not _NAME.match(name):
        raise _spec_error(path, "name", f"{name!r} is not a folder name")
    variants = _read_variants(path, raw_variants, base)
    notebook = resolve_path(fields.notebook)
    if not notebook.is_file():
        raise _spec_error(path, "notebook", f"{notebook} not found")
    _read_seeds(path, "seeds", list(fields.seeds))
    if min(fields.budget.epochs, fields.budget.max_steps, fields.retries) < 0:
        raise _spec_error(path, "budget", "epochs, max_steps and retries must be >= 0")
    if fields.rerankers:
        from cmpagl.evaluate import RERANKERS  # torch: only when the spec names re-rankers

        unknown = [r for r in fields.rerankers if r not in RERANKERS]
        if unknown:
            raise _spec_error(path, "rerankers", f"unknown {unknown}; known: {list(RERANKERS)}")
    if fields.split not in ("test", "val"):
        raise _spec_error(
            path, "split", f"'test', or 'val' for a tuning sweep; got {fields.split!r}"
        )
    tuned = sorted({v.tuned for v in variants if v.tuned})
    if tuned and not fields.tuned_by:
        raise _spec_error(
            path, "tuned_by", f"variants take tuned settings of {tuned}: name the tuning sweep"
        )
    tuned_by = resolve_path(fields.tuned_by) if fields.tuned_by else None
    if fields.reference and fields.reference not in {v.name for v in variants}:
        raise _spec_error(path, "reference", f"no variant {fields.reference!r}")
    if tuned_by is not None and not tuned_by.is_file():
        raise _spec_error(path, "tuned_by", f"tuning sweep {tuned_by} not found")
    if not isinstance(parameters, Mapping):
        raise _spec_error(path, "parameters", "expected a mapping of notebook parameters")
    return SweepSpec(
        name=name,
        path=path,
        notebook=notebook,
        variants=variants,
        seeds=fields.seeds,
        budget=fields.budget,
        overrides=fields.overrides,
        rerankers=fields.rerankers,
        out=resolve_path(fields.out or f"runs/sweeps/{name}"),
        results=resolve_path(fields.results) / name,
        parameters=dict(parameters),
        retries=fields.retries,
        split=fields.split,
        tuned_by=tuned_by,
        reference=fields.reference or variants[0].name,
    )


# ----------------------------------------------------------------------------------------------
# Tuning: a sweep on the validation split chooses each system's settings for another sweep
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TuningChoice:
    """A tuning group's best trial: the variant with the highest mean validation mR over its
    seeds (the earliest listed on a tie), its own overrides, and how many trials competed."""

    group: str
    variant: str
    config: Path
    overrides: tuple[str, ...]
    val_r_mean: float
    trials: int

    def describe(self) -> str:
        settings = " ".join(self.overrides) or "the config's own settings"
        return (
            f"{self.group}: {self.variant} ({settings}), val mR {self.val_r_mean:.2f}, "
            f"best of {self.trials} trials"
        )


def tuning_choices(tuning: SweepSpec) -> dict[str, TuningChoice]:
    """Each group's best trial in a finished tuning sweep (``split: val``), read from its records.

    Raises:
        ConfigError: the sweep evaluates the test split (tuning must not read it), or not every
            run has an ``ok`` record (with the command that finishes it).
    """
    if tuning.split != "val":
        raise ConfigError(
            f"{tuning.path}: a tuning sweep must have split: val (never the test split)"
        )
    runs = tuning.runs()
    records = [read_record(run) for run in runs]
    missing = [run.label for run, rec in zip(runs, records, strict=True) if _status(rec) != "ok"]
    if missing:
        raise ConfigError(
            f"the tuning sweep {tuning.name} is not finished ({len(runs) - len(missing)} of "
            f"{len(runs)} runs ok; not yet: {', '.join(missing)}): run "
            f"`cmpagl sweep {portable_path(tuning.path)}` first"
        )
    scores: dict[Variant, list[float]] = {}
    for run, rec in zip(runs, records, strict=True):
        scores.setdefault(run.variant, []).append(rec["training"]["best_val_r_mean"])
    choices: dict[str, TuningChoice] = {}
    for variant, values in scores.items():  # in the spec's order: a tie keeps the earlier one
        mean = sum(values) / len(values)
        best = choices.get(variant.group)
        trials = (best.trials if best else 0) + 1
        if best is None or mean > best.val_r_mean:
            best = TuningChoice(
                variant.group, variant.name, variant.config, variant.overrides, mean, trials
            )
        choices[variant.group] = replace(best, trials=trials)
    return choices


def resolve_tuning(spec: SweepSpec) -> tuple[SweepSpec, dict[str, TuningChoice]]:
    """``spec`` with every ``tuned`` variant's overrides preceded by its group's best trial in
    the ``tuned_by`` sweep (unchanged without one); and the choices used.

    Raises:
        ConfigError: the tuning sweep is unfinished (see :func:`tuning_choices`), has no such
            group, or tuned that group on another base config than the variant's.
    """
    if spec.tuned_by is None:
        return spec, {}
    choices = tuning_choices(load_spec(spec.tuned_by))
    variants = []
    for v in spec.variants:
        if v.tuned:
            choice = choices.get(v.tuned)
            if choice is None:
                raise ConfigError(
                    f"{spec.path}: variants.{v.name}: the tuning sweep has no group {v.tuned!r}; "
                    f"its groups: {', '.join(choices)}"
                )
            if choice.config != v.config:
                raise ConfigError(
                    f"{spec.path}: variants.{v.name}: tuned on {portable_path(choice.config)}, "
                    f"but the variant trains {portable_path(v.config)}"
                )
            v = replace(v, overrides=(*choice.overrides, *v.overrides))
        variants.append(v)
    used = {k: c for k, c in choices.items() if any(v.tuned == k for v in spec.variants)}
    return replace(spec, variants=tuple(variants)), used


# ----------------------------------------------------------------------------------------------
# Notebook parameters
# ----------------------------------------------------------------------------------------------
_TYPES: dict[str, tuple[type, ...]] = {
    "int": (int,),
    "float": (int, float),
    "str": (str,),
    "bool": (bool,),
    "list": (list, tuple),
    "dict": (dict,),
}


def _type_ok(type_name: str, value: Any) -> bool:
    """Whether ``value`` fits a parameter's annotation (``int``, ``list[str]``, ...); a type
    this check does not know passes."""
    types = _TYPES.get(type_name.split("[")[0].strip())
    if types is None:
        return True
    if isinstance(value, bool) and bool not in types:  # True is an int to Python, not here
        return False
    return isinstance(value, types)


def check_parameters(notebook: str | Path, parameters: Mapping[str, Any]) -> None:
    """Check parameter names and types against the notebook's ``parameters`` cell.

    papermill itself only warns about a parameter the notebook does not declare, and the run
    then goes on with the default: a sweep of ``sed`` instead of ``seed`` would train every
    run with seed 0. Here it is an error before anything runs.

    Raises:
        ConfigError: an undeclared name (with the closest declared one) or a value of another
            type than the annotation (``seed: int`` given ``"one"``).
    """
    import papermill as pm

    declared = pm.inspect_notebook(str(notebook))
    unknown = [k for k in parameters if k not in declared]
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(k, list(declared), n=1)
            hints.append(f"'{k}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
        raise ConfigError(
            f"{Path(notebook).name} has no parameter {', '.join(hints)}; "
            f"its parameters: {', '.join(declared)}",
            key=unknown[0],
            source=str(notebook),
        )
    for k, value in parameters.items():
        type_name = declared[k]["inferred_type_name"]
        if not _type_ok(type_name, value):
            raise ConfigError(
                f"{Path(notebook).name}: parameter '{k}' is {type_name}, got {value!r}",
                key=k,
                source=str(notebook),
            )


def run_parameters(spec: SweepSpec, run: Run, extra: Mapping[str, Any] = ()) -> dict[str, Any]:
    """The notebook parameters of one run: the spec's, then ``extra`` (the command line's)."""
    budget = run.variant.budget or spec.budget
    return {
        "config": str(run.variant.config),
        "overrides": [*spec.overrides, *run.variant.overrides],
        "seed": run.seed,
        "output_dir": str(run.run_dir),
        "epochs": budget.epochs,
        "max_steps": budget.max_steps,
        "log_every": 0,  # the config's (the notebook's default is for its own short demo)
        "rerankers": list(spec.rerankers),
        "split": spec.split,
        **spec.parameters,
        **dict(extra),
    }


# ----------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------
def read_record(run: Run) -> dict[str, Any] | None:
    """A run's record, or None (none yet, or unreadable: the run is then done again)."""
    try:
        return json.loads(run.record_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _describe_error(err: BaseException) -> str:
    """One line: the exception a notebook cell raised (papermill keeps its name and value)."""
    from papermill.exceptions import PapermillExecutionError

    if isinstance(err, PapermillExecutionError):
        return f"{err.ename}: {err.evalue} (cell {err.exec_count})"
    return f"{type(err).__name__}: {err}"


def _execute(spec: SweepSpec, run: Run, params: Mapping[str, Any]) -> dict[str, Any]:
    """Execute the notebook for one run; the ``result.json`` it wrote."""
    import papermill as pm

    from cmpagl.notebook_engine import CurveKernelManager

    run.run_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    pm.execute_notebook(
        str(spec.notebook),
        str(run.notebook_path),
        parameters=dict(params),
        kernel_name="python3",
        cwd=str(spec.notebook.parent),
        progress_bar=False,
        log_output=False,
        kernel_manager_class=CurveKernelManager,  # no unencrypted-TCP warning per run
    )
    result = run.run_dir / RESULT_FILE
    if not result.is_file() or result.stat().st_mtime < started - 1:
        raise RuntimeError(f"the notebook ran but wrote no {RESULT_FILE}")
    return json.loads(result.read_text(encoding="utf-8"))


def _attempt(
    spec: SweepSpec, run: Run, params: Mapping[str, Any], log: Callable[[str], None]
) -> dict[str, Any]:
    """Execute a run, retried ``spec.retries`` times; write and return its record."""
    tries = 1 + spec.retries
    head = {
        "sweep": spec.name,
        "variant": run.variant.name,
        "seed": run.seed,
        "notebook": portable_path(run.notebook_path),
        "run_dir": portable_path(run.run_dir),
    }
    error = ""
    for attempt in range(1, tries + 1):
        t0 = time.perf_counter()
        try:
            result = _execute(spec, run, params)
        except Exception as err:  # a failing run is reported, never the end of the sweep
            error = _describe_error(err)
            again = "; trying again" if attempt < tries else ""
            log(f"FAILED {run.label} (attempt {attempt} of {tries}): {error}{again}")
            continue
        record = {**head, **result, "status": "ok", "attempts": attempt}
        record["run_wall_s"] = time.perf_counter() - t0
        atomic_write_text(run.record_path, json.dumps(record, indent=1) + "\n")
        mr = ", ".join(f"{r} {m['r_mean']:.2f}" for r, m in _metrics(record).items())
        log(f"ok     {run.label}: {spec.split} mR {mr} ({record['run_wall_s']:.0f} s)")
        return record
    record = {
        **head,
        "status": "failed",
        "attempts": tries,
        "error": error,
        "config": portable_path(run.variant.config),
        "overrides": list(params.get("overrides", [])),
    }
    atomic_write_text(run.record_path, json.dumps(record, indent=1) + "\n")
    return record


@dataclass
class SweepReport:
    """What a sweep invocation found and did; ``records[i]`` belongs to ``runs[i]`` (None: not
    run yet)."""

    spec: SweepSpec
    runs: list[Run]
    records: list[dict[str, Any] | None]
    executed: int = 0
    tuning: dict[str, TuningChoice] = field(default_factory=dict)
    #: why the tuned settings are not known yet (a dry run before the tuning sweep finished)
    tuning_pending: str = ""

    def _pairs(self, status: str) -> list[tuple[Run, dict[str, Any]]]:
        return [
            (r, rec)
            for r, rec in zip(self.runs, self.records, strict=True)
            if _status(rec) == status
        ]

    def with_status(self, status: str) -> list[Run]:
        return [r for r, _ in self._pairs(status)]

    def finished(self) -> list[tuple[Run, dict[str, Any]]]:
        """(run, record) of every run whose record says ``ok``, in the spec's order."""
        return self._pairs("ok")


def _current(record: dict[str, Any] | None, params: Mapping[str, Any]) -> dict[str, Any] | None:
    """A record, or None where it was made with other overrides than the run now has (the
    tuning sweep chose again, or the spec changed): such a run is done again."""
    if record is not None and "overrides" in record:
        have, want = list(record["overrides"]), list(params["overrides"])
        # the notebook puts its own log_every override first: compare the runner's part
        if have[len(have) - len(want) :] != want or len(have) > len(want) + 1:
            return None
    return record


def _status(record: Mapping[str, Any] | None) -> str:
    return "pending" if record is None else str(record.get("status", "failed"))


def run_sweep(
    spec: SweepSpec,
    extra: Mapping[str, Any] = (),
    *,
    only: Sequence[str] = (),
    seeds: Sequence[int] = (),
    dry_run: bool = False,
    commit: bool = False,
    log: Callable[[str], None] | None = None,
) -> SweepReport:
    """Run every (variant, seed) of ``spec`` that has no ``ok`` record and that no other
    process holds (another runner of this sweep, a training by hand); write the tables.

    Args:
        extra: notebook parameters for every run, over the spec's (the command line's ``-p``).
        only, seeds: run only these variants / seeds (empty: all); the table covers all.
        dry_run: check everything, run nothing.
        commit: after every run, :func:`commit_results` (records, tables) to git.
        log: where a line per run goes (default: above the progress bar).

    Raises:
        ConfigError: a parameter the notebook does not declare or of the wrong type, or an
            ``only``/``seeds`` entry the spec does not have; raised before anything runs.
    """
    from tqdm.auto import tqdm

    pending = ""
    try:
        spec, tuning = resolve_tuning(spec)
    except ConfigError as err:
        if not dry_run or "is not finished" not in str(err):
            raise
        tuning, pending = {}, str(err)
    runs = spec.runs()
    unknown = [v for v in only if v not in {r.variant.name for r in runs}]
    unknown += [s for s in seeds if s not in spec.all_seeds()]
    if unknown:
        raise ConfigError(f"{spec.path}: no variant or seed {unknown} in this sweep")
    params = {run: run_parameters(spec, run, extra) for run in runs}
    check_parameters(spec.notebook, params[runs[0]])  # every run has the same names and types
    records = [_current(read_record(run), params[run]) for run in runs]
    report = SweepReport(spec, runs, records, tuning=tuning, tuning_pending=pending)
    selected = [
        i
        for i, run in enumerate(runs)
        if (not only or run.variant.name in only) and (not seeds or run.seed in seeds)
    ]
    todo = [i for i in selected if _status(records[i]) != "ok"]
    if dry_run:
        return report
    bar = tqdm(  # over the selected runs: --only/--seeds leave the others out of the count
        total=len(selected),
        initial=len(selected) - len(todo),
        unit="run",
        desc=spec.name,
        dynamic_ncols=True,
        file=sys.stderr,
        # the time left comes from the records (time_left), not from this call's rate: a resumed
        # sweep has none yet, and a baseline run is twice as fast as a CMPAGL one
        bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]",
    )
    log = log or bar.write
    retry = {i for i in todo if records[i] is not None}  # failed before this call: once more
    tried: set[int] = set()  # done by this call (a run failed now waits for the next call)
    passed: set[int] = set()  # held elsewhere when this call came to them (said once each)

    def refresh() -> None:
        """Re-read every record but this call's own: other runners' land while a run trains,
        and the tables cover every run of the spec, selected by this call or not."""
        for j, run in enumerate(runs):
            if j not in tried:
                records[j] = _current(read_record(run), params[run])

    try:
        while True:
            refresh()
            bar.n = sum(_status(records[j]) == "ok" for j in selected)
            bar.refresh()
            todo = [
                i
                for i in selected
                if i not in tried
                and (records[i] is None or (_status(records[i]) != "ok" and i in retry))
            ]
            done = None
            for i in todo:
                with _claim(runs[i]) as holder:
                    if holder:
                        retry.discard(i)  # its holder tries it: a failure is not retried here
                        if i not in passed:
                            passed.add(i)
                            log(f"passed {runs[i].label}: held by {holder}")
                        continue
                    # finished by another runner between the read above and the claim?
                    records[i] = _current(read_record(runs[i]), params[runs[i]])
                    if _status(records[i]) != "ok":
                        left = _left_text(time_left(report, todo), _other_runners(runs, todo))
                        bar.set_postfix_str(runs[i].label + left)
                        records[i] = _attempt(spec, runs[i], params[runs[i]], log)
                        report.executed += 1
                done = i
                break
            if done is None:  # nothing left, or everything left is held elsewhere
                break
            tried.add(done)
            refresh()
            write_tables(report)  # after every run: an interrupted sweep keeps its table
            if commit:
                commit_results(spec, f"{runs[done].label}: {_status(records[done])}", log)
    finally:
        bar.close()
    elsewhere = [runs[i].label for i in sorted(passed) if _status(records[i]) == "pending"]
    if elsewhere:
        log(f"still held elsewhere, not run by this call: {', '.join(elsewhere)}")
    write_tables(report)  # the records as the loop's last refresh() read them
    return report


#: The lock file in a run's folder by which a sweep runner claims that run while executing it.
CLAIM_FILE = ".cmpagl-sweep.lock"


@contextlib.contextmanager
def _claim(run: Run) -> Iterator[str]:
    """Hold ``run``'s claim for the block and yield ``""``; or, where another process holds the
    run, yield who: another sweep runner (its claim) or a training started by hand in that
    folder (the training lock of :mod:`cmpagl.lock`)."""
    trainer = read_lock(run.run_dir)
    if trainer is not None and trainer.alive():
        yield f"a training in its folder ({trainer.describe()})"
        return
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(run_lock(run.run_dir, name=CLAIM_FILE))
        except RunFolderInUse:
            owner = read_lock(run.run_dir, CLAIM_FILE)
            yield "another sweep runner" + (f" ({owner.describe()})" if owner else "")
            return
        yield ""


def _other_runners(runs: Sequence[Run], todo: Sequence[int]) -> int:
    """How many other live processes hold a claim on one of the runs ``todo``."""
    owners = {read_lock(runs[i].run_dir, CLAIM_FILE) for i in todo}
    return sum(1 for o in owners if o is not None and o.alive() and not o.is_this_process())


def _left_text(left: float | None, others: int) -> str:
    """``; ≈ 1 h 05 min left`` (shared between the runners where there are others)."""
    if left is None:
        return ""
    if not others:
        return f"; ≈ {_duration(left)} left"
    return f"; ≈ {_duration(left / (others + 1))} left with {others + 1} runners"


def _whole_run_s(record: Mapping[str, Any]) -> float:
    """A finished run's wall time: this call's (``run_wall_s``), or its training time summed
    over every attempt where that is longer (a run resumed from its checkpoint)."""
    training = record.get("training") or {}
    return max(float(record.get("run_wall_s") or 0), float(training.get("wall_time_s") or 0))


def time_left(report: SweepReport, todo: Sequence[int]) -> float | None:
    """Seconds the runs ``todo`` (indices into ``report.runs``) will take, from the finished
    runs' wall times: each takes as long as its variant's latest finished run (by the record's
    ``created`` time: the machine a sweep now runs on, not the ones it ran on before), or the
    latest of all where its variant has none yet; None before any run has finished."""
    finished = sorted(report.finished(), key=lambda pair: str(pair[1].get("created", "")))
    timed = [(run.variant.name, _whole_run_s(rec)) for run, rec in finished]
    timed = [(name, s) for name, s in timed if s > 0]
    if not timed:
        return None
    latest = dict(timed)  # the last one of each variant wins
    return sum(latest.get(report.runs[i].variant.name, timed[-1][1]) for i in todo)


def _duration(seconds: float) -> str:
    """``2 h 05 min`` or ``14 min``."""
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min"


_GIT_TRIES = 5  # commit_results' tries while another git process holds the index


def commit_results(spec: SweepSpec, what: str, log: Callable[[str], None] = print) -> bool:
    """``git add`` and ``git commit`` the sweep's results folder, and nothing else.

    The commit names the sweep and ``what`` (e.g. ``"cmpagl seed 1: ok"``). Other changes in
    the working tree and the index are left as they are. Where the folder is not in a git
    repository, nothing changed, or git fails, one line says so and the sweep goes on: the next
    run's commit includes this run's files. Where another git process holds the index (a second
    runner committing its run), it waits a moment and tries again, up to five times.

    Returns:
        Whether a commit was made.
    """
    folder = spec.results
    message = f"Sweep {spec.name}: {what}"
    for attempt in range(_GIT_TRIES):
        try:
            return _commit_folder(folder, message, log)
        except (OSError, subprocess.CalledProcessError) as err:
            detail = (getattr(err, "stderr", None) or str(err)).strip().splitlines()
            held = [line for line in detail if "index.lock" in line]
            if held and attempt + 1 < _GIT_TRIES:  # another git process holds the index: wait
                time.sleep(0.5 * (attempt + 1))
                continue
            why = (held or detail or [str(err)])[-1]  # git's last line says only "remove it"
            log(f"commit skipped ({portable_path(folder)}): {why}")
            return False
    return False


def _commit_folder(folder: Path, message: str, log: Callable[[str], None]) -> bool:
    """One try of :func:`commit_results` (git's errors raised)."""
    subprocess.run(
        ["git", "add", "--", "."], cwd=folder, check=True, capture_output=True, text=True
    )
    staged = subprocess.run(
        ["git", "diff", "--cached", "--quiet", "--", "."], cwd=folder, capture_output=True
    )
    if staged.returncode == 0:
        log(f"commit: nothing new in {portable_path(folder)}")
        return False
    subprocess.run(
        ["git", "commit", "-q", "-m", message, "--", "."],
        cwd=folder,
        check=True,
        capture_output=True,
        text=True,
    )
    log(f"committed {portable_path(folder)}: {message}")
    return True


# ----------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------
def _metrics(record: Mapping[str, Any]) -> dict[str, Any]:
    """A record's metrics per re-ranker on the split it was evaluated on (test, or val when
    tuning)."""
    return record.get(record.get("split", "test"), {})


def _rerankers(records: Sequence[Mapping[str, Any] | None]) -> list[str]:
    """Re-rankers in the order the records list them (the evaluator's order)."""
    return list(dict.fromkeys(r for rec in records if rec for r in _metrics(rec)))


def _settings(value: Any) -> str:
    return "no re-ranking" if value is None else json.dumps(value, sort_keys=True)


def csv_rows(report: SweepReport) -> list[dict[str, Any]]:
    """One row per run (pending and failed ones too): what ran, the validation score that
    selected the checkpoint, the test metrics and chosen settings of every re-ranker, cost,
    device and commit."""
    rerankers = _rerankers(report.records)
    rows = []
    for run, rec in zip(report.runs, report.records, strict=True):
        rec = rec or {}
        training = rec.get("training") or {}
        row: dict[str, Any] = {
            "variant": run.variant.name,
            "config": portable_path(run.variant.config),
            "overrides": " ".join([*report.spec.overrides, *run.variant.overrides]),
            "seed": run.seed,
            "status": _status(rec or None),
            "attempts": rec.get("attempts", ""),
            "steps": training.get("steps", ""),
            "best_val_r_mean": training.get("best_val_r_mean", ""),
            "best_step": training.get("best_step", ""),
            "split": report.spec.split,  # the split of the metric columns below
        }
        test, choices = _metrics(rec), rec.get("choices", {})
        for r in rerankers:
            row.update({f"{r}.{k}": test.get(r, {}).get(k, "") for k in KEYS})
            row[f"{r}.settings"] = _settings(choices[r]) if r in choices else ""
        row.update(
            {
                "wall_time_s": training.get("wall_time_s", ""),
                "samples_per_s": training.get("samples_per_s", ""),
                "device": rec.get("device", ""),
                "commit": rec.get("git_commit", ""),
                "train_commit": training.get("train_commit", ""),
                "notebook": rec.get("notebook", portable_path(run.notebook_path)),
                "error": rec.get("error", ""),
            }
        )
        rows.append(row)
    return rows


def table_markdown(report: SweepReport) -> str:
    """Per variant: runs ok / all, mean ± std over seeds of the test mR (a tuning sweep: the
    val mR) of each re-ranker and of the validation mR that selected the checkpoints; a
    variant with one finished seed shows its value alone (one seed has no spread)."""
    rerankers = _rerankers(report.records)
    split = report.spec.split
    lines = [
        f"{split.capitalize()} mR per re-ranker (mean ± std over the finished seeds), and the "
        "validation mR that selected each run's checkpoint:",
        "",
        "| variant | ok | " + "".join(f"{r} | " for r in rerankers) + "val mR (selection) |",
        "|---" * (3 + len(rerankers)) + "|",
    ]
    for v in report.spec.variants:
        recs = [rec for run, rec in report.finished() if run.variant == v]
        n = sum(run.variant == v for run in report.runs)

        def cell(values: list[float]) -> str:
            if len(values) == 1:
                return f"{values[0]:.2f}"
            return mean_sd(values) if values else "–"

        cells = [
            cell([_metrics(rec)[r]["r_mean"] for rec in recs if r in _metrics(rec)])
            for r in rerankers
        ]
        val = [rec["training"]["best_val_r_mean"] for rec in recs]
        lines.append(
            f"| {v.name} | {len(recs)}/{n} | "
            + "".join(f"{c} | " for c in cells)
            + f"{cell(val)} |"
        )
    if report.tuning:
        lines += ["", f"Settings tuned on the validation split by {report.spec.tuned_by.stem}:"]
        lines += [f"- {c.describe()}" for c in report.tuning.values()]
    return "\n".join(lines)


def _by_variant(report: SweepReport) -> dict[str, dict[int, dict[str, Any]]]:
    """variant -> seed -> metrics per re-ranker, of the ``ok`` records."""
    out: dict[str, dict[int, dict[str, Any]]] = {v.name: {} for v in report.spec.variants}
    for run, rec in report.finished():
        out[run.variant.name][run.seed] = _metrics(rec)
    return out


def _interval(a: Mapping[int, dict], b: Mapping[int, dict], r_a: str, r_b: str):
    """b's mR (re-ranker r_b) − a's (r_a), paired by seed over the seeds both have; None if
    none."""
    from cmpagl.report import PairedInterval

    seeds = sorted(s for s in a.keys() & b.keys() if r_a in a[s] and r_b in b[s])
    if not seeds:
        return None
    return PairedInterval(tuple(b[s][r_b]["r_mean"] - a[s][r_a]["r_mean"] for s in seeds))


def paired_markdown(report: SweepReport) -> str:
    """Differences in test mR paired by seed, with 95 % confidence intervals (t over seeds):
    each variant against the spec's reference variant (no re-ranking, and SMR), and within each
    variant what every re-ranker adds over none. An interval marked * excludes 0 (resolved)."""
    by_variant = _by_variant(report)
    rerankers = _rerankers(report.records)
    if not rerankers:
        return "No finished runs yet: nothing to compare."
    ref_name = report.spec.reference
    ref = by_variant.get(ref_name, {})

    def cell(iv) -> str:
        if iv is None:
            return "–"
        return iv.value() + (" *" if iv.resolved else "") + f" (n={iv.n})"

    compared = [r for r in ("none", "smr") if r in rerankers]
    lines = [
        f"Each variant minus {ref_name}, seed by seed (test mR; mean [95 % CI]; "
        "* the interval excludes 0; n=1: one seed, no interval yet):",
        "",
        "| variant | " + " | ".join(f"{r}" for r in compared) + " |",
        "|---" * (1 + len(compared)) + "|",
    ]
    for name, seeds in by_variant.items():
        if name != ref_name:
            lines.append(
                f"| {name} | "
                + " | ".join(cell(_interval(ref, seeds, r, r)) for r in compared)
                + " |"
            )
    others = [r for r in rerankers if r != "none"]
    lines += [
        "",
        "Each re-ranker minus no re-ranking, within a variant, seed by seed (test mR):",
        "",
        "| variant | " + " | ".join(others) + " |",
        "|---" * (1 + len(others)) + "|",
    ]
    for name, seeds in by_variant.items():
        lines.append(
            f"| {name} | "
            + " | ".join(cell(_interval(seeds, seeds, "none", r)) for r in others)
            + " |"
        )
    return "\n".join(lines)


def write_tables(report: SweepReport) -> bool:
    """``runs.csv``, ``table.md`` and (test sweeps) ``paired.md`` in the sweep's results folder,
    atomically; False, writing nothing, where no run has a record yet (an empty table would only
    hide that the sweep has not started)."""
    if all(rec is None for rec in report.records):
        return False
    rows = csv_rows(report)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(report.spec.results / "runs.csv", buf.getvalue())
    atomic_write_text(report.spec.results / "table.md", table_markdown(report) + "\n")
    if report.spec.split == "test":
        atomic_write_text(report.spec.results / "paired.md", paired_markdown(report) + "\n")
    return True


def summary_text(report: SweepReport) -> str:
    """What the command prints at the end: counts, the table, every failure, where files are."""
    counts = {s: len(report.with_status(s)) for s in ("ok", "failed", "pending")}
    lines = [
        f"sweep {report.spec.name}: {len(report.runs)} runs, {counts['ok']} ok, "
        f"{counts['failed']} failed, {counts['pending']} not run; {report.executed} executed now",
        table_markdown(report),
    ]
    for run, rec in zip(report.runs, report.records, strict=True):
        if _status(rec) == "failed":
            lines.append(
                f"FAILED {run.label} after {rec.get('attempts')} attempt(s): {rec.get('error')}"
                f"\n       see {rec.get('notebook')}"
            )
    lines.append(f"records and runs.csv: {portable_path(report.spec.results)}")
    return "\n".join(lines)


def plan_text(report: SweepReport) -> str:
    """``--dry-run``: every run with its state."""
    lines = [f"sweep {report.spec.name} ({report.spec.path}): {len(report.runs)} runs"]
    if report.tuning_pending:
        lines.append(f"  tuned settings not known yet: {report.tuning_pending}")
    lines += [f"  tuned: {c.describe()}" for c in report.tuning.values()]
    todo = [i for i, rec in enumerate(report.records) if _status(rec) != "ok"]
    left = time_left(report, todo)
    if todo and left is not None:
        others = _other_runners(report.runs, todo)
        share = f" shared by {others + 1} runners" if others else ""
        lines.append(
            f"  {len(todo)} runs to go, ≈ {_duration(left / (others + 1))}{share} (each run as"
            " long as its variant's latest finished run)"
        )
    for run, rec in zip(report.runs, report.records, strict=True):
        status = _status(rec)
        claim = read_lock(run.run_dir, CLAIM_FILE) if status == "pending" else None
        if claim is not None and claim.alive():
            status = f"running in a sweep runner ({claim.describe()})"
        elif status == "pending" and (run.run_dir / "last").is_dir():
            owner = read_lock(run.run_dir)
            status = (
                f"training now ({owner.describe()})"
                if owner is not None and owner.alive()
                else "started, not finished (resumes from its checkpoint)"
            )
        overrides = " ".join([*report.spec.overrides, *run.variant.overrides]) or "-"
        lines.append(
            f"  {run.label:<28} {status:<10} {portable_path(run.variant.config)} {overrides}"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    """The sweep command's arguments (shared by ``cmpagl sweep`` and ``python -m``)."""
    p.add_argument("spec", nargs="+", help="sweep spec YAML file(s) (experiments/sweeps/*.yaml)")
    p.add_argument(
        "-p",
        "--parameter",
        nargs=2,
        action="append",
        default=[],
        metavar=("NAME", "VALUE"),
        help="a notebook parameter for every run, VALUE read as YAML (repeatable)",
    )
    p.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="VARIANT",
        help="run only this variant (repeatable; the runs keep the spec's order)",
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[], help="run only these seeds")
    p.add_argument("--dry-run", action="store_true", help="list the runs and their state")
    p.add_argument(
        "--commit",
        action="store_true",
        help="after every run, git-commit the sweep's results folder (only it)",
    )
    p.add_argument(
        "--table",
        action="store_true",
        help="run nothing: write the tables (runs.csv, table.md, paired.md) from the records",
    )


def run_from_args(args: argparse.Namespace) -> int:
    """Load every spec (all checked before anything runs), run them; 1 if any run failed."""
    extra = {name: _yaml_load(value) for name, value in args.parameter}
    specs = [load_spec(path) for path in args.spec]
    status = 0
    for spec in specs:
        quiet = args.dry_run or args.table
        report = run_sweep(
            spec, extra, only=args.only, seeds=args.seeds, dry_run=quiet, commit=args.commit
        )
        if args.dry_run:
            print(plan_text(report))
            continue
        if args.table:
            if not write_tables(report):
                print(
                    f"sweep {spec.name}: no records yet in {portable_path(spec.results)}; no"
                    f" table written (run: cmpagl sweep {portable_path(spec.path)})",
                    flush=True,
                )
                continue
            print(summary_text(report), flush=True)
            if spec.split == "test":
                print(paired_markdown(report), flush=True)
            continue
        print(summary_text(report), flush=True)
        status |= bool(report.with_status("failed"))
    return status


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m cmpagl.experiments", description=__doc__.split("\n\n")[0]
    )
    add_arguments(ap)
    args = ap.parse_args(argv)
    try:
        return run_from_args(args)
    except ConfigError as err:
        print(f"sweep: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
