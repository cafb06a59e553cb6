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
import statistics
import sys
import time
from pathlib import Path

from cmpagl.checkpoint import git_commit, load_checkpoint, read_meta
from cmpagl.config import load_config, to_dict
from cmpagl.evaluate import evaluate_model, hardware_info
from cmpagl.runlog import read_log
from cmpagl.train import train

KEYS = ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean")
RERANKERS = ("none", "itm", "smr", "itm+smr")


def run_one(config: str, seed: int, overrides: list[str], out: Path) -> dict:
    run_dir = out / Path(config).stem / f"seed{seed}"
    done = run_dir / "table_entry.json"
    if done.is_file():
        return json.loads(done.read_text())
    cfg = load_config(config, overrides=[*overrides, f"seed={seed}", f"output_dir={run_dir}"])
    resume = run_dir if (run_dir / "last").is_dir() else None
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
    done.write_text(json.dumps(entry, indent=1))
    return entry


def val_curve(run_dir: Path) -> list[dict]:
    """(epoch, step, val r_mean) of every validation in the run's log, in order."""
    log = run_dir / "train_log.jsonl"
    if not log.is_file():
        return []
    return [
        {"epoch": r["epoch"], "step": r["step"], "r_mean": r["r_mean"]}
        for r in read_log(log)
        if r.get("kind") == "val"
    ]


def summarize(entries: list[dict]) -> tuple[dict, str]:
    by_config: dict[str, list[dict]] = {}
    for e in entries:
        by_config.setdefault(e["config"], []).append(e)

    def ms(values: list[float]) -> str:
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.2f} ± {sd:.2f}"

    summary, lines = {}, []
    lines.append(
        "| config | seeds | "
        + " | ".join(f"mR {r}" for r in RERANKERS)
        + " | val mR | wall time (s) | samples/s |"
    )
    lines.append("|---" * (5 + len(RERANKERS)) + "|")
    for config, es in by_config.items():
        # (an entry of an older run may hold ITM columns of a baseline: they are not shown)
        used = [r for r in RERANKERS if all(r in e["test"] for e in es)]
        if (
            "w_itm" in es[0]["config_resolved"]["loss"]
            and not es[0]["config_resolved"]["loss"]["w_itm"]
        ):
            used = [r for r in used if "itm" not in r]
        row = {r: [e["test"][r]["r_mean"] for e in es] for r in used}
        summary[config] = {
            "seeds": [e["seed"] for e in es],
            "test_r_mean": {
                r: {
                    "mean": statistics.mean(v),
                    "std": statistics.stdev(v) if len(v) > 1 else 0.0,
                    "values": v,
                }
                for r, v in row.items()
            },
            "test_metrics_mean": {
                r: {k: statistics.mean(e["test"][r][k] for e in es) for k in KEYS} for r in used
            },
            "val_r_mean": [e["best_val_r_mean"] for e in es],
            "wall_time_s": [e["wall_time_s"] for e in es],
            "samples_per_s": [e["samples_per_s"] for e in es],
            "oracle_r_mean": es[0]["oracle_r_mean"],
        }
        lines.append(
            f"| {Path(config).stem} | {len(es)} | "
            + " | ".join(ms(row[r]) if r in row else "–" for r in RERANKERS)
            + f" | {ms([e['best_val_r_mean'] for e in es])}"
            + f" | {statistics.mean(e['wall_time_s'] for e in es):.0f}"
            + f" | {statistics.mean(e['samples_per_s'] for e in es):.1f} |"
        )
    return summary, "\n".join(lines)


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
            (out / "summary.json").write_text(json.dumps(record, indent=1))
            (out / "summary.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
