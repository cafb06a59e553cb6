"""Embedding a dataset split and scoring every image against every caption (METHOD.md §3 (1)).

Re-scoring with ITM and re-ranking (SMR and the baselines) build on these in
:mod:`cmpagl.rerank`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from cmpagl.data.dataset import CaptionDataset
from cmpagl.data.torch_data import EvalImages, make_loader
from cmpagl.metrics import evaluate_retrieval
from cmpagl.models.cmpagl import CMPAGL


@dataclass
class SplitEmbeddings:
    """Everything retrieval needs from one pass of the encoders over a split.

    Attributes:
        image_embed: [N_img, E] normalised ITC image embeddings v.
        text_embed: [N_txt, E] normalised ITC text embeddings t.
        image_fusion: [N_img, 1 + N, D] image tokens for the multimodal encoder (ITM).
        text_hidden: [N_txt, L, D] text-encoder outputs (padded to the split's longest caption).
        text_mask: [N_txt, L] attention masks of ``text_hidden``.
        txt2img: [N_txt] caption -> image index.
        captions: the N_txt caption strings.
    """

    image_embed: Tensor
    text_embed: Tensor
    image_fusion: Tensor
    text_hidden: Tensor
    text_mask: Tensor
    txt2img: np.ndarray
    captions: list[str]


@torch.no_grad()
def embed_split(
    model: CMPAGL,
    ds: CaptionDataset,
    transform,
    batch_size: int = 64,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
    keep_fusion: bool = True,
) -> SplitEmbeddings:
    """Run the image and text encoders over every image and caption of ``ds`` (eval mode).

    ``keep_fusion=False`` skips storing the fusion inputs (ITC-only evaluation needs less memory).
    """
    was_training = model.training
    model.eval()
    try:
        img_embed, img_fusion = [], []
        loader = make_loader(
            EvalImages(ds, transform), batch_size, shuffle=False, num_workers=num_workers
        )
        for images, _ in loader:
            feats = model.encode_image(images.to(device))
            img_embed.append(feats.embed.float().cpu())
            if keep_fusion:
                img_fusion.append(feats.fusion.float().cpu())
        captions = ds.all_captions
        # Each distinct string is encoded once: identical captions must get bit-identical
        # embeddings (they tie exactly, METHOD §4), which per-batch padding would not give.
        unique = list(dict.fromkeys(captions))
        where = torch.tensor(_index_of(captions, unique), dtype=torch.long)
        txt_embed, hidden, masks = [], [], []
        for start in range(0, len(unique), batch_size):
            tok = model.tokenize(unique[start : start + batch_size], torch.device(device))
            feats = model.encode_text(tok["input_ids"], tok["attention_mask"])
            txt_embed.append(feats.embed.float().cpu())
            if keep_fusion:
                hidden.append(feats.hidden.float().cpu())
                masks.append(feats.mask.cpu())
    finally:
        model.train(was_training)
    text_hidden, text_mask = _pad_cat(hidden, masks) if keep_fusion else (torch.empty(0),) * 2
    if keep_fusion:
        text_hidden, text_mask = text_hidden[where], text_mask[where]
    return SplitEmbeddings(
        image_embed=torch.cat(img_embed),
        text_embed=torch.cat(txt_embed)[where],
        image_fusion=torch.cat(img_fusion) if keep_fusion else torch.empty(0),
        text_hidden=text_hidden,
        text_mask=text_mask,
        txt2img=ds.txt2img,
        captions=captions,
    )


def _index_of(items: list[str], unique: list[str]) -> list[int]:
    position = {u: i for i, u in enumerate(unique)}
    return [position[x] for x in items]


def _pad_cat(hidden: list[Tensor], masks: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Concatenate [B_i, L_i, D] batches padded to the longest L (mask 0 on the padding)."""
    length = max(h.shape[1] for h in hidden)
    pad_h = [torch.nn.functional.pad(h, (0, 0, 0, length - h.shape[1])) for h in hidden]
    pad_m = [torch.nn.functional.pad(m, (0, length - m.shape[1])) for m in masks]
    return torch.cat(pad_h), torch.cat(pad_m)


def itc_scores(emb: SplitEmbeddings) -> Tensor:
    """S_itc [N_img, N_txt] = v · t (cosine; τ does not change the ranking)."""
    return emb.image_embed @ emb.text_embed.t()


def evaluate_itc(
    model: CMPAGL,
    ds: CaptionDataset,
    transform,
    batch_size: int = 64,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """ITC-only retrieval metrics of ``model`` on ``ds`` (the per-epoch validation of training):
    the standard keys (exact tie expectation), ``*_pess``, ``dup_*`` and ``oracle_*``."""
    emb = embed_split(model, ds, transform, batch_size, num_workers, device, keep_fusion=False)
    return evaluate_retrieval(itc_scores(emb), emb.txt2img, emb.captions)


@dataclass
class Hit:
    """One retrieved item: its index in the split, its score, and what it is."""

    index: int
    score: float
    label: str  # the caption text, or the image file name


@torch.no_grad()
def search_by_text(
    model: CMPAGL, emb: SplitEmbeddings, ds: CaptionDataset, text: str, top: int = 5
) -> list[Hit]:
    """Rank the split's images for a free-text query by ITC similarity (text -> image)."""
    model.eval()
    tok = model.tokenize([text], emb.image_embed.device)
    query = model.encode_text(tok["input_ids"], tok["attention_mask"]).embed.float().cpu()
    scores = (emb.image_embed @ query[0]).cpu()
    values, idx = scores.topk(min(top, scores.numel()))
    return [Hit(int(i), float(v), ds.filenames[int(i)]) for v, i in zip(values, idx, strict=True)]


@torch.no_grad()
def search_by_image(model: CMPAGL, emb: SplitEmbeddings, image: Tensor, top: int = 5) -> list[Hit]:
    """Rank the split's captions for an image ``[3, H, W]`` (image -> text); identical caption
    texts are listed once, with the best score."""
    model.eval()
    query = model.encode_image(image.unsqueeze(0)).embed.float().cpu()[0]
    scores = emb.text_embed @ query
    order = torch.argsort(scores, descending=True, stable=True)
    hits, seen = [], set()
    for j in order.tolist():
        text = emb.captions[j]
        if text.strip().lower() in seen:
            continue
        seen.add(text.strip().lower())
        hits.append(Hit(j, float(scores[j]), text))
        if len(hits) == top:
            break
    return hits
