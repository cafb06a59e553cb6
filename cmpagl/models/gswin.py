"""The Gswin image encoder: Swin with a global information window (METHOD.md §1.1, Fig. 2).

A Gswin block is a Swin block whose window attention also sees a *global window*: the GWG block
(:mod:`cmpagl.models.gwg`) summarises the block input X [B, H, W, C] into global tokens
G [B, n_global, C], and every local window attends to them (GLWA, global-local window
cross-attention). With LN the block's first norm ([decision] ``GswinConfig.global_mode``):

- ``"add"``:    X' = X + W-MSA(LN(X)) + γ ⊙ GLWA(LN(X), G),   X'' = X' + MLP(LN2(X'))
- ``"concat"``: the local window's keys/values and G's keys/values in one softmax per window
- ``"off"``:    a plain Swin block (no GWG/GLWA parameters exist)

Everything else is timm's Swin (patch embedding, patch merging, window partition, shifted windows
with their attention mask, relative position bias, MLP, stochastic depth), reused by subclassing
and keeping timm's parameter names, so a timm ``SwinTransformer`` state dict loads unchanged into
the local path (:func:`cmpagl.models.pretrained.load_pretrained_swin`). With γ = 0 the "add"
block *is* a Swin block.

This module builds the architecture only; ImageNet weights are copied in by
:mod:`cmpagl.models.pretrained`.

Example::

    model = build_gswin(gswin_config("tiny"))            # 128 px, CPU-sized
    tokens = model.forward_tokens(images)                # [B, 1 + 16, 384]: mean token + 4×4
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Literal

import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed, calculate_drop_path_rates, trunc_normal_
from timm.models.swin_transformer import (
    SwinTransformerBlock,
    SwinTransformerStage,
    WindowAttention,
    window_partition,
    window_reverse,
)
from torch import nn

from cmpagl.config import GswinConfig
from cmpagl.models.gwg import GlobalWindowGeneration

__all__ = [
    "GSWIN_PRESETS",
    "IGNORED_SWIN_KEY",
    "NEW_GSWIN_KEY",
    "GlobalLocalWindowAttention",
    "GswinBlock",
    "GswinStage",
    "GswinTransformer",
    "GswinWindowAttention",
    "build_gswin",
    "gswin_config",
]

# Named shapes. "tiny" is the GswinConfig default (tests check they agree); "swin_t" is timm's
# Swin-T shape and starts from its ImageNet weights with γ = 0, so the encoder starts as exactly
# that Swin and learns how much global context to add. The paper-scale Swin-B recipe (shape, drop
# path, γ, weights) lives in ONE place, configs/paper_base.yaml; tests check its shape against
# timm's swin_base_patch4_window7_224.
GSWIN_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        img_size=128, embed_dim=48, depths=(2, 2, 2, 2), num_heads=(3, 6, 12, 24), window_size=4
    ),
    "swin_t": dict(
        img_size=224,
        embed_dim=96,
        depths=(2, 2, 6, 2),
        num_heads=(3, 6, 12, 24),
        window_size=7,
        gamma_init=0.0,
        pretrained="swin_tiny_patch4_window7_224",
    ),
}


def gswin_config(preset: str, **overrides: Any) -> GswinConfig:
    """The GswinConfig of a named preset ("tiny", "swin_t"), with field overrides."""
    if preset not in GSWIN_PRESETS:
        raise ValueError(f"unknown Gswin preset {preset!r}; choose from {sorted(GSWIN_PRESETS)}")
    return dataclasses.replace(GswinConfig(), **{**GSWIN_PRESETS[preset], **overrides})


# ----------------------------------------------------------------------------------------------
# Attention modules
# ----------------------------------------------------------------------------------------------


class _StoredAttentionMixin:
    """softmax(q·kᵀ·scale + bias) v, keeping the softmax output while ``store_attn`` is set.

    The map is taken from the very computation the forward pass uses: with ``store_attn`` the
    explicit softmax path runs (the same one timm uses when fused attention is off), so the book's
    attention figures come from the model, not from a re-implementation.
    """

    store_attn: bool = False
    last_attn: torch.Tensor | None = None
    fused_attn: bool
    scale: float
    attn_drop: nn.Dropout

    def _attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        bias: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """q [B_, h, N, d], k/v [B_, h, S, d] -> [B_, h, N, d].

        bias: [1, h, N, S] (relative position bias) or None. mask: [nW, N, S] shift mask (0 or
        -100) with B_ = B·nW windows ordered image-major, as timm's ``window_partition`` does.
        """
        drop = self.attn_drop.p if self.training else 0.0
        if self.fused_attn and not self.store_attn:
            if mask is not None:
                bias = _expand_window_mask(bias, mask, q.shape[0])
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=drop)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        if bias is not None:
            attn = attn + bias
        if mask is not None:
            # Broadcast over images instead of materialising the mask per window (as timm does).
            attn = attn.view(-1, mask.shape[0], *attn.shape[1:]) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.flatten(0, 1)
        attn = attn.softmax(dim=-1)
        if self.store_attn:
            self.last_attn = attn.detach()
        return self.attn_drop(attn) @ v


def _expand_window_mask(bias: torch.Tensor, mask: torch.Tensor, n_windows: int) -> torch.Tensor:
    """bias [1, h, N, S] + mask [nW, N, S] -> [B·nW, h, N, S], the layout fused attention needs."""
    nw, n, s = mask.shape
    full = bias.unsqueeze(1) + mask.view(1, nw, 1, n, s)  # [1, nW, h, N, S]
    return full.expand(n_windows // nw, -1, -1, -1, -1).reshape(n_windows, -1, n, s)


class GswinWindowAttention(_StoredAttentionMixin, WindowAttention):
    """timm's W-MSA (relative position bias, shift mask), optionally with global keys/values.

    With ``global_kv`` (``global_mode="concat"``) the global tokens G get their own key/value
    projection and join every window's keys and values in ONE softmax; the relative position
    bias and the shift mask apply to the local part only (the global tokens have no position
    in the window). Without it this is timm's ``WindowAttention``, parameter for parameter.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: tuple[int, int],
        *,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        global_kv: bool = False,
    ):
        super().__init__(
            dim,
            num_heads=num_heads,
            window_size=window_size,
            qkv_bias=qkv_bias,
            attn_drop=attn_drop,
            proj_drop=proj_drop,
        )
        self.global_kv = nn.Linear(dim, 2 * dim, bias=qkv_bias) if global_kv else None

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        global_tokens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x [B·nW, M², C] windows, mask [nW, M², M²] or None, G [B, n_global, C] or None
        (concat only) -> [B·nW, M², C]."""
        b_, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b_, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        bias = self._get_rel_pos_bias()  # [1, h, M², M²]
        if global_tokens is not None:
            k, v, bias, mask = self._concat_global(k, v, bias, mask, global_tokens)
        x = self._attend(q, k, v, bias, mask)
        x = x.transpose(1, 2).reshape(b_, n, -1)
        return self.proj_drop(self.proj(x))

    def _concat_global(
        self,
        k: torch.Tensor,
        v: torch.Tensor,
        bias: torch.Tensor,
        mask: torch.Tensor | None,
        g: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Append G's keys/values to every window of its image; pad bias and mask with zeros.

        k/v [B·nW, h, M², d] -> [B·nW, h, M² + n_g, d]; bias [1, h, M², M²] and mask
        [nW, M², M²] get n_g zero columns; G [B, n_g, C].
        """
        b, n_g, _ = g.shape
        n_win = k.shape[0] // b
        kv_g = self.global_kv(g).reshape(b, 1, n_g, 2, self.num_heads, -1)
        kv_g = kv_g.permute(3, 0, 1, 4, 2, 5)  # [2, B, 1, h, n_g, d]
        # One copy per window is unavoidable here: the concatenated keys are per-window tensors.
        k_g, v_g = kv_g.expand(-1, -1, n_win, -1, -1, -1).flatten(1, 2)  # [B·nW, h, n_g, d] each
        k, v = torch.cat([k, k_g], dim=2), torch.cat([v, v_g], dim=2)
        bias = F.pad(bias, (0, n_g))
        mask = F.pad(mask, (0, n_g)) if mask is not None else None
        return k, v, bias, mask


class GlobalLocalWindowAttention(_StoredAttentionMixin, nn.Module):
    """GLWA: queries = the tokens of the local windows, keys/values = the global window G.

    All windows of an image share one G and G carries no position inside a window, so the
    cross-attention of every window's queries to G is one attention of all H·W tokens of the
    image to G: [B, H·W, C] queries against [B, n_global, C] keys/values, with no per-window copy
    of G and no dependence on the window partition or on the cyclic shift.
    """

    fused_attn = True

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """x [B, L, C] (L = H·W normalised tokens), G [B, n_global, C] -> [B, L, C]."""
        b, length, c = x.shape
        q = self.q(x).view(b, length, self.num_heads, -1).transpose(1, 2)  # [B, h, L, d]
        k, v = self.kv(g).view(b, g.shape[1], 2, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        x = self._attend(q, k, v).transpose(1, 2).reshape(b, length, c)
        return self.proj_drop(self.proj(x))


# ----------------------------------------------------------------------------------------------
# Block and stage
# ----------------------------------------------------------------------------------------------


class GswinBlock(SwinTransformerBlock):
    """Gswin transformer block (Fig. 2b): [B, H, W, C] -> [B, H, W, C].

    timm's ``SwinTransformerBlock`` (its norms, MLP, drop path, window/shift logic and shift mask)
    with the attention replaced by :class:`GswinWindowAttention` and, unless ``global_mode`` is
    "off" or the map is one window and ``skip_single_window``, a GWG block ``gwg``, plus for
    "add" a GLWA ``glwa`` and the per-channel gate ``gamma`` [C].
    """

    def __init__(
        self,
        dim: int,
        input_resolution: tuple[int, int],
        *,
        num_heads: int,
        window_size: int = 7,
        shift_size: int = 0,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        global_mode: Literal["off", "add", "concat"] = "add",
        gwg: Literal["pool", "conv", "multiscale"] = "pool",
        gwg_scales: tuple[int, ...] = (1, 2, 4),
        gamma_init: float = 0.1,
        skip_single_window: bool = True,
        qkv_bias: bool = True,
    ):
        if global_mode not in ("off", "add", "concat"):
            raise ValueError(f"global_mode must be 'off', 'add' or 'concat', got {global_mode!r}")
        super().__init__(
            dim,
            tuple(input_resolution),
            num_heads=num_heads,
            window_size=window_size,
            shift_size=shift_size,
            mlp_ratio=mlp_ratio,
            drop_path=drop_path,
            qkv_bias=qkv_bias,
        )
        # The window (clipped to the map by timm) is global already when it covers the map.
        self.single_window = all(
            r <= w for r, w in zip(self.input_resolution, self.window_size, strict=True)
        )
        self.global_mode = global_mode
        if global_mode != "off" and skip_single_window and self.single_window:
            self.global_mode = "off"
        # timm's WindowAttention, re-made as one that can also take the global tokens (same
        # parameter names; built twice, a construction-time cost only).
        self.attn = GswinWindowAttention(
            dim,
            num_heads,
            self.window_size,
            qkv_bias=qkv_bias,
            global_kv=self.global_mode == "concat",
        )
        self.gwg = self.glwa = self.gamma = None
        if self.global_mode != "off":
            self.gwg = GlobalWindowGeneration(
                dim, self.window_size, self.input_resolution, mode=gwg, scales=gwg_scales
            )
        if self.global_mode == "add":
            self.glwa = GlobalLocalWindowAttention(dim, num_heads, qkv_bias=qkv_bias)
            self.gamma = nn.Parameter(torch.full((dim,), float(gamma_init)))

    def _attn(self, x: torch.Tensor, g: torch.Tensor | None = None) -> torch.Tensor:
        """(S)W-MSA of LN(X) [B, H, W, C] -> [B, H, W, C]; G [B, n, C] joins it for "concat".

        timm's ``SwinTransformerBlock._attn`` with the global tokens passed to the attention.
        """
        b, h, w, c = x.shape
        has_shift = any(self.shift_size)
        if has_shift:
            x = torch.roll(x, shifts=(-self.shift_size[0], -self.shift_size[1]), dims=(1, 2))
        pad_h = (self.window_size[0] - h % self.window_size[0]) % self.window_size[0]
        pad_w = (self.window_size[1] - w % self.window_size[1]) % self.window_size[1]
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        _, hp, wp, _ = x.shape
        windows = window_partition(x, self.window_size).view(-1, self.window_area, c)
        mask = self.get_attn_mask(x) if self.dynamic_mask else self.attn_mask
        windows = self.attn(windows, mask=mask, global_tokens=g)  # [B·nW, M², C]
        windows = windows.view(-1, self.window_size[0], self.window_size[1], c)
        x = window_reverse(windows, self.window_size, hp, wp)[:, :h, :w, :]
        if has_shift:
            x = torch.roll(x, shifts=self.shift_size, dims=(1, 2))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """X [B, H, W, C] -> X'' [B, H, W, C]."""
        b, h, w, c = x.shape
        # One G per image, from the block input in the image frame (not the shifted one), so
        # shifted and unshifted blocks see the same global window.
        g = self.gwg(x) if self.gwg is not None else None
        y = self.norm1(x)
        attn = self._attn(y, g if self.global_mode == "concat" else None)
        if self.glwa is not None:
            # GLWA per token does not depend on the window partition, so it runs on the
            # unshifted map: identical to doing it window by window in the shifted frame.
            glwa = self.glwa(y.reshape(b, h * w, c), g).view(b, h, w, c)
            attn = torch.addcmul(attn, self.gamma, glwa)  # W-MSA + γ ⊙ GLWA
        x = x + self.drop_path1(attn)
        x = x.reshape(b, -1, c)
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x.reshape(b, h, w, c)


class GswinStage(SwinTransformerStage):
    """One stage: timm's patch merging (``downsample``) then Gswin blocks, shifted every second.

    [B, H, W, C_in] -> [B, H/2, W/2, C_out] (no merging in the first stage).
    """

    def __init__(
        self,
        cfg: GswinConfig,
        *,
        dim: int,
        out_dim: int,
        input_resolution: tuple[int, int],
        depth: int,
        downsample: bool,
        num_heads: int,
        drop_path: list[float],
    ):
        # depth=0: timm builds the merging layer only; the blocks are Gswin blocks.
        super().__init__(
            dim,
            out_dim,
            input_resolution,
            depth=0,
            downsample=downsample,
            num_heads=num_heads,
            window_size=cfg.window_size,
        )
        self.depth = depth
        self.blocks = nn.Sequential(
            *[
                GswinBlock(
                    out_dim,
                    self.output_resolution,
                    num_heads=num_heads,
                    window_size=cfg.window_size,
                    shift_size=0 if i % 2 == 0 else cfg.window_size // 2,
                    mlp_ratio=cfg.mlp_ratio,
                    drop_path=drop_path[i],
                    global_mode=cfg.global_mode,
                    gwg=cfg.gwg,
                    gwg_scales=tuple(cfg.gwg_scales),
                    gamma_init=cfg.gamma_init,
                    skip_single_window=cfg.skip_single_window,
                )
                for i in range(depth)
            ]
        )


# ----------------------------------------------------------------------------------------------
# Encoder
# ----------------------------------------------------------------------------------------------


def _check_config(cfg: GswinConfig) -> None:
    n = len(cfg.depths)
    if len(cfg.num_heads) != n:
        raise ValueError(f"depths {cfg.depths} and num_heads {cfg.num_heads} differ in length")
    for i, heads in enumerate(cfg.num_heads):
        if (cfg.embed_dim * 2**i) % heads:
            raise ValueError(f"stage {i} width {cfg.embed_dim * 2**i} not divisible by {heads}")
    if cfg.img_size % cfg.patch_size:
        raise ValueError(f"img_size {cfg.img_size} is not a multiple of patch {cfg.patch_size}")


def _init_linear(module: nn.Module) -> None:
    """timm's Swin init: truncated normal (std 0.02) Linear weights, zero biases."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class GswinTransformer(nn.Module):
    """Gswin image encoder: images [B, 3, H, W] -> last-stage tokens [B, N, C_last].

    Parameter names follow timm's ``SwinTransformer`` (``patch_embed``, ``layers.i.downsample``,
    ``layers.i.blocks.j.{norm1,attn,norm2,mlp}``, ``norm``); the new parameters live under
    ``gwg``, ``glwa``, ``gamma`` and ``attn.global_kv``. No classification head.
    """

    def __init__(self, cfg: GswinConfig):
        super().__init__()
        _check_config(cfg)
        self.cfg = cfg
        n_stages = len(cfg.depths)
        dims = [cfg.embed_dim * 2**i for i in range(n_stages)]
        self.num_features = dims[-1]
        self.patch_embed = PatchEmbed(
            cfg.img_size, cfg.patch_size, 3, dims[0], norm_layer=nn.LayerNorm, output_fmt="NHWC"
        )
        dpr = calculate_drop_path_rates(cfg.drop_path_rate, cfg.depths, stagewise=True)
        resolution = tuple(self.patch_embed.grid_size)
        stages = []
        for i in range(n_stages):
            stage = GswinStage(
                cfg,
                dim=dims[max(i - 1, 0)],
                out_dim=dims[i],
                input_resolution=resolution,
                depth=cfg.depths[i],
                downsample=i > 0,
                num_heads=cfg.num_heads[i],
                drop_path=dpr[i],
            )
            resolution = stage.output_resolution
            stages.append(stage)
        self.layers = nn.Sequential(*stages)
        self.norm = nn.LayerNorm(self.num_features)
        self.apply(_init_linear)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] -> last-stage tokens after the final norm [B, N, C_last]."""
        x = self.layers(self.patch_embed(x))  # [B, h, w, C_last]
        return self.norm(x).flatten(1, 2)

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] -> [B, 1 + N, C_last]: the mean token (the image [CLS], §1.1)
        in front of the last-stage tokens."""
        tokens = self.forward_features(x)
        return torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Same as :meth:`forward_tokens`: [B, 3, H, W] -> [B, 1 + N, C_last]."""
        return self.forward_tokens(x)

    def gswin_blocks(self) -> list[tuple[int, int, GswinBlock]]:
        """(stage index, block index, block) for every Gswin block, in forward order."""
        return [(i, j, blk) for i, st in enumerate(self.layers) for j, blk in enumerate(st.blocks)]

    def forward_with_attention(self, x: torch.Tensor) -> tuple[torch.Tensor, list[dict[str, Any]]]:
        """Tokens [B, 1 + N, C] and, per block, the attention maps of this very forward pass.

        Each dict holds ``stage``, ``block``, ``hw`` (H, W), ``window`` (M_h, M_w), ``shift``,
        ``local`` [B·nW, h, M², M²] (windows in the shifted frame for shifted blocks; for
        "concat" [B·nW, h, M², M² + n_global], the last columns are the global tokens) and
        ``global_local`` [B, h, H·W, n_global] (GLWA, tokens in image order) or None.
        """
        modules = [m for m in self.modules() if isinstance(m, _StoredAttentionMixin)]
        for m in modules:
            m.store_attn = True
        try:
            tokens = self.forward_tokens(x)
            maps = [self._block_maps(i, j, blk) for i, j, blk in self.gswin_blocks()]
        finally:
            for m in modules:
                m.store_attn, m.last_attn = False, None
        return tokens, maps

    @staticmethod
    def _block_maps(stage: int, index: int, blk: GswinBlock) -> dict[str, Any]:
        return dict(
            stage=stage,
            block=index,
            hw=tuple(blk.input_resolution),
            window=tuple(blk.window_size),
            shift=tuple(blk.shift_size),
            local=blk.attn.last_attn,
            global_local=blk.glwa.last_attn if blk.glwa is not None else None,
        )

    def new_keys(self) -> list[str]:
        """State-dict keys that a Swin checkpoint does not have (GWG, GLWA, γ, global K/V)."""
        return [k for k in self.state_dict() if NEW_GSWIN_KEY.search(k)]

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """As timm: the relative position bias tables are not decayed."""
        return {n for n, _ in self.named_parameters() if "relative_position_bias_table" in n}


def build_gswin(cfg: GswinConfig) -> GswinTransformer:
    """Build the encoder with fresh weights (``cfg.pretrained`` is loaded separately, by
    :func:`cmpagl.models.pretrained.load_pretrained`)."""
    return GswinTransformer(cfg)


# Keys of parameters the method adds to Swin (GWG, GLWA, γ, global K/V): never in a Swin checkpoint.
NEW_GSWIN_KEY = re.compile(r"(^|\.)(gwg|glwa|gamma|global_kv)(\.|$)")
# Keys of a timm Swin checkpoint that Gswin does not use: the classifier and rebuilt buffers.
IGNORED_SWIN_KEY = re.compile(r"^head\.|(relative_position_index|attn_mask)$")
