"""How to split the cores between sweep runners: training samples/s of N runners side by side,
T torch threads each, for one config on this machine.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/runner_scaling.py \
        [--config configs/synthetic_tiny.yaml --layouts 1x2 1x1 2x1 --steps 25 --skip 3 \
         --out results/bench/runner_scaling_tiny_cpu.json]

A layout ``NxT`` starts N ``benchmarks/train_throughput.py`` processes at once, each with T
threads (``OMP_NUM_THREADS`` and ``train.num_threads``), as N ``cmpagl sweep`` runners would
train side by side; their steady samples/s are summed. Small models use a second thread poorly
(short kernels, synchronisation), so on a few cores two one-thread runners can train more per
second than one two-thread runner; a large model can be the other way round. Run it on an
otherwise idle machine: the load average before and after is in the record.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_record import load_average, write_record

THROUGHPUT = Path(__file__).with_name("train_throughput.py")


def parse_layout(text: str) -> tuple[int, int]:
    """``"2x1"`` -> (2 runners, 1 thread each)."""
    try:
        runners, threads = (int(x) for x in text.lower().split("x"))
    except ValueError:
        msg = f"{text!r}: a layout is RUNNERSxTHREADS, e.g. 2x1"
        raise argparse.ArgumentTypeError(msg) from None
    if runners < 1 or threads < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: runners and threads are at least 1")
    return runners, threads


def run_layout(
    config: str, runners: int, threads: int, steps: int, skip: int, overrides: list[str]
) -> list[dict]:
    """``runners`` train_throughput.py processes at once, ``threads`` each; their records."""
    with tempfile.TemporaryDirectory(prefix="cmpagl_runners_") as tmp:
        sets = [a for o in [*overrides, f"train.num_threads={threads}"] for a in ("--set", o)]
        args = ["--config", config, "--steps", str(steps), "--skip", str(skip), *sets]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads)}
        outs = [Path(tmp) / f"runner{k}.json" for k in range(runners)]
        procs = [
            subprocess.Popen(
                [sys.executable, str(THROUGHPUT), *args, "--out", str(out)],
                env=env,
                stdout=subprocess.DEVNULL,
            )
            for out in outs
        ]
        codes = [p.wait() for p in procs]
        if any(codes):
            raise SystemExit(f"a train_throughput.py process failed: exit statuses {codes}")
        return [json.loads(out.read_text()) for out in outs]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/synthetic_tiny.yaml")
    ap.add_argument(
        "--layouts",
        type=parse_layout,
        nargs="+",
        default=[(1, 2), (1, 1), (2, 1)],
        metavar="NxT",
        help="runners x threads each (default: 1x2 1x1 2x1)",
    )
    ap.add_argument("--steps", type=int, default=25, help="engine steps per runner")
    ap.add_argument("--skip", type=int, default=3, help="steps left out after the first")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", help="write the record here (JSON)")
    args = ap.parse_args(argv)
    load = load_average()
    print(f"{args.config}: {args.steps} steps per runner, load average before: {load}")
    print(f"{'layout':>6s} {'samples/s per runner':>22s} {'total samples/s':>15s} {'vs first':>8s}")
    rows = []
    for runners, threads in args.layouts:
        recs = run_layout(args.config, runners, threads, args.steps, args.skip, args.set)
        rates = [r["steady_samples_per_s"] for r in recs]
        row = {
            "runners": runners,
            "threads_each": threads,
            "samples_per_s_each": rates,
            "total_samples_per_s": sum(rates),
            "peak_rss_mib_each": [r["peak_rss_mib"] for r in recs],
        }
        row["vs_first"] = row["total_samples_per_s"] / (
            rows[0]["total_samples_per_s"] if rows else row["total_samples_per_s"]
        )
        rows.append(row)
        each = ", ".join(f"{x:.2f}" for x in rates)
        print(
            f"{runners}x{threads:<4d} {each:>22s} {row['total_samples_per_s']:15.2f}"
            f" {row['vs_first']:8.2f}"
        )
    print(f"load average after: {load_average()}")
    result = {"config": args.config, "overrides": args.set, "steps": args.steps, "rows": rows}
    if args.out:
        write_record(args.out, result, load_before=load)
    return result


if __name__ == "__main__":
    main()
