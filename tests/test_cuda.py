"""CUDA: the paths the CPU suite cannot reach. Mixed precision trains (bf16, and fp16 with its
gradient scaler), checkpoints come back as fp32 on the CPU, CUDA and CPU embed a split alike, a
deterministic CUDA run killed mid-epoch resumes exactly, and ``cmpagl evaluate`` runs every
re-ranker on the GPU.

Skipped without a CUDA device; on a GPU machine: ``pytest tests/test_cuda.py``."""

from __future__ import annotations

import dataclasses
import json
import math
import signal
from pathlib import Path

import pytest
import torch
from test_train import run_helper, stable, tiny_config, tiny_data  # noqa: F401 (a fixture)

from cmpagl.checkpoint import load_checkpoint, read_meta
from cmpagl.cli import main
from cmpagl.config import save_config
from cmpagl.runlog import read_log
from cmpagl.train import _amp_dtype, train

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device (these tests run on a GPU machine)"
)

LOSSES = ("itc", "tri", "itm", "mlm", "total", "grad_norm")


def _train_steps(log_dir: Path) -> list[dict]:
    return [r for r in read_log(log_dir) if r["kind"] == "train"]


@pytest.fixture(scope="module")
def cuda_run(tiny_data, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("cuda_run")
    cfg = tiny_config(tiny_data, out, device="cuda", amp=True)
    return cfg, train(cfg, config_path="tiny.yaml")


def test_amp_dtype_is_bf16_where_the_gpu_has_it(cuda_run):
    cfg, _ = cuda_run
    cuda = torch.device("cuda")
    expected = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    assert _amp_dtype(cfg.train, cuda) == expected
    assert _amp_dtype(cfg.train, torch.device("cpu")) is None
    assert _amp_dtype(dataclasses.replace(cfg.train, amp=False), cuda) is None


def test_amp_run_trains_and_saves_fp32_weights(cuda_run):
    cfg, result = cuda_run
    steps = _train_steps(cfg.output_dir)
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(r[k]) for r in steps for k in LOSSES)
    assert math.isfinite(result.best_r_mean) and result.samples_per_s > 0
    model, _, state = load_checkpoint(cfg.output_dir)  # map_location="cpu"
    tensors = list(model.state_dict().values())
    assert all(t.device.type == "cpu" for t in tensors)
    assert all(t.dtype == torch.float32 for t in tensors if t.is_floating_point())
    assert state["step"] == result.best_step


def test_cuda_and_cpu_embed_a_split_alike(cuda_run):
    """fp32 on both devices: the same embeddings to 1e-4 and the same ranking metrics; under
    the training's autocast (what per-epoch validation uses) within bf16 rounding."""
    from cmpagl.data.build import dataset_from_config, transforms_from_config
    from cmpagl.metrics import evaluate_retrieval
    from cmpagl.retrieval import embed_split, itc_scores

    cfg, _ = cuda_run
    model, _, _ = load_checkpoint(cfg.output_dir)
    val = dataset_from_config(cfg.data).split("val")
    transform = transforms_from_config(cfg.data)[1]
    cpu = embed_split(model, val, transform, device="cpu", keep_fusion=False)
    model.cuda()
    gpu = embed_split(model, val, transform, device="cuda", keep_fusion=False)
    with torch.autocast("cuda", dtype=_amp_dtype(cfg.train, torch.device("cuda"))):
        amp = embed_split(model, val, transform, device="cuda", keep_fusion=False)
    for e in (cpu, gpu, amp):
        assert e.image_embed.dtype == e.text_embed.dtype == torch.float32
    torch.testing.assert_close(gpu.image_embed, cpu.image_embed, atol=1e-4, rtol=0)
    torch.testing.assert_close(gpu.text_embed, cpu.text_embed, atol=1e-4, rtol=0)
    torch.testing.assert_close(amp.image_embed, cpu.image_embed, atol=3e-2, rtol=0)
    torch.testing.assert_close(amp.text_embed, cpu.text_embed, atol=3e-2, rtol=0)
    m_cpu = evaluate_retrieval(itc_scores(cpu), cpu.txt2img, cpu.captions)
    m_gpu = evaluate_retrieval(itc_scores(gpu), gpu.txt2img, gpu.captions)
    assert m_gpu["r_mean"] == pytest.approx(m_cpu["r_mean"], abs=1e-6)


def test_fp16_uses_the_grad_scaler_and_saves_its_state(tiny_data, tmp_path, monkeypatch):  # noqa: F811
    """The path of GPUs without bf16 (V100, T4): fp16 autocast and a GradScaler. A step whose
    scaled gradients overflow logs grad_norm inf and is skipped, halving the scale (from 2^16);
    the losses stay finite and the checkpoint keeps the scaler's state."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    cfg = tiny_config(tiny_data, tmp_path / "fp16", device="cuda", amp=True, epochs=1)
    assert _amp_dtype(cfg.train, torch.device("cuda")) == torch.float16
    train(cfg, config_path="tiny.yaml")
    steps = _train_steps(tmp_path / "fp16")
    assert len(steps) == 3
    assert all(math.isfinite(r[k]) for r in steps for k in LOSSES if k != "grad_norm")
    skipped = sum(not math.isfinite(r["grad_norm"]) for r in steps)
    state = torch.load(tmp_path / "fp16" / "last" / "state.pt", weights_only=False)
    assert state["scaler"]["scale"] == 2.0**16 * 0.5**skipped  # a disabled scaler saves {}


def test_deterministic_cuda_run_resumes_exactly(tiny_data, tmp_path):  # noqa: F811
    """``train.deterministic=always`` with AMP on CUDA: run B, SIGKILLed after step 5 and
    resumed in a new process, ends identical to the uninterrupted run A (each in a fresh
    process, so CUBLAS_WORKSPACE_CONFIG is set before the first cuBLAS call)."""
    runs = {}
    for name in ("a", "b"):
        cfg = tiny_config(tiny_data, tmp_path / name, device="cuda", deterministic="always")
        runs[name] = save_config(cfg, tmp_path / f"{name}.yaml")
    done = run_helper(runs["a"])
    assert done.returncode == 0, done.stderr[-2000:]
    killed = run_helper(runs["b"], "--kill-after-step", "5")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert read_meta(tmp_path / "b" / "last")["step"] == 4
    resumed = run_helper(runs["b"], "--resume", str(tmp_path / "b"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert stable(read_log(tmp_path / "b")) == stable(read_log(tmp_path / "a"))
    sd_a = load_checkpoint(tmp_path / "a", prefer="last")[0].state_dict()
    sd_b = load_checkpoint(tmp_path / "b", prefer="last")[0].state_dict()
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)


def test_cli_evaluate_runs_every_reranker_on_cuda(cuda_run, tmp_path, capsys):
    cfg, _ = cuda_run
    code = main(
        ["evaluate", "--checkpoint", cfg.output_dir, "--split", "test", "--device", "cuda",
         "--out", str(tmp_path)]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    result = json.loads((tmp_path / "results_test.json").read_text())
    assert result["hardware"]["device"].startswith("cuda") and result["hardware"]["cuda_name"]
    assert {"none", "itm", "smr"} <= set(result["metrics"])
    assert all(math.isfinite(m["r_mean"]) for m in result["metrics"].values())
