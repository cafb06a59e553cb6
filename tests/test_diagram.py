"""The method's figures are traced from the real modules: shapes, parameters and FLOPs."""

from __future__ import annotations

import matplotlib
import pytest
import torch
from test_objective import tiny_model_config

from cmpagl import diagram
from cmpagl.models.cmpagl import build_model
from cmpagl.models.gswin import GswinBlock

matplotlib.use("Agg")

CAPTIONS = ["two planes are parked near the terminal", "a green meadow"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(tiny_model_config())


def test_shape_and_count_text():
    assert diagram.shape_text((2, 32, 32, 48), 2) == "[B, 32, 32, 48]"
    assert diagram.shape_text((128, 16, 48), 2) == "[B·64, 16, 48]"
    assert diagram.shape_text((3, 5), 2) == "[3, 5]"
    assert diagram.count_text(950) == "950"
    assert diagram.count_text(3456) == "3.5 k"
    assert diagram.count_text(12_345_678) == "12.3 M"
    assert diagram.count_text(2.1e9) == "2.1 G"


def test_pipeline_trace_has_every_part_with_its_shape_and_every_parameter(model):
    images = torch.randn(2, 3, 64, 64)
    steps = diagram.trace_pipeline(model, images, CAPTIONS)
    g = model.cfg.gswin
    grid = g.img_size // g.patch_size  # 16 tokens a side after the patch embedding
    assert steps["image"].shape == (2, 3, 64, 64)
    assert steps["patch_embed"].shape == (2, grid, grid, g.embed_dim)
    assert steps["stage1"].shape == (2, grid, grid, g.embed_dim)  # stage 1 does not merge
    assert steps["stage2"].shape == (2, grid // 2, grid // 2, 2 * g.embed_dim)
    assert "stage3" not in steps
    last = (grid // 2) ** 2
    assert steps["image_tokens"].shape == (2, 1 + last, 2 * g.embed_dim)  # [CLS] + last stage
    width = model.text_encoder.config.hidden_size
    assert steps["image_to_text"].shape == (2, 1 + last, width)
    length = steps["caption"].shape[1]
    assert steps["text_encoder"].shape == steps["fusion"].shape == (2, length, width)
    assert steps["v"].shape == steps["t"].shape == (2, model.cfg.embed_dim)
    assert steps["itm"].shape == (2, 2)
    assert steps["mlm"].shape == (2, length, model.tokenizer.vocab_size)
    # every parameter of the forward path sits in exactly one box (the momentum twins and the
    # temperature τ take no part in it); the MLM decoder shares the word embeddings
    twins = ("visual_m", "vision_proj_m", "text_encoder_m", "text_proj_m")
    forward = {
        id(p): p for n, p in model.named_parameters() if not n.startswith(twins) and n != "temp"
    }
    assert sum(s.params for s in steps.values()) == sum(p.numel() for p in forward.values())
    assert model.training  # the trace restores the mode


def test_pipeline_figure_draws_one_box_per_part_with_its_shape(model):
    steps = diagram.trace_pipeline(model.eval(), torch.randn(3, 3, 64, 64), [*CAPTIONS, "x"])
    fig = diagram.draw_pipeline(steps)
    ax = fig.axes[0]
    assert len(ax.patches) == len(steps)
    text = "\n".join(t.get_text() for t in ax.texts)
    for s in steps.values():
        assert diagram.shape_text(s.shape, 3) in text
    assert "ITC + triplet" in text and "ITM loss" in text and "MLM loss" in text
    matplotlib.pyplot.close(fig)


@pytest.mark.parametrize("mode", ["add", "concat", "off"])
def test_gswin_block_trace_shapes_and_flops(mode):
    torch.manual_seed(0)
    dim, res, m = 16, (8, 8), 4
    block = GswinBlock(dim, res, num_heads=2, window_size=m, shift_size=2, global_mode=mode)
    x = torch.randn(3, *res, dim)
    steps = diagram.trace_gswin_block(block.eval(), x)
    n_windows = (res[0] // m) * (res[1] // m)
    assert steps["windows"].shape == (3 * n_windows, m * m, dim)
    assert steps["wmsa"].shape == (3 * n_windows, m * m, dim)
    assert steps["out"].shape == steps["x"].shape == (3, *res, dim)
    assert ("gwg" in steps) == (mode != "off")
    assert ("glwa" in steps) == (mode == "add")
    if mode != "off":
        assert steps["gwg"].shape == (3, m * m, dim)  # pool: one M x M global window
    if mode == "add":
        assert steps["glwa"].shape == (3, res[0] * res[1], dim)
        assert steps["gate"].params == dim  # γ, one per channel
    # the MLP's FLOPs by hand: two linears of dim x 4·dim on every token, 2 FLOPs a multiply-add
    tokens = 3 * res[0] * res[1]
    assert steps["mlp"].flops == 2 * 2 * tokens * dim * 4 * dim
    parts = sum(s.flops or 0 for k, s in steps.items() if k != "out")
    assert 0 < parts <= steps["out"].flops
    assert sum(s.params for s in steps.values()) == sum(p.numel() for p in block.parameters())
    fig = diagram.draw_gswin_block(steps)
    assert len(fig.axes[0].patches) == len(steps)
    matplotlib.pyplot.close(fig)
