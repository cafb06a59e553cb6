"""Training throughput of a config on this machine: steady-state samples/s of the optimizer
steps, the median step time, peak GPU memory and the engine's own samples/s.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/train_throughput.py \
        --config configs/synthetic_tiny.yaml --steps 40 --out runs/throughput_tiny.json

Measured on an H200 for the paper-scale shapes: results/gpu_throughput_h200/.

It trains ``--steps`` optimizer steps (``train.max_steps``) into a temporary folder that is
deleted afterwards; ``--set`` overrides apply as in ``cmpagl train``. The first ``--skip``
steps (allocations, cuDNN/cuBLAS autotuning, data-loader start-up) are left out of the steady
rate, and so is the last step: the engine validates and saves after its last step before it
calls the step hook that stamps the time. On CUDA each step is synchronised before it is timed.
The peak resident memory (``getrusage``) is the process's: model, optimizer, data, activations.
A number of steps that is not a multiple of an epoch's batches stops mid-epoch: no epoch-end
validation then falls between timed steps.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch
from bench_record import load_average, record, write_record

from cmpagl.config import load_config
from cmpagl.data.build import prepare_synthetic_dataset
from cmpagl.train import StepInfo, _amp_dtype, train


def measure(config: str, overrides: list[str], steps: int, skip: int) -> dict:
    """Train ``steps`` steps of ``config`` and time them (see the module docstring)."""
    if steps < skip + 3:
        raise SystemExit(f"--steps must be at least --skip + 3 = {skip + 3}")
    with tempfile.TemporaryDirectory(prefix="cmpagl_throughput_") as tmp:
        cfg = load_config(
            config,
            overrides=[
                *overrides,
                f"train.max_steps={steps}",
                "train.checkpoint_every=0",
                f"output_dir={tmp}/run",
            ],
        )
        stamps: list[float] = []
        samples: list[int] = []
        run: dict = {}  # device, world size and trainable parameters, read at the first step

        def on_step(info: StepInfo) -> None:
            if not run:
                run.update(
                    device=next(info.model.parameters()).device,
                    world=info.world_size,
                    params=sum(p.numel() for p in info.model.parameters() if p.requires_grad),
                )
            if run["device"].type == "cuda":
                torch.cuda.synchronize(run["device"])
            stamps.append(time.perf_counter())
            samples.append(int(info.image_ids.shape[0]) * info.world_size)

        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        prepare_synthetic_dataset(cfg.data)  # a no-op unless data.name is synthetic
        result = train(cfg, config_path=config, on_step=on_step)
    dev = run["device"]
    steady = stamps[skip:-1]  # the last stamp follows the final validation and checkpoint
    step_s = [b - a for a, b in zip(steady[:-1], steady[1:], strict=True)]
    amp = _amp_dtype(cfg.train, dev)
    return {
        "config": config,
        "overrides": overrides,
        "steps": result.steps,
        "timed_steps": len(step_s),
        "batch_size": cfg.train.batch_size,
        "world_size": run["world"],
        "device": str(dev),
        "amp_dtype": None if amp is None else str(amp).removeprefix("torch."),
        "steady_samples_per_s": sum(samples[skip + 1 : -1]) / (steady[-1] - steady[0]),
        "median_step_ms": 1000 * statistics.median(step_s),
        "engine_samples_per_s": result.samples_per_s,
        "wall_time_s": result.wall_time_s,
        "peak_gpu_gib": (
            torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None
        ),
        "peak_rss_mib": peak_rss_mib(),
        "trainable_params_m": run["params"] / 1e6,
    }


def peak_rss_mib() -> float:
    """This process's peak resident memory so far (``getrusage`` max RSS): the model, its
    optimizer state, the data and the largest step's activations, all on the CPU."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--steps", type=int, default=40, help="optimizer steps to train (≥ skip + 3)")
    ap.add_argument("--skip", type=int, default=5, help="first steps left out of the rate")
    ap.add_argument("--out", help="also write the result here as JSON")
    args = ap.parse_args()
    load = load_average()
    row = measure(args.config, args.set, args.steps, args.skip)
    print(json.dumps(record(row, load_before=load, device=row["device"]), indent=2))
    if args.out:
        write_record(args.out, row, load_before=load, device=row["device"])


if __name__ == "__main__":
    main()
