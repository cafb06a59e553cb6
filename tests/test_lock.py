"""One training process per run folder (:mod:`cmpagl.lock`): a second ``cmpagl train`` into a
folder another process trains in is refused with one line naming that process; a lock left by a
killed process is taken over with a note; one written on another host is not."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from test_train import tiny_config  # tests/ is on sys.path under pytest

from cmpagl.config import save_config
from cmpagl.lock import LOCK_FILE, RunFolderInUse, read_lock, run_lock

# A real second process that holds a folder's lock until its stdin closes.
HOLD = """
import sys
from cmpagl.lock import run_lock
with run_lock(sys.argv[1], name=sys.argv[2]):
    print("locked", flush=True)
    sys.stdin.read()
"""


def hold(folder: Path, name: str = LOCK_FILE) -> subprocess.Popen:
    """A child process holding ``folder``'s lock file ``name`` until its stdin closes."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(folder), name],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline() == "locked\n"
    return proc


def test_second_training_process_is_refused(tmp_path):
    """``cmpagl train`` into a folder that another process holds: status 2 and one line that
    names the holder (pid, host, start time), before anything is loaded or written."""
    folder = tmp_path / "run"
    holder = hold(folder)
    try:
        owner = read_lock(folder)
        config = save_config(tiny_config(tmp_path / "no_data", folder), tmp_path / "c.yaml")
        second = subprocess.run(
            [sys.executable, "-m", "cmpagl.cli", "train", "--config", str(config)],
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert sorted(p.name for p in folder.iterdir()) == [LOCK_FILE]  # nothing written
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert (owner.pid, owner.host) == (holder.pid, socket.gethostname())
    assert second.returncode == 2, second.stderr[-2000:]
    assert second.stderr == (
        f"cmpagl: error: {folder} is in use by another training run (pid {holder.pid} on host "
        f"{owner.host}, started {owner.started}); wait for it to finish, or train elsewhere "
        "with --set output_dir=...\n"
    )
    assert holder.returncode == 0 and not folder.exists()  # released: made for it, so removed


def test_lock_of_a_killed_process_is_taken_over(tmp_path, capsys):
    folder = tmp_path / "run"
    folder.mkdir()
    holder = hold(folder)
    owner = read_lock(folder)
    holder.kill()  # SIGKILL: the lock file stays, naming a pid that no longer runs
    holder.wait(timeout=60)
    assert read_lock(folder) == owner
    with run_lock(folder):
        assert read_lock(folder).pid == os.getpid()
    assert capsys.readouterr().err == (
        f"cmpagl: taking over {folder / LOCK_FILE} left by pid {owner.pid} on host "
        f"{owner.host}, started {owner.started}, which has ended\n"
    )
    assert sorted(folder.iterdir()) == []  # released: the file is gone, the folder stays


def test_one_process_may_hold_its_lock_twice(tmp_path):
    """``train()`` inside a caller that locked the folder already (``train_or_resume``)."""
    folder = tmp_path / "run"
    with run_lock(folder):
        with run_lock(folder):
            assert read_lock(folder).pid == os.getpid()
        assert read_lock(folder).pid == os.getpid()  # the inner exit left the outer hold
    assert not folder.exists()


def test_lock_from_another_host_is_not_taken_over(tmp_path):
    """No flock is held, but the owner ran elsewhere: nothing here can tell whether it still
    runs (network file systems do not always share flocks), so the user decides."""
    folder = tmp_path / "run"
    folder.mkdir()
    text = json.dumps({"pid": 4242, "host": "gpu-7", "started": "2024-05-01 12:03:07 +0000"})
    (folder / LOCK_FILE).write_text(text)
    with pytest.raises(RunFolderInUse) as err, run_lock(folder):
        pass
    assert str(err.value) == (
        f"{folder} is locked by a training run (pid 4242 on host gpu-7, started 2024-05-01 "
        "12:03:07 +0000); cmpagl cannot check a process on another host: if that run has "
        f"ended, delete {folder / LOCK_FILE}"
    )
    assert (folder / LOCK_FILE).read_text() == text
