"""Validation evidence for a [decision]: train named variants of one config and compare their
best validation mR (ITC). The test split is never touched.

    HF_HUB_OFFLINE=1 .venv/bin/python experiments/val_evidence.py --config configs/ucm_cpu.yaml \
        --set train.epochs=10 --seeds 0 \
        --variant default= --variant alpha_ramp=loss.itc_alpha_warmup=1.0 \
        --variant twins_train=model.momentum_train_mode=true \
        --out runs/evidence --record results/decisions/ucm_alpha_twins.json

``--variant NAME=KEY=VALUE[,KEY=VALUE...]`` (``NAME=`` alone is the config as it is). Each
(variant, seed) trains into ``<out>/<NAME>/seed<k>``; a finished one is read back, an
interrupted one resumes from its last checkpoint, so the command can be run again after a
crash. The record (``--record``, small JSON, meant to be committed) holds the command, commit,
hardware, and per run the best validation mR, its epoch, the validation curve and the wall time.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import statistics
import sys
from pathlib import Path

from cmpagl.checkpoint import git_commit
from cmpagl.config import load_config
from cmpagl.data.build import prepare_synthetic_dataset
from cmpagl.evaluate import hardware_info
from cmpagl.fileio import atomic_write_text
from cmpagl.runlog import read_log
from cmpagl.train import train


def parse_variant(text: str) -> tuple[str, list[str]]:
    """``"name=a.b=1,c=2"`` -> ``("name", ["a.b=1", "c=2"])``; ``"name="`` -> no overrides."""
    name, sep, rest = text.partition("=")
    if not sep or not name:
        raise SystemExit(f"--variant {text!r}: expected NAME=KEY=VALUE[,KEY=VALUE...] or NAME=")
    return name, [o for o in rest.split(",") if o]


def run_one(config: str, overrides: list[str], seed: int, run_dir: Path) -> dict:
    """Train (or resume, or read back) one run; its validation summary."""
    cfg = load_config(config, overrides=[*overrides, f"seed={seed}", f"output_dir={run_dir}"])
    done = (run_dir / "best").is_dir() and _finished(run_dir, cfg.train.epochs)
    if not done:
        resume = run_dir if (run_dir / "last").is_dir() else None
        prepare_synthetic_dataset(cfg.data)
        train(cfg, resume=resume, config_path=config)
    records = read_log(run_dir)
    val = [r for r in records if r.get("kind") == "val"]
    best = max(val, key=lambda r: r["r_mean"])
    train_lines = [r for r in records if r.get("kind") == "train"]
    return {
        "seed": seed,
        "best_val_r_mean": best["r_mean"],
        "best_epoch": best.get("epoch"),
        "val_curve": [[r.get("epoch"), r["r_mean"]] for r in val],
        "wall_time_s": train_lines[-1]["wall_time"] if train_lines else None,
        "samples_per_s": train_lines[-1].get("samples_per_s") if train_lines else None,
    }


def _finished(run_dir: Path, epochs: int) -> bool:
    """The last epoch (0-based ``epochs - 1``) has its end-of-epoch validation in the log."""
    val = [r for r in read_log(run_dir) if r.get("kind") == "val" and r.get("end_of_epoch")]
    return bool(val) and max(int(r["epoch"]) for r in val) >= epochs - 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--variant", action="append", required=True, metavar="NAME=OVERRIDES")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", default="runs/evidence")
    ap.add_argument("--record", help="write the JSON record here (e.g. results/decisions/x.json)")
    args = ap.parse_args()
    variants = dict(parse_variant(v) for v in args.variant)
    runs: dict[str, list[dict]] = {}
    for name, extra in variants.items():
        for seed in args.seeds:
            run_dir = Path(args.out) / name / f"seed{seed}"
            entry = run_one(args.config, [*args.overrides, *extra], seed, run_dir)
            runs.setdefault(name, []).append(entry)
            print(
                f"{name} seed {seed}: best val mR {entry['best_val_r_mean']:.2f} "
                f"(epoch {entry['best_epoch']})",
                flush=True,
            )
    print(f"\n{'variant':<16} {'overrides':<44} best val mR per seed, mean")
    for name, entries in runs.items():
        values = [e["best_val_r_mean"] for e in entries]
        per_seed = ", ".join(f"{v:.2f}" for v in values)
        print(
            f"{name:<16} {','.join(variants[name]) or '(config)':<44} {per_seed}; "
            f"{statistics.fmean(values):.2f}"
        )
    if args.record:
        record = {
            "command": shlex.join([sys.executable.rsplit("/", 1)[-1], *sys.argv]),
            "config": args.config,
            "overrides": args.overrides,
            "variants": variants,
            "seeds": args.seeds,
            "git_commit": git_commit(),
            "hardware": hardware_info("cpu"),
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "runs": runs,
        }
        atomic_write_text(args.record, json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
