"""Forward + backward time of one CMPAGL training step (all four losses) on the CPU.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/model_step.py [--batch 8] [--repeats 5]

Target (issue: the model milestone): the tiny preset, batch 8, under 5 s on 2 CPU cores.
Also prints the time of each loss term's share by switching the others off.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from cmpagl.config import LossConfig, ModelConfig
from cmpagl.models.cmpagl import build_model
from cmpagl.models.pretrained import load_pretrained
from cmpagl.objective import compute_losses


def step_time(model, cfg: LossConfig, batch: int, size: int, repeats: int) -> float:
    images = torch.randn(batch, 3, size, size)
    captions = [f"there are {i % 5 + 1} white planes near the runway" for i in range(batch)]
    ids = torch.arange(batch)
    times = []
    for i in range(repeats + 1):  # the first step warms up allocators and kernels
        t = time.perf_counter()
        model.zero_grad(set_to_none=True)
        loss, _ = compute_losses(model, images, captions, ids, cfg)
        loss.backward()
        if i:
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = ModelConfig()
    model = build_model(cfg)
    load_pretrained(model)  # the weights a training run starts from
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(
        f"{platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"tiny preset ({cfg.gswin.img_size} px), {cfg.text.name}; "
        f"{n_train / 1e6:.1f} M trainable parameters; batch {args.batch}"
    )
    rows = [
        ("all four losses", LossConfig()),
        ("ITC + triplet only", LossConfig(w_itm=0.0, w_mlm=0.0)),
        ("ITC + triplet + ITM", LossConfig(w_mlm=0.0)),
        ("ITC + triplet + MLM", LossConfig(w_itm=0.0)),
    ]
    for name, loss_cfg in rows:
        t = step_time(model, loss_cfg, args.batch, cfg.gswin.img_size, args.repeats)
        print(f"{name:<22} forward+backward {t:6.3f} s  ({args.batch / t:5.1f} samples/s)")


if __name__ == "__main__":
    main()
