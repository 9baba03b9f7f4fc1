"""KV block transfer between workers: one agent interface (agent.py) over several backends
(host memory over TCP, CUDA IPC peer copies, NIXL, and a simulated link for the mocker)."""

from __future__ import annotations

from typing import Any

__all__ = ["KvLayoutMismatch", "KvMemory", "KvTransferAgent", "TransferFailed", "make_agent"]


def __getattr__(name: str) -> Any:
    # Lazy, so that torch-only code (torch_ops, the GPU benchmark) imports without msgspec.
    if name in ("KvTransferAgent", "TransferFailed"):
        from kvbm.transfer import agent

        return getattr(agent, name)
    if name == "make_agent":
        from kvbm.transfer.factory import make_agent

        return make_agent
    if name in ("KvLayoutMismatch", "KvMemory"):
        from kvbm.transfer import layout

        return getattr(layout, name)
    raise AttributeError(name)
