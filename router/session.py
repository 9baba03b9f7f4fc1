"""Session affinity: which worker each live session is pinned to, with a sliding TTL.

A session's turns repeat its whole conversation so far, so the worker that served the last turn
holds the longest cached prefix of the next one. KV scoring usually finds it anyway; the pin
makes that hold also when the index lags (events in flight, approximate mode) and when small
load differences would move the session. The pin yields when its worker is gone (the session is
re-pinned to wherever normal scoring sends it) or overloaded (router/kv_router.py decides).

The table is local to one router: each frontend's embedded router, or each replica of the router
service (frontends send a session's requests to one replica, router/remote.py).
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

# Sessions kept at most; past it the least recently used is forgotten (it is re-pinned by
# normal scoring on its next turn, which usually finds the same worker through the index).
DEFAULT_CAPACITY = 100_000


class Affinity(enum.Enum):
    """What the table said about one request (the `outcome` label of the affinity metric)."""

    HIT = "hit"  # went to its pinned worker
    MISS = "miss"  # no live pin (new or expired session): scored normally, then pinned
    REPIN = "repin"  # its worker is gone (not a candidate): scored normally, pinned to the choice
    OVERLOADED = "overloaded"  # its worker is overloaded: scored normally, pinned to the choice


@dataclass(slots=True)
class _Pin:
    worker_id: int
    expires_at: float


class SessionTable:
    """session id -> pinned worker. A pin expires `ttl_s` after the session's last request
    (sliding). Plain dict operations: O(1) per request."""

    __slots__ = ("ttl_s", "capacity", "_clock", "_pins")

    def __init__(self, ttl_s: float, clock: Callable[[], float], capacity: int = DEFAULT_CAPACITY) -> None:
        if ttl_s <= 0:
            raise ValueError("ttl_s must be positive")
        self.ttl_s = ttl_s
        self.capacity = capacity
        self._clock = clock
        # Least recently used first: expired pins sit at the front and are swept from there.
        self._pins: OrderedDict[str, _Pin] = OrderedDict()

    def __len__(self) -> int:
        return len(self._pins)

    def get(self, session: str) -> int | None:
        """The session's worker, or None when it has no pin or its pin expired."""
        pin = self._pins.get(session)
        if pin is None:
            return None
        if pin.expires_at <= self._clock():
            del self._pins[session]
            return None
        return pin.worker_id

    def pin(self, session: str, worker_id: int) -> None:
        """Pin (or keep pinned) `session` to `worker_id` and restart its TTL."""
        now = self._clock()
        pin = self._pins.get(session)
        if pin is None:
            self._pins[session] = _Pin(worker_id, now + self.ttl_s)
        else:
            pin.worker_id = worker_id
            pin.expires_at = now + self.ttl_s
            self._pins.move_to_end(session)
        self._sweep(now)

    def _sweep(self, now: float) -> None:
        # Pins are kept in last-use order, so expired ones are at the front: amortised O(1).
        pins = self._pins
        while pins:
            session, pin = next(iter(pins.items()))
            if pin.expires_at > now and len(pins) <= self.capacity:
                return
            del pins[session]
