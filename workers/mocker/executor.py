"""The mocker's step executor: a step lasts what the timing model says for its batch (plus the
simulated KVBM onboards before it), slept in wall time divided by the speedup ratio, and each
request's next token comes from its own seeded stream. No tensors, no model."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable

from dynamo.kv_hash import block_hash
from dynamo.wire import KvLayoutSpec, PreprocessedRequest
from kvbm.block_pool import KvEventSink
from kvbm.simulated import SimulatedKvbm
from workers.mocker.args import MockerConfig
from workers.mocker.timing import TimingModel, attn_pairs
from workers.paged.executor import ExecutorInfo, StepResult
from workers.paged.scheduler import ScheduledBatch
from workers.paged.sequence import Sequence

# Past this speedup a step would sleep for microseconds; asyncio.sleep's own cost would then
# dominate, so the loop only yields and benchmarks measure the frontend, not the timer.
NO_SLEEP_SPEEDUP = 1e6


class TimingExecutor:
    """A StepExecutor over simulated time. `sim_time_s` is the engine's clock in modelled
    seconds (before the speedup ratio): every step's duration, and the waits for simulated
    disk reads when nothing else can run; the simulated KVBM reads it to time those reads."""

    def __init__(self, config: MockerConfig, timing: TimingModel, on_event: KvEventSink | None = None) -> None:
        self.config = config
        self.timing = timing
        self.speedup_ratio = timing.speedup_ratio
        self.sim_time_s = 0.0
        self.kvbm: SimulatedKvbm | None = None
        if config.kvbm.enabled:
            block_bytes = timing.kv_bytes_per_token * config.block_size_tokens
            self.kvbm = SimulatedKvbm(config.kvbm, block_bytes, on_event, clock=self._clock)
        self._sleeps = timing.speedup_ratio < NO_SLEEP_SPEEDUP
        self._deadline = 0.0

    @property
    def engine_time_s(self) -> float:
        """The clock in sped-up seconds: what the engine's work takes in wall time."""
        return self.sim_time_s / self.speedup_ratio

    async def start(self, wake: Callable[[], None]) -> ExecutorInfo:
        self._deadline = asyncio.get_running_loop().time()
        config = self.config
        return ExecutorInfo(config.num_gpu_blocks, config.block_size_tokens, config.max_model_len)

    async def stop(self) -> None:
        pass

    def new_request_state(self, request: PreprocessedRequest) -> random.Random:
        """The request's token stream: the same prompt and seed give the same tokens."""
        seed = request.sampling.seed
        if seed is None:
            seed = block_hash(None, request.token_ids)
        return random.Random(hash((self.config.seed, seed)))

    def imported(self, seq: Sequence) -> None:
        # The prefill worker drew the first token from the same seeded stream: skip it, so
        # disaggregated output equals aggregated output.
        self._sample(seq.exec_state)

    async def run(self, batch: ScheduledBatch) -> StepResult:
        model_s = batch_model_time_s(self.timing, batch)
        if self.kvbm is not None:
            model_s += self.kvbm.step_cost_s()  # onboarding precedes the forward pass
        self.sim_time_s += model_s
        await self._sleep(model_s)
        sample = self._sample
        return StepResult([sample(seq.exec_state) for seq, samples in zip(batch.seqs, batch.samples) if samples])

    async def wait_for_reads(self) -> None:
        """Jump the clock to the end of the next disk read (sleeping that long, sped up)."""
        kvbm = self.kvbm
        assert kvbm is not None and kvbm.reader is not None
        cost_s = kvbm.step_cost_s()  # the pending plan may start reads deferred behind its writes
        end_s = kvbm.reader.next_end_s()
        if end_s is None:
            raise RuntimeError("every request waits for a disk read, but none is in progress")
        before = self.sim_time_s
        self.sim_time_s = max(before + cost_s, end_s)
        await self._sleep(self.sim_time_s - before)

    def kv_layout(self) -> KvLayoutSpec:
        """The simulated model's KV shape (8 KV heads, bf16), sized from the timing model so
        that simulated transfers move its kv_bytes_per_token."""
        t = self.timing
        head_dim = max(1, t.kv_bytes_per_token // (t.num_layers * 2 * 8 * 2))
        return KvLayoutSpec(t.num_layers, self.config.block_size_tokens, 8, head_dim, "bfloat16")

    def kv_memory(self) -> None:
        return None  # nothing to move: transfers are simulated from bytes and link bandwidth

    # ------------------------------------------------------------------------------ helpers

    def _clock(self) -> float:
        return self.sim_time_s

    def _sample(self, rng: random.Random) -> int:
        vocab_size, exclude = self.config.vocab_size, self.config.exclude_token_ids
        while True:
            token = rng.randrange(vocab_size)
            if token not in exclude:
                return token

    async def _sleep(self, model_s: float) -> None:
        if not self._sleeps:
            await asyncio.sleep(0)
            return
        # Sleep to a deadline, not for a duration, so time spent scheduling and in other tasks
        # is absorbed instead of accumulating as drift.
        loop = asyncio.get_running_loop()
        self._deadline = max(self._deadline, loop.time()) + model_s / self.speedup_ratio
        await asyncio.sleep(self._deadline - loop.time())


def batch_model_time_s(timing: TimingModel, batch: ScheduledBatch) -> float:
    """The forward pass over `batch` on the modelled hardware (before the speedup ratio)."""
    kv_tokens = pairs = 0
    for seq, num_new in zip(batch.seqs, batch.num_new_tokens):
        computed = seq.num_computed_tokens
        kv_tokens += computed + num_new
        pairs += attn_pairs(computed, num_new)
    return timing.model_time_s(batch.num_tokens, kv_tokens, pairs)
