"""BuiltinEngine: real Llama-family models over a paged KV cache. One owned step-loop task
schedules on the event loop's thread and runs each forward pass on a dedicated model thread;
every request reads its tokens from its own queue."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import torch

from dynamo import errors
from dynamo.wire import EngineOutput, KvEventData, LoadMetrics, PreprocessedRequest
from kvbm.block_pool import BlockPool, KvEventSink
from kvbm.layout import KvLayout
from kvbm.manager import KvBlockManager
from workers.builtin.args import BuiltinConfig
from workers.builtin.config import ModelConfig, load_model_config
from workers.builtin.kv_cache import KVCache, kv_bytes_per_block, num_blocks_for_bytes
from workers.builtin.loader import load_model, resolve_dtype
from workers.builtin.runner import ModelRunner, build_step_input
from workers.builtin.sampling import SamplingParams
from workers.builtin.scheduler import ScheduledBatch, Scheduler
from workers.builtin.sequence import Sequence
from workers.engine import Engine, EngineInfo

if TYPE_CHECKING:
    from dynamo.wire import KvLayoutSpec
    from kvbm.transfer.layout import KvMemory
    from workers.disagg.engine_support import DisaggSupport

log = logging.getLogger(__name__)

GiB = 1 << 30
CPU_DEFAULT_KV_BYTES = GiB // 4  # 64k tokens of the default model: plenty for CPU serving


class BuiltinEngine(Engine):
    name = "builtin"

    def __init__(self, config: BuiltinConfig) -> None:
        self.config = config
        self.device = _resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        # Read now, so a bad model directory fails at construction with a clear message.
        self.model_config: ModelConfig = load_model_config(config.model)
        self.pool: BlockPool | None = None
        self.scheduler: Scheduler | None = None
        self.runner: ModelRunner | None = None
        self.max_model_len = 0
        self._max_len = 0
        self._kv_events: KvEventSink | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._streams: dict[Sequence, asyncio.Queue[EngineOutput | errors.DynamoError]] = {}
        self._seeds = random.Random(config.seed)
        self.num_steps = 0
        self.kvbm: KvBlockManager | None = None  # host/disk tiers, when config.kvbm is enabled

    # ---------------------------------------------------------------------------- lifecycle

    async def start(self, kv_events: KvEventSink | None = None) -> EngineInfo:
        if self._task is not None:
            raise RuntimeError("builtin engine already started")
        self._kv_events = kv_events
        # One thread owns every torch call of this engine, loading included.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="builtin-model")
        loop = asyncio.get_running_loop()
        self.runner = await loop.run_in_executor(self._executor, self._build_runner)
        kv = self.runner.kv
        if self.config.kvbm.enabled:
            # Built on the model thread: the host tier is one large (pinned) allocation.
            self.kvbm = await loop.run_in_executor(self._executor, self._build_kvbm)
            if self.kvbm.reader is not None:
                # Disk reads end on a reader thread: wake the step loop for the held request.
                wake = self._wake.set
                self.kvbm.reader.notify = lambda: loop.call_soon_threadsafe(wake)
            await self.kvbm.start()
        kvbm = self.kvbm
        self.pool = BlockPool(
            kv.num_blocks, kv.block_size_tokens, on_event=self._emit,
            on_evict=kvbm.cache.evicted if kvbm is not None else None,
        )
        self.scheduler = Scheduler(
            self.pool, self.config.max_num_seqs, self.config.max_num_batched_tokens,
            kvbm.cache if kvbm is not None else None,
        )
        self._task = asyncio.create_task(self._step_loop(), name="builtin-step-loop")
        log.info(
            "builtin engine: %s (%s) on %s %s, %d KV blocks of %d tokens, max_model_len %d",
            self.model_config.model_dir, self.model_config.architecture, self.device, self.dtype,
            kv.num_blocks, kv.block_size_tokens, self.max_model_len,
        )
        return EngineInfo(
            context_length=self.max_model_len,
            kv_block_size=kv.block_size_tokens,
            kv_total_blocks=kv.num_blocks,
            eos_token_ids=self.model_config.eos_token_ids,
        )

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait([task])  # unlike awaiting it, does not swallow our own cancel
        executor, self._executor = self._executor, None
        if executor is not None:
            # A step may still be computing on the model thread; let it finish before the
            # cache it writes goes away.
            await asyncio.to_thread(executor.shutdown, True)
        if self.kvbm is not None:
            await self.kvbm.stop()
        self._fail_all(errors.EngineError("builtin engine stopped"))

    # ------------------------------------------------------------------------------ serving

    async def generate(self, request: PreprocessedRequest) -> AsyncIterator[EngineOutput]:
        if self._task is None or self._task.done() or self.scheduler is None:
            raise errors.EngineError("builtin engine is not running")
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
        scheduler, pool = self.scheduler, self.pool
        if scheduler is None or pool is None:
            return LoadMetrics(worker_id=0, timestamp_s=time.time())
        return LoadMetrics(
            worker_id=0,
            active_requests=scheduler.num_running,
            waiting_requests=scheduler.num_waiting,
            kv_active_blocks=pool.num_active_blocks,
            kv_total_blocks=pool.num_blocks,
            waiting_prefill_tokens=scheduler.waiting_prefill_tokens(),
            timestamp_s=time.time(),
        )

    def kv_snapshot(self) -> list[KvEventData]:
        return self.pool.snapshot() if self.pool is not None else []

    # ------------------------------------------------------------------------------ helpers

    def _build_runner(self) -> ModelRunner:
        """On the model thread: load weights, size and allocate the KV cache."""
        mc, config = self.model_config, self.config
        model = load_model(mc, self.dtype, self.device)
        self.max_model_len = min(config.max_model_len or model.max_positions, model.max_positions)
        num_blocks = config.num_gpu_blocks or self._num_blocks_from_memory(model)
        if num_blocks < 1:
            raise errors.EngineError(
                f"no memory left for the KV cache: one block needs "
                f"{kv_bytes_per_block(mc, config.block_size_tokens, self.dtype)} bytes"
            )
        kv = KVCache.allocate(mc, num_blocks, config.block_size_tokens, self.dtype, self.device)
        # A request can never outgrow the pool: capping it there means a lone request always
        # fits once everything newer is preempted, so preemption cannot livelock.
        self._max_len = min(self.max_model_len, num_blocks * config.block_size_tokens)
        return ModelRunner(
            model, kv, self.device, enforce_eager=config.enforce_eager,
            max_num_seqs=config.max_num_seqs, max_model_len=self._max_len,
        )

    def _num_blocks_from_memory(self, model: torch.nn.Module) -> int:
        config, mc = self.config, self.model_config
        if config.kv_cache_memory_gb is not None:
            kv_bytes = int(config.kv_cache_memory_gb * 1e9)
        elif self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            elem = torch.empty((), dtype=self.dtype).element_size()
            # Room for one step's activations: MLP and logits of a full token budget.
            reserve = GiB + config.max_num_batched_tokens * (2 * mc.intermediate_size + 4 * mc.hidden_size) * elem
            reserve += config.max_num_seqs * mc.vocab_size * 4 * 2
            kv_bytes = int(total * config.gpu_memory_utilization) - (total - free) - reserve
        else:
            kv_bytes = CPU_DEFAULT_KV_BYTES
        # No use in more blocks than max_num_seqs full-length sequences can hold.
        cap = config.max_num_seqs * -(-self.max_model_len // config.block_size_tokens)
        return min(num_blocks_for_bytes(mc, config.block_size_tokens, self.dtype, kv_bytes), cap)

    def _new_sequence(
        self, request: PreprocessedRequest, queue: asyncio.Queue[EngineOutput | errors.DynamoError]
    ) -> Sequence:
        prompt = request.token_ids
        prompt_len = len(prompt)
        mc = self.model_config
        if prompt_len == 0:
            raise errors.InvalidRequest("prompt is empty", param="prompt")
        if prompt_len > self.max_model_len - 1:
            raise errors.InvalidRequest(
                f"prompt has {prompt_len} tokens but max_model_len is {self.max_model_len}: "
                f"at most {self.max_model_len - 1} prompt tokens leave room to generate one",
                param="prompt",
            )
        if prompt_len > self._max_len - 1:
            raise errors.InvalidRequest(
                f"prompt has {prompt_len} tokens but this engine's KV cache holds only {self._max_len}",
                param="prompt",
            )
        if min(prompt) < 0 or max(prompt) >= mc.vocab_size:
            raise errors.InvalidRequest(f"prompt has token ids outside [0, {mc.vocab_size})", param="prompt")
        params = _sampling_params(request)
        stop = request.stop
        max_new = self._max_len
        if stop.max_tokens is not None:
            max_new = stop.max_tokens - request.generated_before
            if max_new <= 0:
                raise errors.InvalidRequest(
                    f"max_tokens is {stop.max_tokens} and {request.generated_before} tokens "
                    "were generated already: nothing left to generate",
                    param="max_tokens",
                )
        stop_ids = set(stop.stop_token_ids)
        if stop.ignore_eos:
            stop_ids.difference_update(mc.eos_token_ids)
        generator = None
        if not params.greedy:
            seed = request.sampling.seed
            if seed is None:
                seed = self._seeds.getrandbits(63)
            generator = torch.Generator(device=self.device).manual_seed(seed)
        return Sequence(
            request_id=request.request_id,
            token_ids=list(prompt),
            max_new_tokens=max_new,
            max_len=self._max_len,
            stop_token_ids=frozenset(stop_ids),
            min_tokens=stop.min_tokens,
            generated_before=request.generated_before,
            sampling=params,
            generator=generator,
            on_output=queue.put_nowait,
        )

    async def _step_loop(self) -> None:
        loop = asyncio.get_running_loop()
        scheduler, runner, executor = self.scheduler, self.runner, self._executor
        assert scheduler is not None and runner is not None and executor is not None
        try:
            while True:
                if not scheduler.has_work():
                    self._wake.clear()
                    await self._wake.wait()
                batch = scheduler.schedule()
                if not batch.seqs and scheduler.num_loading and not scheduler.waiting and not scheduler.running:
                    if self.kvbm is not None and self.kvbm.has_pending():
                        await self._run_kvbm_plan(batch)  # it may start reads deferred behind its writes
                    continue  # every request left waits for disk reads: sleep until one is done
                if not batch.seqs:
                    raise RuntimeError(
                        f"scheduled nothing with {scheduler.num_running} running and "
                        f"{scheduler.num_waiting} waiting requests"
                    )
                if self.kvbm is not None and self.kvbm.has_pending():
                    await self._run_kvbm_plan(batch)
                step = build_step_input(batch)
                result = await loop.run_in_executor(executor, runner.execute, step)
                self.num_steps += 1
                scheduler.finish_step(batch, result.token_ids, result.logprobs)
        except Exception as exc:
            log.exception("builtin engine step loop failed")
            self._fail_all(errors.EngineError(f"builtin engine failed: {exc}"))
            raise

    def _build_kvbm(self) -> KvBlockManager:
        assert self.runner is not None
        mc, kv = self.model_config, self.runner.kv
        layout = KvLayout(mc.num_layers, kv.block_size_tokens, mc.num_kv_heads, mc.head_dim,
                          str(self.dtype).removeprefix("torch."))
        return KvBlockManager(self.config.kvbm, layout, kv.k, kv.v, on_event=self._emit)

    async def _run_kvbm_plan(self, batch: ScheduledBatch) -> None:
        """Copy evicted blocks down and onboarded blocks up, on the model thread, before the
        step's forward pass reuses or reads them. An onboard that failed is recomputed."""
        kvbm = self.kvbm
        assert kvbm is not None and self._executor is not None
        plan = kvbm.take_plan()
        loop = asyncio.get_running_loop()
        failed = await loop.run_in_executor(self._executor, kvbm.execute, plan)
        kvbm.finish(plan, failed)
        if failed:
            _recompute_from(batch, set(failed), kvbm.layout.block_size_tokens)

    def _fail_all(self, error: errors.DynamoError) -> None:
        for seq, queue in list(self._streams.items()):
            if self.scheduler is not None:
                self.scheduler.abort(seq)
            queue.put_nowait(error)

    # --------------------------------------------- disaggregated prefill (workers/disagg)

    def kv_layout(self) -> KvLayoutSpec:
        mc = self.model_config
        from dynamo.wire import KvLayoutSpec

        return KvLayoutSpec(
            mc.num_layers, self.config.block_size_tokens, mc.num_kv_heads, mc.head_dim,
            str(self.dtype).removeprefix("torch."),
        )

    def kv_memory(self) -> KvMemory:
        """The KV tensors for a transfer agent; its copies run on the model thread."""
        from kvbm.transfer.layout import KvMemory

        assert self.runner is not None and self._executor is not None, "engine not started"
        executor, loop = self._executor, asyncio.get_running_loop()
        return KvMemory(self.runner.kv.k, self.runner.kv.v, self.kv_layout(),
                        lambda fn: loop.run_in_executor(executor, fn))

    def disagg_support(self) -> DisaggSupport:
        from workers.disagg.engine_support import DisaggSupport

        assert self.pool is not None and self.scheduler is not None, "engine not started"
        return DisaggSupport(self.pool, self.scheduler, self._new_sequence, self._streams, self._wake.set)

    def _emit(self, event: KvEventData) -> None:
        if self._kv_events is not None:
            self._kv_events(event)


def _recompute_from(batch: ScheduledBatch, failed: set[int], block_size_tokens: int) -> None:
    """Rewind each request in `batch` to its first block whose onboard failed, and compute
    from there in this step instead."""
    for i, seq in enumerate(batch.seqs):
        for j in range(seq.num_committed_blocks, len(seq.block_table)):
            if seq.block_table[j].block_id in failed:
                redo = seq.num_computed_tokens - j * block_size_tokens
                if redo > 0:
                    seq.num_computed_tokens -= redo
                    batch.num_new_tokens[i] += redo
                    batch.num_tokens += redo
                if seq.num_generated == 0 and seq.cached_tokens is not None:
                    seq.cached_tokens = min(seq.cached_tokens, j * block_size_tokens)
                break


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return device


def _sampling_params(request: PreprocessedRequest) -> SamplingParams:
    s = request.sampling
    temperature = 0.0 if s.temperature is None else s.temperature
    top_p = 1.0 if s.top_p is None else s.top_p
    top_k = 0 if s.top_k is None or s.top_k < 0 else s.top_k  # -1 is vLLM's "off"
    if temperature < 0:
        raise errors.InvalidRequest(f"temperature must be >= 0, got {temperature}", param="temperature")
    if not 0 < top_p <= 1:
        raise errors.InvalidRequest(f"top_p must be in (0, 1], got {top_p}", param="top_p")
    return SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, logprobs=s.logprobs)
