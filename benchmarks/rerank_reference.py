"""The naive (dense) SMR and GaLR of :mod:`cmpagl.rerank`: the formulas as full-matrix
operations, the reference the fast paths must reproduce exactly.

Every step here is a full [N_img, N_txt] matrix operation: both softmaxes (log P = x minus the
row or column normalizer, each normalizer a log-sum-exp over the whole row or column), W_map
and its scaling on the whole matrix; GaLR's forward and backward competition ranks of every entry
(a sort and a binary search per row and per column). :mod:`cmpagl.rerank` computes the same
numbers on each query's top-k lists only. ``tests/test_rerank.py`` asserts bit-for-bit equality
on random matrices with exact ties; ``benchmarks/rerank_speed.py`` times both in one process.
Input checking is the library's (:func:`cmpagl.rerank.as_ranking` and friends), unchanged.
"""

from __future__ import annotations

import torch
from torch import Tensor

from cmpagl.rerank import RankingScores, _check_scale, _check_tau, _matrix, as_ranking


def topk_mask(s: Tensor, k: int, dim: int) -> Tensor:
    """[N_img, N_txt] bool: entries scoring at least the k-th highest score of their query."""
    if k >= s.shape[dim]:
        return torch.ones_like(s, dtype=torch.bool)
    kth = s.topk(int(k), dim=dim).values.narrow(dim, int(k) - 1, 1)
    return s >= kth


def competition_rank(x: Tensor, dim: int) -> Tensor:
    """How many entries of the same slice along ``dim`` are strictly greater (0 = top)."""
    xt = x.movedim(dim, -1).contiguous()
    ascending = xt.sort(dim=-1).values
    at_most = torch.searchsorted(ascending, xt, right=True)
    return (xt.shape[-1] - at_most).movedim(-1, dim)


def place_above(s: Tensor, values: Tensor, mask: Tensor, gap: float = 0.0) -> Tensor:
    """``values`` on ``mask``; elsewhere ``s`` shifted below every masked value."""
    if not bool(mask.any()):
        return s.clone()
    lowest = values[mask].min()
    shift = max(gap, float(s.max() - lowest) + 1.0)
    return torch.where(mask, values, s - shift)


def scale_on_topk(log_w: Tensor, mask: Tensor, dim: int, scale: str) -> Tensor:
    """W_map kept on the mask and scaled per query to [0, 1], from log W (dense)."""
    masked = log_w.masked_fill(~mask, float("-inf"))
    top = masked.amax(dim=dim, keepdim=True).nan_to_num(neginf=0.0)
    ratio = torch.exp(masked - top)
    if scale == "max":
        return ratio
    low = ratio.masked_fill(~mask, float("inf")).amin(dim=dim, keepdim=True)
    span = 1.0 - low
    flat = span <= 0.0
    scaled = (ratio - low) / torch.where(flat, torch.ones_like(span), span)
    return torch.where(flat, torch.ones_like(ratio), scaled).masked_fill(~mask, 0.0)


def log_normalizers(x: Tensor) -> tuple[Tensor, Tensor]:
    """(log Σ_j exp x[i, j] per row, log Σ_i exp x[i, j] per column), from exp(x - max x); a
    range wider than 700 (or a non-finite entry) takes torch.logsumexp per dimension."""
    low, high = x.min(), x.max()
    if not (torch.isfinite(low) and torch.isfinite(high)) or float(high - low) > 700.0:
        return torch.logsumexp(x, 1), torch.logsumexp(x, 0)
    e = torch.exp(x - high)
    return torch.log(e.sum(1)) + high, torch.log(e.sum(0)) + high


def smr_weights(s_raw, tau_s: float, k: int, *, s_prob=None, scale: str = "max") -> RankingScores:
    """W_map per direction, dense: two full softmaxes, their sum, the scaling on every entry."""
    s = as_ranking(s_raw)
    p = s if s_prob is None else as_ranking(s_prob)
    tau_s, scale = _check_tau(tau_s), _check_scale(scale)
    # row-major, as the library sums them (the summation order sets the normalizers' last bits)
    x_i2t, x_t2i = (p.i2t / tau_s).contiguous(), (p.t2i / tau_s).contiguous()
    log_w = (x_i2t - log_normalizers(x_i2t)[0][:, None]) + (x_t2i - log_normalizers(x_t2i)[1])
    return RankingScores(
        scale_on_topk(log_w, topk_mask(s.i2t, k, dim=1), 1, scale),
        scale_on_topk(log_w, topk_mask(s.t2i, k, dim=0), 0, scale),
    )


def smr(s_raw, tau_s: float, k: int, lam: float, *, s_prob=None, scale="max") -> RankingScores:
    """S_opt = S_raw + λ·W_map per direction, dense."""
    s = as_ranking(s_raw)
    w = smr_weights(s, tau_s, k, s_prob=s_prob, scale=scale)
    return RankingScores(s.i2t + lam * w.i2t, s.t2i + lam * w.t2i)


def galr_rows(s: Tensor, k: int, wp1: float, wp2: float, decay: float) -> Tensor:
    """GaLR re-rank of every row of ``s`` [Q, C] (queries are rows), dense ranks."""
    cand = topk_mask(s, k, dim=1)
    forward = competition_rank(s, dim=1)
    backward = competition_rank(s, dim=0)
    p1 = s / s.sum(dim=0, keepdim=True)
    p2 = torch.exp(-decay * (forward + 1).double())
    key = (backward * (s.shape[1] + 1) + forward).double().masked_fill(~cand, float("inf"))
    position = competition_rank(-key, dim=1)
    p3 = torch.exp(-decay * (position + 1).double())
    return place_above(s, wp1 * p1 + p2 + wp2 * p3, cand)


def galr_rerank(
    s: Tensor, k: int = 10, wp1: float = 1.0, wp2: float = 0.7, decay: float = 0.05
) -> RankingScores:
    """GaLR's multivariate re-rank, both directions, dense."""
    s = _matrix(s)
    return RankingScores(galr_rows(s, k, wp1, wp2, decay), galr_rows(s.T, k, wp1, wp2, decay).T)
