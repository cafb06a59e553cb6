"""evaluate_model on a tiny model and the small synthetic dataset: the result file holds every
re-ranker's metrics, SMR parameters chosen on val only, timings and provenance, and the saved
matrices reproduce the reported numbers."""

from __future__ import annotations

import dataclasses
import json
import math
import re

import numpy as np
import pytest
import torch

import cmpagl.evaluate as ev
from cmpagl import rerank as rr
from cmpagl.config import DataConfig, ExperimentConfig, ModelConfig, RetrievalConfig, to_dict
from cmpagl.data.build import dataset_from_config, transforms_from_config
from cmpagl.metrics import TieRanks, i2t_ranks, t2i_ranks
from cmpagl.models.cmpagl import build_model
from cmpagl.models.pretrained import load_pretrained
from cmpagl.retrieval import embed_split, itc_scores

ALL = ("none", "itm", "smr", "itm+smr", "dual_softmax", "inverted_softmax", "galr")
STANDARD = ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean")


@pytest.fixture(scope="module")
def cfg(small_synthetic) -> ExperimentConfig:
    model = ModelConfig(embed_dim=32, queue_size=16)
    model.gswin = dataclasses.replace(
        model.gswin, img_size=32, embed_dim=16, depths=(2, 2), num_heads=(2, 4)
    )
    # name != "synthetic": load the fixture's 64 px files as they are (resized to 32 px)
    data = DataConfig(name="small", root=str(small_synthetic), image_size=32, num_workers=0)
    retrieval = RetrievalConfig(
        batch_size=64,
        itm_grid_k=(2, 4),
        smr_grid_tau=(0.01, 0.1),
        smr_grid_k=(2, 5),
        smr_grid_lambda=(0.1, 1.0),
        galr_grid_k=(2, 5),
        galr_grid_wp1=(),  # an empty axis: its fixed value (retrieval.galr_wp1)
    )
    return ExperimentConfig(seed=0, model=model, data=data, retrieval=retrieval)


@pytest.fixture(scope="module")
def model(cfg):
    torch.manual_seed(0)
    model = build_model(cfg.model, use_momentum=False)
    load_pretrained(model)  # the MiniLM text weights, as training starts from
    return model


@pytest.fixture(scope="module")
def run(cfg, model, tmp_path_factory):
    """One evaluation with every re-ranker; records what each grid search receives."""
    calls = []
    search = rr.grid_search

    def spy(rerank_fn, s_val, txt2img_val, axes, captions_val=None, **kwargs):
        calls.append((rr.as_ranking(s_val), np.asarray(txt2img_val), list(captions_val), axes))
        return search(rerank_fn, s_val, txt2img_val, axes, captions_val, **kwargs)

    out = tmp_path_factory.mktemp("eval")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rr, "grid_search", spy)
        result = ev.evaluate_model(
            model, cfg, "test", ALL, checkpoint="runs/x/best.pt", out_dir=out
        )
    return result, out, calls


def test_result_file_holds_every_reranker(run):
    result, out, _ = run
    on_disk = json.loads((out / "results_test.json").read_text())
    assert on_disk == json.loads(json.dumps(result))
    assert list(on_disk["metrics"]) == list(ALL)
    for name, m in on_disk["metrics"].items():
        for key in STANDARD:
            for variant in (key, f"{key}_pess", f"{key}_index", f"dup_{key}"):
                assert variant in m, (name, variant)
            assert 0.0 <= m[key] <= 100.0
        assert not any(k.startswith("oracle_") for k in m)
    assert set(on_disk["oracle"]) == {f"oracle_{k}" for k in STANDARD}
    # the chance level beside it: 10 images with 5 captions each, closed form by hand
    chance = on_disk["chance"]
    assert chance["chance_img_r5"] == pytest.approx(100 * 5 / 10)
    none_in_1 = 45 / 50  # image->text R@1: one of the 50 captions, 5 of them its own
    assert chance["chance_txt_r1"] == pytest.approx(100 * (1 - none_in_1))
    assert set(on_disk["tie_conventions"]) == {"", "_pess", "_index"}
    assert on_disk["n_images"] == 10 and on_disk["n_captions"] == 50


def test_every_reranker_is_tuned_on_val_alike(run, cfg):
    """The same treatment for all: a val grid with "no re-ranking" first, the earliest strict
    best, its size and edge flags in the result file."""
    result, _, calls = run
    val = dataset_from_config(cfg.data).split("val")
    test = dataset_from_config(cfg.data).split("test")
    tuning = result["tuning"]
    assert list(tuning) == [n for n in ALL if n != "none"]
    assert len(calls) == len(tuning)  # one search each, on val arrays only
    for s_val, txt2img, captions, _ in calls:
        assert captions == val.all_captions and captions != test.all_captions
        assert np.array_equal(txt2img, val.txt2img)
        assert s_val.i2t.shape == (val.num_images, val.num_captions)
    expected_axes = {
        "itm": {"itm_k": [2, 4]},
        "smr": {"tau_s": [0.01, 0.1], "k": [2, 5], "lam": [0.1, 1.0]},
        "itm+smr": {"tau_s": [0.01, 0.1], "k": [2, 5], "lam": [0.1, 1.0]},
        "dual_softmax": {"tau": list(cfg.retrieval.dual_softmax_grid_tau)},
        "inverted_softmax": {"tau": list(cfg.retrieval.inverted_softmax_grid_tau)},
        "galr": {
            "k": [2, 5],
            "wp1": [cfg.retrieval.galr_wp1],
            "wp2": list(cfg.retrieval.galr_grid_wp2),
            "decay": list(cfg.retrieval.galr_grid_decay),
        },
    }
    for name, choice in tuning.items():
        assert choice["source"] == "val grid search"
        assert choice["grid"] == expected_axes[name]
        assert choice["grid_size"] == 1 + math.prod(len(v) for v in choice["grid"].values())
        table = choice["val_grid"]
        assert len(table) == choice["grid_size"] and table[0]["off"] is True
        best = max(row["r_mean"] for row in table)
        first = next(row for row in table if row["r_mean"] >= best - rr.GRID_TOLERANCE)
        if first.get("off"):
            assert choice["params"] is None and choice["off"]
            assert set(choice["on_edge"].values()) == {None}
        else:
            assert choice["params"] == {a: first[a] for a in choice["grid"]}
            for axis, values in choice["grid"].items():
                edge = choice["on_edge"][axis]
                chosen = choice["params"][axis]
                assert edge is (None if len(values) == 1 else chosen in (min(values), max(values)))
    # ITM: the val split was scored once, for the largest k; itm+smr starts from itm's choice
    assert result["itm"]["val_k"] == 4
    itm_params = tuning["itm"]["params"]
    assert tuning["itm+smr"]["itm_k"] == (None if itm_params is None else itm_params["itm_k"])
    assert result["smr"]["smr"]["params"].keys() == {"tau_s", "k", "lam"}


def test_timings_and_provenance(run, cfg):
    result, _, _ = run
    t = result["timings"]
    assert set(t["rerank_s"]) == set(ALL)
    assert all(v >= 0 for v in t["rerank_s"].values())
    if result["itm"]["k"] is not None:  # includes the ITM passes
        assert t["rerank_s"]["itm+smr"] >= t["rerank_s"]["itm"] > 0
        assert result["itm"]["n_evals"] <= result["itm"]["n_pairs"]
    assert t["embed_s"] > 0 and t["embed_val_s"] > 0 and t["itm_val_s"] > 0
    assert set(t["grid_s"]) == set(result["tuning"])
    assert result["config"] == json.loads(json.dumps(to_dict(cfg)))
    assert result["checkpoint"] == "runs/x/best.pt"
    commit = result["git_commit"]
    assert commit is None or re.fullmatch(r"[0-9a-f]{40}(-dirty)?", commit)
    assert result["torch"] == torch.__version__
    assert result["hardware"]["cpu_count"] >= 1 and result["hardware"]["device"] == "cpu"


def r_mean_from_counts(counts_i2t, counts_t2i, index: bool = False) -> float:
    ranks = [TieRanks(*c.long()) for c in (counts_i2t, counts_t2i)]
    hits = [(r.index_hits() if index else r.hit_probability()).mean(0) for r in ranks]
    return float(torch.cat(hits).mean() * 100)


def test_saved_matrices_reproduce_the_reported_numbers(run, cfg):
    result, out, _ = run
    saved = torch.load(out / "scores_test.pt")
    metrics, txt2img, captions = result["metrics"], saved["txt2img"], saved["captions"]
    assert saved["S_opt_from"] == "itm+smr" and saved["itm_k"] == result["itm"]["k"]
    params = result["tuning"]["itm+smr"]["params"]
    scale = cfg.retrieval.smr_scale
    if saved["itm_k"] is None:  # val chose no ITM: S_raw is S_itc
        assert saved["S_raw_from"] == "none"
        assert torch.equal(saved["S_raw"]["i2t"], saved["S_itc"].double())
        s_raw, s_prob = tuple(saved["S_raw"].values()), None
    else:  # S_raw and the gap-free scores SMR read are rebuilt from p_match
        assert saved["S_raw_from"] == "itm"
        stage = rr.itm_scores(saved["S_itc"], saved["p_match"], saved["itm_k"])
        assert torch.equal(stage.s_raw.i2t, saved["S_raw"]["i2t"])
        assert torch.equal(stage.s_raw.t2i, saved["S_raw"]["t2i"])
        s_raw, s_prob = stage.s_raw, stage.s_prob
    pairs = {"none": saved["S_itc"], "itm": s_raw, "itm+smr": tuple(saved["S_opt"].values())}
    for name, scores in pairs.items():
        again = rr.evaluate_ranking(scores, txt2img, captions)
        assert again == {k: v for k, v in metrics[name].items() | result["oracle"].items()}
    # S_opt is SMR of S_raw with the parameters chosen on val
    s_opt = s_raw if params is None else rr.smr(s_raw, **params, s_prob=s_prob, scale=scale)
    assert torch.equal(rr.as_ranking(s_opt).i2t, saved["S_opt"]["i2t"])
    # per-query statistics of every re-ranker give its r_mean, expected and index-order
    for name in ALL:
        ranks = saved["ranks"][name]
        assert ranks["i2t_expected_rank"].shape == (10,) and ranks["t2i_counts"].shape == (4, 50)
        got = r_mean_from_counts(ranks["i2t_counts"], ranks["t2i_counts"])
        assert got == pytest.approx(metrics[name]["r_mean"], abs=1e-9)
        got = r_mean_from_counts(ranks["i2t_counts"], ranks["t2i_counts"], index=True)
        assert got == pytest.approx(metrics[name]["r_mean_index"], abs=1e-9)
    s_itc = saved["S_itc"]
    assert torch.equal(
        saved["ranks"]["none"]["i2t_expected_rank"], i2t_ranks(s_itc, txt2img).expected_rank
    )
    assert torch.equal(
        saved["ranks"]["none"]["t2i_counts"][0].long(), t2i_ranks(s_itc, txt2img).above
    )


def test_every_reranker_runs_by_default():
    assert ev.DEFAULT_RERANKERS == ALL  # inverted softmax included
    assert set(ev.SETTINGS) == set(ALL) - {"none"}  # and every one with settings is tuned


def test_unknown_reranker_is_rejected_before_any_work(cfg):
    with pytest.raises(ValueError, match="unknown re-ranker.*known: none, itm"):
        ev.evaluate_model(None, cfg, rerankers=("none", "albef"))


def test_val_split_alone_and_without_scores(cfg, model, tmp_path):
    result = ev.evaluate_model(
        model, cfg, "val", ("none", "smr"), out_dir=tmp_path, save_scores=False
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results_val.json"]
    assert result["timings"]["embed_val_s"] == result["timings"]["embed_s"]  # embedded once
    assert result["itm"] is None and set(result["metrics"]) == {"none", "smr"}


def test_fixed_settings_are_said_to_be_fixed(cfg, model, tmp_path):
    """All axes of a re-ranker empty: its fixed values, no val search, and the file says so."""
    fixed = dataclasses.replace(
        cfg, retrieval=dataclasses.replace(cfg.retrieval, dual_softmax_grid_tau=())
    )
    result = ev.evaluate_model(
        model, fixed, "test", ("none", "dual_softmax"), out_dir=tmp_path, save_scores=False
    )
    choice = result["tuning"]["dual_softmax"]
    assert choice["source"] == "config" and choice["params"] == {"tau": 0.01}
    assert "retrieval.dual_softmax_grid_tau" in choice["note"] and choice["grid_size"] == 0
    assert result["timings"]["embed_val_s"] is None  # nothing to search: val never embedded
    test = dataset_from_config(cfg.data).split("test")
    emb = embed_split(model, test, transforms_from_config(cfg.data)[1], keep_fusion=False)
    again = rr.evaluate_ranking(rr.dual_softmax(itc_scores(emb), 0.01), test.txt2img)
    assert again["r_mean"] == pytest.approx(result["metrics"]["dual_softmax"]["r_mean"])


def test_identical_captions_get_identical_text_features(small_synthetic, model):
    """embed_split encodes each distinct string once, so identical captions tie exactly
    (METHOD §4) whatever the batch layout."""
    from cmpagl.data import load_dataset
    from cmpagl.data.transforms import build_eval_transform

    ds = load_dataset(small_synthetic).split("train")
    size = model.cfg.gswin.img_size
    emb = embed_split(model, ds, build_eval_transform(size), batch_size=7)
    first: dict[str, int] = {}
    repeated = 0
    for j, text in enumerate(emb.captions):
        i = first.setdefault(text, j)
        if i != j:
            repeated += 1
            assert torch.equal(emb.text_embed[i], emb.text_embed[j])
            assert torch.equal(emb.text_hidden[i], emb.text_hidden[j])
    assert repeated > 0


# --------------------------------------------------------------------------------------------
# Reading an evaluation back, the chance level, paired differences (the retrieval chapter)
# --------------------------------------------------------------------------------------------
def test_evaluate_or_read_reads_only_an_evaluation_that_answers(run, cfg, tmp_path, monkeypatch):
    import os
    import shutil

    result, out, _ = run
    checkpoint = tmp_path / "best"
    checkpoint.mkdir()
    (checkpoint / "meta.json").write_text("{}")
    written = (out / "results_test.json").stat().st_mtime
    os.utime(checkpoint / "meta.json", (written - 60, written - 60))  # trained before
    calls = []

    def evaluate(model, cfg, split, rerankers, **kwargs):
        calls.append((split, tuple(rerankers), kwargs))
        return {"evaluated": True}

    monkeypatch.setattr(ev, "evaluate_model", evaluate)
    got, was_read = ev.evaluate_or_read(None, cfg, checkpoint, out, "test", ALL)
    assert was_read and got == json.loads(json.dumps(result)) and not calls
    assert ev.evaluate_or_read(None, cfg, checkpoint, out, "test", ("none", "smr"))[1]
    # a checkpoint newer than the result, other grids, another split: evaluated again
    other = dataclasses.replace(
        cfg, retrieval=dataclasses.replace(cfg.retrieval, smr_grid_k=(2, 5, 10))
    )
    assert ev.evaluate_or_read(None, other, checkpoint, out, "test", ALL) == (
        {"evaluated": True},
        False,
    )
    assert not ev.evaluate_or_read(None, cfg, checkpoint, out, "val", ALL)[1]
    os.utime(checkpoint / "meta.json", (written + 60, written + 60))
    assert not ev.evaluate_or_read(None, cfg, checkpoint, out, "test", ALL)[1]
    split, names, kwargs = calls[-1]
    assert (split, names) == ("test", ALL)
    assert kwargs["checkpoint"] == str(checkpoint) and kwargs["out_dir"] == out
    # a result without its scores file does not answer (the chapter reads the matrices)
    os.utime(checkpoint / "meta.json", (written - 60, written - 60))
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy2(out / "results_test.json", alone / "results_test.json")
    assert ev.saved_evaluation(alone, "test", checkpoint, cfg, ALL) is None
    assert ev.saved_evaluation(out, "test", checkpoint, cfg, ALL) is not None
    # a file of the older format, without the chance level, is evaluated again
    older = tmp_path / "older"
    shutil.copytree(out, older)
    content = json.loads((older / "results_test.json").read_text())
    del content["chance"]
    (older / "results_test.json").write_text(json.dumps(content))
    assert ev.saved_evaluation(older, "test", checkpoint, cfg, ALL) is None


def naive_bootstrap_r_mean(hits, txt2img, idx) -> float:
    """r_mean of one resample of images (loops): their image->text hits, their captions'
    text->image hits, the six recalls averaged."""
    i2t, t2i = hits
    ks = range(i2t.shape[1])
    txt = [sum(float(i2t[i, k]) for i in idx) / len(idx) for k in ks]
    caps = [c for i in idx for c in np.flatnonzero(txt2img == i)]
    img = [sum(float(t2i[c, k]) for c in caps) / len(caps) for k in ks]
    return 100 * (sum(txt) + sum(img)) / (2 * len(ks))


def test_r_mean_difference_is_a_paired_bootstrap_over_images(run):
    result, out, _ = run
    saved = torch.load(out / "scores_test.pt")
    ranks, txt2img = saved["ranks"], saved["txt2img"].numpy()
    metrics = result["metrics"]
    d = ev.r_mean_difference(ranks["dual_softmax"], ranks["none"], txt2img, n_boot=50, seed=3)
    expected = metrics["dual_softmax"]["r_mean"] - metrics["none"]["r_mean"]
    assert d.diff == pytest.approx(expected, abs=1e-9)
    # the interval: quantiles of the same resamples computed with loops
    hits = {n: ev.query_hits(ranks[n]) for n in ("dual_softmax", "none")}
    idx = torch.randint(10, (50, 10), generator=torch.Generator().manual_seed(3))
    boot = [
        naive_bootstrap_r_mean(hits["dual_softmax"], txt2img, row.tolist())
        - naive_bootstrap_r_mean(hits["none"], txt2img, row.tolist())
        for row in idx
    ]
    low, high = np.quantile(boot, [0.025, 0.975])
    assert (d.low, d.high) == (pytest.approx(low), pytest.approx(high))
    # a re-ranker against itself: nothing to resolve
    same = ev.r_mean_difference(ranks["none"], ranks["none"], txt2img, n_boot=20)
    assert (same.diff, same.low, same.high, same.resolved) == (0.0, 0.0, 0.0, False)
    # a perfect re-ranker against one that never hits: 100 points, whatever the resample
    n_img, n_txt = len(hits["none"][0]), len(txt2img)
    zeros = {f"{side}_counts": torch.zeros(4, n) for side, n in (("i2t", n_img), ("t2i", n_txt))}
    perfect = {k: v.index_fill(0, torch.tensor([2]), 1) for k, v in zeros.items()}
    never = {
        k: v.index_fill(0, torch.tensor([0]), 1000).index_fill(0, torch.tensor([2]), 1)
        for k, v in zeros.items()
    }
    far = ev.r_mean_difference(perfect, never, txt2img, n_boot=20)
    assert (far.diff, far.low, far.high, far.resolved) == (100.0, 100.0, 100.0, True)
    with pytest.raises(ValueError, match="different splits"):
        ev.r_mean_difference(ranks["none"], ranks["none"], txt2img[:-1])
