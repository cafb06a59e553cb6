"""The ``cmpagl`` command line: real output and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

from cmpagl.cli import main


def test_data_stats_on_real_ucm(ucm_subset, capsys):
    assert main(["data", "stats", str(ucm_subset), "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["splits"]["test"] == {"images": 160, "captions": 800}
    assert st["images"] == 1600


def test_data_stats_report_on_precomp(annotations, capsys):
    assert main(["data", "stats", str(annotations / "ucm_precomp")]) == 0
    out = capsys.readouterr().out
    assert "test           210       1,050" in out and "distinct captions" in out


def test_data_check_and_errors_are_one_line(tmp_path, annotations, capsys):
    assert main(["data", "check", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cmpagl: error:") and "does not exist" in err and "\n" not in err
    assert (
        main(["data", "check", str(annotations / "ucm_precomp"), "--image-dir", str(tmp_path)]) == 2
    )
    assert "2100 of 2100 image files are missing" in capsys.readouterr().err


def test_console_script_help():
    out = subprocess.run(
        [sys.executable, "-m", "cmpagl.cli", "data", "stats", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "--images" in out and "precomp" in out


def test_data_synthetic_command(tmp_path, capsys):
    out = tmp_path / "syn"
    assert (
        main(
            [
                "data",
                "synthetic",
                str(out),
                "--n-train",
                "6",
                "--n-val",
                "2",
                "--n-test",
                "2",
                "--image-size",
                "32",
            ]
        )
        == 0
    )
    assert (out / "dataset.json").is_file()
    assert main(["data", "stats", str(out), "--images", "--json"]) == 0


def _train_args(small_synthetic, tmp_path, *sets: str) -> list[str]:
    """``cmpagl train`` of a tiny model on the small synthetic set, with extra ``--set``s."""
    args = ["train", "--config", "configs/synthetic_tiny.yaml"]
    for s in (
        f"output_dir={tmp_path / 'run'}",
        f"data.root={small_synthetic}",
        "data.image_size=64",
        "model.gswin.img_size=64",
        "model.gswin.embed_dim=16",
        "model.gswin.depths=[2,2]",
        "model.gswin.num_heads=[2,4]",
        "train.device=cpu",
        *sets,
    ):
        args += ["--set", s]
    return args


def test_train_stops_with_one_line_when_named_swin_weights_are_missing(
    small_synthetic, repo_root, tmp_path, monkeypatch, capsys
):
    """No silent from-scratch Swin: offline and not cached, training never starts."""
    import huggingface_hub.constants

    monkeypatch.chdir(repo_root)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    name = "swin_tiny_patch4_window7_224"
    args = _train_args(small_synthetic, tmp_path, f"model.gswin.pretrained={name}")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(
        f"cmpagl: error: cannot load the ImageNet weights of "
        f"model.gswin.pretrained={name}: tried the local Hugging Face cache"
    )
    assert "HF_HUB_OFFLINE=0" in err and "--set model.gswin.pretrained=null" in err
    assert not (tmp_path / "run" / "last").exists()


def test_train_stops_with_one_line_when_the_text_model_is_missing(
    small_synthetic, repo_root, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(repo_root)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    name = "cmpagl-tests/no-such-bert"
    assert main(_train_args(small_synthetic, tmp_path, f"model.text.name={name}")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"cmpagl: error: {name} is not in the local Hugging Face cache")
