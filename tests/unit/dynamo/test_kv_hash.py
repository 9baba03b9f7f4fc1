from hypothesis import given
from hypothesis import strategies as st

from dynamo.kv_hash import block_hash, block_hashes


def test_only_full_blocks_are_hashed() -> None:
    assert len(block_hashes(list(range(35)), 16)) == 2
    assert block_hashes(list(range(15)), 16) == []


def test_hash_chains_on_the_parent() -> None:
    a = block_hashes([1] * 16 + [2] * 16, 16)
    b = block_hashes([9] * 16 + [2] * 16, 16)
    # Same second block, different first block: different chained hashes.
    assert a[1] != b[1]
    assert a[1] == block_hash(a[0], [2] * 16)


@given(st.lists(st.integers(0, 2**31 - 1), min_size=0, max_size=200), st.integers(1, 64))
def test_prefix_property(tokens: list[int], block_size: int) -> None:
    """Equal prefixes give equal leading hashes; extending a sequence never changes them."""
    full = block_hashes(tokens, block_size)
    extended = block_hashes(tokens + [7] * block_size, block_size)
    assert extended[: len(full)] == full
    assert all(0 <= h < 2**63 for h in full)


def test_resuming_from_a_parent_matches_hashing_from_scratch() -> None:
    tokens = list(range(64))
    whole = block_hashes(tokens, 16)
    tail = block_hashes(tokens[32:], 16, parent_hash=whole[1])
    assert whole[2:] == tail


def test_the_hash_function_does_not_change() -> None:
    """Disk tiers name files by these hashes and keep them across restarts and versions, and
    every engine and router must agree: a change here orphans every stored block."""
    assert block_hashes(list(range(1, 49)), 16) == [4729161880988324193, 3832305558402178651, 2984023415838628529]
    assert block_hashes([7, 70000, 4294967295] * 6, 4, parent_hash=123456789) == [
        6593707154194689781, 1351062215589763704, 3953143571260791013, 4397380868968944551,
    ]
    assert block_hash(None, list(range(1, 17))) == 4729161880988324193
