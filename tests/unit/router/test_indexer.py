"""KvIndex: prefix matching, event ordering (duplicates, gaps, restarts), removal, and a
property test against a brute-force reference."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from dynamo.kv_hash import block_hashes
from dynamo.wire import AllBlocksCleared, BlockRemoved, BlockStored, KvCacheEvent, KvEventData
from router.indexer import EventOutcome, KvIndex


class BruteForceIndex:
    """The obvious definition: per worker a set of blocks; a match counts leading blocks."""

    def __init__(self) -> None:
        self.blocks: dict[int, set[int]] = {}

    def apply(self, worker: int, data: KvEventData) -> None:
        blocks = self.blocks.setdefault(worker, set())
        if isinstance(data, BlockStored):
            blocks.update(data.block_hashes)
        elif isinstance(data, BlockRemoved):
            blocks.difference_update(data.block_hashes)
        else:
            blocks.clear()

    def remove_worker(self, worker: int) -> None:
        self.blocks.pop(worker, None)

    def find_matches(self, hashes: list[int]) -> dict[int, int]:
        out: dict[int, int] = {}
        for worker, blocks in self.blocks.items():
            depth = 0
            for h in hashes:
                if h not in blocks:
                    break
                depth += 1
            if depth:
                out[worker] = depth
        return out


def chain(tokens: list[int], block_size: int = 4) -> list[int]:
    return block_hashes(tokens, block_size)


def event(worker: int, event_id: int, data: KvEventData) -> KvCacheEvent:
    return KvCacheEvent(worker_id=worker, event_id=event_id, data=data)


PROMPT = list(range(32))  # 8 blocks of 4 tokens
HASHES = chain(PROMPT)


def test_counts_leading_blocks_per_worker() -> None:
    index = KvIndex()
    index.apply_event(event(1, 0, BlockStored(HASHES[:8])))
    index.apply_event(event(2, 0, BlockStored(HASHES[:3])))
    index.apply_event(event(3, 0, BlockStored(HASHES[2:6])))  # no first block: no match
    assert index.find_matches(HASHES) == {1: 8, 2: 3}
    assert index.find_matches(HASHES[:2]) == {1: 2, 2: 2}
    assert index.find_matches([]) == {}
    assert index.find_matches(chain([9] * 8)) == {}


def test_stops_at_a_workers_first_miss() -> None:
    index = KvIndex()
    index.apply_event(event(1, 0, BlockStored(HASHES)))
    index.apply_event(event(1, 1, BlockRemoved([HASHES[4]])))
    index.apply_event(event(2, 0, BlockStored(HASHES[:2] + HASHES[3:])))
    assert index.find_matches(HASHES) == {1: 4, 2: 2}


def test_removed_and_cleared_blocks_stop_matching() -> None:
    index = KvIndex()
    index.apply_event(event(1, 0, BlockStored(HASHES)))
    index.apply_event(event(2, 0, BlockStored(HASHES)))
    assert index.apply_event(event(1, 1, AllBlocksCleared())) is EventOutcome.APPLIED
    assert index.find_matches(HASHES) == {2: 8}
    assert index.num_blocks() == 8
    index.remove_worker(2)
    assert index.find_matches(HASHES) == {}
    assert index.num_blocks() == 0
    assert index.num_entries() == 0
    assert index.last_event_id(2) is None


def test_other_tiers_do_not_count_but_advance_the_sequence() -> None:
    index = KvIndex()
    index.apply_event(event(1, 0, BlockStored(HASHES, tier="host")))
    assert index.find_matches(HASHES) == {}
    assert index.apply_event(event(1, 1, BlockStored(HASHES))) is EventOutcome.APPLIED
    assert index.find_matches(HASHES) == {1: 8}


def test_duplicate_and_old_events_are_ignored() -> None:
    index = KvIndex()
    assert index.apply_event(event(1, 0, BlockStored(HASHES[:2]))) is EventOutcome.APPLIED
    assert index.apply_event(event(1, 1, BlockStored(HASHES[2:4]))) is EventOutcome.APPLIED
    assert index.apply_event(event(1, 2, BlockRemoved(HASHES[:4]))) is EventOutcome.APPLIED
    # A late re-delivery of event 1 must not resurrect removed blocks.
    assert index.apply_event(event(1, 1, BlockStored(HASHES[2:4]))) is EventOutcome.STALE
    assert index.find_matches(HASHES) == {}
    assert index.last_event_id(1) == 2


def test_a_gap_is_applied_and_marks_the_worker_until_a_clear() -> None:
    index = KvIndex()
    index.apply_event(event(1, 0, BlockStored(HASHES[:2])))
    assert index.apply_event(event(1, 5, BlockStored(HASHES[2:4]))) is EventOutcome.GAP
    assert index.needs_resync(1)
    assert index.find_matches(HASHES) == {1: 4}
    # The snapshot the router asks for starts with a clear: state is exact again after it.
    assert index.apply_event(event(1, 6, AllBlocksCleared())) is EventOutcome.APPLIED
    assert not index.needs_resync(1)
    assert index.apply_event(event(1, 7, BlockStored(HASHES[:3]))) is EventOutcome.APPLIED
    assert index.find_matches(HASHES) == {1: 3}


def test_first_event_past_zero_is_a_gap() -> None:
    index = KvIndex()
    assert index.apply_event(event(7, 12, BlockStored(HASHES[:1]))) is EventOutcome.GAP
    assert index.needs_resync(7)


def test_first_event_being_a_clear_needs_no_resync() -> None:
    index = KvIndex()
    assert index.apply_event(event(7, 12, AllBlocksCleared())) is EventOutcome.APPLIED
    assert not index.needs_resync(7)


def test_restarted_publisher_starts_over() -> None:
    index = KvIndex()
    index.apply_event(event(1, 0, BlockStored(HASHES)))
    index.apply_event(event(1, 1, BlockRemoved(HASHES[6:])))
    assert index.apply_event(event(1, 0, BlockStored(HASHES[:2]))) is EventOutcome.APPLIED
    assert index.find_matches(HASHES) == {1: 2}
    assert index.apply_event(event(1, 1, BlockStored(HASHES[2:3]))) is EventOutcome.APPLIED
    assert index.find_matches(HASHES) == {1: 3}


def test_removing_unknown_blocks_or_workers_is_harmless() -> None:
    index = KvIndex()
    index.apply_event(event(1, 0, BlockRemoved(HASHES)))
    index.remove_worker(42)
    index.clear_worker(42)
    index.apply_event(event(1, 1, BlockStored(HASHES[:1])))
    assert index.find_matches(HASHES) == {1: 1}


def test_removal_naming_unheld_and_repeated_blocks_touches_only_held_ones() -> None:
    # remove() intersects with the worker's set first; blocks it never held, or named twice,
    # must not disturb another worker's holders bit or the entry counts.
    index = KvIndex()
    index.apply_event(event(1, 0, BlockStored(HASHES[:3])))
    index.apply_event(event(2, 0, BlockStored(HASHES)))
    removal = [HASHES[2], HASHES[3], HASHES[2], 999_999]
    assert index.apply_event(event(1, 1, BlockRemoved(removal))) is EventOutcome.APPLIED
    assert index.blocks_of(1) == frozenset(HASHES[:2])
    assert index.blocks_of(2) == frozenset(HASHES)
    assert index.find_matches(HASHES) == {1: 2, 2: len(HASHES)}
    assert index.num_entries() == 2 + len(HASHES)
    assert index.num_blocks() == len(HASHES)


# --------------------------------------------------------------------------- property test

# A small universe of prompts sharing prefixes, so matches of every depth occur.
_PROMPTS = [chain([p % 3] * 8 + [p] * 24) for p in range(6)]
_ALL = sorted({h for hashes in _PROMPTS for h in hashes})

_ops = st.lists(
    st.one_of(
        st.tuples(
            st.just("store"), st.integers(0, 3), st.lists(st.sampled_from(_ALL), max_size=10)
        ),
        st.tuples(
            st.just("remove"), st.integers(0, 3), st.lists(st.sampled_from(_ALL), max_size=10)
        ),
        st.tuples(st.just("clear"), st.integers(0, 3), st.just([])),
        st.tuples(st.just("drop"), st.integers(0, 3), st.just([])),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(_ops)
def test_matches_agree_with_brute_force(ops: list[tuple[str, int, list[int]]]) -> None:
    index, reference = KvIndex(), BruteForceIndex()
    next_id: dict[int, int] = {}
    for op, worker, hashes in ops:
        if op == "drop":
            index.remove_worker(worker)
            reference.remove_worker(worker)
            next_id.pop(worker, None)
            continue
        data: KvEventData
        if op == "store":
            data = BlockStored(hashes)
        elif op == "remove":
            data = BlockRemoved(hashes)
        else:
            data = AllBlocksCleared()
        event_id = next_id.get(worker, 0)
        next_id[worker] = event_id + 1
        assert index.apply_event(event(worker, event_id, data)) is EventOutcome.APPLIED
        reference.apply(worker, data)
        for prompt in _PROMPTS:
            assert index.find_matches(prompt) == reference.find_matches(prompt)
    for worker, blocks in reference.blocks.items():
        assert index.blocks_of(worker) == blocks
    assert index.num_entries() == sum(len(b) for b in reference.blocks.values())
    assert index.num_blocks() == len(set().union(*reference.blocks.values()))
