"""MockerEngine: a real Engine whose forward pass is a timed sleep. One owned step-loop task runs
the scheduler over a real block pool; each request reads its tokens from its own queue."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from dynamo import errors
from dynamo.kv_hash import block_hash
from dynamo.wire import EngineOutput, KvEventData, LoadMetrics, PreprocessedRequest
from kvbm.block_pool import BlockPool, KvEventSink
from kvbm.simulated import SimulatedKvbm
from workers.engine import Engine, EngineInfo

if TYPE_CHECKING:
    from dynamo.wire import KvLayoutSpec
    from workers.disagg.engine_support import DisaggSupport
from workers.mocker.args import MockerConfig
from workers.mocker.scheduler import Scheduler
from workers.mocker.sequence import MockSequence
from workers.mocker.timing import TimingModel

log = logging.getLogger(__name__)

# Past this speedup a step would sleep for microseconds; asyncio.sleep's own cost would then
# dominate, so the loop only yields and benchmarks measure the frontend, not the timer.
NO_SLEEP_SPEEDUP = 1e6


class MockerEngine(Engine):
    name = "mocker"

    def __init__(self, config: MockerConfig, timing: TimingModel | None = None) -> None:
        self.config = config
        self.timing = timing or TimingModel(speedup_ratio=config.speedup_ratio)
        self.kvbm: SimulatedKvbm | None = None
        if config.kvbm.enabled:
            block_bytes = self.timing.kv_bytes_per_token * config.block_size_tokens
            self.kvbm = SimulatedKvbm(config.kvbm, block_bytes, on_event=self._emit)
        self.pool = BlockPool(
            config.num_gpu_blocks, config.block_size_tokens, on_event=self._emit,
            on_evict=self.kvbm.cache.evicted if self.kvbm is not None else None,
        )
        self.scheduler = Scheduler(config, self.pool, self.kvbm.cache if self.kvbm is not None else None)
        self.engine_time_s = 0.0  # simulated (sped-up) time of every step so far
        self.num_steps = 0
        self._kv_events: KvEventSink | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._streams: dict[MockSequence, asyncio.Queue[EngineOutput | errors.DynamoError]] = {}
        # A request can never outgrow the pool: capping it there means a lone request always
        # fits once everything newer is preempted, so preemption cannot livelock.
        self._max_len = min(config.max_model_len, config.kv_capacity_tokens)

    # ---------------------------------------------------------------------------- lifecycle

    async def start(self, kv_events: KvEventSink | None = None) -> EngineInfo:
        if self._task is not None:
            raise RuntimeError("mocker engine already started")
        self._kv_events = kv_events
        self._task = asyncio.create_task(self._step_loop(), name="mocker-step-loop")
        return EngineInfo(
            context_length=self.config.max_model_len,
            kv_block_size=self.config.block_size_tokens,
            kv_total_blocks=self.config.num_gpu_blocks,
        )

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait([task])  # unlike awaiting it, does not swallow our own cancel
        self._fail_all(errors.EngineError("mocker engine stopped"))

    # ------------------------------------------------------------------------------ serving

    async def generate(self, request: PreprocessedRequest) -> AsyncIterator[EngineOutput]:
        if self._task is None or self._task.done():
            raise errors.EngineError("mocker engine is not running")
        queue: asyncio.Queue[EngineOutput | errors.DynamoError] = asyncio.Queue()
        seq = self._new_sequence(request, queue)
        self._streams[seq] = queue
        self.scheduler.add(seq)
        self._wake.set()
        try:
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
            self.scheduler.abort(seq)

    def load_metrics(self) -> LoadMetrics:
        return LoadMetrics(
            worker_id=0,
            active_requests=self.scheduler.num_running,
            waiting_requests=self.scheduler.num_waiting,
            kv_active_blocks=self.pool.num_active_blocks,
            kv_total_blocks=self.pool.num_blocks,
            waiting_prefill_tokens=self.scheduler.waiting_prefill_tokens(),
            timestamp_s=time.time(),
        )

    def kv_snapshot(self) -> list[KvEventData]:
        return self.pool.snapshot()

    # ------------------------------------------------------------------------------ helpers

    def _new_sequence(
        self, request: PreprocessedRequest, queue: asyncio.Queue[EngineOutput | errors.DynamoError]
    ) -> MockSequence:
        prompt_len = len(request.token_ids)
        config = self.config
        if prompt_len == 0:
            raise errors.InvalidRequest("prompt is empty", param="prompt")
        if prompt_len > config.max_model_len - 1:
            raise errors.InvalidRequest(
                f"prompt has {prompt_len} tokens but max_model_len is {config.max_model_len}: "
                f"at most {config.max_model_len - 1} prompt tokens leave room to generate one",
                param="prompt",
            )
        if prompt_len > config.kv_capacity_tokens - 1:
            raise errors.InvalidRequest(
                f"prompt has {prompt_len} tokens but this engine's KV cache holds only "
                f"{config.kv_capacity_tokens} tokens ({config.num_gpu_blocks} blocks of "
                f"{config.block_size_tokens})",
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
        seed = request.sampling.seed
        if seed is None:
            seed = block_hash(None, request.token_ids)  # same prompt, same tokens
        return MockSequence(
            request_id=request.request_id,
            token_ids=list(request.token_ids),
            max_new_tokens=max_new,
            max_len=self._max_len,
            stop_token_ids=frozenset(stop.stop_token_ids),
            min_tokens=stop.min_tokens,
            generated_before=request.generated_before,
            rng=random.Random(hash((config.seed, seed))),
            on_output=queue.put_nowait,
        )

    async def _step_loop(self) -> None:
        loop = asyncio.get_running_loop()
        scheduler = self.scheduler
        sleep = self.timing.speedup_ratio < NO_SLEEP_SPEEDUP
        deadline = loop.time()
        try:
            while True:
                if not scheduler.has_work():
                    self._wake.clear()
                    await self._wake.wait()
                    deadline = loop.time()
                batch = scheduler.schedule()
                if not batch.seqs:
                    raise RuntimeError(
                        f"mocker scheduled nothing with {scheduler.num_running} running and "
                        f"{scheduler.num_waiting} waiting requests"
                    )
                step_s = self.timing.step_time_s(batch.num_tokens, batch.kv_tokens, batch.attn_pairs)
                if self.kvbm is not None:
                    # Onboarding precedes the forward pass that needs the blocks.
                    step_s += self.kvbm.step_cost_s() / self.timing.speedup_ratio
                self.engine_time_s += step_s
                self.num_steps += 1
                if sleep:
                    # Sleep to a deadline, not for a duration, so time spent scheduling and in
                    # other tasks is absorbed instead of accumulating as drift.
                    deadline = max(deadline, loop.time()) + step_s
                    await asyncio.sleep(deadline - loop.time())
                else:
                    await asyncio.sleep(0)
                scheduler.finish_step(batch)
        except Exception as exc:
            log.exception("mocker step loop failed")
            self._fail_all(errors.EngineError(f"mocker engine failed: {exc}"))
            raise

    def _fail_all(self, error: errors.DynamoError) -> None:
        for seq, queue in list(self._streams.items()):
            self.scheduler.abort(seq)
            queue.put_nowait(error)

    # --------------------------------------------- disaggregated prefill (workers/disagg)

    def kv_layout(self) -> KvLayoutSpec:
        """The simulated model's KV shape (8 KV heads, bf16), sized from the timing model so
        that simulated transfers move its kv_bytes_per_token."""
        from dynamo.wire import KvLayoutSpec

        t = self.timing
        head_dim = max(1, t.kv_bytes_per_token // (t.num_layers * 2 * 8 * 2))
        return KvLayoutSpec(t.num_layers, self.config.block_size_tokens, 8, head_dim, "bfloat16")

    def kv_memory(self) -> None:
        return None  # nothing to move: transfers are simulated from bytes and link bandwidth

    def disagg_support(self) -> DisaggSupport:
        from workers.disagg.engine_support import DisaggSupport

        config = self.config
        return DisaggSupport(
            self.pool, self.scheduler, self._new_sequence, self._streams, self._wake.set,
            # The prefill worker drew the first token from the same seeded stream: skip it.
            on_import=lambda seq: seq.sample(config.vocab_size, config.exclude_token_ids),
        )

    def _emit(self, event: KvEventData) -> None:
        if self._kv_events is not None:
            self._kv_events(event)
