"""Evaluating a trained model with every re-ranker (METHOD.md §3–§4), notebook-friendly.

:func:`evaluate_model` embeds the validation split and the requested split, chooses SMR's
(τ_s, k, λ) on validation only, computes each re-ranker's metrics and timings on the requested
split and writes two artifacts next to each other (house style habit 10):

* ``results_<split>.json``: metric keys per re-ranker (standard, ``*_pess``, ``dup_*``), the
  ``oracle_*`` bound once, the chosen SMR parameters with the validation grid table, timings,
  the resolved config, checkpoint path, git commit, torch version and hardware;
* ``scores_<split>.pt``: S_itc, S_raw and S_opt (see :func:`evaluate_model`), txt2img, the
  captions and image file names, and per-query rank statistics of every re-ranker
  (:func:`cmpagl.metrics.i2t_ranks` / :func:`~cmpagl.metrics.t2i_ranks`).

The command line (``cmpagl evaluate``) loads the checkpoint and calls :func:`evaluate_model`.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from cmpagl.checkpoint import git_commit
from cmpagl.config import ExperimentConfig, check_experiment, to_dict
from cmpagl.data.build import dataset_from_config, transforms_from_config
from cmpagl.metrics import i2t_ranks, oracle_upper_bound, t2i_ranks
from cmpagl.models.cmpagl import CMPAGL
from cmpagl.rerank import (
    ItmRescore,
    RankingScores,
    SmrParams,
    as_ranking,
    dual_softmax,
    evaluate_ranking,
    galr_rerank,
    grid_search_smr,
    inverted_softmax,
    itm_rescore,
    smr,
)
from cmpagl.retrieval import SplitEmbeddings, embed_split, itc_scores

RERANKERS: tuple[str, ...] = (
    "none",
    "itm",
    "smr",
    "itm+smr",
    "dual_softmax",
    "inverted_softmax",
    "galr",
)
DEFAULT_RERANKERS: tuple[str, ...] = ("none", "itm", "smr", "itm+smr", "dual_softmax", "galr")
_NEEDS_ITM = frozenset({"itm", "itm+smr"})


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
    """One embedded split: embeddings, S_itc, the ITM re-scoring (if run) and their timings."""

    emb: SplitEmbeddings
    s_itc: Tensor
    itm: ItmRescore | None
    embed_s: float
    itc_s: float


def _embed(model, ds, transform, cfg: ExperimentConfig, device, with_itm: bool) -> _Split:
    rc = cfg.retrieval
    emb, embed_s = _timed(
        embed_split,
        model,
        ds,
        transform,
        rc.batch_size,
        cfg.data.num_workers,
        device,
        keep_fusion=with_itm,
    )
    s_itc, itc_s = _timed(itc_scores, emb)
    itm = itm_rescore(model, emb, s_itc, rc.itm_k, rc.batch_size, device) if with_itm else None
    return _Split(emb, s_itc, itm, embed_s, itc_s)


def _choose_smr(val: _Split, cfg: ExperimentConfig, on_itm: bool) -> dict[str, Any]:
    """SMR parameters for S_itc or the ITM S_raw, chosen on validation (or fixed in the config).

    An empty grid in the config means "use smr_tau, smr_k, smr_lambda as given".
    """
    rc = cfg.retrieval
    s_raw = val.itm.scores if on_itm else val.s_itc
    if not (rc.smr_grid_tau and rc.smr_grid_k and rc.smr_grid_lambda):
        params = SmrParams(rc.smr_tau, rc.smr_k, rc.smr_lambda)
        return {"params": params._asdict(), "source": "config", "val_grid": [], "seconds": 0.0}
    (params, table), seconds = _timed(
        grid_search_smr,
        s_raw,
        val.emb.txt2img,
        val.emb.captions,
        rc.smr_grid_tau,
        rc.smr_grid_k,
        rc.smr_grid_lambda,
    )
    return {
        "params": params._asdict(),
        "source": "val grid search",
        "val_grid": table,
        "seconds": seconds,
    }


def _rerank(name: str, split: _Split, cfg: ExperimentConfig, smr_choice: dict) -> RankingScores:
    """The scores of one re-ranker on an embedded split (timed by the caller)."""
    rc = cfg.retrieval
    if name == "none":
        return as_ranking(split.s_itc)
    if name == "itm":
        return split.itm.scores
    if name in ("smr", "itm+smr"):
        s_raw = split.itm.scores if name == "itm+smr" else split.s_itc
        return smr(s_raw, **smr_choice[name]["params"])
    if name == "dual_softmax":
        return dual_softmax(split.s_itc, rc.dual_softmax_tau)
    if name == "inverted_softmax":
        return inverted_softmax(split.s_itc, rc.dual_softmax_tau)
    return galr_rerank(split.s_itc, rc.galr_k)


def _rank_stats(scores: RankingScores, txt2img) -> dict[str, Tensor]:
    """Per-query expected ranks and the (above, tied_neg, tied_pos) counts, both directions."""
    out = {}
    for direction, ranks in (
        ("i2t", i2t_ranks(scores.i2t, txt2img)),
        ("t2i", t2i_ranks(scores.t2i, txt2img)),
    ):
        out[f"{direction}_expected_rank"] = ranks.expected_rank
        out[f"{direction}_counts"] = torch.stack(
            [ranks.above, ranks.tied_neg, ranks.tied_pos]
        ).int()
    return out


def _without_oracle(metrics: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if not k.startswith("oracle_")}


def _output_dir(cfg: ExperimentConfig, checkpoint: str | None, out_dir) -> Path:
    """``out_dir``; else the checkpoint's folder (results live with what they describe); else
    ``cfg.output_dir``."""
    if out_dir is not None:
        return Path(out_dir)
    if checkpoint is not None:
        path = Path(checkpoint)
        return path if path.is_dir() else path.parent
    return Path(cfg.output_dir)


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file and rename, so a crash never leaves half an artifact."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _scores_payload(target: _Split, kept: dict[str, RankingScores], ranks: dict) -> dict:
    """What ``scores_<split>.pt`` holds (float64 except S_itc, which is saved as computed).

    S_raw is the ITM pair when ITM ran, else (S_itc, S_itc) (one shared storage on disk);
    S_opt is the SMR output on that S_raw (``itm+smr``, else ``smr``), or None.
    """
    s_raw_from = "itm" if target.itm is not None else "none"
    s_raw = target.itm.scores if target.itm is not None else as_ranking(target.s_itc)
    s_opt_from = next((n for n in ("itm+smr", "smr") if n in kept), None)
    if s_opt_from == "smr" and s_raw_from == "itm":  # keep S_opt = SMR(S_raw) literally true
        s_raw_from, s_raw = "none", as_ranking(target.s_itc)
    return {
        "S_itc": target.s_itc,
        "S_raw": s_raw._asdict(),
        "S_raw_from": s_raw_from,
        "S_opt": kept[s_opt_from]._asdict() if s_opt_from else None,
        "S_opt_from": s_opt_from,
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

    SMR's (τ_s, k, λ) are chosen by :func:`~cmpagl.rerank.grid_search_smr` on the val split
    only, separately for ``smr`` (on S_itc) and ``itm+smr`` (on the ITM S_raw). Re-rankers:
    ``none`` (S_itc), ``itm``, ``smr``, ``itm+smr``, ``dual_softmax``, ``inverted_softmax``,
    ``galr``; settings come from ``cfg.retrieval``.

    Args:
        model: a CMPAGL model with its weights loaded (moved to ``device``).
        cfg: the experiment config; ``cfg.data`` locates the dataset.
        checkpoint: path recorded in the result (the weights are not loaded here).
        out_dir: where the artifacts go; default the checkpoint's folder, else
            ``cfg.output_dir``.
        save_scores: also write ``scores_<split>.pt`` (8 bytes x N_img x N_txt per matrix,
            up to 5 matrices: ~9 MB for UCM's test split, ~220 MB for RSICD's).

    Returns:
        The content of ``results_<split>.json`` as a dict.
    """
    check_experiment(cfg)
    names = _check_rerankers(rerankers)
    device = torch.device(device)
    model.to(device)
    ds = dataset_from_config(cfg.data)
    _, transform = transforms_from_config(cfg.data)
    smr_names = [n for n in ("smr", "itm+smr") if n in names]
    need_itm = bool(_NEEDS_ITM & set(names))
    val = None
    if smr_names:  # the val split serves SMR's grid search and nothing else
        val = _embed(model, ds.split("val"), transform, cfg, device, "itm+smr" in names)
    if split == "val" and val is not None and (val.itm is not None or not need_itm):
        target = val
    else:
        target = _embed(model, ds.split(split), transform, cfg, device, need_itm)
    smr_choice = {n: _choose_smr(val, cfg, on_itm=n == "itm+smr") for n in smr_names}
    txt2img, captions = target.emb.txt2img, target.emb.captions
    metrics, seconds, ranks, kept = {}, {}, {}, {}
    for name in names:
        scores, seconds[name] = _timed(_rerank, name, target, cfg, smr_choice)
        if name in _NEEDS_ITM:  # from S_itc to the final scores, ITM passes included
            seconds[name] += target.itm.seconds
        metrics[name] = _without_oracle(evaluate_ranking(scores, txt2img, captions))
        ranks[name] = _rank_stats(scores, txt2img)
        if name in smr_names:
            kept[name] = scores
    result = {
        "split": split,
        "n_images": len(target.emb.image_embed),
        "n_captions": len(captions),
        "rerankers": list(names),
        "metrics": metrics,
        "oracle": oracle_upper_bound(txt2img, captions),
        "smr": smr_choice,
        "itm": _itm_summary(target, val, cfg),
        "timings": _timings(target, val, seconds, smr_choice),
        **_provenance(cfg, checkpoint, device),
    }
    return _save(result, target, kept, ranks, _output_dir(cfg, checkpoint, out_dir), save_scores)


def _itm_summary(target: _Split, val: _Split | None, cfg: ExperimentConfig) -> dict | None:
    if target.itm is None:
        return None
    return {
        "k": cfg.retrieval.itm_k,
        "n_pairs": target.itm.n_pairs,
        "n_evals": target.itm.n_evals,
        "val_n_evals": None if val is None or val.itm is None else val.itm.n_evals,
    }


def _timings(target: _Split, val: _Split | None, seconds: dict, smr_choice: dict) -> dict:
    """Seconds: embedding, S_itc, each re-ranker from S_itc to its scores, SMR grid searches."""
    return {
        "embed_s": target.embed_s,
        "itc_s": target.itc_s,
        "embed_val_s": None if val is None else val.embed_s,
        "rerank_s": seconds,
        "smr_grid_s": {n: c["seconds"] for n, c in smr_choice.items()},
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
    result: dict, target: _Split, kept: dict, ranks: dict, out: Path, save_scores: bool
) -> dict[str, Any]:
    """Write ``results_<split>.json`` (and ``scores_<split>.pt``); return the result dict."""
    out.mkdir(parents=True, exist_ok=True)
    split = result["split"]
    files = {"results": str(out / f"results_{split}.json")}
    if save_scores:
        files["scores"] = str(out / f"scores_{split}.pt")
        payload = _scores_payload(target, kept, ranks)
        _write_atomic(Path(files["scores"]), lambda p: torch.save(payload, p))
    result["files"] = files
    text = json.dumps(result, indent=1)
    _write_atomic(Path(files["results"]), lambda p: p.write_text(text + "\n", encoding="utf-8"))
    return result
