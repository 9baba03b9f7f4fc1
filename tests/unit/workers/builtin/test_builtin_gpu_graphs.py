"""cuda_graphs.py, prefill_graphs.py and the decode metadata builders in attention.py, on CPU:
bucket choice, the padding a graph bucket gets (slot -1, length 0; for prefill, sequences with
no tokens), block tables cut to the blocks in use."""

from __future__ import annotations

import pytest
import torch

from workers.builtin.attention import SeqSlice, TritonPagedAttention, decode_slots_and_tables
from workers.builtin.cuda_graphs import DecodeInputs, bucket_for, capture_sizes
from workers.builtin.prefill_graphs import PrefillInputs, token_buckets

CPU = torch.device("cpu")


def test_capture_sizes_cover_every_batch_up_to_the_cap() -> None:
    assert capture_sizes(256) == [1, 2, 4, 8, *range(16, 257, 16)]
    assert capture_sizes(40) == [1, 2, 4, 8, 16, 32, 40]
    assert capture_sizes(3) == [1, 2, 3]
    assert capture_sizes(1000)[-1] == 256
    for cap in (1, 3, 40, 256):
        sizes = capture_sizes(cap)
        for n in range(1, cap + 1):
            b = bucket_for(n, sizes)
            assert b is not None and b >= n
            assert b == min(s for s in sizes if s >= n)
        assert bucket_for(cap + 1, sizes) is None


def test_decode_slots_and_tables() -> None:
    seqs = [SeqSlice(0, 1, [7, 3]), SeqSlice(4, 1, [5, 9, 2]), SeqSlice(9, 1, [1, 6, 8, 4])]
    positions, slots, lens, tables = decode_slots_and_tables(seqs, 4)
    assert positions == [0, 4, 9]
    assert slots == [7 * 4, 9 * 4, 8 * 4 + 1]
    assert lens == [1, 5, 10]
    assert tables == [[7], [5, 9], [1, 6, 8]]


def test_decode_inputs_pad_rows_to_the_bucket() -> None:
    inputs = DecodeInputs(max_batch=8, max_blocks_per_seq=4, device=CPU)
    # A previous, larger step leaves stale rows behind: padding must overwrite them.
    inputs.fill([1] * 6, [SeqSlice(3, 1, [2]) for _ in range(6)], 8, 4)
    seqs = [SeqSlice(5, 1, [3, 6]), SeqSlice(0, 1, [9])]
    inputs.fill([11, 12], seqs, 4, 4)
    assert inputs.input_ids[:4].tolist() == [11, 12, 0, 0]
    assert inputs.positions[:4].tolist() == [5, 0, 0, 0]
    assert inputs.slot_mapping[:4].tolist() == [6 * 4 + 1, 9 * 4, -1, -1]
    assert inputs.seq_lens[:4].tolist() == [6, 1, 0, 0]
    assert inputs.block_tables[0, :2].tolist() == [3, 6] and inputs.block_tables[1, 0] == 9
    meta = inputs.metadata(4, 4)
    assert meta.num_seqs == 4 and meta.max_q == 1 and meta.seq_lens is not None
    assert meta.block_tables.shape == (4, 4) and meta.max_kv == 16
    with pytest.raises(ValueError, match="needs 5 blocks"):
        inputs.fill([1], [SeqSlice(16, 1, [0, 1, 2, 3, 4])], 1, 4)


def test_triton_backend_metadata_for_decode_and_mixed_steps() -> None:
    backend = TritonPagedAttention()
    meta = backend.build_metadata([SeqSlice(5, 1, [3, 6, 8]), SeqSlice(0, 1, [9])], 4, CPU)
    assert meta.seq_lens is not None and meta.seq_lens.tolist() == [6, 1]
    assert meta.block_tables.dtype == torch.int32 and meta.block_tables.tolist() == [[3, 6], [9, 0]]
    assert meta.slot_mapping.tolist() == [25, 36]
    assert meta.query_starts is None  # the decode kernel's step
    mixed = backend.build_metadata([SeqSlice(5, 1, [3, 6]), SeqSlice(0, 3, [9]), SeqSlice(4, 2, [2, 7, 1])], 4, CPU)
    assert mixed.max_q == 3 and mixed.query_starts is not None  # the varlen prefill kernel's
    assert mixed.query_starts.dtype == torch.int32 and mixed.query_starts.tolist() == [0, 1, 4, 6]
    assert mixed.seq_lens is not None and mixed.seq_lens.tolist() == [6, 3, 6]
    assert mixed.block_tables.tolist() == [[3, 6], [9, 0], [2, 7]]
    assert mixed.slot_mapping.tolist() == [25, 36, 37, 38, 28, 29]


def test_prefill_inputs_pad_tokens_and_sequences() -> None:
    assert token_buckets(2048) == [64, 128, 256, 512, 1024, 2048]
    assert token_buckets(100) == [64, 100] and token_buckets(50) == [50]
    inputs = PrefillInputs(max_tokens=16, max_seqs=4, max_blocks_per_seq=4, device=CPU)
    # A larger step first: its rows must not survive as anything but padding.
    inputs.fill(list(range(12)), list(range(12)), [SeqSlice(0, 12, [0, 1, 2])], [11], 16, 4)
    seqs = [SeqSlice(4, 3, [5, 6]), SeqSlice(0, 1, [9])]  # a chunk after 4 cached tokens, a one-token prompt
    inputs.fill([7, 8, 9, 3], [4, 5, 6, 0], seqs, [2, 3], 8, 4)
    assert inputs.input_ids[:8].tolist() == [7, 8, 9, 3, 0, 0, 0, 0]
    assert inputs.positions[:8].tolist() == [4, 5, 6, 0, 0, 0, 0, 0]
    assert inputs.slot_mapping[:8].tolist() == [6 * 4 + 0, 6 * 4 + 1, 6 * 4 + 2, 9 * 4, -1, -1, -1, -1]
    # Padded sequences own no tokens (their starts at the step's end) and have length 0.
    assert inputs.query_starts.tolist() == [0, 3, 4, 4, 4]
    assert inputs.seq_lens.tolist() == [7, 1, 0, 0]
    assert inputs.sample_rows.tolist() == [2, 3, 0, 0]
    assert inputs.block_tables[0, :2].tolist() == [5, 6] and inputs.block_tables[1, 0] == 9
    with pytest.raises(ValueError, match="needs 5 blocks"):
        inputs.fill([1], [16], [SeqSlice(16, 1, [0, 1, 2, 3, 4])], [0], 1, 4)


def test_host_mirrors_stay_on_the_host_under_a_device_context() -> None:
    """The graphs' pinned mirrors name the CPU: under a torch.device("cuda") context (as the GPU
    tests run) a bare torch.zeros(pin_memory=True) went to the GPU and failed; "meta" stands in."""
    with torch.device("meta"):
        decode = DecodeInputs(4, 8, torch.device("cpu"))
        prefill = PrefillInputs(64, 4, 8, torch.device("cpu"))
    for host in (*decode._host, *prefill._host):
        assert all(t.device.type == "cpu" for t in host)
