"""Evaluation time against test-set size, stage by stage, with the cost model each stage
follows fitted to the measurements.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/eval_scaling.py \
        [--config configs/synthetic_tiny.yaml --out results/bench/eval_scaling_cpu.json]

Stages of the retrieval pipeline (METHOD §3), each on a test split of N_img images with five
captions each (N_txt = 5 N_img):

- ``itc``: S_itc = v tᵀ (:func:`cmpagl.retrieval.itc_scores`), cost N_img · N_txt · d.
- ``itm``: the ITM head on each query's top-k (:func:`cmpagl.retrieval.itm_rescore`), cost
  the number of fused (image, caption text) pairs, about (N_img + N_txt) · k.
- ``smr``: SMR on S (:func:`cmpagl.rerank.smr`), cost N_img · N_txt · log2 N_txt (full-matrix
  softmaxes and per-query top-k).
- ``recall``: the exact-tie recalls of a re-ranked pair, every tie mode
  (:func:`cmpagl.metrics.evaluate_retrieval` with ``scores_t2i``), cost N_img · N_txt: what a
  re-ranker's validation grid pays at every point.

ITC, SMR and the recalls run on random unit embeddings of the config's dimension d at sizes up
to twice RSICD's test split; ITM runs the config's model (fresh weights: the time does not
depend on them) on random images and generated captions, at smaller sizes (each pair is a pass
through the fusion layers). Each stage's time is fitted as t = a + c · cost by least squares
(a: the fixed cost of a call, c: seconds per unit of cost; R² printed), and its growth with
N_img as a power law beside the cost model's own exponent over the same sizes: a measured
exponent far above the model's says the stage does more work than its cost model, one below
it that fixed costs still dominate at these sizes.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from bench_record import load_average, write_record

from cmpagl import rerank as rr
from cmpagl.config import load_config
from cmpagl.metrics import evaluate_retrieval
from cmpagl.models.cmpagl import build_model
from cmpagl.retrieval import SplitEmbeddings, itc_scores, itm_rescore

CAPTIONS_PER_IMAGE = 5
WORDS = {
    "count": ["two", "three", "four", "many", "some"],
    "thing": ["planes", "ships", "cars", "buildings", "trees", "tanks", "houses"],
    "colour": ["white", "red", "green", "grey", "small", "large"],
    "place": ["runway", "harbour", "road", "river", "parking lot", "forest", "square"],
}


def captions(n: int, seed: int = 0) -> list[str]:
    """``n`` remote-sensing-like captions of varied length (some repeat, as in real splits)."""
    rnd = random.Random(seed)
    out = []
    for _ in range(n):
        w = {k: rnd.choice(v) for k, v in WORDS.items()}
        text = f"{w['count']} {w['colour']} {w['thing']} are near the {w['place']}"
        if rnd.random() < 0.5:
            text += f" with {rnd.choice(WORDS['count'])} {rnd.choice(WORDS['thing'])} around"
        out.append(text)
    return out


def fit(n_img: list[int], cost: list[float], seconds: list[float]) -> dict:
    """t = a + c · cost by least squares (a: the fixed cost of a call, c: seconds per unit of
    the cost model; R²), and the power laws of t and of the cost model in N_img."""
    x, t = np.asarray(cost, dtype=float), np.asarray(seconds, dtype=float)
    c, a = (float(v) for v in np.polyfit(x, t, 1))
    r2 = 1.0 - float(((t - a - c * x) ** 2).sum() / max(((t - t.mean()) ** 2).sum(), 1e-300))
    log_n = np.log(np.asarray(n_img, dtype=float))
    return {
        "seconds_per_unit": c,
        "fixed_seconds": a,
        "r2": r2,
        "exponent_measured": float(np.polyfit(log_n, np.log(t), 1)[0]),
        "exponent_model": float(np.polyfit(log_n, np.log(x), 1)[0]),
    }


def median_time(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def unit(n: int, d: int, gen: torch.Generator) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(n, d, generator=gen), dim=1)


def matrix_stages(sizes: list[int], dim: int, repeats: int) -> dict[str, list[dict]]:
    """ITC, SMR and the recalls of SMR's pair on random unit embeddings of dimension ``dim``."""
    rows: dict[str, list[dict]] = {"itc": [], "smr": [], "recall": []}
    gen = torch.Generator().manual_seed(0)
    for n in sizes:
        n_txt = CAPTIONS_PER_IMAGE * n
        image, text = unit(n, dim, gen), unit(n_txt, dim, gen)
        emb = SplitEmbeddings(image, text, *(torch.empty(0),) * 3, np.zeros(0), [])
        s = itc_scores(emb)
        t_itc = median_time(lambda emb=emb: itc_scores(emb), repeats)
        t_smr = median_time(lambda s=s: rr.smr(s, 0.05, 10, 0.2), repeats)
        pair, txt2img = rr.smr(s, 0.05, 10, 0.2), np.repeat(np.arange(n), CAPTIONS_PER_IMAGE)
        t_recall = median_time(
            lambda p=pair, t=txt2img: evaluate_retrieval(p.i2t, t, scores_t2i=p.t2i), repeats
        )
        base = {"n_img": n, "n_txt": n_txt}
        rows["itc"].append({**base, "cost": n * n_txt * dim, "seconds": t_itc})
        rows["smr"].append({**base, "cost": n * n_txt * math.log2(n_txt), "seconds": t_smr})
        rows["recall"].append({**base, "cost": n * n_txt, "seconds": t_recall})
    return rows


@torch.no_grad()
def embed(model, n_img: int, image_size: int, batch: int = 32) -> SplitEmbeddings:
    """Random images and generated captions through the encoders (fusion inputs kept)."""
    model.eval()
    gen = torch.Generator().manual_seed(1)
    feats = [
        model.encode_image(
            torch.randn(min(batch, n_img - i), 3, image_size, image_size, generator=gen)
        )
        for i in range(0, n_img, batch)
    ]
    texts = captions(CAPTIONS_PER_IMAGE * n_img)
    tok = model.tokenize(texts)
    txt = model.encode_text(tok["input_ids"], tok["attention_mask"])
    return SplitEmbeddings(
        torch.cat([f.embed for f in feats]),
        txt.embed,
        torch.cat([f.fusion for f in feats]),
        txt.hidden,
        txt.mask,
        np.repeat(np.arange(n_img), CAPTIONS_PER_IMAGE),
        texts,
    )


def prefix(emb: SplitEmbeddings, n_img: int) -> SplitEmbeddings:
    """The first ``n_img`` images and their captions."""
    n_txt = CAPTIONS_PER_IMAGE * n_img
    return SplitEmbeddings(
        emb.image_embed[:n_img],
        emb.text_embed[:n_txt],
        emb.image_fusion[:n_img],
        emb.text_hidden[:n_txt],
        emb.text_mask[:n_txt],
        emb.txt2img[:n_txt],
        emb.captions[:n_txt],
    )


def itm_stage(config: str, sizes: list[int], k: int) -> list[dict]:
    """ITM on each query's top-k with the config's model, one run per size after a warm-up."""
    cfg = load_config(config)
    torch.manual_seed(0)
    model = build_model(cfg.model, use_momentum=False).eval()
    full = embed(model, max(sizes), cfg.data.image_size)
    rows = []
    for i, n in enumerate(sizes):
        emb = prefix(full, n)
        s = itc_scores(emb)
        if i == 0:
            itm_rescore(model, emb, s, k)  # warm-up
        start = time.perf_counter()
        out = itm_rescore(model, emb, s, k)
        seconds = time.perf_counter() - start
        rows.append(
            {
                "n_img": n,
                "n_txt": len(emb.captions),
                "k": k,
                "cost": out.n_evals,
                "seconds": seconds,
            }
        )
    return rows


MODELS = {
    "itc": "N_img·N_txt·d",
    "itm": "fused pairs ≈ (N_img+N_txt)·k",
    "smr": "N_img·N_txt·log2 N_txt",
    "recall": "N_img·N_txt",
}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/synthetic_tiny.yaml")
    ap.add_argument("--sizes", type=int, nargs="+", default=[137, 273, 546, 1093, 2186])
    ap.add_argument("--itm-sizes", type=int, nargs="+", default=[8, 16, 32, 64])
    ap.add_argument("--itm-k", type=int, default=2)
    # SMR's new matrices come from the kernel page by page, and now and then a call waits
    # several times longer for them: the median of 3 took those for the trend (R² 0.75)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--out", help="write the record here (JSON)")
    args = ap.parse_args(argv)
    load = load_average()
    dim = load_config(args.config).model.embed_dim
    print(
        f"{torch.get_num_threads()} threads, load average before: {load}; ITC/SMR/recall on random "
        f"d={dim} embeddings, ITM with the model of {args.config} (k={args.itm_k})"
    )
    stages = matrix_stages(args.sizes, dim, args.repeats)
    stages["itm"] = itm_stage(args.config, args.itm_sizes, args.itm_k)
    result: dict = {"config": args.config, "threads": torch.get_num_threads(), "stages": {}}
    for name in ("itc", "itm", "smr", "recall"):
        rows = stages[name]
        fitted = fit(
            [r["n_img"] for r in rows], [r["cost"] for r in rows], [r["seconds"] for r in rows]
        )
        result["stages"][name] = {"cost_model": MODELS[name], "rows": rows, "fit": fitted}
        print(f"\n{name}: cost model {MODELS[name]}")
        print(f"  {'N_img':>6s} {'N_txt':>6s} {'cost':>12s} {'seconds':>9s} {'fit s':>9s}")
        for r in rows:
            pred = fitted["fixed_seconds"] + fitted["seconds_per_unit"] * r["cost"]
            size = f"{r['n_img']:6d} {r['n_txt']:6d} {r['cost']:12.4g}"
            print(f"  {size} {r['seconds']:9.4f} {pred:9.4f}")
        grows = f"N_img^{fitted['exponent_measured']:.2f}"
        print(
            f"  t ≈ {fitted['fixed_seconds']:.3g} s + {fitted['seconds_per_unit']:.3g} s · cost "
            f"(R² {fitted['r2']:.3f}); grows as "
            f"{grows}, cost model N_img^{fitted['exponent_model']:.2f}"
        )
    print(f"\nload average after: {load_average()}")
    if args.out:
        write_record(args.out, result, load_before=load)
    return result


if __name__ == "__main__":
    main()
