"""The engine interface: what a worker handler needs from any engine (built-in, mocker, vLLM,
SGLang, TensorRT-LLM). A handler never knows which engine it serves. Optional capabilities
(KVBM tiers, KV transfer, disaggregated prefill/decode) are protocols checked with isinstance."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from dynamo.wire import EngineOutput, KvAgentInfo, KvEventData, KvLayoutSpec, LoadMetrics, PreprocessedRequest

# Engines report KV cache changes synchronously (KvEventSink, defined with the block pool), at
# the exact place the state changes; the worker numbers and publishes them in order off the
# engine's critical path.
from kvbm.block_pool import KvEventSink as KvEventSink

if TYPE_CHECKING:
    from kvbm.tiered import TieredCache
    from kvbm.transfer.layout import KvMemory


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


# ------------------------------------------------------------------------ optional capabilities


class KvbmTiers(Protocol):
    """KVBM below an engine's device pool: its tier bookkeeping (capacities, stats, events)."""

    @property
    def cache(self) -> TieredCache: ...


@runtime_checkable
class KvbmEngine(Protocol):
    """An engine that may run KVBM tiers (None when they are off); the worker binds their
    metrics."""

    @property
    def kvbm(self) -> KvbmTiers | None: ...


@runtime_checkable
class KvTransferEngine(Protocol):
    """An engine whose KV blocks a transfer agent can send and receive."""

    # How much faster than the hardware it models the engine runs (the mocker's speedup
    # ratio; 1 for real engines): simulated transfers are scaled by it.
    speedup_ratio: float

    def kv_layout(self) -> KvLayoutSpec: ...

    def kv_memory(self) -> KvMemory | None:
        """The KV tensors to move; None when there are no bytes (transfers are simulated)."""
        ...


@dataclass(slots=True)
class HeldPrefill:
    """A finished prefill whose blocks stay referenced until their KV is sent; give it back
    with DisaggEngine.release."""

    first: EngineOutput
    block_ids: list[int]


@dataclass(slots=True)
class Reservation:
    """Blocks a decode worker holds for an incoming prompt: the first `matched_blocks` were
    cached here already; the rest receive the transferred KV. Consumed by generate_from_kv, or
    given back with release."""

    block_ids: list[int]
    matched_blocks: int

    @property
    def transfer_block_ids(self) -> list[int]:
        return self.block_ids[self.matched_blocks :]


@runtime_checkable
class DisaggEngine(KvTransferEngine, Protocol):
    """What a prefill or decode role (workers/disagg) needs from an engine."""

    def generate(self, request: PreprocessedRequest) -> AsyncIterator[EngineOutput]: ...

    def cached_prefix_tokens(self, token_ids: list[int]) -> int:
        """Prompt tokens whose KV this engine's prefix cache holds now."""
        ...

    async def prefill_held(self, request: PreprocessedRequest) -> HeldPrefill:
        """Run the prompt and sample its first token (max_tokens=1 semantics), keeping the
        prompt's blocks so their KV can be exported."""
        ...

    def reserve(self, token_ids: list[int]) -> Reservation | None:
        """Blocks for a whole prompt (its cached prefix plus fresh ones), or None when there
        is no room now."""
        ...

    def release(self, handle: HeldPrefill | Reservation) -> None:
        """Give the blocks back (a second call does nothing)."""
        ...

    def generate_from_kv(
        self, request: PreprocessedRequest, first: EngineOutput, reservation: Reservation
    ) -> AsyncIterator[EngineOutput]:
        """Decode `request` whose prompt KV landed in `reservation` (now the engine's) and
        whose first token `first` came from the prefill worker."""
        ...


@runtime_checkable
class ConnectorDisaggEngine(Protocol):
    """What a prefill or decode role needs from an engine that moves the prompt's KV itself,
    through a KV connector inside it (vLLM: workers/vllm/connector), instead of exposing its KV
    memory to a transfer agent in the worker process. The prefill side answers with opaque
    transfer parameters next to the first token; the decode side passes them back to its
    engine, which pulls the blocks into the slots it allocates (and recomputes the prompt
    itself if the pull fails)."""

    def kv_layout(self) -> KvLayoutSpec: ...

    def kv_agent_info(self) -> KvAgentInfo:
        """What a decode worker tells prefill workers about its KV (their layout check)."""
        ...

    def generate(self, request: PreprocessedRequest) -> AsyncIterator[EngineOutput]: ...

    def cached_prefix_tokens(self, token_ids: list[int]) -> int: ...

    async def prefill_export(self, request: PreprocessedRequest) -> tuple[EngineOutput, bytes]:
        """Run the prompt to its first token, keeping its KV for a decode worker; returns the
        first token and the transfer parameters that decode worker's engine needs."""
        ...

    def generate_from_params(
        self, request: PreprocessedRequest, first: EngineOutput, kv_params: bytes
    ) -> AsyncIterator[EngineOutput]:
        """Decode `request` from the KV that `kv_params` (from prefill_export) locate."""
        ...

