"""The mocker's step executor: a step lasts what the timing model says for its batch (plus the
simulated KVBM onboards before it), slept in wall time divided by the speedup ratio, and each
request's next token comes from its own seeded stream, as the request's sampling options and
output constraint shape it (sampling.py: a synthetic model distribution; constraints through
workers/structured's GrammarTokenChooser, so the output is valid). No tensors, no model."""

from __future__ import annotations

import asyncio
import logging
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dynamo import errors
from dynamo.kv_hash import block_hash
from dynamo.wire import KvLayoutSpec, PreprocessedRequest, PromptTokenLogprob
from kvbm.block_pool import KvEventSink
from kvbm.simulated import SimulatedKvbm
from workers.mocker.args import MockerConfig
from workers.mocker.sampling import MockSampling, PenaltyState, SyntheticVocab, choose
from workers.mocker.timing import TimingModel, attn_pairs
from workers.paged.executor import ExecutorInfo, StepResult, TopLogprobs
from workers.paged.scheduler import ScheduledBatch
from workers.paged.sequence import Sequence
from workers.structured import GrammarCompiler, GrammarMatcher, GrammarTokenChooser

log = logging.getLogger(__name__)

# Past this speedup a step would sleep for microseconds; asyncio.sleep's own cost would then
# dominate, so the loop only yields and benchmarks measure the frontend, not the timer.
NO_SLEEP_SPEEDUP = 1e6


@dataclass(slots=True, eq=False)
class MockRequest:
    """A request's state in the mocker (its Sequence's `exec_state`)."""

    rng: random.Random  # its token stream: one draw per step
    sampling: MockSampling
    penalties: PenaltyState | None = None
    matcher: GrammarMatcher | None = None
    chooser: GrammarTokenChooser | None = None


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
            self.kvbm = SimulatedKvbm(config.kvbm, block_bytes, on_event, clock=self._clock,
                                      block_size_tokens=config.block_size_tokens)
        self._sleeps = timing.speedup_ratio < NO_SLEEP_SPEEDUP
        self._deadline = 0.0
        self.vocab = SyntheticVocab(config.vocab_size, config.exclude_token_ids)
        self._grammar: GrammarCompiler | None = None
        self._no_grammar = "the mocker runs without --model (a model directory with tokenizer.json)"

    @property
    def engine_time_s(self) -> float:
        """The clock in sped-up seconds: what the engine's work takes in wall time."""
        return self.sim_time_s / self.speedup_ratio

    async def start(self, wake: Callable[[], None]) -> ExecutorInfo:
        self._deadline = asyncio.get_running_loop().time()
        if self.config.model_dir is not None:
            await asyncio.to_thread(self._load_grammar, Path(self.config.model_dir))
        config = self.config
        return ExecutorInfo(config.num_gpu_blocks, config.block_size_tokens, config.max_model_len)

    async def stop(self) -> None:
        pass

    def new_request_state(self, request: PreprocessedRequest) -> MockRequest:
        """The request's token stream: the same prompt and seed give the same tokens. A migrated
        request's stream is its original prompt's, past the draws of the tokens generated
        before: it goes on as if it had not moved."""
        prompt = request.token_ids
        before = request.generated_before
        seed = request.sampling.seed
        if seed is None:
            seed = block_hash(None, prompt[: len(prompt) - before])
        seed = hash((self.config.seed, seed))
        state = MockRequest(random.Random(seed), MockSampling.from_request(request, self.config.vocab_size))
        for _ in range(before):
            self.vocab.draw(state.rng)
        if request.prompt_logprobs is not None and request.prompt_logprobs < 0:
            raise errors.InvalidRequest("prompt_logprobs must be >= 0", param="prompt_logprobs")
        if state.sampling.penalized:
            state.penalties = PenaltyState(frozenset(prompt[: len(prompt) - before]),
                                           Counter(prompt[len(prompt) - before :]))
        if request.constraint is not None:
            if self._grammar is None:
                raise errors.InvalidRequest(f"response_format: no structured outputs here: {self._no_grammar}",
                                            param="response_format")
            compiled = self._grammar.compile(request.constraint)
            state.matcher = compiled.matcher()
            state.chooser = GrammarTokenChooser(compiled, seed=seed)
            # A migrated request continues its grammar where the other worker left it.
            if before and not state.matcher.accept_many(prompt[len(prompt) - before :]):
                raise errors.InvalidRequest(
                    f"response_format: the {before} tokens generated before the migration do not "
                    "follow the output constraint", param="response_format",
                )
        return state

    def imported(self, seq: Sequence, token_id: int) -> None:
        # The prefill worker drew the first token from the same seeded stream: skip it, so
        # disaggregated output equals aggregated output.
        state: MockRequest = seq.exec_state
        self.vocab.draw(state.rng)
        self._took(state, token_id)

    def release(self, seq: Sequence) -> None:
        pass  # nothing outlives the request's state

    async def run(self, batch: ScheduledBatch) -> StepResult:
        model_s = batch_model_time_s(self.timing, batch)
        rows = [seq for seq, samples in zip(batch.seqs, batch.samples) if samples]
        model_s += self.timing.grammar_time_s(sum(1 for s in rows if s.exec_state.matcher is not None), model_s)
        if self.kvbm is not None:
            model_s += self.kvbm.step_cost_s()  # onboarding precedes the forward pass
        self.sim_time_s += model_s
        await self._sleep(model_s)
        token_ids: list[int] = []
        logprobs: list[float] = []
        tops: list[TopLogprobs | None] = []
        prompt: list[list[PromptTokenLogprob | None] | None] = []
        for seq in rows:
            token, logprob, top = self._sample(seq)
            token_ids.append(token)
            logprobs.append(logprob)
            tops.append(top)
            k = seq.prompt_logprobs
            prompt.append(self.vocab.prompt_logprobs(seq.token_ids, k) if k is not None and seq.needs_prompt_logits else None)
        return StepResult(
            token_ids,
            logprobs if any(s.exec_state.sampling.wants_logprobs for s in rows) else None,
            tops if any(t is not None for t in tops) else None,
            prompt if any(p is not None for p in prompt) else None,
        )

    async def wait_for_reads(self) -> None:
        """Jump the clock to the end of the next disk read (sleeping that long, sped up)."""
        kvbm = self.kvbm
        assert kvbm is not None and kvbm.reader is not None
        cost_s = kvbm.step_cost_s()  # the pending plan runs now rather than with the next step
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

    def _sample(self, seq: Sequence) -> tuple[int, float, TopLogprobs | None]:
        """The row's token, its logprob (0.0 unless asked) and top logprobs (None unless asked)."""
        state: MockRequest = seq.exec_state
        vocab, sampling = self.vocab, state.sampling
        first = vocab.draw(state.rng)  # one draw a step, whatever picks the token
        banned = seq.banned_token_ids()
        candidates = None
        if state.matcher is not None:
            assert state.chooser is not None
            matcher = state.matcher
            # Terminated (its stop token was not a stop for this request): only stops follow.
            token = matcher.vocab.stop_token_ids[0] if matcher.is_terminated() else state.chooser.next_token(matcher)
        elif sampling.modifies or first in banned:
            candidates = vocab.candidates(first, len(seq.token_ids))
            token = choose(vocab, sampling, candidates, state.rng, banned, state.penalties)
        else:
            token = first
        self._took(state, token)
        if not sampling.wants_logprobs:
            return token, 0.0, None
        if candidates is None:
            candidates = vocab.candidates(first, len(seq.token_ids))
        logprob = vocab.logit(token, candidates) - vocab.log_total
        top = vocab.top(candidates, sampling.top_logprobs) if sampling.top_logprobs else None
        return token, logprob, top

    def _took(self, state: MockRequest, token: int) -> None:
        if state.matcher is not None and not state.matcher.is_terminated():
            state.matcher.accept(token)
        if state.penalties is not None:
            state.penalties.output[token] += 1

    def _load_grammar(self, model_dir: Path) -> None:
        if not (model_dir / "tokenizer.json").is_file():
            self._no_grammar = f"the model directory {str(model_dir)!r} has no tokenizer.json"
            return
        try:
            self._grammar = GrammarCompiler.from_model_dir(model_dir, self.config.vocab_size)
        except errors.DynamoError as exc:
            self._no_grammar = f"the model's tokenizer cannot drive a grammar: {exc.message}"
            log.warning("mocker: structured outputs off: %s", self._no_grammar)

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
