"""The mocker's synthetic model distribution: what a request's sampling options act on, so that
logprobs, logit_bias, penalties and min_tokens behave as on a real engine, without a model.

At each position the "model" ranks CANDIDATES tokens: the first is the request's seeded stream
draw (what the mocker emits when nothing modifies the choice, as it always did), the others
follow deterministically from it. Their raw logits are -1 - STEP * rank; every other token of
the vocabulary has FLOOR_LOGIT. Logprobs are these logits less their log-sum-exp over the whole
vocabulary (excluded ids have none), so they are consistent: the chosen token's is the largest
of its top_logprobs when nothing but the model picked it. logit_bias and penalties (vLLM's
repetition, OpenAI's frequency and presence) modify the logits of the candidates and the biased
tokens; the choice is then the best of them (greedy) or a draw from their softmax at the
request's temperature (after top-k, min-p and top-p among them), with the request's stream.
Plain Python: the mocker's rows are few."""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass, field

from dynamo import errors
from dynamo.wire import PreprocessedRequest, PromptTokenLogprob

CANDIDATES = 20  # as many as the most top_logprobs OpenAI allows
STEP = 0.5
FLOOR_LOGIT = -1.0 - STEP * CANDIDATES - 1.0


@dataclass(frozen=True, slots=True)
class SyntheticVocab:
    """The vocabulary the mocker draws from: ids below vocab_size but the excluded ones."""

    vocab_size: int
    exclude: frozenset[int]
    allowed: tuple[int, ...] | None = field(init=False, default=None)  # listed when small
    log_total: float = field(init=False, default=0.0)  # log-sum-exp of every allowed token's logit

    def __post_init__(self) -> None:
        num_allowed = self.vocab_size - sum(1 for t in self.exclude if 0 <= t < self.vocab_size)
        if num_allowed <= 4 * CANDIDATES:
            object.__setattr__(self, "allowed", tuple(t for t in range(self.vocab_size) if t not in self.exclude))
        ranked = min(num_allowed, CANDIDATES)
        total = sum(math.exp(-1.0 - STEP * r) for r in range(ranked)) + (num_allowed - ranked) * math.exp(FLOOR_LOGIT)
        object.__setattr__(self, "log_total", math.log(total))

    def draw(self, rng: random.Random) -> int:
        while True:
            token = rng.randrange(self.vocab_size)
            if token not in self.exclude:
                return token

    def candidates(self, first: int, key: int) -> list[int]:
        """The position's ranked candidates: `first`, then distinct ids that follow from
        (first, key)."""
        rng = random.Random(hash((first, key)))
        if self.allowed is not None:
            rest = [t for t in self.allowed if t != first]
            rng.shuffle(rest)
            return [first, *rest[: CANDIDATES - 1]]
        out = [first]
        seen = {first}
        while len(out) < CANDIDATES:
            token = self.draw(rng)
            if token not in seen:
                seen.add(token)
                out.append(token)
        return out

    def logit(self, token: int, candidates: list[int]) -> float:
        try:
            return -1.0 - STEP * candidates.index(token)
        except ValueError:
            return FLOOR_LOGIT

    def top(self, candidates: list[int], k: int) -> list[tuple[int, float]]:
        """The k most likely tokens and their logprobs, best first."""
        out = [(t, -1.0 - STEP * r - self.log_total) for r, t in enumerate(candidates[:k])]
        if k > len(out):  # past the candidates every token has the floor logit
            used = set(candidates)
            floor = FLOOR_LOGIT - self.log_total
            token = 0
            while len(out) < k and token < self.vocab_size:
                if token not in used and token not in self.exclude:
                    out.append((token, floor))
                token += 1
        return out

    def prompt_logprobs(self, prompt: list[int], k: int) -> list[PromptTokenLogprob | None]:
        """Per prompt token: its logprob where the model stood before it, and the k best."""
        out: list[PromptTokenLogprob | None] = [None]
        for j in range(1, len(prompt)):
            cands = self.candidates(self.draw(random.Random(hash((prompt[j - 1], j)))), j)
            out.append(PromptTokenLogprob(self.logit(prompt[j], cands) - self.log_total, self.top(cands, k)))
        return out


@dataclass(frozen=True, slots=True)
class MockSampling:
    """A request's options, as the synthetic model applies them."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    top_logprobs: int = 0
    wants_logprobs: bool = False

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0

    @property
    def modifies(self) -> bool:
        """Anything but the stream's own draw can be chosen."""
        return bool(self.logit_bias) or self.penalized

    @classmethod
    def from_request(cls, request: PreprocessedRequest, vocab_size: int) -> MockSampling:
        """Checked as the built-in engine checks them; InvalidRequest names the parameter."""
        s = request.sampling
        for token in s.logit_bias:
            if not 0 <= token < vocab_size:
                raise errors.InvalidRequest(
                    f"logit_bias token id {token} is outside the vocabulary [0, {vocab_size})", param="logit_bias"
                )
        if s.repetition_penalty is not None and not s.repetition_penalty > 0:
            raise errors.InvalidRequest(f"repetition_penalty must be > 0, got {s.repetition_penalty}",
                                        param="repetition_penalty")
        if not 0 <= s.top_logprobs <= vocab_size:
            raise errors.InvalidRequest(f"top_logprobs must be in [0, {vocab_size}]", param="top_logprobs")
        return cls(
            temperature=s.temperature or 0.0,
            top_k=s.top_k if s.top_k is not None and s.top_k > 0 else 0,
            top_p=1.0 if s.top_p is None else s.top_p,
            min_p=s.min_p or 0.0,
            logit_bias=tuple(s.logit_bias.items()),
            repetition_penalty=s.repetition_penalty or 1.0,
            frequency_penalty=s.frequency_penalty or 0.0,
            presence_penalty=s.presence_penalty or 0.0,
            top_logprobs=s.top_logprobs,
            wants_logprobs=s.logprobs or s.top_logprobs > 0,
        )


@dataclass(slots=True)
class PenaltyState:
    """Tokens a penalised request has seen: its prompt's, and its output's with counts."""

    prompt: frozenset[int]
    output: Counter[int]


def choose(
    vocab: SyntheticVocab, sampling: MockSampling, candidates: list[int], rng: random.Random,
    banned: tuple[int, ...], penalties: PenaltyState | None,
) -> int:
    """The token the options pick among the candidates and the biased tokens."""
    logits = {t: vocab.logit(t, candidates) for t in candidates}
    for token, bias in sampling.logit_bias:
        logits[token] = logits.get(token, FLOOR_LOGIT) + bias
    if penalties is not None:
        for token, value in logits.items():
            count = penalties.output.get(token, 0)
            if count or token in penalties.prompt:
                value = value / sampling.repetition_penalty if value > 0 else value * sampling.repetition_penalty
            if count:
                value -= sampling.frequency_penalty * count + sampling.presence_penalty
            logits[token] = value
    for token in banned:
        logits.pop(token, None)
    if not logits:  # pragma: no cover - banned ids are stop ids, never all the candidates
        return candidates[0]
    ranked = sorted(logits.items(), key=lambda item: -item[1])  # stable: candidates' order on ties
    if sampling.temperature <= 0 or sampling.top_k == 1:
        return ranked[0][0]
    if sampling.top_k:
        ranked = ranked[: sampling.top_k]
    best = ranked[0][1]
    weights = [math.exp((value - best) / sampling.temperature) for _, value in ranked]
    # min_p against the best token's weight (1), then the smallest prefix whose mass reaches top_p.
    kept = [w for w in weights if w >= sampling.min_p]
    total, mass, cut = sum(kept), 0.0, len(kept)
    for i, weight in enumerate(kept):
        if mass >= sampling.top_p * total:
            cut = i
            break
        mass += weight
    ranked, weights = ranked[:cut], kept[:cut]
    point = rng.random() * sum(weights)
    for (token, _), weight in zip(ranked, weights):
        point -= weight
        if point < 0:
            return token
    return ranked[0][0]
