"""Continuous batching over kvbm's block pool, in the manner of vLLM v1's scheduler: one token
budget per step shared by decodes and chunked prefills, FIFO admission with prefix-cache hits,
recompute preemption of the newest request when blocks run out, and abort that frees at once.
A request whose prefix continues on the KVBM disk tier is held back (in `loading`, not blocking
the requests behind it) while its blocks are read off the critical path, then admitted first.
No asyncio and no tensors here: the engine drives it, the step executor computes."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from dynamo.wire import EngineOutput, FinishReason
from kvbm.block_pool import Block, BlockPool
from kvbm.tiered import DiskReads, TieredCache
from workers.paged.executor import StepResult
from workers.paged.sequence import Sequence, SeqStatus


@dataclass(slots=True)
class ScheduledBatch:
    """One step: compute `num_new_tokens[i]` tokens of `seqs[i]` from position `starts[i]`;
    `samples[i]` when that completes its known tokens, so the step yields its next token (one
    row of the result). With a step in flight (the overlap loop) `starts[i]` is past
    `seq.num_computed_tokens` by that step's tokens, and a decode's input token may be the one
    that step is still sampling: position len(seq.token_ids), which the executor reads on its
    device."""

    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    samples: list[bool] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)
    num_tokens: int = 0

    def add(self, seq: Sequence, num_new: int, start: int | None = None, known: int | None = None) -> None:
        start = seq.num_computed_tokens if start is None else start
        self.seqs.append(seq)
        self.num_new_tokens.append(num_new)
        self.starts.append(start)
        self.samples.append(start + num_new == (len(seq.token_ids) if known is None else known))
        self.num_tokens += num_new

    def recompute_from(self, failed_block_ids: set[int], block_size_tokens: int) -> None:
        """Onboards into `failed_block_ids` failed (an unreadable file): rewind each request
        to its first such block and compute from there in this step instead."""
        for i, seq in enumerate(self.seqs):
            for j in range(seq.num_committed_blocks, len(seq.block_table)):
                if seq.block_table[j].block_id in failed_block_ids:
                    redo = seq.num_computed_tokens - j * block_size_tokens
                    if redo > 0:
                        seq.num_computed_tokens -= redo
                        self.starts[i] -= redo
                        self.num_new_tokens[i] += redo
                        self.num_tokens += redo
                    if seq.num_generated == 0 and seq.cached_tokens is not None:
                        seq.cached_tokens = min(seq.cached_tokens, j * block_size_tokens)
                    break


class Scheduler:
    def __init__(
        self, pool: BlockPool, max_num_seqs: int, max_num_batched_tokens: int, kvbm: TieredCache | None = None
    ) -> None:
        self.pool = pool
        self.kvbm = kvbm  # lower KV tiers: prompt blocks found there are onboarded, not recomputed
        self.block_size = pool.block_size_tokens
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # oldest admission first
        self.loading: list[Sequence] = []  # held back while their disk blocks are read
        self._reads: dict[Sequence, DiskReads] = {}  # of those, and of requeued ones done reading
        self.num_preemptions = 0
        # The overlap loop's step in flight: per request, its tokens being computed and whether
        # it yields a token (not yet in token_ids). schedule() plans past them.
        self._inflight: dict[Sequence, tuple[int, bool]] = {}

    # ------------------------------------------------------------------------------ queries

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting) + len(self.loading)

    @property
    def num_loading(self) -> int:
        return len(self.loading)

    def has_work(self) -> bool:
        """Something schedule() can run now (requests still loading do not count until done)."""
        return bool(self.running or self.waiting or any(self._reads[s].done for s in self.loading))

    def only_loading(self) -> bool:
        """Every request left is held back for disk reads: nothing runs until one is done."""
        return bool(self.loading) and not self.waiting and not self.running

    def waiting_prefill_tokens(self) -> int:
        """Prompt (or recompute) tokens not yet computed, of waiting and prefilling requests."""
        pending = sum(len(s.token_ids) for s in self.waiting) + sum(len(s.token_ids) for s in self.loading)
        for seq in self.running:
            if seq.num_computed_tokens < len(seq.token_ids) - 1:
                pending += len(seq.token_ids) - seq.num_computed_tokens
        return pending

    # --------------------------------------------------------------------------- lifecycle

    def add(self, seq: Sequence) -> None:
        assert seq.status is SeqStatus.WAITING, "a new request"
        self.waiting.append(seq)

    def add_prefilled(
        self, seq: Sequence, blocks: list[Block], num_cached_blocks: int, first: EngineOutput
    ) -> FinishReason | None:
        """Run a request whose prompt KV was computed elsewhere into `blocks` (disaggregated
        prefill), with its first token: register its full blocks and let it decode. Returns
        the finish reason if that token was its last (the caller then aborts it)."""
        reason = seq.adopt_prefilled(blocks, num_cached_blocks, first)
        self._commit_full_blocks(seq)
        self.running.append(seq)
        return reason

    def abort(self, seq: Sequence) -> None:
        """Drop a request wherever it is and free its blocks now. Safe while a step that
        includes it is computing: that step only writes slots past its committed blocks, and
        no block is handed out again before the next schedule()."""
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SeqStatus.WAITING:
            if seq in self._reads:
                self._close_reads(seq)
            if seq in self.loading:
                self.loading.remove(seq)
            else:
                self.waiting.remove(seq)
        else:
            return
        self.pool.release(seq.take_blocks())
        seq.finish()

    # ---------------------------------------------------------------------------- one step

    def schedule(self) -> ScheduledBatch:
        """Pick this step's work and allocate its blocks. With a step in flight (set_inflight),
        plan past it: a request it computes continues from where it leaves it, and one whose
        in-flight token is its last (max_tokens or length, known now) is left out."""
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        self._requeue_loaded()
        running = self.running
        inflight = self._inflight
        preempted = False
        i = 0
        while i < len(running) and budget > 0:
            seq = running[i]
            ahead, pending_token = inflight.get(seq, (0, False)) if inflight else (0, False)
            known = len(seq.token_ids) + pending_token
            if pending_token and (
                seq.num_generated + 1 >= seq.max_new_tokens or known >= seq.max_len
            ):
                i += 1
                continue  # finishes with the step in flight
            start = seq.num_computed_tokens + ahead
            num_new = min(known - start, budget)
            preemptions = self.num_preemptions
            fits = self._grow(seq, start + num_new)
            preempted = preempted or self.num_preemptions != preemptions
            if not fits:
                break  # it was the newest and preempted itself: nothing after it runs
            batch.add(seq, num_new, start, known)
            budget -= num_new
            i += 1
        # Like vLLM: admitting work in a step that had to preempt would only thrash.
        if not preempted:
            self._admit(batch, budget)
        if self.kvbm is not None and batch.seqs:
            self.kvbm.step_started(batch)  # step times price recomputing against onboarding
        return batch

    def set_inflight(self, batch: ScheduledBatch | None) -> None:
        """The overlap loop launched `batch` (None: nothing is in flight): the next schedule()
        plans past it. Its result still goes to finish_step, after that schedule()."""
        self._inflight = {} if batch is None else {
            seq: (num_new, samples) for seq, num_new, samples in zip(batch.seqs, batch.num_new_tokens, batch.samples)
        }

    def finish_step(self, batch: ScheduledBatch, result: StepResult) -> None:
        """Apply a computed step: commit newly full blocks, append each sampled token (one per
        sampling row, in batch order) and send it."""
        if self.kvbm is not None:
            self.kvbm.step_finished(batch, batch.num_tokens)
        token_ids, logprobs = result.token_ids, result.logprobs
        top_logprobs, prompt_logprobs = result.top_logprobs, result.prompt_logprobs
        row = -1
        any_finished = False
        for seq, num_new, samples in zip(batch.seqs, batch.num_new_tokens, batch.samples):
            if samples:
                row += 1
            if seq.status is not SeqStatus.RUNNING:
                continue  # aborted while the step ran
            seq.num_computed_tokens += num_new
            self._commit_full_blocks(seq)
            if not samples:
                continue  # a prefill chunk: no token yet
            token = token_ids[row]
            reason = seq.append_token(token)
            if reason is not None:
                if not seq.hold_blocks:  # held ones are released by whoever exports their KV
                    self.pool.release(seq.take_blocks())
                seq.finish()
                any_finished = True
            first = seq.num_generated == 1
            cached = seq.cached_tokens if first else None
            out = EngineOutput([token], reason, cached)
            sampling = seq.sampling
            if logprobs is not None and (sampling.logprobs or sampling.top_logprobs):
                out.logprobs = [logprobs[row]]
                top = top_logprobs[row] if top_logprobs is not None else None
                if top is not None and sampling.top_logprobs:
                    out.top_logprobs = [top]
            if first and prompt_logprobs is not None:
                out.prompt_logprobs = prompt_logprobs[row]
            seq.on_output(out)
        if any_finished:
            self.running = [s for s in self.running if s.status is SeqStatus.RUNNING]

    # ----------------------------------------------------------------------------- helpers

    def _grow(self, seq: Sequence, num_tokens: int) -> bool:
        """Give a running request blocks for its first `num_tokens` tokens, preempting the
        newest running requests until they fit. False if `seq` itself had to be preempted."""
        need = -(-num_tokens // self.block_size) - len(seq.block_table)
        if need <= 0:
            return True
        while True:
            blocks = self.pool.allocate(need)
            if blocks is not None:
                seq.add_blocks(blocks)
                return True
            victim = self.running.pop()
            self._preempt(victim)
            if victim is seq:
                return False

    def _admit(self, batch: ScheduledBatch, budget: int) -> None:
        """Admit waiting requests in FIFO order while seats, budget and blocks last."""
        pool = self.pool
        bs = self.block_size
        kvbm = self.kvbm
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            total = len(seq.token_ids)
            # At least one token must be computed to produce the next token's logits.
            usable = (total - 1) // bs
            if seq.needs_prompt_logits:
                usable = 0  # every prompt position's logits are wanted: compute them all
            prefix = seq.hashes_upto(usable, bs)[:usable]
            matched = pool.match_prefix(prefix)
            lower = []
            if kvbm is not None:
                reads = self._reads.get(seq)
                if reads is not None:  # read already: onboard what was read, recompute the rest
                    lower = kvbm.lookup_staged(prefix, len(matched), reads)
                else:
                    lower = kvbm.lookup(prefix, len(matched))
                    reads = kvbm.start_reads(lower)
                    if reads is not None:  # on disk: hold it back, let the next ones in
                        self.waiting.popleft()
                        self.loading.append(seq)
                        self._reads[seq] = reads
                        continue
            computed = (len(matched) + len(lower)) * bs
            num_new = min(total - computed, budget)
            need = -(-(computed + num_new) // bs) - len(matched)
            # Matched blocks that are free count as free until acquired: leave them out.
            if pool.num_free_blocks - sum(1 for b in matched if b.ref_count == 0) < need:
                if kvbm is not None and lower:
                    kvbm.release(lower)
                break  # head-of-line blocking keeps admission FIFO
            self.waiting.popleft()
            pool.acquire(matched)
            blocks = pool.allocate(need)
            assert blocks is not None
            if kvbm is not None:
                # The first fresh blocks receive the lower-tier hits before this step's
                # forward pass; they are committed with the computed ones after it.
                kvbm.onboard(prefix, len(matched), lower, [b.block_id for b in blocks[: len(lower)]])
                if seq in self._reads:
                    self._close_reads(seq)
            seq.admit(matched + blocks, len(matched), computed)
            self.running.append(seq)
            batch.add(seq, num_new)
            budget -= num_new

    def _requeue_loaded(self) -> None:
        """Requests whose disk reads are done go back to the front of the queue, in order."""
        if not self.loading:
            return
        # `done` may turn true on reader threads: read it once per request.
        done = [s for s in self.loading if self._reads[s].done]
        if done:
            moved = set(done)
            self.loading = [s for s in self.loading if s not in moved]
            self.waiting.extendleft(reversed(done))

    def _close_reads(self, seq: Sequence) -> None:
        reads = self._reads.pop(seq)
        assert self.kvbm is not None
        self.kvbm.close_reads(reads)

    def _commit_full_blocks(self, seq: Sequence) -> None:
        start = seq.num_committed_blocks
        end = seq.num_computed_tokens // self.block_size
        if end <= start:
            return
        hashes = seq.hashes_upto(end, self.block_size)
        mine = seq.block_table[start:end]
        used = self.pool.commit_many(mine, hashes[start:end], hashes[start - 1] if start else None)
        for offset, (block, shared) in enumerate(zip(mine, used)):
            if shared is not block:
                # Another request cached this block first (same tokens, same KV): share it.
                self.pool.acquire([shared])
                self.pool.release([block])
                seq.replace_block(start + offset, shared)
        seq.num_committed_blocks = end

    def _preempt(self, seq: Sequence) -> None:
        """Recompute preemption: free everything, requeue at the front. A step in flight that
        computes it still writes its old blocks: only steps queued after it reuse them."""
        self._inflight.pop(seq, None)
        self.pool.release(seq.preempt())
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
