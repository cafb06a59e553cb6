"""``cmpagl train`` -> ``evaluate`` -> ``retrieve`` end to end on a tiny model (CPU), and the
command an interrupted ``cmpagl train`` prints to resume."""

from __future__ import annotations

import json
import sys

import pytest

from cmpagl import cli
from cmpagl.cli import main


@pytest.fixture(scope="module")
def tiny_args(small_synthetic, tmp_path_factory):
    run = tmp_path_factory.mktemp("cli_run")
    sets = [
        f"output_dir={run}",
        f"data.root={small_synthetic}",
        "data.image_size=64",
        "data.synthetic_n_train=40",
        "data.synthetic_n_val=10",
        "data.synthetic_n_test=10",
        "data.synthetic_seed=3",
        "model.gswin.img_size=64",
        "model.gswin.embed_dim=16",
        "model.gswin.depths=[2,2]",
        "model.gswin.num_heads=[2,4]",
        "model.queue_size=32",
        "train.batch_size=8",
        "train.epochs=1",
        "train.warmup_steps=2",
        "train.device=cpu",
        "retrieval.smr_grid_tau=[0.05]",
        "retrieval.smr_grid_k=[5]",
        "retrieval.smr_grid_lambda=[0.1]",
        "retrieval.itm_k=4",
    ]
    args = ["train", "--config", "configs/synthetic_tiny.yaml"]
    for s in sets:
        args += ["--set", s]
    return run, args


def test_train_evaluate_retrieve(
    tiny_args, small_synthetic, repo_root, monkeypatch, capsys, tmp_path
):
    monkeypatch.chdir(repo_root)
    run, args = tiny_args
    assert main(args) == 0
    assert "best val r_mean" in capsys.readouterr().out
    assert (run / "best" / "model.safetensors").is_file()
    assert main(args) == 2  # the same command again would replace the trained run
    err = capsys.readouterr().err
    assert "already holds a trained run" in err and f"--resume {run}" in err
    assert err.count("\n") == 1

    assert (
        main(
            [
                "evaluate",
                "--checkpoint",
                str(run),
                "--rerank",
                "none,itm,smr",
                "--out",
                str(tmp_path),
                "--no-scores",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "itm" in out and "oracle bound" in out
    result = json.loads((tmp_path / "results_test.json").read_text())
    assert set(result["metrics"]) == {"none", "itm", "smr"}
    assert 0 <= result["metrics"]["none"]["r_mean"] <= 100

    gallery = tmp_path / "g.png"
    assert (
        main(
            [
                "retrieve",
                "--checkpoint",
                str(run),
                "--text",
                "two white planes",
                "--top",
                "3",
                "--gallery",
                str(gallery),
            ]
        )
        == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("split embeddings computed and cached in")
    assert [line.split(".")[0].strip() for line in lines[2:5]] == ["1", "2", "3"]
    assert gallery.stat().st_size > 1000
    # each image line names the file, its class and its first caption: enough to judge it
    from cmpagl.checkpoint import load_checkpoint
    from cmpagl.data.build import dataset_from_config

    ds = dataset_from_config(load_checkpoint(run, prefer="best")[1].data).split("test")
    assert ds.labels
    for line in lines[2:5]:
        i = ds.filenames.index(line.split()[2])
        assert line.endswith(f"  {ds.filenames[i]} [{ds.labels[i]}]  {ds.captions[i][0]!r}")
    image = small_synthetic / "images" / "00000.png"
    assert main(["retrieve", "--checkpoint", str(run), "--image", str(image), "--top", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "captions of the test split" in lines[1]
    owners: dict[str, set[str]] = {}  # a caption text -> the images it describes
    for j, c in enumerate(ds.all_captions):
        i = ds.txt2img[j]
        owners.setdefault(c, set()).add(f"([{ds.labels[i]}] {ds.filenames[i]})")
    for line in lines[2:4]:  # a caption, and the image (with its class) it describes
        text, owner = line.split("  ", 2)[-1].rsplit("  ", 1)
        assert owner in owners[text[1:-1]], line


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["evaluate", "--checkpoint", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("cmpagl: error:")
    assert main(["train", "--config", "configs/synthetic_tiny.yaml", "--set", "train.lr=1"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'train.lr'" in err and err.count("\n") == 1
    # a GPU that torch does not see: one line before any data or model is touched
    args = ["--set", "train.device=cuda:64", "--set", f"output_dir={tmp_path / 'gpu'}"]
    assert main(["train", "--config", "configs/synthetic_tiny.yaml", *args]) == 2
    err = capsys.readouterr().err
    assert "train.device=cuda:64 needs CUDA device 64" in err and err.count("\n") == 1
    assert not (tmp_path / "gpu").exists()
    assert main(["evaluate", "--checkpoint", str(tmp_path), "--rerank", "magic"]) == 2
    assert "unknown re-ranker(s) magic" in capsys.readouterr().err
    assert main(["retrieve", "--checkpoint", str(tmp_path)]) == 2
    assert "exactly one of --text, --image or --interactive" in capsys.readouterr().err


def test_resume_command_is_what_the_user_typed(monkeypatch, tmp_path):
    """The command an interrupted ``cmpagl train`` prints starts the way the user started it:
    the console script, ``python -m cmpagl.cli``, a venv's script by its path, or torchrun."""
    args = cli.build_parser().parse_args(
        ["train", "--config", "c.yaml", "--set", "model.gswin.depths=[2,2]", "--resume", "x"]
    )
    rest = ["train", "--config", "c.yaml", "--set", "model.gswin.depths=[2,2]", "--resume", "x"]
    tail = "train --config c.yaml --set 'model.gswin.depths=[2,2]' --resume runs/a"
    assert cli._resume_command(args, "runs/a") == f"cmpagl {tail}"  # main([...]) in-process

    script = tmp_path / "bin" / "cmpagl"
    script.parent.mkdir()
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    monkeypatch.setattr(sys, "argv", [str(script), *rest])
    monkeypatch.setattr(sys, "orig_argv", ["/usr/bin/python3", str(script), *rest])
    monkeypatch.setenv("PATH", str(script.parent))
    assert cli._resume_command(args, "runs/a") == f"cmpagl {tail}"
    monkeypatch.setenv("PATH", "/nowhere")  # a venv that is not activated
    assert cli._resume_command(args, "runs/a") == f"{script} {tail}"

    monkeypatch.setattr(sys, "argv", ["/src/cmpagl/cli.py", *rest])
    monkeypatch.setattr(sys, "orig_argv", [".venv/bin/python", "-m", "cmpagl.cli", *rest])
    assert cli._resume_command(args, "runs/a") == f".venv/bin/python -m cmpagl.cli {tail}"

    # a torchrun worker: torchrun starts ``python -u -m cmpagl.cli ...`` in each process
    monkeypatch.setattr(sys, "orig_argv", ["/venv/bin/python", "-u", "-m", "cmpagl.cli", *rest])
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert cli._resume_command(args, "runs/a") == (
        f"torchrun --standalone --nproc_per_node=2 -m cmpagl.cli {tail}"
    )
