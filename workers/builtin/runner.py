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
from workers.builtin.attention import AttentionBackend, SeqSlice, to_device
from workers.builtin.cuda_graphs import DecodeGraphs, capture_sizes
from workers.builtin.kv_cache import KVCache
from workers.builtin.model import LlamaForCausalLM
from workers.builtin.sampling import PenaltyInit, SampleResult, SampleRow, Sampler, SamplingParams

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
    input_ids: list[int]
    positions: list[int]
    slices: list[SeqSlice]
    sample_indices: list[int]  # flat index of each sampling sequence's last token
    sample_rows: list[SampleRow]
    prompt_logits: list[PromptLogits] = field(default_factory=list)


def build_step_input(batch: ScheduledBatch) -> StepInput:
    """Each sampling request's row comes from its RequestState (its Sequence's `exec_state`),
    with its stop ids banned while it is short of min_tokens and, the first time a penalised
    request samples, the tokens its penalty counts start from."""
    input_ids: list[int] = []
    positions: list[int] = []
    slices: list[SeqSlice] = []
    sample_indices: list[int] = []
    rows: list[SampleRow] = []
    prompt_logits: list[PromptLogits] = []
    for seq, num_new, samples in zip(batch.seqs, batch.num_new_tokens, batch.samples):
        start = seq.num_computed_tokens
        flat_start = len(input_ids)
        input_ids.extend(seq.token_ids[start : start + num_new])
        positions.extend(range(start, start + num_new))
        slices.append(SeqSlice(start, num_new, [b.block_id for b in seq.block_table]))
        state: RequestState = seq.exec_state
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
            rows.append(SampleRow(state.params, state.rng, seq.banned_token_ids(), state.matcher,
                                  state.penalty_slot, init))
    return StepInput(input_ids, positions, slices, sample_indices, rows, prompt_logits)


class ModelRunner:
    """Runs steps on one device. CUDA graphs are captured at construction when the model runs
    the Triton backend on CUDA and `enforce_eager` is off; `max_model_len` sizes their block
    tables."""

    def __init__(
        self, model: LlamaForCausalLM, kv: KVCache, device: torch.device, *,
        enforce_eager: bool = True, max_num_seqs: int = 256, max_model_len: int | None = None,
    ) -> None:
        self.model = model
        self.kv = kv
        self.device = device
        self.backend: AttentionBackend = model.model.layers[0].self_attn.backend  # type: ignore[union-attr,assignment]
        self.graphs: DecodeGraphs | None = None
        self.sampler = Sampler(model.config.vocab_size, device, max_batch=max_num_seqs)
        if not enforce_eager and device.type == "cuda" and model.fused:
            max_len = max_model_len or model.max_positions
            max_blocks = -(-max_len // kv.block_size_tokens)
            started = time.monotonic()
            self.graphs = DecodeGraphs(model, kv, device, capture_sizes(max_num_seqs), max_blocks)
            self.graphs.capture()
            log.info("captured %d decode CUDA graphs in %.1f s", len(self.graphs.sizes), time.monotonic() - started)

    @torch.inference_mode()
    def execute(self, step: StepInput) -> SampleResult:
        """The step's sampled tokens; with prompt logprobs, per entry of step.prompt_logits,
        in `prompt_logprobs`."""
        graphs = self.graphs
        if graphs is not None and not step.prompt_logits and all(s.num_new == 1 for s in step.slices):
            batch = graphs.bucket(len(step.slices))
            if batch is not None:
                logits = graphs.run(step.input_ids, step.slices, batch)
                if not step.sample_rows:
                    return SampleResult([], None)
                if len(step.sample_indices) != len(step.slices):
                    # A one-token prefill chunk that is not its prompt's last samples nothing.
                    logits = logits.index_select(0, to_device(step.sample_indices, torch.long, self.device))
                return self.sampler.sample(logits, step.sample_rows)
        device = self.device
        meta = self.backend.build_metadata(step.slices, self.kv.block_size_tokens, device)
        input_ids = to_device(step.input_ids, torch.long, device)
        positions = to_device(step.positions, torch.long, device)
        hidden = self.model(input_ids, positions, self.kv, meta)
        result = SampleResult([], None)
        if step.sample_rows:
            # Only the rows that yield a token need the (vocab-wide) LM head.
            index = to_device(step.sample_indices, torch.long, device)
            logits = self.model.compute_logits(hidden.index_select(0, index))
            result = self.sampler.sample(logits, step.sample_rows)
        if step.prompt_logits:
            result.prompt_logprobs = [self._prompt_logprobs(hidden, p) for p in step.prompt_logits]
        return result

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
