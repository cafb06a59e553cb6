"""How papermill runs this project's notebooks: kernels whose messages are encrypted.

papermill's default kernel manager talks to the kernel over TCP on 127.0.0.1 without transport
encryption, and ipykernel (7.x) then writes a warning about it into every run's log: ten of them
in a ``make book`` log, one per run across the sweep's progress bar. Jupyter's fix is CurveZMQ,
which the installed ``python3`` kernel spec declares it supports; the manager here asks for it
(``transport_encryption = "auto"``) wherever pyzmq has Curve, and otherwise behaves as
papermill's default. Nothing else about a run changes.

    papermill --engine cmpagl notebooks/05_train.ipynb runs/x.ipynb -p config configs/ucm_cpu.yaml

The engine is registered under ``papermill.engine`` in ``pyproject.toml``; the sweep runner
(:mod:`cmpagl.experiments`) passes :class:`CurveKernelManager` to papermill directly.
"""

from __future__ import annotations

from typing import Any

from jupyter_client import AsyncKernelManager
from papermill.engines import NBClientEngine
from traitlets import default

__all__ = ["CurveKernelManager", "Engine"]


class CurveKernelManager(AsyncKernelManager):
    """nbclient's default kernel manager, with CurveZMQ transport encryption wherever pyzmq
    supports it and the kernel spec declares it ("auto"); "disabled" (plain TCP) elsewhere."""

    @default("transport_encryption")
    def _default_transport_encryption(self) -> str:
        import zmq

        return "auto" if zmq.has("curve") else "disabled"


class Engine(NBClientEngine):
    """papermill's nbclient engine with :class:`CurveKernelManager` (``--engine cmpagl``)."""

    @classmethod
    def execute_managed_notebook(cls, nb_man: Any, kernel_name: str, **kwargs: Any) -> Any:
        kwargs.setdefault("kernel_manager_class", CurveKernelManager)
        return super().execute_managed_notebook(nb_man, kernel_name, **kwargs)
