"""One request inside the mocker: its tokens, block table, progress, stop rules and the
deterministic token stream it samples from."""

from __future__ import annotations

import enum
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from dynamo.kv_hash import block_hash
from dynamo.wire import EngineOutput, FinishReason
from kvbm.block_pool import Block


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True, eq=False)
class MockSequence:
    """`token_ids` is prompt + generated; the first `num_computed_tokens` have KV in
    `block_table`, whose first `num_committed_blocks` are registered in the pool."""

    request_id: str
    token_ids: list[int]
    max_new_tokens: int  # for this engine: max_tokens less tokens generated before migration
    max_len: int  # token_ids never grows past this (context length or pool capacity)
    stop_token_ids: frozenset[int]
    min_tokens: int  # counted over all generated tokens, those before migration included
    generated_before: int
    rng: random.Random
    on_output: Callable[[EngineOutput], None]
    num_prompt_tokens: int = 0
    status: SeqStatus = SeqStatus.WAITING
    num_computed_tokens: int = 0
    num_generated: int = 0
    block_table: list[Block] = field(default_factory=list)
    # Chained hashes of the leading full blocks of token_ids; token_ids only grow, so they stay
    # valid across preemption and are computed at most once each.
    block_hashes: list[int] = field(default_factory=list)
    num_committed_blocks: int = 0
    cached_tokens: int | None = None  # prefix-cache hit at first admission; sent with token one
    # A disaggregated prefill: its blocks outlive it until their KV is sent (workers/disagg).
    hold_blocks: bool = False

    def __post_init__(self) -> None:
        self.num_prompt_tokens = len(self.token_ids)

    @property
    def finished(self) -> bool:
        return self.status is SeqStatus.FINISHED

    def hashes_upto(self, num_blocks: int, block_size_tokens: int) -> list[int]:
        """Make sure the first `num_blocks` block hashes exist; returns the hash list."""
        hashes = self.block_hashes
        tokens = self.token_ids
        while len(hashes) < num_blocks:
            start = len(hashes) * block_size_tokens
            hashes.append(block_hash(hashes[-1] if hashes else None, tokens[start : start + block_size_tokens]))
        return hashes

    def sample(self, vocab_size: int, exclude: frozenset[int]) -> int:
        while True:
            token = self.rng.randrange(vocab_size)
            if token not in exclude:
                return token

    def finish_reason(self, token: int) -> FinishReason | None:
        """Why generation ends after appending `token`, or None to go on."""
        if token in self.stop_token_ids and self.generated_before + self.num_generated >= self.min_tokens:
            return "stop"
        if self.num_generated >= self.max_new_tokens or len(self.token_ids) >= self.max_len:
            return "length"
        return None
