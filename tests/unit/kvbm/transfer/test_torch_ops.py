"""torch_ops' index logic and CPU copy paths: runs of consecutive block ids against a
brute-force split, the copy kernel's word/alignment plan, and copy_blocks' run and staged
paths landing every block (and nothing else) on CPU tensors."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

torch = pytest.importorskip("torch")

from kvbm.transfer.torch_ops import _staged_copy, block_runs, copy_blocks, word_plan  # noqa: E402


def brute_runs(src: list[int], dst: list[int]) -> list[tuple[int, int, int]]:
    """Cut wherever either side does not step by exactly one."""
    runs: list[tuple[int, int, int]] = []
    for i in range(len(src)):
        if i and src[i] == src[i - 1] + 1 and dst[i] == dst[i - 1] + 1:
            s, d, n = runs[-1]
            runs[-1] = (s, d, n + 1)
        else:
            runs.append((src[i], dst[i], 1))
    return runs


pairs = st.lists(st.tuples(st.integers(0, 40), st.integers(0, 40)), max_size=60)


@given(pairs)
def test_block_runs_matches_brute_force_and_covers_every_pair(p: list[tuple[int, int]]) -> None:
    src, dst = [a for a, _ in p], [b for _, b in p]
    runs = block_runs(src, dst)
    assert runs == brute_runs(src, dst)
    expanded = [(s + i, d + i) for s, d, n in runs for i in range(n)]
    assert expanded == list(zip(src, dst))


def test_block_runs_coalesces_consecutive_ids() -> None:
    assert block_runs([4, 5, 6, 9, 10], [0, 1, 2, 3, 7]) == [(4, 0, 3), (9, 3, 1), (10, 7, 1)]
    assert block_runs([], []) == []
    with pytest.raises(ValueError):
        block_runs([1], [])


def test_word_plan_picks_widest_word_and_16_byte_vectors() -> None:
    base = 1 << 20
    plan = word_plan(base, [base, base + 4096, base - 512], [base + 8192, base + (1 << 30)], 32768)
    assert (plan.word_bytes, plan.align_words) == (4, 4)
    assert plan.src_offsets == (0, 1024, -128)
    assert plan.dst_offsets == (2048, (1 << 30) // 4)


def test_word_plan_falls_back_to_narrow_words_when_sizes_or_pointers_do() -> None:
    # 6-byte pieces (odd bf16 count): 2-byte words, no vectors wider than one word.
    plan = word_plan(1024, [1024, 1030], [2048], 6)
    assert (plan.word_bytes, plan.align_words) == (2, 1)
    assert plan.src_offsets == (0, 3)
    # 4-byte words but a tensor only 8-byte aligned: vectors of two words.
    plan = word_plan(1024, [1024, 1032], [4096], 64)
    assert (plan.word_bytes, plan.align_words) == (4, 2)


def cache(seed: int, blocks: int, layers: int = 3) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    k = [torch.randn(blocks, 4, 2, 8, generator=g) for _ in range(layers)]
    v = [torch.randn(blocks, 4, 2, 8, generator=g) for _ in range(layers)]
    return k, v


@pytest.mark.parametrize(
    "src_ids,dst_ids",
    [([0, 1, 2, 3, 4, 5], [8, 9, 10, 11, 12, 13]),  # one run: slice copies
     ([7, 0, 3, 12], [1, 15, 2, 9]),  # scattered: gather / copy / scatter
     ([2, 3, 9, 10, 11], [5, 6, 0, 1, 2])],
)
def test_copy_blocks_on_cpu_lands_every_block_and_nothing_else(src_ids: list[int], dst_ids: list[int]) -> None:
    sk, sv = cache(1, 16)
    dk, dv = cache(2, 16)
    before_k, before_v = [t.clone() for t in dk], [t.clone() for t in dv]
    copy_blocks(sk, sv, src_ids, dk, dv, dst_ids)
    untouched = [b for b in range(16) if b not in dst_ids]
    for layer in range(3):
        assert torch.equal(dk[layer][dst_ids], sk[layer][src_ids])
        assert torch.equal(dv[layer][dst_ids], sv[layer][src_ids])
        assert torch.equal(dk[layer][untouched], before_k[layer][untouched])
        assert torch.equal(dv[layer][untouched], before_v[layer][untouched])


def test_staged_copy_matches_run_copy() -> None:
    sk, sv = cache(3, 12)
    a_k, a_v = cache(4, 12)
    b_k, b_v = [t.clone() for t in a_k], [t.clone() for t in a_v]
    ids_s, ids_d = [0, 1, 2, 3], [6, 7, 8, 9]
    copy_blocks(sk, sv, ids_s, a_k, a_v, ids_d)
    _staged_copy(sk, sv, ids_s, b_k, b_v, ids_d)
    assert all(torch.equal(x, y) for x, y in zip(a_k + a_v, b_k + b_v))


def test_copy_blocks_rejects_unequal_id_lists() -> None:
    sk, sv = cache(5, 4)
    with pytest.raises(ValueError):
        copy_blocks(sk, sv, [0, 1], sk, sv, [2])
