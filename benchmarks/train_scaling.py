"""Training samples/s and peak memory against batch size, for one config on this machine.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/train_scaling.py \
        [--config configs/synthetic_tiny.yaml --batch-sizes 4 8 16 --steps 5 --skip 0 \
         --out results/bench/train_scaling_tiny_cpu.json]

Each batch size is a separate ``benchmarks/train_throughput.py`` process (a few engine steps
in a temporary folder), so that its peak resident memory (``getrusage`` max RSS: model,
optimizer state, data and the largest step's activations) is its own. The clock starts when
the first step ends and stops before the last (which the engine follows with a validation):
5 steps time 3. samples/s is the batch
over the median step time; the steady rate over the timed steps is recorded too. Memory that
grows with the batch is the activations: the slope of peak RSS against batch size estimates
it per sample.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from bench_record import load_average, write_record

THROUGHPUT = Path(__file__).with_name("train_throughput.py")


def run_batch(config: str, batch: int, steps: int, skip: int, overrides: list[str]) -> dict:
    """One train_throughput.py process at ``batch``; its record."""
    with tempfile.TemporaryDirectory(prefix="cmpagl_scaling_") as tmp:
        out = Path(tmp) / "row.json"
        sets = [a for o in [*overrides, f"train.batch_size={batch}"] for a in ("--set", o)]
        args = ["--config", config, "--steps", str(steps), "--skip", str(skip), *sets]
        subprocess.run(
            [sys.executable, str(THROUGHPUT), *args, "--out", str(out)],
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
            check=True,
            stdout=subprocess.DEVNULL,
        )
        return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/synthetic_tiny.yaml")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--steps", type=int, default=5, help="engine steps per batch size")
    ap.add_argument(
        "--skip", type=int, default=0, help="steps left out after the first (never timed)"
    )
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", help="write the record here (JSON)")
    args = ap.parse_args(argv)
    load = load_average()
    print(f"{args.config}: {args.steps} steps per batch size, load average before: {load}")
    head = f"{'batch':>5s} {'median step s':>13s} {'samples/s':>9s} {'steady':>7s}"
    print(f"{head} {'peak RSS MiB':>12s}")
    rows = []
    for batch in args.batch_sizes:
        r = run_batch(args.config, batch, args.steps, args.skip, args.set)
        row = {
            "batch_size": batch,
            "median_step_s": r["median_step_ms"] / 1000,
            "samples_per_s": batch / (r["median_step_ms"] / 1000),
            "steady_samples_per_s": r["steady_samples_per_s"],
            "timed_steps": r["timed_steps"],
            "peak_rss_mib": r["peak_rss_mib"],
            "peak_gpu_gib": r["peak_gpu_gib"],
            "device": r["device"],
        }
        rows.append(row)
        print(
            f"{batch:5d} {row['median_step_s']:13.3f} {row['samples_per_s']:9.2f} "
            f"{row['steady_samples_per_s']:7.2f} {row['peak_rss_mib']:12.0f}"
        )
    result: dict = {"config": args.config, "overrides": args.set, "steps": args.steps, "rows": rows}
    if len(rows) > 1:
        batch = np.array([r["batch_size"] for r in rows], dtype=float)
        per_sample, fixed = np.polyfit(batch, [r["peak_rss_mib"] for r in rows], 1)
        result["rss_mib_fit"] = {"fixed": float(fixed), "per_sample": float(per_sample)}
        print(f"peak RSS ≈ {fixed:.0f} MiB + {per_sample:.1f} MiB per sample of the batch")
    print(f"load average after: {load_average()}")
    if args.out:
        write_record(args.out, result, load_before=load, device=rows[0]["device"])
    return result


if __name__ == "__main__":
    main()
