"""One request inside a paged engine: its tokens, block table, progress, stop rules and sampling
options. It owns its state machine (waiting -> running -> finished, with recompute preemption
back to waiting); the scheduler and the engine call its methods rather than setting its fields."""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dynamo.kv_hash import block_hashes
from dynamo.wire import EngineOutput, FinishReason, SamplingOptions
from kvbm.block_pool import Block


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True, eq=False)
class Sequence:
    """`token_ids` is prompt + generated; the first `num_computed_tokens` have KV in
    `block_table`, whose first `num_committed_blocks` are registered in the pool.

    `sampling` is the request's SamplingOptions as sent; `exec_state` is what the step executor
    derived from them once (StepExecutor.new_request_state: the built-in engine's validated
    parameters, seeded draws, grammar matcher and penalty row; the mocker's seeded token stream).
    An executor reads both, with `banned_token_ids()` and the tokens so far, for each row it
    samples. The last `generated_before` ids of the prompt are output another worker generated
    (migration): `output_token_ids()` counts them."""

    request_id: str
    token_ids: list[int]
    sampling: SamplingOptions
    max_new_tokens: int  # max_tokens less tokens generated before migration
    max_len: int  # token_ids never grows past this (context length or pool capacity)
    stop_token_ids: frozenset[int]
    min_tokens: int  # counted over all generated tokens, those before migration included
    generated_before: int
    on_output: Callable[[EngineOutput], None]
    exec_state: Any = None  # the executor's, opaque here
    num_prompt_tokens: int = 0
    status: SeqStatus = SeqStatus.WAITING
    num_computed_tokens: int = 0
    num_generated: int = 0
    block_table: list[Block] = field(default_factory=list)
    # block_table's ids, kept in step by the methods below: a step's input copies this list
    # (one C-level copy) instead of walking the Blocks of every running request every step.
    block_ids: list[int] = field(default_factory=list)
    # Chained hashes of the leading full blocks; token_ids only grow, so they stay valid
    # across preemption and each is computed once.
    block_hashes: list[int] = field(default_factory=list)
    num_committed_blocks: int = 0
    cached_tokens: int | None = None  # prefix-cache hit at first admission; sent with token one
    # A disaggregated prefill: its blocks outlive it until their KV is sent (PagedEngine.prefill_held).
    hold_blocks: bool = False
    # Return each prompt token's logprob and this many alternatives with the first token: every
    # prompt position must be computed here, so such a prompt takes no prefix-cache hit.
    prompt_logprobs: int | None = None
    admitted_s: float = 0.0  # perf_counter() at its first admission (tracing: workers/paged/spans.py)

    def __post_init__(self) -> None:
        self.num_prompt_tokens = len(self.token_ids)

    @property
    def finished(self) -> bool:
        return self.status is SeqStatus.FINISHED

    @property
    def needs_prompt_logits(self) -> bool:
        """Its prompt positions' logits are still wanted (prompt_logprobs, first token not sent)."""
        return self.prompt_logprobs is not None and self.num_generated == 0

    @property
    def num_output_tokens(self) -> int:
        """Output tokens so far, those generated before a migration included."""
        return self.generated_before + self.num_generated

    def output_token_ids(self) -> list[int]:
        """The generated tokens (for penalties and grammars), those before a migration included."""
        return self.token_ids[self.num_prompt_tokens - self.generated_before :]

    def hashes_upto(self, num_blocks: int, block_size_tokens: int) -> list[int]:
        """Make sure the first `num_blocks` block hashes exist; returns the hash list."""
        hashes = self.block_hashes
        if len(hashes) < num_blocks:
            start = len(hashes) * block_size_tokens
            hashes += block_hashes(self.token_ids[start : num_blocks * block_size_tokens], block_size_tokens,
                                   hashes[-1] if hashes else None)
        return hashes

    def banned_token_ids(self) -> tuple[int, ...]:
        """Ids the next token may not be: the stop ids, until min_tokens are generated."""
        if self.stop_token_ids and self.generated_before + self.num_generated < self.min_tokens:
            return tuple(self.stop_token_ids)
        return ()

    # ---------------------------------------------------------------------------- transitions

    def admit(self, blocks: list[Block], num_cached_blocks: int, num_computed_tokens: int) -> None:
        """Waiting -> running with `blocks` (the first `num_cached_blocks` from the prefix
        cache) and `num_computed_tokens` whose KV is there or onboarded before the next step."""
        self._set_blocks(blocks)
        self.num_computed_tokens = num_computed_tokens
        self.num_committed_blocks = num_cached_blocks
        if self.cached_tokens is None:
            self.cached_tokens = num_computed_tokens
            self.admitted_s = time.perf_counter()
        self.status = SeqStatus.RUNNING

    def adopt_prefilled(self, blocks: list[Block], num_cached_blocks: int, first: EngineOutput) -> FinishReason | None:
        """Take a prompt whose KV another engine computed into `blocks` (the first
        `num_cached_blocks` were cached here) and its first token: running, nothing to
        recompute. Returns the finish reason after that token, if it is the last."""
        self._set_blocks(blocks)
        self.num_computed_tokens = len(self.token_ids)
        self.num_committed_blocks = num_cached_blocks
        self.cached_tokens = first.cached_tokens or 0
        self.status = SeqStatus.RUNNING
        return self.append_token(first.token_ids[0])

    def append_token(self, token: int) -> FinishReason | None:
        """Record a generated token; returns why generation ends after it, or None to go on."""
        self.token_ids.append(token)
        self.num_generated += 1
        if token in self.stop_token_ids and self.generated_before + self.num_generated >= self.min_tokens:
            return "stop"
        if self.num_generated >= self.max_new_tokens or len(self.token_ids) >= self.max_len:
            return "length"
        return None

    def preempt(self) -> list[Block]:
        """Running -> waiting, to be recomputed from scratch; returns the blocks to release."""
        self.num_computed_tokens = 0
        self.num_committed_blocks = 0
        self.status = SeqStatus.WAITING
        return self.take_blocks()

    def finish(self) -> None:
        self.status = SeqStatus.FINISHED

    def take_blocks(self) -> list[Block]:
        """Hand the block table over (to be released, or held for a KV transfer)."""
        blocks = self.block_table
        self._set_blocks([])
        return blocks

    def add_blocks(self, blocks: list[Block]) -> None:
        """Grow the block table (a running request's next tokens need them)."""
        self.block_table.extend(blocks)
        self.block_ids.extend([b.block_id for b in blocks])

    def replace_block(self, index: int, block: Block) -> None:
        """Put `block` at `index` (a committed block another request cached first)."""
        self.block_table[index] = block
        self.block_ids[index] = block.block_id

    def _set_blocks(self, blocks: list[Block]) -> None:
        # New lists, never cleared in place: a step built earlier may still hold the old ones.
        self.block_table = blocks
        self.block_ids = [b.block_id for b in blocks]
