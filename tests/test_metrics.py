"""Tests of cmpagl.metrics (METHOD §4) against naive per-query Python references."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from cmpagl import metrics as m

KS = (1, 5, 10)
KEYS = ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean")


# --------------------------------------------------------------------------------------------
# Naive references: explicit loops over queries, explicit rankings
# --------------------------------------------------------------------------------------------
def queries(scores, txt2img, positives=None):
    """Yield (row of scores, set of positive candidates) per query, i2t then t2i.

    positives(direction, query) -> set overrides the standard ground truth.
    """
    s = np.asarray(scores, dtype=np.float64)
    n_img, n_txt = s.shape
    for i in range(n_img):
        pos = positives("i2t", i) if positives else {t for t in range(n_txt) if txt2img[t] == i}
        yield "i2t", list(s[i]), pos
    for t in range(n_txt):
        pos = positives("t2i", t) if positives else {int(txt2img[t])}
        yield "t2i", list(s[:, t]), pos


def to_recall(hits, ks=KS, prefix="", suffix=""):
    """hits: {"i2t": [[hit per k] per query], "t2i": ...} -> ALBEF-key dict in percent."""
    out = {}
    for direction, name in (("i2t", "txt"), ("t2i", "img")):
        for j, k in enumerate(ks):
            col = [h[j] for h in hits[direction]]
            out[f"{prefix}{name}_r{k}{suffix}"] = 100.0 * sum(col) / len(col)
    vals = list(out.values())
    out[f"{prefix}r_mean{suffix}"] = sum(vals) / len(vals)
    return out


def naive_recall(scores, txt2img, rank_fn, ks=KS, positives=None, **kw):
    hits = {"i2t": [], "t2i": []}
    for direction, row, pos in queries(scores, txt2img, positives):
        hits[direction].append(rank_fn(row, pos, ks))
    return to_recall(hits, ks, **kw)


def argsort_hits(row, pos, ks):
    """Public-evaluator style: a stable sort by score; ties broken by candidate order."""
    order = sorted(range(len(row)), key=lambda c: -row[c])
    best = min(order.index(c) for c in pos)
    return [float(best < k) for k in ks]


def pessimistic_hits(row, pos, ks):
    best = max(row[c] for c in pos)
    rank = sum(1 for c in range(len(row)) if c not in pos and row[c] >= best)
    return [float(rank < k) for k in ks]


def enumerated_hits(row, pos, ks):
    """Exact expectation: average over every order of every group of tied scores.

    Groups scoring below the best positive cannot move its rank, so only the groups at or
    above it are permuted (keeps the enumeration small; still every order of those).
    """
    best_score = max(row[c] for c in pos)
    levels = sorted({v for v in row if v >= best_score}, reverse=True)
    groups = [[c for c in range(len(row)) if row[c] == v] for v in levels]
    counts = [0] * len(ks)
    n_orders = 0
    for perms in itertools.product(*(itertools.permutations(g) for g in groups)):
        ranking = [c for perm in perms for c in perm]
        best = min(ranking.index(c) for c in pos if c in ranking)
        counts = [n + (best < k) for n, k in zip(counts, ks, strict=True)]
        n_orders += 1
    return [n / n_orders for n in counts]


def assert_close(got, want, tol=1e-9):
    assert set(want) <= set(got), sorted(set(want) - set(got))
    for key, val in want.items():
        assert got[key] == pytest.approx(val, abs=tol), (key, got[key], val)


def random_txt2img(n_img, rng, lo=1, hi=4):
    """Variable captions per image (not 5), shuffled so captions of an image are not adjacent."""
    t2i = np.repeat(np.arange(n_img), rng.integers(lo, hi + 1, n_img))
    return rng.permutation(t2i)


# --------------------------------------------------------------------------------------------
# (1) continuous scores: expected == pessimistic == argsort
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(4))
def test_no_ties_all_variants_equal_naive_argsort(seed):
    rng = np.random.default_rng(seed)
    t2i = random_txt2img(12, rng, 1, 6)
    scores = rng.normal(size=(12, t2i.size))
    want = naive_recall(scores, t2i, argsort_hits)
    got = m.recall_at_k(scores, t2i, ties="both")
    assert_close(got, want)
    assert_close(got, {f"{k}_pess": v for k, v in want.items()})


# --------------------------------------------------------------------------------------------
# (2) ties: exact expectation vs enumeration of all tie orders
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(6))
def test_ties_expected_equals_enumeration(seed):
    rng = np.random.default_rng(100 + seed)
    t2i = random_txt2img(4, rng, 1, 3)
    scores = rng.integers(0, 2 + seed % 2, size=(4, t2i.size)).astype(np.float32)
    ks = (1, 2, 3)  # with ~8 captions, K = 5, 10 would hit almost always
    want = naive_recall(scores, t2i, enumerated_hits, ks)
    assert_close(m.recall_at_k(torch.from_numpy(scores), t2i, ks), want)


def test_duplicate_caption_columns_enumeration():
    # Captions 1 and 2 are exact duplicates (same embedding) of different images.
    rng = np.random.default_rng(7)
    t2i = np.array([0, 0, 1, 1, 2, 2, 2])
    scores = rng.normal(size=(3, 7)).round(1)
    scores[:, 2] = scores[:, 1]
    ks = (1, 2, 4)
    want = naive_recall(scores, t2i, enumerated_hits, ks)
    assert_close(m.recall_at_k(scores, t2i, ks), want)


def test_hit_probability_hand_case_and_fraction():
    # Two positives tied with two negatives at the top: P(first is positive) = 2/4.
    scores = np.array([[1.0, 1.0, 1.0, 1.0, 0.0], [0.0] * 5, [0.0] * 5])
    ranks = m.i2t_ranks(scores, np.array([0, 0, 1, 1, 2]))
    assert (ranks.above[0], ranks.tied_neg[0], ranks.tied_pos[0]) == (0, 2, 2)
    assert ranks.hit_probability((1, 2))[0].tolist() == pytest.approx([0.5, 5 / 6])
    two_two = m.TieRanks(torch.tensor([0]), torch.tensor([2]), torch.tensor([2]))
    assert two_two.hit_probability((1, 2, 3))[0].tolist() == pytest.approx([0.5, 5 / 6, 1.0])
    assert two_two.expected_rank.tolist() == pytest.approx([2 / 3])
    # Large groups: compare the log-space formula with exact rational arithmetic.
    n, p, a = 60, 3, 4
    big = m.TieRanks(torch.tensor([a]), torch.tensor([n]), torch.tensor([p]))
    ks = (1, 4, 5, 9, 14, 70)

    def exact(k):
        if k <= a or k - a > n:
            return float(k > a)
        return 1 - float(Fraction(math.comb(n, k - a), math.comb(n + p, k - a)))

    assert big.hit_probability(ks)[0].tolist() == pytest.approx([exact(k) for k in ks], abs=1e-12)


# --------------------------------------------------------------------------------------------
# (3) pessimistic vs naive "all ties ahead"
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(4))
def test_pessimistic_equals_naive(seed):
    rng = np.random.default_rng(200 + seed)
    t2i = random_txt2img(15, rng, 1, 5)
    scores = rng.integers(0, 4, size=(15, t2i.size))  # integer scores: many ties
    want = naive_recall(scores, t2i, pessimistic_hits)
    got = m.recall_at_k(scores, t2i, ties="pessimistic")
    assert_close(got, want)
    expected = m.recall_at_k(scores, t2i)
    assert all(expected[k] >= got[k] - 1e-12 for k in KEYS)
    assert any(expected[k] > got[k] + 1e-6 for k in KEYS)  # the ties matter here


def test_per_query_ranks_match_naive():
    rng = np.random.default_rng(3)
    t2i = random_txt2img(6, rng)
    scores = rng.integers(0, 3, size=(6, t2i.size))
    ranks = {"i2t": m.i2t_ranks(scores, t2i), "t2i": m.t2i_ranks(scores, t2i)}
    opt, pess = {"i2t": [], "t2i": []}, {"i2t": [], "t2i": []}
    for direction, row, pos in queries(scores, t2i):
        best = max(row[c] for c in pos)
        negatives = [row[c] for c in range(len(row)) if c not in pos]
        opt[direction].append(sum(v > best for v in negatives))
        pess[direction].append(sum(v >= best for v in negatives))
    for direction, r in ranks.items():
        assert r.optimistic_rank.tolist() == opt[direction]
        assert r.pessimistic_rank.tolist() == pess[direction]
        assert (r.optimistic_rank <= r.expected_rank).all()
        assert (r.expected_rank <= r.pessimistic_rank).all()
    assert ranks["t2i"].tied_pos.eq(1).all()


# --------------------------------------------------------------------------------------------
# (4) duplicate-aware recall and oracle upper bound
# --------------------------------------------------------------------------------------------
WORDS = [
    "a plane is parked .",
    "A plane  is parked",
    "many trees",
    "many trees .",
    "a road",
    "the river",
    "a bridge , over water",
]


def random_texts(n, rng):
    return [WORDS[j] for j in rng.integers(0, len(WORDS), n)]


def dup_positives(t2i, texts):
    norm = [m.normalize_caption(t) for t in texts]
    img_texts = {i: {norm[t] for t in range(len(t2i)) if t2i[t] == i} for i in set(t2i.tolist())}

    def positives(direction, q):
        if direction == "i2t":
            return {t for t in range(len(t2i)) if norm[t] in img_texts[q]}
        return {i for i, owned in img_texts.items() if norm[q] in owned}

    return positives


def test_normalize_caption():
    assert m.normalize_caption("  A plane  is parked . ") == "a plane is parked"
    assert m.normalize_caption("a plane is parked.") == "a plane is parked"
    assert m.normalize_caption("a bridge , over water") == "a bridge over water"
    assert m.normalize_caption("A bridge, over water!") == "a bridge over water"
    assert m.normalize_caption("t-shirt u.s. ,") == "t-shirt u.s"
    assert m.caption_groups(["a .", "b", "A", "b!"]).tolist() == [0, 1, 0, 1]


@pytest.mark.parametrize("seed", range(3))
def test_duplicate_aware_recall_vs_naive(seed):
    rng = np.random.default_rng(300 + seed)
    t2i = random_txt2img(10, rng, 1, 4)
    texts = random_texts(t2i.size, rng)
    positives = dup_positives(t2i, texts)
    scores = rng.normal(size=(10, t2i.size))
    want = naive_recall(scores, t2i, argsort_hits, positives=positives, prefix="dup_")
    assert_close(m.duplicate_aware_recall(scores, t2i, texts), want)
    # With ties: exact enumeration on a small case.
    t2i, texts = t2i[:7] % 3, texts[:7]
    t2i[:3] = [0, 1, 2]
    scores = rng.integers(0, 2, size=(3, 7)).astype(float)
    ks = (1, 2)
    want = naive_recall(scores, t2i, enumerated_hits, ks, dup_positives(t2i, texts), prefix="dup_")
    assert_close(m.duplicate_aware_recall(scores, t2i, texts, ks), want)


def test_oracle_two_images_sharing_captions():
    t2i = np.array([0, 0, 1, 1])
    texts = ["a", "b", "a .", "B"]
    want = {"oracle_txt_r1": 50.0, "oracle_img_r1": 50.0, "oracle_txt_r5": 100.0}
    want["oracle_r_mean"] = (50 + 100 + 100 + 50 + 100 + 100) / 6
    assert_close(m.oracle_upper_bound(t2i, texts), want)
    # The oracle matrix through the generic metric gives the same numbers.
    generic = m.recall_at_k(m.oracle_scores(t2i, texts), t2i)
    assert_close({f"oracle_{k}": v for k, v in generic.items()}, want)


def naive_oracle_row(i, t2i, norm):
    """Oracle scores of image i: 1 for every caption whose text is one of image i's texts."""
    own_texts = {norm[u] for u in range(len(t2i)) if t2i[u] == i}
    return [float(norm[t] in own_texts) for t in range(len(t2i))]


@pytest.mark.parametrize("seed", range(3))
def test_oracle_vs_naive_and_dense(seed):
    rng = np.random.default_rng(400 + seed)
    t2i = random_txt2img(9, rng, 1, 4)
    texts = random_texts(t2i.size, rng)
    norm = [m.normalize_caption(t) for t in texts]
    # t2i: a caption whose text belongs to n images hits with probability min(1, K / n).
    owners = {x: {int(t2i[t]) for t in range(len(t2i)) if norm[t] == x} for x in set(norm)}
    img_r = {k: 100 * np.mean([min(1.0, k / len(owners[x])) for x in norm]) for k in KS}
    got = m.oracle_upper_bound(t2i, texts)
    assert_close(got, {f"oracle_img_r{k}": v for k, v in img_r.items()})
    # The count-based bound equals the generic metric on the dense oracle matrix.
    dense = np.array([naive_oracle_row(i, t2i, norm) for i in range(9)])
    assert np.array_equal(m.oracle_scores(t2i, texts).numpy(), dense)
    generic = m.recall_at_k(m.oracle_scores(t2i, texts), t2i)
    assert_close(got, {f"oracle_{k}": v for k, v in generic.items()})
    # i2t on a smaller case, ties enumerated (tied groups of <= 8 captions stay fast).
    t2i, texts, norm = t2i[:8] % 4, texts[:8], norm[:8]
    t2i[:4] = [0, 1, 2, 3]
    ks = (1, 2, 3)
    hits = [
        enumerated_hits(naive_oracle_row(i, t2i, norm), set(np.flatnonzero(t2i == i)), ks)
        for i in range(4)
    ]
    want = {f"oracle_txt_r{k}": 100 * np.mean([h[j] for h in hits]) for j, k in enumerate(ks)}
    assert_close(m.oracle_upper_bound(t2i, texts, ks), want)


# --------------------------------------------------------------------------------------------
# (5) variable captions per image, (6) caption-order invariance, (7) perfect scores
# --------------------------------------------------------------------------------------------
def test_variable_caption_counts_and_chunking():
    rng = np.random.default_rng(5)
    t2i = random_txt2img(30, rng, 1, 9)
    scores = rng.integers(0, 5, size=(30, t2i.size)).astype(np.float32)
    texts = random_texts(t2i.size, rng)
    full = m.evaluate_retrieval(scores, t2i, texts)
    chunked = m.evaluate_retrieval(scores, t2i, texts, max_elements=7)  # tiny blocks
    assert_close(chunked, full, tol=1e-12)
    want = naive_recall(scores, t2i, pessimistic_hits, suffix="_pess")
    assert_close(full, want)


def test_caption_order_invariance_with_ties():
    # Image 0's caption ties with image 1's caption at the top of image 0's row.
    t2i = np.array([0, 1, 1, 2])
    scores = np.array([[0.9, 0.9, 0.1, 0.2], [0.3, 0.8, 0.7, 0.1], [0.2, 0.1, 0.3, 0.9]])
    perm = np.array([3, 2, 1, 0])
    base = m.recall_at_k(scores, t2i, ties="both")
    moved = m.recall_at_k(scores[:, perm], t2i[perm], ties="both")
    assert_close(moved, base, tol=1e-12)
    assert base["txt_r1"] == pytest.approx(100 * (0.5 + 1 + 1) / 3)
    # The argsort evaluator is not invariant: that is the bug this metric avoids.
    argsort_base = naive_recall(scores, t2i, argsort_hits)
    argsort_moved = naive_recall(scores[:, perm], t2i[perm], argsort_hits)
    assert argsort_base["txt_r1"] != argsort_moved["txt_r1"]
    # Random permutations of a tie-heavy matrix.
    rng = np.random.default_rng(11)
    t2i = random_txt2img(20, rng, 1, 6)
    scores = rng.integers(0, 3, size=(20, t2i.size))
    base = m.recall_at_k(scores, t2i, ties="both")
    for _ in range(3):
        perm = rng.permutation(t2i.size)
        assert_close(m.recall_at_k(scores[:, perm], t2i[perm], ties="both"), base, tol=1e-9)


def test_perfect_scores_give_100():
    rng = np.random.default_rng(2)
    t2i = random_txt2img(25, rng, 1, 7)
    scores = (t2i[None, :] == np.arange(25)[:, None]) + 0.01 * rng.random((25, t2i.size))
    got = m.evaluate_retrieval(torch.from_numpy(scores), torch.from_numpy(t2i))
    assert_close(got, {k: 100.0 for k in KEYS} | {f"{k}_pess": 100.0 for k in KEYS})


def test_numpy_and_torch_inputs_agree():
    rng = np.random.default_rng(9)
    t2i = random_txt2img(8, rng)
    scores = rng.integers(0, 3, size=(8, t2i.size)).astype(np.float32)
    a = m.recall_at_k(scores, t2i, ties="both")
    b = m.recall_at_k(torch.from_numpy(scores), torch.from_numpy(t2i), ties="both")
    assert a == b and all(isinstance(v, float) for v in a.values())


# --------------------------------------------------------------------------------------------
# (8) bad input
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("scores", "txt2img", "match"),
    [
        (np.zeros((2, 3)), np.array([0, 1]), "2 entries but scores has 3 columns"),
        (np.zeros((2, 3)), np.array([0, 1, 2]), r"must lie in \[0, 2\)"),
        (np.zeros((2, 3)), np.array([0, -1, 1]), r"must lie in \[0, 2\)"),
        (np.zeros((3, 3)), np.array([0, 0, 2]), r"no caption.*\[1\]"),
        (np.zeros(3), np.array([0, 0, 0]), r"\[N_img, N_txt\]"),
        (np.array([[0.0, np.nan]]), np.array([0, 0]), "NaN"),
        (np.zeros((1, 2)), np.array([0.0, 0.0]), "integer"),
    ],
)
def test_bad_input_raises(scores, txt2img, match):
    with pytest.raises(ValueError, match=match):
        m.recall_at_k(scores, txt2img)


def test_bad_options_raise():
    s, t2i = np.zeros((1, 2)), np.array([0, 0])
    with pytest.raises(ValueError, match="ties must be one of"):
        m.recall_at_k(s, t2i, ties="optimistic")
    with pytest.raises(ValueError, match="ks must be distinct positive integers"):
        m.recall_at_k(s, t2i, ks=(1, 0))
    with pytest.raises(ValueError, match="caption_texts has 1 entries but there are 2"):
        m.evaluate_retrieval(s, t2i, ["only one"])
    with pytest.raises(ValueError, match="sequence of strings"):
        m.caption_groups("not a list")


# --------------------------------------------------------------------------------------------
# (9) the public evaluators' index convention (ties="index")
# --------------------------------------------------------------------------------------------
def peers_itm_eval(scores_i2t, scores_t2i, txt2img, img2txt, kind=None):
    """ALBEF's ``itm_eval`` (Retrieval.py; SCAN's i2t/t2i loops are the same), transcribed.

    scores_i2t [N_img, N_txt], scores_t2i [N_txt, N_img] as in ALBEF; ``kind`` is passed to
    ``np.argsort`` (None: NumPy's default, unstable sort, as the original).
    """
    # Images->Text
    ranks = np.zeros(scores_i2t.shape[0])
    for index, score in enumerate(scores_i2t):
        inds = np.argsort(score, kind=kind)[::-1]
        # Score
        rank = 1e20
        for i in img2txt[index]:
            tmp = np.where(inds == i)[0][0]
            if tmp < rank:
                rank = tmp
        ranks[index] = rank
    tr1 = 100.0 * len(np.where(ranks < 1)[0]) / len(ranks)
    tr5 = 100.0 * len(np.where(ranks < 5)[0]) / len(ranks)
    tr10 = 100.0 * len(np.where(ranks < 10)[0]) / len(ranks)
    # Text->Images
    ranks = np.zeros(scores_t2i.shape[0])
    for index, score in enumerate(scores_t2i):
        inds = np.argsort(score, kind=kind)[::-1]
        ranks[index] = np.where(inds == txt2img[index])[0][0]
    ir1 = 100.0 * len(np.where(ranks < 1)[0]) / len(ranks)
    ir5 = 100.0 * len(np.where(ranks < 5)[0]) / len(ranks)
    ir10 = 100.0 * len(np.where(ranks < 10)[0]) / len(ranks)
    tr_mean = (tr1 + tr5 + tr10) / 3
    ir_mean = (ir1 + ir5 + ir10) / 3
    r_mean = (tr_mean + ir_mean) / 2
    return {
        "txt_r1": tr1,
        "txt_r5": tr5,
        "txt_r10": tr10,
        "img_r1": ir1,
        "img_r5": ir5,
        "img_r10": ir10,
        "r_mean": r_mean,
    }


def peers(scores, t2i, kind=None, scores_t2i=None):
    img2txt = {i: np.flatnonzero(t2i == i).tolist() for i in range(scores.shape[0])}
    other = scores if scores_t2i is None else scores_t2i
    return peers_itm_eval(scores, other.T, t2i, img2txt, kind)


@pytest.mark.parametrize("seed", range(3))
def test_index_ties_equal_the_peers_loop(seed):
    rng = np.random.default_rng(500 + seed)
    t2i = random_txt2img(14, rng, 1, 6)
    # Tie-free: the original loop, NumPy's default sort, agrees with every tie mode.
    scores = rng.normal(size=(14, t2i.size))
    want = peers(scores, t2i)
    for ties in ("index", "expected", "pessimistic"):
        assert_close(m.recall_at_k(scores, t2i, ties=ties), want)
    # Tied (integer scores, identical caption columns): the order we claim is the loop with a
    # stable sort, larger index first among ties.
    tied = rng.integers(0, 3, size=(14, t2i.size)).astype(np.float32)
    tied[:, 1] = tied[:, 0]
    got = m.recall_at_k(tied, t2i, ties="index")
    assert_close(got, peers(tied, t2i, kind="stable"))
    assert_close(m.recall_at_k(torch.from_numpy(tied), torch.from_numpy(t2i), ties="index"), got)
    # and it is a convention: it differs from the expectation here, and reversing the caption
    # order changes it (the expectation does not move)
    expected = m.recall_at_k(tied, t2i)
    assert any(abs(got[k] - expected[k]) > 1e-6 for k in KEYS)
    rev = np.arange(t2i.size)[::-1]
    assert_close(m.recall_at_k(tied[:, rev], t2i[rev]), expected)
    assert m.recall_at_k(tied[:, rev], t2i[rev], ties="index") != got
    # both directions from their own matrices, as after re-ranking
    other = rng.integers(0, 3, size=(14, t2i.size)).astype(np.float64)
    pair = m.recall_at_k(tied, t2i, ties="index", scores_t2i=other)
    assert_close(pair, peers(tied, t2i, kind="stable", scores_t2i=other))


def test_tiny_blocks_and_infinite_scores_agree_with_the_peers_loop():
    # Counting runs in row blocks (columns summed across blocks for text->image) and reads each
    # query's best positive off its (query, candidate) pairs: neither may change a rank, also
    # where positives score -inf or a negative +inf, and with duplicate-text groups.
    rng = np.random.default_rng(77)
    t2i = random_txt2img(12, rng, 1, 5)
    s = rng.integers(0, 3, size=(12, t2i.size)).astype(np.float64)
    s[rng.random(s.shape) < 0.2] = -np.inf
    s[rng.random(s.shape) < 0.05] = np.inf
    other = rng.integers(0, 3, size=s.shape).astype(np.float64)
    want = peers(s, t2i, kind="stable", scores_t2i=other)
    texts = random_texts(t2i.size, rng)
    full = m.evaluate_retrieval(s, t2i, texts, scores_t2i=other)
    for max_elements in (1, 7, 40):
        got = m.recall_at_k(s, t2i, ties="index", scores_t2i=other, max_elements=max_elements)
        assert_close(got, want)
        blocks = m.evaluate_retrieval(s, t2i, texts, scores_t2i=other, max_elements=max_elements)
        assert_close(blocks, full, tol=0)


def test_index_rank_by_hand_and_in_evaluate_retrieval():
    # Row 0: captions 0 (own), 1, 2 tie at the top; larger index first -> 2, 1, 0: rank 2.
    scores = np.array([[1.0, 1.0, 1.0, 0.0], [0.0, 0.5, 0.2, 0.9]])
    t2i = np.array([0, 1, 1, 1])
    ranks = m.i2t_ranks(scores, t2i)
    assert ranks.index_rank.tolist() == [2, 0]
    assert ranks.index_ahead.tolist() == [2, 0]
    assert ranks.expected_rank.tolist() == pytest.approx([1.0, 0.0])
    out = m.evaluate_retrieval(scores, t2i, ["a", "b", "c", "d"])
    assert out["txt_r1_index"] == 50.0 and out["txt_r1"] == pytest.approx(100 * (1 / 3 + 1) / 2)
    assert {f"{k}_index" for k in KEYS} <= set(out) and {f"{k}_pess" for k in KEYS} <= set(out)
    # the oracle's statistics carry no index counts
    with pytest.raises(ValueError, match="no index-order counts"):
        _ = m.oracle_ranks(t2i, ["a", "b", "c", "d"])[0].index_rank


def test_retrieval_ranks_once_per_direction_give_every_key():
    rng = np.random.default_rng(21)
    t2i = random_txt2img(7, rng)
    texts = random_texts(t2i.size, rng)
    a = rng.integers(0, 3, size=(7, t2i.size)).astype(float)
    b = rng.normal(size=(7, t2i.size))
    ranks = m.retrieval_ranks(a, t2i, texts, scores_t2i=b)
    assert torch.equal(ranks.i2t.index_ahead, m.i2t_ranks(a, t2i).index_ahead)
    assert torch.equal(ranks.t2i.above, m.t2i_ranks(b, t2i).above)
    got = m.ranks_to_metrics(ranks)
    ma, mb = m.evaluate_retrieval(a, t2i, texts), m.evaluate_retrieval(b, t2i, texts)
    for key, value in got.items():
        assert value == (ma if "txt_r" in key else mb if "img_r" in key else got)[key]
    assert m.evaluate_retrieval(a, t2i, texts, scores_t2i=b) == got | m.oracle_upper_bound(
        t2i, texts
    )
    with pytest.raises(ValueError, match="scores_t2i is"):
        m.retrieval_ranks(a, t2i, scores_t2i=b[:, :2])


def test_chance_recall_is_the_recall_of_a_constant_matrix():
    txt2img = np.array([0, 0, 1, 2, 2, 2, 3, 3, 3, 3, 3])  # 1 to 5 captions per image
    n_img, n_txt = 4, len(txt2img)
    ks = (1, 2, 5, 10)
    got = m.chance_recall(txt2img, ks)
    flat = m.recall_at_k(torch.zeros(n_img, n_txt), txt2img, ks)  # every candidate tied
    assert got == pytest.approx({f"chance_{k}": v for k, v in flat.items()}, abs=1e-9)
    for k in ks:  # closed forms
        miss = [math.comb(n_txt - p, k) / math.comb(n_txt, k) for p in np.bincount(txt2img)]
        assert got[f"chance_txt_r{k}"] == pytest.approx(100 * (1 - np.mean(miss)))
        assert got[f"chance_img_r{k}"] == pytest.approx(100 * min(1.0, k / n_img))
    with pytest.raises(ValueError, match="at least one caption"):
        m.chance_recall([0, 0, 2])  # image 1 has none
    with pytest.raises(ValueError, match="at least one caption"):
        m.chance_recall([0, 1, 2], n_img=2)
