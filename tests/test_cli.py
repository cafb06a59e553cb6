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
