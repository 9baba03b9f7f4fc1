"""The engine interface: what a worker handler needs from any engine (built-in, mocker, vLLM,
SGLang, TensorRT-LLM). A handler never knows which engine it serves."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass

from dynamo.wire import EngineOutput, KvEventData, LoadMetrics, PreprocessedRequest

# Engines report KV cache changes synchronously (KvEventSink, defined with the block pool), at
# the exact place the state changes; the worker numbers and publishes them in order off the
# engine's critical path.
from kvbm.block_pool import KvEventSink as KvEventSink


@dataclass(frozen=True, slots=True)
class EngineInfo:
    """Facts about a started engine that go into the model card."""

    context_length: int
    kv_block_size: int
    kv_total_blocks: int
    eos_token_ids: tuple[int, ...] = ()


class Engine(ABC):
    """An LLM engine. Use `async with engine:` or call start()/stop().

    `generate` yields EngineOutput chunks for one request until one carries a finish_reason.
    Closing the iterator early, or cancelling the task that iterates it, aborts the request and
    frees its KV blocks at once.
    """

    name: str = "engine"

    @abstractmethod
    async def start(self, kv_events: KvEventSink | None = None) -> EngineInfo: ...

    @abstractmethod
    async def stop(self) -> None: ...

    @abstractmethod
    def generate(self, request: PreprocessedRequest) -> AsyncIterator[EngineOutput]: ...

    @abstractmethod
    def load_metrics(self) -> LoadMetrics:
        """Current load; worker_id is filled in by the worker."""

    def kv_snapshot(self) -> list[KvEventData]:
        """The whole prefix cache as events (BlockStored...), for a router that lost track."""
        return []

    async def __aenter__(self) -> Engine:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
