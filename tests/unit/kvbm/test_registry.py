"""TierIndex against a brute-force model (hypothesis): capacity holds under churn, pinned blocks
are never evicted, slots stay distinct, and the victim is the one LRU / segmented LRU picks."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from kvbm.registry import TierIndex

OPS = st.lists(
    st.tuples(st.sampled_from(["insert", "touch", "pin", "unpin", "remove"]), st.integers(0, 11)),
    max_size=200,
)


class BruteTier:
    """Lists in recency order; slru: a protected list capped at `cap`, demoting its oldest."""

    def __init__(self, capacity: int, slru: bool, cap: int) -> None:
        self.capacity, self.slru, self.cap = capacity, slru, cap
        self.probation: list[int] = []
        self.protected: list[int] = []
        self.pins: dict[int, int] = {}

    def contains(self, h: int) -> bool:
        return h in self.probation or h in self.protected

    def insert(self, h: int) -> tuple[bool, list[int]]:
        if self.contains(h) or self.capacity == 0:
            return False, []
        evicted = []
        if len(self.probation) + len(self.protected) >= self.capacity:
            victims = [x for x in self.probation + self.protected if not self.pins.get(x)]
            if not victims:
                return False, []
            v = victims[0]
            (self.probation if v in self.probation else self.protected).remove(v)
            self.pins.pop(v, None)
            evicted.append(v)
        self.probation.append(h)
        return True, evicted

    def touch(self, h: int) -> None:
        if h in self.protected:
            self.protected.remove(h)
            self.protected.append(h)
        elif h in self.probation:
            self.probation.remove(h)
            if self.slru and self.cap > 0:
                self.protected.append(h)
                while len(self.protected) > self.cap:
                    self.probation.append(self.protected.pop(0))
            else:
                self.probation.append(h)


@settings(max_examples=150, deadline=None)
@given(ops=OPS, capacity=st.integers(0, 6), slru=st.booleans())
def test_tier_index_matches_brute_force(ops: list[tuple[str, int]], capacity: int, slru: bool) -> None:
    tier = TierIndex("host", capacity, "slru" if slru else "lru", 0.5)
    brute = BruteTier(capacity, slru, int(capacity * 0.5))
    for op, h in ops:
        if op == "insert":
            entry, evicted = tier.insert(h, None)
            ok, expected = brute.insert(h)
            assert (entry is not None) == ok
            assert [e.block_hash for e in evicted] == expected
        elif op == "touch":
            tier.touch(h)
            brute.touch(h)
        elif op == "pin" and h in tier:
            tier.pin(tier.get(h))  # type: ignore[arg-type]
            brute.pins[h] = brute.pins.get(h, 0) + 1
        elif op == "unpin" and brute.pins.get(h):
            tier.unpin(tier.get(h))  # type: ignore[arg-type]
            brute.pins[h] -= 1
        elif op == "remove" and h in tier and not brute.pins.get(h):
            tier.remove(h)
            (brute.probation if h in brute.probation else brute.protected).remove(h)
        assert len(tier) <= capacity
        assert [e.block_hash for e in tier] == brute.probation + brute.protected
        slots = [e.slot for e in tier]
        assert len(set(slots)) == len(slots) and all(0 <= s < capacity for s in slots)


def test_slru_keeps_reused_blocks_through_a_scan() -> None:
    tier = TierIndex("host", 4, "slru", 0.5)
    for h in (1, 2):
        tier.insert(h, None)
        tier.touch(h)  # re-used: protected
    for h in range(10, 20):  # a burst of blocks seen once
        tier.insert(h, None)
    assert 1 in tier and 2 in tier
    lru = TierIndex("host", 4, "lru")
    for h in (1, 2):
        lru.insert(h, None)
        lru.touch(h)
    for h in range(10, 20):
        lru.insert(h, None)
    assert 1 not in lru and 2 not in lru
