"""Re-ranking the retrieval scores (METHOD.md §3): ITM top-k re-scoring, SMR and the baselines.

Everything here is pure matrix -> matrix: no model runs in this module. Pipeline (§3): S_itc
[N_img, N_txt] (:func:`cmpagl.retrieval.itc_scores`) -> optionally the ITM probabilities of each
query's top-k (:func:`cmpagl.retrieval.itm_rescore` runs the model) turned into
S_raw = S_itc + p_match by :func:`itm_scores` -> :func:`smr` (S_opt). Baselines:
:func:`dual_softmax`, :func:`inverted_softmax`, :func:`galr_rerank`. Every setting of every
re-ranker is chosen on the validation split by one routine, :func:`grid_search`.

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
so no re-ranker breaks a tie by the order of the caption file.

Outputs are float64: the offset that keeps non-candidates below the candidates, and the small
weights SMR adds, must not round away ITC differences.

**Cost.** SMR and GaLR change only each query's top-k, so they compute only there. SMR takes
the row and column softmax normalizers from one exp of the whole matrix
(:func:`log_normalizers`) and forms, scales and adds W_map on the top-k entries only; GaLR
ranks each candidate by counting and never ranks the whole matrix. Both give the dense
formulas' numbers bit for bit (the dense code is kept in ``benchmarks/rerank_reference.py``;
``tests/test_rerank.py`` compares them, ties included). Both compute on the CPU (inputs
elsewhere are copied there) and write their two outputs into the two [N_img, N_txt] matrices
they use as scratch: a fresh matrix costs page faults too.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from cmpagl import hugepages
from cmpagl.metrics import DEFAULT_KS, caption_groups, evaluate_retrieval, recall_at_k

# ALBEF fills non-candidates with -100; S_itc - 100 keeps their ITC order as well.
NON_CANDIDATE_GAP = 100.0
# A grid point must beat the best r_mean (percent) by more than this to be chosen.
GRID_TOLERANCE = 1e-9
# How W_map is scaled to [0, 1] per query (see smr_weights).
SMR_SCALES: tuple[str, ...] = ("max", "minmax")


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
    s = s.detach()
    if s.dtype != torch.float64 and s.device.type == "cpu":
        # S_itc of float32 embeddings, as evaluation passes it: the float64 copy is written
        # page by page like the outputs, so it goes on huge pages too (12 ms of 70 here)
        return hugepages.empty(s.shape).copy_(s)
    return s.double()


def as_ranking(scores: Tensor | RankingScores | tuple[Tensor, Tensor]) -> RankingScores:
    """A matrix S -> (S, S); a pair is checked (same shape) and kept. Values become float64."""
    if isinstance(scores, Tensor):
        s = _matrix(scores)
        return RankingScores(s, s)
    if not isinstance(scores, tuple) or len(scores) != 2:
        raise ValueError("scores must be an [N_img, N_txt] tensor or an (i2t, t2i) pair")
    i2t = _matrix(scores[0], "i2t scores")
    if scores[1] is scores[0] or (isinstance(scores, RankingScores) and scores.t2i is scores.i2t):
        return RankingScores(i2t, i2t)  # still one matrix: computed once, not twice
    t2i = _matrix(scores[1], "t2i scores")
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
    k = _check_k(k)
    if k >= s.shape[dim]:
        return torch.ones_like(s, dtype=torch.bool)
    kth = s.topk(k, dim=dim).values.narrow(dim, k - 1, 1)
    return s >= kth


def _check_k(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    return int(k)


class _TopkLists(NamedTuple):
    """Each query's top-k (:func:`topk_mask`) as a padded list: ``index`` [Q, K] int64 (the
    candidates' positions along the query's list), ``valid`` [Q, K] bool (False: padding),
    ``padded`` whether any entry is padding (some query was tied at its boundary)."""

    index: Tensor
    valid: Tensor
    padded: bool

    def flat(self, query_stride: int, index_stride: int) -> Tensor:
        """[Q, K] offsets of the entries in a contiguous matrix: query q's entry c sits at
        q · query_stride + c · index_stride (i2t lists of [N_img, N_txt]: (N_txt, 1))."""
        queries = torch.arange(self.index.shape[0])[:, None] * query_stride
        return queries + self.index * index_stride

    def query_index(self) -> Tensor:
        """[Q, K] int64: each entry's query (its row)."""
        return torch.arange(self.index.shape[0])[:, None].expand_as(self.index)

    def entries(self, x: Tensor) -> Tensor:
        """[n] the valid entries of ``x`` [Q, K], query by query."""
        return x[self.valid] if self.padded else x.reshape(-1)


#: How far past the k-th entry ``topk`` looks: a query tied at its boundary (identical captions
#: score alike) usually has all its tied entries inside this window, and then needs no full pass.
TIE_WINDOW = 6


def coarse_scores(scores: Tensor) -> Tensor | None:
    """float64 scores rounded to float32, to select top-k entries from (about twice as fast),
    or None for other dtypes. Rounding is monotone, so a query whose k-th and (k+1)-th rounded
    scores differ has the same top-k as in float64; :func:`_topk_lists` settles the others
    (rounded ties) in float64."""
    if scores.dtype != torch.float64:
        return None
    # on huge pages: a column's entries lie a row apart, each on its own 4 KB page otherwise
    return hugepages.empty(scores.shape, torch.float32).copy_(scores)


def _topk_lists(scores: Tensor, k: int, dim: int = 1, coarse: Tensor | None = None) -> _TopkLists:
    """The entries of ``topk_mask(scores, k, dim)`` query by query, without the mask: queries
    are the rows (``dim=1``) or the columns (``dim=0``) of ``scores``.

    One ``topk`` (of ``coarse``, :func:`coarse_scores`, when given) settles every query whose
    (k+1)-th score is below its k-th: its candidates are exactly its top k. The others are tied
    at the boundary in the selection scores: their candidates (every entry >= the query's k-th
    score in ``scores``, so K may exceed k) are read off the entries past the boundary that the
    ``topk`` returned (:data:`TIE_WINDOW` along rows, one along columns) when they end below the
    tie, else from the query's whole list (as for a query holding NaN, which ``s >= kth``
    excludes). ``topk`` along contiguous rows is about 2x faster than along columns, which
    still beats a transposed copy made only for it.
    """
    k = _check_k(k)
    rows = scores if dim == 1 else scores.T  # a view: query q's list is rows[q]
    n_q, n = rows.shape
    if k >= n:
        index = torch.arange(n).expand(n_q, n)
        return _TopkLists(index, torch.ones(n_q, n, dtype=torch.bool), False)
    select = scores if coarse is None else coarse
    # Along rows a wider topk costs next to nothing; along columns it costs a third more, and
    # a column ties at its boundary only where two images score alike (duplicated images)
    values, index = select.topk(min(k + (TIE_WINDOW if dim == 1 else 1), n), dim=dim)
    if dim == 0:
        values, index = values.T, index.T  # [Q, window], small
    kth = values[:, k - 1]
    settled = values[:, k] < kth
    has_nan = values.isnan().any(dim=1) if bool(values.isnan().any()) else None
    if has_nan is not None:  # s >= kth leaves NaN out: those queries take the full pass
        settled &= ~values[:, :k].isnan().any(dim=1)
    if bool(settled.all()):
        return _TopkLists(index[:, :k], torch.ones(n_q, k, dtype=torch.bool), False)
    tied = ~settled
    # the window holds every entry >= kth when its last entry is below kth (rounding to float32
    # is monotone: an entry >= the float64 k-th score rounds to >= kth)
    inside = tied & (values[:, -1] < kth)
    if has_nan is not None:
        inside &= ~has_nan
    queries, positions = [], []
    # near: each tied query's window entries; far: its whole list ([T, window] / [T, n])
    for group, lists in (
        (inside, lambda q: index[q]),
        (tied & ~inside, lambda q: torch.arange(n).expand(len(q), n)),
    ):
        q = group.nonzero().squeeze(1)
        if not len(q):
            continue
        where = lists(q)
        exact = rows[q[:, None], where]  # the entries' scores in ``scores``
        kth_exact = exact.topk(k, dim=1).values[:, k - 1] if coarse is not None else kth[q]
        which, slot = (exact >= kth_exact[:, None]).nonzero(as_tuple=True)
        queries.append(q[which])
        positions.append(where[which, slot])
    query, position = torch.cat(queries), torch.cat(positions)
    if len(queries) > 1:  # by query (stable: positions keep their order)
        order = torch.sort(query, stable=True).indices
        query, position = query[order], position[order]
    counts = torch.bincount(query, minlength=n_q)
    width = max(k, int(counts.max()))
    padded = torch.zeros(n_q, width, dtype=torch.int64)
    valid = torch.zeros(n_q, width, dtype=torch.bool)
    padded[:, :k], valid[:, :k] = index[:, :k], True
    padded[tied], valid[tied] = 0, False
    slot = torch.arange(len(query)) - (counts.cumsum(0) - counts)[query]
    padded[query, slot], valid[query, slot] = position, True
    return _TopkLists(padded, valid, True)


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
# ITM re-scoring of each query's top-k (METHOD §3 step 2): the part after the model
# --------------------------------------------------------------------------------------------
class ItmScores(NamedTuple):
    """S_raw after ITM re-scoring (:func:`itm_scores`), every field a :class:`RankingScores`.

    Attributes:
        s_raw: the order, [N_img, N_txt] float64: S_itc + p_match on each query's candidates,
            S_itc - max(gap, range + 1) elsewhere (below every candidate, in ITC order).
        s_prob: the same scores without the gap: S_itc + p_match on the query's candidates,
            S_itc elsewhere. SMR's softmaxes read these: with the gap, every probability off a
            query's candidates would be ~exp(-gap/τ_s) = 0 and W_map would collapse to "is a
            candidate in both directions".
        candidates: bool masks, each query's top-k by S_itc (ties at the boundary kept).
    """

    s_raw: RankingScores
    s_prob: RankingScores
    candidates: RankingScores


def itm_candidates(s_itc: Tensor, k: int) -> RankingScores:
    """Bool [N_img, N_txt] masks: each image's top-k captions (``i2t``, per row) and each
    caption's top-k images (``t2i``, per column) by S_itc, ties at the boundary kept.

    For k' <= k the masks of k' lie inside those of k, so probabilities computed once for the
    largest k of a grid serve every smaller one.
    """
    s = _matrix(s_itc, "s_itc")
    return RankingScores(topk_mask(s, k, dim=1), topk_mask(s, k, dim=0))


def itm_scores(s_itc: Tensor, p_match: Tensor, k: int, gap: float = NON_CANDIDATE_GAP) -> ItmScores:
    """S_raw = S_itc + p_match on each query's top-k (METHOD §3 step 2), per direction.

    Image query i re-orders its top-k captions (row) by S_itc + p_match, caption query j its
    top-k images (column); every other entry keeps its ITC order below them, shifted by
    max(``gap``, range + 1) (ALBEF fills them with -100; the shift keeps their ITC order too).

    Args:
        s_itc: [N_img, N_txt] S_itc.
        p_match: [N_img, N_txt] ITM match probabilities, known (not NaN) at least on the union
            of both directions' top-k (:func:`cmpagl.retrieval.itm_rescore` scores them, NaN
            elsewhere); values off the candidates are ignored.
        k: candidates per query; gap: the least shift of the non-candidates.

    Returns:
        :class:`ItmScores` (the order, the gap-free scores for SMR, the candidate masks).
    """
    s = _matrix(s_itc, "s_itc")
    p = _matrix(p_match, "p_match")
    if p.shape != s.shape:
        raise ValueError(f"p_match is {tuple(p.shape)} but s_itc is {tuple(s.shape)}")
    cand = itm_candidates(s, k)
    union = cand.i2t | cand.t2i
    if bool(p[union].isnan().any()):
        raise ValueError(
            f"p_match is unknown (NaN) for some top-{k} candidates: score at least each "
            f"query's top-{k} (cmpagl.retrieval.itm_rescore with k >= {k})"
        )
    rescored = s + torch.where(union, p, torch.zeros_like(p))
    return ItmScores(
        s_raw=RankingScores(
            _place_above(s, rescored, cand.i2t, gap), _place_above(s, rescored, cand.t2i, gap)
        ),
        s_prob=RankingScores(
            torch.where(cand.i2t, rescored, s), torch.where(cand.t2i, rescored, s)
        ),
        candidates=cand,
    )


# --------------------------------------------------------------------------------------------
# SMR: similarity matrix reweighting (METHOD §3 step 3, Fig. 4)
# --------------------------------------------------------------------------------------------
def _check_tau(tau: float, name: str = "tau_s") -> float:
    if not isinstance(tau, int | float) or isinstance(tau, bool) or not tau > 0:
        raise ValueError(f"{name} must be a positive number, got {tau!r}")
    return float(tau)


def _check_scale(scale: str) -> str:
    if scale not in SMR_SCALES:
        raise ValueError(f"scale must be one of {SMR_SCALES}, got {scale!r}")
    return scale


def _scale_on_topk(log_w: Tensor, mask: Tensor, dim: int, scale: str) -> Tensor:
    """W_map kept on the mask (each query's top-k) and scaled per query to [0, 1], from log W.

    ``max``: W / max. ``minmax``: (W - min) / (max - min), so the query's least mutual
    candidate gets 0. Degenerate case (one candidate, or all equal): the entries carry no
    order, and both scalings give 1 to every candidate, a uniform shift of the query's top-k
    that leaves its list unchanged.
    """
    masked = log_w.masked_fill(~mask, float("-inf"))
    top = masked.amax(dim=dim, keepdim=True).nan_to_num(neginf=0.0)
    ratio = torch.exp(masked - top)  # W / max in (0, 1]; exp(-inf) = 0 off the top-k
    if scale == "max":
        return ratio
    low = ratio.masked_fill(~mask, float("inf")).amin(dim=dim, keepdim=True)
    span = 1.0 - low  # (max - min) / max
    flat = span <= 0.0
    scaled = (ratio - low) / torch.where(flat, torch.ones_like(span), span)
    return torch.where(flat, torch.ones_like(ratio), scaled).masked_fill(~mask, 0.0)


# exp(x - max x) of an entry at most this far below the maximum is a normal float64
# (underflow starts near e^-708), so one shift serves every row and column sum.
ONE_SHIFT_RANGE = 700.0


def log_normalizers(x: Tensor, scratch: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The two softmax normalizers of ``x`` [N, M]: log Σ_j exp(x[i, j]) per row, [N], and
    log Σ_i exp(x[i, j]) per column, [M], from a single exp of the matrix.

    c = max(x) shifts every entry, so exp(x - c) <= 1 never overflows and, while
    max(x) - min(x) <= :data:`ONE_SHIFT_RANGE`, no entry underflows either; both sums are then
    read off the same exp(x - c) and c is added back. A wider range (a very small τ_s) or a
    non-finite entry falls back to ``torch.logsumexp`` per dimension (a shift per row and per
    column). ``scratch`` (contiguous, the shape of ``x``; may be ``x`` itself) receives
    exp(x - c) instead of a fresh matrix. log_softmax(x, dim) = x - the normalizer.
    """
    low, high = torch.aminmax(x)
    if (
        not (bool(torch.isfinite(low)) and bool(torch.isfinite(high)))
        or float(high - low) > ONE_SHIFT_RANGE
    ):
        return torch.logsumexp(x, 1), torch.logsumexp(x, 0)
    e = torch.sub(x, high, out=scratch) if scratch is not None else x - high
    e.exp_()
    return e.sum(1).log_().add_(high), e.sum(0).log_().add_(high)


class _SparseW(NamedTuple):
    """W_map of one direction on its queries' top-k entries (it is 0 everywhere else)."""

    flat: Tensor  # [n] int64 offsets in a contiguous [N_img, N_txt] matrix
    w: Tensor  # [n] float64

    def dense(self, out: Tensor) -> Tensor:
        """``out`` (contiguous [N_img, N_txt]) overwritten with W: 0 off the top-k."""
        out.zero_().view(-1)[self.flat] = self.w
        return out

    def add_to(self, s: Tensor, lam: float, out: Tensor) -> Tensor:
        """``out`` (contiguous [N_img, N_txt]) = S + λ·W, ``s`` of any strides; the same
        numbers as the dense S + λ·W (S + λ·0 = S)."""
        if not math.isfinite(lam):  # λ·0 is NaN off the top-k: the dense formula says so
            return s + lam * self.dense(out)
        out.copy_(s).view(-1)[self.flat] = torch.take(s, self.flat) + lam * self.w
        return out


def _cpu(s: RankingScores) -> RankingScores:
    """The pair on the CPU (the fast paths use numpy and CPU scratch), a shared matrix kept
    shared."""
    i2t = s.i2t.cpu()
    return RankingScores(i2t, i2t if s.t2i is s.i2t else s.t2i.cpu())


def _smr_inputs(
    s_raw: Tensor | RankingScores, s_prob: Tensor | RankingScores | None
) -> tuple[RankingScores, RankingScores]:
    s = _cpu(as_ranking(s_raw))
    p = s if s_prob is None else _cpu(as_ranking(s_prob))
    if p.i2t.shape != s.i2t.shape:
        raise ValueError(f"s_prob is {tuple(p.i2t.shape)} but s_raw is {tuple(s.i2t.shape)}")
    return s, p


def _smr_sparse(
    s: RankingScores,
    p: RankingScores,
    tau_s: float,
    k: int,
    scale: str,
    scratch: Tensor,
) -> tuple[_SparseW, _SparseW]:
    """W_map of both directions on each query's top-k: ``(W_i2t, W_t2i)``.

    ``scratch`` (contiguous [N_img, N_txt] float64, overwritten) holds the normalizers' exp of
    the matrix; callers pass one of their output matrices. The numbers are those of the dense
    formula (:func:`smr_weights`; ``benchmarks/rerank_reference.py``), bit for bit: log W at an
    entry is (x_i2t - row normalizer) + (x_t2i - column normalizer) with x = S_prob / τ_s, the
    normalizers taken over the whole matrix by :func:`log_normalizers` (one exp of the matrix,
    shared by both directions when S_prob is one matrix), and only the top-k entries of log W
    are formed and scaled.
    """
    n_txt = s.i2t.shape[1]
    coarse_i2t = coarse_scores(s.i2t)
    coarse_t2i = coarse_i2t if s.t2i is s.i2t else coarse_scores(s.t2i)
    lists = (_topk_lists(s.i2t, k, 1, coarse_i2t), _topk_lists(s.t2i, k, 0, coarse_t2i))
    del coarse_i2t, coarse_t2i
    row_norm, col_norm = log_normalizers(torch.div(p.i2t, tau_s, out=scratch), scratch=scratch)
    if p.t2i is not p.i2t:  # a pair after ITM: the columns read another matrix
        col_norm = log_normalizers(torch.div(p.t2i, tau_s, out=scratch), scratch=scratch)[1]
    sparse = []
    # offsets in [N_img, N_txt]: an image query lists columns, a caption query lists rows
    for top, flat, image, caption in (
        (lists[0], lists[0].flat(n_txt, 1), lists[0].query_index(), lists[0].index),
        (lists[1], lists[1].flat(1, n_txt), lists[1].index, lists[1].query_index()),
    ):
        x_i2t = p.i2t.take(flat) / tau_s
        x_t2i = x_i2t if p.t2i is p.i2t else p.t2i.take(flat) / tau_s
        log_w = (x_i2t - row_norm[image]) + (x_t2i - col_norm[caption])
        w = _scale_on_topk(log_w, top.valid, 1, scale)
        sparse.append(_SparseW(top.entries(flat), top.entries(w)))
    return sparse[0], sparse[1]


def _new_outputs(shape: torch.Size) -> tuple[Tensor, Tensor]:
    """Two contiguous [N_img, N_txt] float64 matrices for an S_opt (or W) pair, on huge pages
    (:mod:`cmpagl.hugepages`: far fewer page faults when they are first written)."""
    return hugepages.empty(shape), hugepages.empty(shape)


def smr_weights(
    s_raw: Tensor | RankingScores,
    tau_s: float,
    k: int,
    *,
    s_prob: Tensor | RankingScores | None = None,
    scale: str = "max",
) -> RankingScores:
    """SMR's re-ranking probability weighted matrix W_map, masked and scaled per direction.

    P_i2t = row-softmax(S.i2t / τ_s), P_t2i = column-softmax(S.t2i / τ_s) and
    W_map = P_i2t ⊙ P_t2i, the probability that image and caption pick each other (computed in
    log space, log P = x - :func:`log_normalizers`: the product of two small probabilities
    underflows float32). S is ``s_prob`` when given (after ITM: :attr:`ItmScores.s_prob`, the
    scores without the non-candidate gap), else ``s_raw``. W_i2t keeps W_map on each row's
    top-k of S_raw.i2t, W_t2i on each column's top-k of S_raw.t2i, scaled per query to [0, 1]
    (``scale``: ``max`` or ``minmax``, see :func:`_scale_on_topk`). A plain matrix stands for
    the pair (S, S).

    Returns:
        (W_i2t, W_t2i), [N_img, N_txt] float64 in [0, 1], 1 at each query's most mutual pair.
    """
    s, p = _smr_inputs(s_raw, s_prob)
    tau_s, scale = _check_tau(tau_s), _check_scale(scale)
    outs = _new_outputs(s.i2t.shape)
    w = _smr_sparse(s, p, tau_s, k, scale, scratch=outs[0])
    return RankingScores(*(w_d.dense(out) for w_d, out in zip(w, outs, strict=True)))


def smr(
    s_raw: Tensor | RankingScores,
    tau_s: float,
    k: int,
    lam: float,
    *,
    s_prob: Tensor | RankingScores | None = None,
    scale: str = "max",
) -> RankingScores:
    """S_opt = S_raw + λ·W_map per direction (METHOD §3, Fig. 4); see :func:`smr_weights`.

    λ = 0 returns S_raw unchanged. W >= 0 only on each query's top-k, so SMR re-orders each
    query's top-k and leaves the rest of its list as it was.

    Args:
        s_raw: [N_img, N_txt] S_raw (S_itc, or :attr:`ItmScores.s_raw`).
        tau_s: τ_s > 0; k: top-k per query; lam: λ >= 0.
        s_prob: the scores the softmaxes read (:attr:`ItmScores.s_prob` after ITM).
        scale: ``max`` or ``minmax`` (``retrieval.smr_scale``).

    Returns:
        :class:`RankingScores` (S_opt for i2t, S_opt for t2i), float64.
    """
    return smr_scorer(s_raw, s_prob=s_prob, scale=scale)(tau_s, k, lam)


def smr_scorer(
    s_raw: Tensor | RankingScores,
    *,
    s_prob: Tensor | RankingScores | None = None,
    scale: str = "max",
    reuse_outputs: bool = False,
) -> Callable[..., RankingScores]:
    """``(tau_s, k, lam) -> S_opt`` on fixed scores; W_map is reused while (τ_s, k) repeat.

    λ only scales W, so a grid that varies λ fastest computes one W per (τ_s, k). W is kept
    on the top-k entries only (:func:`_smr_sparse`); S_opt is a copy of S_raw with λ·W added
    there, the same numbers as the dense S_raw + λ·W.

    ``reuse_outputs``: every call writes its S_opt pair into the same two matrices, so a
    result is valid only until the next call (a grid search that reads each point's score
    and drops it). Two new [N_img, N_txt] float64 matrices cost the kernel's zeroing of their
    pages, a third of a call at the RSICD test size on 2 cores.
    """
    s = _cpu(as_ranking(s_raw))
    cache: dict[tuple[float, int], tuple[_SparseW, _SparseW]] = {}
    kept: list[Tensor] = []  # the two output matrices, with reuse_outputs

    def score(tau_s: float, k: int, lam: float) -> RankingScores:
        if not lam >= 0:
            raise ValueError(f"lam (λ) must be >= 0, got {lam!r}")
        outs = tuple(kept) or _new_outputs(s.i2t.shape)
        if (tau_s, k) not in cache:
            cache.clear()  # keep one W
            _, p = _smr_inputs(s, s_prob)
            tau, sc = _check_tau(tau_s), _check_scale(scale)
            cache[tau_s, k] = _smr_sparse(s, p, tau, k, sc, scratch=outs[0])
        if reuse_outputs:
            kept[:] = outs
        return RankingScores(
            *(
                w_d.add_to(s_d, lam, out)
                for w_d, s_d, out in zip(cache[tau_s, k], s, outs, strict=True)
            )
        )

    return score


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


def _count_greater(lists: Tensor, which: Tensor, values: Tensor, scratch: Tensor) -> Tensor:
    """[n] int64: how many entries of list ``which[i]`` (a row of ``lists`` [n_lists, L]) are
    strictly greater than ``values[i]``.

    Few values: each is compared with its whole list (n·L comparisons, in chunks). Many: the
    lists are sorted once into ``scratch`` (contiguous, the shape of ``lists``) and each value
    is found by binary search, log2(L) vectorised steps. A comparison costs about four steps
    of a sort, hence the switch. numpy: it sorts float64 several times faster than torch, and
    its small steps make no thread-pool round trips.
    """
    n_lists, n = lists.shape
    if 4 * len(values) < n_lists * n.bit_length():
        rows, which_np, v = lists.numpy(), which.numpy(), values.numpy()
        chunk = max(1, 2**20 // n)
        return torch.from_numpy(
            np.concatenate(
                [
                    np.count_nonzero(rows[which_np[i : i + chunk]] > v[i : i + chunk, None], 1)
                    for i in range(0, len(v), chunk)
                ]
                or [np.zeros(0, dtype=np.int64)]
            ).astype(np.int64)
        )
    scratch.copy_(lists)
    ascending = scratch.numpy()
    ascending.sort(axis=1)
    flat, start, v = ascending.reshape(-1), which.numpy() * n, values.numpy()
    lo, hi = np.zeros(len(v), dtype=np.int64), np.full(len(v), n, dtype=np.int64)
    for _ in range(n.bit_length()):  # the first entry above v lies in [lo, hi]
        open_ = lo < hi  # lo = hi: found (mid may then be n, past the list)
        mid = (lo + hi) // 2
        above = flat[start + np.minimum(mid, n - 1)] > v
        lo = np.where(open_ & ~above, mid + 1, lo)
        hi = np.where(open_ & above, mid, hi)
    return torch.from_numpy(n - lo)


def _galr_candidates(
    rows: Tensor,
    columns: Tensor,
    column_sums: Tensor,
    params: tuple[int, float, float, float],
    scratch: Tensor,
    transposed: bool,
) -> tuple[Tensor, Tensor]:
    """GaLR's new scores of each query's top-k candidates; queries are the rows of ``rows``.

    Args:
        rows: [Q, C] scores, a query per row (contiguous: top-k and gathers run along rows).
        columns: [C, Q] the same scores, a candidate's own list per row (rows transposed).
        column_sums: [C] Σ_q' rows[q', c], p1's denominators.
        params: (k, wp1, wp2, decay); scratch: a spare contiguous [C, Q] float64 matrix.
        transposed: ``rows`` is S^T (caption queries), not S.

    Returns:
        (offset [n] of each candidate in a contiguous [N_img, N_txt] matrix, new score [n]).

    Only each query's candidates get new scores, so only their ranks are needed: the forward
    rank counts the candidates above it (every score above a candidate is a candidate), the
    backward rank counts the entries above it in its own list (:func:`_count_greater`).
    """
    k, wp1, wp2, decay = params
    n_q, n_c = rows.shape
    top = _topk_lists(rows, k)
    v = rows.take(top.flat(n_c, 1))  # [Q, K] the candidates' scores
    if top.padded:  # padding counts as -inf (never above a candidate)
        forward = competition_rank(v.masked_fill(~top.valid, float("-inf")), dim=1)
        backward = torch.zeros_like(top.index)
        backward[top.valid] = _count_greater(columns, top.entries(top.index), v[top.valid], scratch)
    else:
        forward = competition_rank(v, dim=1)
        backward = _count_greater(columns, top.index.reshape(-1), v.reshape(-1), scratch)
        backward = backward.view(top.index.shape)
    p1 = v / column_sums[top.index]  # "saliency": share of c's total similarity
    p2 = torch.exp(-decay * (forward + 1).double())
    # Candidates of a query ordered by backward rank (forward rank breaks ties); their position
    # in that order gives p3. Padding sorts last and does not count.
    key = (backward * (n_c + 1) + forward).double().masked_fill(~top.valid, float("inf"))
    position = competition_rank(-key, dim=1)
    p3 = torch.exp(-decay * (position + 1).double())
    flat = top.flat(1, n_q) if transposed else top.flat(n_c, 1)
    return top.entries(flat), top.entries(wp1 * p1 + p2 + wp2 * p3)


def _place_candidates(s: Tensor, flat: Tensor, values: Tensor, out: Tensor) -> Tensor:
    """:func:`_place_above` (gap 0) with the mask given by offsets ``flat``, into ``out``."""
    if not len(values):
        return out.copy_(s)
    shift = max(0.0, float(s.max() - values.min()) + 1.0)
    torch.sub(s, shift, out=out).view(-1)[flat] = values
    return out


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
    s = _matrix(s).cpu()
    n_img, n_txt = s.shape
    params = (k, wp1, wp2, decay)
    # The two outputs serve as scratch first: S transposed (each caption's list, contiguous),
    # and the sorted lists of _count_greater. Numbers as in the dense formulas, bit for bit.
    out_i2t, out_t2i = _new_outputs(torch.Size((n_img, n_txt)))
    columns = out_i2t.view(n_txt, n_img).copy_(s.T)
    # The column sums are taken as the dense code takes them (the same summation order)
    i2t = _galr_candidates(s, columns, s.sum(dim=0), params, out_t2i.view(n_txt, n_img), False)
    t2i = _galr_candidates(columns, s, s.T.sum(dim=0), params, out_t2i, True)
    return RankingScores(_place_candidates(s, *i2t, out_i2t), _place_candidates(s, *t2i, out_t2i))


# --------------------------------------------------------------------------------------------
# Metrics of a (i2t, t2i) pair, and the validation grid search of every re-ranker
# --------------------------------------------------------------------------------------------
def evaluate_ranking(
    scores: Tensor | RankingScores,
    txt2img: Tensor | np.ndarray,
    caption_texts: Sequence[str] | None = None,
    ks: Sequence[int] = DEFAULT_KS,
) -> dict[str, float]:
    """:func:`cmpagl.metrics.evaluate_retrieval` of a :class:`RankingScores` pair (METHOD §4).

    ``txt_*`` (image->text) keys come from ``scores.i2t``, ``img_*`` keys from ``scores.t2i``,
    each direction's rank statistics computed once. A plain matrix gives exactly
    ``evaluate_retrieval(scores, ...)``.
    """
    s = as_ranking(scores)
    other = None if s.i2t is s.t2i else s.t2i
    return evaluate_retrieval(s.i2t, txt2img, caption_texts, ks, scores_t2i=other)


CRITERIA: tuple[str, ...] = ("r_mean", "dup_r_mean")


def _criterion_fn(
    txt2img, captions: Sequence[str] | None, criterion: str
) -> Callable[[RankingScores], float]:
    """The validation criterion of a pair: expected ``r_mean`` or ``dup_r_mean``."""
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    if criterion == "dup_r_mean" and captions is None:
        raise ValueError("criterion 'dup_r_mean' needs captions_val")
    groups = caption_groups(captions) if criterion == "dup_r_mean" else None

    def value(s: RankingScores) -> float:
        kw = {"caption_groups": groups, "scores_t2i": s.t2i}
        return recall_at_k(s.i2t, txt2img, **kw)["r_mean"]

    return value


@dataclass
class GridSearch:
    """What :func:`grid_search` chose, and everything it tried.

    Attributes:
        params: the chosen setting, or None when "no re-ranking" won.
        value: the validation criterion at the choice.
        off_value: the criterion without re-ranking (None if that was not a candidate).
        axes: the values tried per setting, in search order (the grid is their product).
        table: one row per evaluated point, in order: ``{"off": True, <criterion>}`` first
            (if tried), then ``{<setting>: value, ..., <criterion>}``.
        criterion: ``r_mean`` or ``dup_r_mean``.
    """

    params: dict[str, Any] | None
    value: float
    off_value: float | None
    axes: dict[str, list]
    table: list[dict[str, Any]]
    criterion: str

    @property
    def size(self) -> int:
        """Points evaluated, "no re-ranking" included."""
        return len(self.table)

    def on_edge(self) -> dict[str, bool | None]:
        """Per setting: is the chosen value the smallest or largest of its axis?

        None for an axis of one value (nothing to be on the edge of) and for every axis when
        "no re-ranking" won. A chosen value on the edge says the optimum may lie outside.
        """
        out: dict[str, bool | None] = {}
        for name, values in self.axes.items():
            if self.params is None or len(set(values)) < 2:
                out[name] = None
            else:
                out[name] = self.params[name] in (min(values), max(values))
        return out


def grid_search(
    rerank_fn: Callable[..., Tensor | RankingScores],
    s_val: Tensor | RankingScores,
    txt2img_val: Tensor | np.ndarray,
    axes: Mapping[str, Sequence[Any]],
    captions_val: Sequence[str] | None = None,
    *,
    criterion: str = "r_mean",
    with_off: bool = True,
) -> GridSearch:
    """Choose a re-ranker's settings on the VALIDATION split (METHOD §3): one routine for all.

    The grid is the product of ``axes`` (the last axis varies fastest). "No re-ranking"
    (``s_val`` itself) is tried first when ``with_off``; then every point, scored by
    ``rerank_fn(**point)``. The criterion is the exact-tie expected ``r_mean`` of the directed
    scores (or ``dup_r_mean``, which needs ``captions_val``). The earliest best wins and only a
    strict improvement (by more than :data:`GRID_TOLERANCE`) counts, so a re-ranker is kept
    only when it beats no re-ranking on validation, and among equals the earlier point wins.

    Args:
        rerank_fn: settings -> [N_img, N_txt] scores (matrix or pair) of the val split.
        s_val: the val scores the re-ranker starts from ("no re-ranking").
        txt2img_val: [N_txt] int; axes: setting name -> values (each non-empty).

    Returns:
        :class:`GridSearch`.
    """
    axes = {name: list(values) for name, values in axes.items()}
    empty = [name for name, values in axes.items() if not values]
    if not axes or empty:
        raise ValueError(f"every grid axis needs at least one value; empty: {empty or 'all'}")
    value_of = _criterion_fn(txt2img_val, captions_val, criterion)
    table: list[dict[str, Any]] = []
    best, best_value, off_value = None, float("-inf"), None
    if with_off:
        off_value = best_value = value_of(as_ranking(s_val))
        table.append({"off": True, criterion: off_value})
    for point in itertools.product(*axes.values()):
        params = dict(zip(axes, point, strict=True))
        value = value_of(as_ranking(rerank_fn(**params)))
        table.append({**params, criterion: value})
        if value > best_value + GRID_TOLERANCE:  # rounding noise is not a gain
            best, best_value = params, value
    return GridSearch(best, best_value, off_value, axes, table, criterion)


def _check_grid(grid_tau, grid_k, grid_lambda) -> tuple[list[float], list[int], list[float]]:
    if not (len(grid_tau) and len(grid_k) and len(grid_lambda)):
        raise ValueError("grid_tau, grid_k and grid_lambda must each hold at least one value")
    taus = [_check_tau(t) for t in grid_tau]
    for k in grid_k:
        topk_mask(torch.zeros(1, 1), k, dim=1)  # validates k
    if any(not lam >= 0 for lam in grid_lambda):
        raise ValueError(f"grid_lambda values must be >= 0, got {tuple(grid_lambda)}")
    return taus, [int(k) for k in grid_k], [float(lam) for lam in grid_lambda]


def smr_axes(
    grid_tau: Sequence[float], grid_k: Sequence[int], grid_lambda: Sequence[float]
) -> dict[str, list]:
    """SMR's checked grid axes ``{tau_s, k, lam}``; λ = 0 is dropped (it is "no re-ranking",
    which :func:`grid_search` always tries first)."""
    taus, ks, lambdas = _check_grid(grid_tau, grid_k, grid_lambda)
    lambdas = [lam for lam in lambdas if lam != 0]
    if not lambdas:
        raise ValueError("grid_lambda needs a value > 0 (λ = 0 is always tried)")
    return {"tau_s": taus, "k": ks, "lam": lambdas}


def grid_search_smr(
    s_raw_val: Tensor | RankingScores,
    txt2img_val: Tensor | np.ndarray,
    captions_val: Sequence[str] | None = None,
    grid_tau: Sequence[float] = (0.01, 0.02, 0.05, 0.1),
    grid_k: Sequence[int] = (5, 10, 20),
    grid_lambda: Sequence[float] = (0.05, 0.1, 0.2, 0.5, 1.0),
    *,
    criterion: str = "r_mean",
    s_prob_val: Tensor | RankingScores | None = None,
    scale: str = "max",
) -> tuple[SmrParams, GridSearch]:
    """SMR's (τ_s, k, λ) chosen on the VALIDATION split by :func:`grid_search`.

    λ = 0 (no re-ranking) is tried first; SMR is chosen only when it strictly improves the
    validation criterion. When it does not, the result is (τ_s, k) = the first grid values
    and λ = 0, which returns S_raw unchanged.

    Args:
        s_raw_val: [N_img, N_txt] val S_raw (matrix or pair); txt2img_val: [N_txt] int.
        s_prob_val: the val scores SMR's softmaxes read (after ITM, without the gap).
        scale: how W_map is scaled (``max`` or ``minmax``).

    Returns:
        (best :class:`SmrParams`, the :class:`GridSearch`).
    """
    axes = smr_axes(grid_tau, grid_k, grid_lambda)
    _check_scale(scale)
    # each point is scored and dropped before the next: its two output matrices serve them all
    score = smr_scorer(s_raw_val, s_prob=s_prob_val, scale=scale, reuse_outputs=True)
    found = grid_search(score, s_raw_val, txt2img_val, axes, captions_val, criterion=criterion)
    if found.params is None:
        return SmrParams(axes["tau_s"][0], axes["k"][0], 0.0), found
    return SmrParams(**found.params), found
