"""One Gswin block against timm's Swin block of the same shape, measured side by side.

    python benchmarks/gswin_block.py [--dim 96 --heads 3 --res 56 --window 7 --batch 8
                                      --repeats 10 --shift]

Rows: timm's ``SwinTransformerBlock``; the Gswin block with ``global_mode="off"`` (a sanity row:
must match Swin); the Gswin block in its default form (``add`` + GWG ``pool``, the row the
design target ≤ 1.3× Swin's time applies to); and extra rows for the other GWG variants and
``concat``. Columns:

- params: trainable parameters of the block.
- GFLOP f+b: forward + backward, ``torch.utils.flop_counter.FlopCounterMode`` (matmul-like ops
  only). That counter does not see the CPU flash-attention kernel, so FLOPs are counted with the
  attention modules on their explicit softmax path (same FLOPs as the fused one).
- ms f+b: median wall time of forward + backward over ``--repeats`` after ``--warmup`` runs,
  with ``torch.set_num_threads(--threads)``; the rows take turns within each repeat, so other
  load on the machine slows every row alike (the load average is printed before and after).
  The "gswin off" row runs the same computation as Swin, so its time ratio shows the noise;
  on a shared 2-core machine ``--threads 1`` is far steadier than 2 oversubscribed threads.
- peak MiB: peak of live CPU tensor memory (parameters, input, activations, gradients) during
  one forward + backward, from ``torch.profiler``'s memory timeline (allocator-level, not RSS).
- saved MiB: activations saved for backward (distinct storages, parameters excluded), via
  ``torch.autograd.graph.saved_tensors_hooks``: what grows with the batch in training.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from timm.models.swin_transformer import SwinTransformerBlock
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from cmpagl.models.gswin import GswinBlock

VARIANTS = [  # (row name, GswinBlock kwargs); None = timm's Swin block
    ("swin (timm)", None),
    ("gswin off", dict(global_mode="off")),
    ("gswin add/pool", dict(global_mode="add", gwg="pool")),
    ("gswin add/conv", dict(global_mode="add", gwg="conv")),
    ("gswin add/multiscale", dict(global_mode="add", gwg="multiscale")),
    ("gswin concat/pool", dict(global_mode="concat", gwg="pool")),
]


def build_block(args: argparse.Namespace, kwargs: dict | None) -> nn.Module:
    """The block of one row, in training mode, drop path 0 (deterministic work)."""
    common = dict(
        num_heads=args.heads,
        window_size=args.window,
        mlp_ratio=4.0,
        shift_size=args.window // 2 if args.shift else 0,
    )
    res = (args.res, args.res)
    if kwargs is None:
        return SwinTransformerBlock(args.dim, res, **common).train()
    return GswinBlock(args.dim, res, gamma_init=0.1, **common, **kwargs).train()


def step(block: nn.Module, x: torch.Tensor) -> None:
    """One forward + backward of the block: x [B, H, W, C]."""
    block(x).square().mean().backward()


def time_rows_ms(steps: list[Callable[[], None]], warmup: int, repeats: int) -> list[float]:
    """Median ms of each step; the rows take turns within every repeat (in rotating order), so
    load from other processes on the machine slows all rows alike instead of one."""
    for fn, _ in itertools.product(steps, range(warmup)):
        fn()
    times: list[list[float]] = [[] for _ in steps]
    for r in range(repeats):
        for i in [(r + j) % len(steps) for j in range(len(steps))]:
            start = time.perf_counter()
            steps[i]()
            times[i].append(1000 * (time.perf_counter() - start))
    return [statistics.median(t) for t in times]


def gflops(block: nn.Module, x: torch.Tensor) -> float:
    attn = [m for m in block.modules() if hasattr(m, "fused_attn")]
    fused = [m.fused_attn for m in attn]
    for m in attn:  # explicit path: FlopCounterMode does not count CPU flash attention
        m.fused_attn = False
    try:
        with FlopCounterMode(display=False) as counter:
            step(block, x)
    finally:
        for m, f in zip(attn, fused, strict=True):
            m.fused_attn = f
    return counter.get_total_flops() / 1e9


def saved_mib(block: nn.Module, x: torch.Tensor) -> float:
    params = {p.untyped_storage().data_ptr() for p in block.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = block(x)
    out.square().mean().backward()
    return sum(storages.values()) / 2**20


def peak_mib(block: nn.Module, x: torch.Tensor) -> float | None:
    from torch.profiler import ProfilerActivity, profile

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # export_memory_timeline is marked deprecated
            with profile(
                activities=[ProfilerActivity.CPU],
                profile_memory=True,
                record_shapes=True,
                with_stack=True,
            ) as prof:
                step(block, x)
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "timeline.json"
                prof.export_memory_timeline(str(path), device="cpu")
                _, sizes = json.loads(path.read_text())
    except Exception:  # the timeline API is private-ish; a missing number beats a crash
        return None
    return max(sum(row) for row in sizes) / 2**20


def measure_all(args: argparse.Namespace) -> list[dict]:
    """One row per variant: parameters, FLOPs, memory, then the interleaved timing."""
    rows, steps = [], []
    x = torch.randn(args.batch, args.res, args.res, args.dim, requires_grad=True)
    for name, kwargs in VARIANTS:
        torch.manual_seed(0)
        block = build_block(args, kwargs)
        n_params = sum(p.numel() for p in block.parameters() if p.requires_grad)
        rows.append(
            dict(
                name=name,
                params=n_params,
                gflops=gflops(block, x),
                peak=peak_mib(block, x),
                saved=saved_mib(block, x),
            )
        )
        steps.append(functools.partial(step, block, x))
    for row, ms in zip(rows, time_rows_ms(steps, args.warmup, args.repeats), strict=True):
        row["ms"] = ms
    return rows


def print_table(rows: list[dict]) -> None:
    base = rows[0]
    head = f"{'block':22s} {'params':>9s} {'GFLOP f+b':>10s} {'ms f+b':>9s} {'peak MiB':>9s} "
    print(head + f"{'saved MiB':>10s}   ratios vs swin: params flops time peak saved")
    for r in rows:
        peak = f"{r['peak']:9.1f}" if r["peak"] is not None else f"{'n/a':>9s}"
        ratios = [
            r[k] / base[k] if r[k] and base[k] else float("nan")
            for k in ("params", "gflops", "ms", "peak", "saved")
        ]
        print(
            f"{r['name']:22s} {r['params']:9d} {r['gflops']:10.3f} {r['ms']:9.1f} {peak} "
            f"{r['saved']:10.1f}   " + " ".join(f"{v:5.2f}x" for v in ratios)
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dim", type=int, default=96)
    parser.add_argument("--heads", type=int, default=3)
    parser.add_argument("--res", type=int, default=56, help="feature map side H = W")
    parser.add_argument("--window", type=int, default=7)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--shift", action="store_true", help="shifted-window block")
    parser.add_argument("--out", help="write the record here (JSON, results/bench/)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    print(
        f"block: dim {args.dim}, heads {args.heads}, map {args.res}x{args.res}, window "
        f"{args.window}, shift {args.shift}, batch {args.batch}; {args.threads} threads, "
        f"torch {torch.__version__}, median of {args.repeats} interleaved repeats after "
        f"{args.warmup} warm-up; load average before: {os.getloadavg()[0]:.2f}"
    )
    rows = measure_all(args)
    print_table(rows)
    # "gswin off" runs the same computation as timm's block: its time ratio is the noise floor.
    noise = abs(rows[1]["ms"] / rows[0]["ms"] - 1)
    print(
        f"load average after: {os.getloadavg()[0]:.2f}; 'gswin off' vs swin time differs by "
        f"{100 * noise:.0f}%"
        + (" -- contended: rerun on a quiet machine or with --threads 1" if noise > 0.05 else "")
    )
    if args.out:
        from bench_record import write_record

        settings = {k: v for k, v in vars(args).items() if k != "out"}
        write_record(args.out, {"settings": settings, "rows": rows}, load_before=load)


if __name__ == "__main__":
    main()
