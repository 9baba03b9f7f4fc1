"""DiskStore: blocks round-trip through files with a layout header, reads see queued writes,
a scan finds only this layout's whole files, and stop() drains the queue."""

from __future__ import annotations

from pathlib import Path

import torch

from kvbm.disk_tier import DiskStore
from kvbm.layout import KvLayout

LAYOUT = KvLayout(num_layers=2, block_size_tokens=4, num_kv_heads=2, head_dim=8, dtype="float32")


def block(seed: int) -> torch.Tensor:
    return torch.randn((4, LAYOUT.elements_per_layer), generator=torch.Generator().manual_seed(seed))


def test_round_trip_scan_and_delete(tmp_path: Path) -> None:
    store = DiskStore(tmp_path, LAYOUT, queue_blocks=4)
    store.start()
    a, b = block(1), block(2)
    store.write(0x11, None, a)
    store.write(0x22, 0x11, b)
    out = torch.empty_like(a)
    assert store.read(0x22, out) and torch.equal(out, b)  # queued or written: either way
    store.stop()
    assert store.backlog() == 0
    other = KvLayout(num_layers=3, block_size_tokens=4, num_kv_heads=2, head_dim=8, dtype="float32")
    (tmp_path / other.fingerprint).mkdir()
    (tmp_path / LAYOUT.fingerprint / "junk.kvb").write_bytes(b"not a block")
    again = DiskStore(tmp_path, LAYOUT)
    assert sorted(again.scan()) == [(0x11, None), (0x22, 0x11)]
    assert DiskStore(tmp_path, other).scan() == []
    assert again.read(0x11, out) and torch.equal(out, a)
    again.start()
    again.delete(0x11)
    again.stop()
    assert not again.read(0x11, out)
    assert again.scan() == [(0x22, 0x11)]


def test_layout_header_rejects_other_layouts() -> None:
    header = LAYOUT.header(5, None)
    assert LAYOUT.parse_header(header) == (5, None)
    assert KvLayout(2, 4, 2, 8, "bfloat16").parse_header(header) is None


def test_full_write_queue_drops_the_write_without_blocking(tmp_path: Path) -> None:
    store = DiskStore(tmp_path, LAYOUT, queue_blocks=1)  # not started: nothing drains the queue
    results = [store.write(i, None, block(i)) for i in range(1, 6)]
    assert results[:3] == [True] * 3 and results[3:] == [False, False]
    assert store.dropped_writes == 2 and store.backlog() == 3
    store.delete(1)  # a full queue never blocks a delete either


def test_reader_reads_blocks_in_parallel_threads_and_reports_unreadable_ones(tmp_path: Path) -> None:
    from kvbm.disk_tier import DiskReader

    store = DiskStore(tmp_path, LAYOUT)
    store.start()
    blocks = {h: block(h) for h in (1, 2, 3)}
    for h, data in blocks.items():
        store.write(h, None, data)
    store.stop()
    store.path(2).unlink()
    notified: list[bool] = []
    reader = DiskReader(store, torch.float32, pin=False, threads=2, notify=lambda: notified.append(True))
    reads = reader.start([1, 2, 3])
    assert reads.wait(30) and reads.done and notified == [True]
    for h in (1, 3):
        staged = reads.staged(h)
        assert staged is not None and torch.equal(staged[0][staged[1]], blocks[h])
    assert reads.staged(2) is None and reads.staged(9) is None
    reader.stop()
