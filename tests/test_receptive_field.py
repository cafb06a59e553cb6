"""cmpagl.receptive_field: the gradient of one token with respect to the image, on small random
encoders (CPU, a second or two each)."""

from __future__ import annotations

import pytest
import torch
from timm.models.swin_transformer import SwinTransformer

from cmpagl.models.gswin import NEW_GSWIN_KEY, GswinTransformer, gswin_config
from cmpagl.receptive_field import (
    ReceptiveField,
    block_geometry,
    forward_to_block,
    global_branch_norms,
    global_window_off,
    measure_receptive_field,
)

# 64 px, patch 4: a 16 x 16 map with 4 x 4 windows in stage 0, 8 x 8 in stage 1.
SMALL = dict(img_size=64, embed_dim=16, depths=(2, 2), num_heads=(2, 2), window_size=4)


def encoder(global_mode: str = "add") -> GswinTransformer:
    """A random encoder; γ = 0.5 so that the global path is not negligible."""
    torch.manual_seed(0)
    cfg = gswin_config("tiny", **SMALL, global_mode=global_mode, gamma_init=0.5)
    return GswinTransformer(cfg).eval()


def images(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def test_forward_to_block_of_every_block_is_the_encoder_before_its_norm():
    enc, x = encoder(), images()
    with torch.no_grad():
        assert torch.allclose(
            enc.norm(forward_to_block(enc, x, 4)).flatten(1, 2), enc.forward_features(x), atol=1e-6
        )
        assert forward_to_block(enc, x, 2).shape == (2, 16, 16, 16)  # stage 0
        assert forward_to_block(enc, x, 3).shape == (2, 8, 8, 32)  # after the merging
    with pytest.raises(ValueError, match="between 1 and 4"):
        forward_to_block(enc, x, 5)


def test_block_geometry_and_the_default_token():
    enc = encoder()
    assert block_geometry(enc, 1) == ((16, 16), 4, 4)
    assert block_geometry(enc, 4) == ((8, 8), 8, 4)
    # the window holding the centre token (8, 8) starts at 8; offset (4 - 1) // 2 = 1 inside it
    rf = measure_receptive_field(enc, images(1), n_blocks=1)
    assert (rf.row, rf.col, rf.window) == (9, 9, (32, 32, 48, 48))
    assert rf.centre == (38.0, 38.0)


@pytest.mark.parametrize("row, col", [(5, 6), (0, 15), (12, 3)])
def test_window_attention_block_is_blind_outside_the_window(row, col):
    """Global path off, first block (unshifted W-MSA): the token's gradient is exactly zero
    outside its 16 x 16 px window and non-zero inside it."""
    rf = measure_receptive_field(encoder("off"), images(), n_blocks=1, row=row, col=col)
    top, left, bottom, right = rf.window
    assert (bottom - top, right - left) == (16, 16) and (top, left) == (
        row // 4 * 16,
        col // 4 * 16,
    )
    outside = rf.maps.clone()
    outside[:, top:bottom, left:right] = 0
    assert outside.abs().max() == 0.0
    assert (rf.maps[:, top:bottom, left:right] > 0).float().mean() > 0.9
    assert torch.equal(rf.outside_window(), torch.zeros(2))


def test_shifted_block_reaches_only_the_neighbouring_windows():
    """Global path off, two blocks (W-MSA, then SW-MSA shifted by 2 tokens): token (5, 6)'s
    shifted window holds tokens rows 2-5, columns 6-9; after the first block those see their
    own windows, rows 0-7 and columns 4-11 (pixels 0-31 and 16-47). Nothing beyond."""
    rf = measure_receptive_field(encoder("off"), images(), n_blocks=2, row=5, col=6)
    reach = torch.zeros(64, 64, dtype=torch.bool)
    reach[0:32, 16:48] = True
    assert rf.maps[:, ~reach].abs().max() == 0.0
    assert (rf.maps[:, reach] > 0).float().mean() > 0.9
    assert 0 < rf.outside_window().min()


@pytest.mark.parametrize("global_mode", ["add", "concat"])
def test_global_window_reaches_the_whole_image_in_one_block(global_mode):
    rf = measure_receptive_field(encoder(global_mode), images(), n_blocks=1, row=5, col=6)
    assert (rf.maps > 0).all()
    assert (rf.outside_window() > 0.01).all()


@pytest.mark.parametrize("global_mode", ["add", "concat"])
def test_global_window_off_is_the_swin_with_the_same_weights(global_mode):
    enc, x = encoder(global_mode), images()
    swin = SwinTransformer(
        img_size=64, embed_dim=16, depths=(2, 2), num_heads=(2, 2), window_size=4, num_classes=0
    ).eval()
    local = {k: v for k, v in enc.state_dict().items() if not NEW_GSWIN_KEY.search(k)}
    swin.load_state_dict(local, strict=True)
    with torch.no_grad():
        ref = swin.forward_features(x).flatten(1, 2)
        on = enc.forward_features(x)
        with global_window_off(enc):
            off = enc.forward_features(x)
        again = enc.forward_features(x)
    assert (off - ref).abs().max() < 1e-5
    assert (on - ref).abs().max() > 1e-3
    assert torch.equal(on, again)  # the global path is back after the with
    assert all(blk.gwg is not None for _, _, blk in enc.gswin_blocks())


def test_global_window_off_restores_the_blocks_after_an_error():
    enc = encoder("add")
    with pytest.raises(RuntimeError), global_window_off(enc):
        raise RuntimeError
    assert all(
        blk.glwa is not None and blk.global_mode == "add" for _, _, blk in enc.gswin_blocks()
    )


def test_measure_rejects_training_mode_and_a_token_off_the_map():
    enc = encoder()
    with pytest.raises(ValueError, match="off the 8x8 map"):
        measure_receptive_field(enc, images(1), n_blocks=3, row=8, col=0)
    with pytest.raises(ValueError, match="eval mode"):
        measure_receptive_field(enc.train(), images(1), n_blocks=1)


def test_summaries_against_hand_built_maps():
    """A point mass on the token, and a uniform map: the two ends of the scale."""
    point = torch.zeros(1, 64, 64)
    point[0, 21, 26] = 1.0  # a pixel of token (5, 6) at 4 px per token
    uniform = torch.ones(1, 64, 64)
    window = (16, 16, 32, 32)
    rf_point = ReceptiveField(point, 1, 5, 6, 4, window)
    rf_uniform = ReceptiveField(uniform, 1, 5, 6, 4, window)
    assert rf_point.outside_window().item() == 0.0
    assert rf_uniform.outside_window().item() == pytest.approx(1 - 16 * 16 / 64**2)
    # the token's centre is (22, 26) px; pixel (21, 26) has its centre at (21.5, 26.5)
    assert rf_point.radius(0.9).item() == pytest.approx(2**0.5 / 2)
    # a uniform map: 90 % of the pixels lie within the radius, 10 % beyond (naive count)
    r = rf_uniform.radius(0.9).item()
    axis = torch.arange(64, dtype=torch.float64) + 0.5
    ys, xs = torch.meshgrid(axis, axis, indexing="ij")
    dist = ((ys - 22) ** 2 + (xs - 26) ** 2).sqrt()
    assert (dist <= r).float().mean() >= 0.9 > (dist < r).float().mean()
    with pytest.raises(ValueError, match="q must be"):
        rf_point.radius(0.0)


def test_global_branch_norms_against_the_block_computed_by_hand():
    enc, x = encoder("add"), images()
    rows = global_branch_norms(enc, x)
    assert [(r["stage"], r["block"]) for r in rows] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    blk = enc.layers[0].blocks[0]
    with torch.no_grad():
        x0 = enc.patch_embed(x)  # the first block's input X [B, 16, 16, C]
        y = blk.norm1(x0)
        local = blk._attn(y).norm(dim=-1).mean()
        glwa = blk.glwa(y.flatten(1, 2), blk.gwg(x0)) * blk.gamma
    assert rows[0]["local"] == pytest.approx(local.item(), rel=1e-5)
    assert rows[0]["global"] == pytest.approx(glwa.norm(dim=-1).mean().item(), rel=1e-5)
    assert rows[0]["ratio"] == pytest.approx(rows[0]["global"] / rows[0]["local"])
    with torch.no_grad():
        for _, _, b in enc.gswin_blocks():
            b.gamma.zero_()
    assert all(r["global"] == 0.0 for r in global_branch_norms(enc, x))
    assert global_branch_norms(encoder("concat"), x) == []  # no GLWA branch to measure
