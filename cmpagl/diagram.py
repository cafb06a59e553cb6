"""Figures of the method drawn from the real modules: the whole pipeline, and one Gswin block.

Nothing in these figures is typed by hand. :func:`trace_pipeline` runs a CMPAGL model on a real
batch with forward hooks and records, for every part of the method, its output shape and its
parameter count; :func:`trace_gswin_block` does the same for the steps of one Gswin block and
adds each step's floating-point operations (PyTorch's FLOP counter). :func:`draw_pipeline` and
:func:`draw_gswin_block` lay those records out as box diagrams; only the layout (which box sits
where, which arrow joins which) is fixed here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class Step:
    """One box of a diagram: a part of the model as it ran.

    Attributes:
        key: identifier of the box (the layout refers to it).
        label: what the box shows as its title.
        shape: the part's output shape in the traced forward pass (batch first).
        params: trainable and frozen parameters of the part (0 for inputs and pure reshapes).
        flops: forward FLOPs of the part (matmul-like operations, FlopCounterMode), or None
            where not counted.
    """

    key: str
    label: str
    shape: tuple[int, ...]
    params: int = 0
    flops: int | None = None


def shape_text(shape: Sequence[int], batch: int) -> str:
    """``[B, 32, 32, 48]`` for (2, 32, 32, 48) at batch 2; a first dimension that is a multiple
    of the batch (windows of every image) reads ``B·64``."""
    if not shape:
        return "[]"
    first = shape[0]
    if first == batch:
        lead = "B"
    elif batch > 0 and first % batch == 0:
        lead = f"B·{first // batch}"
    else:
        lead = str(first)
    return "[" + ", ".join([lead, *map(str, shape[1:])]) + "]"


def count_text(n: float) -> str:
    """3,456 -> '3.5 k'; 12,345,678 -> '12.3 M'; 2.1e9 -> '2.1 G'."""
    for scale, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f}"


def _params(module: nn.Module, seen: set[int] | None = None) -> int:
    """Parameters of ``module``; with ``seen``, each tensor counts once (a weight shared
    between parts, like BERT's word embeddings and the MLM decoder, goes to the first)."""
    total = 0
    for p in module.parameters():
        if seen is not None:
            if id(p) in seen:
                continue
            seen.add(id(p))
        total += p.numel()
    return total


@contextlib.contextmanager
def _output_shapes(root: nn.Module, names: Sequence[str]) -> Iterator[dict[str, tuple]]:
    """Records the output shape of each named submodule's first call inside the block."""
    shapes: dict[str, tuple] = {}
    handles = []
    for name in names:

        def hook(_m, _args, out, name=name):
            if name not in shapes:
                first = out[0] if isinstance(out, tuple | list) else out
                shapes[name] = tuple(first.shape)

        handles.append(root.get_submodule(name).register_forward_hook(hook))
    try:
        yield shapes
    finally:
        for h in handles:
            h.remove()


# ---------------------------------------------------------------------------------------------
# The whole method
# ---------------------------------------------------------------------------------------------
def trace_pipeline(model: nn.Module, images: Tensor, captions: Sequence[str]) -> dict[str, Step]:
    """Every part of CMPAGL as it runs on ``images`` [B, 3, S, S] and ``captions`` (B strings).

    Runs :meth:`~cmpagl.models.cmpagl.CMPAGL.encode_image`, ``encode_text``, ``fuse``,
    ``itm_logits`` and ``mlm_logits`` under ``torch.no_grad`` with forward hooks. Keys, in data
    order: ``image``, ``patch_embed``, ``stage1`` … ``stageN``, ``image_tokens``,
    ``image_to_text``, ``v``, ``caption``, ``text_encoder``, ``t``, ``fusion``, ``itm``,
    ``mlm``. The momentum twins and the queue take no part in this forward and are not shown.

    Returns:
        key -> :class:`Step` (output shape with the batch first, parameters of that part; the
        MLM decoder's weight is BERT's word embedding matrix and counts in the text encoder).
    """
    visual = model.visual
    n_stages = len(visual.layers)
    parts = {
        "patch_embed": "visual.patch_embed",
        **{f"stage{i + 1}": f"visual.layers.{i}" for i in range(n_stages)},
        "image_to_text": "image_to_text",
        "v": "vision_proj",
        "text_encoder": "text_encoder",
        "t": "text_proj",
        "fusion": "fusion_encoder",
        "itm": "itm_head",
        "mlm": "mlm_head",
    }
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _output_shapes(model, list(parts.values())) as shapes:
            tok = model.tokenize(list(captions))
            image = model.encode_image(images)
            text = model.encode_text(tok["input_ids"], tok["attention_mask"])
            fused = model.fuse(text.hidden, tok["attention_mask"], image.fusion)
            model.itm_logits(fused)
            model.mlm_logits(fused)
    finally:
        model.train(was_training)
    gcfg, tcfg = visual.cfg, model.cfg.text
    n0 = len(model.text_encoder.layer) + len(model.fusion_encoder.layer)
    split = len(model.text_encoder.layer)
    labels = {
        "patch_embed": f"patch embedding ({gcfg.patch_size}×{gcfg.patch_size} px)",
        **{
            f"stage{i + 1}": f"stage {i + 1}: {d} Gswin block{'s' * (d > 1)}"
            for i, d in enumerate(gcfg.depths)
        },
        "image_to_text": "image tokens → text width",
        "v": "v (ITC embedding)",
        "text_encoder": f"text encoder: BERT layers 1–{split}",
        "t": f"t ({tcfg.pooling} pooled, projected)",
        "fusion": f"fusion encoder: layers {split + 1}–{n0} + cross-attention",
        "itm": "ITM head",
        "mlm": "MLM head",
    }
    steps = {"image": Step("image", "image", tuple(images.shape))}
    seen: set[int] = set()  # shared weights count once, in the first box that uses them
    for key, name in parts.items():
        if key == "image_to_text":
            steps["image_tokens"] = Step(
                "image_tokens",
                "image tokens: LN, mean [CLS] + last stage",
                tuple(image.tokens.shape),
                _params(visual.norm, seen),
            )
        if key == "text_encoder":
            steps["caption"] = Step("caption", "caption tokens", tuple(tok["input_ids"].shape))
        module = model.get_submodule(name)
        steps[key] = Step(key, labels[key], shapes[name], _params(module, seen))
    return steps


BOX_W, BOX_H = 1.65, 1.15  # box size in layout units; one unit is about an inch
LABEL_SIZE = 8.5  # arrow and loss labels (pt)


def _box(ax, xy, step: Step, batch: int, color: str, fontsize: float) -> None:
    import textwrap

    from matplotlib.patches import FancyBboxPatch

    x, y = xy
    ax.add_patch(
        FancyBboxPatch(
            (x - BOX_W / 2, y - BOX_H / 2),
            BOX_W,
            BOX_H,
            boxstyle="round,pad=0.02,rounding_size=0.08",
            facecolor=color,
            edgecolor="0.25",
            linewidth=1.0,
        )
    )
    lines = [shape_text(step.shape, batch)]
    if step.params:
        lines.append(f"{count_text(step.params)} params")
    if step.flops is not None:
        lines.append(f"{count_text(step.flops)}FLOP")
    ax.text(
        x,
        y + BOX_H * 0.24,
        textwrap.fill(step.label, 19),
        ha="center",
        va="center",
        fontsize=fontsize,
        fontweight="bold",
        linespacing=1.1,
    )
    ax.text(
        x,
        y - BOX_H * 0.22,
        "\n".join(lines),
        ha="center",
        va="center",
        fontsize=fontsize * 0.92,
        family="monospace",
        linespacing=1.15,
    )


def _edge(xy: tuple[float, float], toward: tuple[float, float]) -> tuple[float, float]:
    """The point where the segment from box centre ``xy`` toward ``toward`` leaves the box."""
    (x, y), (tx, ty) = xy, toward
    dx, dy = tx - x, ty - y
    if dx == dy == 0:
        return xy
    scale = min(
        (BOX_W / 2) / abs(dx) if dx else float("inf"), (BOX_H / 2) / abs(dy) if dy else float("inf")
    )
    return x + dx * scale, y + dy * scale


def _arrow(
    ax,
    pos,
    a: str,
    b: str,
    text: str = "",
    color: str = "0.3",
    style: str = "-|>",
    rad: float = 0.0,
    text_offset: tuple[float, float] = (0.0, 0.06),
) -> None:
    """An arrow from box ``a`` to box ``b`` (edge to edge), labelled at its middle."""
    start, end = _edge(pos[a], pos[b]), _edge(pos[b], pos[a])
    ax.annotate(
        "",
        xy=end,
        xytext=start,
        arrowprops={
            "arrowstyle": style,
            "color": color,
            "lw": 1.3,
            "connectionstyle": f"arc3,rad={rad}",
            "shrinkA": 1,
            "shrinkB": 1,
        },
    )
    if text:
        ax.text(
            (start[0] + end[0]) / 2 + text_offset[0],
            (start[1] + end[1]) / 2 + text_offset[1],
            text,
            fontsize=LABEL_SIZE,
            color=color,
            ha="center",
            va="bottom",
        )


def _figure(pos: dict[str, tuple[float, float]], margin: float = 0.2):
    import matplotlib.pyplot as plt

    xs, ys = [x for x, _ in pos.values()], [y for _, y in pos.values()]
    x0, x1 = min(xs) - BOX_W / 2 - margin, max(xs) + BOX_W / 2 + margin
    y0, y1 = min(ys) - BOX_H / 2 - margin, max(ys) + BOX_H / 2 + margin
    fig, ax = plt.subplots(figsize=(x1 - x0, y1 - y0))
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)
    ax.set_aspect("equal")
    ax.axis("off")
    fig.subplots_adjust(0, 0, 1, 1)
    return fig, ax


IMAGE_COLOR, TEXT_COLOR, FUSION_COLOR, HEAD_COLOR = "#dbe9f6", "#fde8cf", "#e3f1dc", "#f3dcf0"
GLOBAL_COLOR, LOSS_COLOR = "#fadbd8", "#a93226"


def draw_pipeline(steps: dict[str, Step], batch: int | None = None, fontsize: float = 9.0):
    """The traced pipeline (:func:`trace_pipeline`) as a box diagram; returns the Figure.

    Top row: the image path (patch embedding, each Gswin stage). Below the last stage: the
    image tokens, their [CLS] projected to v, and all of them projected to the text width.
    Second row from the bottom: the text path (caption tokens, the text half of BERT, t).
    Bottom: the fusion encoder, whose text states attend to the image tokens, and the ITM
    and MLM heads. Red labels name the losses: ITC and the triplet loss compare v with t;
    ITM and MLM train the fusion path.
    """
    batch = steps["image"].shape[0] if batch is None else batch
    stages = sorted((k for k in steps if k.startswith("stage")), key=lambda k: int(k[5:]))
    top = ["image", "patch_embed", *stages]
    dx, dy = 1.95, 1.6
    last = (len(top) - 1) * dx
    pos = {k: (i * dx, 3 * dy) for i, k in enumerate(top)}
    pos.update(
        image_tokens=(last, 2 * dy),
        v=(last - 2 * dx, 2 * dy),
        image_to_text=(last, dy),
        caption=(0.0, dy),
        text_encoder=(dx, dy),
        t=(last - 2 * dx, dy),
        fusion=(last - dx, 0.0),
        itm=(last, 0.0),
        mlm=(last - 2 * dx, 0.0),
    )
    colors = dict.fromkeys([*top, "image_tokens", "image_to_text", "v"], IMAGE_COLOR)
    colors.update(caption=TEXT_COLOR, text_encoder=TEXT_COLOR, t=TEXT_COLOR)
    colors.update(fusion=FUSION_COLOR, itm=HEAD_COLOR, mlm=HEAD_COLOR)
    fig, ax = _figure(pos)
    for key, xy in pos.items():
        _box(ax, xy, steps[key], batch, colors[key], fontsize)
    for a, b in zip(top, top[1:], strict=False):
        _arrow(ax, pos, a, b)
    _arrow(ax, pos, top[-1], "image_tokens")
    _arrow(ax, pos, "image_tokens", "v", "[CLS]")
    _arrow(ax, pos, "image_tokens", "image_to_text", "all tokens", text_offset=(0.42, -0.1))
    _arrow(ax, pos, "caption", "text_encoder")
    _arrow(ax, pos, "text_encoder", "t", "pool")
    _arrow(ax, pos, "text_encoder", "fusion", "text states", text_offset=(-0.75, -0.3))
    _arrow(ax, pos, "image_to_text", "fusion", "keys, values", text_offset=(0.45, -0.05))
    _arrow(ax, pos, "fusion", "itm", "[CLS]")
    _arrow(ax, pos, "fusion", "mlm")
    _arrow(ax, pos, "v", "t", style="<|-|>", color=LOSS_COLOR)
    vx, vy = pos["v"]
    ax.text(
        vx + 0.08,
        vy - dy / 2,
        "ITC + triplet\n(cosine of v, t)",
        fontsize=LABEL_SIZE,
        color=LOSS_COLOR,
        ha="left",
        va="center",
    )
    for head, name in (("itm", "ITM loss"), ("mlm", "MLM loss")):
        hx, hy = pos[head]
        ax.text(
            hx,
            hy - BOX_H / 2 - 0.04,
            name,
            fontsize=LABEL_SIZE,
            color=LOSS_COLOR,
            ha="center",
            va="top",
        )
    ax.set_ylim(ax.get_ylim()[0] - 0.25, ax.get_ylim()[1])
    return fig


# ---------------------------------------------------------------------------------------------
# One Gswin block
# ---------------------------------------------------------------------------------------------
def _flops_by_child(block: nn.Module, run: Callable[[], None]) -> dict[str, int]:
    """Forward FLOPs per direct child of ``block`` (and ``total``), explicit attention path."""
    from torch.utils.flop_counter import FlopCounterMode

    attn = [m for m in block.modules() if hasattr(m, "fused_attn")]
    fused = [m.fused_attn for m in attn]
    for m in attn:  # FlopCounterMode does not count the CPU flash-attention kernel
        m.fused_attn = False
    try:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            run()
    finally:
        for m, f in zip(attn, fused, strict=True):
            m.fused_attn = f
    out = {"total": counter.get_total_flops()}
    for name, ops in counter.get_flop_counts().items():
        parts = name.split(".")
        if len(parts) == 2:  # "<BlockClass>.<child>"
            out[parts[1]] = int(sum(ops.values()))
    return out


def trace_gswin_block(block: nn.Module, x: Tensor) -> dict[str, Step]:
    """The steps of one Gswin block (:class:`~cmpagl.models.gswin.GswinBlock`) on ``x``
    [B, H, W, C]: shapes, parameters and forward FLOPs of each.

    Keys: ``x`` (the input), ``gwg`` (the global window G, [B, n_global, C]), ``windows``
    (the local windows W-MSA attends within, [B·nW, M², C]), ``wmsa``, ``glwa`` (local
    queries attending to G, [B, H·W, C]), ``gate`` (X + W-MSA + γ ⊙ GLWA), ``mlp`` and ``out``.
    A block without a global path (``global_mode`` off, or a single-window stage) has no
    ``gwg``/``glwa`` steps; in ``concat`` mode G joins W-MSA's keys instead of a GLWA branch.
    """
    names = [n for n in ("norm1", "attn", "gwg", "glwa", "mlp") if getattr(block, n, None)]
    window_in: dict[str, tuple] = {}

    def windows_of(_m, args) -> None:  # returns None: a pre-hook's return value replaces args
        window_in.setdefault("shape", tuple(args[0].shape))

    pre = block.attn.register_forward_pre_hook(windows_of)
    try:
        with torch.no_grad(), _output_shapes(block, names) as shapes:
            out = block(x)
    finally:
        pre.remove()
    flops = _flops_by_child(block, lambda: block(x))
    m = block.window_size[0]
    shift = block.shift_size[0]
    steps = {"x": Step("x", "block input X", tuple(x.shape))}
    if "gwg" in shapes:
        gwg = block.gwg
        steps["gwg"] = Step(
            "gwg",
            f"GWG ({gwg.mode}): global window G",
            shapes["gwg"],
            _params(gwg),
            flops.get("gwg", 0),
        )
    steps["windows"] = Step(
        "windows",
        f"LN, {'shift by ' + str(shift) + ', ' if shift else ''}{m}×{m} windows",
        window_in["shape"],
        _params(block.norm1),
    )
    wmsa = "W-MSA + G as extra keys" if block.global_mode == "concat" else "W-MSA (local)"
    steps["wmsa"] = Step("wmsa", wmsa, shapes["attn"], _params(block.attn), flops.get("attn", 0))
    if "glwa" in shapes:
        steps["glwa"] = Step(
            "glwa",
            "GLWA: local queries → G",
            shapes["glwa"],
            _params(block.glwa),
            flops.get("glwa", 0),
        )
        gate = Step("gate", "X + W-MSA + γ ⊙ GLWA", tuple(x.shape), block.gamma.numel())
    else:
        gate = Step("gate", "X + W-MSA", tuple(x.shape))
    steps["gate"] = gate
    steps["mlp"] = Step(
        "mlp",
        "LN, MLP, + residual",
        shapes["mlp"],
        _params(block.norm2) + _params(block.mlp),
        flops.get("mlp", 0),
    )
    steps["out"] = Step("out", "block output", tuple(out.shape), flops=flops["total"])
    return steps


def draw_gswin_block(steps: dict[str, Step], fontsize: float = 9.0):
    """One traced Gswin block (:func:`trace_gswin_block`) as a box diagram; returns the Figure.

    The local path runs left to right along the bottom row; the global path (GWG, then GLWA)
    runs above it and joins at the gate. Each box gives its output shape, its parameters and
    its forward FLOPs; the output box gives the block's total FLOPs.
    """
    batch = steps["x"].shape[0]
    dx, dy = 1.95, 1.6
    line = ["x", "windows", "wmsa", "gate", "mlp", "out"]
    pos = {k: (i * dx, 0.0) for i, k in enumerate(line)}
    if "gwg" in steps:
        pos["gwg"] = (0.9 * dx, dy)
        if "glwa" in steps:
            pos["glwa"] = (2.2 * dx, dy)
    fig, ax = _figure(pos)
    for key, xy in pos.items():
        color = GLOBAL_COLOR if key in ("gwg", "glwa") else IMAGE_COLOR
        _box(ax, xy, steps[key], batch, color, fontsize)
    for a, b in zip(line, line[1:], strict=False):
        _arrow(ax, pos, a, b)
    if "gwg" in pos:
        _arrow(ax, pos, "x", "gwg", "X", text_offset=(-0.12, 0.0))
        if "glwa" in pos:
            _arrow(ax, pos, "gwg", "glwa", "keys, values")
            _arrow(ax, pos, "windows", "glwa", "LN(X) queries", text_offset=(0.5, -0.2))
            _arrow(ax, pos, "glwa", "gate", "× γ", text_offset=(0.2, 0.0))
        else:
            _arrow(ax, pos, "gwg", "wmsa", "extra keys", text_offset=(0.35, 0.0))
    return fig
