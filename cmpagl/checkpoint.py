"""Checkpoints: one folder per checkpoint, written atomically (METHOD.md §4, house habit 10).

Layout of a checkpoint folder (``<output_dir>/last/``, ``<output_dir>/best/``)::

    model.safetensors  every state-dict tensor of the model (momentum twins and queue buffers
                       included); tensors that share storage (the MLM decoder weight IS the word
                       embedding) are stored once and their other names recorded in the metadata
    config.yaml        the resolved ExperimentConfig (cmpagl.config.save_config)
    state.pt           training state: optimizer, scheduler, step, epoch, position in the epoch,
                       best metric, RNG states, the epoch's data order (torch, weights_only)
    meta.json          git commit, time, versions, metrics, the config as a dict; written last

A checkpoint is first written into a temporary sibling folder and then renamed into place, so a
crash mid-write leaves the previous checkpoint untouched. :func:`load_checkpoint` raises one
:class:`CheckpointError` with the reason for a missing or damaged folder.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from cmpagl.config import ConfigError, ExperimentConfig, load_config, save_config, to_dict
from cmpagl.paths import from_repo, repo_relative

__all__ = [
    "CONFIG_FILE",
    "META_FILE",
    "MODEL_FILE",
    "STATE_FILE",
    "CheckpointError",
    "WeightsMismatch",
    "copy_checkpoint",
    "find_checkpoint",
    "git_commit",
    "load_checkpoint",
    "load_model_weights",
    "portable_config",
    "read_meta",
    "save_checkpoint",
    "saved_checkpoints",
    "save_model_weights",
    "weights_mismatch",
]

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"
STATE_FILE = "state.pt"
META_FILE = "meta.json"
CHECKPOINT_FILES = (MODEL_FILE, CONFIG_FILE, STATE_FILE, META_FILE)
_FILES_TEXT = ", ".join(CHECKPOINT_FILES)
_ALIASES_KEY = "cmpagl_aliases"  # safetensors metadata: {"dropped name": "stored name"}


class CheckpointError(RuntimeError):
    """A checkpoint folder is missing, incomplete or damaged; the message says which and why."""


class WeightsMismatch(CheckpointError):
    """A checkpoint's weights were made for another architecture than the model given."""


# ----------------------------------------------------------------------------------------------
# Model weights in safetensors
# ----------------------------------------------------------------------------------------------


def _storage_key(t: Tensor) -> tuple:
    """Identity of the memory a tensor views: equal keys mean one tensor under two names."""
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), t.shape, t.stride())


def save_model_weights(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Write ``model.state_dict()`` to a safetensors file.

    safetensors refuses tensors that share memory; the MLM decoder weight is tied to the word
    embeddings, so each shared tensor is stored once and its other names go in the metadata.
    """
    stored: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, tensor in model.state_dict().items():
        key = _storage_key(tensor)
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        stored[name] = tensor.detach().cpu().contiguous()
    save_file(stored, os.fspath(path), metadata={_ALIASES_KEY: json.dumps(aliases)})


def load_model_weights(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Load a file written by :func:`save_model_weights` into ``model`` (strict: every key).

    Raises:
        CheckpointError: the file is not readable safetensors, or keys/shapes do not match.
    """
    try:
        tensors = load_file(os.fspath(path))
        with safe_open(os.fspath(path), framework="pt") as f:  # load_file drops the metadata
            aliases = json.loads((f.metadata() or {}).get(_ALIASES_KEY, "{}"))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: cannot read the weights ({err})") from err
    for alias, name in aliases.items():
        tensors[alias] = tensors[name]
    problem = weights_mismatch(model.state_dict(), tensors)
    if problem:
        raise WeightsMismatch(f"{path}: the weights do not fit the model: {problem}")
    model.load_state_dict(tensors, strict=True)


def weights_mismatch(own: Mapping[str, Tensor], saved: Mapping[str, Tensor]) -> str | None:
    """Why ``saved`` tensors do not fit a model's state dict ``own``, in one line that names the
    first difference in the model's order (a key and both shapes), then how many differ; None
    when every key and shape matches."""
    shapes = {k for k in own if k in saved and saved[k].shape != own[k].shape}
    missing = {k for k in own if k not in saved}
    unexpected = {k for k in saved if k not in own}
    if not (shapes or missing or unexpected):
        return None
    first = next(k for k in [*own, *saved] if k in shapes | missing | unexpected)
    if first in shapes:
        mine, theirs = tuple(own[first].shape), tuple(saved[first].shape)
        what = f"{first} is {theirs} in the checkpoint, {mine} in the model"
    elif first in missing:
        what = f"{first} {tuple(own[first].shape)} is in the model, not in the checkpoint"
    else:
        what = f"{first} {tuple(saved[first].shape)} is in the checkpoint, not in the model"
    counts = [
        f"{len(items)} {text}"
        for items, text in (
            (shapes, "shapes differ"),
            (missing, "keys only in the model"),
            (unexpected, "keys only in the checkpoint"),
        )
        if items
    ]
    return f"first mismatch: {what} ({', '.join(counts)})"


# ----------------------------------------------------------------------------------------------
# Writing a checkpoint folder atomically
# ----------------------------------------------------------------------------------------------


#: Tracked paths whose changes leave the code that runs as committed: the records that runs and
#: benchmarks write (and a sweep commits after each run), the book's prose, the tests, Markdown.
NOT_CODE = ("results/**", "book/**", "tests/**", "**/*.md")  # git glob pathspecs


def git_state(where: str | os.PathLike[str]) -> str | None:
    """The commit checked out in the repository holding ``where`` (``git rev-parse HEAD``), with
    ``-dirty`` appended when tracked files other than :data:`NOT_CODE` differ from it (the code
    that ran is then not that commit); None without git or outside a repository."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=where, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    try:
        sha = git("rev-parse", "HEAD")
        exclude = [f":(top,exclude,glob){p}" for p in NOT_CODE]
        dirty = bool(git("status", "--porcelain", "--untracked-files=no", "--", ":/", *exclude))
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{sha}-dirty" if sha and dirty else sha or None


@functools.cache
def git_commit() -> str | None:
    """:func:`git_state` of this package's repository, read once per process."""
    return git_state(Path(__file__).resolve().parent)


def portable_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """``cfg`` with its paths (``output_dir``, ``data.root``, ``data.image_dir``) as saved
    configs hold them: relative to the repository root where they lie beside it
    (:func:`cmpagl.paths.repo_relative`), so a run folder moved to another checkout or machine
    still finds its data. :func:`load_checkpoint` makes them absolute again."""
    return _map_paths(cfg, repo_relative)


def _map_paths(cfg: ExperimentConfig, fn: Callable[[str], str]) -> ExperimentConfig:
    """``cfg`` with ``fn`` applied to each of its paths that is set."""

    def f(path: str | None) -> str | None:
        return fn(path) if path else path

    data = dataclasses.replace(cfg.data, root=f(cfg.data.root), image_dir=f(cfg.data.image_dir))
    return dataclasses.replace(cfg, output_dir=f(cfg.output_dir), data=data)


def _meta(
    cfg: ExperimentConfig, metrics: Mapping[str, Any] | None, extra: Mapping[str, Any] | None
) -> dict[str, Any]:
    return {
        "git_commit": git_commit(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "metrics": dict(metrics or {}),
        **dict(extra or {}),
        "config": to_dict(portable_config(cfg)),
    }


def _fsync_file(path: Path) -> None:
    # Renaming is atomic, but without fsync a power cut could leave renamed yet empty files.
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _swap_into_place(tmp: Path, target: Path) -> None:
    """Rename the finished folder ``tmp`` to ``target``, replacing an existing one.

    A folder cannot be renamed over a non-empty folder, so the old one is first renamed aside
    (``.<name>.old-*``) and deleted after; :func:`find_checkpoint` falls back to it if a crash
    hits between the two renames.
    """
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    # Leftovers of writes killed earlier (one writer per run folder, so none is in progress)
    for stale in target.parent.glob(f".{target.name}.*-*"):
        if stale.is_dir() and (".tmp-" in stale.name or ".old-" in stale.name):
            shutil.rmtree(stale, ignore_errors=True)


def _write_atomically(target: Path, write) -> Path:
    """Call ``write(tmp_folder)`` and move the folder to ``target``; clean up on any error."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        write(tmp)
        for name in CHECKPOINT_FILES:
            _fsync_file(tmp / name)
            os.chmod(tmp / name, 0o644)  # mkstemp/mkdtemp make private files; others may read
        os.chmod(tmp, 0o755)
        _swap_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def save_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module,
    cfg: ExperimentConfig,
    state: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    meta: Mapping[str, Any] | None = None,
) -> Path:
    """Write a checkpoint folder at ``path`` atomically and return it.

    Args:
        model: its whole state dict goes to ``model.safetensors``.
        cfg: the resolved config (``config.yaml``, and as a dict in ``meta.json``).
        state: training state for ``state.pt`` (tensors, numbers, strings, lists, dicts only:
            it is read back with ``torch.load(weights_only=True)``).
        metrics: validation metrics recorded in ``meta.json``.
        meta: further ``meta.json`` entries (step, epoch, kind, ...).
    """

    def write(tmp: Path) -> None:
        save_model_weights(model, tmp / MODEL_FILE)
        save_config(portable_config(cfg), tmp / CONFIG_FILE)
        torch.save(dict(state or {}), tmp / STATE_FILE)
        # meta.json last: its presence marks a complete folder (see find_checkpoint)
        text = json.dumps(_meta(cfg, metrics, meta), indent=2, default=str)
        (tmp / META_FILE).write_text(text + "\n", encoding="utf-8")

    return _write_atomically(Path(path), write)


def copy_checkpoint(
    src: str | os.PathLike[str], dst: str | os.PathLike[str], meta: Mapping[str, Any] | None = None
) -> Path:
    """Copy checkpoint folder ``src`` to ``dst`` atomically (hard links where possible: the
    files of a written checkpoint are never modified in place, only replaced as a folder).

    ``meta`` entries update the copy's ``meta.json`` (e.g. ``{"kind": "best"}``).
    """
    src = find_checkpoint(src)

    def write(tmp: Path) -> None:
        for name in (MODEL_FILE, CONFIG_FILE, STATE_FILE):
            try:
                os.link(src / name, tmp / name)
            except OSError:  # another file system, or links not supported
                shutil.copy2(src / name, tmp / name)
        data = {**read_meta(src), **dict(meta or {})}
        (tmp / META_FILE).write_text(json.dumps(data, indent=2, default=str) + "\n", "utf-8")

    return _write_atomically(Path(dst), write)


# ----------------------------------------------------------------------------------------------
# Finding and loading
# ----------------------------------------------------------------------------------------------


def _is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in CHECKPOINT_FILES)


def _set_aside(folder: Path) -> list[Path]:
    """Copies of ``folder`` renamed aside by :func:`_swap_into_place`, oldest name first."""
    return sorted(folder.parent.glob(f".{folder.name}.old-*"))


def saved_checkpoints(run_dir: str | os.PathLike[str]) -> list[str]:
    """Names of the checkpoint folders in run folder ``run_dir`` (``best``, ``last``, and any
    renamed aside by an interrupted write), complete or not; [] for none."""
    folders = [Path(run_dir) / name for name in ("best", "last")]
    return [f.name for folder in folders for f in (folder, *_set_aside(folder)) if f.is_dir()]


def find_checkpoint(path: str | os.PathLike[str], prefer: str = "best") -> Path:
    """The checkpoint folder ``path`` names: itself, or ``path/<prefer>`` for a run folder.

    If a crash hit between the two renames of a replacement, the folder renamed aside
    (``.<name>.old-*``) is used.

    Raises:
        CheckpointError: nothing complete there, with the files that are missing.
    """
    path = Path(path)
    for candidate in (path, path / prefer):
        if _is_complete(candidate):
            return candidate
        aside = _set_aside(candidate)
        if not candidate.exists() and aside and _is_complete(aside[-1]):
            return aside[-1]
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}: the folder does not exist")
    folder = path if (path / MODEL_FILE).exists() or not (path / prefer).is_dir() else path / prefer
    missing = ", ".join(n for n in CHECKPOINT_FILES if not (folder / n).is_file())
    raise CheckpointError(
        f"no complete checkpoint at {path}: expected a checkpoint folder ({_FILES_TEXT}) or a "
        f"run folder with {prefer}/ inside; {folder} lacks {missing}"
    )


def read_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """``meta.json`` of a checkpoint folder as a dict."""
    file = Path(path) / META_FILE
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{file}: cannot read ({err})") from err


def _read_config(folder: Path) -> ExperimentConfig:
    try:
        return _map_paths(load_config(folder / CONFIG_FILE), from_repo)
    except ConfigError as err:
        raise CheckpointError(f"{folder}: bad {CONFIG_FILE}: {err}") from err


def _read_state(folder: Path, map_location: str | torch.device) -> dict[str, Any]:
    try:
        return torch.load(folder / STATE_FILE, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises many types for a damaged pickle / zip
        raise CheckpointError(f"{folder / STATE_FILE}: cannot read ({err})") from err


def load_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module | None = None,
    *,
    prefer: str = "best",
    map_location: str | torch.device = "cpu",
) -> tuple[nn.Module, ExperimentConfig, dict[str, Any]]:
    """Load a checkpoint folder (or ``<run folder>/<prefer>``) -> ``(model, cfg, state)``.

    Args:
        model: the model to load the weights into; None builds a CMPAGL from the saved config
            (the architecture only: no pretrained weights are fetched, the checkpoint holds
            every weight).
        prefer: which checkpoint of a run folder: ``"best"`` (evaluation) or ``"last"``
            (resuming).
        map_location: device for the tensors of ``state``.

    Returns:
        The model (on the CPU when built here, in its previous mode otherwise), the saved
        config and the saved training state (``{}``-like dict; see :mod:`cmpagl.train`).

    Raises:
        CheckpointError: missing folder or file, unreadable weights/config/state, or weights
            that do not fit ``model``.
    """
    folder = find_checkpoint(path, prefer)
    cfg = _read_config(folder)
    built = model is None
    if model is None:
        model = _build_for(cfg, folder / MODEL_FILE)
    try:
        load_model_weights(model, folder / MODEL_FILE)
    except WeightsMismatch as err:
        raise WeightsMismatch(f"{err}; {_architecture_hint(cfg, model, folder, built)}") from err
    return model, cfg, _read_state(folder, map_location)


def _architecture_hint(cfg: ExperimentConfig, model: nn.Module, folder: Path, built: bool) -> str:
    """What to do about weights that do not fit: the ``model.*`` settings that differ between
    the checkpoint's config and the model's, when the model says what it was built from."""
    if built:
        return f"{folder / CONFIG_FILE} does not describe these weights (was either file replaced?)"
    own_cfg = getattr(model, "cfg", None)
    if own_cfg is None or type(own_cfg) is not type(cfg.model):
        return f"the checkpoint was made with the model settings in {folder / CONFIG_FILE}"

    def flat(d: Any, prefix: str) -> dict[str, Any]:
        if not isinstance(d, dict):
            return {prefix: d}
        return {k: v for key, sub in d.items() for k, v in flat(sub, f"{prefix}.{key}").items()}

    saved, asked = flat(to_dict(cfg.model), "model"), flat(to_dict(own_cfg), "model")
    diff = [
        f"{k} ({saved.get(k)!r} in the checkpoint, {asked.get(k)!r} in the config)"
        for k in saved
        if saved.get(k) != asked.get(k)
    ]
    if not diff:
        return f"the checkpoint was made with the model settings in {folder / CONFIG_FILE}"
    more = f" and {len(diff) - 3} more" if len(diff) > 3 else ""
    return f"the checkpoint's model settings differ in {', '.join(diff[:3])}{more}"


def _build_for(cfg: ExperimentConfig, weights: Path) -> nn.Module:
    from cmpagl.models.cmpagl import build_model  # the model module is heavy; only when needed

    try:
        with safe_open(os.fspath(weights), framework="pt") as f:
            has_momentum = "queue.ptr" in f.keys()
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{weights}: cannot read the weights ({err})") from err
    return build_model(cfg.model, use_momentum=has_momentum)
