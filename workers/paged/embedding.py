"""Embedding requests on a paged engine: a batcher that packs the inputs of many requests into
one forward pass (within the engine's token and sequence budgets), lends each input fresh KV
blocks from the engine's pool for that pass, and has the step executor run and pool it (the
built-in engine: on its model thread, between the step loop's steps). No tensors here."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

from dynamo import errors
from dynamo.wire import PoolingType
from kvbm.block_pool import Block, BlockPool
from workers.embedding import PooledBatch

log = logging.getLogger(__name__)


@dataclass(slots=True)
class PoolingBatch:
    """One forward pass over whole inputs: input i's tokens go into blocks `block_ids[i]` from
    position 0 (no cached prefix, so every position's hidden state exists for mean pooling),
    and its final hidden states are pooled with `pooling[i]`."""

    token_ids: list[list[int]]
    block_ids: list[list[int]]
    pooling: list[PoolingType]
    block_size_tokens: int


@runtime_checkable
class PoolingExecutor(Protocol):
    """A step executor that can run embedding batches."""

    @property
    def embedding_dim(self) -> int: ...

    async def pool(self, batch: PoolingBatch) -> np.ndarray:
        """[len(batch.token_ids), embedding_dim] float32: each input's pooled final hidden
        state, not normalised."""
        ...


@dataclass(eq=False, slots=True)
class _Job:
    """One request's inputs; its future resolves once every row of `vectors` is filled."""

    inputs: list[list[int]]
    pooling: PoolingType
    vectors: np.ndarray
    future: asyncio.Future[None]
    remaining: int = 0

    def __post_init__(self) -> None:
        self.remaining = len(self.inputs)


@dataclass(slots=True)
class _Pass:
    items: list[tuple[_Job, int]] = field(default_factory=list)
    blocks: list[list[Block]] = field(default_factory=list)


class EmbeddingBatcher:
    """Owns the queue of inputs waiting to be embedded and the task that runs them, one pass at
    a time. A pass takes queued inputs in arrival order while their padded size (inputs x the
    longest one's tokens: what the padded attention computes) fits `max_num_batched_tokens` and
    there are at most `max_num_seqs` of them; an input longer than the budget runs alone."""

    def __init__(self, executor: PoolingExecutor, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.executor = executor
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.num_passes = 0
        self._pool: BlockPool | None = None
        self._queue: deque[tuple[_Job, int]] = deque()
        self._running = 0  # inputs in the pass being computed
        self._queued_tokens = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # ---------------------------------------------------------------------------- lifecycle

    def start(self, pool: BlockPool) -> None:
        self._pool = pool
        self._task = asyncio.create_task(self._run(), name="embedding-batcher")

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait([task])
        while self._queue:
            job, _ = self._queue.popleft()
            if not job.future.done():
                job.future.set_exception(errors.EngineError("engine stopped"))
        self._queued_tokens = 0

    # ------------------------------------------------------------------------------ serving

    @property
    def num_waiting(self) -> int:
        return len(self._queue)

    @property
    def num_running(self) -> int:
        return self._running

    @property
    def waiting_tokens(self) -> int:
        return self._queued_tokens

    async def embed(self, inputs: list[list[int]], pooling: PoolingType) -> PooledBatch:
        """Every input's pooled vector, in order. Cancelling drops the inputs not yet run."""
        pool = self._pool
        if self._task is None or self._task.done() or pool is None:
            raise errors.EngineError("embedding batcher is not running")
        capacity = pool.num_blocks * pool.block_size_tokens
        for i, ids in enumerate(inputs):
            if len(ids) > capacity:
                raise errors.InvalidRequest(
                    f"input[{i}] has {len(ids)} tokens but this engine's KV cache holds only {capacity}",
                    param=f"input[{i}]",
                )
        vectors = np.empty((len(inputs), self.executor.embedding_dim), dtype=np.float32)
        job = _Job(inputs, pooling, vectors, asyncio.get_running_loop().create_future())
        for i, ids in enumerate(inputs):
            self._queue.append((job, i))
            self._queued_tokens += len(ids)
        self._wake.set()
        try:
            await job.future
        except asyncio.CancelledError:
            self._drop(job)
            raise
        return PooledBatch(vectors, sum(len(ids) for ids in inputs))

    # ------------------------------------------------------------------------------ helpers

    def _drop(self, job: _Job) -> None:
        kept = deque(entry for entry in self._queue if entry[0] is not job)
        self._queued_tokens -= sum(len(job.inputs[i]) for j, i in self._queue if j is job)
        self._queue = kept

    def _take(self) -> _Pass:
        """The next pass's inputs with their blocks, in arrival order."""
        pool = self._pool
        assert pool is not None
        bs = pool.block_size_tokens
        taken = _Pass()
        longest = 0
        queue = self._queue
        while queue and len(taken.items) < self.max_num_seqs:
            job, i = queue[0]
            n = len(job.inputs[i])
            longest_then = max(longest, n)
            if taken.items and longest_then * (len(taken.items) + 1) > self.max_num_batched_tokens:
                break
            blocks = pool.allocate(-(-n // bs))
            if blocks is None:
                if taken.items:
                    break  # the rest waits for this pass's blocks
                # Nothing of ours holds blocks: generation does (a worker serves one or the other).
                raise errors.Overloaded("the KV cache is full: no blocks for an embedding pass")
            queue.popleft()
            self._queued_tokens -= n
            longest = longest_then
            taken.items.append((job, i))
            taken.blocks.append(blocks)
        return taken

    async def _run(self) -> None:
        pool = self._pool
        assert pool is not None
        while True:
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                taken = self._take()
            except errors.DynamoError as exc:
                job, _ = self._queue[0]
                self._drop(job)
                if not job.future.done():
                    job.future.set_exception(exc)
                continue
            batch = PoolingBatch(
                token_ids=[job.inputs[i] for job, i in taken.items],
                block_ids=[[b.block_id for b in blocks] for blocks in taken.blocks],
                pooling=[job.pooling for job, _ in taken.items],
                block_size_tokens=pool.block_size_tokens,
            )
            self._running = len(taken.items)
            try:
                vectors = await self.executor.pool(batch)
            except Exception as exc:  # noqa: BLE001 - the pass's requests get the error, others go on
                log.exception("embedding pass of %d inputs failed", len(taken.items))
                failed = errors.EngineError(f"embedding forward pass failed: {exc}")
                for job, _ in taken.items:
                    if not job.future.done():
                        job.future.set_exception(failed)
                        self._drop(job)  # its inputs still queued are not run
                continue
            finally:
                self._running = 0
                for blocks in taken.blocks:
                    pool.release(blocks)
            self.num_passes += 1
            for row, (job, i) in enumerate(taken.items):
                if job.future.done():
                    continue  # cancelled (or failed) meanwhile
                job.vectors[i] = vectors[row]
                job.remaining -= 1
                if job.remaining == 0:
                    job.future.set_result(None)
