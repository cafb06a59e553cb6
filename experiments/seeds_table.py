"""Train and evaluate configs over several seeds; print mean ± std of the test metrics.

    HF_HUB_OFFLINE=1 .venv/bin/python experiments/seeds_table.py \
        --config configs/ucm_cpu_baseline.yaml --config configs/ucm_cpu.yaml \
        --seeds 0 1 2 --set train.epochs=10 --out runs/table_ucm

Each (config, seed) trains into ``<out>/<config stem>/seed<k>`` (model selection on val only,
see :mod:`cmpagl.train`), then the best checkpoint is evaluated on the test split with
no re-ranking, ITM and SMR (SMR's parameters chosen on val). A finished (config, seed) is
skipped when run again, so an interrupted table resumes. The summary goes to
``<out>/summary.json`` and ``<out>/summary.md``. ``summary.json`` is self-contained, ready to be
copied into ``results/`` for the book: the command, commit, date and hardware, mean ± std per
config and re-ranker, and every (config, seed) entry with its resolved config, validation curve
and the commit it was trained at.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
import time
from pathlib import Path

from cmpagl.checkpoint import git_commit, load_checkpoint, read_meta
from cmpagl.config import load_config, to_dict
from cmpagl.data.build import prepare_synthetic_dataset
from cmpagl.evaluate import evaluate_model, hardware_info
from cmpagl.fileio import atomic_write_text
from cmpagl.report import KEYS, RERANKERS, summarize, val_curve
from cmpagl.train import train


def run_one(config: str, seed: int, overrides: list[str], out: Path) -> dict:
    run_dir = out / Path(config).stem / f"seed{seed}"
    done = run_dir / "table_entry.json"
    if done.is_file():
        return json.loads(done.read_text())
    cfg = load_config(config, overrides=[*overrides, f"seed={seed}", f"output_dir={run_dir}"])
    resume = run_dir if (run_dir / "last").is_dir() else None
    prepare_synthetic_dataset(cfg.data)  # announced; nothing when the folder is complete
    result = train(cfg, resume=resume, config_path=config)
    model, cfg, _ = load_checkpoint(run_dir, prefer="best")
    # A model trained without ITM (the dual-encoder baseline) has no trained ITM head.
    rerankers = [r for r in RERANKERS if cfg.loss.w_itm > 0 or "itm" not in r]
    ev = evaluate_model(
        model.eval(),
        cfg,
        "test",
        rerankers,
        checkpoint=str(run_dir / "best"),
        out_dir=run_dir,
        save_scores=False,
    )
    entry = {
        "config": config,
        "seed": seed,
        "overrides": overrides,
        "best_val_r_mean": result.best_r_mean,
        "best_epoch": result.best_epoch,
        "steps": result.steps,
        "wall_time_s": result.wall_time_s,
        "samples_per_s": result.samples_per_s,
        "test": {r: {k: ev["metrics"][r][k] for k in KEYS} for r in rerankers},
        "oracle_r_mean": ev["oracle"]["oracle_r_mean"],
        "smr_params": {r: ev["smr"][r]["params"] for r in ev["smr"]},
        "rerank_s": ev["timings"]["rerank_s"],
        "config_resolved": to_dict(cfg),
    }
    atomic_write_text(done, json.dumps(entry, indent=1))  # its presence means "finished"
    return entry


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", action="append", required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--set", action="append", default=[], help="override for every run")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = " ".join(shlex.quote(a) for a in ["experiments/seeds_table.py", *sys.argv[1:]])
    entries = []
    for seed in args.seeds:  # seed-major: a partial table still compares the configs
        for config in args.config:
            t = time.time()
            entry = run_one(config, seed, args.set, out)
            run_dir = out / Path(config).stem / f"seed{seed}"
            entry["val_curve"] = val_curve(run_dir)
            entry["train_commit"] = read_meta(run_dir / "best").get("git_commit")
            entries.append(entry)
            print(
                f"{config} seed {seed}: test mR {entry['test']['none']['r_mean']:.2f} "
                f"({time.time() - t:.0f} s)",
                flush=True,
            )
            summary, table = summarize(entries)
            record = {
                "command": command,
                "commit": git_commit(),
                "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                "hardware": hardware_info("cpu"),
                "overrides": args.set,
                "configs": summary,
                "entries": entries,
            }
            atomic_write_text(out / "summary.json", json.dumps(record, indent=1))
            atomic_write_text(out / "summary.md", table + "\n")
    print(table)


if __name__ == "__main__":
    main()
