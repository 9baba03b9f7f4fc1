"""Token sampling for one step's batch of logits, batched: each feature is one tensor op over the
rows that use it, whatever the batch; per-row Python only gathers those rows' indices.

Order, vLLM v1's: the raw logprobs (log-softmax of the model's float32 logits, what `logprobs`
and `top_logprobs` report) -> grammar mask -> logit_bias -> penalties (repetition over prompt
and output; frequency and presence over output counts) -> min_tokens ban -> greedy argmax, or
temperature -> min_p -> top-k -> top-p -> one draw per row by inverse CDF with the row's own
uniform (a per-request random.Random: seeded rows are reproducible whatever else is batched).

A min_tokens-banned stop id gets a very low finite logit, not -inf: where a grammar allows
nothing but a stop token, that token is still chosen (a row is never all -inf)."""

from __future__ import annotations

from collections.abc import Sequence

import math
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NoReturn

import numpy as np
import torch

from dynamo import errors
from dynamo.wire import PreprocessedRequest, PromptTokenLogprob
from workers.builtin.device_copy import to_device
from workers.builtin.grammar_masks import GrammarMasks
from workers.builtin.penalties import PenaltyCounts

if TYPE_CHECKING:
    from workers.structured import GrammarMatcher

BANNED_LOGIT = -1e30  # min_tokens' ban: below any real logit, and finite after temperature


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """One request's validated sampling parameters (workers/builtin/executor.py builds them)."""

    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    logprobs: bool = False
    top_logprobs: int = 0
    min_p: float = 0.0
    bias_ids: tuple[int, ...] = ()  # logit_bias, as two aligned tuples
    bias_values: tuple[float, ...] = ()
    repetition_penalty: float = 1.0  # vLLM's: tokens of prompt and output, multiplicative
    frequency_penalty: float = 0.0  # OpenAI's: output tokens, times their count
    presence_penalty: float = 0.0  # OpenAI's: output tokens, once

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0 or self.top_k == 1

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0

    @property
    def wants_logprobs(self) -> bool:
        return self.logprobs or self.top_logprobs > 0


@dataclass(slots=True)
class PenaltyInit:
    """A penalised row sampled for the first time: the tokens its counts start from."""

    prompt_ids: list[int]
    output_ids: list[int]  # generated so far, those before a migration included


@dataclass(slots=True)
class SampleRow:
    """What sampling needs for one row of logits."""

    params: SamplingParams
    rng: random.Random | None  # the row's uniforms; None for greedy rows
    banned_token_ids: tuple[int, ...] = ()  # stop ids not allowed yet (min_tokens)
    matcher: GrammarMatcher | None = None  # masks the row; accepts the chosen token
    penalty_slot: int = -1  # the request's row of PenaltyCounts, when penalised
    penalty_init: PenaltyInit | None = None

    @property
    def plain_greedy(self) -> bool:
        """Argmax of the raw logits: nothing masks, biases, penalises or reports on them."""
        p = self.params
        return (p.temperature <= 0.0 and not p.bias_ids and not self.banned_token_ids and self.matcher is None
                and self.penalty_slot < 0 and not p.logprobs and not p.top_logprobs)


@dataclass(slots=True)
class SampleLaunch:
    """A step's sampling queued on the device (Sampler.launch): what `finish` reads back. The
    tensors are pinned host copies on CUDA (valid once `event` completes), else CPU tensors."""

    rows: list[SampleRow]
    constrained: list[tuple[int, GrammarMatcher]]
    wants_lp: list[int]
    tokens: torch.Tensor | None
    chosen: torch.Tensor | None  # logprob of the chosen token, per row of wants_lp
    top_values: torch.Tensor | None
    top_ids: torch.Tensor | None
    event: torch.cuda.Event | None


@dataclass(slots=True)
class SampleResult:
    token_ids: list[int]
    logprobs: list[float] | None  # per row; None when no row asked
    top_logprobs: list[list[tuple[int, float]] | None] | None = None  # per row; None when no row asked
    # Filled by the runner: per prompt-logits entry of its step, one per target token.
    prompt_logprobs: list[list[PromptTokenLogprob]] = field(default_factory=list)


class Sampler:
    """Samples a step's rows on one device. Holds what outlives a step: the penalty counts
    (rows handed out by the executor) and, once a constrained row comes, the grammar masks
    (filled a step ahead on a CPU: grammar_masks.py)."""

    def __init__(self, vocab_size: int, device: torch.device, *, max_batch: int = 64) -> None:
        self.vocab_size = vocab_size
        self.device = device
        self.max_batch = max_batch
        self.penalties = PenaltyCounts(vocab_size, device)
        self._grammar: GrammarMasks | None = None

    def sample(self, logits: torch.Tensor, rows: list[SampleRow]) -> SampleResult:
        """`logits` [N, vocab] (the model's dtype), one row per entry of `rows`."""
        return self.finish(self.launch(logits, rows))

    def launch(
        self, logits: torch.Tensor, rows: list[SampleRow], feedback: torch.Tensor | None = None
    ) -> SampleLaunch:
        """Queue the step's sampling on the device and the copies of what the host reads back
        (chosen ids, logprobs) into pinned memory, without waiting: `finish` waits. The chosen
        ids also go to `feedback[:N]` on the device, where the next step's inputs may read
        them before the host has (the overlap scheduler). A constrained row's mask needs its
        matcher past the previous step's token: that step must be finished first."""
        if all(r.plain_greedy for r in rows):
            # The common case: argmax over the model's own dtype, which float32 would not change.
            tokens = logits.argmax(dim=-1)
            if feedback is not None and len(rows) <= feedback.shape[0]:
                feedback[: len(rows)].copy_(tokens)
            return SampleLaunch(rows, [], [], self._to_host(tokens), None, None, None, self._event())
        constrained = [(i, r.matcher) for i, r in enumerate(rows) if r.matcher is not None]
        bitmask = None
        if constrained:
            # CPU work first: on a GPU, what was not filled ahead overlaps the queued forward pass.
            bitmask = self._grammar_masks().masks(constrained)
        raw = logits.float()
        wants_lp = [i for i, r in enumerate(rows) if r.params.wants_logprobs]
        raw_lp = None
        if wants_lp:
            sub = raw if len(wants_lp) == len(rows) else raw.index_select(0, self._index(wants_lp))
            raw_lp = torch.log_softmax(sub, dim=-1)

        x = self._process(raw, rows, constrained, bitmask)
        tokens = x.argmax(dim=-1)
        sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
        if sampled:
            tokens = tokens.clone()
            tokens.index_copy_(0, self._index(sampled), self._draw(x, rows, sampled))
        penalized = [i for i, r in enumerate(rows) if r.penalty_slot >= 0]
        if penalized:
            self.penalties.add(
                [rows[i].penalty_slot for i in penalized], tokens.index_select(0, self._index(penalized))
            )
        if feedback is not None and len(rows) <= feedback.shape[0]:  # more rows than seats: no next step reads them
            feedback[: len(rows)].copy_(tokens)
        chosen = top_values = top_ids = None
        k_max = 0
        if raw_lp is not None:
            chosen_ids = tokens if len(wants_lp) == len(rows) else tokens.index_select(0, self._index(wants_lp))
            chosen = raw_lp.gather(1, chosen_ids.view(-1, 1)).view(-1)
            k_max = max(rows[i].params.top_logprobs for i in wants_lp)
            if k_max:
                top_values, top_ids = raw_lp.topk(min(k_max, self.vocab_size), dim=-1)
        host = [self._to_host(t) for t in (tokens, chosen, top_values, top_ids)]
        return SampleLaunch(rows, constrained, wants_lp, host[0], host[1], host[2], host[3], self._event())

    def _event(self) -> torch.cuda.Event | None:
        """Marks the host copies queued so far (CUDA), for `finish` to wait on."""
        if self.device.type != "cuda":
            return None
        event = torch.cuda.Event()
        event.record()
        return event

    def finish(self, launched: SampleLaunch) -> SampleResult:
        """Wait for a launched step's copies (not for work queued after them) and complete it:
        matchers accept their tokens, logprobs become lists."""
        if launched.event is not None:
            launched.event.synchronize()  # drops the GIL while it waits
        rows, constrained, wants_lp = launched.rows, launched.constrained, launched.wants_lp
        assert launched.tokens is not None
        token_ids = launched.tokens.tolist()
        for i, matcher in constrained:
            if not matcher.accept(token_ids[i]):  # the mask allowed it: a bug if refused
                raise RuntimeError(f"grammar refused token {token_ids[i]} that its mask allowed")
        if constrained:
            self._grammar_masks().fill_ahead([m for _, m in constrained])

        logprobs: list[float] | None = None
        top: list[list[tuple[int, float]] | None] | None = None
        if launched.chosen is not None:
            chosen = launched.chosen.tolist()
            logprobs = [0.0] * len(rows)
            for j, i in enumerate(wants_lp):
                logprobs[i] = chosen[j]
            if launched.top_values is not None and launched.top_ids is not None:
                values_l, ids_l = launched.top_values.tolist(), launched.top_ids.tolist()
                top = [None] * len(rows)
                for j, i in enumerate(wants_lp):
                    k = rows[i].params.top_logprobs
                    if k:
                        top[i] = list(zip(ids_l[j][:k], values_l[j][:k]))
        return SampleResult(token_ids, logprobs, top)

    def _to_host(self, t: torch.Tensor | None) -> torch.Tensor | None:
        """A pinned host copy queued behind the work that makes `t` (on CUDA), else `t`."""
        if t is None or self.device.type != "cuda":
            return t
        out = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=True)
        out.copy_(t, non_blocking=True)
        return out

    # ------------------------------------------------------------------------------ stages

    def _process(
        self, raw: torch.Tensor, rows: list[SampleRow],
        constrained: list[tuple[int, GrammarMatcher]], bitmask: np.ndarray | None,
    ) -> torch.Tensor:
        """The logits that sampling chooses from: grammar, bias, penalties, min_tokens ban."""
        bias_rows: list[int] = []
        bias_ids: list[int] = []
        bias_values: list[float] = []
        banned_rows: list[int] = []
        banned_ids: list[int] = []
        penalized: list[int] = []
        for i, r in enumerate(rows):
            p = r.params
            if p.bias_ids:
                bias_rows.extend([i] * len(p.bias_ids))
                bias_ids.extend(p.bias_ids)
                bias_values.extend(p.bias_values)
            if r.banned_token_ids:
                banned_rows.extend([i] * len(r.banned_token_ids))
                banned_ids.extend(r.banned_token_ids)
            if r.penalty_slot >= 0:
                penalized.append(i)
        if not (constrained or bias_rows or banned_rows or penalized):
            return raw
        x = raw.clone()
        if constrained:
            assert bitmask is not None
            self._grammar_masks().apply(x, bitmask, [i for i, _ in constrained])
        if bias_rows:
            x.index_put_(
                (self._index(bias_rows), self._index(bias_ids)),
                self._tensor(bias_values, torch.float32), accumulate=True,
            )
        if penalized:
            self._penalize(x, rows, penalized)
        if banned_rows:
            x.index_put_((self._index(banned_rows), self._index(banned_ids)), torch.tensor(BANNED_LOGIT, device=x.device))
        return x

    def _penalize(self, x: torch.Tensor, rows: list[SampleRow], penalized: list[int]) -> None:
        for i in penalized:
            init = rows[i].penalty_init
            if init is not None:
                self.penalties.init_slot(rows[i].penalty_slot, init.prompt_ids, init.output_ids)
        counts, in_prompt = self.penalties.gather([rows[i].penalty_slot for i in penalized])
        params = [rows[i].params for i in penalized]
        index = self._index(penalized)
        sub = x.index_select(0, index)
        rep = self._tensor([p.repetition_penalty for p in params], torch.float32).view(-1, 1)
        freq = self._tensor([p.frequency_penalty for p in params], torch.float32).view(-1, 1)
        pres = self._tensor([p.presence_penalty for p in params], torch.float32).view(-1, 1)
        present = counts > 0
        # vLLM's repetition penalty: a seen token's positive logit is divided by it, a negative
        # one multiplied (rows with penalty 1 are unchanged either way).
        seen = present | in_prompt
        sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
        sub = sub - freq * counts - pres * present.float()
        x.index_copy_(0, index, sub)

    def _draw(self, x: torch.Tensor, rows: list[SampleRow], sampled: list[int]) -> torch.Tensor:
        """One token per sampled row: temperature, min_p, top-k, top-p, inverse-CDF draw."""
        params = [rows[i].params for i in sampled]
        scores = x.index_select(0, self._index(sampled))
        scores = scores / self._tensor([p.temperature for p in params], torch.float32).view(-1, 1)
        vocab = scores.shape[-1]
        if any(p.min_p > 0 for p in params):
            probs = torch.softmax(scores, dim=-1)
            floor = self._tensor([p.min_p for p in params], torch.float32).view(-1, 1) * probs.amax(-1, keepdim=True)
            scores = scores.masked_fill(probs < floor, float("-inf"))
        ks = [p.top_k if 0 < p.top_k < vocab else 0 for p in params]
        k_max = max(ks)
        if k_max:
            kth_col = self._index([max(k, 1) - 1 for k in ks]).view(-1, 1)
            kth = torch.topk(scores, k_max, dim=-1).values.gather(1, kth_col)
            off = self._tensor([k == 0 for k in ks], torch.bool).view(-1, 1)
            scores = scores.masked_fill((scores < kth) & ~off, float("-inf"))
        top_p_rows = [j for j, p in enumerate(params) if p.top_p < 1.0]
        if top_p_rows:
            index = self._index(top_p_rows)
            sub = scores.index_select(0, index)
            sorted_scores, order = torch.sort(sub, dim=-1, descending=True)
            probs = torch.softmax(sorted_scores, dim=-1)
            top_p = self._tensor([params[j].top_p for j in top_p_rows], torch.float32).view(-1, 1)
            # Keep the smallest prefix whose mass reaches top_p: drop a token when the mass
            # before it already does. The top token always survives.
            drop = (probs.cumsum(-1) - probs) >= top_p
            sorted_scores = sorted_scores.masked_fill(drop, float("-inf"))
            scores = scores.index_copy(0, index, sub.scatter(1, order, sorted_scores))
        probs = torch.softmax(scores, dim=-1)
        cdf = probs.double().cumsum(-1)
        uniforms = []
        for i in sampled:
            rng = rows[i].rng
            if rng is None:
                raise ValueError("a sampled (non-greedy) row needs its random.Random")
            uniforms.append(rng.random())
        target = self._tensor(uniforms, torch.float64).view(-1, 1) * cdf[:, -1:]
        chosen = torch.searchsorted(cdf, target, right=True).view(-1)
        # u * total can round up to total: then the most likely token (never a banned one).
        return torch.where(chosen < vocab, chosen, probs.argmax(-1)).clamp_(max=vocab - 1)

    # ------------------------------------------------------------------------------ helpers

    def _grammar_masks(self) -> GrammarMasks:
        if self._grammar is None:  # llguidance's fill threads start with the first constrained row
            # Ahead on a CPU only: on a GPU the fill in the step overlaps the queued forward pass.
            self._grammar = GrammarMasks(self.vocab_size, max_batch=self.max_batch, ahead=self.device.type == "cpu")
        return self._grammar

    def close(self) -> None:
        """Stop the grammar masks' helper thread (the sampler is done)."""
        if self._grammar is not None:
            self._grammar.close()

    def _index(self, values: list[int]) -> torch.Tensor:
        return self._tensor(values, torch.long)

    def _tensor(self, values: Sequence[int | float | bool], dtype: torch.dtype) -> torch.Tensor:
        return to_device(values, dtype, self.device)


GREEDY_BELOW_TEMPERATURE = 1e-5  # vLLM's: lower temperatures sample as greedy


def sampling_params(request: PreprocessedRequest, vocab_size: int) -> SamplingParams:
    """The request's sampling options, checked; InvalidRequest names a parameter out of range."""
    s = request.sampling
    temperature = 0.0 if s.temperature is None else s.temperature
    top_p = 1.0 if s.top_p is None else s.top_p
    top_k = 0 if s.top_k is None or s.top_k < 0 else s.top_k  # -1 is vLLM's "off"
    min_p = s.min_p or 0.0
    repetition = 1.0 if s.repetition_penalty is None else s.repetition_penalty
    frequency = s.frequency_penalty or 0.0
    presence = s.presence_penalty or 0.0
    if temperature < 0:
        _invalid("temperature", f"must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        _invalid("top_p", f"must be in (0, 1], got {top_p}")
    if not 0 <= min_p <= 1:
        _invalid("min_p", f"must be in [0, 1], got {min_p}")
    if not 0 <= s.top_logprobs <= vocab_size:
        _invalid("top_logprobs", f"must be in [0, {vocab_size}], got {s.top_logprobs}")
    if request.prompt_logprobs is not None and not 0 <= request.prompt_logprobs <= vocab_size:
        _invalid("prompt_logprobs", f"must be in [0, {vocab_size}], got {request.prompt_logprobs}")
    if not (repetition > 0 and math.isfinite(repetition)):
        _invalid("repetition_penalty", f"must be > 0, got {repetition}")
    for name, value in (("frequency_penalty", frequency), ("presence_penalty", presence)):
        if not -2 <= value <= 2:
            _invalid(name, f"must be in [-2, 2], got {value}")
    bias = s.logit_bias
    for token, value in bias.items():
        if not 0 <= token < vocab_size:
            _invalid("logit_bias", f"token id {token} is outside the vocabulary [0, {vocab_size})")
        if not math.isfinite(value):
            _invalid("logit_bias", f"the bias of token {token} is not a finite number")
    return SamplingParams(
        temperature=0.0 if temperature < GREEDY_BELOW_TEMPERATURE else temperature,
        top_p=top_p, top_k=top_k, logprobs=s.logprobs, top_logprobs=s.top_logprobs, min_p=min_p,
        bias_ids=tuple(bias), bias_values=tuple(float(v) for v in bias.values()),
        repetition_penalty=repetition, frequency_penalty=frequency, presence_penalty=presence,
    )


def _invalid(param: str, why: str) -> NoReturn:
    raise errors.InvalidRequest(f"{param} {why}", param=param)
