"""cmpagl.losses against naive references written with explicit loops (float64, tol 1e-10).

Every batch holds duplicate image ids (one image with two captions), which is exactly where a
loss that treats "row b" as "the only positive" goes wrong.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cmpagl.config import LossConfig
from cmpagl.losses import (
    LOSS_TERMS,
    active_terms,
    combine_losses,
    intra_class_loss,
    itc_loss,
    itm_hard_negatives,
    itm_loss,
    itm_negative_probs,
    mlm_loss,
    optimized_triplet_loss,
    triplet_loss,
)

TOL = 1e-10
# Image 3 appears three times and image 7 twice, each time with another caption.
IDS = torch.tensor([3, 7, 3, 1, 7, 5, 3])


def unit(*shape: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


def close(a: torch.Tensor | float, b: float) -> bool:
    return abs(float(torch.as_tensor(a).detach()) - b) < TOL


# ----------------------------------------------------------------------------------------------
# Naive references
# ----------------------------------------------------------------------------------------------
def dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def cos(a: list[float], b: list[float]) -> float:
    return dot(a, b) / math.sqrt(dot(a, a) * dot(b, b))


def naive_soft_ce_row(logits: list[float], target: list[float]) -> float:
    lse = math.log(sum(math.exp(x) for x in logits))
    return -sum(q * (x - lse) for q, x in zip(target, logits, strict=True))


def naive_itc(
    img, txt, ids, temp, img_all=None, txt_all=None, ids_all=None, img_m=None, txt_m=None, alpha=0.0
):
    """ALBEF ITC by loops: per query a target distribution over the keys, then soft CE."""
    img, txt, ids = img.tolist(), txt.tolist(), ids.tolist()
    img_all = img if img_all is None else img_all.tolist()
    txt_all = txt if txt_all is None else txt_all.tolist()
    ids_all = ids if ids_all is None else ids_all.tolist()
    img_m = img_all if img_m is None else img_m.tolist()
    txt_m = txt_all if txt_m is None else txt_m.tolist()
    n = len(ids_all)
    total = 0.0
    for queries, keys, q_m, k_m in ((img, txt_all, img_m, txt_m), (txt, img_all, txt_m, img_m)):
        loss = 0.0
        for b in range(len(ids)):
            logits = [dot(queries[b], keys[j]) / temp for j in range(n)]
            positives = [j for j in range(n) if ids_all[j] == ids[b]]
            target = [1.0 / len(positives) if j in positives else 0.0 for j in range(n)]
            if alpha > 0:
                t_logits = [dot(q_m[b], k_m[j]) / temp for j in range(n)]
                z = sum(math.exp(x) for x in t_logits)
                target = [
                    alpha * math.exp(t_logits[j]) / z + (1 - alpha) * target[j] for j in range(n)
                ]
            loss += naive_soft_ce_row(logits, target)
        total += loss / len(ids)
    return total / 2


def naive_triplet(img, txt, ids, margin, reduction):
    img, txt, ids = img.tolist(), txt.tolist(), ids.tolist()
    b = len(ids)
    s = [[cos(img[i], txt[t]) for t in range(b)] for i in range(b)]
    total = 0.0
    for direction in ("i2t", "t2i"):
        acc = 0.0
        for a in range(b):
            pos = s[a][a]
            negs = [
                s[a][j] if direction == "i2t" else s[j][a] for j in range(b) if ids[j] != ids[a]
            ]
            if not negs:
                continue  # no valid negative: contributes 0
            if reduction == "hardest":
                acc += max(0.0, margin - pos + max(negs))
            else:
                acc += sum(max(0.0, margin - pos + n) for n in negs)
        total += acc / b
    return total


def naive_intra(img, txt):
    img, txt = img.tolist(), txt.tolist()
    return sum(1 - cos(v, t) for v, t in zip(img, txt, strict=True)) / len(img)


def naive_ce(rows: list[list[float]], labels: list[int]) -> float:
    return sum(
        naive_soft_ce_row(r, [float(c == y) for c in range(len(r))])
        for r, y in zip(rows, labels, strict=True)
    ) / len(rows)


# ----------------------------------------------------------------------------------------------
# ITC
# ----------------------------------------------------------------------------------------------
def test_itc_in_batch_multi_positive_matches_naive():
    img, txt = unit(7, 5, seed=0), unit(7, 5, seed=1)
    temp = torch.tensor(0.07, dtype=torch.float64)
    got = itc_loss(img, txt, IDS, temp)
    assert close(got, naive_itc(img, txt, IDS, 0.07))
    # Sensitivity: with distinct ids (diagonal-only positives) the value differs.
    assert not close(got, naive_itc(img, txt, torch.arange(7), 0.07))


def test_itc_with_queue_matches_naive():
    img, txt = unit(7, 5, seed=2), unit(7, 5, seed=3)
    # Momentum batch first, then a queue that holds other captions of images 3 and 5.
    img_all = torch.cat([unit(7, 5, seed=4), unit(6, 5, seed=5)])
    txt_all = torch.cat([unit(7, 5, seed=6), unit(6, 5, seed=7)])
    ids_all = torch.cat([IDS, torch.tensor([3, 9, 5, 11, 3, 12])])
    got = itc_loss(
        img,
        txt,
        IDS,
        torch.tensor(0.1, dtype=torch.float64),
        image_feat_all=img_all,
        text_feat_all=txt_all,
        ids_all=ids_all,
    )
    want = naive_itc(img, txt, IDS, 0.1, img_all, txt_all, ids_all)
    assert close(got, want)


@pytest.mark.parametrize("separate_teacher", [False, True])
def test_itc_distillation_matches_naive(separate_teacher):
    img, txt = unit(7, 5, seed=8), unit(7, 5, seed=9)
    img_all = torch.cat([unit(7, 5, seed=10), unit(4, 5, seed=11)])
    txt_all = torch.cat([unit(7, 5, seed=12), unit(4, 5, seed=13)])
    ids_all = torch.cat([IDS, torch.tensor([7, 2, 3, 4])])
    kw = dict(image_feat_all=img_all, text_feat_all=txt_all, ids_all=ids_all, alpha=0.4)
    img_m = txt_m = None
    if separate_teacher:
        img_m, txt_m = unit(11, 5, seed=14), unit(11, 5, seed=15)
        kw.update(image_feat_m_all=img_m, text_feat_m_all=txt_m)
    got = itc_loss(img, txt, IDS, 0.07, **kw)
    assert close(
        got, naive_itc(img, txt, IDS, 0.07, img_all, txt_all, ids_all, img_m, txt_m, alpha=0.4)
    )
    assert not close(got, naive_itc(img, txt, IDS, 0.07, img_all, txt_all, ids_all))


def test_itc_in_batch_distillation_with_momentum_batch_only():
    img, txt, img_m, txt_m = (unit(7, 5, seed=s) for s in (16, 17, 18, 19))
    got = itc_loss(img, txt, IDS, 0.07, image_feat_m_all=img_m, text_feat_m_all=txt_m, alpha=0.3)
    assert close(got, naive_itc(img, txt, IDS, 0.07, img_m=img_m, txt_m=txt_m, alpha=0.3))


def test_itc_targets_carry_no_gradient_and_temp_gradient_is_finite():
    img = unit(7, 5, seed=20).requires_grad_()
    txt = unit(7, 5, seed=21).requires_grad_()
    temp = torch.tensor(0.07, dtype=torch.float64, requires_grad=True)
    loss = itc_loss(
        img,
        txt,
        IDS,
        temp,
        image_feat_m_all=img.detach() * 1.0,
        text_feat_m_all=txt.detach() * 1.0,
        alpha=0.4,
    )
    loss.backward()
    assert torch.isfinite(temp.grad) and temp.grad != 0
    assert torch.isfinite(img.grad).all() and img.grad.abs().sum() > 0


def test_itc_errors():
    img, txt = unit(4, 3, seed=22), unit(4, 3, seed=23)
    ids = torch.tensor([0, 1, 2, 3])
    with pytest.raises(ValueError, match="alpha > 0 needs momentum"):
        itc_loss(img, txt, ids, 0.07, alpha=0.4)
    with pytest.raises(ValueError, match="no positive"):
        itc_loss(
            img,
            txt,
            ids,
            0.07,
            image_feat_all=img,
            text_feat_all=txt,
            ids_all=torch.tensor([0, 1, 2, 9]),
        )
    with pytest.raises(ValueError, match="given together"):
        itc_loss(img, txt, ids, 0.07, image_feat_all=img)
    with pytest.raises(ValueError, match="text_feat"):
        itc_loss(img, txt[:3], ids, 0.07)


# ----------------------------------------------------------------------------------------------
# Triplet, intra-class, optimized triplet
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reduction", ["hardest", "sum"])
def test_triplet_matches_naive_with_masked_same_id_negatives(reduction):
    # Un-normalised inputs: the loss takes the cosine itself.
    img = 2.0 * unit(7, 4, seed=30)
    txt = unit(7, 4, seed=31)
    # Make caption 2 (image 3) nearly identical to image 0 (also image 3): a hard "negative"
    # that must be masked, so the masked and unmasked losses really differ.
    txt[2] = img[0] / 2 + 0.01
    got = triplet_loss(img, txt, IDS, margin=0.2, reduction=reduction)
    assert close(got, naive_triplet(img, txt, IDS, 0.2, reduction))
    assert not close(got, naive_triplet(img, txt, torch.arange(7), 0.2, reduction))


@pytest.mark.parametrize("reduction", ["hardest", "sum"])
def test_triplet_without_valid_negative_is_zero_without_nan(reduction):
    img = unit(4, 3, seed=32).requires_grad_()
    txt = unit(4, 3, seed=33).requires_grad_()
    same = torch.full((4,), 5)
    loss = triplet_loss(img, txt, same, reduction=reduction)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(img.grad, torch.zeros_like(img)) and torch.isfinite(txt.grad).all()
    # A single pair has no negative either.
    assert triplet_loss(img[:1], txt[:1], same[:1], reduction=reduction).item() == 0.0


@pytest.mark.parametrize("reduction", ["hardest", "sum"])
def test_triplet_gradient_zero_iff_margins_satisfied(reduction):
    eye = torch.eye(6, dtype=torch.float64)[:5]  # s(i, t+) = 1, s(i, t-) = 0 > margin apart
    img = eye.clone().requires_grad_()
    txt = eye.clone().requires_grad_()
    ids = torch.tensor([0, 1, 1, 2, 3])
    loss = triplet_loss(img, txt, ids, margin=0.2, reduction=reduction)
    loss.backward()
    assert loss.item() == 0.0 and img.grad.abs().max() == 0 and txt.grad.abs().max() == 0
    # Same embeddings, but a margin of 1.5 is violated: the gradient is no longer zero.
    img.grad = txt.grad = None
    triplet_loss(img, txt, ids, margin=1.5, reduction=reduction).backward()
    assert img.grad.abs().max() > 0 and txt.grad.abs().max() > 0


def test_intra_class_matches_naive():
    img, txt = 3.0 * unit(7, 4, seed=34), unit(7, 4, seed=35)
    assert close(intra_class_loss(img, txt), naive_intra(img, txt))
    assert close(intra_class_loss(img, img), 0.0)


@pytest.mark.parametrize("reduction", ["hardest", "sum"])
def test_optimized_triplet_is_triplet_plus_lambda_intra(reduction):
    img, txt = unit(7, 4, seed=36), unit(7, 4, seed=37)
    got = optimized_triplet_loss(img, txt, IDS, margin=0.3, reduction=reduction, lambda_intra=0.25)
    want = naive_triplet(img, txt, IDS, 0.3, reduction) + 0.25 * naive_intra(img, txt)
    assert close(got, want)
    plain = optimized_triplet_loss(img, txt, IDS, margin=0.3, reduction=reduction, lambda_intra=0.0)
    assert close(plain, naive_triplet(img, txt, IDS, 0.3, reduction))


def test_triplet_rejects_bad_arguments():
    img = unit(3, 2, seed=38)
    with pytest.raises(ValueError, match="reduction"):
        triplet_loss(img, img, torch.arange(3), reduction="mean")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="same shape"):
        triplet_loss(img, img[:2], torch.arange(3))


# ----------------------------------------------------------------------------------------------
# ITM
# ----------------------------------------------------------------------------------------------
def test_itm_hard_negatives_never_share_the_image_id():
    sim = unit(7, 7, seed=40) * 10
    # Make the same-id entries by far the most likely, so an unmasked sampler would pick them.
    same = IDS.view(-1, 1) == IDS.view(1, -1)
    sim = torch.where(same, sim + 50.0, sim)
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        neg_t, neg_i = itm_hard_negatives(sim, IDS, generator=gen)
        assert neg_t.dtype == torch.long and neg_t.shape == (7,)
        assert (IDS[neg_t] != IDS).all() and (IDS[neg_i] != IDS).all()


# Chi-square critical values at p = 0.001 by degrees of freedom.
CHI2_CRIT = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46}


def chi2(counts: list[int], probs: list[float]) -> float:
    n = sum(counts)
    return sum((c - n * p) ** 2 / (n * p) for c, p in zip(counts, probs, strict=True))


def test_itm_hard_negative_frequencies_follow_masked_softmax():
    sim = 2.0 * unit(7, 7, seed=41)  # asymmetric, so rows and columns differ
    draws = 3000
    gen = torch.Generator().manual_seed(1)
    neg_t, neg_i = zip(
        *(itm_hard_negatives(sim, IDS, generator=gen) for _ in range(draws)), strict=True
    )
    neg_t, neg_i = torch.stack(neg_t), torch.stack(neg_i)  # [draws, B]
    s = sim.tolist()
    for direction, samples in (("i2t", neg_t), ("t2i", neg_i)):
        for a in range(7):
            valid = [j for j in range(7) if IDS[j] != IDS[a]]
            logits = [s[a][j] if direction == "i2t" else s[j][a] for j in valid]
            z = sum(math.exp(x) for x in logits)
            probs = [math.exp(x) / z for x in logits]
            counts = [int((samples[:, a] == j).sum()) for j in valid]
            assert sum(counts) == draws
            crit = CHI2_CRIT[len(valid) - 1]
            assert chi2(counts, probs) < crit, (direction, a)
            # Sensitivity: the draws are distinguishable from uniform over the valid entries.
            if max(probs) > 1.5 / len(valid):
                assert chi2(counts, [1 / len(valid)] * len(valid)) > crit, (direction, a)


def test_itm_hard_negatives_deterministic_with_generator():
    sim = unit(7, 7, seed=42)

    def run(seed: int) -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        return [t for _ in range(5) for t in itm_hard_negatives(sim, IDS, generator=gen)]

    a, b, c = run(0), run(0), run(1)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))


def test_itm_hard_negatives_without_valid_negative_are_marked():
    sim = unit(4, 4, seed=43).requires_grad_()
    neg_t, neg_i = itm_hard_negatives(sim, torch.full((4,), 2))
    assert neg_t.tolist() == [-1] * 4 and neg_i.tolist() == [-1] * 4


def test_itm_loss_matches_naive_ce():
    g = torch.Generator().manual_seed(44)
    pos = torch.randn(4, 2, generator=g, dtype=torch.float64)
    neg = torch.randn(8, 2, generator=g, dtype=torch.float64)
    want = naive_ce(pos.tolist() + neg.tolist(), [1] * 4 + [0] * 8)
    assert close(itm_loss(pos, neg), want)
    valid = torch.tensor([True, False, True, True, True, True, False, True])
    kept = [r for r, v in zip(neg.tolist(), valid.tolist(), strict=True) if v]
    assert close(
        itm_loss(pos, neg, neg_valid=valid), naive_ce(pos.tolist() + kept, [1] * 4 + [0] * 6)
    )
    with pytest.raises(ValueError, match="logits_neg"):
        itm_loss(pos, neg[:, :1])


# ----------------------------------------------------------------------------------------------
# MLM
# ----------------------------------------------------------------------------------------------
def test_mlm_loss_matches_naive_and_ignores_minus_100():
    g = torch.Generator().manual_seed(45)
    logits = torch.randn(2, 5, 11, generator=g, dtype=torch.float64)
    labels = torch.full((2, 5), -100)
    labels[0, 1], labels[0, 4], labels[1, 0] = 3, 10, 0
    rows = [logits[b, pos].tolist() for b, pos in ((0, 1), (0, 4), (1, 0))]
    got = mlm_loss(logits, labels)
    assert close(got, naive_ce(rows, [3, 10, 0]))
    # Logits at ignored positions do not matter.
    changed = logits.clone()
    changed[labels == -100] += 100 * torch.randn(7, 11, generator=g, dtype=torch.float64)
    assert close(mlm_loss(changed, labels), float(got))


def test_mlm_loss_with_nothing_masked_is_zero_not_nan():
    logits = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    loss = mlm_loss(logits, torch.full((2, 3), -100))
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(logits.grad).all()


# ----------------------------------------------------------------------------------------------
# Total loss
# ----------------------------------------------------------------------------------------------
def terms_of(**values: float) -> dict[str, torch.Tensor]:
    return {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in values.items()}


def test_combine_losses_weights_and_logs():
    cfg = LossConfig(w_itc=1.0, w_tri=0.5, w_itm=2.0, w_mlm=0.25)
    terms = terms_of(itc=1.0, tri=2.0, itm=3.0, mlm=4.0)
    total, logs = combine_losses(terms, cfg)
    assert close(total, 1.0 + 1.0 + 6.0 + 1.0)
    assert logs == {"itc": 1.0, "tri": 2.0, "itm": 3.0, "mlm": 4.0, "total": 9.0}
    total.backward()
    assert [terms[k].grad.item() for k in ("itc", "tri", "itm", "mlm")] == [1.0, 0.5, 2.0, 0.25]


def test_combine_losses_weight_zero_drops_the_term():
    cfg = LossConfig(w_tri=0.0, w_mlm=0.0)
    assert active_terms(cfg) == {"itc", "itm"}
    # Missing terms of weight 0 are fine; a given one is not added (a NaN there stays out).
    total, logs = combine_losses(terms_of(itc=1.0, itm=2.0), cfg)
    assert close(total, 3.0) and set(logs) == {"itc", "itm", "total"}
    total, logs = combine_losses(terms_of(itc=1.0, itm=2.0, tri=float("nan")), cfg)
    assert close(total, 3.0) and math.isnan(logs["tri"])


def test_combine_losses_errors():
    cfg = LossConfig()
    assert active_terms(cfg) == set(LOSS_TERMS) == {"itc", "tri", "itm", "mlm"}
    with pytest.raises(ValueError, match=r"unknown loss term\(s\) \['ita'\]"):
        combine_losses(terms_of(itc=1.0, tri=1.0, itm=1.0, mlm=1.0, ita=1.0), cfg)
    with pytest.raises(ValueError, match=r"'mlm' \(loss.w_mlm = 1.0\) .*not computed"):
        combine_losses(terms_of(itc=1.0, tri=1.0, itm=1.0), cfg)
    with pytest.raises(ValueError, match="all loss weights"):
        combine_losses({}, LossConfig(w_itc=0.0, w_tri=0.0, w_itm=0.0, w_mlm=0.0))
    with pytest.raises(ValueError, match="w_tri must be a finite weight"):
        active_terms(LossConfig(w_tri=-1.0))
    with pytest.raises(ValueError, match="scalar"):
        combine_losses({"itc": torch.ones(2)}, LossConfig(w_tri=0.0, w_itm=0.0, w_mlm=0.0))


def test_nothing_touches_torch_distributed(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("torch.distributed was used")

    monkeypatch.setattr(torch.distributed, "is_initialized", boom)
    monkeypatch.setattr(torch.distributed, "get_world_size", boom)
    img, txt = unit(7, 4, seed=46), unit(7, 4, seed=47)
    itc_loss(img, txt, IDS, 0.07)
    optimized_triplet_loss(img, txt, IDS)
    itm_hard_negatives(img @ txt.t(), IDS)


# ----------------------------------------------------------------------------------------------
# ITM sampling probabilities
# ----------------------------------------------------------------------------------------------
def test_itm_negative_probs_match_naive_masked_softmax():
    sim = 3.0 * unit(7, 7, seed=50)  # asymmetric: rows and columns differ
    p_text, p_image = itm_negative_probs(sim, IDS)
    s = sim.tolist()
    for a in range(7):
        valid = [j for j in range(7) if IDS[j] != IDS[a]]
        for direction, probs in (("i2t", p_text), ("t2i", p_image)):
            logits = {j: s[a][j] if direction == "i2t" else s[j][a] for j in valid}
            z = sum(math.exp(x) for x in logits.values())
            want = [math.exp(logits[j]) / z if j in logits else 0.0 for j in range(7)]
            assert probs[a].tolist() == pytest.approx(want, abs=TOL), (direction, a)


def test_itm_negative_probs_are_what_the_sampler_draws_from():
    # The same generator state through multinomial on the probabilities repeats the draws.
    for seed in range(5):
        sim = unit(7, 7, seed=60 + seed) * 5
        neg_t, neg_i = itm_hard_negatives(sim, IDS, generator=torch.Generator().manual_seed(seed))
        p_text, p_image = itm_negative_probs(sim, IDS)
        gen = torch.Generator().manual_seed(seed)
        assert torch.equal(neg_t, torch.multinomial(p_text, 1, generator=gen).squeeze(1))
        assert torch.equal(neg_i, torch.multinomial(p_image, 1, generator=gen).squeeze(1))


def test_itm_negative_probs_without_valid_negative_are_zero():
    p_text, p_image = itm_negative_probs(unit(4, 4, seed=70), torch.full((4,), 2))
    assert not p_text.isnan().any() and p_text.abs().sum() == 0 and p_image.abs().sum() == 0
    half = torch.tensor([0, 0, 1, 1])  # every row has a negative: rows sum to 1
    p_text, p_image = itm_negative_probs(unit(4, 4, seed=71), half)
    assert torch.allclose(p_text.sum(1), torch.ones_like(p_text[:, 0]))
    assert (p_text[:2, :2] == 0).all() and (p_image[2:, 2:] == 0).all()
    with pytest.raises(ValueError, match=r"sim_i2t: expected shape \[4, 4\]"):
        itm_negative_probs(torch.zeros(3, 4), half)
