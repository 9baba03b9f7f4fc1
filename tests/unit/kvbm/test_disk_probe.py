"""The disk read probe (kvbm/disk_probe.py): it reads real block files back through a DiskStore
and a DiskReader, dropped from the page cache first, in a scratch directory it removes; its
result is the cost model's disk estimate until a real read replaces it, so a disk slower than
recompute takes no offload from the first eviction and a fast one takes them. Decisions are
tested with injected timings (no wall-clock thresholds)."""

from __future__ import annotations

import itertools
import os
import threading
from pathlib import Path

import pytest
import torch

import kvbm.disk_probe as disk_probe
from dynamo.wire import KvLayoutSpec as KvLayout
from kvbm.block_pool import EvictedBlock
from kvbm.config import KvbmConfig
from kvbm.disk_probe import DiskReadProbe, probe_disk_reads, probe_disk_tier
from kvbm.disk_tier import DiskStore
from kvbm.layout import block_bytes
from kvbm.manager import KvBlockManager
from kvbm.onboard_cost import OnboardCostModel
from kvbm.tiered import DISK, TieredCache

LAYOUT = KvLayout(num_layers=2, block_size_tokens=4, num_kv_heads=2, head_dim=8, dtype="float32")
MB = 1 << 20
TOKENS = 16


def test_the_probe_reads_back_real_block_files_dropped_from_the_page_cache(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dropped: list[int] = []
    fadvise = getattr(os, "posix_fadvise", None)
    if fadvise is not None:
        def spy(fd: int, offset: int, length: int, advice: int) -> None:
            if advice == os.POSIX_FADV_DONTNEED:
                dropped.append(fd)
            fadvise(fd, offset, length, advice)
        monkeypatch.setattr(os, "posix_fadvise", spy)
    read, store_read = [], DiskStore.read

    def counted(self: DiskStore, block_hash: int, out: torch.Tensor) -> bool:
        ok = store_read(self, block_hash, out)
        read.append((block_hash, ok))
        return ok
    monkeypatch.setattr(DiskStore, "read", counted)

    probe = probe_disk_reads(tmp_path, LAYOUT, blocks=4, rounds=2)
    assert (probe.blocks, probe.nbytes) == (4, 4 * block_bytes(LAYOUT)) and probe.seconds > 0
    # A round to start the reader, then two timed: 12 files, each flushed, dropped and read back.
    assert sorted(h for h, _ in read) == list(range(1, 13)) and all(ok for _, ok in read)
    if fadvise is not None:
        assert len(dropped) == 12
    assert list(tmp_path.iterdir()) == []  # the scratch directory is gone; the tier's was never made


def test_a_probe_of_a_tier_the_page_cache_holds_reads_it_from_there(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dropped: list[Path] = []
    monkeypatch.setattr(disk_probe, "_drop_from_page_cache", dropped.append)
    probe = probe_disk_reads(tmp_path, LAYOUT, blocks=2, rounds=1, cold=False)
    assert probe.blocks == 2 and probe.seconds > 0 and dropped == []
    assert list(tmp_path.iterdir()) == []


def test_whether_a_tier_reads_its_device_or_the_page_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       131072000 kB\nMemFree:         1000000 kB\nMemAvailable:   100000000 kB\n")
    available = 100000000 * 1024
    assert not disk_probe.reads_miss_page_cache(available // 2, meminfo)
    assert disk_probe.reads_miss_page_cache(available // 2 + 1, meminfo)
    assert disk_probe.reads_miss_page_cache(1, tmp_path / "absent")  # unknown: the device
    meminfo.write_text("MemTotal: 1 kB\n")
    assert disk_probe.reads_miss_page_cache(1, meminfo)
    # The tier's capacity decides how the probe reads.
    asked: list[tuple[int, bool]] = []
    monkeypatch.setattr(disk_probe, "reads_miss_page_cache", lambda tier_bytes: tier_bytes > 100 * MB)

    def probe(root: Path, layout: KvLayout, cold: bool) -> DiskReadProbe:
        asked.append((block_bytes(layout), cold))
        return DiskReadProbe(1, MB, 1e-3)
    monkeypatch.setattr(disk_probe, "probe_disk_reads", probe)
    for blocks in (10, 10**6):
        probe_disk_tier(KvbmConfig(disk_dir=str(tmp_path), disk_blocks=blocks), OnboardCostModel(55, 5), tmp_path, LAYOUT)
    assert [cold for _, cold in asked] == [False, True]


def test_the_probe_keeps_within_its_byte_bound(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(disk_probe, "PROBE_MAX_BYTES", 9 * block_bytes(LAYOUT))
    assert probe_disk_reads(tmp_path, LAYOUT, blocks=8, rounds=2).blocks == 3  # 3 rounds of 3 files


def probed(monkeypatch: pytest.MonkeyPatch, seconds_per_block: float) -> None:
    """The probe finds the disk reads a block of 1 MB in `seconds_per_block`."""
    monkeypatch.setattr(disk_probe, "probe_disk_reads",
                        lambda root, layout, cold: DiskReadProbe(8, 8 * MB, 8 * seconds_per_block))


def test_the_probe_is_the_disk_estimate_until_a_real_read_replaces_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    probed(monkeypatch, 1e-3)  # 1 ms a MB
    cost = OnboardCostModel(host_gbps=55, disk_gbps=5)
    assert probe_disk_tier(KvbmConfig(disk_dir=str(tmp_path)), cost, tmp_path, LAYOUT) is not None
    assert cost.reads[DISK].fit() == (0.0, pytest.approx(1e-3 / MB))
    cost.observe_read(DISK, 4 * MB, 4e-4)  # a real hit: 0.1 ms a MB
    assert cost.reads[DISK].fit() == (0.0, pytest.approx(1e-4 / MB))
    # Off, or failed: the configured bandwidth stands.
    for config in (KvbmConfig(disk_dir=str(tmp_path), disk_probe=False), KvbmConfig(disk_dir=str(tmp_path))):
        if config.disk_probe:
            def fail(root: Path, layout: KvLayout, cold: bool) -> DiskReadProbe:
                raise OSError("no space left on device")
            monkeypatch.setattr(disk_probe, "probe_disk_reads", fail)
        cost = OnboardCostModel(host_gbps=55, disk_gbps=5)
        assert probe_disk_tier(config, cost, tmp_path, LAYOUT) is None
        assert cost.reads[DISK].fit() == (0.0, pytest.approx(1 / 5e9))


def cache_probed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, seconds_per_block: float,
                 host_blocks: int = 0) -> TieredCache:
    """A disk tier (below a host tier of `host_blocks`) probed at `seconds_per_block` a 1 MB
    block, with recompute measured at 10 us a token (160 us a block) and 100 us of clock per
    reading (what the offload value charges an offload)."""
    config = KvbmConfig(host_blocks=host_blocks, disk_dir=str(tmp_path), disk_blocks=256, disk_queue_blocks=4)
    cache = TieredCache(config, MB, block_size_tokens=TOKENS)
    clock = itertools.count()
    cache.clock = lambda: next(clock) * 1e-4
    for tokens in (128, 256, 512, 1024):
        cache.observe_step(tokens, tokens * 10e-6)
    probed(monkeypatch, seconds_per_block)
    probe_disk_tier(config, cache.cost, tmp_path, LAYOUT)
    return cache


def disk_blocks_per_batch(cache: TieredCache, batches: int, first_hash: int = 1) -> list[int]:
    """Evict batches of 4 fresh blocks; per batch, the blocks its plan sends to disk (offloaded
    straight there, or written ahead from the host in the next step's plan)."""
    hashes = itertools.count(first_hash)
    out: list[int] = []
    for _ in range(batches):
        cache.evicted([EvictedBlock(i, next(hashes), None) for i in range(4)])
        plan = cache.take_plan()
        to_disk = sum(op.tier == DISK for op in plan.offloads)
        cache.finish(plan)
        ahead = cache.take_plan()
        cache.finish(ahead)
        out.append(to_disk + len(plan.writes) + len(ahead.writes))
    return out


@pytest.mark.parametrize("host_blocks", [0, 8])
def test_a_disk_probed_slower_than_recompute_takes_nothing_from_the_first_eviction(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, host_blocks: int) -> None:
    # 2 ms a block against 160 us of recompute. At the configured 5 GB/s the disk would take
    # every batch until one of its hits was read; at the probe's estimate not even the first,
    # whose offload cost is not measured yet.
    cache = cache_probed(monkeypatch, tmp_path, 2e-3, host_blocks)
    assert disk_blocks_per_batch(cache, 40) == [0] * 40
    assert cache.stats.skipped_by[(DISK, "cost_model")] > 0
    # A real read finds it fast after all (a neighbour's file, say, still in the page cache):
    # the disk takes blocks again.
    cache.observe_read(DISK, 4 * MB, 40e-6)
    assert sum(disk_blocks_per_batch(cache, 20, first_hash=1000)) > 0


@pytest.mark.parametrize("host_blocks", [0, 8])
def test_a_disk_probed_faster_than_recompute_takes_its_offloads(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, host_blocks: int) -> None:
    cache = cache_probed(monkeypatch, tmp_path, 10e-6, host_blocks)  # 10 us a block
    sent = disk_blocks_per_batch(cache, 40)
    # Without a host tier, every block of every batch; below one, the host's victims once it
    # fills (from the second batch).
    assert sent == [4] * 40 if not host_blocks else (sent[0] == 0 and all(n > 0 for n in sent[1:]))
    assert cache.stats.skipped_by[(DISK, "cost_model")] == 0
    # Until real reads find it slow: then none.
    for _ in range(3):
        cache.observe_read(DISK, 4 * MB, 8e-3)
    assert sum(disk_blocks_per_batch(cache, 20, first_hash=1000)) == 0


async def test_the_built_in_engine_probes_its_disk_tier_off_the_event_loop(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shape = (8, LAYOUT.block_size_tokens, LAYOUT.num_kv_heads, LAYOUT.head_dim)
    k, v = [torch.zeros(shape) for _ in range(2)], [torch.zeros(shape) for _ in range(2)]
    writers: list[threading.Thread] = []
    write_now = DiskStore.write_now

    def spy(self: DiskStore, block_hash: int, parent_hash: int | None, data: torch.Tensor) -> Path:
        writers.append(threading.current_thread())
        return write_now(self, block_hash, parent_hash, data)
    monkeypatch.setattr(DiskStore, "write_now", spy)
    configured = 1 / (KvbmConfig().disk_gbps * 1e9)
    for probe in (True, False):
        writers.clear()
        root = tmp_path / str(probe)
        mgr = KvBlockManager(KvbmConfig(host_blocks=4, disk_dir=str(root), disk_blocks=16, disk_probe=probe),
                             LAYOUT, k, v)
        await mgr.start()
        await mgr.stop()
        fit = mgr.cache.cost.reads[DISK].fit()
        assert fit is not None and mgr.disk is not None
        if probe:  # measured on a worker thread, not configured
            assert writers and threading.current_thread() not in writers
            assert fit[1] != pytest.approx(configured)
        else:
            assert not writers and fit == (0.0, pytest.approx(configured))
        assert [p.name for p in root.iterdir()] == [mgr.disk.dir.name]  # no scratch left behind
