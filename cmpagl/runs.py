"""One training run as ``notebooks/05_train.ipynb`` runs it: plan, train or resume, evaluate the
best checkpoint, write the run's result record, and read its curves back (METHOD.md §4).

The notebook shows the steps; the bookkeeping lives here:

* :func:`plan_run` resolves the config (file, ``--set`` overrides, seed, budget) and looks at the
  run folder: nothing there (``"fresh"``), a checkpoint of this very run to continue
  (``"resume"``), or a run that already spent its budget (``"finished"``). A folder holding a run
  of *another* config is an error, not a silent continuation of the wrong run.
* :func:`train_or_resume` trains (:func:`cmpagl.train.train`), continues from the checkpoint, or
  skips training, and summarises the training from the checkpoint and the log.
* :func:`evaluate_best` evaluates the best-on-validation checkpoint with every re-ranker
  (:func:`cmpagl.evaluate.evaluate_model`), or reads a result file that already answers.
* :func:`write_result` writes ``result.json``: the small record a sweep collects.
* :func:`training_curves` reads ``train_log.jsonl`` into the series the notebook plots.

Relative paths (the config, the run folder, ``data.root``) are read from the repository root,
wherever the notebook's kernel runs, so ``papermill`` works from any folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from cmpagl.config import ConfigError, ExperimentConfig, from_dict, load_config, to_dict
from cmpagl.fileio import atomic_write_text
from cmpagl.lock import run_lock
from cmpagl.paths import REPO_ROOT
from cmpagl.report import flatten

# torch-heavy modules (checkpoint, runlog, train, evaluate) are imported where they are used, so
# that the command line (cmpagl sweep) starts without loading torch

__all__ = [
    "RESULT_FILE",
    "Curves",
    "RunPlan",
    "TrainingSummary",
    "default_output_dir",
    "evaluate_best",
    "load_book_model",
    "plan_run",
    "portable_path",
    "resolve_path",
    "result_record",
    "train_or_resume",
    "training_curves",
    "write_result",
]

#: The run's record, written last: its presence in a run folder means "trained and evaluated".
RESULT_FILE = "result.json"

# Config keys in which a checkpoint may differ from the run asked for and still be that run:
# where files and data live (another machine), threads and workers, how often it logs or
# checkpoints, and the evaluation's settings (they do not touch the weights). Keys ending in
# "." are prefixes.
SAME_RUN_IGNORES: tuple[str, ...] = (
    "output_dir",
    "data.root",
    "data.image_dir",
    "data.num_workers",
    "train.device",
    "train.num_threads",
    "train.log_every",
    "train.checkpoint_every",
    "retrieval.",
)

RunState = Literal["fresh", "resume", "finished"]


@contextlib.contextmanager
def _quiet_imports() -> Iterator[None]:
    """Import the model stack without tqdm.auto's "IProgress not found" warning, which a kernel
    without ipywidgets gets once (huggingface_hub imports tqdm.auto): nothing here draws a
    progress bar in a notebook, and a page shows results, not warnings."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="IProgress not found")
        yield


# ----------------------------------------------------------------------------------------------
# Paths
# ----------------------------------------------------------------------------------------------
def resolve_path(path: str | os.PathLike[str]) -> Path:
    """``path`` itself if absolute, else ``<repository root>/path``."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else REPO_ROOT / path


def portable_path(path: str | os.PathLike[str] | None) -> str | None:
    """``path`` relative to the repository root when it lies inside it (records that are
    committed name no folder of the machine that wrote them), else unchanged."""
    if path is None:
        return None
    with contextlib.suppress(ValueError):
        return str(Path(path).resolve().relative_to(REPO_ROOT.resolve()))
    return str(path)


def _budget_tag(epochs: int, max_steps: int) -> str:
    parts = ([f"ep{epochs}"] if epochs > 0 else []) + ([f"steps{max_steps}"] if max_steps else [])
    return "-".join(parts) or "full"


def default_output_dir(
    config: str | os.PathLike[str], seed: int, epochs: int, max_steps: int
) -> Path:
    """``runs/<config stem>/seed<seed>-<budget>``: a budget of its own gets a folder of its own,
    so a short demonstration never resumes into (or blocks) a full-length run."""
    return REPO_ROOT / "runs" / Path(config).stem / f"seed{seed}-{_budget_tag(epochs, max_steps)}"


# ----------------------------------------------------------------------------------------------
# Planning: the config and what the run folder holds
# ----------------------------------------------------------------------------------------------
@dataclass
class RunPlan:
    """A resolved run: the config to train and the state of its folder.

    ``rerankers`` are the re-rankers :func:`evaluate_best` evaluates, checked before training
    (a misspelled name must not wait for the end of a long run to fail). ``checkpoint`` is the
    folder a resumed run continues from (``last/``, or ``best/`` when a
    crash hit between writing ``best/`` and copying it to ``last/``) and ``checkpoint_step`` its
    optimizer step; both None for a fresh run.
    """

    config_path: Path
    overrides: list[str]
    seed: int
    epochs: int
    max_steps: int
    cfg: ExperimentConfig
    output_dir: Path
    state: RunState
    rerankers: list[str] = field(default_factory=list)
    checkpoint: Path | None = None
    checkpoint_step: int | None = None

    def describe(self) -> str:
        """One line for a reader: what is trained, with which budget, and what happens next."""
        tc = self.cfg.train
        budget = f"{tc.epochs} epochs" + (f", at most {tc.max_steps} steps" if tc.max_steps else "")
        action = {
            "fresh": "a fresh run",
            "resume": f"resuming from step {self.checkpoint_step}",
            "finished": f"finished earlier (step {self.checkpoint_step}): training is skipped",
        }[self.state]
        return f"{self.config_path.name}, seed {self.seed}, {budget}; {action}"


def _json_plain(value: Any) -> Any:
    """What ``value`` reads back as from JSON (tuples become lists), to compare with meta.json."""
    return json.loads(json.dumps(value))


def training_differences(saved: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    """``"key: saved -> wanted"`` for every dotted config key that differs between a
    checkpoint's config and the one asked for, except :data:`SAME_RUN_IGNORES`."""
    a, b = dict(flatten(_json_plain(saved))), dict(flatten(_json_plain(wanted)))

    def ignored(key: str) -> bool:
        return any(key == k or (k.endswith(".") and key.startswith(k)) for k in SAME_RUN_IGNORES)

    keys = list(b) + [k for k in a if k not in b]
    return [
        f"{k}: {a.get(k)} -> {b.get(k)}" for k in keys if a.get(k) != b.get(k) and not ignored(k)
    ]


def _resume_checkpoint(run_dir: Path) -> Path:
    """``last/``; else ``best/`` (written first, so it is the newer one if ``last/`` is lost)."""
    from cmpagl.checkpoint import CheckpointError, find_checkpoint

    try:
        return find_checkpoint(run_dir, prefer="last")
    except CheckpointError:
        return find_checkpoint(run_dir / "best")


def override_list(value: str | Sequence[str]) -> list[str]:
    """Overrides as a list. ``papermill -p overrides ...`` passes a string: a YAML list
    (``"[train.epochs=3, loss.w_tri=0]"``) or one override (``"train.epochs=3"``); ``-y``
    passes the list itself.

    Raises:
        ConfigError: a string that is neither, or a list holding something else than strings.
    """
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return []
        if not text.startswith("["):
            return [text]
        try:
            parsed = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ConfigError(
                f"overrides {value!r}: not a YAML list ({str(err).splitlines()[0]}); "
                "write e.g. [train.epochs=3, loss.w_tri=0]",
                key="overrides",
            ) from None
        value = parsed if isinstance(parsed, list) else [parsed]
    items = list(value)
    bad = [x for x in items if not isinstance(x, str)]
    if bad:
        raise ConfigError(
            f"overrides must be key=value strings, got {bad[0]!r} in {items!r}", key="overrides"
        )
    return items


def plan_run(
    config: str | os.PathLike[str],
    overrides: Sequence[str] = (),
    seed: int = 0,
    output_dir: str | os.PathLike[str] = "",
    epochs: int = 0,
    max_steps: int = 0,
    rerankers: Sequence[str] = (),
) -> RunPlan:
    """Resolve a run and look at its folder.

    Args:
        config: the experiment YAML (relative: from the repository root).
        overrides: ``--set`` style ``key=value`` strings, applied after the file, in order.
        seed: the run's seed.
        output_dir: the run folder; ``""``: :func:`default_output_dir`.
        epochs, max_steps: the budget; 0 keeps the config's ``train.epochs`` /
            ``train.max_steps``.
        rerankers: names from :data:`cmpagl.evaluate.RERANKERS`; empty:
            :func:`default_rerankers`.

    Raises:
        ConfigError: a bad config or override; or the folder holds a checkpoint of another
            config (the message lists the keys that differ).
        CheckpointError: the folder holds checkpoint folders but none is complete.
        ValueError: a negative budget, or an unknown re-ranker.
    """
    if epochs < 0 or max_steps < 0:
        raise ValueError(f"the budget must be >= 0 (0: the config's), got {epochs=}, {max_steps=}")
    overrides = override_list(overrides)
    config_path = resolve_path(config)
    out = (
        resolve_path(output_dir)
        if output_dir
        else default_output_dir(config, seed, epochs, max_steps)
    )
    budget = ([f"train.epochs={epochs}"] if epochs else []) + (
        [f"train.max_steps={max_steps}"] if max_steps else []
    )
    cfg = load_config(config_path, overrides=[*overrides, f"seed={seed}", *budget])
    # Set directly, not as overrides: a path is not parsed as YAML. data.root follows the same
    # rule as every other path here, so the kernel's working folder does not matter.
    cfg.output_dir = str(out)
    cfg.data.root = str(resolve_path(cfg.data.root))
    plan = RunPlan(config_path, list(overrides), seed, epochs, max_steps, cfg, out, "fresh")
    plan.rerankers = _check_rerankers(rerankers) if rerankers else default_rerankers(cfg)
    _inspect_folder(plan)
    return plan


def _with_defaults(saved: Mapping[str, Any]) -> Mapping[str, Any]:
    """A checkpoint's saved config with the defaults of keys added to the config since it was
    written (a key added later keeps the old behaviour as its default), so such a key is not
    taken for a change; the saved mapping as it is where it no longer reads as a config."""
    try:
        return to_dict(from_dict(ExperimentConfig, saved, "the checkpoint's config"))
    except ConfigError:
        return saved


def _inspect_folder(plan: RunPlan) -> None:
    """Set ``plan.state``, ``checkpoint`` and ``checkpoint_step`` from the run folder."""
    from cmpagl.checkpoint import read_meta, saved_checkpoints

    plan.state, plan.checkpoint, plan.checkpoint_step = "fresh", None, None
    if not saved_checkpoints(plan.output_dir):
        return
    checkpoint = _resume_checkpoint(plan.output_dir)
    meta = read_meta(checkpoint)
    diff = training_differences(_with_defaults(meta.get("config", {})), to_dict(plan.cfg))
    if diff:
        raise ConfigError(
            f"{plan.output_dir} holds a run of another config ({'; '.join(diff)}): give "
            "another output_dir, or delete that folder to start over",
            key="output_dir",
        )
    step, tc = int(meta["step"]), plan.cfg.train
    done = int(meta["epoch"]) >= tc.epochs or (tc.max_steps > 0 and step >= tc.max_steps)
    plan.state = "finished" if done else "resume"
    plan.checkpoint, plan.checkpoint_step = checkpoint, step


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------
@dataclass
class TrainingSummary:
    """What a run's training amounts to, read from its checkpoint and log.

    ``action``: what this call did (``"trained"``, ``"resumed"`` or ``"skipped"``, the run
    being finished already). ``best_*``: the validation (ITC mR) that selected ``best/``.
    ``wall_time_s`` is the training's wall time over all calls (interrupted ones included);
    ``samples_per_s`` that of the latest call that trained.
    """

    action: Literal["trained", "resumed", "skipped"]
    resumed_from_step: int | None
    steps: int
    epochs_done: int
    best_val_r_mean: float | None
    best_step: int | None
    best_epoch: int | None
    best_val_metrics: dict[str, float] | None
    wall_time_s: float | None
    samples_per_s: float | None
    train_commit: str | None

    def describe(self) -> str:
        rate = f", {self.samples_per_s:.1f} samples/s" if self.samples_per_s else ""
        wall = f" in {self.wall_time_s:.0f} s" if self.wall_time_s is not None else ""
        best = (
            f"; best val mR {self.best_val_r_mean:.2f} at step {self.best_step}"
            if self.best_val_r_mean is not None
            else ""
        )
        action = {
            "trained": "trained",
            "resumed": f"resumed from step {self.resumed_from_step}",
            "skipped": "finished earlier, not trained again",
        }[self.action]
        return f"{action}: {self.steps} steps{wall}{rate}{best}"


def train_or_resume(plan: RunPlan) -> TrainingSummary:
    """Train a fresh run, continue a resumed one, or skip a finished one; then summarise.

    The synthetic dataset is generated first if the config names it and it is missing
    (:func:`cmpagl.data.build.prepare_synthetic_dataset`).
    """
    from cmpagl.checkpoint import find_checkpoint, read_meta
    from cmpagl.data.build import prepare_synthetic_dataset
    from cmpagl.runlog import LOG_FILE, read_log

    with _quiet_imports():
        from cmpagl.train import train

    result = None
    with run_lock(plan.output_dir, wait_s=30.0):
        _inspect_folder(plan)  # again: another process may have trained here since plan_run
        if plan.state != "finished":
            prepare_synthetic_dataset(plan.cfg.data)
            resume = plan.checkpoint if plan.state == "resume" else None
            result = train(plan.cfg, resume=resume, config_path=str(plan.config_path))
    last = read_meta(_resume_checkpoint(plan.output_dir))
    best = last.get("best") or {}
    log = read_log(plan.output_dir) if (plan.output_dir / LOG_FILE).is_file() else []
    rates = [r["samples_per_s"] for r in log if r.get("kind") == "train" and "samples_per_s" in r]
    walls = [r["wall_time"] for r in log if "wall_time" in r]
    if result is not None and result.samples_per_s > 0:
        rate = result.samples_per_s
    else:
        rate = rates[-1] if rates else None
    action = {"fresh": "trained", "resume": "resumed", "finished": "skipped"}[plan.state]
    return TrainingSummary(
        action=action,
        resumed_from_step=plan.checkpoint_step if plan.state == "resume" else None,
        steps=int(last["step"]),
        epochs_done=int(last["epoch"]),
        best_val_r_mean=best.get("r_mean"),
        best_step=best.get("step"),
        best_epoch=best.get("epoch"),
        best_val_metrics=best.get("metrics"),
        wall_time_s=max(walls) if walls else (result.wall_time_s if result else None),
        samples_per_s=rate,
        train_commit=read_meta(find_checkpoint(plan.output_dir, prefer="best")).get("git_commit"),
    )


# ----------------------------------------------------------------------------------------------
# Evaluation and the record
# ----------------------------------------------------------------------------------------------
def _device(cfg: ExperimentConfig):
    import torch

    if cfg.train.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.train.device)


def default_rerankers(cfg: ExperimentConfig) -> list[str]:
    """Every re-ranker; the ITM ones only for a model trained with ITM (an untrained ITM head
    would only add noise)."""
    with _quiet_imports():
        from cmpagl.evaluate import DEFAULT_RERANKERS

    return [r for r in DEFAULT_RERANKERS if cfg.loss.w_itm > 0 or "itm" not in r]


def _check_rerankers(names: Sequence[str]) -> list[str]:
    with _quiet_imports():
        from cmpagl.evaluate import RERANKERS

    if isinstance(names, str):
        names = [names]
    unknown = [n for n in names if n not in RERANKERS]
    if unknown:
        raise ValueError(
            f"unknown re-ranker(s) {', '.join(unknown)}; known: {', '.join(RERANKERS)}"
        )
    return list(dict.fromkeys(names))


def evaluate_best(plan: RunPlan, split: str = "test") -> tuple[dict[str, Any], bool]:
    """Evaluate ``best/`` (chosen on validation) on ``split`` with ``plan.rerankers``.

    ``split="val"`` is for tuning runs: the test split is then not read at all.

    Every re-ranker's settings are chosen on the validation split by
    :func:`cmpagl.evaluate.evaluate_model`, which writes ``results_<split>.json`` and
    ``scores_<split>.pt`` into the run folder. If a result file written after ``best/`` with
    the same re-rankers and retrieval settings is there, it is read instead.

    Returns:
        ``(result dict, whether it was read from an earlier evaluation)``.
    """
    from cmpagl.checkpoint import find_checkpoint, load_checkpoint

    with _quiet_imports():
        from cmpagl.evaluate import evaluate_model, saved_evaluation

    if split not in ("test", "val"):
        raise ValueError(f"split must be 'test' or 'val' (tuning), got {split!r}")
    names = plan.rerankers or default_rerankers(plan.cfg)
    best = find_checkpoint(plan.output_dir, prefer="best")
    earlier = saved_evaluation(plan.output_dir, split, best, plan.cfg, names)
    if earlier is not None:
        return earlier, True
    model, _, _ = load_checkpoint(best)
    device = _device(plan.cfg)
    res = evaluate_model(
        model.eval(),
        plan.cfg,
        split,
        names,
        device=device,
        checkpoint=str(best),
        out_dir=plan.output_dir,
    )
    return res, False


def result_record(
    plan: RunPlan, training: TrainingSummary, evaluation: Mapping[str, Any]
) -> dict[str, Any]:
    """The run's small record: what ran (config, overrides, seed, budget), the validation that
    selected the checkpoint, the metrics per re-ranker under the evaluated split's name
    (``"test"``, or ``"val"`` for a tuning run), each re-ranker's chosen settings,
    time, throughput, device and commits. Paths inside the repository are relative to it."""
    from cmpagl.report import val_curve

    names = list(evaluation.get("rerankers") or evaluation["metrics"])
    split = evaluation.get("split", "test")
    tuning = evaluation.get("tuning") or {}
    hardware = evaluation.get("hardware") or {}
    resolved = to_dict(plan.cfg)
    resolved["output_dir"] = portable_path(resolved["output_dir"])
    resolved["data"]["root"] = portable_path(resolved["data"]["root"])
    return {
        "status": "ok",
        "config": portable_path(plan.config_path),
        "overrides": list(plan.overrides),
        "seed": plan.seed,
        "budget": {"epochs": plan.epochs, "max_steps": plan.max_steps},
        "output_dir": portable_path(plan.output_dir),
        "training": asdict(training),
        # every validation of the run: how the selection score evolved over the budget
        "val_curve": val_curve(plan.output_dir),
        "split": split,
        "rerankers": names,
        split: {r: dict(evaluation["metrics"][r]) for r in names},
        # each re-ranker's settings as the result file holds them (None: no re-ranking won)
        "choices": {r: t.get("params") for r, t in tuning.items()},
        # per re-ranker and axis: whether the chosen value is the first or last of its grid
        "on_edge": {r: t.get("on_edge") or {} for r, t in tuning.items()},
        "smr": evaluation.get("smr"),
        "oracle": evaluation.get("oracle"),
        "chance": evaluation.get("chance"),
        "device": hardware.get("device"),
        "hardware": hardware,
        "git_commit": evaluation.get("git_commit"),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config_resolved": resolved,
    }


def write_result(plan: RunPlan, record: Mapping[str, Any]) -> Path:
    """Write ``record`` to ``<run folder>/result.json`` atomically; return the path."""
    return atomic_write_text(plan.output_dir / RESULT_FILE, json.dumps(record, indent=1) + "\n")


# ----------------------------------------------------------------------------------------------
# Curves
# ----------------------------------------------------------------------------------------------
@dataclass
class Curves:
    """A run's log as series: ``step`` and ``series[key]`` (every numeric key of the training
    lines: loss terms, ``lr_*``, ``temp`` (τ), ``grad_norm``, ...) of the ``"train"`` lines;
    ``val_step`` and ``val[key]`` of the validations; ``best_step`` the one that selected
    ``best/`` (the first highest ``r_mean``, as training keeps it)."""

    step: list[int] = field(default_factory=list)
    series: dict[str, list[float]] = field(default_factory=dict)
    val_step: list[int] = field(default_factory=list)
    val: dict[str, list[float]] = field(default_factory=dict)
    best_step: int | None = None


_NOT_SERIES = frozenset({"kind", "step", "epoch", "position", "end_of_epoch", "best", "wall_time"})


def _columns(lines: list[dict[str, Any]]) -> dict[str, list[float]]:
    keys = [k for k in dict.fromkeys(k for r in lines for k in r) if k not in _NOT_SERIES]
    keys = [k for k in keys if all(isinstance(r.get(k), (int, float)) for r in lines)]
    return {k: [float(r[k]) for r in lines] for k in keys}


def training_curves(run: str | os.PathLike[str] | Sequence[Mapping[str, Any]]) -> Curves:
    """:class:`Curves` of a run folder, a ``train_log.jsonl`` or its records.

    Lines are ordered by step and a step logged twice keeps its later line (a log written by
    an older version could repeat steps after a resume); a key missing from some lines (a
    loss term switched on later) is left out rather than padded.
    """
    from cmpagl.runlog import read_log

    records = read_log(run) if isinstance(run, (str, os.PathLike)) else list(run)
    by_kind: dict[str, dict[int, dict[str, Any]]] = {"train": {}, "val": {}}
    for r in records:
        if r.get("kind") in by_kind and isinstance(r.get("step"), int):
            by_kind[r["kind"]][r["step"]] = dict(r)
    train = [by_kind["train"][s] for s in sorted(by_kind["train"])]
    val = [by_kind["val"][s] for s in sorted(by_kind["val"])]
    curves = Curves(
        [r["step"] for r in train], _columns(train), [r["step"] for r in val], _columns(val)
    )
    if "r_mean" in curves.val:
        scores = curves.val["r_mean"]
        curves.best_step = curves.val_step[scores.index(max(scores))]
    return curves


def load_book_model(model_dir: str | os.PathLike[str] = ""):
    """The book's trained model for a chapter: ``(model in eval mode, its config)`` (with
    ``data.root`` resolved, so the chapter reads the model's data from any folder) from the
    ``best/`` checkpoint (chosen on validation) of ``model_dir`` (empty:
    :func:`cmpagl.paths.book_model_dir`).

    Raises:
        CheckpointError: no trained model there, with the command that trains it.
    """
    from cmpagl.checkpoint import CheckpointError, load_checkpoint
    from cmpagl.paths import book_model_dir

    folder = resolve_path(model_dir) if model_dir else book_model_dir()
    try:
        with _quiet_imports():
            model, cfg, _ = load_checkpoint(folder, prefer="best")
    except CheckpointError as err:
        raise CheckpointError(
            f"{err}. The book's model is trained by `make book` (the training chapter), or: "
            "papermill notebooks/05_train.ipynb runs/book_model.ipynb -p config "
            "configs/ucm_book.yaml -p max_steps 0 -p output_dir runs/book_model"
        ) from None
    cfg.data.root = str(resolve_path(cfg.data.root))  # saved relative to the repository root
    return model.eval(), cfg
