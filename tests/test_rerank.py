"""Re-ranking (METHOD §3): ITM top-k re-scoring, SMR and the baselines against naive per-query
loops, their invariants, a constructed hub case SMR must fix, and the validation grid search."""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import itertools
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cmpagl import rerank as rr
from cmpagl.config import ModelConfig
from cmpagl.metrics import evaluate_retrieval
from cmpagl.models.cmpagl import build_model
from cmpagl.models.pretrained import load_pretrained
from cmpagl.retrieval import SplitEmbeddings, itm_rescore

CAPTIONS = [
    "three white planes are parked beside the runway",
    "an airport with two planes",
    "a dense residential area with many houses",
    "a green meadow",
    "two ships are docked in the harbour",
    "a green meadow",  # the exact same string as caption 3, of another image
    "a red car on the road",
    "many trees surround a small lake",
    "a bridge crosses the river",
]
TXT2IMG = np.array([0, 0, 1, 2, 3, 4, 4, 5, 5])


def random_scores(n_img=6, n_txt=9, seed=0) -> torch.Tensor:
    """Tie-free scores (continuous random values)."""
    return torch.rand(n_img, n_txt, generator=torch.Generator().manual_seed(seed)).double()


def order(values) -> list[int]:
    """Candidates by decreasing value (inputs here are tie-free)."""
    return sorted(range(len(values)), key=lambda c: -float(values[c]))


# --------------------------------------------------------------------------------------------
# A tiny model and embeddings of a tiny split
# --------------------------------------------------------------------------------------------
def embed_tiny(model) -> SplitEmbeddings:
    """Embeddings of 6 random images and CAPTIONS (eval mode, the model's mode kept)."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        img = model.encode_image(
            torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
        )
        tok = model.tokenize(CAPTIONS)
        txt = model.encode_text(tok["input_ids"], tok["attention_mask"])
    model.train(was_training)
    return SplitEmbeddings(
        img.embed, txt.embed, img.fusion, txt.hidden, txt.mask, TXT2IMG, list(CAPTIONS)
    )


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    cfg = ModelConfig(embed_dim=32, queue_size=16)
    cfg.gswin = dataclasses.replace(
        cfg.gswin, img_size=32, embed_dim=16, depths=(2, 2), num_heads=(2, 4)
    )
    model = build_model(cfg, use_momentum=False).eval()
    load_pretrained(model)  # the MiniLM text weights, as training starts from
    # A sharper ITM head centred on this split's pairs: p_match spread over (0, 1), so that
    # it re-orders candidates (an untrained head gives nearly the same logits to every pair).
    emb = embed_tiny(model)
    pairs = torch.cartesian_prod(torch.arange(6), torch.arange(len(CAPTIONS)))
    with torch.no_grad():
        model.itm_head.weight.mul_(30.0)
        model.itm_head.bias.mul_(30.0)
        fused = model.fuse(
            emb.text_hidden[pairs[:, 1]], emb.text_mask[pairs[:, 1]], emb.image_fusion[pairs[:, 0]]
        )
        margin = model.itm_logits(fused).diff(dim=-1).mean()
        model.itm_head.bias[1] -= margin
    return model.train()


@pytest.fixture(scope="module")
def tiny_emb(tiny_model) -> SplitEmbeddings:
    return embed_tiny(tiny_model)


def naive_p_match(model, emb, i, j) -> float:
    model.eval()
    with torch.no_grad():
        fused = model.fuse(
            emb.text_hidden[j : j + 1], emb.text_mask[j : j + 1], emb.image_fusion[i : i + 1]
        )
        return float(model.itm_logits(fused).softmax(-1)[0, 1])


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------
def test_topk_mask_keeps_ties_at_the_boundary():
    s = torch.tensor([[0.9, 0.5, 0.5, 0.1], [0.1, 0.2, 0.3, 0.4]])
    assert rr.topk_mask(s, 2, dim=1).tolist() == [
        [True, True, True, False],
        [False, False, True, True],
    ]
    assert rr.topk_mask(s, 1, dim=0).tolist() == [
        [True, True, True, False],
        [False, False, False, True],
    ]
    assert rr.topk_mask(s, 10, dim=1).all()
    with pytest.raises(ValueError, match="k must be a positive integer"):
        rr.topk_mask(s, 0, dim=1)


def test_competition_rank_against_naive():
    x = torch.tensor([[3.0, 1.0, 3.0, 2.0], [0.0, 0.0, 5.0, -1.0]])
    naive = [[sum(v > u for v in row) for u in row] for row in x.tolist()]
    assert rr.competition_rank(x, dim=1).tolist() == naive
    assert rr.competition_rank(x.T, dim=0).T.tolist() == naive


def test_as_ranking_checks_the_pair():
    s = random_scores()
    pair = rr.as_ranking(s)
    assert pair.i2t is pair.t2i and pair.i2t.dtype == torch.float64
    with pytest.raises(ValueError, match="differ in shape"):
        rr.as_ranking((s, s[:, :3]))
    with pytest.raises(ValueError, match=r"\[N_img, N_txt\]"):
        rr.as_ranking(torch.zeros(3))


# --------------------------------------------------------------------------------------------
# ITM re-scoring
# --------------------------------------------------------------------------------------------
def naive_itm_lists(model, emb, s, k):
    """Per query, the expected list: its top-k by S_itc + p_match, then the rest by S_itc."""
    n_img, n_txt = s.shape
    lists = {"i2t": [], "t2i": []}
    values, cache = {}, {}

    def p_match(i, j):
        if (i, j) not in cache:
            cache[i, j] = naive_p_match(model, emb, i, j)
        return cache[i, j]

    for direction, n_q in (("i2t", n_img), ("t2i", n_txt)):
        for q in range(n_q):
            row = s[q] if direction == "i2t" else s[:, q]
            cand = order(row)[:k]
            pair = (lambda c, q=q: (q, c)) if direction == "i2t" else (lambda c, q=q: (c, q))
            new = {c: float(row[c]) + p_match(*pair(c)) for c in cand}
            values.update({(direction, *pair(c)): v for c, v in new.items()})
            rest = [c for c in order(row) if c not in new]
            lists[direction].append(sorted(new, key=lambda c: -new[c]) + rest)
    return lists, values


def test_itm_rescore_matches_a_naive_loop(tiny_model, tiny_emb):
    s, k = random_scores(), 2
    tiny_model.train()
    out = itm_rescore(tiny_model, tiny_emb, s, k, batch_size=4)
    assert tiny_model.training  # evaluated in eval mode, the mode is restored
    lists, values = naive_itm_lists(tiny_model, tiny_emb, s, k)
    for i, expected in enumerate(lists["i2t"]):
        assert order(out.scores.i2t[i]) == expected
    for j, expected in enumerate(lists["t2i"]):
        assert order(out.scores.t2i[:, j]) == expected
    # float32 fusion of differently padded batches, through the x30 head: ~3e-5 apart
    for (direction, i, j), v in values.items():
        assert getattr(out.scores, direction)[i, j].item() == pytest.approx(v, abs=1e-4)
    # the p_match changed the order somewhere, otherwise this test would prove little
    assert any(lst[:k] != order(s[i])[:k] for i, lst in enumerate(lists["i2t"]))


def test_itm_rescore_counts_pairs_once_per_caption_text(tiny_model, tiny_emb):
    s = random_scores()
    out = itm_rescore(tiny_model, tiny_emb, s, 2, batch_size=100)
    union = out.candidates.i2t | out.candidates.t2i
    pairs = union.nonzero().tolist()
    assert out.n_pairs == len(pairs)
    assert out.n_evals == len({(i, CAPTIONS[j]) for i, j in pairs})
    assert (out.p_match > 0).eq(union).all()
    # identical strings share one ITM pass, so duplicate columns get the same p_match
    both = union[:, 3] & union[:, 5]
    assert both.any()
    assert torch.equal(out.p_match[both, 3], out.p_match[both, 5])
    # batch size does not change the result
    small = itm_rescore(tiny_model, tiny_emb, s, 2, batch_size=7)
    assert torch.allclose(small.scores.i2t, out.scores.i2t, atol=1e-6)


def test_itm_rescore_needs_fusion_inputs(tiny_model, tiny_emb):
    emb = dataclasses.replace(tiny_emb, image_fusion=torch.empty(0))
    with pytest.raises(ValueError, match="keep_fusion=True"):
        itm_rescore(tiny_model, emb, random_scores(), 3)
    with pytest.raises(ValueError, match="s_itc is"):
        itm_rescore(tiny_model, tiny_emb, random_scores(5, 9), 3)


# --------------------------------------------------------------------------------------------
# SMR
# --------------------------------------------------------------------------------------------
def naive_smr(i2t, t2i, tau, k, lam):
    """METHOD §3 formulas with explicit loops over queries (math.exp, Python floats)."""
    a, b = i2t.tolist(), t2i.tolist()
    n_img, n_txt = len(a), len(a[0])
    p_row = [
        [math.exp(a[i][j] / tau) / sum(math.exp(v / tau) for v in a[i]) for j in range(n_txt)]
        for i in range(n_img)
    ]
    col = [[b[i][j] for i in range(n_img)] for j in range(n_txt)]
    p_col = [
        [math.exp(b[i][j] / tau) / sum(math.exp(v / tau) for v in col[j]) for j in range(n_txt)]
        for i in range(n_img)
    ]
    w = [[p_row[i][j] * p_col[i][j] for j in range(n_txt)] for i in range(n_img)]
    out_i2t, out_t2i = [r[:] for r in a], [r[:] for r in b]
    for i in range(n_img):
        top = order(a[i])[:k]
        m = max(w[i][j] for j in top)
        for j in top:
            out_i2t[i][j] += lam * w[i][j] / m
    for j in range(n_txt):
        top = order(col[j])[:k]
        m = max(w[i][j] for i in top)
        for i in top:
            out_t2i[i][j] += lam * w[i][j] / m
    return torch.tensor(out_i2t, dtype=torch.float64), torch.tensor(out_t2i, dtype=torch.float64)


@pytest.mark.parametrize("tau,k,lam", [(0.05, 3, 0.5), (0.2, 1, 2.0), (0.1, 20, 0.3)])
def test_smr_matches_naive_loops(tau, k, lam):
    s = random_scores(5, 8, seed=2)
    out = rr.smr(s, tau, k, lam)
    ref_i2t, ref_t2i = naive_smr(s, s, tau, k, lam)
    assert torch.allclose(out.i2t, ref_i2t, atol=1e-12)
    assert torch.allclose(out.t2i, ref_t2i, atol=1e-12)
    # a pair (as after ITM) uses i2t's rows and t2i's columns
    pair = (s, random_scores(5, 8, seed=3))
    out = rr.smr(pair, tau, k, lam)
    ref_i2t, ref_t2i = naive_smr(*pair, tau, k, lam)
    assert torch.allclose(out.i2t, ref_i2t, atol=1e-12)
    assert torch.allclose(out.t2i, ref_t2i, atol=1e-12)


def test_smr_lambda_zero_is_the_identity():
    s = random_scores().float()
    out = rr.smr(s, 0.05, 3, 0.0)
    assert torch.equal(out.i2t, s.double()) and torch.equal(out.t2i, s.double())


def test_smr_weights_lie_in_unit_interval_on_the_topk_only():
    s = random_scores(7, 11)
    w = rr.smr_weights(s, 0.01, 4)
    for m, dim in ((w.i2t, 1), (w.t2i, 0)):
        assert ((m > 0) == rr.topk_mask(s, 4, dim)).all()
        assert m.max() <= 1.0 and torch.allclose(
            m.amax(dim), torch.ones(m.shape[1 - dim], dtype=m.dtype)
        )


def test_smr_invariances():
    s, tau, k, lam = random_scores(6, 10, seed=4), 0.05, 4, 0.7
    ref = rr.smr(s, tau, k, lam)
    # a constant shift: softmaxes and top-k sets are unchanged, S_opt shifts by the constant
    shifted = rr.smr(s + 3.0, tau, k, lam)
    assert torch.allclose(shifted.i2t, ref.i2t + 3.0) and torch.allclose(shifted.t2i, ref.t2i + 3.0)
    # a common scale of S_raw, τ_s and λ scales S_opt
    scaled = rr.smr(2.5 * s, 2.5 * tau, k, 2.5 * lam)
    assert torch.allclose(scaled.i2t, 2.5 * ref.i2t) and torch.allclose(scaled.t2i, 2.5 * ref.t2i)
    # swapping the modalities swaps the directions
    swapped = rr.smr(s.T, tau, k, lam)
    assert torch.allclose(swapped.i2t, ref.t2i.T) and torch.allclose(swapped.t2i, ref.i2t.T)
    # relabelling images and captions relabels S_opt
    pi, pt = torch.randperm(6), torch.randperm(10)
    perm = rr.smr(s[pi][:, pt], tau, k, lam)
    assert torch.allclose(perm.i2t, ref.i2t[pi][:, pt])
    # NOT invariant: a per-row shift leaves the row softmax alone but changes the column one
    row_shift = rr.smr(s + torch.arange(6.0)[:, None], tau, k, lam)
    assert not torch.allclose(row_shift.i2t - torch.arange(6.0)[:, None].double(), ref.i2t)


def test_smr_only_reorders_each_querys_topk():
    s, k = random_scores(6, 10, seed=5), 3
    out = rr.smr(s, 0.02, k, 5.0)
    for m, dim in ((out.i2t, 1), (out.t2i, 0)):
        top = rr.topk_mask(s, k, dim)
        assert torch.equal(rr.topk_mask(m, k, dim), top)  # the same top-k set
        assert torch.equal(m[~top], s[~top])  # everything below it untouched


def test_smr_keeps_identical_captions_tied():
    s = random_scores(5, 8, seed=6)
    s[:, 5] = s[:, 2]
    for out in (rr.smr(s, 0.05, 3, 1.0), rr.galr_rerank(s, 3), rr.dual_softmax(s)):
        assert torch.equal(out.i2t[:, 5], out.i2t[:, 2])
        assert torch.equal(out.t2i[:, 5], out.t2i[:, 2])


def test_smr_minmax_scaling_against_naive_and_degenerate_cases():
    s = random_scores(5, 8, seed=12)
    w_max = rr.smr_weights(s, 0.1, 4)
    w_mm = rr.smr_weights(s, 0.1, 4, scale="minmax")
    for by_max, by_mm, dim in ((w_max.i2t, w_mm.i2t, 1), (w_max.t2i, w_mm.t2i, 0)):
        top = rr.topk_mask(s, 4, dim)
        for q in range(s.shape[1 - dim]):
            sel = top.select(1 - dim, q)
            ratio = by_max.select(1 - dim, q)[sel]  # W / max over the query's top-k
            want = (ratio - ratio.min()) / (ratio.max() - ratio.min())
            assert torch.allclose(by_mm.select(1 - dim, q)[sel], want, atol=1e-12)
            assert by_mm.select(1 - dim, q)[~sel].eq(0).all()
            assert by_mm.select(1 - dim, q)[sel].min() == 0.0  # the least mutual pair gets 0
    # degenerate: one candidate per query gets 1 under both scalings (a uniform shift)
    for scale in rr.SMR_SCALES:
        w = rr.smr_weights(s, 0.1, 1, scale=scale)
        assert torch.equal(w.i2t.sum(1), torch.ones(5, dtype=torch.float64))
        assert torch.equal(w.t2i.sum(0), torch.ones(8, dtype=torch.float64))
    # degenerate: a query whose top-k are identical captions (all W equal) gets all 1
    s[:, 5] = s[:, 2]
    s[0, 2] = s[0, 5] = 5.0
    w = rr.smr_weights(s, 0.1, 2, scale="minmax")
    assert w.i2t[0, 2] == w.i2t[0, 5] == 1.0 and w.i2t[0].sum() == 2.0
    with pytest.raises(ValueError, match="scale must be one of"):
        rr.smr(s, 0.1, 2, 0.5, scale="mean")


def test_itm_smr_weights_do_not_depend_on_the_gap():
    """SMR after ITM reads S_itc + p_match (no gap): W_map is the same whatever the gap, and
    not the "candidate in both directions" indicator that the gapped softmaxes give."""
    s = random_scores(6, 9, seed=11)
    p = torch.rand(6, 9, generator=torch.Generator().manual_seed(12)).double()
    low, high = rr.itm_scores(s, p, 3, gap=100.0), rr.itm_scores(s, p, 3, gap=1e4)
    assert not torch.equal(low.s_raw.i2t, high.s_raw.i2t)  # the gap is in the order scores
    for a, b in ((low.s_prob, high.s_prob), (low.candidates, high.candidates)):
        assert torch.equal(a.i2t, b.i2t) and torch.equal(a.t2i, b.t2i)
    for tau, k in ((0.05, 2), (0.05, 5), (50.0, 2), (50.0, 5)):  # k = 5 > 3 candidates
        w_low = rr.smr_weights(low.s_raw, tau, k, s_prob=low.s_prob)
        w_high = rr.smr_weights(high.s_raw, tau, k, s_prob=high.s_prob)
        assert torch.equal(w_low.i2t, w_high.i2t) and torch.equal(w_low.t2i, w_high.t2i)
        # the naive formulas on S_itc + p_match per direction's candidates, S_itc elsewhere
        ref_i2t, ref_t2i = naive_smr(low.s_prob.i2t, low.s_prob.t2i, tau, k, 1.0)
        assert torch.allclose(w_low.i2t, ref_i2t - low.s_prob.i2t, atol=1e-12)
        assert torch.allclose(w_low.t2i, ref_t2i - low.s_prob.t2i, atol=1e-12)
    # The softmaxes of the gapped S_raw (the earlier computation) depend on the gap ...
    old_low = rr.smr_weights(low.s_raw, 50.0, 5)
    old_high = rr.smr_weights(high.s_raw, 50.0, 5)
    assert not torch.allclose(old_low.i2t, old_high.i2t)
    # ... and at a usual τ_s give ~0 to every pair that is a candidate in one direction only
    old = rr.smr_weights(low.s_raw, 0.05, 3)
    new = rr.smr_weights(low.s_raw, 0.05, 3, s_prob=low.s_prob)
    one_way = low.candidates.i2t & ~low.candidates.t2i
    assert one_way.any()
    assert (old.i2t[one_way] < 1e-100).all() and (new.i2t[one_way] > 1e-30).all()


def test_itm_scores_reuse_p_match_for_smaller_k(tiny_model, tiny_emb):
    s = random_scores()
    big = itm_rescore(tiny_model, tiny_emb, s, 4)
    small = itm_rescore(tiny_model, tiny_emb, s, 2)
    assert big.k == 4 and big.n_pairs > small.n_pairs
    again = rr.itm_scores(s, big.p_match, 2)  # no model run: the k = 4 probabilities, masked
    assert torch.equal(again.candidates.i2t, small.candidates.i2t)
    assert torch.equal(again.candidates.t2i, small.candidates.t2i)
    for a, b in ((again.s_raw, small.scores), (again.s_prob, small.s_prob)):
        assert torch.allclose(a.i2t, b.i2t, atol=1e-6) and torch.allclose(a.t2i, b.t2i, atol=1e-6)
    with pytest.raises(ValueError, match=r"unknown \(NaN\) for some top-4 candidates"):
        rr.itm_scores(s, small.p_match, 4)


def test_rerank_is_pure_matrix_code():
    """rerank imports no model (ITM scoring lives in cmpagl.retrieval)."""
    code = (
        "import sys, cmpagl.rerank; print(sorted(m for m in sys.modules if m.split('.')[0] "
        "in ('cmpagl', 'transformers')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    expected = ["cmpagl", "cmpagl.hugepages", "cmpagl.metrics", "cmpagl.rerank"]
    assert out.stdout.strip() == str(expected)


def hub_case():
    """5 images with one caption each (caption i of image i) and a hub caption (of image 4)
    that is every image's top-1. Image 0 and caption 0 are each other's best match otherwise."""
    s = torch.full((5, 6), 0.1, dtype=torch.float64)
    s += torch.rand(5, 6, generator=torch.Generator().manual_seed(0)).double() * 0.01
    s[torch.arange(5), torch.arange(5)] = 0.8
    s[:, 5] = 0.85
    s[4, 5] = 0.86  # the hub caption does find its own image
    return s, np.array([0, 1, 2, 3, 4, 4])


def test_smr_fixes_a_mutual_best_match_buried_by_a_hub():
    s, txt2img = hub_case()
    assert s[0].argmax() == 5  # before: image 0 retrieves the hub caption of image 4
    before = rr.evaluate_ranking(s, txt2img)
    out = rr.smr(s, 0.05, 2, 0.5)
    assert out.i2t[0].argmax() == 0  # after: its own caption
    after = rr.evaluate_ranking(out, txt2img)
    assert before["txt_r1"] == 20.0 and after["txt_r1"] == 100.0
    assert after["img_r1"] == before["img_r1"] == 100.0  # captions already found their image


# --------------------------------------------------------------------------------------------
# Baselines
# --------------------------------------------------------------------------------------------
def test_dual_and_inverted_softmax_match_naive_loops():
    s, tau = random_scores(4, 7, seed=7), 0.1
    a = s.tolist()
    n_img, n_txt = s.shape
    col_sum = [sum(math.exp(a[i][j] / tau) for i in range(n_img)) for j in range(n_txt)]
    row_sum = [sum(math.exp(v / tau) for v in a[i]) for i in range(n_img)]
    dual, inv = rr.dual_softmax(s, tau), rr.inverted_softmax(s, tau)
    for i in range(n_img):
        for j in range(n_txt):
            e = math.exp(a[i][j] / tau)
            assert dual.i2t[i, j].item() == pytest.approx(a[i][j] * e / col_sum[j], rel=1e-12)
            assert dual.t2i[i, j].item() == pytest.approx(a[i][j] * e / row_sum[i], rel=1e-12)
            assert inv.i2t[i, j].item() == pytest.approx(math.log(e / col_sum[j]), rel=1e-12)
            assert inv.t2i[i, j].item() == pytest.approx(math.log(e / row_sum[i]), rel=1e-12)


def naive_galr_i2t(sim, k, wp1, wp2):
    """GaLR's i2t_rerank_optim as described: loops, argsort positions (tie-free input)."""
    n_q, n_c = sim.shape
    new = {}
    for q in range(n_q):
        cand = list(np.argsort(-sim[q])[:k])
        back = {c: int(np.where(np.argsort(-sim[:, c]) == q)[0][0]) for c in cand}
        for f, c in enumerate(cand):
            new[q, c] = wp1 * sim[q, c] / sim[:, c].sum() + math.exp(-0.05 * (f + 1))
        for r, c in enumerate(sorted(cand, key=lambda c: back[c])):
            new[q, c] += wp2 * math.exp(-0.05 * (r + 1))
    return new


def test_galr_matches_a_naive_loop():
    s, k, wp1, wp2 = random_scores(6, 9, seed=8), 4, 0.3, 1.1
    out = rr.galr_rerank(s, k, wp1, wp2)
    for direction, m, sim in (("i2t", out.i2t, s.numpy()), ("t2i", out.t2i.T, s.T.numpy())):
        ref = naive_galr_i2t(sim, k, wp1, wp2)
        for q in range(sim.shape[0]):
            cand = list(np.argsort(-sim[q])[:k])
            for c in cand:
                assert m[q, c].item() == pytest.approx(ref[q, c], rel=1e-12), direction
            # candidates by their new score, then the rest in S order
            rest = [c for c in np.argsort(-sim[q]) if c not in cand]
            assert order(m[q]) == sorted(cand, key=lambda c: -ref[q, c]) + rest


# --------------------------------------------------------------------------------------------
# Metrics of a pair and the grid search
# --------------------------------------------------------------------------------------------
def test_evaluate_ranking_takes_each_direction_from_its_matrix():
    a, b = random_scores(seed=9), random_scores(seed=10)
    assert rr.evaluate_ranking(a, TXT2IMG, CAPTIONS) == evaluate_retrieval(a, TXT2IMG, CAPTIONS)
    ma, mb = evaluate_retrieval(a, TXT2IMG, CAPTIONS), evaluate_retrieval(b, TXT2IMG, CAPTIONS)
    pair = rr.evaluate_ranking((a, b), TXT2IMG, CAPTIONS)
    assert pair.keys() == ma.keys()
    for key, value in pair.items():
        if "txt_r" in key:
            assert value == ma[key]
        elif "img_r" in key:
            assert value == mb[key]
    for p, s in (("", ""), ("", "_pess"), ("dup_", "")):
        six = [pair[f"{p}{d}_r{k}{s}"] for d in ("txt", "img") for k in (1, 5, 10)]
        assert pair[f"{p}r_mean{s}"] == pytest.approx(sum(six) / 6, abs=1e-12)


def test_grid_search_picks_the_best_val_r_mean():
    s, txt2img = hub_case()
    grid = dict(grid_tau=(0.05, 0.5), grid_k=(1, 2), grid_lambda=(0.01, 0.5))
    best, found = rr.grid_search_smr(s, txt2img, **grid)
    assert found.size == len(found.table) == 1 + 2 * 2 * 2  # "no re-ranking" tried once, first
    assert found.table[0] == {"off": True, "r_mean": found.off_value}
    brute = {
        (t, k, lam): rr.evaluate_ranking(rr.smr(s, t, k, lam), txt2img)["r_mean"]
        for t in (0.05, 0.5)
        for k in (1, 2)
        for lam in (0.01, 0.5)
    }
    for row in found.table[1:]:
        assert row["r_mean"] == pytest.approx(brute[row["tau_s"], row["k"], row["lam"]], abs=1e-9)
    assert found.off_value == pytest.approx(rr.evaluate_ranking(s, txt2img)["r_mean"])
    assert best.lam > 0 and found.params == best._asdict()
    assert brute[tuple(best)] == max(brute.values()) == found.value
    first = next(key for key, value in brute.items() if value >= max(brute.values()) - 1e-9)
    assert tuple(best) == first  # the earliest best wins


def test_grid_search_keeps_lambda_zero_unless_smr_strictly_helps():
    s = torch.eye(4, dtype=torch.float64) + 0.01 * random_scores(4, 4)  # already perfect
    best, found = rr.grid_search_smr(
        s, np.arange(4), grid_tau=(0.1,), grid_k=(2,), grid_lambda=(0.0, 0.5)
    )
    assert best == rr.SmrParams(0.1, 2, 0.0) and found.params is None
    assert [row.get("lam") for row in found.table] == [None, 0.5]  # λ = 0 is the "off" row
    assert found.on_edge() == {"tau_s": None, "k": None, "lam": None}


def test_generic_grid_search_earliest_strict_best_and_edges():
    """One routine for every re-ranker: off first, product order, strict gains, edge flags."""
    s, txt2img = hub_case()
    taus = (0.001, 0.01, 0.1, 1.0, 10.0)
    found = rr.grid_search(lambda tau: rr.inverted_softmax(s, tau), s, txt2img, {"tau": taus})
    values = [rr.evaluate_ranking(rr.inverted_softmax(s, t), txt2img)["r_mean"] for t in taus]
    off = rr.evaluate_ranking(s, txt2img)["r_mean"]
    assert [row["r_mean"] for row in found.table] == pytest.approx([off, *values], abs=1e-9)
    best = max(values)
    if best > off + rr.GRID_TOLERANCE:
        assert found.params == {"tau": taus[values.index(best)]}
    else:
        assert found.params is None
    # a re-ranker that never changes the order is never chosen: gains must be strict
    same = rr.grid_search(lambda tau: 2.0 * s + tau, s, txt2img, {"tau": (1.0, 2.0)})
    assert same.params is None and same.value == same.off_value
    # without "off" the first point wins ties; a middle value is not on the edge
    ladder = {"a": (1, 2, 3), "b": (0.5,)}
    bump = rr.grid_search(
        lambda a, b: s + 10.0 * (a == 2) * torch.eye(5, 6, dtype=torch.float64),
        s,
        txt2img,
        ladder,
        with_off=False,
    )
    assert bump.size == 3 and bump.off_value is None
    assert bump.params == {"a": 2, "b": 0.5}
    assert bump.on_edge() == {"a": False, "b": None}
    edge = rr.grid_search(
        lambda a, b: s + 10.0 * (a == 3) * torch.eye(5, 6, dtype=torch.float64),
        s,
        txt2img,
        ladder,
    )
    assert edge.params == {"a": 3, "b": 0.5} and edge.on_edge() == {"a": True, "b": None}
    with pytest.raises(ValueError, match="at least one value; empty: \\['b'\\]"):
        rr.grid_search(lambda a, b: s, s, txt2img, {"a": (1,), "b": ()})


def test_grid_search_rejects_bad_grids():
    s, txt2img = hub_case()
    with pytest.raises(ValueError, match="at least one value"):
        rr.grid_search_smr(s, txt2img, grid_tau=())
    with pytest.raises(ValueError, match="tau_s must be a positive"):
        rr.grid_search_smr(s, txt2img, grid_tau=(0.0,))
    with pytest.raises(ValueError, match=">= 0"):
        rr.grid_search_smr(s, txt2img, grid_lambda=(-1.0,))
    with pytest.raises(ValueError, match="needs captions_val"):
        rr.grid_search_smr(s, txt2img, criterion="dup_r_mean")


def test_smr_rejects_bad_parameters():
    s = random_scores()
    with pytest.raises(ValueError, match="tau_s"):
        rr.smr(s, -0.1, 3, 0.5)
    with pytest.raises(ValueError, match="lam"):
        rr.smr(s, 0.1, 3, -0.5)
    with pytest.raises(ValueError, match="k must be"):
        rr.smr(s, 0.1, 0, 0.5)


def test_reranking_does_not_modify_its_input(tiny_model, tiny_emb):
    s = random_scores()
    keep = copy.deepcopy(s)
    rr.smr(s, 0.05, 3, 0.5), rr.galr_rerank(s), rr.dual_softmax(s)
    itm_rescore(tiny_model, tiny_emb, s, 2)
    assert torch.equal(s, keep)


# --------------------------------------------------------------------------------------------
# The fast paths against the dense reference (benchmarks/rerank_reference.py), bit for bit
# --------------------------------------------------------------------------------------------
def _load_reference():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "rerank_reference.py"
    spec = importlib.util.spec_from_file_location("rerank_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


REFERENCE = _load_reference()


def tied_scores(n_img: int, n_txt: int, gen: torch.Generator) -> torch.Tensor:
    """Scores full of exact ties: few distinct values (ties at every top-k boundary), a
    duplicated caption column and a duplicated image row (identical captions and images)."""
    levels = int(torch.randint(2, 6, (1,), generator=gen))
    s = torch.randint(0, levels, (n_img, n_txt), generator=gen).double() / levels + 0.1
    if n_txt > 2:
        s[:, -1] = s[:, 0]
    if n_img > 2:
        s[-1] = s[1]
    return s


def random_cases(n: int, seed: int = 0):
    """(scores, k) of random sizes, a third continuous, two thirds full of ties; k from 1 to
    beyond the list lengths."""
    gen = torch.Generator().manual_seed(seed)
    for trial in range(n):
        n_img, n_txt = (int(torch.randint(1, hi, (1,), generator=gen)) for hi in (9, 25))
        if trial % 3 == 0:
            s = torch.rand(n_img, n_txt, generator=gen).double()
        else:
            s = tied_scores(n_img, n_txt, gen)
        yield s, int(torch.randint(1, 8, (1,), generator=gen))


def same(a: rr.RankingScores, b: rr.RankingScores) -> bool:
    return torch.equal(a.i2t, b.i2t) and torch.equal(a.t2i, b.t2i)


def below_float32(n_img: int, n_txt: int, gen: torch.Generator) -> torch.Tensor:
    """Scores whose differences are far below float32's resolution (1e-12 apart around
    few levels): rounded to float32 nearly every boundary ties, in float64 none or some."""
    levels = torch.randint(0, 3, (n_img, n_txt), generator=gen).double()
    return 0.25 + levels / 4 + torch.randint(0, 4, (n_img, n_txt), generator=gen).double() * 1e-12


def test_topk_lists_hold_exactly_the_topk_mask():
    """Every way of selecting (along rows or columns, from the scores or from their float32
    rounding) lists exactly the entries of the dense top-k mask, ties and NaN included."""
    gen = torch.Generator().manual_seed(4)
    extra = [(below_float32(7, 30, gen), k) for k in (1, 3, 8)]
    for s, k in [*random_cases(60, seed=1), *extra]:
        for dim in (1, 0):
            for coarse in (None, rr.coarse_scores(s)):
                top = rr._topk_lists(s, k, dim, coarse)
                rows = s if dim == 1 else s.T
                mask = torch.zeros_like(rows, dtype=torch.bool)
                query = torch.arange(rows.shape[0])[:, None].expand_as(top.index)
                mask[query[top.valid], top.index[top.valid]] = True
                assert int(top.valid.sum()) == int(mask.sum())  # no entry twice
                want = rr.topk_mask(s, k, dim)
                assert torch.equal(mask, want if dim == 1 else want.T), (k, dim, coarse is None)
    # the float32 rounding really ties where float64 does not (so the exact path is exercised)
    s = extra[0][0]
    assert (s.float()[:, :, None] == s.float()[:, None, :]).sum() > (
        s[:, :, None] == s[:, None, :]
    ).sum()
    # NaN: s >= kth leaves it out (and a NaN k-th score leaves every entry out), the lists too
    nan = float("nan")
    s = torch.tensor([[nan, 0.5, 0.3, 0.2], [0.1, nan, 0.9, 0.4], [nan, nan, 0.1, 0.2]])
    for coarse in (None, rr.coarse_scores(s.double())):
        top = rr._topk_lists(s.double(), 2, 1, coarse)
        got = [sorted(top.index[q][top.valid[q]].tolist()) for q in range(3)]
        assert got == [m.nonzero().squeeze(1).tolist() for m in rr.topk_mask(s, 2, 1)]
        assert got == [[1], [2], []]


def test_count_greater_against_naive_both_ways():
    gen = torch.Generator().manual_seed(3)
    lists = torch.randint(0, 6, (7, 40), generator=gen).double()  # many ties
    for n in (5, 400):  # few values: compared with their lists; many: sorted + binary search
        which = torch.randint(0, 7, (n,), generator=gen)
        values = torch.randint(-1, 7, (n,), generator=gen).double()
        want = [(lists[w] > v).sum().item() for w, v in zip(which, values, strict=True)]
        got = rr._count_greater(lists.T.contiguous().T, which, values, torch.empty(7, 40))
        assert got.tolist() == want


def test_fast_smr_equals_the_dense_reference_bit_for_bit():
    """Every output of the top-k-only SMR equals the dense formulas' (the implementation before
    it) exactly: W_map, S_opt, both scalings, pairs after ITM, ties at the boundary, k beyond the
    lists, float32 and transposed (non-contiguous) input, and the scorer's cached W over a grid."""
    gen = torch.Generator().manual_seed(4)
    for trial, (s, k) in enumerate(random_cases(45, seed=2)):
        tau = (0.01, 0.05, 1.0)[trial % 3]
        prob = s + torch.rand(s.shape, generator=gen).double()
        for scale in rr.SMR_SCALES:
            for args, kw in (
                ((s,), {}),
                (((s, prob),), {"s_prob": (prob, s)}),  # a pair: rows and columns differ
            ):
                want = REFERENCE.smr_weights(*args, tau, k, scale=scale, **kw)
                assert same(rr.smr_weights(*args, tau, k, scale=scale, **kw), want)
                for lam in (0.0, 0.3):
                    want = REFERENCE.smr(*args, tau, k, lam, scale=scale, **kw)
                    assert same(rr.smr(*args, tau, k, lam, scale=scale, **kw), want)
    s = torch.rand(9, 6, generator=gen).T  # float64, transposed
    assert same(rr.smr(s, 0.05, 2, 0.5), REFERENCE.smr(s, 0.05, 2, 0.5))
    assert same(rr.smr(s.float(), 0.05, 2, 0.5), REFERENCE.smr(s.float(), 0.05, 2, 0.5))
    # λ = inf: the dense formula's λ·0 = NaN off the top-k, kept
    inf = rr.smr(s, 0.05, 2, math.inf)
    assert inf.i2t.isnan().any() and torch.equal(
        inf.i2t.isnan(), REFERENCE.smr(s, 0.05, 2, math.inf).i2t.isnan()
    )
    # the scorer over a grid (W cached per (τ_s, k), spare matrices reused for the first λ)
    score = rr.smr_scorer(s)
    for tau, k, lam in itertools.product((0.05, 0.2), (1, 3), (0.1, 1.0)):
        assert same(score(tau, k, lam), REFERENCE.smr(s, tau, k, lam))
    # ... and with its two output matrices reused: each result right until the next call,
    # which writes into the same storage (a new (τ_s, k) uses them as scratch first)
    score = rr.smr_scorer(s, reuse_outputs=True)
    first = score(0.05, 3, 0.1)
    storage = {first.i2t.data_ptr(), first.t2i.data_ptr()}
    for tau, k, lam in itertools.product((0.05, 0.2), (1, 3), (0.1, 1.0)):
        got = score(tau, k, lam)
        assert {got.i2t.data_ptr(), got.t2i.data_ptr()} == storage
        assert same(got, REFERENCE.smr(s, tau, k, lam)), (tau, k, lam)


def test_fast_galr_equals_the_dense_reference_bit_for_bit():
    """GaLR on each query's candidates only (ranks by binary search and comparison) equals the
    dense competition ranks of the implementation before it, exactly, ties included."""
    for trial, (s, k) in enumerate(random_cases(60, seed=5)):
        params = ((k,), (k, 0.3, 1.1, 0.2))[trial % 2]
        assert same(rr.galr_rerank(s, *params), REFERENCE.galr_rerank(s, *params)), trial
    gen = torch.Generator().manual_seed(6)
    s = torch.rand(40, 7, generator=gen).double().T  # transposed, many candidates per list
    assert same(rr.galr_rerank(s, 5), REFERENCE.galr_rerank(s, 5))
    assert same(rr.galr_rerank(s.float(), 3), REFERENCE.galr_rerank(s.float(), 3))


def test_fast_paths_keep_identical_captions_tied_at_retrieval_size():
    """A 60 x 300 retrieval-like matrix with duplicated captions: equal to the reference, and
    the duplicates tie exactly in both directions."""
    gen = torch.Generator().manual_seed(7)
    img = torch.nn.functional.normalize(torch.randn(60, 16, generator=gen), dim=1)
    txt = torch.nn.functional.normalize(
        img.repeat_interleave(5, 0) + 0.5 * torch.randn(300, 16, generator=gen), dim=1
    )
    txt[1::9] = txt[0]  # 34 copies of caption 0
    s = (img @ txt.T).double()
    for ours, ref in (
        (rr.smr(s, 0.05, 10, 0.5), REFERENCE.smr(s, 0.05, 10, 0.5)),
        (rr.galr_rerank(s), REFERENCE.galr_rerank(s)),
    ):
        assert same(ours, ref)
        for m in (ours.i2t, ours.t2i):
            assert (m[:, 1::9] == m[:, :1]).all()


def test_log_normalizers_match_logsumexp_and_survive_a_wide_range():
    """One exp of the matrix gives both normalizers (the shift is the global max); a range
    wider than float64's exp (τ_s tiny) falls back to a shift per row and column."""
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(7, 11, generator=gen, dtype=torch.float64) * 30
    rows, cols = rr.log_normalizers(x)
    assert torch.allclose(rows, torch.logsumexp(x, 1), rtol=0, atol=1e-12)
    assert torch.allclose(cols, torch.logsumexp(x, 0), rtol=0, atol=1e-12)
    # 2,000 units apart: exp(x - max) would underflow to 0 for the low row; no -inf, no NaN
    wide = x.clone()
    wide[0] -= 2000.0
    rows, cols = rr.log_normalizers(wide)
    assert torch.isfinite(rows).all() and torch.isfinite(cols).all()
    assert torch.allclose(rows, torch.logsumexp(wide, 1), rtol=0, atol=1e-9)
    # SMR at such a τ_s: W finite, and each query's best mutual pair still gets 1
    s = torch.rand(6, 9, generator=gen, dtype=torch.float64)
    w = rr.smr_weights(s, 1e-4, 3)
    assert torch.isfinite(w.i2t).all() and torch.isfinite(w.t2i).all()
    assert (w.i2t.amax(1) == 1).all() and (w.t2i.amax(0) == 1).all()
    # the scratch path writes exp(x - max) into the given matrix and gives the same numbers
    scratch = torch.empty_like(x)
    assert all(
        torch.equal(a, b)
        for a, b in zip(rr.log_normalizers(x, scratch=scratch), rr.log_normalizers(x), strict=True)
    )
