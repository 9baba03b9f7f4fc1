"""How long an engine's forward passes take, on the device's own clock: what recomputing a
prompt's tokens costs (kvbm/onboard_cost.py), and what a step costs the requests that a disk read
on the model thread would hold up (the vLLM connector's sync-or-async choice), measured where only
the model's thread can (vLLM's worker side, workers/vllm/connector/offload.py)."""

from __future__ import annotations

import time
from collections import deque
from typing import Any

import torch


class ForwardTimer:
    """Times forward passes on the device's own clock: on a GPU between CUDA events on the
    model's stream (the launch returns long before the work is done; a pass is reported once
    its end event has completed, at a later step), on a CPU by the wall clock (the pass has run
    when the engine ends the step)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._open: tuple[int, Any] | None = None  # tokens, start event or time
        self._pending: deque[tuple[int, Any, Any]] = deque()  # tokens, start, end events
        self._done: list[tuple[int, float]] = []

    def start(self, tokens: int) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self._open = (tokens, event)
        else:
            self._open = (tokens, time.perf_counter())

    def stop(self) -> None:
        if self._open is None:
            return
        tokens, began = self._open
        self._open = None
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._pending.append((tokens, began, end))
        else:
            self._done.append((tokens, time.perf_counter() - began))

    def take(self) -> list[tuple[int, float]]:
        """Passes measured since the last call (never waits for the device)."""
        pending = self._pending
        while pending and pending[0][2].query():
            tokens, began, end = pending.popleft()
            self._done.append((tokens, began.elapsed_time(end) / 1e3))
        done, self._done = self._done, []
        return done
