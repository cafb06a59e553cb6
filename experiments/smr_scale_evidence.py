"""Validation evidence for ``retrieval.smr_scale``: one checkpoint, its val split, both scalings.

    HF_HUB_OFFLINE=1 .venv/bin/python experiments/smr_scale_evidence.py \
        runs/evidence/default/seed0 \
        --record results/decisions/ucm_smr_scale.json

Embeds val once and scores ITM once (for the largest k of the ITM grid), then runs the library's
own tuning (:mod:`cmpagl.evaluate`: the grid search of every re-ranker) for ``smr`` and
``itm+smr`` under each scaling, with today's default grids (a checkpoint saved with narrower
grids gets the current ones). The test split is never touched.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch

from cmpagl import evaluate as ev
from cmpagl.checkpoint import git_commit, load_checkpoint
from cmpagl.config import RetrievalConfig
from cmpagl.data.build import dataset_from_config, transforms_from_config
from cmpagl.fileio import atomic_write_text
from cmpagl.metrics import evaluate_retrieval

GRIDS = ("itm_grid_k", "smr_grid_tau", "smr_grid_k", "smr_grid_lambda")
KEEP = ("params", "val_value", "val_off_value", "grid_size", "on_edge")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", help="a run folder (its best/ checkpoint is used)")
    ap.add_argument("--record", help="write the JSON record here")
    args = ap.parse_args()
    model, cfg, _ = load_checkpoint(args.run, prefer="best")
    fresh = RetrievalConfig()
    cfg.retrieval = dataclasses.replace(cfg.retrieval, **{f: getattr(fresh, f) for f in GRIDS})
    model.eval()
    ds = dataset_from_config(cfg.data)
    _, transform = transforms_from_config(cfg.data)
    t0 = time.time()
    val = ev._embed(model, ds.split("val"), transform, cfg, "cpu", True)
    axes, _, _ = ev._axes("itm", cfg.retrieval)
    ev._run_itm(model, val, max(axes["itm_k"]), cfg, "cpu")
    none = evaluate_retrieval(val.s_itc, val.emb.txt2img, val.emb.captions)
    out = {
        "checkpoint": str(args.run),
        "seed": cfg.seed,
        "split": "val",
        "n_images": len(val.emb.image_embed),
        "n_captions": len(val.emb.captions),
        "git_commit": git_commit(),
        "torch": torch.__version__,
        "none": {k: none[k] for k in ("txt_r1", "txt_r1_index", "r_mean", "r_mean_index")},
    }
    itm = ev._tune("itm", val, cfg.retrieval, None)
    out["itm"] = {k: itm[k] for k in KEEP}
    for scale in ("max", "minmax"):
        rc = dataclasses.replace(cfg.retrieval, smr_scale=scale)
        for name in ("smr", "itm+smr"):
            k = ev._stage_k({"itm": itm}) if name == "itm+smr" else None
            tuned = ev._tune(name, val, rc, k)
            out[f"{name}/{scale}"] = {key: tuned[key] for key in KEEP}
    out["seconds"] = time.time() - t0
    text = json.dumps(out, indent=1)
    print(text)
    if args.record:
        atomic_write_text(args.record, text + "\n")


if __name__ == "__main__":
    main()
