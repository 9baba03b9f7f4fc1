"""Migration replay for vLLM: lets a request that moved here from a failed worker continue its
output constraint and its frequency/presence penalties from where the other worker stopped.

A migrated request arrives with the tokens generated so far at the end of its prompt
(`generated_before`). vLLM starts a structured-output grammar at the first *output* token and
counts only output tokens for frequency/presence penalties, and it cannot be told otherwise:
SamplingParams has no grammar prefix, and `trace_decode_token_ids` (forced decoding) refuses
structured outputs. So such a request goes without vLLM's structured outputs and instead carries
`extra_args[REPLAY_KEY]`, which this logits processor (installed into the engine core at start)
acts on: it compiles the constraint with the structured-output backend vLLM itself picked for it,
advances the matcher through the earlier tokens and then through each new one, masks every token
that would leave the language, and adds the earlier tokens' share of the penalties. Requests
without the key cost one empty-dict check per step.

Difference from an unmigrated request: vLLM computes "raw" logprobs before any logits processor,
so after a migration a constrained request's logprobs are the unmasked model distribution, while
vLLM's own structured outputs (applied before the sampler) report the masked one."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from vllm.exceptions import VLLMValidationError
from vllm.sampling_params import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.structured_output.backend_types import StructuredOutputBackend, StructuredOutputGrammar

log = logging.getLogger(__name__)

REPLAY_KEY = "dynamo_migration_replay"
# Where vLLM installs the processor from (a class path, so the engine core process imports it).
PROCESSOR_FQCN = "workers.vllm.replay:MigrationReplayProcessor"


def replay_args(prior: list[int], key: tuple[str, str] | None = None, backend: str | None = None) -> dict[str, Any]:
    """extra_args[REPLAY_KEY] for a migrated request: the tokens generated before the migration
    and, for a constrained request, vLLM's structured-output key (StructuredOutputOptions name,
    spec) and backend as vLLM's own validation resolved them (plain data: it crosses to the
    engine core process as msgpack)."""
    args: dict[str, Any] = {"prior": list(prior)}
    if key is not None:
        args["kind"], args["spec"] = key
        args["backend"] = backend or "xgrammar"
    return args


# ------------------------------------------------------------------------------ penalties


def repetition(x: np.ndarray, penalty: float) -> np.ndarray:
    """vLLM's repetition penalty on logits of tokens seen before (apply_repetition_penalties)."""
    return np.where(x > 0, x / penalty, x * penalty)


def repetition_inverse(y: np.ndarray, penalty: float) -> np.ndarray:
    return np.where(y > 0, y * penalty, y / penalty)


def penalty_correction(
    logits: np.ndarray,
    prior_counts: np.ndarray,
    new_counts: np.ndarray,
    frequency: float,
    presence: float,
    repetition_penalty: float,
) -> np.ndarray:
    """New logits for the tokens generated before the migration (all of them in vLLM's prompt
    now), such that after vLLM's own penalties (repetition, then frequency and presence on the
    counts since the migration, `new_counts`) they end as if every token had been output here:

        want = rep(x) - f * (prior + new) - p * [prior + new > 0]
        vLLM = rep(x') - f * new - p * [new > 0]
        =>  x' = rep^-1(rep(x) - f * prior - p * [new == 0])       (prior > 0 for these tokens)
    """
    extra = frequency * prior_counts + presence * (new_counts == 0)
    if repetition_penalty == 1.0:
        return logits - extra
    return repetition_inverse(repetition(logits, repetition_penalty) - extra, repetition_penalty)


# -------------------------------------------------------------------------- one request


@dataclass
class ReplayState:
    """One migrated request in the batch: its matcher, its earlier tokens' counts, and how much
    of its live output list (vLLM's reference; it grows as tokens are sampled) it has seen."""

    output_ids: list[int]
    grammar: StructuredOutputGrammar | None
    prior_ids: np.ndarray  # distinct tokens generated before the migration
    prior_counts: np.ndarray
    frequency: float
    presence: float
    repetition: float
    new_counts: np.ndarray = field(init=False)
    _position: dict[int, int] = field(init=False)
    seen: int = 0

    def __post_init__(self) -> None:
        self.new_counts = np.zeros(len(self.prior_ids), dtype=np.float32)
        self._position = {int(t): i for i, t in enumerate(self.prior_ids)}

    @property
    def penalised(self) -> bool:
        return bool(self.frequency or self.presence) and len(self.prior_ids) > 0

    def advance(self) -> None:
        """Feeds the tokens sampled since the last step to the matcher and the counts. Async
        scheduling leaves -1 placeholders until vLLM fills them in before sampling."""
        out = self.output_ids
        while self.seen < len(out) and out[self.seen] >= 0:
            token = out[self.seen]
            self.seen += 1
            if self.grammar is not None and not self.grammar.accept_tokens("replay", [token]):
                log.error("migration replay: the grammar rejected sampled token %d; unconstrained from here", token)
                self.grammar = None
            pos = self._position.get(token)
            if pos is not None:
                self.new_counts[pos] += 1

    def apply(self, logits: torch.Tensor, row: int, bitmask: torch.Tensor) -> None:
        self.advance()
        if self.grammar is not None and not self.grammar.is_terminated():
            self.grammar.fill_bitmask(bitmask, 0)
            _apply_bitmask(logits, row, bitmask)
        if self.penalised:
            ids = torch.from_numpy(self.prior_ids)
            x = logits[row, ids].float().cpu().numpy()
            fixed = penalty_correction(x, self.prior_counts, self.new_counts, self.frequency, self.presence, self.repetition)
            logits[row, ids] = torch.from_numpy(fixed.astype(np.float32)).to(logits.device, logits.dtype)


def _apply_bitmask(logits: torch.Tensor, row: int, bitmask: torch.Tensor) -> None:
    """-inf on every token the packed int32 bitmask (bit i of word i // 32: token allowed) does
    not allow, including vocabulary padding columns the mask does not cover."""
    width = logits.shape[1]
    words = bitmask[0].to(torch.int64) & 0xFFFFFFFF
    bits = (words.unsqueeze(1) >> torch.arange(32, dtype=torch.int64)) & 1
    allowed = bits.reshape(-1).bool()
    if allowed.numel() < width:
        allowed = torch.cat([allowed, torch.zeros(width - allowed.numel(), dtype=torch.bool)])
    blocked = ~allowed[:width]
    logits[row].masked_fill_(blocked.to(logits.device), float("-inf"))


# ------------------------------------------------------------------------- the processor


class MigrationReplayProcessor(LogitsProcessor):
    """vLLM v1 logits processor (not argmax-invariant: it runs for greedy requests too). One per
    engine core; it keeps state only for rows whose request carries extra_args[REPLAY_KEY]."""

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        spec = (sampling_params.extra_args or {}).get(REPLAY_KEY)
        if spec is None:
            return
        prior = spec.get("prior") if isinstance(spec, dict) else None
        if not isinstance(prior, list) or not all(isinstance(t, int) and t >= 0 for t in prior):
            raise VLLMValidationError("migration replay needs the earlier tokens as ids", parameter="extra_args")
        if sampling_params.structured_outputs is not None and "kind" in spec:
            raise VLLMValidationError("a replayed constraint replaces structured_outputs", parameter="extra_args")

    def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool) -> None:
        self._vllm_config = vllm_config
        self._backends: dict[str, StructuredOutputBackend] = {}
        self._rows: dict[int, ReplayState] = {}
        self._bitmask: torch.Tensor | None = None

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        process_dict_updates(self._rows, batch_update, self._new_state)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self._rows:
            return logits
        for row, state in self._rows.items():
            assert self._bitmask is not None or state.grammar is None
            state.apply(logits, row, self._bitmask if self._bitmask is not None else torch.empty(0))
        return logits

    # ----------------------------------------------------------------------- per request

    def _new_state(self, params: SamplingParams, _prompt: list[int] | None, output_ids: list[int]) -> ReplayState | None:
        spec = (params.extra_args or {}).get(REPLAY_KEY)
        if spec is None:
            return None
        prior = list(spec["prior"])
        grammar = None
        if "kind" in spec:
            grammar = self._compile(spec["backend"], spec["kind"], spec["spec"], params)
            if grammar is not None and not grammar.accept_tokens("replay", prior):
                log.error("migration replay: the grammar rejects the tokens generated before the migration; unconstrained")
                grammar = None
        ids, counts = np.unique(np.asarray(prior, dtype=np.int64), return_counts=True)
        return ReplayState(
            output_ids=output_ids,  # vLLM's live list: tokens already there are fed on apply()
            grammar=grammar,
            prior_ids=ids,
            prior_counts=counts.astype(np.float32),
            frequency=params.frequency_penalty,
            presence=params.presence_penalty,
            repetition=params.repetition_penalty,
        )

    def _compile(self, backend_name: str, kind: str, spec: str, params: SamplingParams) -> StructuredOutputGrammar | None:
        from vllm.v1.structured_output.backend_types import StructuredOutputOptions

        backend = self._backend(backend_name)
        try:
            grammar = backend.compile_grammar(StructuredOutputOptions[kind], spec, stop_token_ids=params.all_stop_token_ids)
        except Exception:  # validated on admission; a failure here must not take the engine down
            log.exception("migration replay: compiling the %s constraint failed; unconstrained", kind)
            return None
        if self._bitmask is None:
            self._bitmask = backend.allocate_token_bitmask(1)
        return grammar

    def _backend(self, name: str) -> StructuredOutputBackend:
        backend = self._backends.get(name)
        if backend is not None:
            return backend
        from vllm.tokenizers import cached_tokenizer_from_config
        from vllm.v1.structured_output.backend_guidance import GuidanceBackend
        from vllm.v1.structured_output.backend_xgrammar import XgrammarBackend

        classes: dict[str, Any] = {"xgrammar": XgrammarBackend, "guidance": GuidanceBackend}
        if name == "outlines":
            from vllm.v1.structured_output.backend_outlines import OutlinesBackend

            classes[name] = OutlinesBackend
        elif name == "lm-format-enforcer":
            from vllm.v1.structured_output.backend_lm_format_enforcer import LMFormatEnforcerBackend

            classes[name] = LMFormatEnforcerBackend
        config = self._vllm_config
        backend = classes[name](
            config,
            tokenizer=cached_tokenizer_from_config(model_config=config.model_config),
            vocab_size=config.model_config.get_vocab_size(),
        )
        self._backends[name] = backend
        return backend
