"""AdamW with two learning rates and the warm-up + cosine schedule (METHOD.md §4).

Pretrained parameters (BERT, and the local Swin path when ImageNet weights are loaded) train at
``train.lr_pretrained``; everything the method adds (GWG/GLWA/γ, cross-attention, projections,
heads, τ) at ``train.lr_new``. Biases, norms, γ, τ and relative position bias tables are not
decayed.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR

from cmpagl.config import ExperimentConfig, TrainConfig

__all__ = [
    "build_optimizer",
    "build_scheduler",
    "is_pretrained_param",
    "lr_factor",
    "param_groups",
    "total_steps",
]


def is_pretrained_param(name: str, pretrained_visual: set[str]) -> bool:
    """Whether parameter ``name`` starts from pretrained weights (BERT or ImageNet Swin).

    Pretrained: all of ``text_encoder``; the self-attention and FFN of ``fusion_encoder``
    (copied from BERT's upper layers), not its ``crossattention``; the ``visual`` names in
    ``pretrained_visual`` (its local Swin path when ImageNet weights are used). Everything else
    (GWG/GLWA/γ, cross-attention, projections, heads, ``temp``, ``image_to_text``) is new.
    """
    if name.startswith("text_encoder."):
        return True
    if name.startswith("fusion_encoder."):
        return ".crossattention." not in name
    return name in pretrained_visual


def _no_decay(name: str, param: Tensor) -> bool:
    # Biases, norm weights, γ and τ are vectors or scalars; the relative position bias tables
    # are matrices that timm does not decay either.
    return param.ndim <= 1 or "relative_position_bias_table" in name


def param_groups(model: nn.Module, cfg: ExperimentConfig) -> list[dict[str, Any]]:
    """AdamW parameter groups: {pretrained, new} x {decay, no decay}, empty ones left out.

    Each group has ``name`` (``pretrained``, ``pretrained_no_decay``, ``new``,
    ``new_no_decay``), ``params``, ``param_names``, ``lr`` and ``weight_decay``. Frozen
    parameters (the momentum twins) are not included.
    """
    pretrained_visual: set[str] = set()
    if cfg.model.gswin.pretrained:  # the local Swin path only; GWG/GLWA/γ are new
        new_keys = set(model.visual.new_keys())
        pretrained_visual = {
            f"visual.{n}" for n, _ in model.visual.named_parameters() if n not in new_keys
        }
    lr = {"pretrained": cfg.train.lr_pretrained, "new": cfg.train.lr_new}
    groups: dict[str, dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        kind = "pretrained" if is_pretrained_param(name, pretrained_visual) else "new"
        decay = not _no_decay(name, param)
        key = kind if decay else f"{kind}_no_decay"
        group = groups.setdefault(
            key,
            {
                "name": key,
                "params": [],
                "param_names": [],
                "lr": lr[kind],
                "weight_decay": cfg.train.weight_decay if decay else 0.0,
            },
        )
        group["params"].append(param)
        group["param_names"].append(name)
    order = ["pretrained", "pretrained_no_decay", "new", "new_no_decay"]
    return [groups[k] for k in order if k in groups]


def build_optimizer(model: nn.Module, cfg: ExperimentConfig) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`, with torch's fused kernel.

    The default AdamW on the CPU loops over the parameters one small op at a time (six ops for
    each of ~330 tensors); the fused kernel does one pass per tensor, the same update up to
    float rounding, and exists on the CPU and CUDA alike.
    """
    return torch.optim.AdamW(param_groups(model, cfg), lr=cfg.train.lr_new, fused=True)


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Learning-rate multiplier of 0-based optimizer step ``step``.

    Linear warm-up ``(step + 1) / warmup`` for the first ``warmup`` steps (never 0, so no step
    is wasted), then a cosine from 1 at step ``warmup`` to ``min_ratio`` at step ``total - 1``.
    """
    if step < warmup:
        return (step + 1) / warmup
    progress = min((step - warmup) / max(total - 1 - warmup, 1), 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def total_steps(cfg: TrainConfig, steps_per_epoch: int) -> int:
    """``epochs x steps_per_epoch``, or ``max_steps`` when that is set and smaller."""
    steps = cfg.epochs * steps_per_epoch
    return min(steps, cfg.max_steps) if cfg.max_steps > 0 else steps


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total: int) -> LambdaLR:
    """:func:`lr_factor` as a ``LambdaLR`` (stepped once per optimizer step)."""
    factor = functools.partial(
        lr_factor, warmup=cfg.warmup_steps, total=total, min_ratio=cfg.min_lr_ratio
    )
    return LambdaLR(optimizer, factor)
