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


def _karpathy_folder(root, names: list[str]):
    """A dataset folder with one caption per image; the images are written by the caller."""
    (root / "images").mkdir(parents=True)
    images = [
        {"filename": n, "split": "test", "sentences": [{"raw": f"image {i}"}]}
        for i, n in enumerate(names)
    ]
    (root / "dataset.json").write_text(json.dumps({"images": images}))
    return root / "images"


def test_data_check_counts_images_by_kind(tmp_path, capsys, monkeypatch):
    import warnings

    import numpy as np
    import tifffile
    from PIL import Image

    import cmpagl.data.images

    monkeypatch.setattr(cmpagl.data.images, "_NOTED", set())  # as in a new process

    names = [f"rgb{i}.png" for i in range(3)] + ["g0.tif", "g1.tif", "ms.tif"]
    images = _karpathy_folder(tmp_path / "ds", names)
    for i in range(3):
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(images / f"rgb{i}.png")
    for name in ("g0.tif", "g1.tif"):
        tifffile.imwrite(images / name, (np.arange(64).reshape(8, 8) * 60).astype(np.uint16))
    bands = np.zeros((5, 8, 8), np.uint16)
    tifffile.imwrite(images / "ms.tif", bands, photometric="minisblack", planarconfig="separate")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["data", "check", str(tmp_path / "ds")]) == 0
    assert not caught  # the once-per-process band note is in the kinds below, not a warning
    out = capsys.readouterr().out
    assert out.splitlines()[1:] == [
        "image kinds:",
        "  3 × 8-bit RGB",
        "  2 × 16-bit 1-band (scaled by percentile stretch 2–98 %)",
        "  1 × 16-bit 5-band (bands 1, 2, 3 of 5 as RGB; scaled by percentile stretch 2–98 %)",
    ]
    args = ["data", "check", str(tmp_path / "ds"), "--image-scaling", "bits", "--image-bits", "12"]
    assert main([*args, "--image-bands", "5", "4", "1"]) == 0
    assert "2 × 16-bit 1-band (scaled as 12-bit (value / 4095))" in capsys.readouterr().out
    assert main([*args, "--image-bands", "1", "2", "6"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ms.tif: data.image_bands [1, 2, 6] asks for band 6" in err


def test_data_check_text_that_is_not_utf8_or_not_json_is_one_line(tmp_path, capsys):
    root = tmp_path / "precomp"
    root.mkdir()
    (root / "test_caps.txt").write_bytes("the café\n".encode("latin1"))
    (root / "test_filename.txt").write_text("a.png\n")
    assert main(["data", "check", str(root)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"cmpagl: error: {root / 'test_caps.txt'} is not UTF-8: byte 0xe9 at ")
    assert "iconv -f latin1 -t utf-8" in err
    (tmp_path / "k").mkdir()
    (tmp_path / "k" / "dataset.json").write_text("{'images': []}")
    assert main(["data", "check", str(tmp_path / "k")]) == 2
    assert capsys.readouterr().err == (
        f"cmpagl: error: {tmp_path / 'k' / 'dataset.json'} is not valid JSON: Expecting "
        "property name enclosed in double quotes at line 1, column 2\n"
    )


def test_resume_with_another_architecture_is_one_line(
    small_synthetic, repo_root, tmp_path, monkeypatch, capsys
):
    from test_train_notebook import tiny_overrides

    from cmpagl.checkpoint import save_checkpoint
    from cmpagl.config import load_config
    from cmpagl.models.cmpagl import build_model

    monkeypatch.chdir(repo_root)
    sets = tiny_overrides(small_synthetic)  # Gswin embed_dim 16
    cfg = load_config("configs/synthetic_tiny.yaml", overrides=sets)
    save_checkpoint(tmp_path / "ckpt", build_model(cfg.model), cfg, {"step": 0})
    args = ["train", "--config", "configs/synthetic_tiny.yaml", "--resume", str(tmp_path / "ckpt")]
    for s in [*sets, "model.gswin.embed_dim=24", f"output_dir={tmp_path / 'run'}"]:
        args += ["--set", s]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(
        f"cmpagl: error: {tmp_path / 'ckpt' / 'model.safetensors'}: the weights do not fit the "
        "model: first mismatch: visual.patch_embed.proj.weight is (16, 3, 4, 4) in the "
        "checkpoint, (24, 3, 4, 4) in the model ("
    )
    assert err.rstrip().endswith(
        "the checkpoint's model settings differ in model.gswin.embed_dim (16 in the checkpoint, "
        "24 in the config)"
    )
