"""The training engine: a 2-epoch run of a tiny model writes its log and checkpoints, the best
checkpoint is the best validation epoch, checkpoints round-trip and are written atomically, a run
killed mid-epoch (or stopped by SIGINT/SIGTERM, also through the CLI) resumes to exactly the
uninterrupted result, and the optimizer's groups and schedule are what the config says."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import cmpagl.checkpoint
from cmpagl.checkpoint import (
    CheckpointError,
    find_checkpoint,
    load_checkpoint,
    read_meta,
    save_checkpoint,
)
from cmpagl.config import ConfigError, ExperimentConfig, save_config, to_dict
from cmpagl.optim import build_scheduler, lr_factor, param_groups
from cmpagl.runlog import read_log
from cmpagl.train import TrainingInterrupted, epoch_order, train

HELPER = Path(__file__).with_name("train_helper.py")
LOSS_KEYS = {"itc", "tri", "itm", "mlm", "total", "temp", "grad_norm"}
RESULT_KEYS = {"txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean"}
VOLATILE = {"wall_time", "samples_per_s"}  # timings differ between runs, nothing else may


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    """24 train / 8 val / 8 test synthetic images at 32 px."""
    from cmpagl.data.synthetic import generate_synthetic_dataset

    out = tmp_path_factory.mktemp("tiny_synthetic")
    return generate_synthetic_dataset(out, n_train=24, n_val=8, n_test=8, image_size=32, seed=3)


def tiny_config(data_root: Path, output_dir: Path, **train) -> ExperimentConfig:
    """A CPU-sized experiment: 2 epochs of 3 steps (batch 8) with a 2-stage Gswin at 32 px."""
    cfg = ExperimentConfig(seed=0, output_dir=str(output_dir))
    # name != "synthetic": read the generated folder as it is, never regenerate it
    cfg.data = dataclasses.replace(
        cfg.data, name="tiny", root=str(data_root), image_size=32, num_workers=0
    )
    cfg.model.gswin = dataclasses.replace(
        cfg.model.gswin, img_size=32, embed_dim=16, depths=(2, 2), num_heads=(2, 4), window_size=4
    )
    cfg.model.queue_size = 16
    # device="cpu": the bit-exact resume checks rely on the CPU's deterministic kernels, so the
    # suite means the CPU even on a GPU machine (tests/test_cuda.py covers CUDA)
    settings = dict(
        epochs=2,
        batch_size=8,
        warmup_steps=2,
        log_every=1,
        checkpoint_every=2,
        num_threads=2,
        device="cpu",
    )
    cfg.train = dataclasses.replace(cfg.train, **{**settings, **train})
    return cfg


def run_helper(config: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, str(HELPER), str(config), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def link_tree(src: Path, dst: Path) -> Path:
    """A copy of a checkpoint folder made of hard links (no 350 MB of writes per copy); never
    write into its files, replace them."""
    return Path(shutil.copytree(src, dst, copy_function=os.link))


def files_of(folder: Path) -> dict[str, tuple[int, int, int]]:
    """Name -> (inode, size, mtime) of each file: equal means the same, unmodified files."""
    return {
        p.name: (p.stat().st_ino, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()
    }


def stable(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in records]


@pytest.fixture(scope="module")
def run_a(tiny_data, tmp_path_factory):
    """An uninterrupted 2-epoch run, in this process (as from a notebook)."""
    out = tmp_path_factory.mktemp("run_a")
    cfg = tiny_config(tiny_data, out)
    return cfg, train(cfg, config_path="tiny.yaml")


# ----------------------------------------------------------------------------------------------
# A whole run
# ----------------------------------------------------------------------------------------------


def test_run_writes_log_and_checkpoints(run_a):
    cfg, result = run_a
    out = Path(cfg.output_dir)
    assert sorted(p.name for p in out.iterdir()) == [
        "best",
        "config.yaml",
        "last",
        "train_log.jsonl",
    ]
    for name in ("last", "best"):
        assert sorted(p.name for p in (out / name).iterdir()) == [
            "config.yaml",
            "meta.json",
            "model.safetensors",
            "state.pt",
        ]
    log = read_log(out)
    steps = [r for r in log if r["kind"] == "train"]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    assert [r["epoch"] for r in steps] == [0, 0, 0, 1, 1, 1]
    for r in steps:
        assert LOSS_KEYS | {"lr_pretrained", "lr_new", "samples_per_s", "wall_time"} <= set(r)
        assert all(math.isfinite(r[k]) for k in LOSS_KEYS)
    vals = [r for r in log if r["kind"] == "val"]
    assert [(r["step"], r["epoch"]) for r in vals] == [(3, 0), (6, 1)]
    assert all(RESULT_KEYS <= set(r) for r in vals)
    best = max(vals, key=lambda r: r["r_mean"])  # the first of equal maxima, like the engine
    assert (result.best_epoch, result.best_step) == (best["epoch"], best["step"])
    assert result.best_r_mean == best["r_mean"]
    assert result.steps == 6 and result.samples_per_s > 0


def test_meta_records_config_commit_and_metrics(run_a):
    cfg, result = run_a
    meta = read_meta(Path(cfg.output_dir) / "best")
    assert meta["config"] == to_dict(cfg)
    assert meta["config_path"] == "tiny.yaml"
    assert meta["metrics"]["r_mean"] == result.best_r_mean
    assert meta["torch"] == torch.__version__ and "git_commit" in meta and meta["time"]
    last = read_meta(Path(cfg.output_dir) / "last")
    assert (last["kind"], last["step"], last["epoch"], last["position"]) == ("last", 6, 2, 0)


def test_git_state_marks_a_modified_tree_dirty(tmp_path):
    from cmpagl.checkpoint import git_state

    def git(*args: str) -> None:
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    assert git_state(tmp_path) is None  # not a repository
    git("init", "-q")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("add", "code.py")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c")
    clean = git_state(tmp_path)
    assert re.fullmatch(r"[0-9a-f]{40}", clean)
    (tmp_path / "notes.txt").write_text("untracked files do not count\n")
    assert git_state(tmp_path) == clean
    # a record, the book's prose, a test or a note changed: the code that ran is the commit
    for name in ("results/r/seed0.json", "book/part.md", "tests/test_x.py", "cmpagl/NOTES.md"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("1\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "d")
    clean = git_state(tmp_path)
    for name in ("results/r/seed0.json", "book/part.md", "tests/test_x.py", "cmpagl/NOTES.md"):
        (tmp_path / name).write_text("2\n")
    assert git_state(tmp_path) == clean
    (tmp_path / "results" / "r" / "code.py").write_text("x = 3\n")  # untracked
    assert git_state(tmp_path) == clean
    (tmp_path / "code.py").write_text("x = 2\n")  # the code that runs is not the commit
    assert git_state(tmp_path) == f"{clean}-dirty"


def test_best_checkpoint_round_trips(run_a, tmp_path):
    """Loaded weights give the very validation metrics the run logged for them; saving and
    loading again changes nothing, and the tied MLM decoder is still tied."""
    from cmpagl.data.build import dataset_from_config, transforms_from_config
    from cmpagl.retrieval import evaluate_itc

    cfg, result = run_a
    model, saved_cfg, state = load_checkpoint(cfg.output_dir)  # a run folder -> best/
    assert to_dict(saved_cfg) == to_dict(cfg)
    assert state["step"] == result.best_step
    assert model.mlm_head.decoder.weight is model.text_encoder.embeddings.word_embeddings.weight
    val = dataset_from_config(cfg.data).split("val")
    metrics = evaluate_itc(model, val, transforms_from_config(cfg.data)[1])
    assert {k: float(v) for k, v in metrics.items()} == result.best_metrics

    save_checkpoint(tmp_path / "copy", model, saved_cfg, state)
    again, _, state2 = load_checkpoint(tmp_path / "copy")
    sd1, sd2 = model.state_dict(), again.state_dict()
    assert sd1.keys() == sd2.keys() and all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    assert int(sd2["queue.ptr"]) == int(sd1["queue.ptr"]) and (sd2["queue.ids"] >= 0).any()
    assert state2["step"] == state["step"]


# ----------------------------------------------------------------------------------------------
# Resume after a real kill
# ----------------------------------------------------------------------------------------------


def test_killed_run_resumes_exactly(run_a, tiny_data, tmp_path):
    """Run B is SIGKILLed after step 5 (mid-epoch 1; its last checkpoint is step 4), resumed in
    a new process, and ends identical to run A: log lines, metrics and every weight/buffer."""
    cfg_a, result_a = run_a
    out = tmp_path / "run_b"
    config = save_config(tiny_config(tiny_data, out), tmp_path / "b.yaml")

    killed = run_helper(config, "--kill-after-step", "5")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    meta = read_meta(out / "last")
    assert (meta["step"], meta["epoch"], meta["position"]) == (4, 1, 1)  # mid-epoch
    assert max(r["step"] for r in read_log(out)) == 5  # step 5 happened, then died

    resumed = run_helper(config, "--resume", str(out))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same_run(out, cfg_a.output_dir)


def assert_same_run(out: Path, reference: str | Path) -> None:
    """The run in ``out`` ended exactly as ``reference``: log lines (timings aside), every weight
    and buffer (momentum twins and queue too), validations kept, schedule."""
    assert stable(read_log(out)) == stable(read_log(reference))
    model_a, _, state_a = load_checkpoint(reference, prefer="last")
    model_b, _, state_b = load_checkpoint(out, prefer="last")
    sd_a, sd_b = model_a.state_dict(), model_b.state_dict()
    assert sd_a.keys() == sd_b.keys() and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    assert state_b["best"] == state_a["best"] and state_b["last_val"] == state_a["last_val"]
    assert state_b["scheduler"] == state_a["scheduler"]
    assert state_b["step"] == state_a["step"]


@pytest.fixture
def default_sigint():
    """Python's own SIGINT handler for the test: a shell starts background jobs with SIGINT
    ignored, and StopSignals then leaves it ignored on purpose (``make test &`` would fail)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_interrupted_run_checkpoints_its_step_and_resumes_exactly(
    run_a, tiny_data, tmp_path, monkeypatch, capfd, default_sigint
):
    """Run B gets a real SIGINT after step 5 (mid-epoch 1), then SIGINT and SIGTERM again while
    it writes the checkpoint that follows: ``last/`` holds step 5, complete, the exception
    carries SIGINT's exit status 130, the handlers are restored, and resumed, B ends identical to
    run A. B writes no periodic checkpoints (A does: checkpoints do not change the training), so
    it resumes from the interrupt's. In this process, to save two interpreter starts; the CLI
    test below signals a separate process from outside."""
    cfg_a, _ = run_a
    out = tmp_path / "run_b"
    cfg = tiny_config(tiny_data, out, checkpoint_every=0)
    handlers = [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)]
    write_weights = cmpagl.checkpoint.save_model_weights
    signalled = []

    def on_step(info) -> None:
        if info.step == 5:
            signalled.append(5)
            os.kill(os.getpid(), signal.SIGINT)

    def write_weights_under_fire(model, path) -> None:
        if signalled:  # the interrupt's own checkpoint
            os.kill(os.getpid(), signal.SIGINT)
            write_weights(model, path)
            os.kill(os.getpid(), signal.SIGTERM)  # handled before state.pt and meta.json
        else:
            write_weights(model, path)

    monkeypatch.setattr(cmpagl.checkpoint, "save_model_weights", write_weights_under_fire)
    with pytest.raises(TrainingInterrupted) as stop:
        train(cfg, on_step=on_step)
    monkeypatch.undo()
    assert [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)] == handlers
    assert str(stop.value) == f"interrupted at step 5 (epoch 1): checkpoint written to {out}/last"
    assert (stop.value.signum, stop.value.exit_status) == (signal.SIGINT, 130)
    assert capfd.readouterr().err.count("cmpagl: already stopping") == 1  # repeats noted once
    meta = read_meta(find_checkpoint(out, prefer="last"))
    assert (meta["kind"], meta["step"], meta["epoch"], meta["position"]) == ("last", 5, 1, 2)
    # nothing torn or set aside, no lock left behind
    assert sorted(p.name for p in out.iterdir()) == [
        "best",
        "config.yaml",
        "last",
        "train_log.jsonl",
    ]
    assert max(r["step"] for r in read_log(out)) == 5

    train(cfg, resume=out)
    assert_same_run(out, cfg_a.output_dir)


def test_cli_stopped_by_sigterm_says_how_to_resume(run_a, tiny_data, tmp_path):
    """``cmpagl train --config X --set output_dir=... --set ...`` gets SIGTERM from outside,
    mid-run at whatever step it is: exit status 143 and one line naming the step, the checkpoint
    and the user's own command (overrides and all) with ``--resume``; that command, run as
    printed, ends like run A."""
    cfg_a, _ = run_a
    out = tmp_path / "run_c"
    config = save_config(tiny_config(tiny_data, tmp_path / "unused"), tmp_path / "c.yaml")
    cmd = [sys.executable, "-m", "cmpagl.cli", "train", "--config", str(config)]
    cmd += ["--set", f"output_dir={out}", "--set", "train.checkpoint_every=0"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log, deadline = out / "train_log.jsonl", time.monotonic() + 300
    while proc.poll() is None and not (log.is_file() and log.read_text().strip()):
        assert time.monotonic() < deadline, "no training step within 300 s"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # after step 1 of 6: training is under way
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-2000:]
    assert err.endswith("\n") and err.count("cmpagl: interrupted") == 1
    found = re.fullmatch(
        r"cmpagl: interrupted at step (\d) \(epoch (\d)\): checkpoint written to (\S+); "
        r"resume with: (.+)",
        err.splitlines()[-1],
    )
    assert found, err[-2000:]
    step, epoch = int(found[1]), int(found[2])
    assert 1 <= step < 6 and epoch == (step - 1) // 3 and found[3] == str(out / "last")
    assert read_meta(out / "last")["step"] == step
    assert found[4] == shlex.join([*cmd, "--resume", str(out)])

    resumed = subprocess.run(
        shlex.split(found[4]), env=env, capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same_run(out, cfg_a.output_dir)


def test_fresh_run_refuses_a_trained_folder(run_a):
    """Training again into a run folder without --resume would replace its checkpoints and mix
    two runs in one log: it is refused before anything there is touched."""
    cfg, _ = run_a
    out = Path(cfg.output_dir)
    before = {p.name: files_of(p) for p in (out / "last", out / "best")}
    log = (out / "train_log.jsonl").read_bytes()
    with pytest.raises(ConfigError, match=r"already holds a trained run \(best, last\).*--resume"):
        train(cfg)
    assert {p.name: files_of(p) for p in (out / "last", out / "best")} == before
    assert (out / "train_log.jsonl").read_bytes() == log


def test_fresh_run_replaces_the_log_of_a_run_killed_before_its_first_checkpoint(
    tiny_data, tmp_path
):
    out = tmp_path / "run"
    out.mkdir()
    stale = {"kind": "train", "step": 1, "epoch": 0, "total": 9.0}
    (out / "train_log.jsonl").write_text(json.dumps(stale) + "\n")
    train(tiny_config(tiny_data, out, epochs=1, max_steps=2, checkpoint_every=0))
    assert [r["step"] for r in read_log(out) if r["kind"] == "train"] == [1, 2]
    assert stale not in read_log(out)


def test_resume_from_nothing_is_a_clear_error(tiny_data, tmp_path):
    (tmp_path / "empty").mkdir()
    cfg = tiny_config(tiny_data, tmp_path / "out")
    with pytest.raises(CheckpointError, match=r"no complete checkpoint at .*empty.*lacks"):
        train(cfg, resume=tmp_path / "empty")
    with pytest.raises(CheckpointError, match="does not exist"):
        train(cfg, resume=tmp_path / "nowhere")
    assert not (tmp_path / "out").exists()  # failed before writing anything


def test_damaged_checkpoint_is_a_clear_error(run_a, tmp_path):
    cfg, _ = run_a
    broken = link_tree(Path(cfg.output_dir) / "last", tmp_path / "broken")
    (broken / "model.safetensors").unlink()  # a link: writing into it would damage run A
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="cannot read the weights"):
        load_checkpoint(broken)
    (broken / "state.pt").unlink()
    with pytest.raises(CheckpointError, match="lacks state.pt"):
        load_checkpoint(broken)


# ----------------------------------------------------------------------------------------------
# Atomic writes
# ----------------------------------------------------------------------------------------------


def test_crash_during_write_keeps_previous_checkpoint(run_a, tmp_path, monkeypatch):
    import cmpagl.checkpoint as ckpt

    cfg, _ = run_a
    last = link_tree(Path(cfg.output_dir) / "last", tmp_path / "last")
    before = files_of(last)
    model, saved_cfg, state = load_checkpoint(last)

    def crash(*args, **kwargs):  # weights are written by now: the crash is mid-checkpoint
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_config", crash)
    with torch.no_grad():
        model.temp.fill_(0.3)  # what a new checkpoint would have held
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(last, model, saved_cfg, {"step": 99})
    assert files_of(last) == before  # the very same files, untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]  # no temporary folder left
    again, _, state2 = load_checkpoint(last)
    assert state2["step"] == state["step"] and float(again.temp.detach()) != 0.3


def test_crash_between_renames_falls_back_to_the_old_folder(run_a, tmp_path):
    """Replacing a checkpoint renames the old folder aside before moving the new one in; if the
    process dies in between, the folder set aside is found."""
    cfg, _ = run_a
    aside = link_tree(Path(cfg.output_dir) / "last", tmp_path / ".last.old-1234")
    assert find_checkpoint(tmp_path / "last") == aside
    assert find_checkpoint(tmp_path, prefer="last") == aside


# ----------------------------------------------------------------------------------------------
# Optimizer, schedule, data order
# ----------------------------------------------------------------------------------------------


def test_deterministic_switch_holds_during_training_only(tiny_data, tmp_path):
    seen: dict[str, bool] = {}
    for mode in ("cpu", "off"):
        cfg = tiny_config(tiny_data, tmp_path / mode, epochs=1, max_steps=1)
        cfg.train = dataclasses.replace(cfg.train, deterministic=mode)
        train(
            cfg,
            on_step=lambda _, m=mode: seen.setdefault(
                m, torch.are_deterministic_algorithms_enabled()
            ),
        )
    assert seen == {"cpu": True, "off": False}
    assert not torch.are_deterministic_algorithms_enabled()  # restored after the run


def test_lr_schedule_warmup_then_cosine():
    f = [lr_factor(s, warmup=4, total=20, min_ratio=0.1) for s in range(20)]
    assert f[:5] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert f[-1] == pytest.approx(0.1)
    mid = 4 + (20 - 1 - 4) / 2  # halfway through the cosine: halfway between 1 and 0.1
    assert lr_factor(mid, 4, 20, 0.1) == pytest.approx(0.55)
    assert all(a >= b for a, b in zip(f[3:], f[4:], strict=False))  # never rises after warm-up
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([{"params": [param], "lr": 2e-4}])
    cfg = ExperimentConfig().train
    cfg = dataclasses.replace(cfg, warmup_steps=4, min_lr_ratio=0.1)
    sched = build_scheduler(opt, cfg, total=20)
    seen = []
    for _ in range(20):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([2e-4 * v for v in f])


def test_logged_learning_rates_follow_the_schedule(run_a):
    cfg, _ = run_a
    total = 6
    for r in (r for r in read_log(cfg.output_dir) if r["kind"] == "train"):
        factor = lr_factor(r["step"] - 1, cfg.train.warmup_steps, total, cfg.train.min_lr_ratio)
        assert r["lr_new"] == pytest.approx(cfg.train.lr_new * factor)
        assert r["lr_pretrained"] == pytest.approx(cfg.train.lr_pretrained * factor)


@pytest.fixture(scope="module")
def tiny_model(tiny_data, tmp_path_factory):
    from cmpagl.models.cmpagl import build_model

    return build_model(tiny_config(tiny_data, tmp_path_factory.mktemp("unused")).model)


def test_param_groups_split_pretrained_new_and_decay(tiny_model, tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, tmp_path)
    groups = {g["name"]: g for g in param_groups(tiny_model, cfg)}
    names = {k: set(g["param_names"]) for k, g in groups.items()}
    pretrained = names["pretrained"] | names["pretrained_no_decay"]
    new = names["new"] | names["new_no_decay"]
    assert all(n.startswith(("text_encoder.", "fusion_encoder.")) for n in pretrained)
    assert {n for n, _ in tiny_model.text_encoder.named_parameters()} == {
        n.removeprefix("text_encoder.") for n in pretrained if n.startswith("text_encoder.")
    }
    assert "fusion_encoder.layer.0.attention.self.query.weight" in pretrained
    assert "fusion_encoder.layer.0.intermediate.dense.weight" in pretrained
    assert "fusion_encoder.layer.0.crossattention.self.query.weight" in new
    for n in (
        "temp",
        "visual.layers.0.blocks.0.gamma",
        "visual.layers.0.blocks.0.attn.qkv.weight",
        "image_to_text.weight",
        "vision_proj.weight",
        "itm_head.weight",
        "mlm_head.bias",
    ):
        assert n in new, n  # the visual encoder is all new when trained from scratch
    no_decay = names["pretrained_no_decay"] | names["new_no_decay"]
    assert {
        "temp",
        "visual.layers.0.blocks.0.gamma",
        "text_encoder.layer.0.output.dense.bias",
        "text_encoder.embeddings.LayerNorm.weight",
        "visual.norm.weight",
        "visual.layers.0.blocks.0.attn.relative_position_bias_table",
    } <= no_decay
    params = dict(tiny_model.named_parameters())
    assert all(params[n].ndim >= 2 for n in names["pretrained"] | names["new"])
    assert groups["new_no_decay"]["weight_decay"] == 0.0
    assert groups["new"]["weight_decay"] == cfg.train.weight_decay
    assert groups["pretrained"]["lr"] == cfg.train.lr_pretrained
    assert groups["new"]["lr"] == cfg.train.lr_new
    trainable = {n for n, p in params.items() if p.requires_grad}
    assert sum(len(v) for v in names.values()) == len(trainable)  # each exactly once
    assert pretrained | new == trainable and not any("_m." in n for n in trainable)


def test_pretrained_swin_local_path_gets_the_pretrained_rate(tiny_model, tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, tmp_path)
    cfg.model.gswin = dataclasses.replace(cfg.model.gswin, pretrained="swin_tiny_patch4_window7")
    groups = {g["name"]: set(g["param_names"]) for g in param_groups(tiny_model, cfg)}
    pretrained = groups["pretrained"] | groups["pretrained_no_decay"]
    new = groups["new"] | groups["new_no_decay"]
    assert "visual.layers.0.blocks.0.attn.qkv.weight" in pretrained
    assert "visual.patch_embed.proj.weight" in pretrained
    new_visual = {f"visual.{k}" for k in tiny_model.visual.new_keys()}
    assert new_visual and new_visual <= new  # GWG, GLWA, γ stay new


def test_epoch_order_shards_are_disjoint_and_seeded():
    shards = [epoch_order(41, epoch=3, seed=7, rank=r, world=2) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 20
    assert not set(shards[0]) & set(shards[1])
    assert epoch_order(41, 3, 7, 0, 2) == shards[0]  # a pure function of (seed, epoch)
    assert epoch_order(41, 4, 7, 0, 2) != shards[0]
    assert sorted(epoch_order(10, 0, 0)) == list(range(10))


def test_resumed_log_drops_lines_after_the_checkpoint(tmp_path):
    from cmpagl.runlog import JsonLog

    log = JsonLog(tmp_path / "train_log.jsonl", enabled=True)
    for step in (1, 2, 3):
        log.write({"kind": "train", "step": step})
    with open(log.path, "a") as f:
        f.write('{"kind": "train", "st')  # torn by a kill mid-write
    log.truncate_after(2)
    assert [json.loads(x)["step"] for x in log.path.read_text().splitlines()] == [1, 2]


def test_next_write_cleans_up_after_a_killed_one(run_a, tmp_path):
    cfg, _ = run_a
    model, saved_cfg, state = load_checkpoint(Path(cfg.output_dir) / "last")
    (tmp_path / ".last.tmp-dead").mkdir()  # a write killed before its rename
    save_checkpoint(tmp_path / "last", model, saved_cfg, {"step": 1})
    save_checkpoint(tmp_path / "last", model, saved_cfg, {"step": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]
    assert load_checkpoint(tmp_path / "last", model)[2]["step"] == 2
