"""BlockPool: unit tests for each operation, and a property-based test that runs random
operation sequences against a brute-force reference model."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from dynamo.wire import AllBlocksCleared, BlockRemoved, BlockStored, KvEventData
from kvbm.block_pool import Block, BlockPool


class EventLog:
    """Replays events into the set of hashes a consumer (the router) believes are cached."""

    def __init__(self) -> None:
        self.events: list[KvEventData] = []
        self.hashes: set[int] = set()

    def __call__(self, event: KvEventData) -> None:
        self.events.append(event)
        apply(self.hashes, event)


def apply(hashes: set[int], event: KvEventData) -> None:
    if isinstance(event, BlockStored):
        hashes.update(event.block_hashes)
    elif isinstance(event, BlockRemoved):
        hashes.difference_update(event.block_hashes)
    else:
        hashes.clear()


def ids(blocks: list[Block] | None) -> list[int] | None:
    return None if blocks is None else [b.block_id for b in blocks]


# ------------------------------------------------------------------------------ unit tests


def test_allocate_takes_fresh_blocks_and_refuses_when_short() -> None:
    pool = BlockPool(4, 16)
    a = pool.allocate(3)
    assert a is not None and all(b.ref_count == 1 and b.block_hash is None for b in a)
    assert pool.num_active_blocks == 3 and pool.num_free_blocks == 1
    assert pool.allocate(2) is None
    assert pool.num_free_blocks == 1  # a refused allocation takes nothing
    assert pool.usage == pytest.approx(0.75)


def test_commit_emits_stored_and_release_keeps_block_cached() -> None:
    log = EventLog()
    pool = BlockPool(4, 16, on_event=log)
    (a, b) = pool.allocate(2) or []
    assert pool.commit(a, 11, None) is a
    assert pool.commit(b, 12, 11) is b
    assert log.events == [BlockStored([11], None), BlockStored([12], 11)]
    pool.release([a, b])
    assert pool.num_active_blocks == 0 and pool.num_cached_blocks == 2
    assert pool.match_prefix([11, 12, 13]) == [a, b]
    assert pool.match_prefix([12]) == [b]
    assert pool.match_prefix([13, 11]) == []


def test_commit_many_emits_one_event_per_run() -> None:
    log = EventLog()
    pool = BlockPool(8, 4, on_event=log)
    first = pool.allocate(3) or []
    pool.commit_many(first, [1, 2, 3], None)
    assert log.events == [BlockStored([1, 2, 3], None)]
    log.events.clear()
    second = pool.allocate(4) or []
    used = pool.commit_many(second, [1, 2, 7, 8], None)
    # 1 and 2 are cached already: reuse them, store only the new run, under its real parent.
    assert used[:2] == first[:2] and used[2:] == second[2:]
    assert second[0].block_hash is None and second[1].block_hash is None
    assert log.events == [BlockStored([7, 8], 2)]


def test_duplicate_commit_returns_existing_block_without_event() -> None:
    log = EventLog()
    pool = BlockPool(4, 16, on_event=log)
    a, dup = pool.allocate(2) or []
    pool.commit(a, 5, None)
    log.events.clear()
    assert pool.commit(dup, 5, None) is a
    assert log.events == [] and dup.block_hash is None
    # The caller swaps: take the shared block, give back its private copy.
    pool.acquire([a])
    pool.release([dup])
    assert a.ref_count == 2 and pool.free_block_ids()[0] == dup.block_id
    assert pool.commit(a, 5, None) is a  # re-committing the same block is a no-op
    with pytest.raises(ValueError):
        pool.commit(a, 6, None)


def test_eviction_is_lru_and_tail_of_a_sequence_goes_first() -> None:
    log = EventLog()
    pool = BlockPool(4, 16, on_event=log)
    seq1 = pool.allocate(2) or []
    pool.commit_many(seq1, [1, 2], None)
    seq2 = pool.allocate(2) or []
    pool.commit_many(seq2, [3, 4], None)
    pool.release(seq1)  # freed first: older
    pool.release(seq2)
    # seq1 before seq2 (LRU); within a sequence its tail block before its head.
    assert [pool.blocks[i].block_hash for i in pool.free_block_ids()] == [2, 1, 4, 3]
    log.events.clear()
    got = pool.allocate(3)
    assert ids(got) == [seq1[1].block_id, seq1[0].block_id, seq2[1].block_id]
    assert log.events == [BlockRemoved([2, 1, 4])]  # one event per allocate call
    assert log.hashes == {3} == pool.cached_hashes()


def test_acquire_takes_a_cached_block_out_of_the_free_queue() -> None:
    pool = BlockPool(3, 16)
    (a,) = pool.allocate(1) or []
    pool.commit(a, 9, None)
    pool.release([a])
    pool.acquire(pool.match_prefix([9]))
    assert a.ref_count == 1 and a.block_id not in pool.free_block_ids()
    assert pool.allocate(3) is None and ids(pool.allocate(2)) is not None
    assert pool.num_cached_blocks == 1  # the acquired block was not evicted


def test_release_of_a_free_block_raises() -> None:
    pool = BlockPool(2, 16)
    blocks = pool.allocate(1) or []
    pool.release(blocks)
    with pytest.raises(ValueError):
        pool.release(blocks)
    with pytest.raises(ValueError):
        pool.commit(blocks[0], 1, None)


def test_reset_clears_cache_and_emits_all_cleared() -> None:
    log = EventLog()
    pool = BlockPool(4, 16, on_event=log)
    held = pool.allocate(2) or []
    pool.commit_many(held, [1, 2], None)
    pool.release(held[1:])
    pool.reset()
    assert isinstance(log.events[-1], AllBlocksCleared)
    assert pool.num_cached_blocks == 0 and log.hashes == set()
    assert held[0].ref_count == 1 and held[0].block_hash is None
    assert pool.match_prefix([1]) == []


def test_snapshot_orders_parents_first_and_groups_chains() -> None:
    pool = BlockPool(8, 4)
    a = pool.allocate(3) or []
    pool.commit_many(a, [1, 2, 3], None)
    b = pool.allocate(2) or []
    pool.commit_many(b, [1, 2], None)  # shared prefix, duplicates
    pool.commit_many(b[1:], [4], 2)  # a branch: 1 -> 2 -> 4 (b[0] left uncommitted)
    events = pool.snapshot()
    assert_parents_first(pool, events)
    replayed: set[int] = set()
    for e in events:
        apply(replayed, e)
    assert replayed == {1, 2, 3, 4}
    assert events[0] == BlockStored([1, 2, 4], None)


def test_constructor_validates() -> None:
    with pytest.raises(ValueError):
        BlockPool(0, 16)
    with pytest.raises(ValueError):
        BlockPool(4, 0)


def assert_parents_first(pool: BlockPool, events: list[KvEventData]) -> None:
    seen: set[int] = set()
    for event in events:
        assert isinstance(event, BlockStored)
        parent = event.parent_hash
        # (a parent inside the same event only happens with colliding test hashes: a cycle)
        assert (parent is None or parent in seen or pool.get_cached(parent) is None
                or parent in event.block_hashes)
        for h in event.block_hashes:
            block = pool.get_cached(h)
            assert block is not None and block.parent_hash == parent
            seen.add(h)
            parent = h


# ------------------------------------------------------------------ property-based test


class ReferenceModel:
    """The pool's contract written the slow, obvious way: lists and linear scans."""

    def __init__(self, num_blocks: int) -> None:
        self.refs = [0] * num_blocks
        self.hashes: list[int | None] = [None] * num_blocks
        self.free: list[int] = list(range(num_blocks))  # head first

    def cached(self) -> dict[int, int]:
        return {h: i for i, h in enumerate(self.hashes) if h is not None}

    def allocate(self, n: int) -> list[int] | None:
        if n > len(self.free):
            return None
        out = [self.free.pop(0) for _ in range(n)]
        for i in out:
            self.refs[i] = 1
            self.hashes[i] = None
        return out

    def match_prefix(self, hashes: list[int]) -> list[int]:
        cached = self.cached()
        out = []
        for h in hashes:
            if h not in cached:
                break
            out.append(cached[h])
        return out

    def acquire(self, blocks: list[int]) -> None:
        for i in blocks:
            if self.refs[i] == 0:
                self.free.remove(i)
            self.refs[i] += 1

    def commit(self, i: int, h: int) -> int | None:
        """The block to use, or None where the pool must raise."""
        if self.refs[i] <= 0 or self.hashes[i] not in (None, h):
            return None
        cached = self.cached()
        if h in cached:
            return cached[h]
        self.hashes[i] = h
        return i

    def release(self, blocks: list[int]) -> None:
        for i in reversed(blocks):
            self.refs[i] -= 1
            if self.refs[i] == 0:
                if self.hashes[i] is None:
                    self.free.insert(0, i)
                else:
                    self.free.append(i)

    def reset(self) -> None:
        self.hashes = [None] * len(self.hashes)


NUM_BLOCKS = 8
HASHES = st.integers(0, 12)


class BlockPoolMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.log = EventLog()
        self.pool = BlockPool(NUM_BLOCKS, 4, on_event=self.log)
        self.model = ReferenceModel(NUM_BLOCKS)
        self.holders: list[list[int]] = []  # each holds one reference on each of its blocks

    def block(self, i: int) -> Block:
        return self.pool.blocks[i]

    @rule(n=st.integers(0, 5))
    def allocate(self, n: int) -> None:
        got = ids(self.pool.allocate(n))
        assert got == self.model.allocate(n)
        if got:
            self.holders.append(got)

    @rule(hashes=st.lists(HASHES, max_size=4))
    def acquire_prefix(self, hashes: list[int]) -> None:
        got = ids(self.pool.match_prefix(hashes))
        assert got == self.model.match_prefix(hashes)
        if got:
            self.pool.acquire([self.block(i) for i in got])
            self.model.acquire(got)
            self.holders.append(got)

    @precondition(lambda self: self.holders)
    @rule(data=st.data(), h=HASHES, parent=st.none() | HASHES, swap=st.booleans())
    def commit(self, data: st.DataObject, h: int, parent: int | None, swap: bool) -> None:
        holder = data.draw(st.sampled_from(self.holders))
        pos = data.draw(st.integers(0, len(holder) - 1))
        i = holder[pos]
        expected = self.model.commit(i, h)
        if expected is None:
            with pytest.raises(ValueError):
                self.pool.commit(self.block(i), h, parent)
            return
        used = self.pool.commit(self.block(i), h, parent).block_id
        assert used == expected
        if used != i and swap:
            self.pool.acquire([self.block(used)])
            self.pool.release([self.block(i)])
            self.model.acquire([used])
            self.model.release([i])
            holder[pos] = used

    @precondition(lambda self: self.holders)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        holder = self.holders.pop(data.draw(st.integers(0, len(self.holders) - 1)))
        self.pool.release([self.block(i) for i in holder])
        self.model.release(holder)

    @rule()
    def reset(self) -> None:
        self.pool.reset()
        self.model.reset()

    @invariant()
    def ref_counts_match_and_are_never_negative(self) -> None:
        refs = [b.ref_count for b in self.pool.blocks]
        assert refs == self.model.refs
        assert min(refs) >= 0
        held = [0] * NUM_BLOCKS
        for holder in self.holders:
            for i in holder:
                held[i] += 1
        assert refs == held  # every reference has exactly one holder

    @invariant()
    def free_plus_active_is_total(self) -> None:
        assert self.pool.num_free_blocks + self.pool.num_active_blocks == NUM_BLOCKS
        assert self.pool.num_free_blocks == sum(1 for r in self.model.refs if r == 0)

    @invariant()
    def free_queue_is_in_lru_order(self) -> None:
        assert self.pool.free_block_ids() == self.model.free

    @invariant()
    def every_cached_hash_maps_to_one_block(self) -> None:
        cached = self.model.cached()
        assert len(cached) == sum(1 for h in self.model.hashes if h is not None)
        assert {h: self.pool.get_cached(h).block_id for h in cached} == cached  # type: ignore[union-attr]
        assert self.pool.cached_hashes() == set(cached)
        for h, i in cached.items():
            assert self.block(i).block_hash == h

    @invariant()
    def events_replay_to_the_cached_set(self) -> None:
        assert self.log.hashes == self.pool.cached_hashes()

    @invariant()
    def snapshot_replays_to_the_cached_set(self) -> None:
        events = self.pool.snapshot()
        assert_parents_first(self.pool, events)
        replayed: set[int] = set()
        for event in events:
            apply(replayed, event)
        assert replayed == self.pool.cached_hashes()


BlockPoolMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)
TestBlockPoolProperties = BlockPoolMachine.TestCase
