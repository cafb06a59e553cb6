"""experiments/smr_evidence.py's cross-fit: the halves of a split and the scores held out."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from cmpagl.metrics import evaluate_retrieval


@pytest.fixture(scope="module")
def evidence(repo_root):
    spec = importlib.util.spec_from_file_location(
        "smr_evidence", repo_root / "experiments" / "smr_evidence.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_half_keeps_its_images_captions_and_renumbers_them(evidence):
    s = torch.arange(32, dtype=torch.float32).reshape(4, 8)
    txt2img = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    captions = [f"c{i}" for i in range(8)]
    sub, t, c = evidence._half(s, txt2img, captions, torch.tensor([1, 3]))
    assert torch.equal(sub, s[[1, 3]][:, [2, 3, 6, 7]])
    assert t.tolist() == [0, 0, 1, 1] and c == ["c2", "c3", "c6", "c7"]


def test_the_cross_fit_scores_each_half_with_what_the_other_chose(evidence):
    g = torch.Generator().manual_seed(0)
    txt2img = torch.arange(12).repeat_interleave(3)
    s = torch.randn(12, 36, generator=g) + 0.8 * torch.nn.functional.one_hot(txt2img).T
    captions = [f"c{i}" for i in range(36)]
    axes = {"tau_s": [0.05], "k": [3], "lam": [0.5]}
    out = evidence._cross_fit(s, txt2img, captions, axes, "max")
    halves = [torch.arange(0, 12, 2), torch.arange(1, 12, 2)]
    none = [
        evaluate_retrieval(*evidence._half(s, txt2img, captions, h)[:2])["r_mean"] for h in halves
    ]
    assert out["none"] == pytest.approx(sum(none) / 2)
    assert len(out["folds"]) == 2
    # a perfect ranking leaves nothing to re-rank: every fold keeps 100
    perfect = evidence._cross_fit(
        torch.nn.functional.one_hot(txt2img).T.float(), txt2img, captions, axes, "max"
    )
    assert perfect["none"] == pytest.approx(100.0) and perfect["chosen"] == pytest.approx(100.0)


def test_the_widening_table_reads_the_record():
    from cmpagl.study import grid_widening_markdown

    def side(value, k, fit):
        params = None if k is None else {"tau_s": 0.05, "k": k, "lam": 1.0}
        return {
            "val_value": value,
            "val_off_value": 10.0,
            "params": params,
            "cross_fit": {"none": 20.0, "chosen": fit},
        }

    record = {
        "runs": [
            {
                "checkpoint": "runs/s/a/seed0",
                "default": side(12.0, 50, 22.0),
                "wide": side(12.5, 200, 21.5),
            },
            {
                "checkpoint": "runs/s/b/seed1",
                "default": side(10.0, None, 20.0),
                "wide": side(10.3, 1000, 20.5),
            },
        ],
        "wide_minus_default_val": [0.5, 0.3],
        "wide_minus_default_cross_fit": [-0.5, 0.5],
    }
    text = grid_widening_markdown(record)
    assert "| a/seed0 | 10.00 | 12.00 (50) | 12.50 (200) | 20.00 | 22.00 | 21.50 |" in text
    assert "| b/seed1 | 10.00 | 10.00 (off) | 10.30 (1000) |" in text
    assert "over 2 checkpoints, mean (range): +0.40 (+0.30 to +0.50)" in text
    assert "+0.00 (-0.50 to +0.50) in the cross-fit" in text
