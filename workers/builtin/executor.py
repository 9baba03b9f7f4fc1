"""The built-in engine's step executor: real Llama-family models over a paged KV cache on one
device. Every torch call of the engine (loading, each step's forward pass and sampling, KVBM
copies, KV transfer copies) runs on one dedicated model thread; a step's inputs are built on the
event loop's thread beforehand, so that thread never reads scheduler state an abort may change."""

from __future__ import annotations

import asyncio
import functools
import logging
import random
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from dynamo import errors
from dynamo.wire import KvLayoutSpec, PreprocessedRequest
from kvbm.block_pool import KvEventSink
from kvbm.manager import KvBlockManager
from kvbm.tiered import TransferPlan
from kvbm.transfer.layout import KvMemory
from workers.builtin.args import BuiltinConfig
from workers.builtin.config import ModelConfig, load_model_config
from workers.builtin.embedding import pool_batch
from workers.builtin.kv_cache import KVCache, kv_bytes_per_block, num_blocks_for_bytes
from workers.builtin.loader import load_model, random_model, resolve_dtype
from workers.builtin.penalties import SlotPool
from workers.builtin.runner import ModelRunner, RequestState, RunnerLaunch, StepInput, build_step_input
from workers.builtin.sampling import sampling_params
from workers.paged.embedding import PoolingBatch
from workers.paged.executor import ExecutorInfo, StepResult
from workers.paged.scheduler import ScheduledBatch
from workers.paged.sequence import Sequence
from workers.structured import GrammarCompiler, GrammarMatcher

log = logging.getLogger(__name__)

GiB = 1 << 30
CPU_DEFAULT_KV_BYTES = GiB // 4  # 64k tokens of the default model: plenty for CPU serving


class TorchExecutor:
    """A StepExecutor on a torch device. A request's `exec_state` is its RequestState (runner.py):
    validated sampling parameters, its seeded draws unless greedy, its grammar matcher, its
    penalty counts' row and its prompt logprobs as the prefill computes them."""

    speedup_ratio = 1.0
    overlap = False  # the overlap loop (OverlapExecutor); set from the config at construction

    def __init__(self, config: BuiltinConfig, on_event: KvEventSink | None = None) -> None:
        self.config = config
        self.device = _resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        # Measured on an H100 (benchmarks/RESULTS.md, issue 21): the host's step work hides
        # under the forward pass. On a CPU both compete for the same cores: off by default.
        self.overlap = config.overlap_schedule if config.overlap_schedule is not None else self.device.type == "cuda"
        # Read now, so a bad model directory fails at construction with a clear message.
        self.model_config: ModelConfig = load_model_config(config.model)
        self.runner: ModelRunner | None = None
        self.kvbm: KvBlockManager | None = None  # host/disk tiers, when config.kvbm is enabled
        self.max_model_len = 0
        self._max_len = 0
        self._on_event = on_event
        self._thread: ThreadPoolExecutor | None = None
        self._seeds = random.Random(config.seed)
        self._penalty_slots = SlotPool()
        # Output constraints need the model's tokenizer; why not, when it cannot be loaded.
        self._grammar: GrammarCompiler | None = None
        self._no_grammar = "the engine is not started"

    # ---------------------------------------------------------------------------- lifecycle

    async def start(self, wake: Callable[[], None]) -> ExecutorInfo:
        if self._thread is not None:
            raise RuntimeError("builtin executor already started")
        # One thread owns every torch call of this engine, loading included.
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="builtin-model")
        loop = asyncio.get_running_loop()
        try:
            self.runner = await loop.run_in_executor(self._thread, self._build_runner)
            await asyncio.to_thread(self._load_grammar)
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
        if self.runner is not None:
            await asyncio.to_thread(self.runner.sampler.close)
        if self.kvbm is not None:
            await self.kvbm.stop()

    # ------------------------------------------------------------------------------ requests

    def new_request_state(self, request: PreprocessedRequest) -> RequestState:
        prompt = request.token_ids
        vocab_size = self.model_config.vocab_size
        if min(prompt) < 0 or max(prompt) >= vocab_size:
            raise errors.InvalidRequest(f"prompt has token ids outside [0, {vocab_size})", param="prompt")
        params = sampling_params(request, vocab_size)
        rng = None
        if not params.greedy:
            seed = request.sampling.seed
            if seed is None:
                seed = self._seeds.getrandbits(63)
            rng = random.Random(seed)
        state = RequestState(params, rng)
        if request.constraint is not None:
            state.matcher = self._matcher(request)
        if request.prompt_logprobs is not None:
            state.prompt_logprobs = request.prompt_logprobs
            state.prompt_entries = [None] * len(prompt)
        if params.penalized:  # last: nothing after it may fail and leak the row
            state.penalty_slot = self._penalty_slots.take()
        return state

    def imported(self, seq: Sequence, token_id: int) -> None:
        # The prefill worker's draw is not replayed here: a seeded request that samples gets
        # other later tokens than when served aggregated (greedy ones get the same). Penalty
        # counts start from the sequence's tokens, this one included, when it first samples.
        state: RequestState = seq.exec_state
        if state.matcher is not None and not state.matcher.accept(token_id):
            raise errors.InvalidRequest(
                f"the first token {token_id}, sampled by the prefill worker, does not follow the "
                "output constraint", param="response_format",
            )

    def release(self, seq: Sequence) -> None:
        state: RequestState = seq.exec_state
        if state.penalty_slot >= 0:
            self._penalty_slots.give(state.penalty_slot)
            state.penalty_slot = -1
        state.prompt_entries = None

    def _matcher(self, request: PreprocessedRequest) -> GrammarMatcher:
        """A fresh matcher for the request's constraint, past the tokens generated before a
        migration, so the output continues its grammar exactly."""
        assert request.constraint is not None
        if self._grammar is None:
            raise errors.InvalidRequest(f"response_format: no structured outputs here: {self._no_grammar}",
                                        param="response_format")
        matcher = self._grammar.compile(request.constraint).matcher()
        if request.generated_before and not matcher.accept_many(request.token_ids[-request.generated_before :]):
            raise errors.InvalidRequest(
                f"response_format: the {request.generated_before} tokens generated before the migration "
                "do not follow the output constraint", param="response_format",
            )
        return matcher

    # ------------------------------------------------------------------------------- steps

    async def run(self, batch: ScheduledBatch) -> StepResult:
        return await (await self.launch(batch)).result()

    def needs_previous(self, batch: ScheduledBatch) -> bool:
        # A grammar's mask needs its matcher past the previous token, which the host reads.
        return any(samples and seq.exec_state.matcher is not None for seq, samples in zip(batch.seqs, batch.samples))

    async def launch(self, batch: ScheduledBatch) -> TorchLaunch:
        """Queue the step on the model thread without waiting for it: the thread runs steps'
        launches and collects in the order they are asked for."""
        kvbm, loop = self.kvbm, asyncio.get_running_loop()
        plan_ran: asyncio.Future[list[int]] | None = None
        if kvbm is not None and kvbm.has_pending():
            plan = kvbm.take_plan()
            if plan.onboards:
                await self._run_kvbm_plan(batch, plan)  # an onboard that fails changes what the step computes
            else:
                # Offloads and writes fail no block the step reads, and the model thread runs
                # them before the step's launch (it keeps order): queued, not waited for, which
                # spares the step a round trip to that thread (a request admitted to an idle
                # engine waited for it).
                plan_ran = loop.run_in_executor(self._thread, kvbm.execute, plan)
                plan_ran.add_done_callback(functools.partial(_plan_ran, kvbm, plan))
        step = build_step_input(batch)
        assert self.runner is not None
        return TorchLaunch(self, batch, step, loop.run_in_executor(self._thread, self.runner.launch, step), plan_ran)

    async def _collect(self, batch: ScheduledBatch, step: StepInput, launched: RunnerLaunch) -> StepResult:
        loop = asyncio.get_running_loop()
        assert self.runner is not None
        result = await loop.run_in_executor(self._thread, self.runner.collect, launched)
        prompt_logprobs = None
        if step.prompt_logits:
            for work, entries in zip(step.prompt_logits, result.prompt_logprobs):
                gathered = work.state.prompt_entries
                if gathered is not None:  # None: released (aborted) while the step ran
                    gathered[work.first_target : work.first_target + len(entries)] = entries
        rows = [seq for seq, samples in zip(batch.seqs, batch.samples) if samples]
        if any(seq.needs_prompt_logits for seq in rows):
            # With the first token: the prompt's entries, gathered over its prefill chunks.
            prompt_logprobs = [seq.exec_state.prompt_entries if seq.needs_prompt_logits else None for seq in rows]
        return StepResult(result.token_ids, result.logprobs, result.top_logprobs, prompt_logprobs)

    async def wait_for_reads(self) -> None:
        kvbm = self.kvbm
        if kvbm is not None and kvbm.has_pending():
            await self._run_kvbm_plan(None)  # offloads staged on the device are flushed by a plan
        # The reads end on reader threads, which call `wake`.

    async def _run_kvbm_plan(self, batch: ScheduledBatch | None, plan: TransferPlan | None = None) -> None:
        """Copy evicted blocks down and onboarded blocks up, on the model thread, before the
        step's forward pass reuses or reads them. An onboard that failed is recomputed."""
        kvbm = self.kvbm
        assert kvbm is not None and self._thread is not None
        if plan is None:
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
        load = random_model if config.load_format == "dummy" else load_model
        model = load(mc, self.dtype, self.device)
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
            prefill_graph_tokens=self._prefill_graph_tokens(),
        )

    def _prefill_graph_tokens(self) -> int:
        """The token budget prefill CUDA graphs are captured for; 0: none (ModelRunner)."""
        config = self.config
        on = config.prefill_cuda_graphs and not config.enforce_eager and self.device.type == "cuda"
        return config.max_num_batched_tokens if on else 0

    def _load_grammar(self) -> None:
        """The model's vocabulary for output constraints (structured outputs, forced tool
        calls), from its tokenizer files; without them constrained requests are refused."""
        mc = self.model_config
        if not (mc.model_dir / "tokenizer.json").is_file():
            self._no_grammar = f"the model directory {str(mc.model_dir)!r} has no tokenizer.json"
            return
        try:
            self._grammar = GrammarCompiler.from_model_dir(mc.model_dir, mc.vocab_size, list(mc.eos_token_ids) or None)
        except errors.DynamoError as exc:
            self._no_grammar = f"the model's tokenizer cannot drive a grammar: {exc.message}"
            log.warning("builtin engine: structured outputs off: %s", self._no_grammar)

    def _num_blocks_from_memory(self, model: torch.nn.Module) -> int:
        config, mc = self.config, self.model_config
        if config.kv_cache_memory_gb is not None:
            kv_bytes = int(config.kv_cache_memory_gb * 1e9)
        elif self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            elem = torch.empty((), dtype=self.dtype).element_size()
            # Room for one step's activations: MLP and logits of a full token budget; prefill
            # graphs hold a second such room in their own memory pool.
            activations = config.max_num_batched_tokens * (2 * mc.intermediate_size + 4 * mc.hidden_size) * elem
            reserve = GiB + activations * (2 if self._prefill_graph_tokens() else 1)
            reserve += config.max_num_seqs * mc.vocab_size * 4 * 2
            # This engine's share of the GPU, less its own weights: what another engine on the
            # same GPU holds counts against what is free, not against this share.
            weights = sum(p.numel() * p.element_size() for p in model.parameters())
            kv_bytes = min(int(total * config.gpu_memory_utilization) - weights, free) - reserve
        else:
            kv_bytes = CPU_DEFAULT_KV_BYTES
        # No use in more blocks than max_num_seqs full-length sequences can hold.
        cap = config.max_num_seqs * -(-self.max_model_len // config.block_size_tokens)
        return min(num_blocks_for_bytes(mc, config.block_size_tokens, self.dtype, kv_bytes), cap)

    def _build_kvbm(self) -> KvBlockManager:
        assert self.runner is not None
        mc, kv = self.model_config, self.runner.kv
        layout = KvLayoutSpec(mc.num_layers, kv.block_size_tokens, mc.num_kv_heads, mc.head_dim,
                          str(self.dtype).removeprefix("torch."))
        return KvBlockManager(self.config.kvbm, layout, kv.k, kv.v, on_event=self._on_event)


class TorchLaunch:
    """A step on the model thread's queue (TorchExecutor.launch)."""

    def __init__(
        self, executor: TorchExecutor, batch: ScheduledBatch, step: StepInput, launched: asyncio.Future[RunnerLaunch],
        plan_ran: asyncio.Future[list[int]] | None = None,
    ) -> None:
        self._executor, self._batch, self._step, self._launched = executor, batch, step, launched
        self._plan_ran = plan_ran  # a KVBM plan queued ahead of the launch: its failure fails the step

    async def result(self) -> StepResult:
        if self._plan_ran is not None:
            await self._plan_ran
        return await self._executor._collect(self._batch, self._step, await self._launched)


def _plan_ran(kvbm: KvBlockManager, plan: TransferPlan, ran: asyncio.Future[list[int]]) -> None:
    """On the event loop, once a plan queued ahead of a step has run: unpin what it read."""
    if not ran.cancelled() and ran.exception() is None:
        kvbm.finish(plan, ran.result())


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return device
