"""PagedEngine: continuous batching over a paged KV cache, whatever computes the steps. It owns
the block pool, the scheduler, the request streams and one step-loop task, whose step reads as
nano-vllm's: schedule, run the batch on the step executor, finish (append tokens, send them).
The disaggregation operations (hold a prefill's blocks, reserve blocks for a transfer, decode
from received KV) are its public methods (workers.engine.DisaggEngine)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Generic, TypeVar

import msgspec

from dynamo import errors, tracing
from dynamo.kv_hash import block_hashes
from dynamo.wire import (
    EmbeddingRequest,
    EngineOutput,
    KvEventData,
    KvLayoutSpec,
    LoadMetrics,
    PoolingType,
    PreprocessedRequest,
)
from kvbm.block_pool import Block, BlockPool, KvEventSink
from workers.embedding import EmbeddingConfig, PooledBatch
from workers.engine import Engine, EngineInfo, HeldPrefill, KvbmTiers, Reservation
from workers.paged.embedding import EmbeddingBatcher, PoolingExecutor
from workers.paged.executor import LaunchedStep, OverlapExecutor, StepExecutor
from workers.paged.scheduler import ScheduledBatch, Scheduler
from workers.paged.sequence import Sequence
from workers.paged.spans import EngineSpans

if TYPE_CHECKING:
    from kvbm.transfer.layout import KvMemory

log = logging.getLogger(__name__)

Queue = asyncio.Queue[EngineOutput | errors.DynamoError]
E = TypeVar("E", bound=StepExecutor)


class PagedEngine(Engine, Generic[E]):
    """An Engine over a StepExecutor `E`; the built-in engine and the mocker are this class
    with their executor wired in."""

    name = "paged"

    def __init__(self, executor: E, *, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.executor = executor
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.speedup_ratio = executor.speedup_ratio
        self.max_model_len = 0  # known once started
        self.num_steps = 0
        self._pool: BlockPool | None = None
        self._scheduler: Scheduler | None = None
        self._max_len = 0  # token_ids never grow past this: the context length or the pool's capacity
        self._eos_token_ids: frozenset[int] = frozenset()
        self._kv_events: KvEventSink | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._streams: dict[Sequence, Queue] = {}
        self.embeddings: EmbeddingBatcher | None = None  # set by enable_embeddings

    # ------------------------------------------------------------------------------ state

    @property
    def pool(self) -> BlockPool:
        if self._pool is None:
            raise RuntimeError(f"{self.name} engine not started")
        return self._pool

    @property
    def scheduler(self) -> Scheduler:
        if self._scheduler is None:
            raise RuntimeError(f"{self.name} engine not started")
        return self._scheduler

    @property
    def kvbm(self) -> KvbmTiers | None:
        return self.executor.kvbm

    # ---------------------------------------------------------------------------- lifecycle

    async def start(self, kv_events: KvEventSink | None = None) -> EngineInfo:
        if self._task is not None:
            raise RuntimeError(f"{self.name} engine already started")
        self._kv_events = kv_events
        loop = asyncio.get_running_loop()

        def wake() -> None:  # from any thread
            loop.call_soon_threadsafe(self._wake.set)

        info = await self.executor.start(wake)
        kvbm = self.executor.kvbm
        cache = kvbm.cache if kvbm is not None else None
        self._pool = BlockPool(
            info.num_blocks, info.block_size_tokens, on_event=self._emit,
            on_evict=cache.evicted if cache is not None else None,
        )
        self._scheduler = Scheduler(self._pool, self.max_num_seqs, self.max_num_batched_tokens, cache)
        self.max_model_len = info.max_model_len
        # A request can never outgrow the pool: capping it there means a lone request always
        # fits once everything newer is preempted, so preemption cannot livelock.
        self._max_len = min(info.max_model_len, info.num_blocks * info.block_size_tokens)
        self._eos_token_ids = frozenset(info.eos_token_ids)
        self._task = asyncio.create_task(self._step_loop(), name=f"{self.name}-step-loop")
        if self.embeddings is not None:
            self.embeddings.start(self._pool)
        return EngineInfo(
            context_length=info.max_model_len,
            kv_block_size=info.block_size_tokens,
            kv_total_blocks=info.num_blocks,
            eos_token_ids=info.eos_token_ids,
        )

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait([task])  # unlike awaiting it, does not swallow our own cancel
        if self.embeddings is not None:
            await self.embeddings.close()
        await self.executor.stop()
        self._fail_all(errors.EngineError(f"{self.name} engine stopped"))

    # ------------------------------------------------------------------------------ serving

    def generate(self, request: PreprocessedRequest) -> AsyncIterator[EngineOutput]:
        return self._serve(request, None)

    def load_metrics(self) -> LoadMetrics:
        scheduler, pool = self._scheduler, self._pool
        if scheduler is None or pool is None:
            return LoadMetrics(worker_id=0, timestamp_s=time.time())
        metrics = LoadMetrics(
            worker_id=0,
            active_requests=scheduler.num_running,
            waiting_requests=scheduler.num_waiting,
            kv_active_blocks=pool.num_active_blocks,
            kv_total_blocks=pool.num_blocks,
            waiting_prefill_tokens=scheduler.waiting_prefill_tokens(),
            timestamp_s=time.time(),
        )
        embeddings = self.embeddings
        if embeddings is not None:  # embedding inputs count as requests and prefill tokens
            metrics.active_requests += embeddings.num_running
            metrics.waiting_requests += embeddings.num_waiting
            metrics.waiting_prefill_tokens += embeddings.waiting_tokens
        return metrics

    # ------------------------------------------- embeddings (workers/paged/embedding.py)

    def enable_embeddings(self, config: EmbeddingConfig) -> None:
        """Serve embeddings: inputs are batched into passes of their own on the executor."""
        if not isinstance(self.executor, PoolingExecutor):
            raise errors.EngineError(f"the {self.name} engine cannot serve embedding models")
        self.embeddings = EmbeddingBatcher(self.executor, self.max_num_seqs, self.max_num_batched_tokens)

    @property
    def embedding_dim(self) -> int:
        return self.embeddings.executor.embedding_dim if self.embeddings is not None else 0

    async def embed(self, request: EmbeddingRequest, pooling: PoolingType) -> PooledBatch:
        if self.embeddings is None:
            raise errors.InvalidRequest(f"the {self.name} engine serves no embedding model")
        self._check_running()
        return await self.embeddings.embed(request.inputs, pooling)

    def kv_snapshot(self) -> list[KvEventData]:
        return self._pool.snapshot() if self._pool is not None else []

    # ------------------------------------------------- KV transfer and disaggregation

    def kv_layout(self) -> KvLayoutSpec:
        return self.executor.kv_layout()

    def kv_memory(self) -> KvMemory | None:
        return self.executor.kv_memory()

    def cached_prefix_tokens(self, token_ids: list[int]) -> int:
        """Prompt tokens whose KV the device prefix cache holds now."""
        pool = self.pool
        bs = pool.block_size_tokens
        return len(pool.match_prefix(block_hashes(token_ids, bs))) * bs

    async def prefill_held(self, request: PreprocessedRequest) -> HeldPrefill:
        """Run the prompt and sample its first token (max_tokens=1 semantics), keeping the
        prompt's blocks referenced so their KV can be exported; release() them once sent."""
        self._check_running()
        stop = msgspec.structs.replace(request.stop, max_tokens=request.generated_before + 1)
        queue: Queue = asyncio.Queue()
        seq = self._new_sequence(msgspec.structs.replace(request, stop=stop), queue, hold_blocks=True)
        scheduler = self.scheduler
        self._streams[seq] = queue
        scheduler.add(seq)
        self._wake.set()
        try:
            item = await queue.get()
            if isinstance(item, errors.DynamoError):
                raise item
            return HeldPrefill(item, [b.block_id for b in seq.take_blocks()])
        finally:
            del self._streams[seq]
            scheduler.abort(seq)  # frees them if it never finished (cancelled, failed)
            self.executor.release(seq)
            if seq.block_table:  # finished, but we were cancelled before taking the blocks
                self.pool.release(seq.take_blocks())

    def reserve(self, token_ids: list[int]) -> Reservation | None:
        """Blocks for the whole prompt: its locally cached prefix plus fresh ones, or None when
        the pool has no room now (the caller then prefills locally, which queues)."""
        pool = self.pool
        bs = pool.block_size_tokens
        total = len(token_ids)
        needed = -(-total // bs)
        usable = (total - 1) // bs  # leave at least one block to transfer, like admission does
        matched = pool.match_prefix(block_hashes(token_ids[: usable * bs], bs))
        fresh = needed - len(matched)
        if pool.num_free_blocks - sum(1 for b in matched if b.ref_count == 0) < fresh:
            return None
        pool.acquire(matched)
        blocks = pool.allocate(fresh)
        assert blocks is not None
        return Reservation([b.block_id for b in matched + blocks], len(matched))

    def release(self, handle: HeldPrefill | Reservation) -> None:
        """Give a held prefill's or a reservation's blocks back (a second call does nothing)."""
        blocks = self._take(handle)
        if blocks:
            self.pool.release(blocks)

    def generate_from_kv(
        self, request: PreprocessedRequest, first: EngineOutput, reservation: Reservation
    ) -> AsyncIterator[EngineOutput]:
        """Decode `request` whose prompt KV sits in `reservation` (now owned here) and whose
        first token `first` came from the prefill worker: no prompt token is recomputed."""
        return self._serve(request, (first, reservation))

    # ------------------------------------------------------------------------------ helpers

    async def _serve(
        self, request: PreprocessedRequest, prefilled: tuple[EngineOutput, Reservation] | None
    ) -> AsyncIterator[EngineOutput]:
        """One request's stream: queue it (or, prefilled elsewhere, start it decoding from its
        first token) and yield what the step loop sends it."""
        queue: Queue = asyncio.Queue()
        try:
            self._check_running()
            seq = self._new_sequence(request, queue)
        except BaseException:
            if prefilled is not None:
                self.release(prefilled[1])
            raise
        scheduler = self.scheduler
        self._streams[seq] = queue
        trace = request.trace
        spans = EngineSpans(trace, seq, prefilled is not None) if trace is not None and tracing.active else None
        try:
            if prefilled is None:
                scheduler.add(seq)
            else:
                first, reservation = prefilled
                self.executor.imported(seq, first.token_ids[0])
                matched = reservation.matched_blocks
                # Commits the prompt's full blocks: KV events, and reuse by later prompts.
                reason = scheduler.add_prefilled(seq, self._take(reservation), matched, first)
                if reason is not None:
                    scheduler.abort(seq)
                # The prefill worker's first output as it sent it (logprobs, prompt logprobs),
                # its one token and this engine's finish reason.
                queue.put_nowait(msgspec.structs.replace(first, token_ids=first.token_ids[:1], finish_reason=reason))
            self._wake.set()
            while True:
                item = await queue.get()
                if isinstance(item, errors.DynamoError):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            # Closed early (GeneratorExit) or cancelled: abort now so the blocks free at once.
            del self._streams[seq]
            scheduler.abort(seq)
            self.executor.release(seq)
            if spans is not None:
                spans.emit()

    def _check_running(self) -> None:
        if self._task is None or self._task.done():
            raise errors.EngineError(f"{self.name} engine is not running")

    def _take(self, handle: HeldPrefill | Reservation) -> list[Block]:
        ids, handle.block_ids = handle.block_ids, []
        blocks = self.pool.blocks
        return [blocks[i] for i in ids]

    def _new_sequence(self, request: PreprocessedRequest, queue: Queue, hold_blocks: bool = False) -> Sequence:
        prompt = request.token_ids
        prompt_len = len(prompt)
        if prompt_len == 0:
            raise errors.InvalidRequest("prompt is empty", param="prompt")
        if prompt_len > self.max_model_len - 1:
            raise errors.InvalidRequest(
                f"prompt has {prompt_len} tokens but max_model_len is {self.max_model_len}: "
                f"at most {self.max_model_len - 1} prompt tokens leave room to generate one",
                param="prompt",
            )
        if prompt_len > self._max_len - 1:
            pool = self.pool
            raise errors.InvalidRequest(
                f"prompt has {prompt_len} tokens but this engine's KV cache holds only {self._max_len} "
                f"tokens ({pool.num_blocks} blocks of {pool.block_size_tokens})",
                param="prompt",
            )
        stop = request.stop
        max_new = self._max_len  # unbounded but for the context
        if stop.max_tokens is not None:
            max_new = stop.max_tokens - request.generated_before
            if max_new <= 0:
                raise errors.InvalidRequest(
                    f"max_tokens is {stop.max_tokens} and {request.generated_before} tokens "
                    "were generated already: nothing left to generate",
                    param="max_tokens",
                )
        state = self.executor.new_request_state(request)
        stop_ids = frozenset(stop.stop_token_ids)
        if stop.ignore_eos and self._eos_token_ids:
            stop_ids -= self._eos_token_ids
        return Sequence(
            request_id=request.request_id,
            token_ids=list(prompt),
            sampling=request.sampling,
            max_new_tokens=max_new,
            max_len=self._max_len,
            stop_token_ids=stop_ids,
            min_tokens=stop.min_tokens,
            generated_before=request.generated_before,
            on_output=queue.put_nowait,
            exec_state=state,
            hold_blocks=hold_blocks,
            prompt_logprobs=request.prompt_logprobs,
        )

    async def _step_loop(self) -> None:
        executor = self.executor
        if isinstance(executor, OverlapExecutor) and executor.overlap:
            await self._overlap_loop(executor)
            return
        scheduler = self.scheduler
        try:
            while True:
                if not scheduler.has_work():
                    if scheduler.num_loading:  # every request left waits for disk reads
                        await executor.wait_for_reads()
                    if not scheduler.has_work():
                        self._wake.clear()
                        await self._wake.wait()
                        continue
                batch = scheduler.schedule()
                if not batch.seqs:
                    if not scheduler.only_loading():
                        raise RuntimeError(
                            f"scheduled nothing with {scheduler.num_running} running and "
                            f"{scheduler.num_waiting} waiting requests"
                        )
                    continue  # they went to loading just now
                result = await executor.run(batch)
                self.num_steps += 1
                scheduler.finish_step(batch, result)
        except Exception as exc:
            log.exception("%s engine step loop failed", self.name)
            self._fail_all(errors.EngineError(f"{self.name} engine failed: {exc}"))
            raise

    async def _overlap_loop(self, executor: OverlapExecutor) -> None:
        """The step loop with one step in flight: launch step N+1, then read step N's tokens,
        send them and schedule N+2 while N+1 computes, so the host's work per step hides
        under the device's. A request's stop token is seen one step late: its row in the step
        already launched is computed and dropped."""
        scheduler = self.scheduler
        inflight: tuple[ScheduledBatch, LaunchedStep] | None = None
        try:
            while True:
                if inflight is None and not scheduler.has_work():
                    if scheduler.num_loading:
                        await executor.wait_for_reads()
                    if not scheduler.has_work():
                        self._wake.clear()
                        await self._wake.wait()
                        continue
                batch = scheduler.schedule() if scheduler.has_work() else ScheduledBatch()
                if batch.seqs and inflight is not None and executor.needs_previous(batch):
                    await self._finish(*inflight)
                    inflight = None
                launched = (batch, await executor.launch(batch)) if batch.seqs else None
                scheduler.set_inflight(batch if launched is not None else None)
                if inflight is not None:
                    await self._finish(*inflight)
                elif launched is None and not scheduler.only_loading():
                    raise RuntimeError(
                        f"scheduled nothing with {scheduler.num_running} running and "
                        f"{scheduler.num_waiting} waiting requests"
                    )
                inflight = launched
        except Exception as exc:
            log.exception("%s engine step loop failed", self.name)
            self._fail_all(errors.EngineError(f"{self.name} engine failed: {exc}"))
            raise

    async def _finish(self, batch: ScheduledBatch, launched: LaunchedStep) -> None:
        result = await launched.result()
        self.num_steps += 1
        self.scheduler.finish_step(batch, result)

    def _fail_all(self, error: errors.DynamoError) -> None:
        for seq, queue in list(self._streams.items()):
            if self._scheduler is not None:
                self._scheduler.abort(seq)
            queue.put_nowait(error)

    def _emit(self, event: KvEventData) -> None:
        if self._kv_events is not None:
            self._kv_events(event)
