"""The Gswin image encoder (cmpagl.models.gswin, .gwg): equivalence with timm's Swin where the
method says so (global_mode "off", and "add" with γ = 0), gradients, shapes, the effect of the
global window, weight loading (cmpagl.models.pretrained) and attention maps. Small models, CPU, a
few seconds each."""

from __future__ import annotations

import time

import pytest
import timm
import torch
from hub_cache import write_hub_cache  # tests/ is on sys.path under pytest
from timm.models.swin_transformer import SwinTransformer

from cmpagl.config import GswinConfig, load_config
from cmpagl.models.gswin import (
    GSWIN_PRESETS,
    GswinBlock,
    GswinTransformer,
    build_gswin,
    gswin_config,
)
from cmpagl.models.gwg import GlobalWindowGeneration
from cmpagl.models.pretrained import SwinWeightsUnavailable, load_pretrained_swin

# img 64 / patch 4 = 16 tokens a side: stages of 16, 8 and 4 (the last one a single window).
SMALL = dict(img_size=64, embed_dim=24, depths=(2, 2), num_heads=(2, 4), window_size=4)
SMALL3 = dict(img_size=64, embed_dim=16, depths=(2, 2, 2), num_heads=(2, 2, 4), window_size=4)
GLOBAL_MODES = ("off", "add", "concat")


def small_cfg(**overrides) -> GswinConfig:
    return gswin_config("tiny", **{**SMALL, **overrides})


def timm_swin(cfg: GswinConfig, seed: int = 0) -> SwinTransformer:
    """A randomly initialised timm Swin with cfg's shape (and its 1000-class head)."""
    torch.manual_seed(seed)
    return SwinTransformer(
        img_size=cfg.img_size,
        patch_size=cfg.patch_size,
        embed_dim=cfg.embed_dim,
        depths=cfg.depths,
        num_heads=cfg.num_heads,
        window_size=cfg.window_size,
        mlp_ratio=cfg.mlp_ratio,
    ).eval()


def images(cfg: GswinConfig, batch: int = 2, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, cfg.img_size, cfg.img_size, generator=g)


# ----------------------------------------------------------------------------------------------
# Presets and config
# ----------------------------------------------------------------------------------------------


def test_tiny_preset_is_the_config_default():
    assert gswin_config("tiny") == GswinConfig()
    assert set(GSWIN_PRESETS) == {"tiny", "swin_t"}


def timm_shape(name: str) -> dict:
    """The shape of timm model ``name`` as GswinConfig fields, read from timm itself (the source
    of the weights), built on the meta device: no memory, no download."""
    with torch.device("meta"):
        swin = timm.create_model(name, pretrained=False)
    return dict(
        img_size=swin.patch_embed.img_size[0],
        patch_size=swin.patch_embed.patch_size[0],
        embed_dim=swin.embed_dim,
        depths=tuple(len(stage.blocks) for stage in swin.layers),
        num_heads=tuple(stage.blocks[0].attn.num_heads for stage in swin.layers),
        window_size=swin.layers[0].blocks[0].window_size[0],
        mlp_ratio=swin.layers[0].blocks[0].mlp.fc1.out_features / swin.embed_dim,
    )


def shape_of(cfg: GswinConfig) -> dict:
    return {k: getattr(cfg, k) for k in timm_shape("swin_tiny_patch4_window7_224")}


def test_swin_t_preset_has_the_shape_of_its_weights():
    cfg = gswin_config("swin_t")
    assert shape_of(cfg) == timm_shape(cfg.pretrained)
    assert cfg.gamma_init == 0.0  # starts as exactly that Swin


@pytest.mark.parametrize("dataset", ["base", "rsicd", "rsitmd", "ucm", "sydney"])
def test_paper_recipe_is_the_one_source_of_the_swin_b_encoder(repo_root, dataset):
    """configs/paper_base.yaml alone holds the paper-scale Gswin (there is no swin_b preset to
    disagree with it, e.g. on drop_path_rate); its shape is that of the weights it names."""
    gswin = load_config(repo_root / "configs" / f"paper_{dataset}.yaml").model.gswin
    assert gswin.pretrained == "swin_base_patch4_window7_224"
    assert shape_of(gswin) == timm_shape(gswin.pretrained)
    assert (gswin.drop_path_rate, gswin.gamma_init, gswin.global_mode) == (0.3, 0.0, "add")
    assert "swin_b" not in GSWIN_PRESETS


def test_presets_and_overrides():
    cfg = gswin_config("swin_t", pretrained=None, global_mode="concat")
    assert (cfg.embed_dim, cfg.depths, cfg.num_heads, cfg.window_size) == (
        96,
        (2, 2, 6, 2),
        (3, 6, 12, 24),
        7,
    )
    assert cfg.global_mode == "concat" and cfg.pretrained is None
    with pytest.raises(ValueError, match="unknown Gswin preset 'swin_b'"):
        gswin_config("swin_b")
    with pytest.raises(ValueError, match="unknown Gswin preset 'swin_x'"):
        gswin_config("swin_x")
    with pytest.raises(TypeError):
        gswin_config("tiny", not_a_field=1)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(num_heads=(2,)), "differ in length"),
        (dict(num_heads=(5, 4)), "not divisible by 5"),
        (dict(img_size=66), "not a multiple of patch"),
        (dict(global_mode="sum"), "global_mode must be"),
        (dict(gwg="max"), "gwg must be"),
    ],
)
def test_bad_config_is_rejected_with_a_message(overrides, message):
    with pytest.raises(ValueError, match=message):
        GswinTransformer(small_cfg(**overrides))


# ----------------------------------------------------------------------------------------------
# Equivalence with timm's Swin
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [SMALL, GSWIN_PRESETS["tiny"]], ids=["small", "tiny"])
@pytest.mark.parametrize("global_mode", ["off", "add"])
def test_equals_timm_swin_when_global_window_is_off_or_gated_to_zero(shape, global_mode):
    cfg = gswin_config("tiny", **shape, global_mode=global_mode, gamma_init=0.0)
    ref = timm_swin(cfg)
    model = GswinTransformer(cfg).eval()
    report = load_pretrained_swin(model, state_dict=ref.state_dict())
    x = images(cfg)
    with torch.no_grad():
        expected = ref.forward_features(x).flatten(1, 2)  # [B, h, w, C] -> [B, N, C]
        got = model.forward_features(x)
    assert got.shape == expected.shape
    assert (got - expected).abs().max() < 1e-5
    assert report.ignored == ["head.fc.weight", "head.fc.bias"]
    assert set(report.copied) == set(ref.state_dict()) - set(report.ignored)
    assert (report.new == []) == (global_mode == "off")


# ----------------------------------------------------------------------------------------------
# Gradients and shapes
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "global_mode, gwg",
    [("off", "pool")] + [(m, g) for m in ("add", "concat") for g in ("pool", "conv", "multiscale")],
)
def test_every_parameter_gets_a_finite_gradient(global_mode, gwg):
    torch.manual_seed(0)
    cfg = gswin_config(
        "tiny",
        **SMALL3,
        global_mode=global_mode,
        gwg=gwg,
        gamma_init=0.5,
        drop_path_rate=0.0,
        skip_single_window=False,
    )
    model = GswinTransformer(cfg).train()
    tokens = model.forward_tokens(images(cfg))
    assert torch.isfinite(tokens).all()
    tokens.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_forward_tokens_shape_tiny_preset():
    cfg = gswin_config("tiny")
    model = build_gswin(cfg).eval()
    with torch.no_grad():
        tokens = model.forward_tokens(images(cfg, batch=1))
    # 128 / 4 = 32 tokens a side, three mergings: 4 x 4 last-stage tokens of 48 * 8 channels.
    assert model.num_features == 384
    assert tokens.shape == (1, 1 + 16, 384)
    assert torch.allclose(tokens[:, 0], tokens[:, 1:].mean(dim=1), atol=1e-6)


def test_forward_tokens_shape_swin_t_preset():
    cfg = gswin_config("swin_t", pretrained=None, depths=(1, 1, 1, 1))  # widths decide shapes
    model = build_gswin(cfg).eval()
    with torch.no_grad():
        tokens = model.forward_tokens(images(cfg, batch=1))
    assert model.num_features == 768
    assert tokens.shape == (1, 1 + 7 * 7, 768)
    # 56, 28, 14 and 7 tokens a side with window 7: only the last stage is a single window.
    has_glwa = [all(b.glwa is not None for b in stage.blocks) for stage in model.layers]
    assert has_glwa == [True, True, True, False]


# ----------------------------------------------------------------------------------------------
# What the global window does
# ----------------------------------------------------------------------------------------------


def test_gamma_gates_the_global_window():
    cfg = small_cfg(global_mode="add", gamma_init=0.5)
    model = GswinTransformer(cfg).eval()
    x = images(cfg)
    with torch.no_grad():
        gated = model.forward_features(x)
        for _, _, block in model.gswin_blocks():
            block.gamma.zero_()
        closed = model.forward_features(x)
    assert (gated - closed).abs().max() > 1e-3


def test_concat_differs_from_off_with_the_same_local_weights():
    cfg = small_cfg(global_mode="off")
    off = GswinTransformer(cfg).eval()
    concat = GswinTransformer(small_cfg(global_mode="concat")).eval()
    load_pretrained_swin(concat, state_dict=off.state_dict())
    x = images(cfg)
    with torch.no_grad():
        assert (off.forward_features(x) - concat.forward_features(x)).abs().max() > 1e-3


@pytest.mark.parametrize("global_mode", ["add", "concat"])
def test_glwa_is_skipped_where_the_map_is_one_window(global_mode):
    skipped = GswinTransformer(gswin_config("tiny", global_mode=global_mode))
    kept = GswinTransformer(gswin_config("tiny", global_mode=global_mode, skip_single_window=False))
    last = len(skipped.layers) - 1  # 4 x 4 tokens, window 4
    for name in skipped.new_keys():
        assert not name.startswith(f"layers.{last}."), name
    assert any(k.startswith(f"layers.{last}.") for k in kept.new_keys())
    for block in skipped.layers[last].blocks:
        assert block.single_window and block.global_mode == "off" and block.gwg is None
    for block in skipped.layers[last - 1].blocks:  # 8 x 8 tokens: four windows
        assert not block.single_window and block.gwg is not None


def _window_output_change(global_mode: str, shift: int) -> float:
    """Max change of window (0, 0)'s output when only the far window (1, 1) is perturbed."""
    torch.manual_seed(0)
    block = GswinBlock(
        16,
        (8, 8),
        num_heads=2,
        window_size=4,
        shift_size=shift,
        global_mode=global_mode,
        gamma_init=0.5,
    ).eval()
    x = torch.randn(1, 8, 8, 16)
    far = x.clone()
    far[:, 4:, 4:] += torch.randn(1, 4, 4, 16)
    with torch.no_grad():
        return (block(x)[:, :4, :4] - block(far)[:, :4, :4]).abs().max().item()


def test_global_window_carries_information_across_windows():
    assert _window_output_change("off", shift=0) == 0.0  # W-MSA alone is local
    assert _window_output_change("off", shift=2) > 1e-4  # the shifted window straddles both
    assert _window_output_change("add", shift=0) > 1e-4
    assert _window_output_change("concat", shift=0) > 1e-4


@pytest.mark.parametrize("global_mode", GLOBAL_MODES)
def test_images_of_a_batch_do_not_mix(global_mode):
    """Each image has its own global window: image 0's tokens do not depend on image 1."""
    cfg = small_cfg(global_mode=global_mode)
    model = GswinTransformer(cfg).eval()
    x = images(cfg, batch=2)
    with torch.no_grad():
        assert torch.allclose(model.forward_tokens(x)[:1], model.forward_tokens(x[:1]), atol=1e-5)


@pytest.mark.parametrize("fused", [False, True], ids=["explicit", "fused"])
def test_concat_attention_matches_a_per_window_reference(fused):
    """One softmax over [local keys (+ relative bias + shift mask), global keys], window by
    window, written out naively."""
    torch.manual_seed(0)
    block = GswinBlock(16, (8, 8), num_heads=2, window_size=4, shift_size=2, global_mode="concat")
    attn, mask = block.attn.eval(), block.attn_mask  # mask: [nW = 4, 16, 16]
    attn.fused_attn = fused
    n_img, n_win, n, c, heads, n_g = 2, 4, 16, 16, 2, 5
    windows, g = torch.randn(n_img * n_win, n, c), torch.randn(n_img, n_g, c)
    with torch.no_grad():
        out = attn(windows, mask=mask, global_tokens=g)
        bias = attn._get_rel_pos_bias()[0]  # [h, N, N]
        for i in range(n_img * n_win):
            b, w = divmod(i, n_win)  # windows are ordered image-major
            q, k, v = attn.qkv(windows[i]).view(n, 3, heads, -1).permute(1, 2, 0, 3)
            k_g, v_g = attn.global_kv(g[b]).view(n_g, 2, heads, -1).permute(1, 2, 0, 3)
            local = q @ k.transpose(-1, -2) * attn.scale + bias + mask[w]
            logits = torch.cat([local, q @ k_g.transpose(-1, -2) * attn.scale], dim=-1)
            o = logits.softmax(-1) @ torch.cat([v, v_g], dim=1)  # [h, N, d]
            expected = attn.proj(o.transpose(0, 1).reshape(n, c))
            assert torch.allclose(out[i], expected, atol=1e-5), i


def test_glwa_on_the_image_equals_glwa_per_shifted_window():
    """The block runs GLWA once on all H·W tokens; the method's wording is per local window in
    the shifted frame. Same result, because every window attends to the same G."""
    from timm.models.swin_transformer import window_partition, window_reverse

    torch.manual_seed(0)
    block = GswinBlock(16, (8, 8), num_heads=2, window_size=4, shift_size=2).eval()
    x = torch.randn(2, 8, 8, 16)
    with torch.no_grad():
        g, y = block.gwg(x), block.norm1(x)
        ours = block.glwa(y.reshape(2, 64, 16), g).view(2, 8, 8, 16)
        windows = window_partition(torch.roll(y, (-2, -2), (1, 2)), (4, 4)).view(2, 4, 16, 16)
        per_window = torch.stack(
            [
                torch.stack([block.glwa(windows[b, w : w + 1], g[b : b + 1])[0] for w in range(4)])
                for b in range(2)
            ]
        )  # [B, nW, M², C]
        ref = window_reverse(per_window.view(-1, 4, 4, 16), (4, 4), 8, 8)
        assert torch.allclose(ours, torch.roll(ref, (2, 2), (1, 2)), atol=1e-5)


def test_fused_local_attention_equals_timm_swin():
    cfg = small_cfg(global_mode="off")
    ref, model = timm_swin(cfg), GswinTransformer(cfg).eval()
    load_pretrained_swin(model, state_dict=ref.state_dict())
    for _, _, block in model.gswin_blocks():
        block.attn.fused_attn = True  # the scaled_dot_product_attention path, expanded mask
    x = images(cfg)
    with torch.no_grad():
        diff = ref.forward_features(x).flatten(1, 2) - model.forward_features(x)
    assert diff.abs().max() < 1e-5


# ----------------------------------------------------------------------------------------------
# GWG variants
# ----------------------------------------------------------------------------------------------


def test_gwg_variants_token_counts_and_conv_starts_as_pool():
    x = torch.randn(2, 8, 8, 16)
    pool = GlobalWindowGeneration(16, (4, 4), (8, 8), mode="pool")
    conv = GlobalWindowGeneration(16, (4, 4), (8, 8), mode="conv")
    multi = GlobalWindowGeneration(16, (4, 4), (8, 8), mode="multiscale", scales=(1, 2, 4))
    conv.proj.load_state_dict(pool.proj.state_dict())
    assert pool(x).shape == conv(x).shape == (2, 16, 16)
    assert multi(x).shape == (2, 1 + 4 + 16, 16)
    assert torch.allclose(pool(x), conv(x), atol=1e-6)
    # The pooled tokens are the means of 2 x 2 cells: check one against a hand computation.
    pooled = torch.nn.functional.layer_norm(pool.proj(x[:, :2, :2].mean(dim=(1, 2))), (16,))
    assert torch.allclose(pool(x)[:, 0], pooled, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Loading Swin weights
# ----------------------------------------------------------------------------------------------


def test_load_reports_copied_new_and_ignored_keys():
    cfg = small_cfg(global_mode="add")
    model = GswinTransformer(cfg)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    ref = timm_swin(cfg)
    report = load_pretrained_swin(model, state_dict=ref.state_dict())
    assert report.source == "state_dict" and report.resized == []
    assert report.new == sorted(model.new_keys()) and len(report.new) > 0
    assert all(any(s in k for s in ("gwg", "glwa", "gamma")) for k in report.new)
    own = model.state_dict()
    for key in report.copied:
        assert torch.equal(own[key], ref.state_dict()[key]), key
    for key in report.new:
        assert torch.equal(own[key], fresh[key]), key  # new parameters keep their fresh init


def test_load_raises_naming_every_mismatch():
    cfg = small_cfg()
    state = timm_swin(cfg).state_dict()
    state["layers.0.blocks.1.mlp.fc1.weight"] = torch.zeros(3, 3)
    state["layers.9.blocks.0.norm1.weight"] = torch.zeros(3)
    del state["norm.bias"]
    with pytest.raises(ValueError) as err:
        load_pretrained_swin(GswinTransformer(cfg), state_dict=state)
    message = str(err.value)
    assert "3 mismatches" in message
    assert "layers.0.blocks.1.mlp.fc1.weight: checkpoint (3, 3) vs model (96, 24)" in message
    assert "layers.9.blocks.0.norm1.weight: not in the Gswin model" in message
    assert "norm.bias: missing from the checkpoint" in message


@pytest.mark.filterwarnings(
    "ignore::UserWarning"
)  # timm's interpolation warns about torch internals
def test_load_resizes_relative_position_bias_of_another_window():
    state = timm_swin(small_cfg(window_size=2)).state_dict()  # tables of 3 x 3 offsets
    model = GswinTransformer(small_cfg())  # window 4: 7 x 7 offsets
    report = load_pretrained_swin(model, state_dict=state)
    assert len(report.resized) == 4 and all("bias_table" in k for k in report.resized)


def test_load_needs_exactly_one_source():
    model = GswinTransformer(small_cfg())
    with pytest.raises(ValueError, match="exactly one"):
        load_pretrained_swin(model)
    with pytest.raises(SwinWeightsUnavailable, match="swin_nonexistent_patch4 is not a timm model"):
        load_pretrained_swin(model, "swin_nonexistent_patch4")


def test_offline_fetch_without_cached_weights_stops_with_one_line(monkeypatch, tmp_path):
    """No silent from-scratch Swin: the error names what was tried and both ways out."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))  # empty cache
    model = GswinTransformer(small_cfg())
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    start = time.perf_counter()
    with pytest.raises(SwinWeightsUnavailable) as err:
        load_pretrained_swin(model, "swin_tiny_patch4_window7_224")
    assert time.perf_counter() - start < 5.0
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(
        "cannot load the ImageNet weights of model.gswin.pretrained=swin_tiny_patch4_window7_224: "
        "tried the local Hugging Face cache (HF_HUB_OFFLINE=1) [FileNotFoundError: "
    )
    assert "HF_HUB_OFFLINE=0" in message and "--set model.gswin.pretrained=null" in message
    assert all(torch.equal(v, fresh[k]) for k, v in model.state_dict().items())


# ----------------------------------------------------------------------------------------------
# Attention maps
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("global_mode", GLOBAL_MODES)
def test_attention_maps_shapes_rows_and_same_forward(global_mode):
    cfg = gswin_config("tiny", **SMALL3, global_mode=global_mode)
    model = GswinTransformer(cfg).eval()
    x = images(cfg)
    with torch.no_grad():
        tokens, maps = model.forward_with_attention(x)
        plain = model.forward_tokens(x)
    assert torch.allclose(tokens, plain, atol=1e-5)  # the explicit softmax path, same result
    assert len(maps) == sum(cfg.depths)
    for m in maps:
        (h, w), (mh, mw) = m["hw"], m["window"]
        heads = cfg.num_heads[m["stage"]]
        n_win = 2 * (h // mh) * (w // mw)
        glwa = global_mode == "add" and (h, w) != (mh, mw)
        n_global = mh * mw if global_mode != "off" and (h, w) != (mh, mw) else 0
        extra = n_global if global_mode == "concat" else 0
        assert m["local"].shape == (n_win, heads, mh * mw, mh * mw + extra)
        assert torch.allclose(m["local"].sum(-1), torch.ones(()), atol=1e-5)
        if glwa:
            assert m["global_local"].shape == (2, heads, h * w, n_global)
            assert torch.allclose(m["global_local"].sum(-1), torch.ones(()), atol=1e-5)
        else:
            assert m["global_local"] is None
    assert maps[-1]["hw"] == (4, 4) and maps[1]["shift"] == (2, 2)
    # The flags are cleared: nothing is kept after the call.
    assert all(
        not blk.attn.store_attn and blk.attn.last_attn is None for _, _, blk in model.gswin_blocks()
    )


def test_offline_fetch_loads_weights_from_the_local_hub_cache(monkeypatch, tmp_path):
    """The offline path finds timm's Hugging Face file in the cache (faked here) and loads it."""
    name, repo = "swin_tiny_patch4_window7_224", "timm/swin_tiny_patch4_window7_224.ms_in1k"
    cfg = gswin_config("swin_t")  # the shape of the named timm model
    ref = timm_swin(cfg, seed=3)
    write_hub_cache(tmp_path, monkeypatch, repo, ref.state_dict())
    model = GswinTransformer(cfg)
    report = load_pretrained_swin(model, name)
    assert report.source == name and len(report.copied) == len(ref.state_dict()) - 2
    key = "layers.2.blocks.5.attn.qkv.weight"
    assert torch.equal(model.state_dict()[key], ref.state_dict()[key])
