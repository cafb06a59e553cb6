"""The papermill engine that ``make book`` and the sweep runner use (``--engine cmpagl``): a
notebook runs as with papermill's default engine, but over an encrypted kernel transport, so
ipykernel's warning about plain TCP does not land in every run's log."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("papermill", reason="papermill is in the book extra")
WARNING = "Kernel is running over TCP without encryption"


def _papermill(tmp_path: Path, *engine: str) -> tuple[subprocess.CompletedProcess, dict]:
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("print(6 * 7)")]
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    src, out = tmp_path / "in.ipynb", tmp_path / f"out{'_'.join(engine)}.ipynb"
    nbformat.write(nb, src)
    cmd = [str(Path(sys.executable).parent / "papermill"), *engine, "--kernel", "python3"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [*cmd, str(src), str(out)], capture_output=True, text=True, timeout=300, env=env
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc, json.loads(out.read_text())


def test_the_cmpagl_engine_runs_a_notebook_without_the_plain_tcp_warning(tmp_path):
    proc, nb = _papermill(tmp_path, "--engine", "cmpagl")
    assert nb["cells"][0]["outputs"][0]["text"] == ["42\n"]
    assert WARNING not in proc.stderr
    # the premise: papermill's default engine, same kernel, prints the warning
    proc, nb = _papermill(tmp_path)
    assert nb["cells"][0]["outputs"][0]["text"] == ["42\n"] and WARNING in proc.stderr


def test_the_kernel_manager_asks_for_curve_where_pyzmq_has_it():
    import zmq

    from cmpagl.notebook_engine import CurveKernelManager

    km = CurveKernelManager(kernel_name="python3")
    assert km.transport_encryption == ("auto" if zmq.has("curve") else "disabled")
    assert CurveKernelManager(transport_encryption="disabled").transport_encryption == "disabled"
