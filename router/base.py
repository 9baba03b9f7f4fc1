"""The router interface every routing mode implements, and the simple modes.

The frontend asks `select` for each request with the instances currently serving the model;
KV-aware modes also consume KV events and load metrics (see router/kv_router.py).
"""

from __future__ import annotations

import itertools
import random
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

from dynamo import errors
from dynamo.wire import PreprocessedRequest


@dataclass(frozen=True, slots=True)
class RoutingDecision:
    instance_id: int
    # Prompt blocks the router expects cached on that instance; a block held only in a KVBM
    # host or disk tier counts its tier's weight (--kv-host-hit-weight, --kv-disk-hit-weight).
    overlap_blocks: float = 0


class Router(ABC):
    mode: str = "base"

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    @abstractmethod
    async def select(
        self, request: PreprocessedRequest, candidates: Sequence[int]
    ) -> RoutingDecision:
        """Pick one of `candidates` (live instance ids serving the request's model)."""

    def request_finished(self, request_id: str, instance_id: int) -> None:
        """The request left the instance (finished, failed or cancelled)."""
        return None

    def first_token(self, request_id: str, instance_id: int) -> None:
        """The instance finished the request's prefill."""
        return None

    def instance_removed(self, instance_id: int) -> None:
        return None


def _require(candidates: Sequence[int]) -> None:
    if not candidates:
        raise errors.NoInstances("no live worker serves this model")


class RoundRobinRouter(Router):
    mode = "round-robin"

    def __init__(self) -> None:
        self._counter = itertools.count()

    async def select(self, request: PreprocessedRequest, candidates: Sequence[int]) -> RoutingDecision:
        _require(candidates)
        return RoutingDecision(candidates[next(self._counter) % len(candidates)])


class RandomRouter(Router):
    mode = "random"

    def __init__(self, seed: int | None = None) -> None:
        self._rng = random.Random(seed)

    async def select(self, request: PreprocessedRequest, candidates: Sequence[int]) -> RoutingDecision:
        _require(candidates)
        return RoutingDecision(self._rng.choice(candidates))


# "remote" asks a standalone router service (python -m dynamo.router) for every decision.
ROUTER_MODES = ("round-robin", "random", "kv", "least-loaded", "remote")
