"""The KVBM connector for vLLM (workers/vllm/connector/offload.py) without an engine: the
scheduler side's bookkeeping against fake vLLM requests (offload when a request releases its
blocks, hits beyond vLLM's prefix cache, onboard plans into the allocated slots, requests whose
KV is more than their tokens left alone), the worker side's copies on a tensor shaped like vLLM
CPU's KV cache (host and disk round trips, an unreadable file reported as a load error), tier
events through the KV-event translator, and the counters reaching the dynamo_kvbm_* metrics."""

from __future__ import annotations

import importlib.util
import os
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
from kvbm.config import KvbmConfig  # noqa: E402
from kvbm.onboard_cost import PREFILL_MIN_TOKENS  # noqa: E402
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
    assert side.num_new_matched_tokens(first, 0) == 0
    assert side.after_alloc(first, [], 0) == []
    meta = finish(side, first, [5, 6, 7, 8, 9])
    ours = block_hashes(prompt, BS)
    assert [(op[0], op[1], op[3]) for op in meta.offloads] == [(5, ours[0], "host"), (6, ours[1], "host"),
                                                               (7, ours[2], "host"), (8, ours[3], "host")]
    assert not meta.onboards

    # Asked again with vLLM's own cache holding the first block: the rest comes from the tier
    # (the last prompt token is always computed: 18 tokens -> at most 17 cached -> 4 blocks).
    again = FakeRequest("b", prompt)
    assert side.num_new_matched_tokens(again, BS) == 3 * BS
    assert side.num_new_matched_tokens(again, BS) == 3 * BS  # side-effect free
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
    assert side.num_new_matched_tokens(lora, 0) == 0
    assert not finish(side, FakeRequest("salted", list(range(200, 220)), cache_salt="s"), list(range(6, 11))).offloads
    skip = FakeRequest("skip", prompt, skip_reading_prefix_cache=True)
    assert side.num_new_matched_tokens(skip, 0) == 0
    assert side.num_new_matched_tokens(FakeRequest("plain2", prompt), 0) == 4 * BS


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


def test_worker_disk_round_trip_and_an_unreadable_file(tmp_path: Path) -> None:
    caches = cpu_kv_caches()
    config = KvbmConfig(disk_dir=str(tmp_path), disk_blocks=8)
    worker = _WorkerSide(config, LAYOUT, list(caches), NUM_BLOCKS)
    worker.register(caches)
    try:
        want = [t[4].clone() for t in caches.values()]
        worker.execute(OffloadMetadata(offloads=[(4, 222, None, "disk", 0)]))
        worker.execute(OffloadMetadata(onboards=[(222, "disk", 0, 12), (333, "disk", 1, 13)]))
        for t, w in zip(caches.values(), want):
            assert torch.equal(t[12], w)
        assert worker.take_lost() == {13}  # vLLM recomputes it
        meta = worker.worker_meta()
        assert meta is not None and meta.unreadable == {333}
    finally:
        worker.shutdown()
    assert any(tmp_path.rglob("00000000000000de.kvb"))  # 222, kept for a restart

    # A restarted scheduler side finds the block on disk and offers it.
    side = _SchedulerSide(config, LAYOUT)
    assert side.cache.disk is not None and 222 in side.cache.disk


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
    assert side.num_new_matched_tokens(FakeRequest("b", prompt), 0) == 3 * BS


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
    assert side.num_new_matched_tokens(req, 0) == 4 * BS
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
    worker.forward_started()  # a decode-sized step: not timed
    worker.forward_done()
    worker.execute(OffloadMetadata(onboards=[(111, "host", 2, 9)], step_tokens=PREFILL_MIN_TOKENS))
    worker.forward_started()
    worker.forward_done()
    meta = worker.worker_meta()
    assert meta is not None
    assert [tokens for tokens, _ in meta.steps] == [PREFILL_MIN_TOKENS]
    block = 2 * LAYOUT.num_layers * BS * LAYOUT.num_kv_heads * LAYOUT.head_dim * 4
    assert [(tier, nbytes) for tier, nbytes, _ in meta.reads] == [("host", block)]
    assert [blocks for blocks, _ in meta.upkeep] == [1]
    assert worker.worker_meta() is None  # reported once

    side = _SchedulerSide(KvbmConfig(host_blocks=4), LAYOUT)
    assert side.cache.cost.recompute_s(BS) is None
    side.worker_output(meta)
    assert side.cache.cost.recompute_s(BS) is not None
    assert side.cache.cost.reads["host"].samples == 1


def disk_side(tmp_path: Path) -> tuple[_SchedulerSide, list[int]]:
    """A scheduler side whose disk tier holds a released prompt's 4 blocks."""
    side = _SchedulerSide(KvbmConfig(disk_dir=str(tmp_path), disk_blocks=8), LAYOUT)
    prompt = list(range(100, 118))
    meta = finish(side, FakeRequest("a", prompt), [1, 2, 3, 4, 5])
    side.worker_output(OffloadWorkerMetadata(written=[(op[1], True) for op in meta.offloads]))
    return side, prompt


def test_a_disk_slower_than_recompute_is_not_read(tmp_path: Path) -> None:
    from prometheus_client import CollectorRegistry

    from kvbm.metrics import KvbmMetrics

    side, prompt = disk_side(tmp_path)
    block = side.block_bytes
    # Prefill measured at 1 us a token; a disk read of one block takes a second.
    side.worker_output(OffloadWorkerMetadata(steps=[(PREFILL_MIN_TOKENS, PREFILL_MIN_TOKENS * 1e-6)],
                                             reads=[("disk", block, 1.0)]))
    req = FakeRequest("b", prompt)
    assert side.num_new_matched_tokens(req, 0) == 0  # recomputed: vLLM loads nothing
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
    assert side.num_new_matched_tokens(req, 0) == 4 * BS
    assert side.after_alloc(req, [6, 7, 8, 9, 10], 4 * BS) == []
    assert [(op[1], op[3]) for op in side.build_meta([], 4 * BS + 2).onboards] == [("disk", b) for b in (6, 7, 8, 9)]
    assert side.cache.stats.decisions[("disk", "onboard")] == 4


def test_step_tokens_reach_the_worker_in_the_plan() -> None:
    side = _SchedulerSide(KvbmConfig(host_blocks=4), LAYOUT)
    assert side.build_meta([], 300).step_tokens == 300
    assert not OffloadMetadata(step_tokens=300)  # carries no copies: the worker skips the plan
