"""Re-ranking the retrieval scores (METHOD.md §3): ITM top-k re-scoring, SMR and the baselines.

Pipeline (§3): S_itc [N_img, N_txt] (:func:`cmpagl.retrieval.itc_scores`) -> optionally
:func:`itm_rescore` (S_raw = S_itc + p_match on each query's top-k) -> :func:`smr` (S_opt).
Baselines: :func:`dual_softmax`, :func:`inverted_softmax`, :func:`galr_rerank`.

**Two directions, two matrices.** A ranked list belongs to a query: an image query ranks the
captions of its row (i2t), a caption query ranks the images of its column (t2i). ITM candidates
and SMR's top-k masks are per query, and a pair can be in image i's top-k without image i being
in caption j's top-k. No single shared matrix can then re-order every query's top-k while keeping
everything else below it in ITC order, so every re-ranker returns a :class:`RankingScores` pair:
``i2t`` is read row-wise (image queries), ``t2i`` column-wise (caption queries). Both are
[N_img, N_txt]; a plain matrix stands for the pair (S, S). :func:`evaluate_ranking` takes the
image->text metrics from ``i2t`` and the text->image metrics from ``t2i``.

**Ties.** Identical captions get identical embeddings and tie exactly (METHOD §4;
:func:`cmpagl.retrieval.embed_split` encodes each distinct string once). Each query's
"top-k" is every candidate scoring at least its k-th highest score (ties at the boundary are
all kept), ITM is evaluated once per (image, caption text), and GaLR uses competition ranks,
so no re-ranker
breaks a tie by the order of the caption file.

Outputs are float64: the offset that keeps non-candidates below the candidates, and the small
weights SMR adds, must not round away ITC differences.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from cmpagl.metrics import DEFAULT_KS, duplicate_aware_recall, evaluate_retrieval, recall_at_k
from cmpagl.models.cmpagl import CMPAGL
from cmpagl.retrieval import SplitEmbeddings

# ALBEF fills non-candidates with -100; S_itc - 100 keeps their ITC order as well.
NON_CANDIDATE_GAP = 100.0
# A grid point must beat the best r_mean (percent) by more than this to be chosen.
GRID_TOLERANCE = 1e-9


class RankingScores(NamedTuple):
    """Scores for the two retrieval directions, both [N_img, N_txt].

    Attributes:
        i2t: ranks the captions of each row (image queries, ``txt_r*`` keys).
        t2i: ranks the images of each column (caption queries, ``img_r*`` keys).
    """

    i2t: Tensor
    t2i: Tensor


class SmrParams(NamedTuple):
    """SMR hyper-parameters (METHOD §3): temperature τ_s, top-k size k, weight λ."""

    tau_s: float
    k: int
    lam: float


def _matrix(s: Tensor, name: str = "scores") -> Tensor:
    if not isinstance(s, Tensor) or s.ndim != 2 or s.numel() == 0:
        shape = tuple(s.shape) if isinstance(s, Tensor) else type(s).__name__
        raise ValueError(f"{name} must be a non-empty [N_img, N_txt] tensor, got {shape}")
    return s.detach().double()


def as_ranking(scores: Tensor | RankingScores | tuple[Tensor, Tensor]) -> RankingScores:
    """A matrix S -> (S, S); a pair is checked (same shape) and kept. Values become float64."""
    if isinstance(scores, Tensor):
        s = _matrix(scores)
        return RankingScores(s, s)
    if not isinstance(scores, tuple) or len(scores) != 2:
        raise ValueError("scores must be an [N_img, N_txt] tensor or an (i2t, t2i) pair")
    i2t, t2i = _matrix(scores[0], "i2t scores"), _matrix(scores[1], "t2i scores")
    if i2t.shape != t2i.shape:
        raise ValueError(
            f"i2t and t2i scores differ in shape: {tuple(i2t.shape)} vs {tuple(t2i.shape)}"
        )
    return RankingScores(i2t, t2i)


def topk_mask(s: Tensor, k: int, dim: int) -> Tensor:
    """[N_img, N_txt] bool: entries scoring at least the k-th highest score of their query.

    ``dim=1``: per row (image queries), ``dim=0``: per column (caption queries). Entries tied
    with the k-th score are all kept, so a query may hold more than k (identical captions are
    never split by the boundary).
    """
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if k >= s.shape[dim]:
        return torch.ones_like(s, dtype=torch.bool)
    kth = s.topk(int(k), dim=dim).values.narrow(dim, int(k) - 1, 1)
    return s >= kth


def _place_above(s: Tensor, values: Tensor, mask: Tensor, gap: float = 0.0) -> Tensor:
    """``values`` on ``mask``; elsewhere ``s`` shifted below every masked value.

    Non-candidates keep their relative order in ``s`` and rank after every candidate; the
    shift is at least ``gap`` (ALBEF's 100) and large enough for any score range.
    """
    if not bool(mask.any()):
        return s.clone()
    lowest = values[mask].min()
    shift = max(gap, float(s.max() - lowest) + 1.0)
    return torch.where(mask, values, s - shift)


def competition_rank(x: Tensor, dim: int) -> Tensor:
    """[..] int64: how many entries of the same slice along ``dim`` are strictly greater.

    0 is the top; tied entries share a rank ("1224" ranking, 0-based). O(n log n) per slice.
    """
    xt = x.movedim(dim, -1).contiguous()
    ascending = xt.sort(dim=-1).values
    at_most = torch.searchsorted(ascending, xt, right=True)  # entries <= x
    return (xt.shape[-1] - at_most).movedim(-1, dim)


# --------------------------------------------------------------------------------------------
# ITM re-scoring of each query's top-k (METHOD §3 step 2)
# --------------------------------------------------------------------------------------------
@dataclass
class ItmRescore:
    """Result of :func:`itm_rescore`.

    Attributes:
        scores: S_raw per direction, [N_img, N_txt] float64: S_itc + p_match on the query's
            candidates, S_itc - max(100, range) elsewhere (below every candidate, ITC order).
        candidates: the bool candidate masks per direction (each query's top-k by S_itc).
        p_match: [N_img, N_txt] float64, p_match on the union of candidates, 0 elsewhere.
        n_pairs: size of the union of both directions' candidate pairs.
        n_evals: ITM forward passes: distinct (image, caption text) pairs among them.
        seconds: wall time of the re-scoring.
    """

    scores: RankingScores
    candidates: RankingScores
    p_match: Tensor
    n_pairs: int
    n_evals: int
    seconds: float


def caption_text_ids(captions: Sequence[str]) -> Tensor:
    """[N_txt] int64: index of the first caption with exactly the same string.

    Exact strings (not normalised ones): only those are guaranteed the same tokens.
    """
    first: dict[str, int] = {}
    return torch.tensor([first.setdefault(c, j) for j, c in enumerate(captions)], dtype=torch.long)


@torch.no_grad()
def itm_probabilities(
    model: CMPAGL,
    emb: SplitEmbeddings,
    img: Tensor,
    txt: Tensor,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
) -> Tensor:
    """p_match = softmax(ITM logits)[:, 1] of the fused pairs (img[p], txt[p]) -> [P] float64.

    Runs ``model.fuse`` + ``model.itm_logits`` in eval mode, ``batch_size`` pairs at a time.
    Pairs are processed shortest caption first and each batch is cut to its longest caption,
    so little time goes into padding (padded keys are masked, the result is the same).
    """
    if emb.image_fusion.numel() == 0 or emb.text_hidden.numel() == 0:
        raise ValueError("ITM needs the fusion inputs: embed_split(..., keep_fusion=True)")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    valid = emb.text_mask.bool()
    lengths = valid.sum(1)
    order = torch.argsort(lengths[txt], stable=True)
    out = torch.empty(img.numel(), dtype=torch.float64)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, img.numel(), batch_size):
            idx = order[start : start + batch_size]
            ii, tt = img[idx], txt[idx]
            length = int(valid[tt].any(0).nonzero().max()) + 1
            fused = model.fuse(
                emb.text_hidden[tt, :length].to(device),
                emb.text_mask[tt, :length].to(device),
                emb.image_fusion[ii].to(device),
            )
            logits = model.itm_logits(fused).float()
            out[idx] = logits.softmax(-1)[:, 1].double().cpu()
    finally:
        model.train(was_training)
    return out


def itm_rescore(
    model: CMPAGL,
    emb: SplitEmbeddings,
    s_itc: Tensor,
    k: int,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
) -> ItmRescore:
    """S_raw = S_itc + p_match on each query's top-k (METHOD §3 step 2), per direction.

    Image query i: its top-k captions by S_itc (row). Caption query j: its top-k images
    (column). The union of these pairs is evaluated once per distinct (image, caption text)
    through the multimodal encoder and ITM head. Per direction, each query's candidates are
    re-ordered by S_itc + p_match and every other entry keeps its ITC order below them
    (S_itc - max(100, range), ALBEF's convention with the ITC order kept).

    Args:
        model: CMPAGL; emb: the split's :class:`SplitEmbeddings` (with fusion inputs).
        s_itc: [N_img, N_txt] S_itc of the same split; k: candidates per query (ties kept).

    Returns:
        :class:`ItmRescore` with the S_raw pair, counts and wall time.
    """
    t0 = time.perf_counter()
    s = _matrix(s_itc, "s_itc").cpu()
    n_img, n_txt = s.shape
    n_emb = (emb.image_embed.shape[0], emb.text_embed.shape[0])
    if n_emb != (n_img, n_txt):
        raise ValueError(
            f"s_itc is {tuple(s.shape)} but the embeddings hold {n_emb[0]} images "
            f"and {n_emb[1]} captions"
        )
    cand = RankingScores(topk_mask(s, k, dim=1), topk_mask(s, k, dim=0))
    img, txt = (cand.i2t | cand.t2i).nonzero(as_tuple=True)
    # Identical strings give identical fused inputs: one ITM pass per (image, text) suffices.
    code = img * n_txt + caption_text_ids(emb.captions)[txt]
    unique, inverse = torch.unique(code, return_inverse=True)
    p_unique = itm_probabilities(model, emb, unique // n_txt, unique % n_txt, batch_size, device)
    p_match = torch.zeros_like(s)
    p_match[img, txt] = p_unique[inverse]
    rescored = s + p_match
    scores = RankingScores(
        _place_above(s, rescored, cand.i2t, NON_CANDIDATE_GAP),
        _place_above(s, rescored, cand.t2i, NON_CANDIDATE_GAP),
    )
    return ItmRescore(
        scores,
        cand,
        p_match,
        n_pairs=int(img.numel()),
        n_evals=int(unique.numel()),
        seconds=time.perf_counter() - t0,
    )


# --------------------------------------------------------------------------------------------
# SMR: similarity matrix reweighting (METHOD §3 step 3, Fig. 4)
# --------------------------------------------------------------------------------------------
def _check_tau(tau: float, name: str = "tau_s") -> float:
    if not isinstance(tau, int | float) or isinstance(tau, bool) or not tau > 0:
        raise ValueError(f"{name} must be a positive number, got {tau!r}")
    return float(tau)


def _scale_on_topk(log_w: Tensor, mask: Tensor, dim: int) -> Tensor:
    """W_map kept on the mask and divided by its per-query maximum (in [0, 1]), from log W."""
    masked = log_w.masked_fill(~mask, float("-inf"))
    top = masked.amax(dim=dim, keepdim=True).nan_to_num(neginf=0.0)
    return torch.exp(masked - top)  # exp(-inf) = 0 off the top-k


def smr_weights(s_raw: Tensor | RankingScores, tau_s: float, k: int) -> RankingScores:
    """SMR's re-ranking probability weighted matrix W_map, masked and scaled per direction.

    P_i2t = row-softmax(S_raw.i2t / τ_s), P_t2i = column-softmax(S_raw.t2i / τ_s) and
    W_map = P_i2t ⊙ P_t2i, the probability that image and caption pick each other (computed in
    log space: the product of two small probabilities underflows float32). W_i2t keeps W_map
    on each row's top-k of S_raw.i2t and divides by the row's maximum there; W_t2i likewise
    per column of S_raw.t2i. A plain matrix S_raw is the pair (S_raw, S_raw).

    Returns:
        (W_i2t, W_t2i), [N_img, N_txt] float64 in [0, 1], 1 at each query's most mutual pair.
    """
    s = as_ranking(s_raw)
    tau_s = _check_tau(tau_s)
    log_w = torch.log_softmax(s.i2t / tau_s, dim=1) + torch.log_softmax(s.t2i / tau_s, dim=0)
    return RankingScores(
        _scale_on_topk(log_w, topk_mask(s.i2t, k, dim=1), dim=1),
        _scale_on_topk(log_w, topk_mask(s.t2i, k, dim=0), dim=0),
    )


def smr(s_raw: Tensor | RankingScores, tau_s: float, k: int, lam: float) -> RankingScores:
    """S_opt = S_raw + λ·W_map per direction (METHOD §3, Fig. 4); see :func:`smr_weights`.

    λ = 0 returns S_raw unchanged. W >= 0 only on each query's top-k, so SMR re-orders each
    query's top-k and leaves the rest of its list as it was.

    Args:
        s_raw: [N_img, N_txt] S_raw (S_itc, or the :func:`itm_rescore` pair).
        tau_s: τ_s > 0; k: top-k per query; lam: λ >= 0.

    Returns:
        :class:`RankingScores` (S_opt for i2t, S_opt for t2i), float64.
    """
    if not lam >= 0:
        raise ValueError(f"lam (λ) must be >= 0, got {lam!r}")
    s = as_ranking(s_raw)
    w = smr_weights(s, tau_s, k)
    return RankingScores(s.i2t + lam * w.i2t, s.t2i + lam * w.t2i)


# --------------------------------------------------------------------------------------------
# Baselines (METHOD §3): dual softmax, inverted softmax, GaLR's multivariate re-rank
# --------------------------------------------------------------------------------------------
def dual_softmax(s: Tensor, tau: float = 0.01) -> RankingScores:
    """Dual softmax inference (Cheng et al. 2021, "DSL"): S ⊙ a softmax prior over the other axis.

    i2t (image i ranks captions): S[i, j] · softmax_i'(S[i', j] / τ), the prior that caption j
    picks image i among all images (column softmax). t2i (caption j ranks images):
    S[i, j] · softmax_j'(S[i, j'] / τ) (row softmax). τ = 0.01 is the DSL code's ×100.

    Args:
        s: [N_img, N_txt] similarities (S_itc). Returns: :class:`RankingScores`, float64.
    """
    s = _matrix(s)
    tau = _check_tau(tau, "tau")
    return RankingScores(s * torch.softmax(s / tau, dim=0), s * torch.softmax(s / tau, dim=1))


def inverted_softmax(s: Tensor, tau: float = 0.01) -> RankingScores:
    """Inverted softmax (Smith et al. 2017): normalise each candidate over the other queries.

    i2t: exp(S[i, j]/τ) / Σ_i' exp(S[i', j]/τ) (a hub caption, close to every image, is
    damped); t2i: the row softmax. Returned as log-probabilities: the same ranking, and no
    underflow to exact ties far down the list.
    """
    s = _matrix(s)
    tau = _check_tau(tau, "tau")
    return RankingScores(torch.log_softmax(s / tau, dim=0), torch.log_softmax(s / tau, dim=1))


def _galr_rows(s: Tensor, k: int, wp1: float, wp2: float, decay: float) -> Tensor:
    """GaLR re-rank of every row of ``s`` [Q, C] (queries are rows) -> [Q, C]."""
    cand = topk_mask(s, k, dim=1)
    forward = competition_rank(s, dim=1)  # position of candidate c in query q's list
    backward = competition_rank(s, dim=0)  # position of query q in candidate c's own list
    p1 = s / s.sum(dim=0, keepdim=True)  # "saliency": share of c's total similarity
    p2 = torch.exp(-decay * (forward + 1).double())
    # Candidates of a query ordered by backward rank (forward rank breaks ties); their position
    # in that order gives p3. Non-candidates sort last and do not count.
    key = (backward * (s.shape[1] + 1) + forward).double().masked_fill(~cand, float("inf"))
    position = competition_rank(-key, dim=1)
    p3 = torch.exp(-decay * (position + 1).double())
    return _place_above(s, wp1 * p1 + p2 + wp2 * p3, cand)


def galr_rerank(
    s: Tensor, k: int = 10, wp1: float = 1.0, wp2: float = 0.7, decay: float = 0.05
) -> RankingScores:
    """GaLR's multivariate re-rank (Yuan et al., TGRS 2022), both directions.

    Follows the public GaLR code (``postprocessing/rerank.py``, ``i2t_rerank_optim``),
    re-implemented vectorised. For a query q and each of its top-k candidates c:

    * p1 = S[q, c] / Σ_q' S[q', c] (c's similarity to q as a share of its similarity to all
      queries),
    * p2 = exp(-decay · (f + 1)), f = c's 0-based position in q's list (forward rank),
    * p3 = exp(-decay · (r + 1)), r = c's position when q's candidates are sorted by the
      position of q in c's own list (backward rank),

    and the new score is wp1·p1 + p2 + wp2·p3. Defaults are the code's function defaults.
    t2i applies the same to the transpose. Differences to the code, kept deliberately:
    positions are competition ranks (tied scores share a position, so identical captions
    stay tied instead of following the caption file's order), ties in backward rank keep the
    forward order, k is used as given (the code raises it to at least 10), and
    non-candidates keep their S order below the candidates instead of all scoring 0.

    Args:
        s: [N_img, N_txt] similarities (S_itc; p1 assumes positive column sums).

    Returns:
        :class:`RankingScores`, float64.
    """
    s = _matrix(s)
    return RankingScores(_galr_rows(s, k, wp1, wp2, decay), _galr_rows(s.T, k, wp1, wp2, decay).T)


# --------------------------------------------------------------------------------------------
# Metrics of a (i2t, t2i) pair, and the validation grid search of SMR
# --------------------------------------------------------------------------------------------
def _merge_directions(i2t: dict[str, float], t2i: dict[str, float]) -> dict[str, float]:
    """``txt_*`` keys from the i2t dict, ``img_*`` keys from the t2i dict, means recomputed."""
    out = {key: (t2i[key] if "img_r" in key else value) for key, value in i2t.items()}
    for key in out:
        if "r_mean" in key:
            prefix, suffix = key.split("r_mean")
            pattern = re.compile(re.escape(prefix) + r"(txt|img)_r\d+" + re.escape(suffix))
            parts = [v for name, v in out.items() if pattern.fullmatch(name)]
            # The same float64 reduction as cmpagl.metrics, so equal recalls give equal means.
            out[key] = float(torch.tensor(parts, dtype=torch.float64).mean())
    return out


def _directed(
    metric: Callable[..., dict[str, float]], scores: RankingScores, *args, **kwargs
) -> dict[str, float]:
    """Apply a ``cmpagl.metrics`` function to a pair: i2t keys from ``i2t``, t2i from ``t2i``."""
    first = metric(scores.i2t, *args, **kwargs)
    if scores.i2t is scores.t2i:
        return first
    return _merge_directions(first, metric(scores.t2i, *args, **kwargs))


def evaluate_ranking(
    scores: Tensor | RankingScores,
    txt2img: Tensor | np.ndarray,
    caption_texts: Sequence[str] | None = None,
    ks: Sequence[int] = DEFAULT_KS,
) -> dict[str, float]:
    """:func:`cmpagl.metrics.evaluate_retrieval` of a :class:`RankingScores` pair (METHOD §4).

    ``txt_*`` (image->text) keys come from ``scores.i2t``, ``img_*`` keys from ``scores.t2i``,
    and every ``*r_mean*`` is their mean again. A plain matrix gives exactly
    ``evaluate_retrieval(scores, ...)``.
    """
    return _directed(evaluate_retrieval, as_ranking(scores), txt2img, caption_texts, ks)


def _criterion(s: RankingScores, txt2img, captions: Sequence[str] | None, criterion: str) -> float:
    if criterion == "r_mean":
        return _directed(recall_at_k, s, txt2img)["r_mean"]
    return _directed(duplicate_aware_recall, s, txt2img, captions)["dup_r_mean"]


def _check_grid(grid_tau, grid_k, grid_lambda) -> tuple[list[float], list[int], list[float]]:
    if not (len(grid_tau) and len(grid_k) and len(grid_lambda)):
        raise ValueError("grid_tau, grid_k and grid_lambda must each hold at least one value")
    taus = [_check_tau(t) for t in grid_tau]
    for k in grid_k:
        topk_mask(torch.zeros(1, 1), k, dim=1)  # validates k
    if any(not lam >= 0 for lam in grid_lambda):
        raise ValueError(f"grid_lambda values must be >= 0, got {tuple(grid_lambda)}")
    lambdas = [0.0] + [float(lam) for lam in grid_lambda if lam != 0]  # λ = 0: no re-ranking
    return taus, [int(k) for k in grid_k], lambdas


def grid_search_smr(
    s_raw_val: Tensor | RankingScores,
    txt2img_val: Tensor | np.ndarray,
    captions_val: Sequence[str] | None = None,
    grid_tau: Sequence[float] = (0.01, 0.02, 0.05, 0.1),
    grid_k: Sequence[int] = (5, 10, 20),
    grid_lambda: Sequence[float] = (0.05, 0.1, 0.2, 0.5, 1.0),
    *,
    criterion: str = "r_mean",
) -> tuple[SmrParams, list[dict[str, float]]]:
    """Choose SMR's (τ_s, k, λ) on the VALIDATION split (METHOD §3): it sees only val arrays.

    Every (τ_s, k) is tried with λ = 0 (no re-ranking, always added) and each λ of the grid.
    The criterion is the exact-tie expected ``r_mean`` of the directed scores (or
    ``dup_r_mean``, which needs ``captions_val``). The earliest best wins, λ = 0 first, so SMR
    is chosen only when it strictly improves the validation criterion.

    Args:
        s_raw_val: [N_img, N_txt] val S_raw (matrix or pair); txt2img_val: [N_txt] int.

    Returns:
        (best :class:`SmrParams`, table: one dict ``{tau_s, k, lam, <criterion>}`` per point).
    """
    if criterion not in ("r_mean", "dup_r_mean"):
        raise ValueError(f"criterion must be 'r_mean' or 'dup_r_mean', got {criterion!r}")
    if criterion == "dup_r_mean" and captions_val is None:
        raise ValueError("criterion 'dup_r_mean' needs captions_val")
    taus, ks, lambdas = _check_grid(grid_tau, grid_k, grid_lambda)
    s = as_ranking(s_raw_val)
    baseline = _criterion(s, txt2img_val, captions_val, criterion)
    best, best_value, table = SmrParams(taus[0], ks[0], 0.0), baseline, []
    for tau_s in taus:
        for k in ks:
            w = smr_weights(s, tau_s, k)  # λ only scales W: one W per (τ_s, k)
            for lam in lambdas:
                s_opt = RankingScores(s.i2t + lam * w.i2t, s.t2i + lam * w.t2i)
                value = _criterion(s_opt, txt2img_val, captions_val, criterion) if lam else baseline
                table.append({"tau_s": tau_s, "k": k, "lam": lam, criterion: value})
                if value > best_value + GRID_TOLERANCE:  # rounding noise is not a gain
                    best, best_value = SmrParams(tau_s, k, lam), value
    return best, table
