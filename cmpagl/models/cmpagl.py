"""The CMPAGL model (METHOD.md §1): a Gswin image encoder, one BERT split into a text encoder and
a multimodal (fusion) encoder, 256-d pre-alignment projections, ITM and MLM heads, and momentum
encoders with queues for ITC.

The model returns features; :mod:`cmpagl.objective` computes the losses from them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cmpagl.config import ModelConfig
from cmpagl.models.gswin import build_gswin
from cmpagl.models.momentum import FeatureQueue, ema_update, momentum_copy
from cmpagl.models.text import build_text_encoders, pool_text, tokenize_captions


@dataclass
class ImageFeatures:
    """``tokens`` [B, 1 + N, C] (the mean [CLS] first), ``fusion`` [B, 1 + N, D_text] (projected
    for cross-attention) and ``embed`` [B, E] (normalised ITC embedding v)."""

    tokens: Tensor
    fusion: Tensor
    embed: Tensor


@dataclass
class TextFeatures:
    """``hidden`` [B, L, D] (text-encoder output), ``mask`` [B, L] and ``embed`` [B, E]
    (normalised ITC embedding t)."""

    hidden: Tensor
    mask: Tensor
    embed: Tensor


class CMPAGL(nn.Module):
    """Encoders, heads and momentum state of CMPAGL.

    Online modules: ``visual`` (Gswin), ``vision_proj`` (C -> E), ``image_to_text`` (C -> D,
    image tokens for fusion), ``text_encoder`` (BERT layers [0, N0/2)), ``text_proj`` (D -> E),
    ``fusion_encoder`` (BERT layers [N0/2, N0) + cross-attention), ``itm_head`` (D -> 2),
    ``mlm_head`` (tied to the word embeddings), ``temp`` (τ). Momentum twins ``*_m`` of the
    visual/text encoders and projections feed the ITC queues (§1.3).

    Built with fresh weights (the BERT architecture from the checkpoint's config, and its
    tokenizer); :func:`cmpagl.models.pretrained.load_pretrained` copies pretrained weights in.
    """

    def __init__(self, cfg: ModelConfig, use_momentum: bool = True) -> None:
        super().__init__()
        self.cfg = cfg
        self.visual = build_gswin(cfg.gswin)
        split = build_text_encoders(cfg.text)
        self.text_encoder, self.fusion_encoder = split.text_encoder, split.fusion_encoder
        self.mlm_head, self.tokenizer = split.mlm_head, split.tokenizer
        width, vis = split.config.hidden_size, self.visual.num_features
        self.image_to_text = nn.Linear(vis, width)
        self.vision_proj = nn.Linear(vis, cfg.embed_dim)
        self.text_proj = nn.Linear(width, cfg.embed_dim)
        self.itm_head = nn.Linear(width, 2)
        self.temp = nn.Parameter(torch.tensor(float(cfg.temp_init)))
        self.use_momentum = use_momentum
        if use_momentum:
            # Built from the online modules so they start identical (ALBEF's copy_params).
            self.visual_m = momentum_copy(self.visual)
            self.vision_proj_m = momentum_copy(self.vision_proj)
            self.text_encoder_m = momentum_copy(self.text_encoder)
            self.text_proj_m = momentum_copy(self.text_proj)
            self.queue = FeatureQueue(cfg.queue_size, cfg.embed_dim)
        self.train()

    # -- encoders ---------------------------------------------------------------------------
    def tokenize(self, captions: Sequence[str], device: torch.device | None = None) -> dict:
        """Captions -> ``input_ids`` / ``attention_mask`` [B, L] (padded to the longest), on
        ``device`` (default: the model's); see :func:`~cmpagl.models.text.tokenize_captions`."""
        device = device or self.temp.device
        return tokenize_captions(self.tokenizer, captions, self.cfg.text.max_length, device)

    def _pool(self, hidden: Tensor, mask: Tensor) -> Tensor:
        """[B, L, D] -> [B, D] by ``model.text.pooling`` (:func:`~cmpagl.models.text.pool_text`)."""
        return pool_text(hidden, mask, self.cfg.text.pooling)

    def encode_image(self, images: Tensor) -> ImageFeatures:
        """Images [B, 3, H, W] -> :class:`ImageFeatures` (§1.1 tokens, §1.3 embedding v)."""
        tokens = self.visual.forward_tokens(images)
        embed = F.normalize(self.vision_proj(tokens[:, 0]), dim=-1)
        return ImageFeatures(tokens=tokens, fusion=self.image_to_text(tokens), embed=embed)

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> TextFeatures:
        """Token ids [B, L] -> :class:`TextFeatures` (text-encoder half of BERT, §1.2/§1.3)."""
        return self.text_features(self.text_encoder(input_ids, attention_mask), attention_mask)

    def text_features(self, hidden: Tensor, attention_mask: Tensor) -> TextFeatures:
        """Text-encoder states [B, L, D] -> :class:`TextFeatures` (pooled, projected, t)."""
        embed = F.normalize(self.text_proj(self._pool(hidden, attention_mask)), dim=-1)
        return TextFeatures(hidden=hidden, mask=attention_mask, embed=embed)

    def fuse(self, text_hidden: Tensor, attention_mask: Tensor, image_fusion: Tensor) -> Tensor:
        """Multimodal encoder: text [B, L, D] attends to image tokens [B, 1 + N, D] -> [B, L, D]."""
        return self.fusion_encoder(text_hidden, attention_mask, image_fusion)

    def itm_logits(self, fused: Tensor) -> Tensor:
        """Fused hidden states [B, L, D] -> match / no-match logits [B, 2] from the [CLS]."""
        return self.itm_head(fused[:, 0])

    def mlm_logits(self, fused: Tensor) -> Tensor:
        """Fused hidden states [..., D] -> vocabulary logits [..., V]."""
        return self.mlm_head(fused)

    def temperature(self) -> Tensor:
        """τ clamped to [temp_min, 0.5] (ALBEF clamps it too; a τ near 0 makes ITC explode)."""
        return self.temp.clamp(self.cfg.temp_min, 0.5)

    # -- momentum ---------------------------------------------------------------------------
    def _momentum_pairs(self) -> tuple[list[nn.Module], list[nn.Module]]:
        online = [self.visual, self.vision_proj, self.text_encoder, self.text_proj]
        twins = [self.visual_m, self.vision_proj_m, self.text_encoder_m, self.text_proj_m]
        return online, twins

    @torch.no_grad()
    def momentum_update(self) -> None:
        """EMA step of the momentum encoders (m = ``model.momentum``)."""
        if self.use_momentum:
            ema_update(*self._momentum_pairs(), m=self.cfg.momentum)

    @torch.no_grad()
    def momentum_embeddings(
        self, images: Tensor, input_ids: Tensor, attention_mask: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Momentum ITC embeddings (image [B, E], text [B, E]), normalised."""
        v = self.vision_proj_m(self.visual_m.forward_tokens(images)[:, 0])
        hidden = self.text_encoder_m(input_ids, attention_mask)
        t = self.text_proj_m(self._pool(hidden, attention_mask))
        return F.normalize(v, dim=-1), F.normalize(t, dim=-1)

    def train(self, mode: bool = True) -> CMPAGL:
        """Set train/eval mode; the momentum twins follow ``mode`` only when
        ``model.momentum_train_mode`` is on (ALBEF: dropout and drop path in the teacher too),
        and otherwise always run in eval mode (a deterministic teacher, the default)."""
        super().train(mode)
        if self.use_momentum and not self.cfg.momentum_train_mode:
            for m in self._momentum_pairs()[1]:
                m.eval()
        return self


def build_model(cfg: ModelConfig, use_momentum: bool = True) -> CMPAGL:
    """The CMPAGL model for a :class:`~cmpagl.config.ModelConfig`: the architecture with fresh
    weights. For training from pretrained weights (ImageNet Swin, the BERT of ``text.name``)
    call :func:`cmpagl.models.pretrained.load_pretrained` on it; for a trained model, load a
    checkpoint (:func:`cmpagl.checkpoint.load_checkpoint`)."""
    return CMPAGL(cfg, use_momentum=use_momentum)
