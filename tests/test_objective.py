"""The training objective on the real tiny model: which ITM pairs and MLM positions are scored,
what the ITC queue holds during a batch's own loss, the α ramp of momentum distillation, and the
train/eval mode of the momentum twins.

Instrumentation wraps real functions (records their inputs and outputs, then returns what the
real function returns); nothing is replaced.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
import torch

import cmpagl.objective as objective
from cmpagl.config import LossConfig, ModelConfig
from cmpagl.losses import itc_alpha_at, itm_hard_negatives, itm_pairs
from cmpagl.models.cmpagl import CMPAGL, build_model
from cmpagl.objective import compute_losses

CAPTIONS = [
    "three white planes are parked left of the runway near a large terminal building",
    "an airport with two planes",
    "a dense residential area with many houses",
    "a green meadow",
    "two ships are docked in the harbour",
    "a red car",
]
IDS = torch.tensor([0, 0, 1, 2, 3, 4])  # image 0 appears twice, with two captions
ONLY = {"itc": "w_itc", "tri": "w_tri", "itm": "w_itm", "mlm": "w_mlm"}


def tiny_model_config(**kw: Any) -> ModelConfig:
    cfg = ModelConfig(queue_size=16, **kw)
    cfg.gswin = dataclasses.replace(
        cfg.gswin, img_size=64, depths=(2, 2), num_heads=(2, 4), embed_dim=32
    )
    return cfg


@pytest.fixture()
def model() -> CMPAGL:
    torch.manual_seed(0)
    return build_model(tiny_model_config())  # ≈ 0.6 s: cheaper than a deepcopy of a fixture


def images(n: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def only(term: str, **kw: Any) -> LossConfig:
    """A LossConfig with one active term (the others are not computed at all)."""
    weights = {field: float(name == term) for name, field in ONLY.items()}
    return LossConfig(**{**weights, **kw})


class Recorder:
    """Wraps a callable: records ``(args, kwargs, result)`` of every call and returns the result."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn, self.calls = fn, []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        result = self.fn(*args, **kwargs)
        self.calls.append((args, kwargs, result))
        return result


def record_method(monkeypatch: pytest.MonkeyPatch, obj: Any, name: str) -> Recorder:
    rec = Recorder(getattr(obj, name))
    monkeypatch.setattr(obj, name, rec)
    return rec


def step(
    model: CMPAGL,
    cfg: LossConfig,
    imgs: torch.Tensor | None = None,
    captions: list[str] = CAPTIONS,
    **kw: Any,
) -> dict:
    """One call of the objective on a batch of 6 pairs (no backward); returns its logs."""
    _, logs = compute_losses(
        model,
        images() if imgs is None else imgs,
        captions,
        IDS,
        cfg,
        generator=torch.Generator().manual_seed(0),
        **kw,
    )
    return logs


# ----------------------------------------------------------------------------------------------
# ITM: positives, hard negatives and labels
# ----------------------------------------------------------------------------------------------
def test_itm_pairs_layout_positives_then_image_then_text_negatives():
    neg_text, neg_image = torch.tensor([2, 3, 0, 1]), torch.tensor([1, 0, 3, 2])
    text_idx, image_idx, labels = itm_pairs(neg_text, neg_image)
    assert text_idx.tolist() == [0, 1, 2, 3] + [2, 3, 0, 1] + [0, 1, 2, 3]
    assert image_idx.tolist() == [0, 1, 2, 3] + [0, 1, 2, 3] + [1, 0, 3, 2]
    assert labels.tolist() == [1] * 4 + [0] * 8
    # rows without a negative (-1 from the sampler) are skipped, never read as "the last row"
    text_idx, image_idx, labels = itm_pairs(torch.tensor([-1, 0, -1]), torch.tensor([1, -1, -1]))
    assert text_idx.tolist() == [0, 1, 2, 0, 0]
    assert image_idx.tolist() == [0, 1, 2, 1, 1]
    assert labels.tolist() == [1, 1, 1, 0, 0]
    with pytest.raises(ValueError, match="same shape"):
        itm_pairs(torch.tensor([0, 1]), torch.tensor([0]))


def test_itm_negatives_never_share_the_anchor_image_and_are_skipped_without_one():
    gen = torch.Generator().manual_seed(0)
    ids = torch.tensor([0, 0, 0, 1, 2, 2, 3, 4])
    for _ in range(50):
        sim = torch.randn(8, 8, generator=gen) * 5
        text_idx, image_idx, labels = itm_pairs(*itm_hard_negatives(sim, ids, generator=gen))
        pos, neg = labels == 1, labels == 0
        assert int(pos.sum()) == 8 and int(neg.sum()) == 16  # B positives, 2B negatives
        assert torch.equal(text_idx[pos], image_idx[pos])
        assert not (ids[text_idx[neg]] == ids[image_idx[neg]]).any()
        # each image once with its negative text, each text once with its negative image
        assert sorted(image_idx[8:16].tolist()) == list(range(8))
        assert sorted(text_idx[16:].tolist()) == list(range(8))
    # a batch of one image: no other image id, so no negative at all
    one = torch.zeros(4, dtype=torch.long)
    _, _, labels = itm_pairs(*itm_hard_negatives(torch.randn(4, 4), one, generator=gen))
    assert labels.tolist() == [1, 1, 1, 1]


def test_objective_fuses_exactly_the_itm_pairs_with_their_labels(model, monkeypatch):
    pairs = Recorder(itm_pairs)
    monkeypatch.setattr(objective, "itm_pairs", pairs)
    loss_rec = Recorder(objective.itm_loss)
    monkeypatch.setattr(objective, "itm_loss", loss_rec)
    enc_i = record_method(monkeypatch, model, "encode_image")
    enc_t = record_method(monkeypatch, model, "encode_text")
    fuse = record_method(monkeypatch, model, "fuse")
    head = record_method(monkeypatch, model, "itm_logits")
    step(model, only("itm"))

    text_idx, image_idx, labels = pairs.calls[0][2]
    b = len(CAPTIONS)
    assert labels.tolist() == [1] * b + [0] * (2 * b)
    assert not (IDS[text_idx[b:]] == IDS[image_idx[b:]]).any()
    txt, img = enc_t.calls[0][2], enc_i.calls[0][2]
    assert len(fuse.calls) == 1  # one pass of the multimodal encoder over all pairs
    (hidden, mask, image_tokens), _, fused = fuse.calls[0]
    assert torch.equal(hidden, txt.hidden[text_idx]) and torch.equal(mask, txt.mask[text_idx])
    assert torch.equal(image_tokens, img.fusion[image_idx])
    logits = head.calls[0][2]
    assert torch.equal(head.calls[0][0][0], fused) and logits.shape == (3 * b, 2)
    logits_pos, logits_neg = loss_rec.calls[0][0]  # itm_loss labels them 1 and 0
    assert torch.equal(logits_pos, logits[:b]) and torch.equal(logits_neg, logits[b:])


# ----------------------------------------------------------------------------------------------
# MLM: the scored positions
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prob", [1.0, 0.5])
def test_mlm_scores_only_selected_real_non_special_tokens(model, monkeypatch, prob):
    masking = Recorder(objective.mask_tokens)
    monkeypatch.setattr(objective, "mask_tokens", masking)
    loss_rec = Recorder(objective.mlm_loss)
    monkeypatch.setattr(objective, "mlm_loss", loss_rec)
    fuse = record_method(monkeypatch, model, "fuse")
    head = record_method(monkeypatch, model, "mlm_logits")
    step(model, only("mlm", mlm_prob=prob))

    (input_ids, attention_mask, *_), _, (masked, labels) = masking.calls[0]
    assert (attention_mask == 0).any(), "the captions must differ in length to test padding"
    tokenizer = model.tokenizer
    special = torch.isin(input_ids, torch.tensor(tokenizer.all_special_ids))
    assert special[:, 0].all() and (input_ids == tokenizer.sep_token_id).sum() == len(CAPTIONS)
    real_words = attention_mask.bool() & ~special
    picked = labels != -100
    assert not (picked & ~real_words).any()  # never padding, [CLS] or [SEP]
    if prob == 1.0:
        assert torch.equal(picked, real_words)  # every word is a candidate
    else:
        assert 0 < int(picked.sum()) < int(real_words.sum())
    assert (masked[picked] != input_ids[picked]).any()  # the model sees them masked
    # The head sees the fused states at exactly these positions, the loss their original ids.
    assert len(fuse.calls) == 1
    fused = fuse.calls[0][2]
    assert torch.equal(head.calls[0][0][0], fused[picked])
    logits, target = loss_rec.calls[0][0]
    assert logits.shape == (1, int(picked.sum()), len(tokenizer))
    assert torch.equal(target, input_ids[picked].unsqueeze(0))


# ----------------------------------------------------------------------------------------------
# ITC: the queue during a batch's own loss
# ----------------------------------------------------------------------------------------------
def test_queue_holds_nothing_of_the_current_batch_during_its_loss(model, monkeypatch):
    itc = Recorder(objective.itc_loss)
    monkeypatch.setattr(objective, "itc_loss", itc)
    mom = record_method(monkeypatch, model, "momentum_embeddings")
    b = len(CAPTIONS)

    step(model, only("itc"), images(seed=1))  # empty queue: the keys are the momentum batch
    img_m1, txt_m1 = mom.calls[0][2]
    kw = itc.calls[0][1]
    assert torch.equal(kw["image_feat_all"], img_m1) and torch.equal(kw["text_feat_all"], txt_m1)
    assert torch.equal(kw["ids_all"], IDS)
    q_img, q_txt, q_ids = model.queue.contents()  # enqueued after the loss
    assert torch.equal(q_img, img_m1) and torch.equal(q_txt, txt_m1)

    # A new batch (new images and captions): the keys are its momentum rows, then the queue.
    step(model, only("itc"), images(seed=2), [c.upper() + " seen from above" for c in CAPTIONS])
    img_m2, txt_m2 = mom.calls[1][2]
    kw = itc.calls[1][1]
    assert kw["image_feat_all"].shape[0] == 2 * b
    assert torch.equal(kw["image_feat_all"][:b], img_m2)
    assert torch.equal(kw["image_feat_all"][b:], q_img)
    assert torch.equal(kw["text_feat_all"][b:], q_txt)
    assert torch.equal(kw["ids_all"], torch.cat([IDS, q_ids]))
    # none of the batch's own momentum embeddings is among the queued keys
    assert torch.cdist(img_m2, kw["image_feat_all"][b:]).min() > 1e-4
    assert torch.cdist(txt_m2, kw["text_feat_all"][b:]).min() > 1e-4
    q_img2, q_txt2, _ = model.queue.contents()  # now enqueued, behind the first batch
    assert torch.equal(q_img2, torch.cat([img_m1, img_m2]))
    assert torch.equal(q_txt2, torch.cat([txt_m1, txt_m2]))


# ----------------------------------------------------------------------------------------------
# α: the ramp of momentum distillation
# ----------------------------------------------------------------------------------------------
def test_itc_alpha_ramp_values():
    spe = 10  # steps per epoch
    assert itc_alpha_at(0.4, 1.0, 0, spe) == 0.0  # ALBEF: i = 0 in epoch 0 gives α = 0
    assert itc_alpha_at(0.4, 1.0, 5, spe) == pytest.approx(0.2)
    assert itc_alpha_at(0.4, 1.0, 10, spe) == pytest.approx(0.4)
    assert itc_alpha_at(0.4, 1.0, 1000, spe) == pytest.approx(0.4)
    # a fractional length in epochs, ramping across the epoch boundary
    assert itc_alpha_at(0.4, 1.5, 12, spe) == pytest.approx(0.4 * 12 / 15)
    assert itc_alpha_at(0.4, 0.0, 0, spe) == 0.4  # no ramp: today's behaviour
    assert itc_alpha_at(0.4, 0.0, 0, 0) == 0.4  # ... which needs no steps per epoch
    with pytest.raises(ValueError, match="itc_alpha_warmup must be >= 0"):
        itc_alpha_at(0.4, -1.0, 0, spe)
    with pytest.raises(ValueError, match="needs the steps per epoch"):
        itc_alpha_at(0.4, 1.0, 3, 0)


def test_itc_alpha_after_resume_is_that_of_the_uninterrupted_run():
    """α is a pure function of the global step: a run resumed at step k continues the ramp."""
    spe, warmup = 7, 2.0
    uninterrupted = [itc_alpha_at(0.4, warmup, s, spe) for s in range(30)]
    assert uninterrupted[0] == 0 and uninterrupted[14:] == [pytest.approx(0.4)] * 16
    assert all(a < b for a, b in zip(uninterrupted[:14], uninterrupted[1:15], strict=True))
    for k in (3, 7, 13, 20):  # resumed: the step counter comes back from the checkpoint
        resumed = [itc_alpha_at(0.4, warmup, s, spe) for s in range(k, 30)]
        assert resumed == uninterrupted[k:]


def test_objective_uses_and_logs_the_ramped_alpha(model, monkeypatch):
    itc = Recorder(objective.itc_loss)
    monkeypatch.setattr(objective, "itc_loss", itc)
    cfg = only("itc", itc_alpha=0.4, itc_alpha_warmup=0.5)
    for s, want in [(0, 0.0), (2, 0.4 * 2 / 4), (4, 0.4), (9, 0.4)]:
        logs = step(model, cfg, step=s, steps_per_epoch=8)
        assert logs["itc_alpha"] == pytest.approx(want)
        assert itc.calls[-1][1]["alpha"] == logs["itc_alpha"]  # the α that reached the loss
    assert step(model, only("itc"))["itc_alpha"] == 0.4  # default: no ramp
    with pytest.raises(ValueError, match="needs the steps per epoch"):
        step(model, cfg, step=1)


# ----------------------------------------------------------------------------------------------
# The momentum twins' mode
# ----------------------------------------------------------------------------------------------
def twin_modules(model: CMPAGL) -> list[torch.nn.Module]:
    return [m for twin in model._momentum_pairs()[1] for m in twin.modules()]


def momentum_twice(model: CMPAGL) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    tok = model.tokenize(CAPTIONS)
    x = images()
    runs = [model.momentum_embeddings(x, tok["input_ids"], tok["attention_mask"]) for _ in "ab"]
    return runs[0], runs[1]


def test_twins_run_in_eval_mode_by_default(model):
    assert model.cfg.momentum_train_mode is False
    model.train()
    assert model.visual.training and model.text_encoder.training
    assert not any(m.training for m in twin_modules(model))
    (v1, t1), (v2, t2) = momentum_twice(model)
    assert torch.equal(v1, v2) and torch.equal(t1, t2)  # a deterministic teacher


def test_twins_follow_train_mode_with_the_switch():
    torch.manual_seed(0)
    model = build_model(tiny_model_config(momentum_train_mode=True))
    model.train()
    assert all(m.training for m in twin_modules(model))
    (v1, t1), (v2, t2) = momentum_twice(model)
    # dropout (text) and drop path (image) really act on the momentum embeddings
    assert (v1 - v2).abs().max() > 1e-4 and (t1 - t2).abs().max() > 1e-4
    model.eval()
    assert not any(m.training for m in twin_modules(model))
    (v1, t1), (v2, t2) = momentum_twice(model)
    assert torch.equal(v1, v2) and torch.equal(t1, t2)


# ----------------------------------------------------------------------------------------------
# One batched pass equals separate passes (the CPU speed-up changes no number)
# ----------------------------------------------------------------------------------------------
def test_batched_text_and_fusion_passes_equal_separate_passes(model):
    """The clean and masked captions share one text-encoder pass, ITM and MLM one fusion pass;
    without dropout each row's output is what its own pass gives (rows never attend across)."""
    model.eval()  # dropout off: the batched and separate passes are then deterministic
    tok = model.tokenize(CAPTIONS)
    ids, mask = tok["input_ids"], tok["attention_mask"]
    masked, labels = objective.mask_tokens(
        ids, mask, model.tokenizer, prob=0.5, generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        img = model.encode_image(images())
        both = model.text_encoder(torch.cat([ids, masked]), mask.repeat(2, 1))
        txt = model.encode_text(ids, mask)
        torch.testing.assert_close(both[: len(CAPTIONS)], txt.hidden, atol=1e-5, rtol=1e-5)
        hidden_masked = model.text_encoder(masked, mask)
        torch.testing.assert_close(both[len(CAPTIONS) :], hidden_masked, atol=1e-5, rtol=1e-5)
        itm = objective._itm_pairs(img, txt, IDS, model.temperature(), torch.Generator())
        mlm = (hidden_masked, labels)
        joint = objective._fusion_terms(model, img, txt, itm, mlm)
        alone = {
            **objective._fusion_terms(model, img, txt, itm, None),
            **objective._fusion_terms(model, img, txt, None, mlm),
        }
    assert set(joint) == {"itm", "mlm"}
    for name in joint:
        torch.testing.assert_close(joint[name], alone[name], atol=1e-5, rtol=1e-5)
