"""The training losses of CMPAGL (METHOD.md §2): ITC, optimized triplet, ITM and MLM.

The model returns features; every loss here is a pure function of tensors (house style, after
open_clip's ``loss.py``), and :func:`combine_losses` weights them with :class:`LossConfig`:

    L = w_itc·L_itc + w_tri·L_otri + w_itm·L_itm + w_mlm·L_mlm

* ``"itc"``: :func:`itc_loss`, ALBEF ITC with several positives per image and optional
  momentum distillation, whose weight α may ramp up linearly (:func:`itc_alpha_at`);
* ``"tri"``: :func:`optimized_triplet_loss`, L_otri = L_tri (:func:`triplet_loss`)
  + λ_intra·L_intra (:func:`intra_class_loss`);
* ``"itm"``: :func:`itm_loss`, CE over B positives and 2B hard negatives drawn by
  :func:`itm_hard_negatives` and laid out as pairs by :func:`itm_pairs`;
* ``"mlm"``: :func:`mlm_loss`, CE over the masked tokens.

An image has several captions, so "positive" always means "same image id", never "same row".
Nothing here touches ``torch.distributed``: gathering features across processes, if ever
needed, is the caller's job, and these functions work on whatever rows they are given.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from cmpagl.config import LossConfig

__all__ = [
    "LOSS_TERMS",
    "active_terms",
    "combine_losses",
    "intra_class_loss",
    "itc_alpha_at",
    "itc_loss",
    "itm_hard_negatives",
    "itm_loss",
    "itm_negative_probs",
    "itm_pairs",
    "mlm_loss",
    "optimized_triplet_loss",
    "triplet_loss",
]

# Term name -> the LossConfig field holding its weight. The names are the keys of the dict the
# model hands to `combine_losses` and of the logged values.
LOSS_TERMS: dict[str, str] = {"itc": "w_itc", "tri": "w_tri", "itm": "w_itm", "mlm": "w_mlm"}

TripletReduction = Literal["hardest", "sum"]


# ----------------------------------------------------------------------------------------------
# ITC: image-text contrastive loss
# ----------------------------------------------------------------------------------------------
def _check_rows(name: str, feat: Tensor, rows: int | None, dim: int) -> None:
    if feat.ndim != 2 or feat.shape[1] != dim or (rows is not None and feat.shape[0] != rows):
        want = f"[{rows if rows is not None else 'N'}, {dim}]"
        raise ValueError(f"{name}: expected shape {want}, got {list(feat.shape)}")


def _soft_ce(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean over rows of the cross-entropy with soft targets, ``-Σ_j q_j log p_j``."""
    return -(targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def itc_loss(
    image_feat: Tensor,
    text_feat: Tensor,
    image_ids: Tensor,
    temp: Tensor | float,
    *,
    image_feat_all: Tensor | None = None,
    text_feat_all: Tensor | None = None,
    ids_all: Tensor | None = None,
    image_feat_m_all: Tensor | None = None,
    text_feat_m_all: Tensor | None = None,
    alpha: float = 0.0,
) -> Tensor:
    """Image-text contrastive loss L_itc, ALBEF style with several positives (METHOD §2, ITC).

    Logits ``s(i, t) = v·t / τ``: each image embedding ``v`` of the batch against the text keys,
    each text embedding ``t`` against the image keys. The keys are ``*_feat_all`` (the momentum
    features of the current batch followed by the queue, ``N = B + Q`` rows) or, when those are
    not given, the batch's own features (in-batch ITC, ``N = B``). Every key whose image id
    equals the query's image id is a positive, and the ground-truth distribution spreads evenly
    over them; with momentum distillation (``alpha > 0``) the target becomes
    ``α·softmax(s_m) + (1 − α)·positives``, where ``s_m`` are the momentum logits.

        L_itc = ½ (CE_i2t + CE_t2i)   (soft-target cross-entropy, mean over the B queries)

    Args:
        image_feat: [B, D] image embeddings v, L2-normalised (not re-normalised here).
        text_feat: [B, D] text embeddings t of the matching captions (row b pairs with row b),
            L2-normalised.
        image_ids: [B] integer image id of each pair; pairs of one image share it.
        temp: τ, a scalar tensor (learnable; clamping is the model's job) or a float.
        image_feat_all: [N, D] image keys (momentum batch first, then the queue), normalised.
        text_feat_all: [N, D] text keys, same order; given together with ``image_feat_all``.
        ids_all: [N] image ids of the keys; required with ``*_feat_all``.
        image_feat_m_all: [N, D] momentum image features for the distillation teacher, current
            momentum batch in the first B rows; defaults to ``image_feat_all``, which in ALBEF
            already holds the momentum features.
        text_feat_m_all: [N, D] momentum text features, as ``image_feat_m_all``.
        alpha: distillation weight α in [0, 1] (``LossConfig.itc_alpha``); 0 disables it.

    The teacher logits are ``s_m(i, ·) = v_m,i · keys_m / τ`` with the query ``v_m,i`` row i
    of ``image_feat_m_all`` and τ detached; no gradient flows through the targets.

    Returns:
        Scalar tensor L_itc.

    Raises:
        ValueError: shapes that do not match, keys without ids, ``alpha > 0`` without momentum
            features, or a query without any positive among the keys (``ids_all`` must
            contain the batch's ids, which it does when the momentum batch comes first).
    """
    if image_feat.ndim != 2:
        raise ValueError(f"image_feat: expected shape [B, D], got {list(image_feat.shape)}")
    batch, dim = image_feat.shape
    _check_rows("text_feat", text_feat, batch, dim)
    if image_ids.shape != (batch,):
        raise ValueError(f"image_ids: expected shape [{batch}], got {list(image_ids.shape)}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")

    given = [image_feat_all is not None, text_feat_all is not None, ids_all is not None]
    if any(given) and not all(given):
        raise ValueError("image_feat_all, text_feat_all and ids_all must be given together")
    if image_feat_all is None or text_feat_all is None or ids_all is None:
        image_keys, text_keys, key_ids = image_feat, text_feat, image_ids
    else:
        image_keys, text_keys, key_ids = image_feat_all, text_feat_all, ids_all
        _check_rows("image_feat_all", image_keys, None, dim)
        _check_rows("text_feat_all", text_keys, image_keys.shape[0], dim)
        if key_ids.shape != (image_keys.shape[0],):
            raise ValueError(
                f"ids_all: expected shape [{image_keys.shape[0]}], got {list(key_ids.shape)}"
            )
    n_keys = image_keys.shape[0]

    sim_i2t = image_feat @ text_keys.t() / temp  # [B, N]
    sim_t2i = text_feat @ image_keys.t() / temp  # [B, N]

    with torch.no_grad():
        # One mask serves both directions: query b (image or caption) belongs to image_ids[b].
        pos = (image_ids.view(-1, 1) == key_ids.view(1, -1)).to(sim_i2t.dtype)  # [B, N]
        n_pos = pos.sum(dim=1, keepdim=True)
        if bool((n_pos == 0).any()):
            raise ValueError(
                "itc_loss: a query has no positive among the keys; ids_all must hold the ids of "
                "the current batch (momentum batch first, then the queue)"
            )
        targets_i2t = targets_t2i = pos / n_pos
        if alpha > 0:
            img_m = image_feat_m_all if image_feat_m_all is not None else image_feat_all
            txt_m = text_feat_m_all if text_feat_m_all is not None else text_feat_all
            if img_m is None or txt_m is None:
                raise ValueError(
                    "itc_loss: alpha > 0 needs momentum features (image_feat_all/text_feat_all "
                    "or image_feat_m_all/text_feat_m_all)"
                )
            _check_rows("image_feat_m_all", img_m, n_keys, dim)
            _check_rows("text_feat_m_all", txt_m, n_keys, dim)
            temp_m = temp.detach() if isinstance(temp, Tensor) else temp
            # The teacher's queries are the momentum features of the current batch: row b of
            # the momentum features belongs to pair b because the momentum batch comes first.
            sim_i2t_m = img_m[:batch] @ txt_m.t() / temp_m
            sim_t2i_m = txt_m[:batch] @ img_m.t() / temp_m
            targets_i2t = alpha * F.softmax(sim_i2t_m, dim=1) + (1 - alpha) * targets_i2t
            targets_t2i = alpha * F.softmax(sim_t2i_m, dim=1) + (1 - alpha) * targets_t2i

    return 0.5 * (_soft_ce(sim_i2t, targets_i2t) + _soft_ce(sim_t2i, targets_t2i))


def itc_alpha_at(alpha: float, warmup_epochs: float, step: int, steps_per_epoch: int) -> float:
    """The distillation weight α in use at optimizer step ``step`` (``LossConfig.itc_alpha``).

    ALBEF ramps α linearly from 0 over its first epoch (``alpha · min(1, i / len(loader))`` in
    epoch 0, with i the 0-based batch index); ``warmup_epochs`` generalises that length:

        α(step) = alpha · min(1, step / (warmup_epochs · steps_per_epoch))

    ``warmup_epochs = 1`` is ALBEF's ramp and 0 means no ramp (α = ``alpha`` from the first
    step). The value depends on the global step only, so a resumed run uses the same α as an
    uninterrupted one.

    Args:
        alpha: the full weight α (``loss.itc_alpha``), reached at the end of the ramp.
        warmup_epochs: ramp length in epochs, a float (``loss.itc_alpha_warmup``); 0 = no ramp.
        step: optimizer steps completed before the current batch (0 for the first batch).
        steps_per_epoch: optimizer steps in one epoch of this process (its loader's length).

    Returns:
        α for the current batch, in [0, alpha].

    Raises:
        ValueError: a negative ``warmup_epochs`` or ``step``, or a ramp without a positive
            ``steps_per_epoch``.
    """
    if warmup_epochs < 0:
        raise ValueError(f"loss.itc_alpha_warmup must be >= 0 (epochs), got {warmup_epochs}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if warmup_epochs == 0:
        return float(alpha)
    if steps_per_epoch <= 0:
        raise ValueError(
            f"loss.itc_alpha_warmup = {warmup_epochs} needs the steps per epoch, got "
            f"{steps_per_epoch}"
        )
    return float(alpha) * min(1.0, step / (warmup_epochs * steps_per_epoch))


# ----------------------------------------------------------------------------------------------
# Optimized triplet loss: triplet + intra-class distance
# ----------------------------------------------------------------------------------------------
def _cosine_pairs(image_feat: Tensor, text_feat: Tensor) -> tuple[Tensor, Tensor]:
    """Cosine similarity matrix s [B, B] (s[i, t]) and its diagonal s(i_b, t_b) [B]."""
    if image_feat.ndim != 2 or image_feat.shape != text_feat.shape:
        raise ValueError(
            "image_feat and text_feat: expected the same shape [B, D], got "
            f"{list(image_feat.shape)} and {list(text_feat.shape)}"
        )
    # Normalising again is idempotent on the (already normalised) ITC embeddings and keeps
    # "cosine" true for any input, e.g. un-normalised features in an ablation.
    v = F.normalize(image_feat, dim=-1)
    t = F.normalize(text_feat, dim=-1)
    return v @ t.t(), (v * t).sum(dim=-1)


def triplet_loss(
    image_feat: Tensor,
    text_feat: Tensor,
    image_ids: Tensor,
    margin: float = 0.2,
    reduction: TripletReduction = "hardest",
) -> Tensor:
    """Bidirectional triplet ranking loss L_tri on in-batch negatives (METHOD §2).

    Row b of the batch is the pair (i_b, t_b): the positive of image anchor i_b is t_b and the
    positive of text anchor t_b is i_b. Negatives are the batch entries of a *different* image
    id; an entry of the same image (another caption of it) is neither positive nor negative.
    With cosine similarity s and margin m:

    * ``"hardest"`` (VSE++ max-violation):
      L_tri = mean_i [m − s(i,t⁺) + max_{t⁻} s(i,t⁻)]₊ + mean_t [m − s(i⁺,t) + max_{i⁻} s(i⁻,t)]₊
    * ``"sum"``: the hinge summed over all negatives, then averaged over the anchors.

    An anchor without any negative (every pair of the batch shows the same image) contributes
    0 to its mean, which still divides by B; no NaN or inf arises, in value or gradient.

    Args:
        image_feat: [B, D] image embeddings (the ITC embeddings; cosine is taken here).
        text_feat: [B, D] text embeddings, row b matching row b.
        image_ids: [B] image id of each pair.
        margin: m (``LossConfig.triplet_margin``).
        reduction: ``"hardest"`` or ``"sum"`` (``LossConfig.triplet_reduction``).

    Returns:
        Scalar tensor L_tri.
    """
    if reduction not in ("hardest", "sum"):
        raise ValueError(f"reduction must be 'hardest' or 'sum', got {reduction!r}")
    sim, pos = _cosine_pairs(image_feat, text_feat)  # [B, B] s[i, t], [B]
    if image_ids.shape != pos.shape:
        raise ValueError(
            f"image_ids: expected shape {list(pos.shape)}, got {list(image_ids.shape)}"
        )
    neg = image_ids.view(-1, 1) != image_ids.view(1, -1)  # [B, B], symmetric, diagonal False

    if reduction == "sum":
        # Masked entries are zeroed by `where` (not multiplied), so nothing leaks into them.
        cost_i2t = torch.where(neg, (margin - pos.view(-1, 1) + sim).clamp(min=0), 0.0)
        cost_t2i = torch.where(neg, (margin - pos.view(1, -1) + sim).clamp(min=0), 0.0)
        return cost_i2t.sum(dim=1).mean() + cost_t2i.sum(dim=0).mean()

    # Hardest negative: masked entries are filled with the lowest finite value (not -inf, so
    # no inf - inf can arise) and can never be the max. An anchor without negatives then gets
    # that dummy max, and `where` zeroes its cost with an exactly-0 gradient.
    has_neg = neg.any(dim=1)  # symmetric mask: the same for image and text anchors
    masked = sim.masked_fill(~neg, torch.finfo(sim.dtype).min)
    hard_t = masked.amax(dim=1)  # [B] hardest negative text of each image
    hard_i = masked.amax(dim=0)  # [B] hardest negative image of each text
    cost_i2t = torch.where(has_neg, (margin - pos + hard_t).clamp(min=0), 0.0)
    cost_t2i = torch.where(has_neg, (margin - pos + hard_i).clamp(min=0), 0.0)
    return cost_i2t.mean() + cost_t2i.mean()


def intra_class_loss(image_feat: Tensor, text_feat: Tensor) -> Tensor:
    """Intra-class distance L_intra = mean_b (1 − s(i_b, t_b)), cosine s (METHOD §2).

    It keeps pulling matched pairs together after the triplet margin is met (paper Fig. 5).

    Args:
        image_feat: [B, D] image embeddings.
        text_feat: [B, D] text embeddings, row b matching row b.

    Returns:
        Scalar tensor L_intra in [0, 2].
    """
    _, pos = _cosine_pairs(image_feat, text_feat)
    return (1.0 - pos).mean()


def optimized_triplet_loss(
    image_feat: Tensor,
    text_feat: Tensor,
    image_ids: Tensor,
    margin: float = 0.2,
    reduction: TripletReduction = "hardest",
    lambda_intra: float = 0.1,
) -> Tensor:
    """The paper's optimized triplet loss L_otri = L_tri + λ_intra·L_intra (METHOD §2, Fig. 5).

    Args:
        image_feat: [B, D] image embeddings.
        text_feat: [B, D] text embeddings, row b matching row b.
        image_ids: [B] image id of each pair.
        margin: m of :func:`triplet_loss` (``LossConfig.triplet_margin``).
        reduction: ``"hardest"`` or ``"sum"`` (``LossConfig.triplet_reduction``).
        lambda_intra: λ_intra (``LossConfig.lambda_intra``); 0 leaves the plain triplet loss.

    Returns:
        Scalar tensor L_otri.
    """
    loss = triplet_loss(image_feat, text_feat, image_ids, margin=margin, reduction=reduction)
    if lambda_intra == 0:
        return loss
    return loss + lambda_intra * intra_class_loss(image_feat, text_feat)


# ----------------------------------------------------------------------------------------------
# ITM: image-text matching with in-batch hard negatives
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def itm_hard_negatives(
    sim_i2t: Tensor, image_ids: Tensor, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Sample one hard negative text per image and one hard negative image per text (ALBEF).

    For image i the negative text is drawn with probability ``softmax_j(s(i, t_j))`` restricted
    to the captions j of a *different* image id (i.e. ``exp s`` renormalised over them); for
    text t the negative image likewise from column t. Pass the ITC logits s = v·t/τ, as ALBEF
    does; the temperature sets how hard the negatives are.

    A row whose batch holds no other image (all ids equal) has no valid negative: its index is
    ``-1``. The caller keeps only ``idx >= 0`` before fusing (or gathers with any index and
    passes ``neg_valid = idx >= 0`` to :func:`itm_loss`), so the loss skips those rows. Note
    that PyTorch reads ``-1`` as "the last row", so using it unmasked fails silently. In a
    batch of pairs a row lacks a negative only if every pair shows the same image, so in
    practice either all rows are valid or none is.

    Args:
        sim_i2t: [B, B] logits, row i = image i, column j = text j (the pairs of the batch).
        image_ids: [B] image id of each pair.
        generator: a ``torch.Generator`` on ``sim_i2t``'s device, for reproducible draws.

    Returns:
        ``(neg_text_idx, neg_image_idx)``: two [B] int64 tensors; ``neg_text_idx[i]`` is the
        text row paired with image i as a negative, ``neg_image_idx[t]`` the image row paired
        with text t; ``-1`` where no negative exists.
    """
    p_text, p_image = itm_negative_probs(sim_i2t, image_ids)  # checks the shapes
    has_neg = (image_ids.view(-1, 1) != image_ids.view(1, -1)).any(dim=1)

    def draw(weights: Tensor) -> Tensor:
        # Rows without a negative are all 0; give them a harmless uniform row so multinomial
        # does not fail, then overwrite their draw with -1.
        weights = torch.where(has_neg.view(-1, 1), weights, 1.0)
        idx = torch.multinomial(weights, 1, generator=generator).squeeze(1)
        return torch.where(has_neg, idx, -1)

    return draw(p_text), draw(p_image)


@torch.no_grad()
def itm_pairs(neg_text_idx: Tensor, neg_image_idx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The (text row, image row, label) of every pair ITM scores, from the sampled negatives.

    With B pairs in the batch the order is:

    1. the B positives ``(b, b)``, label 1;
    2. for each image i with a negative, ``(neg_text_idx[i], i)``, label 0;
    3. for each text t with a negative, ``(t, neg_image_idx[t])``, label 0.

    Rows whose index is ``-1`` (no other image id in the batch, see
    :func:`itm_hard_negatives`) are left out, so normally M = 2B negatives follow the
    positives, and none when the batch shows a single image.

    Args:
        neg_text_idx: [B] hard negative text row of each image, ``-1`` where none exists.
        neg_image_idx: [B] hard negative image row of each text, ``-1`` where none exists.

    Returns:
        ``(text_idx, image_idx, labels)``: three [B + M] int64 tensors on the inputs' device;
        pair k fuses text row ``text_idx[k]`` with image row ``image_idx[k]``.
    """
    if neg_text_idx.ndim != 1 or neg_text_idx.shape != neg_image_idx.shape:
        raise ValueError(
            "neg_text_idx and neg_image_idx: expected the same shape [B], got "
            f"{list(neg_text_idx.shape)} and {list(neg_image_idx.shape)}"
        )
    rows = torch.arange(neg_text_idx.shape[0], device=neg_text_idx.device)
    ok_i, ok_t = neg_text_idx >= 0, neg_image_idx >= 0
    text_idx = torch.cat([rows, neg_text_idx[ok_i], rows[ok_t]])
    image_idx = torch.cat([rows, rows[ok_i], neg_image_idx[ok_t]])
    labels = torch.zeros_like(text_idx)
    labels[: rows.shape[0]] = 1
    return text_idx, image_idx, labels


def itm_loss(logits_pos: Tensor, logits_neg: Tensor, neg_valid: Tensor | None = None) -> Tensor:
    """Image-text matching loss L_itm: 2-way cross-entropy (METHOD §2, ITM).

    The model's ITM head (multimodal [CLS] → Linear(2)) scores B matched pairs (label 1) and
    the hard negative pairs of :func:`itm_hard_negatives` (label 0): normally 2B of them, B
    (image, negative text) and B (negative image, text). The mean runs over all B + M pairs,
    as ALBEF's single cross-entropy over the concatenation.

    Args:
        logits_pos: [B, 2] logits of the matched pairs.
        logits_neg: [M, 2] logits of the negative pairs (M = 2B, or fewer if the caller
            already dropped rows without a valid negative).
        neg_valid: optional [M] bool; rows that are False (index -1 from the sampler) are
            left out of the loss.

    Returns:
        Scalar tensor L_itm.
    """
    if logits_pos.ndim != 2 or logits_pos.shape[1] != 2:
        raise ValueError(f"logits_pos: expected shape [B, 2], got {list(logits_pos.shape)}")
    if logits_neg.ndim != 2 or logits_neg.shape[1] != 2:
        raise ValueError(f"logits_neg: expected shape [M, 2], got {list(logits_neg.shape)}")
    if neg_valid is not None:
        if neg_valid.shape != logits_neg.shape[:1]:
            raise ValueError(
                f"neg_valid: expected shape [{logits_neg.shape[0]}], got {list(neg_valid.shape)}"
            )
        logits_neg = logits_neg[neg_valid]
    logits = torch.cat([logits_pos, logits_neg], dim=0)
    labels = torch.cat(
        [
            torch.ones(logits_pos.shape[0], dtype=torch.long, device=logits.device),
            torch.zeros(logits_neg.shape[0], dtype=torch.long, device=logits.device),
        ]
    )
    return F.cross_entropy(logits, labels)


# ----------------------------------------------------------------------------------------------
# MLM
# ----------------------------------------------------------------------------------------------
def mlm_loss(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Masked language modelling loss L_mlm: CE over the masked tokens (METHOD §2, MLM).

    Args:
        logits: [B, L, V] token logits of the multimodal encoder's MLM head.
        labels: [B, L] original token ids at masked positions, ``ignore_index`` elsewhere.
        ignore_index: label of positions not scored (-100, the Hugging Face convention).

    Returns:
        Scalar tensor, the mean CE over the scored positions. With no scored position at all
        (possible for tiny batches at 15 % masking) it is 0, connected to the graph, instead of
        the NaN that a mean over nothing gives.
    """
    if logits.ndim != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"logits [B, L, V] and labels [B, L] do not match: {list(logits.shape)} and "
            f"{list(labels.shape)}"
        )
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_labels = labels.reshape(-1)
    total = F.cross_entropy(flat_logits, flat_labels, ignore_index=ignore_index, reduction="sum")
    count = (flat_labels != ignore_index).sum()
    return total / count.clamp(min=1)


# ----------------------------------------------------------------------------------------------
# The total loss
# ----------------------------------------------------------------------------------------------
def _weights(cfg: LossConfig) -> dict[str, float]:
    weights = {name: float(getattr(cfg, field)) for name, field in LOSS_TERMS.items()}
    for name, w in weights.items():
        if not (math.isfinite(w) and w >= 0):
            raise ValueError(f"loss.{LOSS_TERMS[name]} must be a finite weight >= 0, got {w}")
    return weights


def active_terms(cfg: LossConfig) -> set[str]:
    """Names of the loss terms with weight > 0 (subset of ``{"itc", "tri", "itm", "mlm"}``).

    The model computes only these; :func:`combine_losses` requires exactly these.
    """
    return {name for name, w in _weights(cfg).items() if w > 0}


def combine_losses(terms: Mapping[str, Tensor], cfg: LossConfig) -> tuple[Tensor, dict[str, float]]:
    """Weighted total L = w_itc·L_itc + w_tri·L_otri + w_itm·L_itm + w_mlm·L_mlm (METHOD §2).

    Args:
        terms: scalar loss tensors by name (``"itc"``, ``"tri"``, ``"itm"``, ``"mlm"``). A term
            whose weight is 0 may be missing; if given, it is logged but not added, so even a
            NaN there cannot reach the total.
        cfg: the weights ``w_*``.

    Returns:
        ``(total, logs)``: the scalar total (with gradient) and detached Python floats of every
        given term and of ``"total"``, for logging.

    Raises:
        ValueError: an unknown term name, a term with weight > 0 that is missing, a non-scalar
            term, a negative weight, or all weights 0.
    """
    unknown = sorted(set(terms) - set(LOSS_TERMS))
    if unknown:
        raise ValueError(f"unknown loss term(s) {unknown}; known terms: {sorted(LOSS_TERMS)}")
    weights = _weights(cfg)
    active = [name for name in LOSS_TERMS if weights[name] > 0]
    if not active:
        raise ValueError("all loss weights (loss.w_itc, w_tri, w_itm, w_mlm) are 0")
    missing = [name for name in active if name not in terms]
    if missing:
        detail = ", ".join(f"'{n}' (loss.{LOSS_TERMS[n]} = {weights[n]})" for n in missing)
        raise ValueError(f"loss term(s) {detail} have weight > 0 but were not computed")
    for name, value in terms.items():
        if value.ndim != 0:
            raise ValueError(f"loss term '{name}' must be a scalar, got shape {list(value.shape)}")

    total = weights[active[0]] * terms[active[0]]
    for name in active[1:]:
        total = total + weights[name] * terms[name]
    logs = {name: float(value.detach()) for name, value in terms.items()}
    logs["total"] = float(total.detach())
    return total, logs


# ----------------------------------------------------------------------------------------------
# ITM: the sampling distribution, for inspection
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def itm_negative_probs(sim_i2t: Tensor, image_ids: Tensor) -> tuple[Tensor, Tensor]:
    """The probabilities with which :func:`itm_hard_negatives` draws each hard negative (it
    draws from exactly these).

    Row i of the first matrix is image i's distribution over the texts of the batch,
    ``P(t_j) = exp s(i, t_j) / Σ_k exp s(i, t_k)`` with j and k running over the captions of a
    *different* image id, and 0 on the captions of image i itself; row t of the second is text
    t's distribution over the images (column t of ``sim_i2t``). These are the weights the sampler
    draws from, so ``torch.multinomial`` on them with the same generator repeats its draws.

    Args:
        sim_i2t: [B, B] logits, row i = image i, column j = text j (ITC logits s = v·t/τ).
        image_ids: [B] image id of each pair.

    Returns:
        ``(p_text, p_image)``: two [B, B] tensors (float32 at least) whose rows sum to 1; a row
        without any valid negative (every pair shows the same image) is all 0, where the sampler
        returns ``-1``.
    """
    batch = image_ids.shape[0]
    if sim_i2t.shape != (batch, batch):
        raise ValueError(f"sim_i2t: expected shape [{batch}, {batch}], got {list(sim_i2t.shape)}")
    neg = image_ids.view(-1, 1) != image_ids.view(1, -1)  # [B, B], symmetric
    has_neg = neg.any(dim=1, keepdim=True)
    # float32 at least: softmax of half logits loses the small probabilities multinomial needs.
    logits = sim_i2t.detach().to(torch.promote_types(sim_i2t.dtype, torch.float32))

    def probs(scores: Tensor) -> Tensor:
        weights = F.softmax(scores.masked_fill(~neg, -math.inf), dim=1)
        return torch.where(has_neg, weights, 0.0)  # all-masked rows are NaN after the softmax

    return probs(logits), probs(logits.t())
