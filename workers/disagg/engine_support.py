"""What disaggregation needs from an engine, built once over its pool, scheduler and request
streams (both the built-in engine and the mocker expose them through `disagg_support()`):
prefill-only runs that keep their blocks, block reservations, and decoding from imported KV."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import msgspec

from dynamo import errors
from dynamo.kv_hash import block_hashes
from dynamo.wire import EngineOutput, KvLayoutSpec, PreprocessedRequest
from kvbm.block_pool import Block, BlockPool
from kvbm.transfer.layout import KvMemory

Queue = asyncio.Queue[EngineOutput | errors.DynamoError]


@dataclass(slots=True)
class HeldPrefill:
    """A finished prefill whose blocks are still referenced: release them once sent."""

    first: EngineOutput
    blocks: list[Block]

    @property
    def block_ids(self) -> list[int]:
        return [b.block_id for b in self.blocks]


@dataclass(slots=True)
class Reservation:
    """Blocks a decode worker holds for an incoming prompt: the first `matched_blocks` were
    cached here already; the rest receive the transferred KV."""

    blocks: list[Block]
    matched_blocks: int

    @property
    def transfer_block_ids(self) -> list[int]:
        return [b.block_id for b in self.blocks[self.matched_blocks :]]


class DisaggEngine(Protocol):
    """The optional engine capability a prefill or decode role requires."""

    def kv_layout(self) -> KvLayoutSpec: ...

    def kv_memory(self) -> KvMemory | None: ...

    def disagg_support(self) -> DisaggSupport: ...


class DisaggSupport:
    def __init__(
        self,
        pool: BlockPool,
        scheduler: Any,
        new_sequence: Callable[[PreprocessedRequest, Queue], Any],
        streams: dict[Any, Queue],
        wake: Callable[[], None],
        on_import: Callable[[Any], None] | None = None,
    ) -> None:
        self.pool = pool
        self.scheduler = scheduler
        self._new_sequence = new_sequence
        self._streams = streams
        self._wake = wake
        # Called on an imported sequence before it decodes: the mocker advances its token
        # stream past the first token, so disaggregated output equals aggregated output.
        self._on_import = on_import

    @property
    def block_size_tokens(self) -> int:
        return self.pool.block_size_tokens

    def cached_prefix_tokens(self, token_ids: list[int]) -> int:
        bs = self.pool.block_size_tokens
        return len(self.pool.match_prefix(block_hashes(token_ids, bs))) * bs

    # ------------------------------------------------------------------------ prefill side

    async def prefill_held(self, request: PreprocessedRequest) -> HeldPrefill:
        """Run the prompt and sample its first token (max_tokens=1 semantics), keeping the
        prompt's blocks referenced so their KV can be exported."""
        stop = msgspec.structs.replace(request.stop, max_tokens=request.generated_before + 1)
        queue: Queue = asyncio.Queue()
        seq = self._new_sequence(msgspec.structs.replace(request, stop=stop), queue)
        seq.hold_blocks = True
        self._streams[seq] = queue
        self.scheduler.add(seq)
        self._wake()
        try:
            item = await queue.get()
            if isinstance(item, errors.DynamoError):
                raise item
            blocks, seq.block_table = seq.block_table, []
            return HeldPrefill(item, blocks)
        finally:
            del self._streams[seq]
            self.scheduler.abort(seq)  # frees them if it never finished (cancelled, failed)
            if seq.block_table:  # finished, but we were cancelled before taking the blocks
                self.pool.release(seq.block_table)
                seq.block_table = []

    def release(self, blocks: list[Block]) -> None:
        self.pool.release(blocks)

    # ------------------------------------------------------------------------- decode side

    def reserve(self, token_ids: list[int]) -> Reservation | None:
        """Blocks for the whole prompt: its locally cached prefix plus fresh ones, or None when
        the pool has no room now (the caller then prefills locally, which queues)."""
        bs = self.pool.block_size_tokens
        total = len(token_ids)
        needed = -(-total // bs)
        usable = (total - 1) // bs  # leave at least one block to transfer, like admission does
        matched = self.pool.match_prefix(block_hashes(token_ids[: usable * bs], bs))
        fresh = needed - len(matched)
        if self.pool.num_free_blocks - sum(1 for b in matched if b.ref_count == 0) < fresh:
            return None
        self.pool.acquire(matched)
        blocks = self.pool.allocate(fresh)
        assert blocks is not None
        return Reservation(matched + blocks, len(matched))

    async def generate_from_kv(
        self, request: PreprocessedRequest, first: EngineOutput, reservation: Reservation
    ) -> AsyncIterator[EngineOutput]:
        """Decode `request` whose prompt KV sits in `reservation` (now owned here) and whose
        first token `first` came from the prefill worker: no prompt token is recomputed."""
        queue: Queue = asyncio.Queue()
        try:
            seq = self._new_sequence(request, queue)
        except BaseException:
            self.pool.release(reservation.blocks)
            raise
        prompt_tokens = len(seq.token_ids)
        seq.block_table = list(reservation.blocks)
        seq.num_computed_tokens = prompt_tokens
        seq.num_committed_blocks = reservation.matched_blocks
        seq.cached_tokens = first.cached_tokens or 0
        if self._on_import is not None:
            self._on_import(seq)
        token = first.token_ids[0]
        seq.token_ids.append(token)
        seq.num_generated = 1
        reason = seq.finish_reason(token)
        self._streams[seq] = queue
        try:
            self.scheduler.add_prefilled(seq)  # commits the prompt's full blocks: events, reuse
            if reason is not None:
                self.scheduler.abort(seq)
            yield EngineOutput([token], reason, first.cached_tokens, first.logprobs)
            if reason is not None:
                return
            self._wake()
            while True:
                item = await queue.get()
                if isinstance(item, errors.DynamoError):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            del self._streams[seq]
            self.scheduler.abort(seq)
