"""The model runner: turns a scheduled step into tensors, runs the forward pass over the paged
KV cache and samples. `StepInput` is plain data built on the event loop's thread, so the runner
(on its own thread) never reads scheduler state that an abort may be changing. On CUDA, decode
steps replay CUDA graphs (unless enforce_eager) and step inputs travel through pinned memory, so
the only host sync of a step is sampling's one read of the chosen ids.

Prompt logprobs: the LM head runs over every prompt position only for the requests that ask,
in chunks of PROMPT_LOGITS_CHUNK positions so that a long prompt never holds [T, vocab] logits."""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from dynamo.wire import PromptTokenLogprob
from workers.builtin.attention import AttentionBackend, SeqSlice
from workers.builtin.cuda_graphs import MAX_GRAPH_BATCH, DecodeGraphs, capture_sizes
from workers.builtin.device_copy import to_device
from workers.builtin.kv_cache import KVCache
from workers.builtin.model import LlamaForCausalLM
from workers.builtin.prefill_graphs import PrefillGraphs
from workers.builtin.sampling import PenaltyInit, SampleLaunch, SampleResult, SampleRow, Sampler, SamplingParams

if TYPE_CHECKING:
    from workers.paged.scheduler import ScheduledBatch
    from workers.structured import GrammarMatcher

log = logging.getLogger(__name__)

PROMPT_LOGITS_CHUNK = 256


@dataclass(slots=True, eq=False)
class RequestState:
    """The torch executor's per-request state (a Sequence's `exec_state`). Event loop thread,
    but for `matcher`, which only the step in flight touches."""

    params: SamplingParams
    rng: random.Random | None  # None for greedy requests
    matcher: GrammarMatcher | None = None
    penalty_slot: int = -1  # its row of the sampler's PenaltyCounts, when penalised
    penalty_ready: bool = False  # that row holds its tokens (filled by its first sampling step)
    row: int = -1  # its sampling row in the last step that sampled it (placeholders read it)
    prompt_logprobs: int | None = None  # alternatives per prompt token, when asked
    # Gathered over the prefill chunks: entry j is prompt token j's (entry 0 stays None).
    prompt_entries: list[PromptTokenLogprob | None] | None = None


@dataclass(slots=True)
class PromptLogits:
    """One request's prompt positions in a step: the hidden states at flat indices
    [flat_start, flat_start + len(targets)) predict `targets`, prompt tokens first_target..."""

    flat_start: int
    first_target: int
    targets: list[int]
    top_k: int
    state: RequestState


@dataclass(slots=True)
class StepInput:
    """A negative input id -(r + 1) is a placeholder: the token the previous step sampled in its
    row r, read on the device (ModelRunner.feedback) because the host does not have it yet."""

    input_ids: list[int]
    positions: list[int]
    slices: list[SeqSlice]
    sample_indices: list[int]  # flat index of each sampling sequence's last token
    sample_rows: list[SampleRow]
    prompt_logits: list[PromptLogits] = field(default_factory=list)


def build_step_input(batch: ScheduledBatch) -> StepInput:
    """Each sampling request's row comes from its RequestState (its Sequence's `exec_state`),
    with its stop ids banned while it is short of min_tokens and, the first time a penalised
    request samples, the tokens its penalty counts start from. A decode whose input token is
    still being sampled by the step in flight gets a placeholder for it (StepInput)."""
    input_ids: list[int] = []
    positions: list[int] = []
    slices: list[SeqSlice] = []
    sample_indices: list[int] = []
    rows: list[SampleRow] = []
    prompt_logits: list[PromptLogits] = []
    for seq, num_new, samples, start in zip(batch.seqs, batch.num_new_tokens, batch.samples, batch.starts):
        flat_start = len(input_ids)
        state: RequestState = seq.exec_state
        known = seq.token_ids[start : start + num_new]
        input_ids.extend(known)
        pending = num_new - len(known)  # 1 when the step in flight samples the last input
        if pending:
            assert pending == 1 and state.row >= 0, "only the in-flight step's token is unknown"
            input_ids.append(-1 - state.row)
        positions.extend(range(start, start + num_new))
        # A copy: the scheduler grows and rewrites seq.block_ids while this step is in flight.
        slices.append(SeqSlice(start, num_new, seq.block_ids[:]))
        if state.prompt_logprobs is not None and seq.needs_prompt_logits:
            # Position p's logits predict prompt token p + 1.
            end = min(start + num_new, seq.num_prompt_tokens - 1)
            if end > start:
                targets = seq.token_ids[start + 1 : end + 1]
                prompt_logits.append(PromptLogits(flat_start, start + 1, targets, state.prompt_logprobs, state))
        if samples:
            sample_indices.append(len(input_ids) - 1)
            init = None
            if state.penalty_slot >= 0 and not state.penalty_ready:
                split = seq.num_prompt_tokens - seq.generated_before
                init = PenaltyInit(seq.token_ids[:split], seq.token_ids[split:])
                state.penalty_ready = True
            banned = seq.banned_token_ids()
            if pending and banned and seq.generated_before + seq.num_generated + 1 >= seq.min_tokens:
                banned = ()  # the token in flight reaches min_tokens
            # A request that finished while this step was being built (its stop token seen one
            # step late) keeps its row, but no grammar: its matcher has ended.
            matcher = state.matcher if not seq.finished else None
            state.row = len(rows)
            rows.append(SampleRow(state.params, state.rng, banned, matcher, state.penalty_slot, init))
    return StepInput(input_ids, positions, slices, sample_indices, rows, prompt_logits)


@dataclass(slots=True)
class RunnerLaunch:
    """A step queued on the device (ModelRunner.launch); `collect` completes it."""

    sample: SampleLaunch | None
    prompt_logprobs: list[list[PromptTokenLogprob]] = field(default_factory=list)


class ModelRunner:
    """Runs steps on one device. CUDA graphs are captured at construction when the model runs
    the Triton backend on CUDA and `enforce_eager` is off; `max_model_len` sizes their block
    tables. With `prefill_graph_tokens` (--prefill-cuda-graphs), steps with prefill chunks of up
    to that many tokens replay graphs too (in a memory pool of their own: activations for that
    many tokens, which the executor reserves a second time). `launch` queues a step and returns
    before its tokens are known; `collect` waits for them; `execute` is both. Each step's chosen
    ids also stay on the device in `feedback`, so the next step may be launched before they are
    read (placeholders, StepInput)."""

    def __init__(
        self, model: LlamaForCausalLM, kv: KVCache, device: torch.device, *,
        enforce_eager: bool = True, max_num_seqs: int = 256, max_model_len: int | None = None,
        prefill_graph_tokens: int = 0,
    ) -> None:
        self.model = model
        self.kv = kv
        self.device = device
        self.backend: AttentionBackend = model.model.layers[0].self_attn.backend  # type: ignore[union-attr,assignment]
        self.graphs: DecodeGraphs | None = None
        self.prefill_graphs: PrefillGraphs | None = None
        self.sampler = Sampler(model.config.vocab_size, device, max_batch=max_num_seqs)
        self.feedback = torch.zeros(max_num_seqs, dtype=torch.long, device=device)
        if not enforce_eager and device.type == "cuda" and model.fused:
            max_len = max_model_len or model.max_positions
            max_blocks = -(-max_len // kv.block_size_tokens)
            started = time.monotonic()
            self.graphs = DecodeGraphs(
                model, kv, device, capture_sizes(max_num_seqs), max_blocks, feedback=self.feedback
            )
            self.graphs.capture()
            log.info("captured %d decode CUDA graphs in %.1f s", len(self.graphs.sizes), time.monotonic() - started)
            if prefill_graph_tokens > 0:
                started = time.monotonic()
                self.prefill_graphs = PrefillGraphs(
                    model, kv, device, prefill_graph_tokens, min(max_num_seqs, MAX_GRAPH_BATCH), max_blocks,
                    feedback=self.feedback,
                )
                self.prefill_graphs.capture()
                log.info("captured %d prefill CUDA graphs in %.1f s", len(self.prefill_graphs.sizes),
                         time.monotonic() - started)

    def execute(self, step: StepInput) -> SampleResult:
        """The step's sampled tokens; with prompt logprobs, per entry of step.prompt_logits,
        in `prompt_logprobs`."""
        return self.collect(self.launch(step))

    def collect(self, launched: RunnerLaunch) -> SampleResult:
        """Wait for a launched step's tokens (not for steps launched after it)."""
        result = self.sampler.finish(launched.sample) if launched.sample is not None else SampleResult([], None)
        result.prompt_logprobs = launched.prompt_logprobs
        return result

    @torch.inference_mode()
    def launch(self, step: StepInput) -> RunnerLaunch:
        """Queue the step's forward pass and sampling; prompt logprobs (rare) are read here."""
        graphs = self.graphs
        if graphs is not None and not step.prompt_logits and all(s.num_new == 1 for s in step.slices):
            batch = graphs.bucket(len(step.slices))
            if batch is not None:
                logits = graphs.run(step.input_ids, step.slices, batch)
                if not step.sample_rows:
                    return RunnerLaunch(None)
                if len(step.sample_indices) != len(step.slices):
                    # A one-token prefill chunk that is not its prompt's last samples nothing.
                    logits = logits.index_select(0, to_device(step.sample_indices, torch.long, self.device))
                return RunnerLaunch(self.sampler.launch(logits, step.sample_rows, self.feedback))
        prefill = self.prefill_graphs
        if prefill is not None and not step.prompt_logits:
            tokens = prefill.fits(len(step.input_ids), len(step.slices))
            if tokens is not None:
                logits = prefill.run(step.input_ids, step.positions, step.slices, step.sample_indices, tokens)
                if not step.sample_rows:  # a prompt's chunk before its last: nothing sampled
                    return RunnerLaunch(None)
                return RunnerLaunch(self.sampler.launch(logits, step.sample_rows, self.feedback))
        device = self.device
        meta = self.backend.build_metadata(step.slices, self.kv.block_size_tokens, device)
        input_ids = to_device(step.input_ids, torch.long, device)
        feedback = self.feedback if min(step.input_ids) < 0 else None
        positions = to_device(step.positions, torch.long, device)
        hidden = self.model(input_ids, positions, self.kv, meta, feedback)
        launched = RunnerLaunch(None)
        if step.sample_rows:
            # Only the rows that yield a token need the (vocab-wide) LM head.
            index = to_device(step.sample_indices, torch.long, device)
            logits = self.model.compute_logits(hidden.index_select(0, index))
            launched.sample = self.sampler.launch(logits, step.sample_rows, self.feedback)
        if step.prompt_logits:
            launched.prompt_logprobs = [self._prompt_logprobs(hidden, p) for p in step.prompt_logits]
        return launched

    def _prompt_logprobs(self, hidden: torch.Tensor, work: PromptLogits) -> list[PromptTokenLogprob]:
        """Each target token's logprob under the raw model distribution (float32) and the
        `top_k` most likely tokens there, best first."""
        out: list[PromptTokenLogprob] = []
        targets = work.targets
        for lo in range(0, len(targets), PROMPT_LOGITS_CHUNK):
            hi = min(lo + PROMPT_LOGITS_CHUNK, len(targets))
            rows = hidden[work.flat_start + lo : work.flat_start + hi]
            logprobs = torch.log_softmax(self.model.compute_logits(rows).float(), dim=-1)
            want = to_device(targets[lo:hi], torch.long, self.device).view(-1, 1)
            chosen = logprobs.gather(1, want).view(-1).tolist()
            if work.top_k > 0:
                values, ids = logprobs.topk(min(work.top_k, logprobs.shape[-1]), dim=-1)
                tops = [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
            else:
                tops = [[] for _ in chosen]
            out.extend(PromptTokenLogprob(lp, top) for lp, top in zip(chosen, tops))
        return out
