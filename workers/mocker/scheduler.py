"""Continuous batching over a real block pool, in the manner of vLLM v1's scheduler: one token
budget per step shared by decodes and chunked prefills, FIFO admission, and recompute
preemption of the newest request when blocks run out. No asyncio here: the engine drives it."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from dynamo.wire import EngineOutput
from kvbm.block_pool import BlockPool
from kvbm.tiered import TieredCache
from workers.mocker.args import MockerConfig
from workers.mocker.sequence import MockSequence, SeqStatus
from workers.mocker.timing import attn_pairs


@dataclass(slots=True)
class ScheduledBatch:
    """What one step computes: `num_new_tokens[i]` tokens of `seqs[i]`, and the totals the
    timing model needs."""

    seqs: list[MockSequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    num_tokens: int = 0
    kv_tokens: int = 0
    attn_pairs: int = 0

    def add(self, seq: MockSequence, num_new: int) -> None:
        computed = seq.num_computed_tokens
        self.seqs.append(seq)
        self.num_new_tokens.append(num_new)
        self.num_tokens += num_new
        self.kv_tokens += computed + num_new
        self.attn_pairs += attn_pairs(computed, num_new)


class Scheduler:
    def __init__(self, config: MockerConfig, pool: BlockPool, kvbm: TieredCache | None = None) -> None:
        self.config = config
        self.pool = pool
        self.kvbm = kvbm  # simulated lower KV tiers: hits there are onboarded, not recomputed
        self.block_size = pool.block_size_tokens
        self.waiting: deque[MockSequence] = deque()
        self.running: list[MockSequence] = []  # oldest admission first
        self.num_preemptions = 0

    # ------------------------------------------------------------------------------ queries

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    def waiting_prefill_tokens(self) -> int:
        """Prompt (or recompute) tokens not yet computed, of waiting and prefilling requests."""
        pending = sum(len(s.token_ids) for s in self.waiting)
        for seq in self.running:
            if seq.num_computed_tokens < len(seq.token_ids) - 1:
                pending += len(seq.token_ids) - seq.num_computed_tokens
        return pending

    # --------------------------------------------------------------------------- lifecycle

    def add(self, seq: MockSequence) -> None:
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)

    def add_prefilled(self, seq: MockSequence) -> None:
        """Run a request whose prompt KV was computed elsewhere and written into its block
        table (disaggregated prefill): register its full blocks and let it decode."""
        seq.status = SeqStatus.RUNNING
        self._commit_full_blocks(seq)
        self.running.append(seq)

    def abort(self, seq: MockSequence) -> None:
        """Drop a request wherever it is and free its blocks now."""
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SeqStatus.WAITING:
            self.waiting.remove(seq)
        else:
            return
        self._free(seq)
        seq.status = SeqStatus.FINISHED

    # ---------------------------------------------------------------------------- one step

    def schedule(self) -> ScheduledBatch:
        """Pick this step's work and allocate its blocks."""
        batch = ScheduledBatch()
        budget = self.config.max_num_batched_tokens
        running = self.running
        preempted = False
        i = 0
        while i < len(running) and budget > 0:
            seq = running[i]
            num_new = min(len(seq.token_ids) - seq.num_computed_tokens, budget)
            preemptions = self.num_preemptions
            fits = self._grow(seq, num_new)
            preempted = preempted or self.num_preemptions != preemptions
            if not fits:
                break  # it was the newest and preempted itself: nothing after it runs
            batch.add(seq, num_new)
            budget -= num_new
            i += 1
        # Like vLLM: admitting work in a step that had to preempt would only thrash.
        if not preempted:
            self._admit(batch, budget)
        return batch

    def finish_step(self, batch: ScheduledBatch) -> None:
        """Apply a computed step: commit newly full blocks, sample one token for each request
        whose prompt is done, and send it."""
        config = self.config
        any_finished = False
        for seq, num_new in zip(batch.seqs, batch.num_new_tokens):
            if seq.status is not SeqStatus.RUNNING:
                continue  # aborted while the step ran
            seq.num_computed_tokens += num_new
            self._commit_full_blocks(seq)
            if seq.num_computed_tokens < len(seq.token_ids):
                continue  # a prefill chunk: no token yet
            token = seq.sample(config.vocab_size, config.exclude_token_ids)
            seq.token_ids.append(token)
            seq.num_generated += 1
            reason = seq.finish_reason(token)
            if reason is not None:
                if not seq.hold_blocks:  # held ones are released by whoever exports their KV
                    self._free(seq)
                seq.status = SeqStatus.FINISHED
                any_finished = True
            cached = seq.cached_tokens if seq.num_generated == 1 else None
            seq.on_output(EngineOutput([token], reason, cached))
        if any_finished:
            self.running = [s for s in self.running if s.status is SeqStatus.RUNNING]

    # ----------------------------------------------------------------------------- helpers

    def _grow(self, seq: MockSequence, num_new: int) -> bool:
        """Give a running request blocks for `num_new` more tokens, preempting the newest
        running requests until they fit. False if `seq` itself had to be preempted."""
        need = -(-(seq.num_computed_tokens + num_new) // self.block_size) - len(seq.block_table)
        if need <= 0:
            return True
        while True:
            blocks = self.pool.allocate(need)
            if blocks is not None:
                seq.block_table.extend(blocks)
                return True
            victim = self.running.pop()
            self._preempt(victim)
            if victim is seq:
                return False

    def _admit(self, batch: ScheduledBatch, budget: int) -> None:
        """Admit waiting requests in FIFO order while seats, budget and blocks last."""
        pool = self.pool
        bs = self.block_size
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            total = len(seq.token_ids)
            # At least one token must be computed to produce the next token's logits.
            hashes = seq.hashes_upto((total - 1) // bs, bs)
            prefix = hashes[: (total - 1) // bs]
            matched = pool.match_prefix(prefix)
            lower = self.kvbm.lookup(prefix, len(matched)) if self.kvbm is not None else []
            computed = (len(matched) + len(lower)) * bs
            num_new = min(total - computed, budget)
            need = -(-(computed + num_new) // bs) - len(matched)
            # Matched blocks that are free count as free until acquired: leave them out.
            if pool.num_free_blocks - sum(1 for b in matched if b.ref_count == 0) < need:
                if lower:
                    self.kvbm.release(lower)  # type: ignore[union-attr]
                break  # head-of-line blocking keeps admission FIFO
            self.waiting.popleft()
            pool.acquire(matched)
            blocks = pool.allocate(need)
            assert blocks is not None
            if self.kvbm is not None:
                self.kvbm.onboard(prefix, len(matched), lower, [b.block_id for b in blocks[: len(lower)]])
            seq.block_table = matched + blocks
            seq.num_computed_tokens = computed
            seq.num_committed_blocks = len(matched)
            if seq.cached_tokens is None:
                seq.cached_tokens = computed
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            batch.add(seq, num_new)
            budget -= num_new

    def _commit_full_blocks(self, seq: MockSequence) -> None:
        start = seq.num_committed_blocks
        end = seq.num_computed_tokens // self.block_size
        if end <= start:
            return
        hashes = seq.hashes_upto(end, self.block_size)
        table = seq.block_table
        mine = table[start:end]
        used = self.pool.commit_many(mine, hashes[start:end], hashes[start - 1] if start else None)
        for offset, (block, shared) in enumerate(zip(mine, used)):
            if shared is not block:
                # Another request cached this block first: share it, free our copy.
                self.pool.acquire([shared])
                self.pool.release([block])
                table[start + offset] = shared
        seq.num_committed_blocks = end

    def _preempt(self, seq: MockSequence) -> None:
        """Recompute preemption: free everything, requeue at the front."""
        self._free(seq)
        seq.num_computed_tokens = 0
        seq.num_committed_blocks = 0
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def _free(self, seq: MockSequence) -> None:
        self.pool.release(seq.block_table)
        seq.block_table = []
