"""The KVBM connector for vLLM (workers/vllm/connector/offload.py) without an engine: the
scheduler side's bookkeeping against fake vLLM requests (offload when a request releases its
blocks, hits beyond vLLM's prefix cache, onboard plans into the allocated slots, requests whose
KV is more than their tokens left alone), the worker side's copies on a tensor shaped like vLLM
CPU's KV cache (host and disk round trips, an unreadable file reported as a load error), tier
events through the KV-event translator, and the counters reaching the dynamo_kvbm_* metrics.
Disk hits load asynchronously: reads held back with an event, pins kept until vLLM reports the
load finished (an abort included), and the whole protocol once more through vLLM's own
scheduler, stepped by hand with a fake forward pass that checks the loaded blocks' contents.
Or synchronously, when the measured file reads are short next to a step: the choice against
seeded estimates, the reads' times from the worker (every rank's, the slowest counting) to the
scheduler side, and a synchronous load through vLLM's scheduler."""

from __future__ import annotations

import importlib.util
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import pytest

HAVE_VLLM = importlib.util.find_spec("vllm") is not None
if not HAVE_VLLM:
    if os.environ.get("DYN_TEST_VLLM") == "1":
        pytest.fail("vllm is not importable here (DYN_TEST_VLLM=1)", pytrace=False)
    pytest.skip("needs vllm (run from .venv-vllm)", allow_module_level=True)

import torch  # noqa: E402

from dynamo.kv_hash import block_hashes  # noqa: E402
from dynamo.wire import BlockRemoved, BlockStored, KvEventData, KvLayoutSpec  # noqa: E402
from kvbm.config import DiskLoadName, KvbmConfig  # noqa: E402
from kvbm.disk_tier import DiskStore  # noqa: E402
from kvbm.layout import block_bytes  # noqa: E402
from kvbm.onboard_cost import ALPHA, PREFILL_MIN_TOKENS, LinearRate  # noqa: E402
from workers.vllm.connector.offload import (  # noqa: E402
    EXTRA_KEY,
    KvbmView,
    OffloadMetadata,
    OffloadWorkerMetadata,
    _SchedulerSide,
    _WorkerSide,
    connector_config,
)

BS = 4
LAYOUT = KvLayoutSpec(num_layers=2, block_size_tokens=BS, num_kv_heads=2, head_dim=8, dtype="float32")
NUM_BLOCKS = 16


@dataclass
class FakeRequest:
    """The attributes of vllm.v1.request.Request the connector reads."""

    request_id: str
    all_token_ids: list[int]
    num_computed_tokens: int = 0
    lora_request: Any = None
    cache_salt: str | None = None
    mm_features: list[Any] = field(default_factory=list)
    skip_reading_prefix_cache: bool = False

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)


def finish(side: _SchedulerSide, req: FakeRequest, block_ids: list[int]) -> OffloadMetadata:
    """The request computed all but its last token and releases its blocks."""
    req.num_computed_tokens = req.num_tokens - 1
    side.finished(req, block_ids)
    return side.build_meta([], 0)


def test_offload_on_release_then_onboard_beyond_the_device_hit() -> None:
    side = _SchedulerSide(KvbmConfig(host_blocks=8), LAYOUT)
    prompt = list(range(100, 118))  # 4 full blocks + 2 tokens
    first = FakeRequest("a", prompt)
    assert side.num_new_matched_tokens(first, 0) == (0, False)
    assert side.after_alloc(first, [], 0) == []
    meta = finish(side, first, [5, 6, 7, 8, 9])
    ours = block_hashes(prompt, BS)
    assert [(op[0], op[1], op[3]) for op in meta.offloads] == [(5, ours[0], "host"), (6, ours[1], "host"),
                                                               (7, ours[2], "host"), (8, ours[3], "host")]
    assert not meta.onboards

    # Asked again with vLLM's own cache holding the first block: the rest comes from the tier
    # (the last prompt token is always computed: 18 tokens -> at most 17 cached -> 4 blocks).
    again = FakeRequest("b", prompt)
    assert side.num_new_matched_tokens(again, BS) == (3 * BS, False)
    assert side.num_new_matched_tokens(again, BS) == (3 * BS, False)  # side-effect free
    assert side.after_alloc(again, [1, 2, 3, 4, 11], 3 * BS) == []
    meta = side.build_meta([], 0)
    assert [(op[0], op[1], op[3]) for op in meta.onboards] == [(ours[1], "host", 2), (ours[2], "host", 3),
                                                               (ours[3], "host", 4)]
    assert side.cache.stats.hits["host"] == 3
    stats = side.stats()
    assert stats is not None and stats.data[EXTRA_KEY]["hits"] == {"host": 3}
    assert stats.data[EXTRA_KEY]["usage"] == {"host": [4, 8]}
    again_stats = side.stats()
    assert again_stats is None  # deltas: nothing new


def test_requests_whose_kv_is_more_than_tokens_are_left_alone() -> None:
    side = _SchedulerSide(KvbmConfig(host_blocks=8), LAYOUT)
    prompt = list(range(50, 70))
    finish(side, FakeRequest("plain", prompt), list(range(1, 6)))
    lora = FakeRequest("lora", prompt, lora_request=object())
    assert side.num_new_matched_tokens(lora, 0) == (0, False)
    assert not finish(side, FakeRequest("salted", list(range(200, 220)), cache_salt="s"), list(range(6, 11))).offloads
    skip = FakeRequest("skip", prompt, skip_reading_prefix_cache=True)
    assert side.num_new_matched_tokens(skip, 0) == (0, False)
    assert side.num_new_matched_tokens(FakeRequest("plain2", prompt), 0) == (4 * BS, False)


def test_tier_events_reach_the_router_with_our_hashes() -> None:
    import msgspec
    from vllm.distributed.kv_events import KVEventBatch

    from workers.vllm.kv_events import BATCH_DECODER, KvEventTranslator

    side = _SchedulerSide(KvbmConfig(host_blocks=3), LAYOUT)
    out: list[KvEventData] = []
    translator = KvEventTranslator(out.append, BS)
    prompt = list(range(10, 23))  # 3 full usable blocks
    finish(side, FakeRequest("a", prompt), [1, 2, 3, 4])
    finish(side, FakeRequest("b", list(range(300, 309))), [5, 6, 7])  # 2 blocks push 2 of a's out
    # As vLLM's publisher sends them and our subscriber decodes them.
    wire = msgspec.msgpack.encode(KVEventBatch(ts=0.0, events=list(side.take_events())))
    for event in BATCH_DECODER.decode(wire).events:
        translator.apply(event)
    ours = block_hashes(prompt, BS)
    assert out[0] == BlockStored(block_hashes=ours[:3], parent_hash=None, tier="host")
    removed = [e for e in out if isinstance(e, BlockRemoved)]
    assert removed == [BlockRemoved(block_hashes=ours[:2], tier="host")]
    assert {tuple(e.block_hashes) for e in translator.snapshot() if isinstance(e, BlockStored)} >= {(ours[2],)}


def test_connector_config_round_trips_the_flags() -> None:
    config = KvbmConfig(host_gb=0.5, disk_dir="/tmp/x", offload_policy="reused")
    fields = connector_config(config)
    assert fields["kv_connector_module_path"] == "workers.vllm.connector.offload"
    assert KvbmConfig(**fields["kv_connector_extra_config"][EXTRA_KEY]) == config


# --------------------------------------------------------------------------- worker side


def cpu_kv_caches() -> dict[str, torch.Tensor]:
    """vLLM CPU's per-layer layout: [num_blocks, kv_heads, block_size, 2 * head_dim]."""
    gen = torch.Generator().manual_seed(7)
    shape = (NUM_BLOCKS, LAYOUT.num_kv_heads, BS, 2 * LAYOUT.head_dim)
    return {f"layers.{i}.attn": torch.randn(shape, generator=gen) for i in range(LAYOUT.num_layers)}


def test_worker_host_round_trip_and_flash_layout() -> None:
    for caches in (cpu_kv_caches(),
                   # GPU backends' [2, num_blocks, block_size, heads, head_dim]: blocks on dim 1
                   {f"l{i}": torch.randn(2, NUM_BLOCKS, BS, 2, 8) for i in range(2)}):
        worker = _WorkerSide(KvbmConfig(host_blocks=4), LAYOUT, list(caches), NUM_BLOCKS)
        worker.register(caches)
        dim = 0 if next(iter(caches.values())).shape[0] == NUM_BLOCKS else 1
        before = [t.select(dim, 3).clone() for t in caches.values()]
        worker.execute(OffloadMetadata(offloads=[(3, 111, None, "host", 2)]))
        worker.execute(OffloadMetadata(onboards=[(111, "host", 2, 9)]))
        for t, b in zip(caches.values(), before):
            assert torch.equal(t.select(dim, 9), b)
        assert worker.take_lost() == set()
        stats = worker.stats()
        # Offloads finish in the background on a GPU, as in the built-in engine: onboards are timed.
        assert stats is not None and set(stats.data[EXTRA_KEY]["transfer"]) == {"onboard"}
        assert len(stats.data[EXTRA_KEY]["plans"]) == 2
    # The plans' times reach dynamo_kvbm_plan_seconds in the worker process.
    from prometheus_client import CollectorRegistry

    from kvbm.metrics import KvbmMetrics

    registry = CollectorRegistry()
    view = KvbmView(KvbmConfig(host_blocks=4))
    view.cache.bind_metrics(KvbmMetrics(registry, "m"))
    view.apply(stats.to_dict())
    assert registry.get_sample_value("dynamo_kvbm_plan_seconds_count", {"model": "m"}) == 2


class GatedReads:
    """Holds the worker's disk reads (on its reader threads) until `open` is set, and counts
    them by block hash."""

    def __init__(self, store: DiskStore) -> None:
        self.open = threading.Event()
        self.calls: Counter[int] = Counter()
        self._lock = threading.Lock()
        read = store.read

        def gated(block_hash: int, out: torch.Tensor) -> bool:
            with self._lock:
                self.calls[block_hash] += 1
            if not self.open.wait(30):
                raise TimeoutError("reads held for 30 s")
            return read(block_hash, out)

        store.read = gated  # type: ignore[method-assign]


def wait_for_reads(worker: _WorkerSide, request_id: str) -> None:
    load = worker._loads[request_id]
    assert load.reads is not None and load.reads.wait(30)


def test_a_disk_load_finishes_once_its_reads_are_done(tmp_path: Path) -> None:
    """Read off the model thread: the steps meanwhile run (and onboard host hits) as usual;
    once read, the load's host and disk hits land in their device blocks and vLLM is told."""
    caches = cpu_kv_caches()
    worker = _WorkerSide(KvbmConfig(host_blocks=4, disk_dir=str(tmp_path), disk_blocks=8), LAYOUT, list(caches),
                         NUM_BLOCKS)
    worker.register(caches)
    try:
        assert worker.disk is not None and worker.reader is not None
        gate = GatedReads(worker.disk)
        want = {block: [t[block].clone() for t in caches.values()] for block in (3, 4, 5)}
        worker.execute(OffloadMetadata(offloads=[(3, 111, None, "host", 2), (4, 222, None, "disk", 0),
                                                 (5, 223, 222, "disk", 1)]))
        load = [(222, "disk", 0, 12), (223, "disk", 1, 13), (111, "host", 2, 14)]
        before = {block: [t[block].clone() for t in caches.values()] for block in (12, 13, 14)}
        worker.execute(OffloadMetadata(loads=[("r", load)], onboards=[(111, "host", 2, 9)]))
        assert all(torch.equal(t, w) for t, w in zip((t[9] for t in caches.values()), want[3]))  # not held up
        assert worker.take_finished() == set()
        worker.execute(OffloadMetadata())  # a step while the reads are held
        worker.finish_loads()  # its end: nothing read yet
        assert worker.take_finished() == set()
        for block, was in before.items():  # nothing of the load landed yet, its host hit neither
            assert all(torch.equal(t[block], w) for t, w in zip(caches.values(), was))

        gate.open.set()
        wait_for_reads(worker, "r")
        worker.finish_loads()  # the end of the step during which they were read
        assert worker.take_finished() == {"r"}
        for block, source in ((12, 4), (13, 5), (14, 3)):
            assert all(torch.equal(t[block], w) for t, w in zip(caches.values(), want[source]))
        assert worker.take_lost() == set()
        assert worker.take_finished() == set()  # reported once
        assert gate.calls == {222: 1, 223: 1}  # by the reader only
        meta = worker.worker_meta()
        assert meta is not None and [(tier, n) for tier, n, _ in meta.reads if tier == "disk"] == [
            ("disk", 2 * block_bytes(LAYOUT))]
    finally:
        worker.shutdown()


def test_worker_disk_round_trip_and_an_unreadable_file(tmp_path: Path) -> None:
    caches = cpu_kv_caches()
    config = KvbmConfig(disk_dir=str(tmp_path), disk_blocks=8)
    worker = _WorkerSide(config, LAYOUT, list(caches), NUM_BLOCKS)
    worker.register(caches)
    try:
        assert worker.disk is not None
        gate = GatedReads(worker.disk)
        gate.open.set()
        want = [t[4].clone() for t in caches.values()]
        worker.execute(OffloadMetadata(offloads=[(4, 222, None, "disk", 0)]))
        worker.execute(OffloadMetadata(loads=[("r", [(222, "disk", 0, 12), (333, "disk", 1, 13)])]))
        wait_for_reads(worker, "r")
        worker.execute(OffloadMetadata())
        # The request still finishes; its unreadable block is a load error, reported with it.
        assert worker.take_finished() == {"r"}
        assert worker.take_lost() == {13}  # vLLM recomputes it
        for t, w in zip(caches.values(), want):
            assert torch.equal(t[12], w)
        assert gate.calls == {222: 1, 333: 1}  # not read again on the model thread
        meta = worker.worker_meta()
        assert meta is not None and meta.unreadable == {333}
    finally:
        worker.shutdown()
    assert any(tmp_path.rglob("00000000000000de.kvb"))  # 222, kept for a restart

    # A restarted scheduler side finds the block on disk and offers it.
    side = _SchedulerSide(config, LAYOUT)
    assert side.cache.disk is not None and 222 in side.cache.disk


def test_shutdown_with_a_load_in_flight_returns(tmp_path: Path) -> None:
    caches = cpu_kv_caches()
    worker = _WorkerSide(KvbmConfig(disk_dir=str(tmp_path), disk_blocks=8), LAYOUT, list(caches), NUM_BLOCKS)
    worker.register(caches)
    assert worker.disk is not None
    gate = GatedReads(worker.disk)
    worker.execute(OffloadMetadata(offloads=[(4, 222, None, "disk", 0)]))
    worker.execute(OffloadMetadata(loads=[("r", [(222, "disk", 0, 12)])]))
    assert worker.take_finished() == set()
    stopper = threading.Thread(target=worker.shutdown)
    stopper.start()
    gate.open.set()  # the read in progress ends; nothing waits for the load to be taken
    stopper.join(30)
    assert not stopper.is_alive()
    assert worker.reader is None and worker._loads == {}


def test_disk_writes_report_through_the_worker_metadata(tmp_path: Path) -> None:
    caches = cpu_kv_caches()
    worker = _WorkerSide(KvbmConfig(disk_dir=str(tmp_path), disk_blocks=8), LAYOUT, list(caches), NUM_BLOCKS)
    worker.register(caches)
    worker.execute(OffloadMetadata(offloads=[(4, 222, None, "disk", 0), (5, 223, 222, "disk", 1)]))
    assert worker.disk is not None
    worker.disk.stop()  # returns once the queued writes are done
    meta = worker.worker_meta()
    assert meta is not None and meta.written == [(222, True), (223, True)]
    assert worker.worker_meta() is None  # reported once


def test_a_disk_write_is_announced_once_every_rank_reports_it(tmp_path: Path) -> None:
    """Until then its entry stays pinned and unannounced (the disk thread may still read its
    bytes); a write any rank failed is forgotten."""
    layout = msgspec.structs.replace(LAYOUT, tp_size=2)
    side = _SchedulerSide(KvbmConfig(disk_dir=str(tmp_path), disk_blocks=8), layout)
    prompt = list(range(100, 118))
    meta = finish(side, FakeRequest("a", prompt), [1, 2, 3, 4, 5])
    hashes = [op[1] for op in meta.offloads]
    assert len(hashes) == 4 and [op[3] for op in meta.offloads] == ["disk"] * 4
    assert side.cache.writing == set(hashes) and side.take_events() == []
    side.worker_output(OffloadWorkerMetadata(written=[(h, True) for h in hashes]))  # rank 0
    assert side.cache.writing == set(hashes) and side.take_events() == []
    # Rank 1: the first three written, the last failed (a full disk).
    side.worker_output(OffloadWorkerMetadata(written=[(h, True) for h in hashes[:3]] + [(hashes[3], False)]))
    assert side.cache.writing == set()
    events = side.take_events()
    assert [list(e.block_hashes) for e in events] == [hashes[:3]] and events[0].medium == "dynamo-disk"
    assert side.cache.disk is not None and hashes[3] not in side.cache.disk
    assert side.cache.stats.skipped_by[("disk", "write_failed")] == 1
    assert side.num_new_matched_tokens(FakeRequest("b", prompt), 0) == (3 * BS, True)


def test_view_feeds_the_metrics_also_inside_a_multiconnector_payload() -> None:
    from prometheus_client import CollectorRegistry

    from kvbm.metrics import KvbmMetrics

    registry = CollectorRegistry()
    view = KvbmView(KvbmConfig(host_blocks=8))
    view.cache.bind_metrics(KvbmMetrics(registry, "m"))
    side = _SchedulerSide(KvbmConfig(host_blocks=8), LAYOUT)
    prompt = list(range(100, 118))
    finish(side, FakeRequest("a", prompt), [1, 2, 3, 4, 5])
    req = FakeRequest("b", prompt)
    assert side.num_new_matched_tokens(req, 0) == (4 * BS, False)
    side.after_alloc(req, [6, 7, 8, 9, 10], 4 * BS)
    stats = side.stats()
    assert stats is not None
    view.apply({"DynamoKvbmConnector": stats.to_dict(), "OtherConnector": {"x": 1}})
    sample = registry.get_sample_value
    assert sample("dynamo_kvbm_hit_blocks_total", {"model": "m", "tier": "host"}) == 4
    assert sample("dynamo_kvbm_offload_blocks_total", {"model": "m", "tier": "host"}) == 4
    assert sample("dynamo_kvbm_blocks_used", {"model": "m", "tier": "host"}) == 4
    assert sample("dynamo_kvbm_blocks_total", {"model": "m", "tier": "host"}) == 8


def test_multiconnector_prometheus_observer_takes_our_stats() -> None:
    # A decode worker with tiers runs the transfer and KVBM connectors under vLLM's MultiConnector,
    # whose Prometheus observer asserts that every connector reporting stats has metrics of its own.
    from types import SimpleNamespace

    from prometheus_client import Counter, Gauge, Histogram
    from vllm.distributed.kv_transfer.kv_connector.v1.multi_connector import MultiKVConnectorPromMetrics

    from workers.vllm.connector.offload import DynamoKvbmConnector

    config = SimpleNamespace(kv_transfer_config=None)
    types = {Gauge: Gauge, Counter: Counter, Histogram: Histogram}
    ours = DynamoKvbmConnector.build_prom_metrics(config, types, ["engine"], {0: [0]})  # type: ignore[arg-type]
    assert ours is not None
    multi = MultiKVConnectorPromMetrics(config, types, ["engine"], {0: [0]}, {"DynamoKvbmConnector": ours})  # type: ignore[arg-type]
    side = _SchedulerSide(KvbmConfig(host_blocks=8), LAYOUT)
    finish(side, FakeRequest("a", list(range(100, 118))), [1, 2, 3, 4, 5])
    stats = side.stats()
    assert stats is not None
    multi.observe({"DynamoKvbmConnector": stats.to_dict()})


# ----------------------------------------------------------------------- the cost models


def test_worker_measures_forward_passes_reads_and_offloads_for_the_scheduler() -> None:
    caches = cpu_kv_caches()
    worker = _WorkerSide(KvbmConfig(host_blocks=4), LAYOUT, list(caches), NUM_BLOCKS)
    worker.register(caches)
    worker.execute(OffloadMetadata(offloads=[(3, 111, None, "host", 2)], step_tokens=8))
    worker.forward_started()  # a decode-sized step: timed as a step
    worker.forward_done()
    worker.execute(OffloadMetadata(step_tokens=0))
    worker.forward_started()  # nothing computed: not timed
    worker.forward_done()
    worker.execute(OffloadMetadata(onboards=[(111, "host", 2, 9)], step_tokens=PREFILL_MIN_TOKENS))
    worker.forward_started()
    worker.forward_done()
    meta = worker.worker_meta()
    assert meta is not None
    assert [tokens for tokens, _ in meta.steps] == [8, PREFILL_MIN_TOKENS]
    block = 2 * LAYOUT.num_layers * BS * LAYOUT.num_kv_heads * LAYOUT.head_dim * 4
    assert [(tier, nbytes) for tier, nbytes, _ in meta.reads] == [("host", block)]
    assert [blocks for blocks, _ in meta.upkeep] == [1]
    assert worker.worker_meta() is None  # reported once

    side = _SchedulerSide(KvbmConfig(host_blocks=4), LAYOUT)
    assert side.cache.cost.recompute_s(BS) is None
    side.worker_output(meta)
    assert side.cache.cost.recompute_s(BS) is not None
    assert side.cache.cost.prefill.samples == 1  # the prefill-sized step only
    assert side.disk_load.step.samples == 2  # both steps
    assert side.cache.cost.reads["host"].samples == 1


def disk_side(tmp_path: Path) -> tuple[_SchedulerSide, list[int]]:
    """A scheduler side whose disk tier holds a released prompt's 4 blocks."""
    side = _SchedulerSide(KvbmConfig(disk_dir=str(tmp_path), disk_blocks=8), LAYOUT)
    prompt = list(range(100, 118))
    meta = finish(side, FakeRequest("a", prompt), [1, 2, 3, 4, 5])
    side.worker_output(OffloadWorkerMetadata(written=[(op[1], True) for op in meta.offloads]))
    return side, prompt


def test_the_scheduler_side_probes_its_disk_tier_before_any_eviction(tmp_path: Path) -> None:
    """The disk's read estimate is measured where the tier opens (kvbm/disk_probe.py), in the
    directory the worker side reads, unless the probe is off; no probe file stays behind."""
    configured = 1 / (KvbmConfig().disk_gbps * 1e9)
    for probe in (True, False):
        root = tmp_path / str(probe)
        side = _SchedulerSide(KvbmConfig(disk_dir=str(root), disk_blocks=8, disk_probe=probe), LAYOUT)
        fit = side.cache.cost.reads["disk"].fit()
        assert fit is not None and side.cache.cost.reads["disk"].samples == 0
        if probe:
            assert fit[1] != pytest.approx(configured)
        else:
            assert fit == (0.0, pytest.approx(configured))
        assert not any(root.rglob("*.kvb"))


def test_a_disk_slower_than_recompute_is_not_read(tmp_path: Path) -> None:
    from prometheus_client import CollectorRegistry

    from kvbm.metrics import KvbmMetrics

    side, prompt = disk_side(tmp_path)
    block = side.block_bytes
    # Prefill measured at 1 us a token; a disk read of one block takes a second.
    side.worker_output(OffloadWorkerMetadata(steps=[(PREFILL_MIN_TOKENS, PREFILL_MIN_TOKENS * 1e-6)],
                                             reads=[("disk", block, 1.0)]))
    req = FakeRequest("b", prompt)
    assert side.num_new_matched_tokens(req, 0) == (0, False)  # recomputed: vLLM loads nothing
    assert side.after_alloc(req, [], 0) == []
    assert side.cache.stats.decisions[("disk", "recompute")] == 4
    stats = side.stats()
    assert stats is not None
    body = stats.data[EXTRA_KEY]
    assert body["decisions"] == {"disk/recompute": 4}
    assert body["estimates"]["recompute_tokens_per_s"] == pytest.approx(1e6)

    # The same counters and estimates reach dynamo_kvbm_* in the worker process.
    registry = CollectorRegistry()
    view = KvbmView(KvbmConfig(disk_dir=str(tmp_path), disk_blocks=8))
    view.cache.bind_metrics(KvbmMetrics(registry, "m"))
    view.apply(stats.to_dict())
    sample = registry.get_sample_value
    declined = {"model": "m", "tier": "disk", "decision": "recompute"}
    assert sample("dynamo_kvbm_onboard_decision_blocks_total", declined) == 4
    assert sample("dynamo_kvbm_recompute_tokens_per_second", {"model": "m"}) == pytest.approx(1e6)


def test_a_disk_faster_than_recompute_is_read(tmp_path: Path) -> None:
    side, prompt = disk_side(tmp_path)
    # Prefill measured at 10 ms a token; a disk read of one block takes 10 us.
    side.worker_output(OffloadWorkerMetadata(steps=[(PREFILL_MIN_TOKENS, PREFILL_MIN_TOKENS * 1e-2)],
                                             reads=[("disk", side.block_bytes, 1e-5)]))
    req = FakeRequest("b", prompt)
    assert side.num_new_matched_tokens(req, 0) == (4 * BS, True)
    assert side.after_alloc(req, [6, 7, 8, 9, 10], 4 * BS) == []
    meta = side.build_meta([], 4 * BS + 2)
    assert not meta.onboards  # not in the step's plan: a load of its own, read off the model thread
    assert [(rid, [(op[1], op[3]) for op in ops]) for rid, ops in meta.loads] == [
        ("b", [("disk", b) for b in (6, 7, 8, 9)])]
    assert side.cache.stats.decisions[("disk", "onboard")] == 4


def test_recompute_is_weighed_by_the_requests_of_the_step(tmp_path: Path) -> None:
    """A disk hit is read while vLLM holds only its own request back; recomputing it lengthens
    a step every scheduled request waits for: a read dearer than one request's recompute is
    still taken when the last step ran several requests (build_meta reports them)."""
    side, prompt = disk_side(tmp_path)
    # Prefill at 1 us a token; a disk read of a block costs three blocks' recompute.
    side.worker_output(OffloadWorkerMetadata(steps=[(PREFILL_MIN_TOKENS, PREFILL_MIN_TOKENS * 1e-6)],
                                             reads=[("disk", side.block_bytes, 3 * BS * 1e-6)]))
    side.build_meta([], 0, step_requests=1)
    assert side.num_new_matched_tokens(FakeRequest("b", prompt), 0) == (0, False)
    side.build_meta([], 0, step_requests=8)
    assert side.num_new_matched_tokens(FakeRequest("c", prompt), 0) == (4 * BS, True)


def test_step_tokens_reach_the_worker_in_the_plan() -> None:
    side = _SchedulerSide(KvbmConfig(host_blocks=4), LAYOUT)
    assert side.build_meta([], 300).step_tokens == 300
    assert not OffloadMetadata(step_tokens=300)  # carries no copies: the worker skips the plan


# ------------------------------------------------------------------ asynchronous disk loads


def adopted_side(tmp_path: Path, prompt: list[int], host_blocks: int = 0,
                 disk_load: DiskLoadName = "auto") -> tuple[_SchedulerSide, list[int]]:
    """A scheduler side whose disk tier holds the prompt's full blocks (found there at start,
    as after a restart) and whose host tier, if any, holds none of them."""
    config = KvbmConfig(host_blocks=host_blocks, disk_dir=str(tmp_path), disk_blocks=8, disk_load=disk_load)
    side = _SchedulerSide(config, LAYOUT)
    hashes = block_hashes(prompt, BS)[: (len(prompt) - 1) // BS]
    assert side.cache.adopt_disk(list(zip(hashes, [None, *hashes[:-1]]))) == len(hashes)
    side.take_events()
    return side, hashes


def pins(side: _SchedulerSide, hashes: list[int]) -> list[int]:
    disk = side.cache.disk
    assert disk is not None
    entries = [disk.get(h) for h in hashes]
    return [e.ref_count if e is not None else -1 for e in entries]


def test_only_a_disk_hit_loads_asynchronously(tmp_path: Path) -> None:
    prompt = list(range(100, 118))
    host = _SchedulerSide(KvbmConfig(host_blocks=8), LAYOUT)
    finish(host, FakeRequest("a", prompt), [1, 2, 3, 4, 5])
    assert host.num_new_matched_tokens(FakeRequest("b", prompt), 0) == (4 * BS, False)
    assert host.num_new_matched_tokens(FakeRequest("c", list(range(500, 518))), 0) == (0, False)

    disk, _ = adopted_side(tmp_path / "disk", prompt)
    assert disk.num_new_matched_tokens(FakeRequest("b", prompt), 0) == (4 * BS, True)

    # Two blocks kept on host, the two after them on disk: one load, asynchronous.
    mixed = _SchedulerSide(KvbmConfig(host_blocks=2, disk_dir=str(tmp_path / "mixed"), disk_blocks=8), LAYOUT)
    meta = finish(mixed, FakeRequest("a", prompt), [1, 2, 3, 4, 5])
    assert [op[3] for op in meta.offloads] == ["host", "host", "disk", "disk"]
    mixed.worker_output(OffloadWorkerMetadata(written=[(op[1], True) for op in meta.offloads if op[3] == "disk"]))
    req = FakeRequest("b", prompt)
    assert mixed.num_new_matched_tokens(req, 0) == (4 * BS, True)
    assert mixed.after_alloc(req, [6, 7, 8, 9, 10], 4 * BS) == []
    loads = mixed.build_meta([], 0).loads
    assert [(rid, [(op[1], op[3]) for op in ops]) for rid, ops in loads] == [
        ("b", [("host", 6), ("host", 7), ("disk", 8), ("disk", 9)])]


def test_an_async_load_holds_its_pins_until_vllm_reports_it_finished(tmp_path: Path) -> None:
    from vllm.v1.metrics.cache_hit_source import CacheHitSource

    prompt = list(range(100, 118))
    side, ours = adopted_side(tmp_path, prompt)
    req = FakeRequest("b", prompt)
    assert side.num_new_matched_tokens(req, 0) == (4 * BS, True)
    assert pins(side, ours) == [0] * 4  # asking pins nothing
    assert side.after_alloc(req, [6, 7, 8, 9, 10], 4 * BS) == []
    assert side.hit_sources(req, 4 * BS) == {CacheHitSource.DISK: 4 * BS}
    assert pins(side, ours) == [1] * 4
    meta = side.build_meta([], 0)
    assert not meta.onboards  # not the step's plan, whose pins go once it is built
    assert meta.loads == [("b", [(h, "disk", i, block) for i, (h, block) in enumerate(zip(ours, (6, 7, 8, 9)))])]
    assert not side.build_meta([], 0).loads  # sent once
    assert pins(side, ours) == [1] * 4  # steps go by while the files are read
    side.loads_done({"some-other-connectors-request"})
    assert pins(side, ours) == [1] * 4
    side.loads_done({"b"})
    assert pins(side, ours) == [0] * 4


def test_the_second_update_state_after_alloc_counts_nothing_again(tmp_path: Path) -> None:
    """vLLM calls update_state_after_alloc again once an asynchronous load is in (with no
    external tokens): the admission was planned, counted and recorded at the first call."""
    from kvbm.policy import OffloadPolicy

    prompt = list(range(100, 118))
    side, ours = adopted_side(tmp_path, prompt)
    side.cache.policy = policy = OffloadPolicy("reused")  # one that keeps per-block counts
    req = FakeRequest("b", prompt)
    assert side.num_new_matched_tokens(req, 0) == (4 * BS, True)
    side.after_alloc(req, [6, 7, 8, 9, 10], 4 * BS)
    side.build_meta([], 0)
    side.loads_done({"b"})
    counted = (dict(side.cache.stats.hits), dict(side.cache.stats.decisions), policy._counts[ours[0]].copy())
    assert counted[2] == [1, 1]

    req.num_computed_tokens = 4 * BS  # vLLM's, once the load is in
    assert side.after_alloc(req, [6, 7, 8, 9, 10], 0) == []
    assert (dict(side.cache.stats.hits), dict(side.cache.stats.decisions), policy._counts[ours[0]]) == counted
    meta = side.build_meta([], 0)
    assert not meta.onboards and not meta.loads and pins(side, ours) == [0] * 4

    # Readmitted later (preempted): vLLM asks first, and that admission counts.
    req.num_computed_tokens = 0
    assert side.num_new_matched_tokens(req, 0) == (4 * BS, True)
    side.after_alloc(req, [11, 12, 13, 14, 15], 4 * BS)
    assert policy._counts[ours[0]] == [2, 2]
    assert [rid for rid, _ in side.build_meta([], 0).loads] == ["b"]


def test_a_request_aborted_while_loading_keeps_its_pins_until_the_load_is_reported(tmp_path: Path) -> None:
    prompt = list(range(100, 118))
    side, ours = adopted_side(tmp_path, prompt, host_blocks=8)
    req = FakeRequest("b", prompt)
    assert side.num_new_matched_tokens(req, 0) == (4 * BS, True)
    side.after_alloc(req, [6, 7, 8, 9, 10], 4 * BS)
    side.build_meta([], 0)
    # vLLM counts the blocks being loaded as computed; aborted, it frees them only once the
    # load is reported finished.
    req.num_computed_tokens = 4 * BS
    side.finished(req, [6, 7, 8, 9, 10])
    # Nothing offered to the host tier: those device blocks may hold nothing yet.
    assert not side.build_meta([], 0).offloads
    assert pins(side, ours) == [1] * 4
    side.loads_done({"b"})
    assert pins(side, ours) == [0] * 4
    assert side._loads == {} and "b" not in side._requests


def test_an_unreadable_file_a_load_pins_is_forgotten_once_the_load_ends(tmp_path: Path) -> None:
    prompt = list(range(100, 118))
    side, ours = adopted_side(tmp_path, prompt)
    for rid in ("b", "c"):  # two loads of one prompt
        req = FakeRequest(rid, prompt)
        assert side.num_new_matched_tokens(req, 0) == (4 * BS, True)
        side.after_alloc(req, [6, 7, 8, 9, 10], 4 * BS)
    side.build_meta([], 0)
    assert pins(side, ours) == [2] * 4
    side.loads_done({"b"})
    side.worker_output(OffloadWorkerMetadata(unreadable={ours[2]}))
    assert side.cache.disk is not None and ours[2] in side.cache.disk  # c still pins it
    side.loads_done({"c"})
    assert ours[2] not in side.cache.disk
    assert [list(e.block_hashes) for e in side.take_events()] == [[ours[2]]]  # removed, tier-tagged


# ------------------------------------------------------------- sync or async disk loads


def measured(side: _SchedulerSide, read_s_per_block: float, step_s: float) -> None:
    """The workers report a step of `step_s` and a load's files read at `read_s_per_block`
    (a decode-sized step: the onboard cost model's prefill rate stays unmeasured, so it onboards
    every hit)."""
    side.worker_output(OffloadWorkerMetadata(steps=[(8, step_s)],
                                             file_reads=[("earlier", side.block_bytes, read_s_per_block)]))


def test_a_disk_load_is_synchronous_when_its_read_is_short_next_to_a_step(tmp_path: Path) -> None:
    prompt = list(range(100, 118))  # 4 full blocks on disk
    # Nothing measured: asynchronous, whatever the read turns out to be.
    side, ours = adopted_side(tmp_path / "cold", prompt)
    assert side.num_new_matched_tokens(FakeRequest("b", prompt), 0) == (4 * BS, True)
    side.worker_output(OffloadWorkerMetadata(steps=[(8, 0.02)]))  # a step, but no read yet
    assert side.num_new_matched_tokens(FakeRequest("b", prompt), 0) == (4 * BS, True)

    # 4 blocks read in 0.4 ms against 20 ms steps: synchronous, in the step's own plan.
    measured(side, 1e-4, 0.02)
    req = FakeRequest("c", prompt)
    assert side.num_new_matched_tokens(req, 0) == (4 * BS, False)
    assert side.after_alloc(req, [6, 7, 8, 9, 10], 4 * BS) == []
    meta = side.build_meta([], 4 * BS + 2)
    assert not meta.loads
    assert meta.onboards == [(h, "disk", i, block) for i, (h, block) in enumerate(zip(ours, (6, 7, 8, 9)))]
    assert pins(side, ours) == [0] * 4  # read before any later plan runs, as a host hit is copied
    stats = side.stats()
    assert stats is not None and stats.data[EXTRA_KEY]["disk_loads"] == {"sync": 1}
    assert stats.reduce()["kvbm_disk_loads_sync"] == 1

    # Reads of 10 ms a block: 40 ms, longer than a step.
    slow, _ = adopted_side(tmp_path / "slow", prompt)
    measured(slow, 0.01, 0.02)
    assert slow.num_new_matched_tokens(FakeRequest("c", prompt), 0) == (4 * BS, True)

    # 8 ms against a 20 ms step: synchronous while the last step ran one request; with four,
    # the read would hold up 32 ms of requests' time, more than the step a load costs its own.
    weighed, _ = adopted_side(tmp_path / "weighed", prompt)
    measured(weighed, 0.002, 0.02)
    weighed.build_meta([], 0, step_requests=1)
    assert weighed.num_new_matched_tokens(FakeRequest("c", prompt), 0) == (4 * BS, False)
    weighed.build_meta([], 0, step_requests=4)
    assert weighed.num_new_matched_tokens(FakeRequest("c", prompt), 0) == (4 * BS, True)

    # The configuration can fix either way.
    forced, _ = adopted_side(tmp_path / "async", prompt, disk_load="async")
    measured(forced, 1e-4, 0.02)
    assert forced.num_new_matched_tokens(FakeRequest("c", prompt), 0) == (4 * BS, True)
    forced, _ = adopted_side(tmp_path / "sync", prompt, disk_load="sync")
    assert forced.num_new_matched_tokens(FakeRequest("c", prompt), 0) == (4 * BS, False)


def test_file_reads_count_once_every_rank_reports_them_the_slowest_rank_s() -> None:
    """With tensor parallelism every rank reads its own part of each file: a read is known
    once every rank has reported it, in the step's aggregated metadata or a later one's (a
    rank's reader threads may finish a step after another's), and it took the slowest's time."""
    side = _SchedulerSide(KvbmConfig(host_blocks=4), msgspec.structs.replace(LAYOUT, tp_size=2))
    read = side.disk_load.read
    size = 2 * side.block_bytes
    # One step's metadata, aggregated over the ranks as vLLM does: step 3's in-line reads, both
    # ranks'; load r's reads, rank 0's.
    rank0 = OffloadWorkerMetadata(file_reads=[(3, size, 0.001), ("r", size, 0.004)])
    rank1 = OffloadWorkerMetadata(file_reads=[(3, size, 0.003)])
    side.worker_output(rank0.aggregate(rank1))
    assert read.samples == 1 and read.cost_s(size) == pytest.approx(0.003)
    side.worker_output(OffloadWorkerMetadata(file_reads=[("r", size, 0.002)]))  # rank 1's, a step later
    assert read.samples == 2 and read.cost_s(size) == pytest.approx(0.003 + ALPHA * (0.004 - 0.003))
    # A rank that read nothing (no staging memory) reports anyway; the other's read counts.
    side.worker_output(OffloadWorkerMetadata(file_reads=[("q", 0, 0.0), ("z", 0, 0.0)]))
    side.worker_output(OffloadWorkerMetadata(file_reads=[("q", size, 0.005), ("z", 0, 0.0)]))
    assert read.samples == 3  # z, read by neither, is no sample


def test_worker_reports_the_file_reads_of_both_kinds_of_load(tmp_path: Path) -> None:
    caches = cpu_kv_caches()
    worker = _WorkerSide(KvbmConfig(disk_dir=str(tmp_path), disk_blocks=8), LAYOUT, list(caches), NUM_BLOCKS)
    worker.register(caches)
    size = block_bytes(LAYOUT)
    try:
        assert worker.disk is not None
        want = {block: [t[block].clone() for t in caches.values()] for block in (4, 5)}
        worker.execute(OffloadMetadata(offloads=[(4, 222, None, "disk", 0), (5, 223, 222, "disk", 1)]))
        worker.disk.stop()  # returns once the files are written
        worker.worker_meta()
        gate = GatedReads(worker.disk)
        gate.open.set()
        # Asynchronous: read by the reader threads.
        worker.execute(OffloadMetadata(loads=[("r", [(222, "disk", 0, 12), (223, "disk", 1, 13)])]))
        wait_for_reads(worker, "r")
        worker.finish_loads()
        assert worker.take_finished() == {"r"}
        # Synchronous: read by the executor in the step's plan, on this thread.
        worker.execute(OffloadMetadata(onboards=[(222, "disk", 0, 14), (223, "disk", 1, 15)], step=7))
        for block, source in ((12, 4), (13, 5), (14, 4), (15, 5)):
            assert all(torch.equal(t[block], w) for t, w in zip(caches.values(), want[source]))
        assert gate.calls == {222: 2, 223: 2}
        # A vanished file: nothing read, reported all the same (the scheduler side waits for
        # every rank's report); its block is a load error.
        worker.disk.path(223).unlink()
        worker.execute(OffloadMetadata(onboards=[(223, "disk", 1, 6)], step=8))
        assert worker.take_lost() == {6}
        meta = worker.worker_meta()
        assert meta is not None
        assert [(key, nbytes) for key, nbytes, _ in meta.file_reads] == [("r", 2 * size), (7, 2 * size), (8, 0)]
        assert all(seconds > 0 for _, nbytes, seconds in meta.file_reads if nbytes)
    finally:
        worker.shutdown()

    side = _SchedulerSide(KvbmConfig(host_blocks=4), LAYOUT)
    side.worker_output(meta)
    assert side.disk_load.read.samples == 2


# ------------------------------------------------------------- with vLLM's own scheduler

LAYERS = ("layers.0.attn", "layers.1.attn")
SAMPLED = 7  # the fake forward pass's every sampled token


class VllmSteps:
    """vLLM's scheduler with our connector (role SCHEDULER), and our connector's worker role on
    CPU tensors shaped like vLLM CPU's KV cache, stepped as vLLM's engine core and model runner
    step them: handle_preemptions, the forward pass, then the step's transfer results, load
    errors, worker metadata and stats into its output; the stats vLLM returns reach a KvbmView
    (`view`), as in the worker process. The forward pass is faked: it checks that each block
    the request had computed (or loaded) before it holds its tokens' KV, then writes the
    blocks it completes."""

    def __init__(self, tmp_path: Path, kvbm: KvbmConfig) -> None:
        import json

        from vllm.config import CacheConfig, KVTransferConfig, ModelConfig, SchedulerConfig, VllmConfig
        from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
        from vllm.utils.hashing import get_hash_fn_by_name
        from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
        from vllm.v1.core.sched.scheduler import Scheduler
        from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
        from vllm.v1.structured_output import StructuredOutputManager

        from workers.vllm.connector.offload import DynamoKvbmConnector

        model = tmp_path / "model"  # a config is all vLLM's config classes read: no weights
        model.mkdir()
        (model / "config.json").write_text(json.dumps({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 1000,
            "hidden_size": 4 * LAYOUT.head_dim, "intermediate_size": 64, "num_attention_heads": 4,
            "num_key_value_heads": LAYOUT.num_kv_heads, "head_dim": LAYOUT.head_dim,
            "num_hidden_layers": LAYOUT.num_layers, "max_position_embeddings": 256, "torch_dtype": "float32",
        }))
        config = VllmConfig(
            model_config=ModelConfig(model=str(model), dtype="float32", max_model_len=128, skip_tokenizer_init=True),
            cache_config=CacheConfig(block_size=BS, enable_prefix_caching=True),
            scheduler_config=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=128, max_model_len=128,
                                             is_encoder_decoder=False),
            kv_transfer_config=KVTransferConfig(**connector_config(kvbm)),
        )
        spec = FullAttentionSpec(block_size=BS, num_kv_heads=LAYOUT.num_kv_heads, head_size=LAYOUT.head_dim,
                                  dtype=torch.float32)
        kv_cache_config = KVCacheConfig(num_blocks=NUM_BLOCKS, kv_cache_tensors=[],
                                        kv_cache_groups=[KVCacheGroupSpec(list(LAYERS), spec)])
        config.cache_config.num_gpu_blocks = NUM_BLOCKS
        self.scheduler = Scheduler(vllm_config=config, kv_cache_config=kv_cache_config,
                                   structured_output_manager=StructuredOutputManager(config), block_size=BS,
                                   log_stats=True)
        hash_fn = get_hash_fn_by_name(config.cache_config.prefix_caching_hash_algo)
        init_none_hash(hash_fn)
        self.block_hasher = get_request_block_hasher(BS, hash_fn)
        self.connector = DynamoKvbmConnector(config, KVConnectorRole.WORKER, kv_cache_config)
        self.caches = {name: torch.zeros(NUM_BLOCKS, LAYOUT.num_kv_heads, BS, 2 * LAYOUT.head_dim) for name in LAYERS}
        self.connector.register_kv_caches(self.caches)
        self.view = KvbmView(kvbm)

    @property
    def side(self) -> _SchedulerSide:
        side = self.scheduler.connector._scheduler  # type: ignore[union-attr]
        assert side is not None
        return side

    @property
    def worker(self) -> _WorkerSide:
        worker = self.connector._worker
        assert worker is not None
        return worker

    def add(self, request_id: str, prompt: list[int], max_tokens: int = 1) -> None:
        from vllm.sampling_params import SamplingParams
        from vllm.v1.request import Request

        self.scheduler.add_request(Request(request_id, prompt, SamplingParams(max_tokens=max_tokens), None,
                                           block_hasher=self.block_hasher))

    @staticmethod
    def kv(tokens: list[int], layer: int) -> float:
        return float(sum(tokens) % 1009 + layer / 4 + 1)

    def forward(self, scheduled: dict[str, int]) -> None:
        for request_id, n in scheduled.items():
            request = self.scheduler.requests[request_id]
            start = request.num_computed_tokens - n  # vLLM counts the step's tokens at scheduling
            (block_ids,) = self.scheduler.kv_cache_manager.get_block_ids(request_id)
            tokens = request.all_token_ids
            for i in range((start + n) // BS):
                kv = [self.kv(tokens[i * BS : (i + 1) * BS], layer) for layer in range(len(LAYERS))]
                for t, value in zip(self.caches.values(), kv):
                    if i < start // BS:  # what attention reads: the block must hold its KV already
                        assert bool((t[block_ids[i]] == value).all()), (request_id, i, block_ids[i])
                    else:
                        t[block_ids[i]] = value

    def step(self) -> dict[str, int]:
        from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput

        scheduler, connector = self.scheduler, self.connector
        out = scheduler.schedule()
        connector.handle_preemptions(out.kv_connector_metadata)
        scheduled = dict(out.num_scheduled_tokens)
        self.forward(scheduled)
        connector.wait_for_save()
        _, recving = connector.get_finished(out.finished_req_ids)
        results = KVConnectorOutput(finished_recving=recving,
                                    invalid_block_ids=connector.get_block_ids_with_load_errors(),
                                    kv_connector_stats=connector.get_kv_connector_stats(),
                                    kv_connector_worker_meta=connector.build_connector_worker_meta())
        ids = list(scheduled)
        sampled = [[SAMPLED] if scheduler.requests[r].num_computed_tokens >= scheduler.requests[r].num_tokens else []
                   for r in ids]
        outputs = scheduler.update_from_output(out, ModelRunnerOutput(
            req_ids=ids, req_id_to_index={r: i for i, r in enumerate(ids)}, sampled_token_ids=sampled,
            kv_connector_output=results))
        for eco in outputs.values():
            if eco.scheduler_stats is not None:
                self.view.apply(eco.scheduler_stats.kv_connector_stats)
        return scheduled

    def run_to_disk(self, request_id: str, prompt: list[int]) -> list[int]:
        """Runs a request to its end and until the disk tier holds its full blocks, whose
        hashes it returns."""
        disk = self.side.cache.disk
        assert disk is not None
        hashes = block_hashes(prompt, BS)[: len(prompt) // BS]
        self.add(request_id, prompt)
        self.run_until(lambda: request_id not in self.scheduler.requests, f"{request_id} finished")
        self.run_until(lambda: not self.side.cache.writing and all(h in disk for h in hashes),
                       f"{request_id}'s blocks on disk")
        return hashes

    def run_until(self, condition: Callable[[], bool], what: str) -> None:
        """Steps until `condition()`; between steps, waits a little for the disk thread (for
        up to a minute: a loaded machine may starve it)."""
        pause = threading.Event()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            self.step()
            if condition():
                return
            pause.wait(0.005)
        raise AssertionError(f"not reached: {what}")


def test_async_disk_loads_through_vllms_scheduler(tmp_path: Path) -> None:
    from vllm.v1.request import RequestStatus

    # Always asynchronous: the reads held at the gate would make the measured ones long anyway.
    steps = VllmSteps(tmp_path, KvbmConfig(disk_dir=str(tmp_path / "disk"), disk_blocks=32, disk_load="async"))
    scheduler, side, worker = steps.scheduler, steps.side, steps.worker
    disk = side.cache.disk
    assert disk is not None and worker.disk is not None
    prompt = list(range(100, 122))  # 5 full blocks and 2 tokens
    ours = steps.run_to_disk("a", prompt)
    assert scheduler.reset_prefix_cache()  # vLLM's own copies gone: the disk tier has them
    gate = GatedReads(worker.disk)

    # b waits for its disk reads; c, admitted beside it, runs to the end meanwhile.
    steps.add("b", prompt)
    steps.add("c", list(range(300, 310)), max_tokens=4)
    assert steps.step() == {"c": 10}
    assert scheduler.requests["b"].status == RequestStatus.WAITING_FOR_REMOTE_KVS
    assert pins(side, ours) == [1] * 5
    steps.run_until(lambda: "c" not in scheduler.requests, "c finished")
    assert scheduler.requests["b"].status == RequestStatus.WAITING_FOR_REMOTE_KVS
    gate.open.set()
    wait_for_reads(worker, "b")
    assert steps.step() == {}  # copied in and reported: vLLM's pins go
    assert pins(side, ours) == [0] * 5
    assert steps.step() == {"b": 2}  # the forward pass finds the 5 blocks' KV in place
    assert "b" not in scheduler.requests
    assert side.cache.stats.hits["disk"] == 5  # vLLM's second update_state_after_alloc counted nothing

    # Aborted while loading: vLLM holds its blocks until the load is reported, the pins stay.
    assert scheduler.reset_prefix_cache()
    gate.open.clear()
    steps.add("d", prompt)
    steps.step()
    pool = scheduler.kv_cache_manager.block_pool
    free = pool.get_num_free_blocks()
    assert scheduler.finish_requests("d", RequestStatus.FINISHED_ABORTED)
    assert "d" in scheduler.requests and pool.get_num_free_blocks() == free
    steps.step()
    assert pins(side, ours) == [1] * 5
    gate.open.set()
    wait_for_reads(worker, "d")
    steps.step()
    assert "d" not in scheduler.requests and pool.get_num_free_blocks() == NUM_BLOCKS - 1  # all but the null block
    assert pins(side, ours) == [0] * 5

    # A vanished file: a load error reported with the load; vLLM recomputes from that block.
    assert scheduler.reset_prefix_cache()
    worker.disk.path(ours[2]).unlink()
    gate.open.clear()
    steps.add("e", prompt)
    steps.step()
    gate.open.set()
    wait_for_reads(worker, "e")
    steps.step()
    assert ours[2] not in disk  # forgotten as soon as the load's pins went
    assert steps.step() == {"e": len(prompt) - 2 * BS}  # blocks 0 and 1 loaded
    assert "e" not in scheduler.requests and ours[2] in side.cache.writing  # recomputed, offered again
    assert steps.view.disk_loads == {"async": 3}  # b, d and e


def test_sync_disk_loads_through_vllms_scheduler(tmp_path: Path) -> None:
    """Reads measured far shorter than a step: a disk hit is read on the model thread in the
    step that admits its request, which runs at once; far longer, it waits for its reads."""
    from vllm.v1.request import RequestStatus

    steps = VllmSteps(tmp_path, KvbmConfig(disk_dir=str(tmp_path / "disk"), disk_blocks=32))
    scheduler, side, worker = steps.scheduler, steps.side, steps.worker
    disk = side.cache.disk
    assert disk is not None and worker.disk is not None
    prompt = list(range(100, 122))  # 5 full blocks and 2 tokens
    ours = steps.run_to_disk("a", prompt)
    assert steps.view.disk_loads == {}
    gate = GatedReads(worker.disk)
    gate.open.set()

    def estimates(read_s_per_block: float) -> None:
        # Fresh: the fake forward passes' own times must not move them. Steps are measured
        # meanwhile, far shorter than the 1 s seeded; either way the margin is a factor of 1e6.
        choice = side.disk_load
        choice.read = LinearRate(alpha=choice.read.alpha)
        choice.read.observe(side.block_bytes, read_s_per_block)
        choice.step = LinearRate(alpha=choice.step.alpha)
        choice.step.observe(1, 1.0)

    estimates(1e-9)
    assert scheduler.reset_prefix_cache()
    steps.add("b", prompt)
    assert steps.step() == {"b": 2}  # admitted, its files read and its last tokens computed in one step
    assert "b" not in scheduler.requests and worker._loads == {}
    assert gate.calls == {h: 1 for h in ours}
    assert side.cache.stats.hits["disk"] == 5 and pins(side, ours) == [0] * 5
    assert side.disk_load.read.samples == 2  # the in-line read's time came back
    assert steps.view.disk_loads == {"sync": 1}

    estimates(100.0)
    assert scheduler.reset_prefix_cache()
    steps.add("c", prompt)
    assert steps.step() == {}
    assert scheduler.requests["c"].status == RequestStatus.WAITING_FOR_REMOTE_KVS
    steps.run_until(lambda: "c" not in scheduler.requests, "c finished")
    assert steps.view.disk_loads == {"sync": 1, "async": 1}
