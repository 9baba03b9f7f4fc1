"""The built-in engine's step executor: real Llama-family models over a paged KV cache on one
device. Every torch call of the engine (loading, each step's forward pass and sampling, KVBM
copies, KV transfer copies) runs on one dedicated model thread; a step's inputs are built on the
event loop's thread beforehand, so that thread never reads scheduler state an abort may change."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from dynamo import errors
from dynamo.wire import KvLayoutSpec, PreprocessedRequest
from kvbm.block_pool import KvEventSink
from kvbm.layout import KvLayout
from kvbm.manager import KvBlockManager
from kvbm.transfer.layout import KvMemory
from workers.builtin.args import BuiltinConfig
from workers.builtin.config import ModelConfig, load_model_config
from workers.builtin.embedding import pool_batch
from workers.builtin.kv_cache import KVCache, kv_bytes_per_block, num_blocks_for_bytes
from workers.builtin.loader import load_model, resolve_dtype
from workers.builtin.runner import ModelRunner, build_step_input
from workers.builtin.sampling import SampleRow, SamplingParams
from workers.paged.embedding import PoolingBatch
from workers.paged.executor import ExecutorInfo, StepResult
from workers.paged.scheduler import ScheduledBatch
from workers.paged.sequence import Sequence

log = logging.getLogger(__name__)

GiB = 1 << 30
CPU_DEFAULT_KV_BYTES = GiB // 4  # 64k tokens of the default model: plenty for CPU serving


class TorchExecutor:
    """A StepExecutor on a torch device. A request's `exec_state` is its SampleRow: validated
    sampling parameters and, unless greedy, its seeded torch.Generator."""

    speedup_ratio = 1.0

    def __init__(self, config: BuiltinConfig, on_event: KvEventSink | None = None) -> None:
        self.config = config
        self.device = _resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        # Read now, so a bad model directory fails at construction with a clear message.
        self.model_config: ModelConfig = load_model_config(config.model)
        self.runner: ModelRunner | None = None
        self.kvbm: KvBlockManager | None = None  # host/disk tiers, when config.kvbm is enabled
        self.max_model_len = 0
        self._max_len = 0
        self._on_event = on_event
        self._thread: ThreadPoolExecutor | None = None
        self._seeds = random.Random(config.seed)

    # ---------------------------------------------------------------------------- lifecycle

    async def start(self, wake: Callable[[], None]) -> ExecutorInfo:
        if self._thread is not None:
            raise RuntimeError("builtin executor already started")
        # One thread owns every torch call of this engine, loading included.
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="builtin-model")
        loop = asyncio.get_running_loop()
        try:
            self.runner = await loop.run_in_executor(self._thread, self._build_runner)
            if self.config.kvbm.enabled:
                # Built on the model thread: the host tier is one large (pinned) allocation.
                self.kvbm = await loop.run_in_executor(self._thread, self._build_kvbm)
                if self.kvbm.reader is not None:
                    self.kvbm.reader.notify = wake  # disk reads end on reader threads
                await self.kvbm.start()
        except BaseException:
            await self.stop()
            raise
        kv = self.runner.kv
        log.info(
            "builtin engine: %s (%s) on %s %s, %d KV blocks of %d tokens, max_model_len %d",
            self.model_config.model_dir, self.model_config.architecture, self.device, self.dtype,
            kv.num_blocks, kv.block_size_tokens, self.max_model_len,
        )
        return ExecutorInfo(kv.num_blocks, kv.block_size_tokens, self.max_model_len, self.model_config.eos_token_ids)

    async def stop(self) -> None:
        thread, self._thread = self._thread, None
        if thread is None:
            return
        # A step may still be computing on the model thread; let it finish before the cache it
        # writes goes away.
        await asyncio.to_thread(thread.shutdown, True)
        if self.kvbm is not None:
            await self.kvbm.stop()

    # ------------------------------------------------------------------------------ requests

    def new_request_state(self, request: PreprocessedRequest) -> SampleRow:
        prompt = request.token_ids
        vocab_size = self.model_config.vocab_size
        if min(prompt) < 0 or max(prompt) >= vocab_size:
            raise errors.InvalidRequest(f"prompt has token ids outside [0, {vocab_size})", param="prompt")
        params = _sampling_params(request)
        generator = None
        if not params.greedy:
            seed = request.sampling.seed
            if seed is None:
                seed = self._seeds.getrandbits(63)
            generator = torch.Generator(device=self.device).manual_seed(seed)
        return SampleRow(params, generator)

    def imported(self, seq: Sequence) -> None:
        # The prefill worker's draw is not replayed here: a seeded request that samples gets
        # other later tokens than when served aggregated (greedy ones get the same).
        pass

    # ------------------------------------------------------------------------------- steps

    async def run(self, batch: ScheduledBatch) -> StepResult:
        kvbm, loop = self.kvbm, asyncio.get_running_loop()
        if kvbm is not None and kvbm.has_pending():
            await self._run_kvbm_plan(batch)
        step = build_step_input(batch)
        assert self.runner is not None
        result = await loop.run_in_executor(self._thread, self.runner.execute, step)
        return StepResult(result.token_ids, result.logprobs)

    async def wait_for_reads(self) -> None:
        kvbm = self.kvbm
        if kvbm is not None and kvbm.has_pending():
            await self._run_kvbm_plan(None)  # it may start reads deferred behind its writes
        # The reads end on reader threads, which call `wake`.

    async def _run_kvbm_plan(self, batch: ScheduledBatch | None) -> None:
        """Copy evicted blocks down and onboarded blocks up, on the model thread, before the
        step's forward pass reuses or reads them. An onboard that failed is recomputed."""
        kvbm = self.kvbm
        assert kvbm is not None and self._thread is not None
        plan = kvbm.take_plan()
        loop = asyncio.get_running_loop()
        failed = await loop.run_in_executor(self._thread, kvbm.execute, plan)
        kvbm.finish(plan, failed)
        if failed and batch is not None:
            batch.recompute_from(set(failed), kvbm.layout.block_size_tokens)

    # ---------------------------------------------------------------------------- embeddings

    @property
    def embedding_dim(self) -> int:
        return self.model_config.hidden_size

    async def pool(self, batch: PoolingBatch) -> np.ndarray:
        """An embedding pass (workers/paged/embedding.py), on the model thread like a step."""
        assert self.runner is not None, "engine not started"
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._thread, pool_batch, self.runner, batch)

    # ----------------------------------------------------------------------------- KV memory

    def kv_layout(self) -> KvLayoutSpec:
        mc = self.model_config
        return KvLayoutSpec(
            mc.num_layers, self.config.block_size_tokens, mc.num_kv_heads, mc.head_dim,
            str(self.dtype).removeprefix("torch."),
        )

    def kv_memory(self) -> KvMemory:
        """The KV tensors for a transfer agent; its copies run on the model thread."""
        assert self.runner is not None and self._thread is not None, "engine not started"
        thread, loop = self._thread, asyncio.get_running_loop()
        return KvMemory(self.runner.kv.k, self.runner.kv.v, self.kv_layout(),
                        lambda fn: loop.run_in_executor(thread, fn))

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
        # Requests never outgrow the pool (PagedEngine caps them there): CUDA graphs' block
        # tables need no more.
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

    def _build_kvbm(self) -> KvBlockManager:
        assert self.runner is not None
        mc, kv = self.model_config, self.runner.kv
        layout = KvLayout(mc.num_layers, kv.block_size_tokens, mc.num_kv_heads, mc.head_dim,
                          str(self.dtype).removeprefix("torch."))
        return KvBlockManager(self.config.kvbm, layout, kv.k, kv.v, on_event=self._on_event)


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
