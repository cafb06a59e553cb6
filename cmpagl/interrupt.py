"""Stopping a training run cleanly on SIGINT (Ctrl-C) or SIGTERM (``kill``, a job scheduler,
torchrun passing on its own signal).

While :class:`StopSignals` is active the first signal only *asks* to stop: the training loop
finishes the optimizer step it is in, writes ``last/`` as the periodic checkpoint does, and
:func:`cmpagl.train.train` raises :class:`TrainingInterrupted`. Signals after the first are
absorbed until then, so a second Ctrl-C cannot tear the checkpoint being written (Ctrl-\\, SIGQUIT,
still quits at once; the previous checkpoint is then the one to resume).
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from types import FrameType

__all__ = ["StopSignals", "TrainingInterrupted"]

_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_AGAIN = (
    b"cmpagl: already stopping: finishing the step and writing the checkpoint "
    b"(Ctrl-\\ quits at once, without it)\n"
)


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on a signal after writing a resumable ``last/`` checkpoint.

    A :class:`KeyboardInterrupt`, so ``except Exception`` does not swallow it and a notebook
    cell stops as on any interrupt. ``exit_status`` is the shell's convention for the signal
    (130 for SIGINT, 143 for SIGTERM); ``rank`` the process that raised it (under torchrun every
    process raises it, rank 0 is the one to report it).
    """

    def __init__(self, signum: int, step: int, epoch: int, checkpoint: Path, rank: int = 0):
        super().__init__(signum, step, epoch, checkpoint, rank)
        self.signum, self.step, self.epoch = signum, step, epoch
        self.checkpoint, self.rank = checkpoint, rank

    @property
    def exit_status(self) -> int:
        return 128 + self.signum

    def __str__(self) -> str:
        return (
            f"interrupted at step {self.step} (epoch {self.epoch}): "
            f"checkpoint written to {self.checkpoint}"
        )


class StopSignals:
    """``with StopSignals() as stop:`` SIGINT and SIGTERM set ``stop.signum`` (the first one's
    number) instead of raising or killing; the previous handlers come back on exit.

    Nothing is installed outside the main thread (Python delivers signals only there), and a
    signal the process inherited as ignored (``nohup``, a background job) stays ignored.
    Data-loader workers forked inside the block inherit the handler and ignore the signal, so
    the batch in flight is not lost to a dead worker; the main process stops them as usual.

    Args:
        announce: print a note on stderr for a repeated signal (rank 0 only, under torchrun).
    """

    def __init__(self, announce: bool = True) -> None:
        self.announce = announce
        self.signum: int | None = None
        self._previous: dict[int, object] = {}
        self._pid = os.getpid()
        self._told = False

    def __enter__(self) -> StopSignals:
        self._pid = os.getpid()
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in _SIGNALS:
            previous = signal.getsignal(sig)
            if previous in (signal.SIG_IGN, None):  # None: set outside Python, leave it alone
                continue
            self._previous[sig] = previous
            signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if os.getpid() != self._pid:  # a forked data-loader worker: the trainer decides
            return
        if self.signum is None:
            self.signum = signum
        elif self.announce and not self._told:
            self._told = True
            os.write(2, _AGAIN)  # not print(): the main thread may be inside a print
