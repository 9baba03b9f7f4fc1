"""The direct block-copy kernel (`BlockCopier`) on CUDA, or without a GPU in Triton's CPU
interpreter (tests/triton_interpreter.py): every target block gets
its source block bit for bit, no other byte changes, for several dtypes, piece sizes that do
and do not fill a tile, and the pull direction."""

from __future__ import annotations


import pytest
import torch

from tests.triton_interpreter import use_interpreter_unless_cuda

CUDA = use_interpreter_unless_cuda()

from kvbm.transfer.torch_ops import BlockCopier, copy_blocks  # noqa: E402

DEV = "cuda" if CUDA else "cpu"
POISON = {torch.float32: float("nan"), torch.bfloat16: float("nan"), torch.float16: float("nan"), torch.uint8: 255}


def cache(blocks: int, shape: tuple[int, int, int], dtype: torch.dtype, layers: int, seed: int, device: str = DEV
          ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)

    def one() -> torch.Tensor:
        if dtype == torch.uint8:
            return torch.randint(0, 255, (blocks, *shape), generator=g, dtype=dtype).to(device)
        return torch.randn((blocks, *shape), generator=g).to(dtype).to(device)

    return [one() for _ in range(layers)], [one() for _ in range(layers)]


def poisoned(blocks: int, shape: tuple[int, int, int], dtype: torch.dtype, layers: int
             ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    def one() -> torch.Tensor:
        return torch.full((blocks, *shape), POISON[dtype], dtype=dtype, device=DEV)

    return [one() for _ in range(layers)], [one() for _ in range(layers)]


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise, so NaN poison compares equal to itself."""
    return torch.equal(a.cpu().view(torch.uint8), b.cpu().view(torch.uint8))


@pytest.mark.parametrize(
    "dtype,shape,block_words",
    [(torch.bfloat16, (4, 2, 8), 16),  # 128-byte pieces, two tiles each
     (torch.float32, (4, 3, 8), 64),  # 384 bytes = 96 words: the last tile is masked
     (torch.float16, (1, 1, 3), 2048),  # 6-byte pieces: 2-byte words, no vectors
     (torch.uint8, (2, 1, 5), 2048)],  # 10-byte pieces: 2-byte words
)
def test_copier_moves_exactly_the_chosen_blocks(dtype: torch.dtype, shape: tuple[int, int, int], block_words: int) -> None:
    layers = 3
    sk, sv = cache(10, shape, dtype, layers, seed=1)
    dk, dv = poisoned(12, shape, dtype, layers)
    copier = BlockCopier(sk, sv, dk, dv, block_words=block_words)
    src_ids, dst_ids = [3, 0, 7, 9, 4], [11, 1, 2, 5, 6]
    copier.copy(src_ids, dst_ids)
    copier.synchronize()
    untouched = [b for b in range(12) if b not in dst_ids]
    for s_t, d_t in zip(sk + sv, dk + dv):
        for s, d in zip(src_ids, dst_ids):
            assert same(d_t[d], s_t[s])
        assert same(d_t[untouched], torch.full_like(d_t[untouched], POISON[dtype]))


def test_copier_pulls_from_the_target_side_and_copy_blocks_uses_it() -> None:
    shape = (4, 2, 8)
    sk, sv = cache(8, shape, torch.bfloat16, 2, seed=2)
    dk, dv = poisoned(8, shape, torch.bfloat16, 2)
    pull = BlockCopier(sk, sv, dk, dv, launch_device=dk[0].device)
    pull.copy([1, 2], [6, 7])
    pull.synchronize()
    copy_blocks(sk, sv, [5], dk, dv, [0])  # builds its own copier on this device
    for s_t, d_t in zip(sk + sv, dk + dv):
        assert same(d_t[[6, 7, 0]], s_t[[1, 2, 5]])


def test_copier_refuses_mismatched_or_strided_caches() -> None:
    sk, sv = cache(4, (4, 2, 8), torch.bfloat16, 2, seed=3)
    dk, dv = cache(4, (4, 2, 4), torch.bfloat16, 2, seed=4)
    assert "layout" in BlockCopier.reason_unsupported(sk, sv, dk, dv)
    strided = [t.transpose(1, 2) for t in sk]
    assert BlockCopier.reason_unsupported(strided, strided, strided, strided)
    with pytest.raises(ValueError):
        BlockCopier(sk, sv, dk, dv)
