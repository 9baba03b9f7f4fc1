"""DiskStore: blocks round-trip through files with a layout header, reads see queued writes,
a scan finds only this layout's whole files, and stop() drains the queue."""

from __future__ import annotations

from pathlib import Path

import torch

from kvbm.disk_tier import DiskStore
from dynamo.wire import KvLayoutSpec as KvLayout
from kvbm.layout import block_header, elements_per_layer, fingerprint, parse_block_header

LAYOUT = KvLayout(num_layers=2, block_size_tokens=4, num_kv_heads=2, head_dim=8, dtype="float32")


def block(seed: int) -> torch.Tensor:
    return torch.randn((4, elements_per_layer(LAYOUT)), generator=torch.Generator().manual_seed(seed))


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
    (tmp_path / fingerprint(other)).mkdir()
    (tmp_path / fingerprint(LAYOUT) / "junk.kvb").write_bytes(b"not a block")
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
    header = block_header(LAYOUT, 5, None)
    assert parse_block_header(LAYOUT, header) == (5, None)
    assert parse_block_header(KvLayout(2, 4, 2, 8, "bfloat16"), header) is None


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


class FakeEvent:
    def __init__(self) -> None:
        self.completed = False

    def query(self) -> bool:
        return self.completed


def test_staging_pool_is_bounded_and_reuses_rows_only_after_their_fence() -> None:
    from kvbm.disk_tier import StagingPool

    pool = StagingPool(4, (4, elements_per_layer(LAYOUT)), torch.float32, pin=False)
    data = pool.data
    a = pool.take(3)
    assert a == [0, 1, 2]
    assert pool.take(2) is None and pool.misses == 1  # bounded: never grows
    pool.release(a)
    assert pool.take(2) is None  # released, but copies out of the rows may still be queued
    event = FakeEvent()
    pool.fence(event)
    assert pool.take(2) is None  # the fence has not completed
    event.completed = True
    assert pool.take(4) == [0, 1, 2, 3]  # the same rows again, in one run
    assert pool.data is data and pool.takes == 2
    pool.release([3])
    pool.fence(None)  # no stream: the copies are done
    assert pool.take(1) == [3]


def test_reader_stages_in_the_pool_across_requests_and_falls_back_when_it_is_full(tmp_path: Path) -> None:
    from kvbm.disk_tier import BlockReads, DiskReader

    store = DiskStore(tmp_path, LAYOUT)
    store.start()
    blocks = {h: block(h) for h in range(1, 6)}
    for h, data in blocks.items():
        store.write(h, None, data)
    store.stop()
    reader = DiskReader(store, torch.float32, pin=False, threads=2, staging_rows=3)
    assert reader.pool is not None
    first = reader.start([1, 2, 3])
    assert first.wait(30)
    rows_first = [first.staged(h)[1] for h in (1, 2, 3)]  # type: ignore[index]
    assert all(first.staged(h)[0] is reader.pool.data for h in (1, 2, 3))  # type: ignore[index]
    # The pool is taken: the next request gets a buffer of its own, with the right bytes.
    second = reader.start([4, 5])
    assert second.wait(30)
    own = second.staged(4)
    assert own is not None and own[0] is not reader.pool.data and torch.equal(own[0][own[1]], blocks[4])
    second.close()
    first.close()
    reader.pool.fence(None)
    third = reader.start([5, 4, 1])
    assert third.wait(30)
    for h in (5, 4, 1):
        staged = third.staged(h)
        assert staged is not None and staged[0] is reader.pool.data and torch.equal(staged[0][staged[1]], blocks[h])
    assert sorted(third.staged(h)[1] for h in (5, 4, 1)) == sorted(rows_first)  # type: ignore[index]
    assert reader.pool.takes == 2 and reader.pool.misses == 1
    # Closed before its reads ran (submitted after): the rows come back once they end.
    third.close()
    reader.pool.fence(None)
    fourth = BlockReads([1, 2], None)
    fourth.close()
    reader.submit(fourth)
    assert fourth.wait(30)
    reader.pool.fence(None)
    assert reader.pool.num_free == 3
    reader.stop()


def test_a_batch_hands_its_sources_back_once_written_or_refused(tmp_path: Path) -> None:
    import threading

    held = threading.Event()

    def hold(_: int) -> None:
        held.wait(30)

    store = DiskStore(tmp_path, LAYOUT, queue_blocks=1, before_write=hold)
    store.start()
    done: list[str] = []
    assert store.write_batch([(1, None, block(1))], on_done=lambda: done.append("first"))
    # Not written yet: its source is still read (a read copies it while it is queued).
    out = torch.empty((4, elements_per_layer(LAYOUT)))
    assert store.read(1, out) and torch.equal(out, block(1)) and done == []
    assert store.write_batch([(2, None, block(2)), (3, None, block(3))], on_done=lambda: done.append("second"))
    assert not store.write_batch([(4, None, block(4))], on_done=lambda: done.append("refused"))
    assert done == ["refused"]  # at once: nothing will read it
    held.set()
    store.stop()
    assert done == ["refused", "first", "second"]
    assert store.read(3, out) and torch.equal(out, block(3))  # from its file now
