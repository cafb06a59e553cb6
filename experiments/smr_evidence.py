"""Validation evidence for SMR's evaluation settings, from trained checkpoints. The test split is
never read.

    # retrieval.smr_scale: both scalings of W_map on one checkpoint
    HF_HUB_OFFLINE=1 .venv/bin/python experiments/smr_evidence.py scale \
        runs/evidence/default/seed0 --record results/decisions/ucm_smr_scale.json

    # retrieval.smr_grid_*: today's grids against wider ones, on several checkpoints
    HF_HUB_OFFLINE=1 .venv/bin/python experiments/smr_evidence.py grid \
        runs/sweeps/ucm_ablations/*/seed* --record results/decisions/ucm_smr_grid.json

``scale`` embeds val once and scores ITM once (for the largest k of the ITM grid), then runs the
library's own tuning (:mod:`cmpagl.evaluate`: the grid search of every re-ranker) for ``smr`` and
``itm+smr`` under each scaling, with today's default grids (a checkpoint saved with narrower
grids gets the current ones).

``grid`` asks whether SMR's settings, chosen at an end of their grid in most runs of the UCM study
(k = 50, the largest, in nearly all), would be chosen better from a wider grid. Per checkpoint it
tunes ``smr`` on S_itc of the val split with today's grids and with :data:`WIDE` (each axis
extended past both ends), and reports both best validation mRs. The wider grid holds the narrow
one, so its best on the same split can only be higher; how much of that is real is measured by
a two-fold cross-fit within val: the settings are chosen on half of the val images (and their
captions) and scored on the other half, both ways round.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from cmpagl import evaluate as ev
from cmpagl import rerank as rr
from cmpagl.checkpoint import git_commit, load_checkpoint
from cmpagl.config import RetrievalConfig
from cmpagl.data.build import dataset_from_config, transforms_from_config
from cmpagl.fileio import atomic_write_text
from cmpagl.metrics import evaluate_retrieval

GRIDS = ("itm_grid_k", "smr_grid_tau", "smr_grid_k", "smr_grid_lambda")
KEEP = ("params", "val_value", "val_off_value", "grid_size", "on_edge")
#: SMR's grids extended past both ends of today's (k of 1000 is every item of either direction)
WIDE = {
    "smr_grid_tau": (0.001, *RetrievalConfig().smr_grid_tau, 1.0, 2.0),
    "smr_grid_k": (1, *RetrievalConfig().smr_grid_k, 100, 200, 500, 1000),
    "smr_grid_lambda": (0.005, *RetrievalConfig().smr_grid_lambda, 10.0, 20.0),
}


def _val(run: str, with_itm: bool):
    """(config, val split embedded) of a run's best checkpoint, with today's default grids."""
    model, cfg, _ = load_checkpoint(run, prefer="best")
    fresh = RetrievalConfig()
    cfg.retrieval = dataclasses.replace(cfg.retrieval, **{f: getattr(fresh, f) for f in GRIDS})
    model.eval()
    ds = dataset_from_config(cfg.data)
    _, transform = transforms_from_config(cfg.data)
    val = ev._embed(model, ds.split("val"), transform, cfg, "cpu", with_itm)
    if with_itm:
        axes, _, _ = ev._axes("itm", cfg.retrieval)
        ev._run_itm(model, val, max(axes["itm_k"]), cfg, "cpu")
    return cfg, val


def _head(run: str, cfg, val) -> dict[str, Any]:
    return {
        "checkpoint": str(run),
        "seed": cfg.seed,
        "split": "val",
        "n_images": len(val.emb.image_embed),
        "n_captions": len(val.emb.captions),
    }


def scale(run: str) -> dict[str, Any]:
    """``smr`` and ``itm+smr`` tuned on val under ``max`` and ``minmax`` scaling."""
    cfg, val = _val(run, with_itm=True)
    none = evaluate_retrieval(val.s_itc, val.emb.txt2img, val.emb.captions)
    out = _head(run, cfg, val)
    out["none"] = {k: none[k] for k in ("txt_r1", "txt_r1_index", "r_mean", "r_mean_index")}
    itm = ev._tune("itm", val, cfg.retrieval, None)
    out["itm"] = {k: itm[k] for k in KEEP}
    for scaling in ("max", "minmax"):
        rc = dataclasses.replace(cfg.retrieval, smr_scale=scaling)
        for name in ("smr", "itm+smr"):
            k = ev._stage_k({"itm": itm}) if name == "itm+smr" else None
            tuned = ev._tune(name, val, rc, k)
            out[f"{name}/{scaling}"] = {key: tuned[key] for key in KEEP}
    return out


def _half(s: torch.Tensor, txt2img: torch.Tensor, captions: list[str], images: torch.Tensor):
    """The val split restricted to ``images`` and their captions: (S, txt2img, captions)."""
    keep = torch.isin(txt2img, images).nonzero().squeeze(1)
    new_index = torch.full((len(s),), -1, dtype=torch.long)
    new_index[images] = torch.arange(len(images))
    return s[images][:, keep], new_index[txt2img[keep]], [captions[i] for i in keep]


def _cross_fit(s: torch.Tensor, txt2img: torch.Tensor, captions: list[str], axes, scaling: str):
    """Mean over the two folds of the held-out half's mR with settings chosen on the other half
    (even-indexed images against odd ones); and without re-ranking."""
    halves = [torch.arange(0, len(s), 2), torch.arange(1, len(s), 2)]
    chosen, none = [], []
    for fit, held in (halves, halves[::-1]):
        s_fit, t_fit, c_fit = _half(s, txt2img, captions, fit)
        s_held, t_held, _ = _half(s, txt2img, captions, held)
        found = rr.grid_search(rr.smr_scorer(s_fit, scale=scaling), s_fit, t_fit, axes, c_fit)
        scores = s_held if found.params is None else rr.smr(s_held, **found.params, scale=scaling)
        value_of = rr._criterion_fn(t_held, None, "r_mean")  # grid_search's own criterion
        chosen.append(value_of(rr.as_ranking(scores)))
        none.append(value_of(rr.as_ranking(s_held)))
    return {"none": statistics.fmean(none), "chosen": statistics.fmean(chosen), "folds": chosen}


def grid(run: str) -> dict[str, Any]:
    """``smr`` tuned on val with today's grids and with :data:`WIDE`, and cross-fit."""
    cfg, val = _val(run, with_itm=False)
    s, txt2img, captions = val.s_itc.float(), torch.as_tensor(val.emb.txt2img), val.emb.captions
    out = _head(run, cfg, val)
    for label, rc in (
        ("default", cfg.retrieval),
        ("wide", dataclasses.replace(cfg.retrieval, **WIDE)),
    ):
        tuned = ev._tune("smr", val, rc, None)
        axes, _, _ = ev._axes("smr", rc)
        out[label] = {key: tuned[key] for key in KEEP}
        out[label]["grid"] = axes
        out[label]["cross_fit"] = _cross_fit(s, txt2img, captions, axes, rc.smr_scale)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("study", choices=("scale", "grid"))
    ap.add_argument("runs", nargs="+", help="run folders (each one's best/ checkpoint is used)")
    ap.add_argument("--record", help="write the JSON record here")
    args = ap.parse_args()
    if args.study == "scale" and len(args.runs) != 1:
        ap.error("scale takes one run")
    t0 = time.time()
    runs = [p for p in args.runs if (Path(p) / "best").is_dir()]
    if not runs:
        ap.error(f"no run with a best/ checkpoint among {args.runs}")
    for skipped in sorted(set(args.runs) - set(runs)):
        print(f"{skipped}: left out, no best/ checkpoint there (a run still training?)")
    if args.study == "scale":
        out = {**scale(runs[0]), "git_commit": git_commit(), "torch": torch.__version__}
    else:
        per_run = []
        for run in runs:
            per_run.append(grid(run))
            d, w = per_run[-1]["default"], per_run[-1]["wide"]
            print(
                f"{run}: val mR none {d['val_off_value']:.2f}, "
                f"smr {d['val_value']:.2f} (today's grid, {d['params']}), "
                f"{w['val_value']:.2f} (wide, {w['params']}); cross-fit "
                f"{d['cross_fit']['chosen']:.2f} / {w['cross_fit']['chosen']:.2f}"
                f" (none {d['cross_fit']['none']:.2f})",
                flush=True,
            )
        gain = [r["wide"]["val_value"] - r["default"]["val_value"] for r in per_run]
        fit = [
            r["wide"]["cross_fit"]["chosen"] - r["default"]["cross_fit"]["chosen"] for r in per_run
        ]
        out = {
            "study": "smr_grid",
            "git_commit": git_commit(),
            "torch": torch.__version__,
            "wide_minus_default_val": gain,
            "wide_minus_default_cross_fit": fit,
            "runs": per_run,
        }
        print(
            f"wide - today's grid over {len(per_run)} runs: val mR {statistics.fmean(gain):+.2f} "
            f"(selected on the same split), cross-fit {statistics.fmean(fit):+.2f}"
        )
    out["seconds"] = time.time() - t0
    text = json.dumps(out, indent=1)
    if args.record:
        atomic_write_text(args.record, text + "\n")
        print(f"record: {args.record}")
    else:
        print(text)


if __name__ == "__main__":
    main()
