"""Retrieval metrics for image-text retrieval, exact under ties (METHOD.md §4).

Protocol (METHOD §4):

* image→text (i2t, ALBEF keys ``txt_r*``): an image's rank is the best rank among its
  ground-truth captions (any number per image, not only 5);
* text→image (t2i, ALBEF keys ``img_r*``): a caption's rank is the rank of its image;
* R@K in percent for K in ``ks`` (1, 5, 10) in both directions; ``r_mean`` is their mean.

Ties are real: identical caption texts get identical embeddings, so in i2t they tie exactly.
Argsort tie-breaking (the public evaluators) makes recall depend on the order of the caption
file. Here R@K is the *exact expectation* under a uniformly random order of tied items, and a
pessimistic variant (every tied negative ranked ahead) is reported beside it. The public
evaluators' index convention (``ties="index"``, see `TieRanks.index_rank`) is reported too, with
an ``_index`` suffix, so that our numbers can be set beside published ones.

Every query reduces to three counts about its best positive score ``s*`` (see `TieRanks`):
``a`` negatives strictly above ``s*``, ``n`` negatives equal to ``s*`` and ``p >= 1`` positives
equal to ``s*``. Under a random order of the ``n + p`` tied items, the number ``j`` of tied
negatives ahead of the first tied positive has ``P(j >= r) = C(n, r) / C(n + p, r)``, the best
rank is ``a + j`` (0-based), so ``P(rank < K) = 1 - P(j >= K - a)``. With one positive (t2i)
this is ``clip((K - a) / (n + 1), 0, 1)``.

The duplicate-aware recall and the oracle upper bound (METHOD §4) reuse the same machinery:
captions are grouped by normalised text (`caption_groups`), and "positive" becomes "shares a
normalised text with the ground truth".
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

ArrayLike = torch.Tensor | np.ndarray | Sequence
DEFAULT_KS: tuple[int, ...] = (1, 5, 10)
# "both": expected keys plus ``*_pess``; "all": expected, ``*_pess`` and ``*_index``.
TIE_MODES: tuple[str, ...] = ("expected", "pessimistic", "index", "both", "all")
# Bound on the elements of one [queries, candidates] block, so that a 10k x 50k matrix is
# processed in slices of a few hundred MB instead of several GB of temporaries.
DEFAULT_MAX_ELEMENTS = 1 << 23

_TRAILING_PUNCT = ".,;:!?"
_PUNCT = frozenset(string.punctuation)


# --------------------------------------------------------------------------------------------
# Per-query rank statistics
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TieRanks:
    """Exact rank statistics of each query's best-ranked positive, Q queries.

    Attributes:
        above: [Q] int64, ``a``: negatives scoring strictly above the best positive score s*.
        tied_neg: [Q] int64, ``n``: negatives scoring exactly s*.
        tied_pos: [Q] int64, ``p >= 1``: positives scoring exactly s*.
        index_ahead: [Q] int64 or None: the tied negatives that the index convention places
            ahead of the first tied positive (see `index_rank`); None where not computed
            (`oracle_ranks`).

    Ranks are 0-based: rank 0 is the top of the list.
    """

    above: torch.Tensor
    tied_neg: torch.Tensor
    tied_pos: torch.Tensor
    index_ahead: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.above.numel())

    @property
    def optimistic_rank(self) -> torch.Tensor:
        """[Q] int64: best rank when every tie breaks in the query's favour (``a``)."""
        return self.above

    @property
    def pessimistic_rank(self) -> torch.Tensor:
        """[Q] int64: best rank when every tied negative is ranked ahead (``a + n``)."""
        return self.above + self.tied_neg

    @property
    def expected_rank(self) -> torch.Tensor:
        """[Q] float64: expected best rank under a random tie order, ``a + n / (p + 1)``."""
        # The p positives cut the n tied negatives into p + 1 equally likely gaps.
        return self.above.double() + self.tied_neg.double() / (self.tied_pos.double() + 1.0)

    @property
    def index_rank(self) -> torch.Tensor:
        """[Q] int64: best rank under the public evaluators' index convention.

        The SCAN/ALBEF evaluators rank a query's candidates by ``np.argsort(score)[::-1]`` and
        take the first position of a ground-truth index. NumPy's default sort is not stable,
        and which of several tied items it puts first depends on the NumPy version and the CPU
        (NumPy 2.x sorts with SIMD kernels). This convention is the deterministic reading of
        that line with a stable sort, ``np.argsort(score, kind="stable")[::-1]``: scores in
        decreasing order and, among equal scores, the **larger candidate index first** (the
        later caption of the caption file in image->text, the later image in text->image).
        So the rank is ``a`` plus the tied negatives whose index exceeds the largest index of
        a tied positive. Without ties it equals every other rank here.
        """
        if self.index_ahead is None:
            raise ValueError("these TieRanks carry no index-order counts (index_ahead is None)")
        return self.above + self.index_ahead

    def hit_probability(self, ks: Sequence[int] = DEFAULT_KS) -> torch.Tensor:
        """[Q, len(ks)] float64: exact ``P(best rank < K)`` under a random tie order."""
        return hit_probability(self, ks)

    def pessimistic_hits(self, ks: Sequence[int] = DEFAULT_KS) -> torch.Tensor:
        """[Q, len(ks)] float64 in {0, 1}: ``pessimistic_rank < K``."""
        k = torch.tensor(_check_ks(ks), dtype=torch.long)
        return (self.pessimistic_rank[:, None] < k[None, :]).double()

    def index_hits(self, ks: Sequence[int] = DEFAULT_KS) -> torch.Tensor:
        """[Q, len(ks)] float64 in {0, 1}: ``index_rank < K`` (the public evaluators' hits)."""
        k = torch.tensor(_check_ks(ks), dtype=torch.long)
        return (self.index_rank[:, None] < k[None, :]).double()


def hit_probability(ranks: TieRanks, ks: Sequence[int] = DEFAULT_KS) -> torch.Tensor:
    """Exact probability that each query's best positive lands in the top K.

    Args:
        ranks: statistics of Q queries (`i2t_ranks`, `t2i_ranks`).
        ks: cut-offs K.

    Returns:
        [Q, len(ks)] float64: ``1 - C(n, r) / C(n + p, r)`` with ``r = K - a`` (0 if r <= 0,
        1 if r > n), computed in log space so that large tie groups do not overflow.
    """
    k = torch.tensor(_check_ks(ks), dtype=torch.float64)
    a = ranks.above.double()[:, None]
    n = ranks.tied_neg.double()[:, None]
    p = ranks.tied_pos.double()[:, None]
    r = k[None, :] - a  # tied negatives that may precede the first positive and still hit
    r_ok = r.clamp(min=0.0).minimum(n)  # keeps lgamma arguments >= 1 where r is out of range
    log_miss = (
        torch.lgamma(n + 1.0)
        - torch.lgamma(n - r_ok + 1.0)
        - torch.lgamma(n + p + 1.0)
        + torch.lgamma(n + p - r_ok + 1.0)
    )
    prob = -torch.expm1(log_miss)
    prob = torch.where(r <= 0, torch.zeros_like(prob), prob)
    return torch.where(r > n, torch.ones_like(prob), prob)


# --------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------
def _as_tensor(x: ArrayLike, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach()
    try:
        return torch.as_tensor(np.asarray(x))
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be a torch tensor or numpy array: {err}") from err


def _check_scores(scores: ArrayLike) -> torch.Tensor:
    s = _as_tensor(scores, "scores")
    if s.ndim != 2 or s.numel() == 0:
        raise ValueError(f"scores must be a non-empty [N_img, N_txt] matrix, got {tuple(s.shape)}")
    if s.is_complex():
        raise ValueError("scores must be real-valued")
    if not s.is_floating_point():
        # Integer/bool scores: float64 is exact up to 2**53 and allows the -inf fill below.
        s = s.to(torch.float64)
    if torch.isnan(s.amax()):  # max propagates NaN: one reduction, no [N, M] mask
        raise ValueError("scores contain NaN; ranks would be undefined")
    return s


def _check_txt2img(txt2img: ArrayLike, n_img: int | None, n_txt: int | None) -> torch.Tensor:
    t = _as_tensor(txt2img, "txt2img")
    if t.ndim != 1 or t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise ValueError(
            f"txt2img must be a 1-D integer array [N_txt], got {t.dtype} {tuple(t.shape)}"
        )
    t = t.long()
    if n_txt is not None and t.numel() != n_txt:
        raise ValueError(
            f"txt2img has {t.numel()} entries but scores has {n_txt} columns (N_txt); "
            "scores must be [N_img, N_txt]"
        )
    if t.numel() == 0:
        raise ValueError("txt2img is empty")
    if int(t.min()) < 0 or (n_img is not None and int(t.max()) >= n_img):
        raise ValueError(
            f"txt2img values must lie in [0, {n_img}) (N_img), got range "
            f"[{int(t.min())}, {int(t.max())}]"
        )
    n_img = int(t.max()) + 1 if n_img is None else n_img
    missing = (torch.bincount(t.cpu(), minlength=n_img) == 0).nonzero().flatten()
    if missing.numel():
        raise ValueError(
            f"{missing.numel()} image(s) have no caption in txt2img, e.g. image "
            f"{missing[:5].tolist()}; image-to-text rank is undefined for them"
        )
    return t


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(ks)
    ok = bool(ks) and all(
        isinstance(k, int | np.integer) and not isinstance(k, bool) and k >= 1 for k in ks
    )
    if not ok or len(set(ks)) != len(ks):
        raise ValueError(f"ks must be distinct positive integers, got {ks!r}")
    return tuple(int(k) for k in ks)


def _check_ties(ties: str) -> None:
    if ties not in TIE_MODES:
        raise ValueError(f"ties must be one of {TIE_MODES}, got {ties!r}")


def _check_groups(groups: ArrayLike | None, n_txt: int, device: torch.device) -> torch.Tensor:
    """[N_txt] int64 compact group ids; None means every caption is its own group."""
    if groups is None:
        return torch.arange(n_txt, device=device)
    g = _as_tensor(groups, "caption_groups")
    if g.ndim != 1 or g.numel() != n_txt or g.is_floating_point() or g.dtype == torch.bool:
        raise ValueError(
            f"caption_groups must be a 1-D integer array of length N_txt={n_txt}, "
            f"got {g.dtype} {tuple(g.shape)}"
        )
    # Relabel to 0..G-1 so that group ids can index dense [*, G] tables.
    return torch.unique(g.long(), return_inverse=True)[1].to(device)


# --------------------------------------------------------------------------------------------
# Captions: normalisation and groups of identical texts
# --------------------------------------------------------------------------------------------
def normalize_caption(text: str) -> str:
    """Normalise a caption for duplicate detection (METHOD §4).

    Lower-cases, splits on any whitespace, strips trailing ``.,;:!?`` from each token and drops
    tokens made only of punctuation, so ``"A plane  is parked ."`` and ``"a plane is parked."``
    both give ``"a plane is parked"``. Word-internal punctuation (``"u.s"``, ``"t-shirt"``)
    is kept.
    """
    tokens = []
    for tok in text.lower().split():
        tok = tok.rstrip(_TRAILING_PUNCT)
        if tok and not all(ch in _PUNCT for ch in tok):
            tokens.append(tok)
    return " ".join(tokens)


def caption_groups(caption_texts: Sequence[str]) -> torch.Tensor:
    """[N_txt] int64 id of each caption's normalised text, numbered by first appearance."""
    if isinstance(caption_texts, str) or not all(isinstance(t, str) for t in caption_texts):
        raise ValueError("caption_texts must be a sequence of strings, one per caption")
    ids: dict[str, int] = {}
    return torch.tensor(
        [ids.setdefault(normalize_caption(t), len(ids)) for t in caption_texts], dtype=torch.long
    )


def _texts_to_groups(caption_texts: Sequence[str], n_txt: int) -> torch.Tensor:
    if len(caption_texts) != n_txt:
        raise ValueError(
            f"caption_texts has {len(caption_texts)} entries but there are {n_txt} captions"
        )
    return caption_groups(caption_texts)


def _image_group_pairs(
    txt2img: torch.Tensor, groups: torch.Tensor, n_img: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct (group, image) pairs "image owns a caption of this group", sorted by group.

    Returns pair_grp [M], pair_img [M] int64 with M <= N_txt.
    """
    code = torch.unique(groups * n_img + txt2img)  # sorted: by group, then image
    return code // n_img, code % n_img


# --------------------------------------------------------------------------------------------
# Rank statistics from a score matrix
# --------------------------------------------------------------------------------------------
def _positive_pairs(
    txt2img: torch.Tensor, groups: torch.Tensor, n_img: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every positive (image, caption) pair: image i owns a caption of caption c's group.

    With every caption its own group (the standard metric) these are (txt2img[c], c). The same
    pairs serve both directions: image i's positives are its pairs' captions, caption c's
    positives its pairs' images.

    Returns image [P], caption [P] int64 (P >= N_txt).
    """
    n_txt = txt2img.numel()
    if groups.numel() and int(groups.max()) == n_txt - 1:  # n_txt groups: each caption its own
        return txt2img, torch.arange(n_txt, device=txt2img.device)
    pair_grp, pair_img = _image_group_pairs(txt2img, groups, n_img)
    by_group = torch.sort(groups, stable=True).indices  # captions, grouped
    size = torch.bincount(groups)
    start = torch.cumsum(size, 0) - size
    cnt = size[pair_grp]  # captions per (group, image) pair
    pair = torch.repeat_interleave(torch.arange(pair_grp.numel(), device=groups.device), cnt)
    within = torch.arange(pair.numel(), device=groups.device) - (torch.cumsum(cnt, 0) - cnt)[pair]
    return pair_img[pair], by_group[start[pair_grp[pair]] + within]


def _pair_counts(
    s: torch.Tensor, query: torch.Tensor, cand: torch.Tensor, dim: int, max_elements: int
) -> TieRanks:
    """`TieRanks` of the queries along ``dim`` of ``s`` [N_img, N_txt] (``dim=1``: rows, i2t;
    ``dim=0``: columns, t2i), their positives given as (query, candidate) index pairs [P].

    The best positive score s* of each query comes from its pairs alone; every positive scores
    <= s*, so ``a`` = #{entries > s*} and ``n`` = #{entries == s*} - ``p`` are two counts over
    the query's whole list (in row blocks of at most ``max_elements``), and the index convention
    (`TieRanks.index_rank`) counts, among the queries with a tied negative only, the entries
    == s* past the largest index of a tied positive (no positive lies there).
    """
    n_q, length = s.shape[1 - dim], s.shape[dim]  # queries, candidates per query
    vals = s[query, cand] if dim == 1 else s[cand, query]
    best = torch.full((n_q,), float("-inf"), dtype=s.dtype, device=s.device)
    best.scatter_reduce_(0, query, vals, "amax")
    on_best = vals == best[query]
    tied_pos = torch.bincount(query[on_best], minlength=n_q)
    last_pos = torch.full((n_q,), -1, dtype=torch.long, device=s.device)
    last_pos.scatter_reduce_(0, query[on_best], cand[on_best], "amax")
    above = torch.zeros(n_q, dtype=torch.int32, device=s.device)
    equal = torch.zeros_like(above)
    rows = _block_rows(s.shape[1], max_elements)
    for r0 in range(0, s.shape[0], rows):
        block = s[r0 : r0 + rows]
        b = best[r0 : r0 + rows, None] if dim == 1 else best
        # rows: the block's queries; columns: add the block's rows to every column's count
        at = slice(r0, r0 + rows) if dim == 1 else slice(None)
        above[at] += _count(block > b, dim)
        equal[at] += _count(block == b, dim)
    above, tied_neg = above.long(), equal.long() - tied_pos
    ahead = torch.zeros_like(above)
    tied = (tied_neg > 0).nonzero().squeeze(1)
    step = _block_rows(length, max_elements)
    index = torch.arange(length, device=s.device)
    for q0 in range(0, tied.numel(), step):
        q = tied[q0 : q0 + step]
        lists = s[q] if dim == 1 else s[:, q].T  # [q, candidates]
        ahead[q] = _count((lists == best[q, None]) & (index > last_pos[q, None]), 1).long()
    return TieRanks(*(x.cpu() for x in (above, tied_neg, tied_pos, ahead)))


def _count(mask: torch.Tensor, dim: int) -> torch.Tensor:
    """[..] int32: the True entries of ``mask`` along ``dim`` (bytes summed into int32: about
    ten times faster than a bool sum, which widens every entry to int64)."""
    return mask.view(torch.uint8).sum(dim, dtype=torch.int32)


def _block_rows(n_cols: int, max_elements: int) -> int:
    return max(1, int(max_elements) // max(1, n_cols))


def _ranks(
    scores: ArrayLike,
    txt2img: ArrayLike,
    caption_groups: ArrayLike | None,
    dim: int,
    max_elements: int,
) -> TieRanks:
    s = _check_scores(scores)
    n_img, n_txt = s.shape
    t2i = _check_txt2img(txt2img, n_img, n_txt).to(s.device)
    image, caption = _positive_pairs(t2i, _check_groups(caption_groups, n_txt, s.device), n_img)
    query, cand = (image, caption) if dim == 1 else (caption, image)
    return _pair_counts(s, query, cand, dim, max_elements)


def i2t_ranks(
    scores: ArrayLike,
    txt2img: ArrayLike,
    caption_groups: ArrayLike | None = None,
    *,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> TieRanks:
    """Image→text rank statistics: one query per image, the best of its positive captions.

    Args:
        scores: [N_img, N_txt] similarities, higher = more similar (torch or numpy).
        txt2img: [N_txt] int, image index of each caption; every image needs >= 1 caption.
        caption_groups: optional [N_txt] int text-group ids (`caption_groups`). Then a caption
            is positive for an image if its group is one of the image's groups (duplicate-aware
            recall). None: positives are the image's own captions (standard metric).
        max_elements: bound on the size of one processed block of rows.

    Returns:
        `TieRanks` with Q = N_img.
    """
    return _ranks(scores, txt2img, caption_groups, 1, max_elements)


def t2i_ranks(
    scores: ArrayLike,
    txt2img: ArrayLike,
    caption_groups: ArrayLike | None = None,
    *,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> TieRanks:
    """Text→image rank statistics: one query per caption, the rank of its image.

    Args:
        scores: [N_img, N_txt] similarities, higher = more similar (torch or numpy).
        txt2img: [N_txt] int, image index of each caption.
        caption_groups: optional [N_txt] int text-group ids. Then every image owning a caption
            of the query's group is positive (duplicate-aware recall); None: only its image.
        max_elements: bound on the size of one processed block of the matrix.

    Returns:
        `TieRanks` with Q = N_txt (``tied_pos`` is 1 in the standard metric).
    """
    return _ranks(scores, txt2img, caption_groups, 0, max_elements)


# --------------------------------------------------------------------------------------------
# Recall dictionaries
# --------------------------------------------------------------------------------------------
def _recall_dict(
    i2t_hits: torch.Tensor, t2i_hits: torch.Tensor, ks: tuple[int, ...], prefix: str, suffix: str
) -> dict[str, float]:
    """ALBEF keys from per-query hits [N_img, len(ks)] (i2t) and [N_txt, len(ks)] (t2i)."""
    txt = i2t_hits.mean(0) * 100.0
    img = t2i_hits.mean(0) * 100.0
    out = {f"{prefix}txt_r{k}{suffix}": float(v) for k, v in zip(ks, txt, strict=True)}
    out.update({f"{prefix}img_r{k}{suffix}": float(v) for k, v in zip(ks, img, strict=True)})
    out[f"{prefix}r_mean{suffix}"] = float(torch.cat([txt, img]).mean())
    return out


def _summarise(
    i2t: TieRanks, t2i: TieRanks, ks: tuple[int, ...], ties: str, prefix: str = ""
) -> dict[str, float]:
    """Recall dictionaries of the tie modes in ``ties`` from one pair of rank statistics."""
    several = ties in ("both", "all")
    modes = {"both": ("expected", "pessimistic"), "all": ("expected", "pessimistic", "index")}
    hits = {
        "expected": ("", TieRanks.hit_probability),
        "pessimistic": ("_pess", TieRanks.pessimistic_hits),
        "index": ("_index", TieRanks.index_hits),
    }
    out: dict[str, float] = {}
    for mode in modes.get(ties, (ties,)):
        suffix, fn = hits[mode]
        out.update(_recall_dict(fn(i2t, ks), fn(t2i, ks), ks, prefix, suffix if several else ""))
    return out


def recall_at_k(
    scores: ArrayLike,
    txt2img: ArrayLike,
    ks: Sequence[int] = DEFAULT_KS,
    ties: str = "expected",
    *,
    caption_groups: ArrayLike | None = None,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
    scores_t2i: ArrayLike | None = None,
) -> dict[str, float]:
    """R@K in both directions and their mean, in percent (METHOD §4, ALBEF keys).

    The rank statistics are computed once per direction; every tie mode derives from them.

    Args:
        scores: [N_img, N_txt] similarities, higher = more similar. Image->text reads its rows.
        txt2img: [N_txt] int, image index of each caption.
        ks: cut-offs K.
        ties: "expected" (exact expectation under a random order of tied items),
            "pessimistic" (tied negatives ahead), "index" (the public evaluators' argsort
            convention, `TieRanks.index_rank`), "both" (expected keys plus ``*_pess``) or
            "all" (expected, ``*_pess`` and ``*_index``).
        caption_groups: optional [N_txt] text-group ids, see `i2t_ranks`.
        max_elements: memory bound for one block of the score matrix.
        scores_t2i: optional [N_img, N_txt] matrix whose columns text->image reads instead
            of ``scores`` (re-rankers give each direction its own matrix).

    Returns:
        ``{"txt_r1", ..., "img_r1", ..., "r_mean"}`` as Python floats; txt_* is i2t.
    """
    ks = _check_ks(ks)
    _check_ties(ties)
    kw = {"caption_groups": caption_groups, "max_elements": max_elements}
    other = scores if scores_t2i is None else scores_t2i
    return _summarise(i2t_ranks(scores, txt2img, **kw), t2i_ranks(other, txt2img, **kw), ks, ties)


def duplicate_aware_recall(
    scores: ArrayLike,
    txt2img: ArrayLike,
    caption_texts: Sequence[str],
    ks: Sequence[int] = DEFAULT_KS,
    *,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> dict[str, float]:
    """Recall that counts identical normalised texts as hits (METHOD §4), ``dup_*`` keys.

    i2t: a retrieved caption is a hit if its normalised text equals one of the image's
    ground-truth texts. t2i: a retrieved image is a hit if it owns a caption with the query's
    normalised text. Ties: exact expectation.

    Args:
        scores: [N_img, N_txt]; txt2img: [N_txt]; caption_texts: N_txt strings.
    """
    ks = _check_ks(ks)
    s = _check_scores(scores)
    groups = _texts_to_groups(caption_texts, s.shape[1])
    kw = {"caption_groups": groups, "max_elements": max_elements}
    i2t = i2t_ranks(s, txt2img, **kw)
    return _summarise(i2t, t2i_ranks(s, txt2img, **kw), ks, "expected", prefix="dup_")


# --------------------------------------------------------------------------------------------
# Oracle upper bound of the standard metric
# --------------------------------------------------------------------------------------------
def oracle_scores(
    txt2img: ArrayLike, caption_texts: Sequence[str], n_img: int | None = None
) -> torch.Tensor:
    """[N_img, N_txt] float32 scores of a perfect model blind to identical texts.

    ``score(i, t) = 1`` if the normalised text of caption t is one of image i's normalised
    texts, else 0. Dense: meant for inspection and tests; `oracle_upper_bound` uses counts.
    """
    t2i = _check_txt2img(txt2img, n_img, None).cpu()
    grp = _texts_to_groups(caption_texts, t2i.numel())
    n_img = int(t2i.max()) + 1 if n_img is None else n_img
    owns = torch.zeros(n_img, int(grp.max()) + 1, dtype=torch.bool)
    owns[t2i, grp] = True
    return owns[:, grp].float()


def oracle_ranks(
    txt2img: ArrayLike, caption_texts: Sequence[str], n_img: int | None = None
) -> tuple[TieRanks, TieRanks]:
    """Rank statistics of `oracle_scores` (i2t [N_img], t2i [N_txt]) without the dense matrix.

    In the oracle every positive scores 1 and nothing beats it (a = 0). i2t: the image's own
    captions (p) tie with the other captions of its texts (n). t2i: the caption's image ties
    with the other images owning its text (n = distinct images of the text - 1).
    """
    t2i = _check_txt2img(txt2img, n_img, None).cpu()
    grp = _texts_to_groups(caption_texts, t2i.numel())
    n_img = int(t2i.max()) + 1 if n_img is None else n_img
    pair_grp, pair_img = _image_group_pairs(t2i, grp, n_img)
    own = torch.bincount(t2i, minlength=n_img)
    tied_txt = torch.zeros(n_img, dtype=torch.long)
    tied_txt.index_add_(0, pair_img, torch.bincount(grp)[pair_grp])
    imgs_per_grp = torch.bincount(pair_grp)
    i2t = TieRanks(torch.zeros(n_img, dtype=torch.long), tied_txt - own, own)
    one = torch.ones_like(t2i)
    return i2t, TieRanks(torch.zeros_like(t2i), imgs_per_grp[grp] - 1, one)


def oracle_upper_bound(
    txt2img: ArrayLike,
    caption_texts: Sequence[str],
    ks: Sequence[int] = DEFAULT_KS,
    n_img: int | None = None,
) -> dict[str, float]:
    """Expected standard recall of the text-blind oracle (METHOD §4), ``oracle_*`` keys.

    Equal to ``recall_at_k(oracle_scores(txt2img, caption_texts), txt2img)``; t2i gives
    ``min(1, K / n)`` for a caption whose normalised text belongs to n images.
    """
    ks = _check_ks(ks)
    i2t, t2i = oracle_ranks(txt2img, caption_texts, n_img)
    return _summarise(i2t, t2i, ks, "expected", prefix="oracle_")


# --------------------------------------------------------------------------------------------
# Everything of one evaluation, from rank statistics computed once per direction
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RetrievalRanks:
    """Rank statistics of one evaluation, each computed once per direction (METHOD §4).

    Attributes:
        i2t: image queries, [N_img]; t2i: caption queries, [N_txt] (standard ground truth).
        dup_i2t, dup_t2i: the same with identical normalised texts counted as hits, or None
            when no caption texts were given.
    """

    i2t: TieRanks
    t2i: TieRanks
    dup_i2t: TieRanks | None = None
    dup_t2i: TieRanks | None = None


def retrieval_ranks(
    scores: ArrayLike,
    txt2img: ArrayLike,
    caption_texts: Sequence[str] | None = None,
    *,
    scores_t2i: ArrayLike | None = None,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> RetrievalRanks:
    """`TieRanks` of both directions, standard and (given texts) duplicate-aware.

    Args:
        scores: [N_img, N_txt]; image->text reads its rows.
        txt2img: [N_txt] int; caption_texts: N_txt strings, or None (no ``dup_*``).
        scores_t2i: optional [N_img, N_txt] matrix whose columns text->image reads instead.
    """
    s = _check_scores(scores)
    s_t2i = s if scores_t2i is None else _check_scores(scores_t2i)
    if s_t2i.shape != s.shape:
        raise ValueError(
            f"scores_t2i is {tuple(s_t2i.shape)} but scores is {tuple(s.shape)}; both must be "
            "[N_img, N_txt]"
        )
    kw = {"max_elements": max_elements}
    out = RetrievalRanks(i2t_ranks(s, txt2img, **kw), t2i_ranks(s_t2i, txt2img, **kw))
    if caption_texts is None:
        return out
    groups = _texts_to_groups(caption_texts, s.shape[1])
    return RetrievalRanks(
        out.i2t,
        out.t2i,
        i2t_ranks(s, txt2img, groups, **kw),
        t2i_ranks(s_t2i, txt2img, groups, **kw),
    )


def ranks_to_metrics(ranks: RetrievalRanks, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """Expected recall, ``*_pess``, ``*_index`` and (if present) ``dup_*`` keys from `ranks`."""
    ks = _check_ks(ks)
    out = _summarise(ranks.i2t, ranks.t2i, ks, "all")
    if ranks.dup_i2t is not None and ranks.dup_t2i is not None:
        out.update(_summarise(ranks.dup_i2t, ranks.dup_t2i, ks, "expected", prefix="dup_"))
    return out


def evaluate_retrieval(
    scores: ArrayLike,
    txt2img: ArrayLike,
    caption_texts: Sequence[str] | None = None,
    ks: Sequence[int] = DEFAULT_KS,
    *,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
    scores_t2i: ArrayLike | None = None,
) -> dict[str, float]:
    """All METHOD §4 numbers: expected recall, ``*_pess``, ``*_index`` and, given texts,
    ``dup_*`` and ``oracle_*``.

    Args:
        scores: [N_img, N_txt] similarities; txt2img: [N_txt] int; caption_texts: N_txt strings.
        scores_t2i: optional matrix for text->image (see `recall_at_k`).
    """
    ks = _check_ks(ks)
    ranks = retrieval_ranks(
        scores, txt2img, caption_texts, scores_t2i=scores_t2i, max_elements=max_elements
    )
    out = ranks_to_metrics(ranks, ks)
    if caption_texts is not None:
        n_img = len(ranks.i2t)
        out.update(oracle_upper_bound(txt2img, caption_texts, ks, n_img=n_img))
    return out


# --------------------------------------------------------------------------------------------
# Chance level
# --------------------------------------------------------------------------------------------
def chance_recall(
    txt2img: Sequence[int] | np.ndarray | torch.Tensor,
    ks: Sequence[int] = DEFAULT_KS,
    n_img: int | None = None,
) -> dict[str, float]:
    """Expected recall of a random ranking, in percent, ``chance_*`` keys (beside ``oracle_*``).

    A model whose scores all tie ranks every query's candidates in a uniformly random order, so
    the exact tie rule of :mod:`cmpagl.metrics` gives its recall in closed form: image->text,
    ``1 - C(N_txt - p, K) / C(N_txt, K)`` for an image with p captions; text->image
    ``K / N_img``. Equal to ``recall_at_k(zeros(N_img, N_txt), txt2img)`` without the matrix.

    Args:
        txt2img: [N_txt] int, the image of each caption (every image needs a caption).
        n_img: the number of images (default: the largest index + 1).
    """
    t2i = torch.as_tensor(np.asarray(txt2img), dtype=torch.long).flatten()
    n_img = int(t2i.max()) + 1 if n_img is None else int(n_img)
    own = torch.bincount(t2i, minlength=n_img)
    if t2i.numel() == 0 or int(t2i.min()) < 0 or len(own) != n_img or bool((own == 0).any()):
        raise ValueError(f"txt2img must give each of the {n_img} images at least one caption")
    # Every candidate tied: an image's own captions among all N_txt, a caption's image among
    # all N_img.
    by_image = TieRanks(torch.zeros_like(own), t2i.numel() - own, own)
    none, one = torch.zeros_like(t2i), torch.ones_like(t2i)
    by_caption = TieRanks(none, one * (n_img - 1), one)
    txt, img = (r.hit_probability(ks).mean(0) * 100.0 for r in (by_image, by_caption))
    out = {f"chance_txt_r{k}": float(v) for k, v in zip(ks, txt, strict=True)}
    out.update({f"chance_img_r{k}": float(v) for k, v in zip(ks, img, strict=True)})
    out["chance_r_mean"] = float(torch.cat([txt, img]).mean())
    return out
