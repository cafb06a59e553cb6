"""Evaluating a trained model with every re-ranker (METHOD.md §3–§4), notebook-friendly.

:func:`evaluate_model` embeds the validation split and the requested split, chooses every
re-ranker's settings on validation only (one grid search for all, :func:`cmpagl.rerank.
grid_search`), applies them once to the requested split and writes two artifacts next to each
other (house style habit 10):

* ``results_<split>.json``: metric keys per re-ranker (standard, ``*_pess``, ``*_index`` (the
  public evaluators' tie convention), ``dup_*``), the ``oracle_*`` bound and the ``chance_*``
  level once (:func:`cmpagl.metrics.chance_recall`), per re-ranker the
  chosen settings with the validation grid, its size and whether each chosen value lies on the
  edge of its axis (``tuning``), timings, the resolved config, checkpoint path, git commit,
  torch version and hardware;
* ``scores_<split>.pt``: S_itc, S_raw and S_opt (see :func:`evaluate_model`), p_match,
  txt2img, the captions and per-query rank statistics of every re-ranker
  (:class:`cmpagl.metrics.TieRanks` counts).

The command line (``cmpagl evaluate``) loads the checkpoint and calls :func:`evaluate_model`.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from cmpagl import rerank as rr
from cmpagl.checkpoint import META_FILE, git_commit
from cmpagl.config import ExperimentConfig, RetrievalConfig, check_experiment, to_dict
from cmpagl.data.build import dataset_from_config, transforms_from_config
from cmpagl.fileio import atomic_write
from cmpagl.metrics import (
    DEFAULT_KS,
    RetrievalRanks,
    TieRanks,
    chance_recall,
    oracle_upper_bound,
    ranks_to_metrics,
    retrieval_ranks,
)
from cmpagl.models.cmpagl import CMPAGL
from cmpagl.retrieval import ItmRescore, SplitEmbeddings, embed_split, itc_scores, itm_rescore

RERANKERS: tuple[str, ...] = (
    "none",
    "itm",
    "smr",
    "itm+smr",
    "dual_softmax",
    "inverted_softmax",
    "galr",
)
DEFAULT_RERANKERS: tuple[str, ...] = RERANKERS
_NEEDS_ITM = frozenset({"itm", "itm+smr"})

# Each re-ranker's settings: (name in the grid, config key of its axis, config key of its fixed
# value). "none" has none; itm+smr's ITM stage takes the itm_k chosen for "itm".
SETTINGS: dict[str, tuple[tuple[str, str, str], ...]] = {
    "itm": (("itm_k", "itm_grid_k", "itm_k"),),
    "smr": (
        ("tau_s", "smr_grid_tau", "smr_tau"),
        ("k", "smr_grid_k", "smr_k"),
        ("lam", "smr_grid_lambda", "smr_lambda"),
    ),
    "dual_softmax": (("tau", "dual_softmax_grid_tau", "dual_softmax_tau"),),
    "inverted_softmax": (("tau", "inverted_softmax_grid_tau", "inverted_softmax_tau"),),
    "galr": (
        ("k", "galr_grid_k", "galr_k"),
        ("wp1", "galr_grid_wp1", "galr_wp1"),
        ("wp2", "galr_grid_wp2", "galr_wp2"),
        ("decay", "galr_grid_decay", "galr_decay"),
    ),
}
SETTINGS["itm+smr"] = SETTINGS["smr"]

TIE_CONVENTIONS: dict[str, str] = {
    "": "exact expectation over a uniformly random order of tied items (our headline numbers)",
    "_pess": "pessimistic: every tied negative ranked ahead of the positives",
    "_index": "the public SCAN/ALBEF evaluators' argsort convention, made deterministic: among "
    "tied scores the larger index first, as np.argsort(score, kind='stable')[::-1]",
}


def _check_rerankers(rerankers: Sequence[str]) -> tuple[str, ...]:
    names = (rerankers,) if isinstance(rerankers, str) else tuple(rerankers)
    unknown = [n for n in names if n not in RERANKERS]
    if not names or unknown:
        raise ValueError(
            f"unknown re-ranker(s) {unknown or names!r}; known: {', '.join(RERANKERS)}"
        )
    return tuple(dict.fromkeys(names))  # drop repeats, keep the order


def _timed(fn: Callable[..., Any], *args, **kwargs) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


# --------------------------------------------------------------------------------------------
# Provenance: commit, software, hardware
# --------------------------------------------------------------------------------------------
def _cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what ``platform`` knows."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def hardware_info(device: torch.device | str) -> dict[str, Any]:
    """Platform, CPU model and count, torch version and threads and, on CUDA, the GPU name."""
    device = torch.device(device)
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["cuda_name"] = torch.cuda.get_device_name(device)
    return info


# --------------------------------------------------------------------------------------------
# The pieces of an evaluation
# --------------------------------------------------------------------------------------------
@dataclass
class _Split:
    """One embedded split: embeddings, S_itc, the ITM probabilities (if run), their timings."""

    emb: SplitEmbeddings
    s_itc: Tensor
    embed_s: float
    itc_s: float
    itm: ItmRescore | None = None
    _stages: dict[int, rr.ItmScores] = field(default_factory=dict)

    def itm_stage(self, k: int) -> rr.ItmScores:
        """S_raw of ITM with k candidates per query, from the p_match scored for k' >= k."""
        if self.itm is None or self.itm.k < k:
            raise RuntimeError(f"ITM was not run for k = {k} on this split")
        if k not in self._stages:
            self._stages[k] = rr.itm_scores(self.s_itc, self.itm.p_match, k)
        return self._stages[k]


def _embed(model, ds, transform, cfg: ExperimentConfig, device, keep_fusion: bool) -> _Split:
    rc = cfg.retrieval
    emb, embed_s = _timed(
        embed_split,
        model,
        ds,
        transform,
        rc.batch_size,
        cfg.data.num_workers,
        device,
        keep_fusion=keep_fusion,
    )
    s_itc, itc_s = _timed(itc_scores, emb)
    return _Split(emb, s_itc, embed_s, itc_s)


def _run_itm(model, split: _Split, k: int, cfg: ExperimentConfig, device) -> None:
    """Score each query's top-k of ``split`` with the ITM head (once per split)."""
    if split.itm is None or split.itm.k < k:
        rc = cfg.retrieval
        split.itm = itm_rescore(model, split.emb, split.s_itc, k, rc.batch_size, device)
        split._stages.clear()


def _axes(name: str, rc: RetrievalConfig) -> tuple[dict[str, list], dict[str, Any], bool]:
    """(grid axes, fixed values, searched?) of a re-ranker from the config.

    An empty axis stands for its fixed value; all axes empty: no search, fixed values as given.
    """
    settings = SETTINGS[name]
    fixed = {axis: getattr(rc, key) for axis, _, key in settings}
    grids = {axis: list(getattr(rc, key)) for axis, key, _ in settings}
    if not any(grids.values()):
        return {}, fixed, False
    axes = {axis: values or [fixed[axis]] for axis, values in grids.items()}
    if "lam" in axes:  # SMR: checked, λ = 0 dropped (it is "no re-ranking", always tried)
        axes = rr.smr_axes(axes["tau_s"], axes["k"], axes["lam"])
    return axes, fixed, True


def _scorer(
    name: str, split: _Split, rc: RetrievalConfig, itm_k: int | None
) -> tuple[rr.RankingScores, Callable[..., rr.RankingScores] | None]:
    """(scores without re-ranking, settings -> scores) of a re-ranker on a split.

    ``itm_k``: the ITM stage of ``itm+smr`` (None: ITM off, SMR starts from S_itc).
    """
    s_itc = rr.as_ranking(split.s_itc)
    base = s_itc.i2t
    if name == "itm":
        return s_itc, lambda itm_k: split.itm_stage(itm_k).s_raw
    if name in ("smr", "itm+smr"):
        if name == "itm+smr" and itm_k is not None:
            stage = split.itm_stage(itm_k)
            return stage.s_raw, rr.smr_scorer(stage.s_raw, s_prob=stage.s_prob, scale=rc.smr_scale)
        return s_itc, rr.smr_scorer(s_itc, scale=rc.smr_scale)
    if name == "dual_softmax":
        return s_itc, lambda tau: rr.dual_softmax(base, tau)
    if name == "inverted_softmax":
        return s_itc, lambda tau: rr.inverted_softmax(base, tau)
    if name == "galr":
        return s_itc, lambda k, wp1, wp2, decay: rr.galr_rerank(base, k, wp1, wp2, decay)
    return s_itc, None  # "none"


def _apply(
    name: str, split: _Split, rc: RetrievalConfig, params: dict | None, itm_k: int | None
) -> rr.RankingScores:
    """The scores of one re-ranker on a split with its chosen settings (None: no re-ranking)."""
    start, fn = _scorer(name, split, rc, itm_k)
    return start if params is None or fn is None else rr.as_ranking(fn(**params))


def _tune(name: str, val: _Split | None, rc: RetrievalConfig, itm_k: int | None) -> dict:
    """A re-ranker's settings: chosen by the val grid search, or fixed by the config."""
    axes, fixed, searched = _axes(name, rc)
    keys = [key for _, key, _ in SETTINGS[name]]
    if not searched:
        return {
            "source": "config",
            "params": fixed,
            "note": f"fixed as configured: {', '.join(f'retrieval.{k}' for k in keys)} empty",
            "grid": {},
            "grid_size": 0,
            "on_edge": {},
            "seconds": 0.0,
        }
    start, fn = _scorer(name, val, rc, itm_k)
    found, seconds = _timed(rr.grid_search, fn, start, val.emb.txt2img, axes, val.emb.captions)
    return {
        "source": "val grid search",
        "params": found.params,
        "off": found.params is None,
        "criterion": found.criterion,
        "val_value": found.value,
        "val_off_value": found.off_value,
        "grid": found.axes,
        "grid_size": found.size,
        "on_edge": found.on_edge(),
        "val_grid": found.table,
        "seconds": seconds,
    }


def _stage_k(tuning: dict) -> int | None:
    """The ITM k that the "itm" tuning chose (None: no re-ranking won)."""
    params = tuning["itm"]["params"]
    return None if params is None else int(params["itm_k"])


def _rank_stats(ranks: RetrievalRanks) -> dict[str, Tensor]:
    """Per-query expected ranks and the (above, tied_neg, tied_pos, index_ahead) counts."""
    out = {}
    for direction, r in (("i2t", ranks.i2t), ("t2i", ranks.t2i)):
        out[f"{direction}_expected_rank"] = r.expected_rank
        out[f"{direction}_counts"] = torch.stack(
            [r.above, r.tied_neg, r.tied_pos, r.index_ahead]
        ).int()
    return out


def _output_dir(cfg: ExperimentConfig, checkpoint: str | None, out_dir) -> Path:
    """``out_dir``; else the checkpoint's folder (results live with what they describe); else
    ``cfg.output_dir``."""
    if out_dir is not None:
        return Path(out_dir)
    if checkpoint is not None:
        path = Path(checkpoint)
        return path if path.is_dir() else path.parent
    return Path(cfg.output_dir)


def _scores_payload(
    target: _Split, kept: dict[str, rr.RankingScores], ranks: dict, itm_k: int | None
) -> dict:
    """What ``scores_<split>.pt`` holds (float64 except S_itc, which is saved as computed).

    S_raw is the ITM order at the chosen ``itm_k`` when ITM ran, else (S_itc, S_itc) (one
    shared storage on disk); S_opt is the SMR output on that S_raw (``itm+smr``, else
    ``smr``), or None. ``p_match`` (NaN where not scored) and ``itm_k`` rebuild S_raw and the
    gap-free scores SMR read: ``cmpagl.rerank.itm_scores(S_itc, p_match, itm_k)``.
    """
    use_itm = target.itm is not None and itm_k is not None
    s_raw_from = "itm" if use_itm else "none"
    s_raw = target.itm_stage(itm_k).s_raw if use_itm else rr.as_ranking(target.s_itc)
    s_opt_from = next((n for n in ("itm+smr", "smr") if n in kept), None)
    if s_opt_from == "smr" and s_raw_from == "itm":  # keep S_opt = SMR(S_raw) literally true
        s_raw_from, s_raw = "none", rr.as_ranking(target.s_itc)
    return {
        "S_itc": target.s_itc,
        "S_raw": s_raw._asdict(),
        "S_raw_from": s_raw_from,
        "S_opt": kept[s_opt_from]._asdict() if s_opt_from else None,
        "S_opt_from": s_opt_from,
        "p_match": target.itm.p_match if target.itm is not None else None,
        "itm_k": itm_k if use_itm else None,
        "txt2img": torch.as_tensor(target.emb.txt2img, dtype=torch.long),
        "captions": list(target.emb.captions),
        "ranks": ranks,
    }


def evaluate_model(
    model: CMPAGL,
    cfg: ExperimentConfig,
    split: str = "test",
    rerankers: Sequence[str] = DEFAULT_RERANKERS,
    device: torch.device | str = "cpu",
    checkpoint: str | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    *,
    save_scores: bool = True,
) -> dict[str, Any]:
    """Retrieval metrics of ``model`` on ``split`` with each re-ranker (METHOD §3–§4).

    Every re-ranker with settings gets the same treatment (:data:`SETTINGS`): a grid search on
    the val split only (:func:`cmpagl.rerank.grid_search`, "no re-ranking" always a
    candidate, the earliest best wins), its choice applied once to ``split``. ITM's k is tuned
    like the rest: the val split is scored once for the largest k of the grid and smaller k
    reuse those probabilities; ``itm+smr`` runs SMR on the ITM stage that "itm" chose, with its
    own SMR grid. Re-rankers: ``none`` (S_itc), ``itm``, ``smr``, ``itm+smr``,
    ``dual_softmax``, ``inverted_softmax``, ``galr``; grids come from ``cfg.retrieval``.

    Args:
        model: a CMPAGL model with its weights loaded (moved to ``device``).
        cfg: the experiment config; ``cfg.data`` locates the dataset.
        checkpoint: path recorded in the result (the weights are not loaded here).
        out_dir: where the artifacts go; default the checkpoint's folder, else
            ``cfg.output_dir``.
        save_scores: also write ``scores_<split>.pt`` (8 bytes x N_img x N_txt per matrix,
            up to 6 matrices: ~11 MB for UCM's test split, ~260 MB for RSICD's).

    Returns:
        The content of ``results_<split>.json`` as a dict.
    """
    check_experiment(cfg)
    names = _check_rerankers(rerankers)
    rc = cfg.retrieval
    device = torch.device(device)
    model.to(device)
    ds = dataset_from_config(cfg.data)
    _, transform = transforms_from_config(cfg.data)
    tuned = [n for n in RERANKERS if n in names and n != "none"]
    if "itm+smr" in names and "itm" not in tuned:  # its ITM stage is what "itm" chooses
        tuned.insert(0, "itm")
    need_itm = bool(_NEEDS_ITM & set(names))
    searched = [n for n in tuned if _axes(n, rc)[2]]
    val = None
    if searched:  # the val split serves the grid searches and nothing else
        val = _embed(model, ds.split("val"), transform, cfg, device, need_itm)
        if _NEEDS_ITM & set(searched):  # ITM's k, or SMR on the ITM stage, is searched on val
            itm_axes, itm_fixed, itm_searched = _axes("itm", rc)
            k_val = max(itm_axes["itm_k"]) if itm_searched else itm_fixed["itm_k"]
            _run_itm(model, val, k_val, cfg, device)
    tuning: dict[str, dict] = {}
    for name in tuned:
        itm_k = _stage_k(tuning) if name == "itm+smr" else None
        tuning[name] = _tune(name, val, rc, itm_k)
        if name == "itm+smr":
            tuning[name]["itm_k"] = itm_k  # the ITM stage, chosen by the "itm" search
    itm_k = _stage_k(tuning) if need_itm else None
    reuse = split == "val" and val is not None
    target = val if reuse else _embed(model, ds.split(split), transform, cfg, device, need_itm)
    if itm_k is not None:
        _run_itm(model, target, itm_k, cfg, device)
    txt2img, captions = target.emb.txt2img, target.emb.captions
    metrics, seconds, ranks, kept = {}, {}, {}, {}
    for name in names:
        params = tuning[name]["params"] if name in tuning else None
        stage = itm_k if name == "itm+smr" else None
        scores, seconds[name] = _timed(_apply, name, target, rc, params, stage)
        if name in _NEEDS_ITM and itm_k is not None:  # from S_itc, the ITM passes included
            seconds[name] += target.itm.seconds
        shared = scores.i2t is scores.t2i
        r = retrieval_ranks(
            scores.i2t, txt2img, captions, scores_t2i=None if shared else scores.t2i
        )
        metrics[name], ranks[name] = ranks_to_metrics(r), _rank_stats(r)
        if name in ("smr", "itm+smr"):
            kept[name] = scores
    result = {
        "split": split,
        "n_images": len(target.emb.image_embed),
        "n_captions": len(captions),
        "rerankers": list(names),
        "metrics": metrics,
        "tie_conventions": TIE_CONVENTIONS,
        "oracle": oracle_upper_bound(txt2img, captions),
        "chance": chance_recall(txt2img, n_img=len(target.emb.image_embed)),
        "tuning": {n: tuning[n] for n in tuned},
        "smr": _smr_view(tuning),
        "itm": _itm_summary(target, val, itm_k),
        "timings": _timings(target, val, seconds, tuning),
        **_provenance(cfg, checkpoint, device),
    }
    out = _output_dir(cfg, checkpoint, out_dir)
    return _save(result, target, kept, ranks, itm_k, out, save_scores)


def _smr_view(tuning: dict) -> dict:
    """SMR's choices as (τ_s, k, λ), λ = 0 where "no re-ranking" won (the earlier layout)."""
    out = {}
    for name in ("smr", "itm+smr"):
        if name in tuning:
            t = tuning[name]
            params = t["params"]
            if params is None:
                params = {axis: values[0] for axis, values in t["grid"].items()} | {"lam": 0.0}
            out[name] = {"params": rr.SmrParams(**params)._asdict(), "source": t["source"]}
    return out


def _itm_summary(target: _Split, val: _Split | None, itm_k: int | None) -> dict | None:
    if target.itm is None and (val is None or val.itm is None):
        return None
    return {
        "k": itm_k,
        "n_pairs": None if target.itm is None else target.itm.n_pairs,
        "n_evals": None if target.itm is None else target.itm.n_evals,
        "val_k": None if val is None or val.itm is None else val.itm.k,
        "val_n_evals": None if val is None or val.itm is None else val.itm.n_evals,
    }


def _timings(target: _Split, val: _Split | None, seconds: dict, tuning: dict) -> dict:
    """Seconds: embedding, S_itc, each re-ranker from S_itc to its scores, the grid searches."""
    return {
        "embed_s": target.embed_s,
        "itc_s": target.itc_s,
        "embed_val_s": None if val is None else val.embed_s,
        "itm_val_s": None if val is None or val.itm is None else val.itm.seconds,
        "rerank_s": seconds,
        "grid_s": {n: t["seconds"] for n, t in tuning.items()},
    }


def _provenance(cfg: ExperimentConfig, checkpoint, device: torch.device) -> dict[str, Any]:
    return {
        "config": to_dict(cfg),
        "checkpoint": None if checkpoint is None else str(checkpoint),
        "git_commit": git_commit(),
        "torch": torch.__version__,
        "hardware": hardware_info(device),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _save(
    result: dict,
    target: _Split,
    kept: dict,
    ranks: dict,
    itm_k: int | None,
    out: Path,
    save_scores: bool,
) -> dict[str, Any]:
    """Write ``results_<split>.json`` (and ``scores_<split>.pt``); return the result dict."""
    split = result["split"]
    files = {"results": str(out / f"results_{split}.json")}
    if save_scores:
        files["scores"] = str(out / f"scores_{split}.pt")
        payload = _scores_payload(target, kept, ranks, itm_k)
        atomic_write(files["scores"], lambda p: torch.save(payload, p))
    result["files"] = files
    text = json.dumps(result, indent=1)
    atomic_write(files["results"], lambda p: p.write_text(text + "\n", encoding="utf-8"))
    return result


# --------------------------------------------------------------------------------------------
# Reading an evaluation back, the chance level, and paired differences between re-rankers
# --------------------------------------------------------------------------------------------
def saved_evaluation(
    out_dir: str | os.PathLike[str],
    split: str,
    checkpoint: str | os.PathLike[str],
    cfg: ExperimentConfig,
    rerankers: Sequence[str],
) -> dict[str, Any] | None:
    """The evaluation in ``out_dir`` if it answers :func:`evaluate_model` for this checkpoint.

    It answers when ``results_<split>.json`` and ``scores_<split>.pt`` are both there, the
    result was written after the checkpoint's ``meta.json``, on the same dataset
    (``data.name``), with the same retrieval settings (every grid) and with every re-ranker of
    ``rerankers`` (and in the current format: with the chance level).
    :func:`cmpagl.runs.evaluate_best` reuses an evaluation by this test too.

    Returns:
        The content of ``results_<split>.json``, or None.
    """
    out, names = Path(out_dir), _check_rerankers(rerankers)
    results, scores = out / f"results_{split}.json", out / f"scores_{split}.pt"
    meta = Path(checkpoint) / META_FILE
    if not (results.is_file() and scores.is_file() and meta.is_file()):
        return None
    if results.stat().st_mtime < meta.stat().st_mtime:
        return None
    try:
        res = json.loads(results.read_text(encoding="utf-8"))
    except ValueError:
        return None
    saved = res.get("config", {})
    same = (
        res.get("split") == split
        and saved.get("retrieval") == json.loads(json.dumps(to_dict(cfg.retrieval)))
        and saved.get("data", {}).get("name") == cfg.data.name
    )
    complete = set(names) <= set(res.get("metrics", {})) and "chance" in res  # older files lack it
    return res if same and complete else None


def evaluate_or_read(
    model: CMPAGL,
    cfg: ExperimentConfig,
    checkpoint: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    split: str = "test",
    rerankers: Sequence[str] = DEFAULT_RERANKERS,
    device: torch.device | str = "cpu",
) -> tuple[dict[str, Any], bool]:
    """:func:`saved_evaluation` if there is one, else :func:`evaluate_model` into ``out_dir``.

    Args:
        model: the model loaded from ``checkpoint`` (only run when no evaluation answers).
        checkpoint: the checkpoint folder the model came from (``<run>/best``).
        out_dir: where the evaluation is read from, or written to (the run folder).

    Returns:
        ``(result dict, whether it was read from an earlier evaluation)``.
    """
    saved = saved_evaluation(out_dir, split, checkpoint, cfg, rerankers)
    if saved is not None:
        return saved, True
    res = evaluate_model(
        model, cfg, split, rerankers, device=device, checkpoint=str(checkpoint), out_dir=out_dir
    )
    return res, False


def query_hits(stats: dict[str, Tensor], ks: Sequence[int] = DEFAULT_KS) -> tuple[Tensor, Tensor]:
    """Per-query exact hit probabilities of one re-ranker from its saved rank statistics.

    Args:
        stats: ``scores_<split>.pt["ranks"][<re-ranker>]`` (``i2t_counts`` [4, N_img] and
            ``t2i_counts`` [4, N_txt]: above, tied_neg, tied_pos, index_ahead).

    Returns:
        (image->text [N_img, len(ks)], text->image [N_txt, len(ks)]) float64: P(rank < K).
    """
    i2t, t2i = (TieRanks(*stats[f"{d}_counts"].long()) for d in ("i2t", "t2i"))
    return i2t.hit_probability(ks), t2i.hit_probability(ks)


@dataclass(frozen=True)
class PairedDifference:
    """``r_mean`` of re-ranker a minus that of b on the same queries, with a bootstrap interval.

    ``diff`` is the difference on the split itself; (``low``, ``high``) the percentile interval
    at ``level`` from ``n_boot`` resamples of the images.
    """

    diff: float
    low: float
    high: float
    level: float
    n_boot: int

    @property
    def resolved(self) -> bool:
        """Does the interval exclude 0 (a measurable difference on this split)?"""
        return self.low > 0 or self.high < 0


def r_mean_difference(
    stats_a: dict[str, Tensor],
    stats_b: dict[str, Tensor],
    txt2img: Sequence[int] | np.ndarray | Tensor,
    ks: Sequence[int] = DEFAULT_KS,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> PairedDifference:
    """Paired difference in ``r_mean`` of two re-rankers, and how far the test queries carry it.

    The images of the split are resampled with replacement, each with all its captions (the
    captions of one image are not independent queries); a resample's ``r_mean`` averages the
    image->text hits of its images and the text->image hits of their captions, exactly as
    :func:`cmpagl.metrics.recall_at_k` does on the whole split. Both re-rankers see the same
    resamples. The gallery is kept fixed: this measures the sampling of the queries, not of the
    seed or of the training.

    Args:
        stats_a, stats_b: saved rank statistics (see :func:`query_hits`).
        txt2img: [N_txt] int, the image of each caption.
        n_boot: resamples; level: coverage of the percentile interval; seed: of the resampling.
    """
    if n_boot < 1 or not 0 < level < 1:
        raise ValueError(f"need n_boot >= 1 and 0 < level < 1, got {n_boot=}, {level=}")
    (ia, ta), (ib, tb) = query_hits(stats_a, ks), query_hits(stats_b, ks)
    t2i = torch.as_tensor(np.asarray(txt2img), dtype=torch.long).flatten()
    n_img = ia.shape[0]
    if ib.shape != ia.shape or ta.shape != tb.shape or t2i.numel() != ta.shape[0]:
        raise ValueError("the two re-rankers' statistics and txt2img describe different splits")
    d_i2t = ia - ib  # [N_img, K]
    d_t2i = torch.zeros(n_img, len(ks), dtype=torch.float64).index_add_(0, t2i, ta - tb)
    count = torch.bincount(t2i, minlength=n_img).double()  # captions per image

    def r_mean(idx: Tensor) -> Tensor:  # idx [B, N_img] -> [B]
        txt = d_i2t[idx].mean(1)
        img = d_t2i[idx].sum(1) / count[idx].sum(1, keepdim=True)
        return torch.cat([txt, img], dim=1).mean(1) * 100.0

    gen = torch.Generator().manual_seed(seed)
    boot = r_mean(torch.randint(n_img, (n_boot, n_img), generator=gen))
    tail = (1.0 - level) / 2
    low, high = torch.quantile(boot, torch.tensor([tail, 1.0 - tail], dtype=torch.float64))
    diff = float(r_mean(torch.arange(n_img)[None])[0])
    return PairedDifference(diff, float(low), float(high), level, n_boot)
