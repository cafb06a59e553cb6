"""One full CMPAGL training step on the CPU: samples/s, FLOPs, the fraction of matmul peak, and
where the time goes (``torch.profiler``), optionally side by side with another commit.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/train_step.py --config configs/ucm_cpu.yaml
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/train_step.py --config configs/ucm_cpu.yaml \
        --baseline HEAD~5 --rounds 2 --out results/bench/train_step.json
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/train_step.py --profile 20
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/train_step.py --config configs/ucm_cpu.yaml \
        --versus configs/ucm_cpu_baseline.yaml --steps 4 --out results/bench/step_ratio.json

A step is what the engine does per batch (:mod:`cmpagl.train`): every loss of the config,
backward, gradient clipping, AdamW with the engine's parameter groups and the momentum update,
under the engine's deterministic-kernel setting (``train.deterministic``), on a fixed batch:
one real caption of each of B random images, random pixels (data loading is not timed, as in
the engine's own samples/s).
FLOPs of forward + backward come from ``torch.utils.flop_counter``; the machine's matmul peak
is a 1024 x 1024 float32 matmul timed in the same process.

``--versus CONFIG`` measures another config the same way, alternating the two ``--rounds`` times
(each run in its own process), and prints the ratio of samples/s (e.g. how much faster the
dual-encoder baseline's step is than full CMPAGL's).

``--baseline REF`` checks REF out into a temporary git worktree and runs this same script there
(the library of REF, this file's measuring code), alternating baseline and current ``--rounds``
times so that a change in machine load hits both alike; the ratio of medians is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------
# Measuring the library that is importable in this process
# --------------------------------------------------------------------------------------------
def _build(config: str, overrides: list[str], batch: int):
    """Model (with pretrained weights where the config asks), optimizer, batch, loss config."""
    from cmpagl.config import load_config
    from cmpagl.models.cmpagl import build_model
    from cmpagl.optim import build_optimizer

    cfg = load_config(config, overrides=[*overrides, f"train.batch_size={batch}"])
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model)
    try:  # libraries where build_model makes the architecture only
        from cmpagl.models.pretrained import load_pretrained
    except ImportError:
        pass
    else:
        load_pretrained(model, cfg.model)
    model.train()
    optimizer = build_optimizer(model, cfg)
    captions = _captions(batch)
    images = torch.randn(batch, 3, cfg.data.image_size, cfg.data.image_size)
    ids = torch.arange(batch)  # one caption of each of B images, as the engine's batches hold
    return cfg, model, optimizer, images, captions, ids


def _captions(n: int) -> list[str]:
    """One real UCM caption from each of ``n`` images drawn at random (seed 0) where the shared
    data is present, else fixed remote-sensing ones.

    Random images, not the first ones: the step's text cost grows with the longest caption of
    the batch (batches are padded to it), and consecutive images of one class have captions of
    similar length; the first 32 images' longest caption has 7 words, a random batch's 15-18,
    as the engine's batches have (a fixed early batch made the step look ~25 % cheaper)."""
    try:
        from cmpagl.paths import ucm_subset_dir

        data = json.loads((ucm_subset_dir() / "dataset.json").read_text())
        per_image = [[s["raw"] for s in im["sentences"]] for im in data["images"]]
    except (OSError, ValueError, KeyError):
        per_image = [
            ["there are two white planes parked near the runway"],
            ["many buildings and green trees are around the parking lot with many cars"],
            ["a river passes through the forest with dense green trees on both sides"],
        ]
    g = torch.Generator().manual_seed(0)
    picks = torch.randperm(max(len(per_image), n), generator=g)[:n].remainder(len(per_image))
    return [per_image[i][k % len(per_image[i])] for k, i in enumerate(picks.tolist())]


def _step(model, optimizer, images, captions, ids, cfg, generator) -> None:
    from cmpagl.objective import compute_losses

    loss, _ = compute_losses(model, images, captions, ids, cfg.loss, generator)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 5.0)
    optimizer.step()


def _matmul_gflops(n: int = 1024, repeats: int = 20) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - t) / 1e9


def _flops(model, optimizer, images, captions, ids, cfg, generator) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        _step(model, optimizer, images, captions, ids, cfg, generator)
    return counter.get_total_flops() / 1e9


def measure(config: str, overrides: list[str], batch: int, steps: int, profile: int) -> dict:
    """Time ``steps`` steps after 2 warm-up steps; GFLOP per step; optional profiler table.

    The steps run under the engine's ``train.deterministic`` setting, as in training."""
    from cmpagl.train import _deterministic

    cfg, model, optimizer, images, captions, ids = _build(config, overrides, batch)
    with _deterministic(cfg.train.deterministic, torch.device("cpu")):
        return _measure(cfg, model, optimizer, images, captions, ids, steps, profile) | {
            "config": config,
            "overrides": overrides,
            "deterministic": cfg.train.deterministic,
        }


def _measure(cfg, model, optimizer, images, captions, ids, steps: int, profile: int) -> dict:
    batch = images.shape[0]
    generator = torch.Generator().manual_seed(0)
    args = (model, optimizer, images, captions, ids, cfg, generator)
    for _ in range(2):
        _step(*args)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        _step(*args)
        times.append(time.perf_counter() - t)
    gflop = _flops(*args)
    peak = _matmul_gflops()
    median = statistics.median(times)
    out = {
        "batch": batch,
        "steps": steps,
        "median_step_s": median,
        "samples_per_s": batch / median,
        "gflop_per_step": gflop,
        "gflops_achieved": gflop / median,
        "matmul_peak_gflops": peak,
        "fraction_of_matmul_peak": gflop / median / peak,
        "step_times_s": times,
    }
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                _step(*args)
        out["profile"] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=profile)
    return out


# --------------------------------------------------------------------------------------------
# Side by side with another commit
# --------------------------------------------------------------------------------------------
def _run_in(tree: Path, argv: list[str]) -> dict:
    """This script, importing the library of ``tree``; returns its JSON result."""
    from cmpagl.paths import shared_data_dir

    # The same captions for both trees: a worktree's ../shared is not this checkout's.
    data = str(shared_data_dir())
    env = {**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1", "CMPAGL_DATA": data}
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = Path(f.name)
    try:
        subprocess.run(
            [sys.executable, __file__, *argv, "--json", str(out)], env=env, cwd=REPO, check=True
        )
        return json.loads(out.read_text())
    finally:
        out.unlink(missing_ok=True)


def compare(ref: str, argv: list[str], rounds: int) -> dict:
    """Alternate ``ref`` (a temporary worktree) and this tree ``rounds`` times."""
    tmp = Path(tempfile.mkdtemp(prefix="cmpagl_baseline_"))
    tree = tmp / "tree"
    subprocess.run(
        ["git", "worktree", "add", "-q", "--detach", str(tree), ref], cwd=REPO, check=True
    )
    commit = subprocess.run(
        ["git", "rev-parse", "--short", ref], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.strip()
    try:
        base, cur = [], []
        for _ in range(rounds):
            base.append(_run_in(tree, argv))
            cur.append(_run_in(REPO, argv))
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=REPO, check=False)
    rate_b = statistics.median(r["samples_per_s"] for r in base)
    rate_c = statistics.median(r["samples_per_s"] for r in cur)
    return {
        "baseline": {"ref": ref, "commit": commit, "runs": base},
        "current": {"runs": cur},
        "baseline_samples_per_s": rate_b,
        "current_samples_per_s": rate_c,
        "speedup": rate_c / rate_b,
    }


def versus(other: str, argv: list[str], rounds: int) -> dict:
    """Alternate this config and ``other`` (same library, same batch) ``rounds`` times, each
    in its own process; the ratio of median samples/s is how much faster ``other`` trains."""
    config = argv[argv.index("--config") + 1]
    other_argv = [*argv]
    other_argv[argv.index("--config") + 1] = other
    mine, theirs = [], []
    for _ in range(rounds):
        mine.append(_run_in(REPO, argv))
        theirs.append(_run_in(REPO, other_argv))
    rate_m = statistics.median(r["samples_per_s"] for r in mine)
    rate_o = statistics.median(r["samples_per_s"] for r in theirs)
    return {
        "config": {"config": config, "runs": mine, "samples_per_s": rate_m},
        "versus": {"config": other, "runs": theirs, "samples_per_s": rate_o},
        "ratio_samples_per_s": rate_o / rate_m,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/ucm_cpu.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--profile", type=int, default=0, help="rows of the profiler table (0: off)")
    ap.add_argument("--baseline", help="git ref to measure side by side (temporary worktree)")
    ap.add_argument(
        "--versus", metavar="CONFIG", help="another config to measure side by side (ratio)"
    )
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", help="write the result JSON here")
    ap.add_argument("--json", help=argparse.SUPPRESS)  # child process of --baseline
    args = ap.parse_args()
    load = os.getloadavg()[0]
    argv = ["--config", args.config, "--batch", str(args.batch), "--steps", str(args.steps)]
    for o in args.overrides:
        argv += ["--set", o]
    if args.versus:
        result = versus(args.versus, [*argv, "--profile", "0"], args.rounds)
        print(
            f"{args.config}: {result['config']['samples_per_s']:.2f} samples/s; "
            f"{args.versus}: {result['versus']['samples_per_s']:.2f} samples/s; "
            f"ratio x{result['ratio_samples_per_s']:.2f}"
        )
    elif args.baseline:
        result = compare(args.baseline, [*argv, "--profile", str(args.profile)], args.rounds)
        for name in ("baseline", "current"):
            run = result[name]["runs"][-1]
            print(f"--- {name} ---")
            if "profile" in run:
                print(run["profile"])
        print(
            f"baseline {result['baseline']['commit']}: "
            f"{result['baseline_samples_per_s']:.2f} samples/s; "
            f"current: {result['current_samples_per_s']:.2f} samples/s; "
            f"speedup x{result['speedup']:.2f}"
        )
    else:
        result = measure(args.config, args.overrides, args.batch, args.steps, args.profile)
        if args.json:
            Path(args.json).write_text(json.dumps(result))
            return
        if "profile" in result:
            print(result["profile"])
        print(
            f"{result['config']} batch {result['batch']}: {result['samples_per_s']:.2f} samples/s "
            f"(median step {result['median_step_s']:.3f} s), {result['gflop_per_step']:.0f} GFLOP "
            f"per step, {result['gflops_achieved']:.0f} GFLOP/s = "
            f"{100 * result['fraction_of_matmul_peak']:.0f} % of the "
            f"{result['matmul_peak_gflops']:.0f} GFLOP/s matmul peak"
        )
    if args.out:
        # imported here: a --baseline child imports the library of another tree
        from bench_record import write_record

        write_record(args.out, result, load_before=load)


if __name__ == "__main__":
    main()
