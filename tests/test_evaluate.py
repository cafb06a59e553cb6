"""evaluate_model on a tiny model and the small synthetic dataset: the result file holds every
re-ranker's metrics, SMR parameters chosen on val only, timings and provenance, and the saved
matrices reproduce the reported numbers."""

from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import pytest
import torch

import cmpagl.evaluate as ev
from cmpagl import rerank as rr
from cmpagl.config import DataConfig, ExperimentConfig, ModelConfig, RetrievalConfig, to_dict
from cmpagl.data.build import dataset_from_config
from cmpagl.metrics import TieRanks, i2t_ranks, t2i_ranks
from cmpagl.models.cmpagl import build_model

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
        itm_k=2,
        smr_grid_tau=(0.01, 0.1),
        smr_grid_k=(2, 5),
        smr_grid_lambda=(0.1, 1.0),
    )
    return ExperimentConfig(seed=0, model=model, data=data, retrieval=retrieval)


@pytest.fixture(scope="module")
def model(cfg):
    torch.manual_seed(0)
    return build_model(cfg.model, use_momentum=False)


@pytest.fixture(scope="module")
def run(cfg, model, tmp_path_factory):
    """One evaluation with every re-ranker; records what grid_search_smr receives."""
    calls = []

    def spy(s_raw_val, txt2img_val, captions_val, *args, **kwargs):
        calls.append((rr.as_ranking(s_raw_val), np.asarray(txt2img_val), list(captions_val)))
        return rr.grid_search_smr(s_raw_val, txt2img_val, captions_val, *args, **kwargs)

    out = tmp_path_factory.mktemp("eval")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ev, "grid_search_smr", spy)
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
            assert key in m and f"{key}_pess" in m and f"dup_{key}" in m, name
            assert 0.0 <= m[key] <= 100.0
        assert not any(k.startswith("oracle_") for k in m)
    assert set(on_disk["oracle"]) == {f"oracle_{k}" for k in STANDARD}
    assert on_disk["n_images"] == 10 and on_disk["n_captions"] == 50


def test_smr_params_are_chosen_on_val_only(run, cfg):
    result, _, calls = run
    val = dataset_from_config(cfg.data).split("val")
    test = dataset_from_config(cfg.data).split("test")
    assert len(calls) == 2  # smr on S_itc, itm+smr on the ITM S_raw
    for s_raw, txt2img, captions in calls:
        assert captions == val.all_captions and captions != test.all_captions
        assert np.array_equal(txt2img, val.txt2img)
        assert s_raw.i2t.shape == (val.num_images, val.num_captions)
    for name in ("smr", "itm+smr"):
        choice = result["smr"][name]
        table = choice["val_grid"]
        assert choice["source"] == "val grid search"
        assert len(table) == 2 * 2 * 3  # λ = 0 added
        best = max(row["r_mean"] for row in table)
        first = next(row for row in table if row["r_mean"] >= best - rr.GRID_TOLERANCE)
        assert choice["params"] == {"tau_s": first["tau_s"], "k": first["k"], "lam": first["lam"]}


def test_timings_and_provenance(run, cfg):
    result, _, _ = run
    t = result["timings"]
    assert set(t["rerank_s"]) == set(ALL)
    assert all(v >= 0 for v in t["rerank_s"].values())
    assert t["rerank_s"]["itm+smr"] >= t["rerank_s"]["itm"] > 0  # includes the ITM passes
    assert t["embed_s"] > 0 and t["embed_val_s"] > 0
    assert result["itm"]["n_evals"] <= result["itm"]["n_pairs"]
    assert result["config"] == json.loads(json.dumps(to_dict(cfg)))
    assert result["checkpoint"] == "runs/x/best.pt"
    commit = result["git_commit"]
    assert commit is None or re.fullmatch(r"[0-9a-f]{40}(-dirty)?", commit)
    assert result["torch"] == torch.__version__
    assert result["hardware"]["cpu_count"] >= 1 and result["hardware"]["device"] == "cpu"


def r_mean_from_counts(counts_i2t, counts_t2i) -> float:
    hits = [TieRanks(*c.long()).hit_probability().mean(0) for c in (counts_i2t, counts_t2i)]
    return float(torch.cat(hits).mean() * 100)


def test_saved_matrices_reproduce_the_reported_numbers(run):
    result, out, _ = run
    saved = torch.load(out / "scores_test.pt")
    metrics, txt2img, captions = result["metrics"], saved["txt2img"], saved["captions"]
    assert saved["S_raw_from"] == "itm" and saved["S_opt_from"] == "itm+smr"
    pairs = {
        "none": saved["S_itc"],
        "itm": tuple(saved["S_raw"].values()),
        "itm+smr": tuple(saved["S_opt"].values()),
    }
    for name, scores in pairs.items():
        again = rr.evaluate_ranking(scores, txt2img, captions)
        assert again == {k: v for k, v in metrics[name].items() | result["oracle"].items()}
    # S_opt is SMR of S_raw with the parameters chosen on val
    s_opt = rr.smr(tuple(saved["S_raw"].values()), **result["smr"]["itm+smr"]["params"])
    assert torch.equal(s_opt.i2t, saved["S_opt"]["i2t"])
    # per-query statistics of every re-ranker give its r_mean
    for name in ALL:
        ranks = saved["ranks"][name]
        assert ranks["i2t_expected_rank"].shape == (10,) and ranks["t2i_counts"].shape == (3, 50)
        got = r_mean_from_counts(ranks["i2t_counts"], ranks["t2i_counts"])
        assert got == pytest.approx(metrics[name]["r_mean"], abs=1e-9)
    s_itc = saved["S_itc"]
    assert torch.equal(
        saved["ranks"]["none"]["i2t_expected_rank"], i2t_ranks(s_itc, txt2img).expected_rank
    )
    assert torch.equal(
        saved["ranks"]["none"]["t2i_counts"][0].long(), t2i_ranks(s_itc, txt2img).above
    )


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


def test_identical_captions_get_identical_text_features(small_synthetic, model):
    """embed_split encodes each distinct string once, so identical captions tie exactly
    (METHOD §4) whatever the batch layout."""
    from cmpagl.data import load_dataset
    from cmpagl.data.transforms import build_eval_transform
    from cmpagl.retrieval import embed_split

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
