"""Running the model for retrieval (METHOD.md §3 (1)-(2)): embedding a split, scoring every
image against every caption (S_itc), and the ITM probabilities of each query's top-k.

Everything that needs the model lives here; turning its outputs into re-ranked matrices (S_raw,
SMR, the baselines) is pure matrix work in :mod:`cmpagl.rerank`.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from cmpagl import rerank as rr
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


# --------------------------------------------------------------------------------------------
# A split's ITC embeddings, cached beside the checkpoint (repeated queries of `cmpagl retrieve`)
# --------------------------------------------------------------------------------------------
CACHE_VERSION = 1


def split_fingerprint(ds: CaptionDataset, checkpoint: str | os.PathLike[str], reading: Any) -> str:
    """A hex digest of everything a split's ITC embeddings depend on: the checkpoint's weights
    file (size, modification time) and ``meta.json``; the split's image files (name, size,
    modification time) and captions; the image-reading settings and the eval transform's input
    size (``reading``: any value with a stable ``repr``, e.g. the data config)."""
    folder = Path(checkpoint)
    h = hashlib.sha256(f"v{CACHE_VERSION}".encode())
    for name in ("model.safetensors", "meta.json"):
        path = folder / name
        st = path.stat()
        h.update(f"{name}:{st.st_size}:{st.st_mtime_ns}".encode())
    h.update((folder / "meta.json").read_bytes())
    for name in ds.filenames:
        path = ds.image_dir / name
        st = path.stat() if path.is_file() else None
        h.update(f"{name}:{st.st_size if st else -1}:{st.st_mtime_ns if st else -1}\n".encode())
    h.update("\n".join(ds.all_captions).encode())
    h.update(np.asarray(ds.txt2img, dtype=np.int64).tobytes())
    h.update(repr(reading).encode())
    return h.hexdigest()


def cached_embeddings(
    model: CMPAGL,
    ds: CaptionDataset,
    transform,
    cache_path: str | os.PathLike[str],
    fingerprint: str,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
) -> tuple[SplitEmbeddings, bool]:
    """The split's ITC embeddings (no fusion inputs) from ``cache_path`` when it was written
    for ``fingerprint`` (:func:`split_fingerprint`), else computed by :func:`embed_split` and
    written there atomically. A changed image, caption, checkpoint or reading setting changes
    the fingerprint, so the cache is computed again, never reused stale.

    Returns:
        ``(embeddings, whether they were read from the cache)``.
    """
    from cmpagl.fileio import atomic_write

    path = Path(cache_path)
    if path.is_file():
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # an unreadable cache is only a cache: compute it again
            saved = None
        if saved is not None and saved.get("fingerprint") == fingerprint:
            return (
                SplitEmbeddings(
                    image_embed=saved["image_embed"],
                    text_embed=saved["text_embed"],
                    image_fusion=torch.empty(0),
                    text_hidden=torch.empty(0),
                    text_mask=torch.empty(0),
                    txt2img=ds.txt2img,
                    captions=ds.all_captions,
                ),
                True,
            )
    emb = embed_split(model, ds, transform, batch_size, 0, device, keep_fusion=False)
    payload = {
        "fingerprint": fingerprint,
        "image_embed": emb.image_embed,
        "text_embed": emb.text_embed,
    }
    atomic_write(path, lambda tmp: torch.save(payload, tmp))
    return emb, False


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


# --------------------------------------------------------------------------------------------
# ITM probabilities of each query's top-k (METHOD §3 step 2)
# --------------------------------------------------------------------------------------------
def caption_text_ids(captions: Sequence[str]) -> Tensor:
    """[N_txt] int64: index of the first caption with exactly the same string.

    Exact strings (not normalised ones): only those are guaranteed the same tokens.
    """
    first: dict[str, int] = {}
    return torch.tensor([first.setdefault(c, j) for j, c in enumerate(captions)], dtype=torch.long)


@torch.no_grad()
def itm_probabilities(
    model: CMPAGL,
    emb: SplitEmbeddings,
    img: Tensor,
    txt: Tensor,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
) -> Tensor:
    """p_match = softmax(ITM logits)[:, 1] of the fused pairs (img[p], txt[p]) -> [P] float64.

    Runs ``model.fuse`` + ``model.itm_logits`` in eval mode, ``batch_size`` pairs at a time.
    Pairs are processed shortest caption first and each batch is cut to its longest caption,
    so little time goes into padding (padded keys are masked, the result is the same).
    """
    if emb.image_fusion.numel() == 0 or emb.text_hidden.numel() == 0:
        raise ValueError("ITM needs the fusion inputs: embed_split(..., keep_fusion=True)")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    valid = emb.text_mask.bool()
    lengths = valid.sum(1)
    order = torch.argsort(lengths[txt], stable=True)
    out = torch.empty(img.numel(), dtype=torch.float64)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, img.numel(), batch_size):
            idx = order[start : start + batch_size]
            ii, tt = img[idx], txt[idx]
            length = int(valid[tt].any(0).nonzero().max()) + 1
            fused = model.fuse(
                emb.text_hidden[tt, :length].to(device),
                emb.text_mask[tt, :length].to(device),
                emb.image_fusion[ii].to(device),
            )
            logits = model.itm_logits(fused).float()
            out[idx] = logits.softmax(-1)[:, 1].double().cpu()
    finally:
        model.train(was_training)
    return out


@dataclass
class ItmRescore:
    """Result of :func:`itm_rescore`.

    Attributes:
        scores: S_raw per direction, [N_img, N_txt] float64 (:attr:`cmpagl.rerank.ItmScores.
            s_raw`): S_itc + p_match on the query's candidates, below them the rest in ITC order.
        s_prob: the same without the non-candidate gap, what SMR's softmaxes read.
        candidates: the bool candidate masks per direction (each query's top-k by S_itc).
        p_match: [N_img, N_txt] float64, p_match on the union of both directions' top-k, NaN
            where the model was not run. :func:`cmpagl.rerank.itm_scores` turns it into S_raw
            for any k' <= ``k`` without running the model again.
        k: the candidates per query that were scored.
        n_pairs: size of the union of both directions' candidate pairs.
        n_evals: ITM forward passes: distinct (image, caption text) pairs among them.
        seconds: wall time of the re-scoring.
    """

    scores: rr.RankingScores
    s_prob: rr.RankingScores
    candidates: rr.RankingScores
    p_match: Tensor
    k: int
    n_pairs: int
    n_evals: int
    seconds: float


def itm_rescore(
    model: CMPAGL,
    emb: SplitEmbeddings,
    s_itc: Tensor,
    k: int,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
) -> ItmRescore:
    """Run the ITM head on each query's top-k (METHOD §3 step 2) and build S_raw.

    Image query i: its top-k captions by S_itc (row). Caption query j: its top-k images
    (column). The union of these pairs is evaluated once per distinct (image, caption text)
    through the multimodal encoder and ITM head (:func:`itm_probabilities`); then
    :func:`cmpagl.rerank.itm_scores` re-orders each query's candidates by S_itc + p_match.

    Args:
        model: CMPAGL; emb: the split's :class:`SplitEmbeddings` (with fusion inputs).
        s_itc: [N_img, N_txt] S_itc of the same split; k: candidates per query (ties kept).

    Returns:
        :class:`ItmRescore` with the S_raw pair, p_match, counts and wall time.
    """
    t0 = time.perf_counter()
    s = s_itc.detach().double().cpu()
    n_img, n_txt = s.shape
    n_emb = (emb.image_embed.shape[0], emb.text_embed.shape[0])
    if n_emb != (n_img, n_txt):
        raise ValueError(
            f"s_itc is {tuple(s.shape)} but the embeddings hold {n_emb[0]} images "
            f"and {n_emb[1]} captions"
        )
    cand = rr.itm_candidates(s, k)
    img, txt = (cand.i2t | cand.t2i).nonzero(as_tuple=True)
    # Identical strings give identical fused inputs: one ITM pass per (image, text) suffices.
    code = img * n_txt + caption_text_ids(emb.captions)[txt]
    unique, inverse = torch.unique(code, return_inverse=True)
    p_unique = itm_probabilities(model, emb, unique // n_txt, unique % n_txt, batch_size, device)
    p_match = torch.full_like(s, float("nan"))
    p_match[img, txt] = p_unique[inverse]
    scored = rr.itm_scores(s, p_match, k)
    return ItmRescore(
        scored.s_raw,
        scored.s_prob,
        scored.candidates,
        p_match,
        k=int(k),
        n_pairs=int(img.numel()),
        n_evals=int(unique.numel()),
        seconds=time.perf_counter() - t0,
    )


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
