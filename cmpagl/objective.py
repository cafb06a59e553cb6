"""The training objective: one batch through CMPAGL to the weighted loss (METHOD.md §2).

This is the only place where model features meet the loss functions of :mod:`cmpagl.losses`.
A term whose weight is 0 is not computed at all: with ``w_itm = w_mlm = 0`` the multimodal
encoder never runs, with ``w_itc = 0`` the momentum encoders and queue are left alone.
The distillation weight α of ITC follows the global optimizer step when ``loss.itc_alpha_warmup``
sets a ramp (:func:`cmpagl.losses.itc_alpha_at`), so the caller passes the step it is at.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from cmpagl.config import LossConfig
from cmpagl.losses import (
    active_terms,
    combine_losses,
    itc_alpha_at,
    itc_loss,
    itm_hard_negatives,
    itm_loss,
    itm_pairs,
    mlm_loss,
    optimized_triplet_loss,
)
from cmpagl.models.cmpagl import CMPAGL, ImageFeatures, TextFeatures
from cmpagl.models.text import mask_tokens


def _itc_term(
    model: CMPAGL,
    img: ImageFeatures,
    txt: TextFeatures,
    images: Tensor,
    tok: dict,
    ids: Tensor,
    temp: Tensor,
    alpha: float,
) -> Tensor:
    """ITC against the momentum batch + queue (with distillation weight ``alpha``), or in-batch
    without momentum encoders (then ``alpha`` must be 0)."""
    if not model.use_momentum:
        return itc_loss(img.embed, txt.embed, ids, temp)
    with torch.no_grad():
        model.momentum_update()
        img_m, txt_m = model.momentum_embeddings(images, tok["input_ids"], tok["attention_mask"])
        q_img, q_txt, q_ids = model.queue.contents()
        image_all, text_all = torch.cat([img_m, q_img]), torch.cat([txt_m, q_txt])
        ids_all = torch.cat([ids, q_ids])
    loss = itc_loss(
        img.embed,
        txt.embed,
        ids,
        temp,
        image_feat_all=image_all,
        text_feat_all=text_all,
        ids_all=ids_all,
        alpha=alpha,
    )
    model.queue.enqueue(img_m, txt_m, ids)  # after the loss: a batch is never its own queue
    return loss


def _itm_pairs(
    img: ImageFeatures, txt: TextFeatures, ids: Tensor, temp: Tensor, generator
) -> tuple[Tensor, Tensor, Tensor]:
    """ITM's B positive pairs and up to 2B hard negatives drawn by ITC similarity (§2, ITM):
    text index, image index and label of each pair, ``[B + M]`` each (see ``itm_pairs``)."""
    with torch.no_grad():
        sim = img.embed @ txt.embed.t() / temp
        neg_text, neg_image = itm_hard_negatives(sim, ids, generator=generator)
        return itm_pairs(neg_text, neg_image)


def _fusion_terms(
    model: CMPAGL,
    img: ImageFeatures,
    txt: TextFeatures,
    itm: tuple[Tensor, Tensor, Tensor] | None,
    mlm: tuple[Tensor, Tensor] | None,
) -> dict[str, Tensor]:
    """ITM and MLM from ONE pass of the multimodal encoder (§2, ITM and MLM).

    ``itm``: (text index, image index, label) of the ITM pairs; ``mlm``: (the text encoder's
    states of the masked captions [B, L, D], labels [B, L]). Rows of both are stacked into one
    batch: every row attends only to its own text and image, so the outputs are those of
    separate passes, and one pass of B + M + B rows keeps the CPU's matrix products larger.
    """
    hidden, masks, images = [], [], []
    if itm is not None:
        text_idx, image_idx, _ = itm
        hidden.append(txt.hidden[text_idx])
        masks.append(txt.mask[text_idx])
        images.append(img.fusion[image_idx])
    if mlm is not None:
        hidden.append(mlm[0])
        masks.append(txt.mask)
        images.append(img.fusion)
    fused = model.fuse(torch.cat(hidden), torch.cat(masks), torch.cat(images))
    terms: dict[str, Tensor] = {}
    n_itm = 0
    if itm is not None:
        labels = itm[2]
        n_itm = labels.shape[0]
        logits = model.itm_logits(fused[:n_itm])  # [B + M, 2]
        terms["itm"] = itm_loss(logits[labels == 1], logits[labels == 0])
    if mlm is not None:
        labels = mlm[1]
        picked = labels != -100  # the vocabulary projection only where there is a target
        logits = model.mlm_logits(fused[n_itm:][picked])  # [P, V]
        terms["mlm"] = mlm_loss(logits.unsqueeze(0), labels[picked].unsqueeze(0))
    return terms


def compute_losses(
    model: CMPAGL,
    images: Tensor,
    captions: Sequence[str],
    image_ids: Tensor,
    cfg: LossConfig,
    generator: torch.Generator | None = None,
    *,
    step: int = 0,
    steps_per_epoch: int = 0,
) -> tuple[Tensor, dict[str, float]]:
    """One training batch -> ``(total loss, logs)``.

    Args:
        images: [B, 3, H, W] normalised images.
        captions: B caption strings, caption b describing image b.
        image_ids: [B] image ids (pairs of the same image are positives of each other).
        cfg: loss weights and parameters; terms with weight 0 are skipped entirely.
        generator: torch RNG for the ITM negatives and MLM masking (reproducible runs).
        step: optimizer steps done before this batch (0-based global step); with
            ``steps_per_epoch`` it sets α on the ``loss.itc_alpha_warmup`` ramp.
        steps_per_epoch: optimizer steps per epoch of this process; needed only when
            ``loss.itc_alpha_warmup > 0``.

    Returns:
        The weighted total (with gradient) and floats of each term, ``total``, ``temp`` and,
        when ITC is active, ``itc_alpha`` (the α used for this batch).
    """
    active = active_terms(cfg)
    ids = image_ids.to(images.device)
    alpha = 0.0
    if "itc" in active:
        if cfg.itc_alpha > 0 and not model.use_momentum:
            raise ValueError("loss.itc_alpha > 0 needs the momentum encoders (use_momentum=True)")
        alpha = itc_alpha_at(cfg.itc_alpha, cfg.itc_alpha_warmup, step, steps_per_epoch)
    tok = model.tokenize(captions, images.device)
    img = model.encode_image(images)
    mask = tok["attention_mask"]
    if "mlm" in active:
        # The clean and the masked captions go through the text encoder as one batch of 2B.
        masked, mlm_labels = mask_tokens(
            tok["input_ids"], mask, model.tokenizer, prob=cfg.mlm_prob, generator=generator
        )
        hidden = model.text_encoder(torch.cat([tok["input_ids"], masked]), mask.repeat(2, 1))
        n = mask.shape[0]
        txt = model.text_features(hidden[:n], mask)
        mlm = (hidden[n:], mlm_labels)
    else:
        txt, mlm = model.encode_text(tok["input_ids"], mask), None
    temp = model.temperature()
    terms: dict[str, Tensor] = {}
    if "itc" in active:
        terms["itc"] = _itc_term(model, img, txt, images, tok, ids, temp, alpha)
    if "tri" in active:
        terms["tri"] = optimized_triplet_loss(
            img.embed,
            txt.embed,
            ids,
            margin=cfg.triplet_margin,
            reduction=cfg.triplet_reduction,
            lambda_intra=cfg.lambda_intra,
        )
    if "itm" in active or "mlm" in active:
        itm = _itm_pairs(img, txt, ids, temp, generator) if "itm" in active else None
        terms.update(_fusion_terms(model, img, txt, itm, mlm))
    total, logs = combine_losses(terms, cfg)
    logs["temp"] = float(temp.detach())
    if "itc" in active:
        logs["itc_alpha"] = alpha
    return total, logs
