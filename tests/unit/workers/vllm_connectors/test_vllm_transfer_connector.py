"""The transfer connector for vLLM (workers/vllm/connector/transfer_core.py) without vLLM: the
scheduler side's bookkeeping against the calls vLLM makes (which requests load remote KV, into
which slots, from which prefill blocks; which prefill requests hold their blocks), and the
worker side's pulls between two runtimes over KV tensors shaped like vLLM CPU's cache (blocks
land where vLLM allocated them, holds are released on the pull or at their timeout, a failed
pull or a block-order mismatch is reported as a failed load). Runs in the main venv."""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Any
from collections.abc import Callable, Iterator

import pytest
import torch

from dynamo.wire import KvLayoutSpec
from workers.disagg.args import DisaggConfig
from workers.vllm.connector import combined_config
from workers.vllm.connector.transfer_core import (
    CONNECTOR_MODULE,
    CONNECTOR_NAME,
    HOLD_KEY,
    PULL_KEY,
    Results,
    SchedulerState,
    StepMeta,
    WorkerRuntime,
    hold_params,
    split_kv,
    transfer_connector_config,
)

BS = 4
HEADS, DIM, LAYERS, BLOCKS = 2, 8, 2, 12


# ------------------------------------------------------------------------------ config

@dataclasses.dataclass(frozen=True)
class FakeVllmConfig:
    role: str = "aggregated"
    disagg: DisaggConfig | None = None


def test_connector_config_per_role_and_backend() -> None:
    assert transfer_connector_config(FakeVllmConfig()) is None  # type: ignore[arg-type]
    ours = transfer_connector_config(FakeVllmConfig("decode", DisaggConfig(prefill_timeout_s=7)))  # type: ignore[arg-type]
    assert ours is not None
    assert ours["kv_connector"] == CONNECTOR_NAME and ours["kv_connector_module_path"] == CONNECTOR_MODULE
    # A failed pull is recomputed, not failed (vLLM's default policy fails the request).
    assert ours["kv_load_failure_policy"] == "recompute" and ours["kv_role"] == "kv_both"
    assert ours["kv_connector_extra_config"]["pull_timeout_s"] == 7
    nixl = transfer_connector_config(FakeVllmConfig("prefill", DisaggConfig(kv_transfer_backend="vllm-nixl")))  # type: ignore[arg-type]
    assert nixl is not None and nixl["kv_connector"] == "NixlConnector" and "kv_connector_module_path" not in nixl


def test_several_connectors_combine_under_multiconnector_transfer_first() -> None:
    a = {"kv_connector": "A", "kv_role": "kv_both"}
    b = {"kv_connector": "B", "kv_role": "kv_both"}
    assert combined_config([]) is None
    assert combined_config([a]) == a
    multi = combined_config([a, b])
    assert multi is not None and multi["kv_connector"] == "MultiConnector"
    assert multi["kv_load_failure_policy"] == "recompute"
    assert [c["kv_connector"] for c in multi["kv_connector_extra_config"]["connectors"]] == ["A", "B"]


# ------------------------------------------------------------------- scheduler side

def prefill_scheduler() -> SchedulerState:
    s = SchedulerState(BS)
    s.addresses = ["127.0.0.1:1"]
    return s


def test_prefill_holds_a_completed_marked_request_and_returns_pull_params() -> None:
    s = prefill_scheduler()
    # 10 prompt tokens: 3 blocks; vLLM may hand over more block ids than the prompt fills.
    keep, params = s.finished("p1", hold_params(), True, [5, 6, 7, 8], 10)
    assert keep is True and params is not None
    assert params[PULL_KEY] == {"addresses": ["127.0.0.1:1"], "request_id": "p1", "block_ids": [5, 6, 7], "num_tokens": 10}
    assert s.take_meta().holds == ["p1"] and s.take_meta().holds == []
    # Unmarked, aborted, or without a pull server: freed at once.
    assert s.finished("p2", None, True, [1], 4) == (False, None)
    assert s.finished("p3", hold_params(), False, [1], 4) == (False, None)
    assert SchedulerState(BS).finished("p4", hold_params(), True, [1], 4) == (False, None)
    s.sent({"p1"})
    assert not s.held


def pull_params(num_tokens: int = 10, blocks: tuple[int, ...] = (5, 6, 7)) -> dict[str, Any]:
    return {PULL_KEY: {"addresses": ["127.0.0.1:1"], "request_id": "p1", "block_ids": list(blocks), "num_tokens": num_tokens}}


def test_decode_reports_uncached_prompt_tokens_and_pulls_into_the_allocated_slots() -> None:
    s = SchedulerState(BS)
    params = pull_params()
    assert s.num_new_matched_tokens("d1", None, 10, 0) == (0, False)
    assert s.num_new_matched_tokens("d1", params, 10, 0) == (10, True)
    # Asked again (vLLM may): same answer, no side effect beyond the last count.
    assert s.num_new_matched_tokens("d1", params, 10, 4) == (6, True)
    s.after_alloc("d1", params, [20, 21, 22], 6)  # one block cached here, two allocated
    (pull,) = s.take_meta().pulls
    assert (pull.src_block_ids, pull.dst_block_ids, pull.remote_request_id) == ([6, 7], [21, 22], "p1")
    # One transfer per request: after a failed pull vLLM asks again and recomputes instead.
    assert s.num_new_matched_tokens("d1", params, 10, 0) == (0, False)
    s.after_alloc("d1", params, [20, 21, 22], 0)
    s.not_scheduled("d1", params)
    assert s.take_meta().pulls == []


def test_decode_without_a_load_releases_the_prefill_blocks() -> None:
    s = SchedulerState(BS)
    params = pull_params()
    s.num_new_matched_tokens("d1", params, 10, 0)
    s.after_alloc("d1", params, [1, 2, 3], 0)  # another connector supplied the KV
    (pull,) = s.take_meta().pulls
    assert pull.release_only
    aborted = pull_params()
    s.not_scheduled("d2", aborted)  # finished before it was scheduled
    (pull,) = s.take_meta().pulls
    assert pull.release_only and pull.request_id == "d2"


def test_a_mismatched_block_count_is_refused() -> None:
    s = SchedulerState(BS)
    params = pull_params(blocks=(5, 6))
    s.num_new_matched_tokens("d1", params, 10, 0)
    with pytest.raises(ValueError, match="2 prefilled blocks for 3 slots"):
        s.after_alloc("d1", params, [1, 2, 3], 10)


# ------------------------------------------------------------------------ worker side

def cpu_cache(seed: int) -> torch.Tensor:
    """vLLM CPU attention's per-layer cache: [blocks, heads, block, 2 x head dim]."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(BLOCKS, HEADS, BS, 2 * DIM, generator=g)


def layout(order: str = "HND") -> KvLayoutSpec:
    return KvLayoutSpec(num_layers=LAYERS, block_size_tokens=BS, num_kv_heads=HEADS, head_dim=DIM, dtype="float32",
                        block_order=order)


def test_split_kv_views_vllm_cpu_and_gpu_layouts() -> None:
    cache = cpu_cache(0)
    k, v, order = split_kv(cache, BS, HEADS, DIM)
    assert order == "HND" and k.shape == (BLOCKS, HEADS, BS, DIM)
    # Per (block, head): the block's K rows, then its V rows.
    assert torch.equal(k[3, 1], cache[3, 1].reshape(2, BS, DIM)[0])
    assert torch.equal(v[3, 1], cache[3, 1].reshape(2, BS, DIM)[1])
    k[0].fill_(7.0)  # a view: writes land in vLLM's tensor
    assert torch.all(cache[0].reshape(HEADS, 2, BS, DIM)[:, 0] == 7.0)
    gpu_style = torch.zeros(2, BLOCKS, BS, HEADS, DIM)
    assert split_kv(gpu_style, BS, HEADS, DIM)[2] == "NHD"
    with pytest.raises(ValueError, match="unsupported vLLM KV cache shape"):
        split_kv(torch.zeros(3, 3), BS, HEADS, DIM)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


Pair = tuple[WorkerRuntime, WorkerRuntime, list[torch.Tensor], list[torch.Tensor], FakeClock]


@pytest.fixture
def pair() -> Iterator[Pair]:
    clock = FakeClock()
    prefill = WorkerRuntime(backend="host", pull_timeout_s=20, hold_timeout_s=30, clock=clock)
    decode = WorkerRuntime(backend="host", pull_timeout_s=20, hold_timeout_s=30, clock=clock)
    src = [cpu_cache(i) for i in range(LAYERS)]
    dst = [torch.zeros(BLOCKS, HEADS, BS, 2 * DIM) for _ in range(LAYERS)]
    for runtime, caches in ((prefill, src), (decode, dst)):
        views = [split_kv(c, BS, HEADS, DIM) for c in caches]
        runtime.start(layout(), [k for k, _, _ in views], [v for _, v, _ in views])
    yield prefill, decode, src, dst, clock
    prefill.shutdown()
    decode.shutdown()


def wait_results(runtime: WorkerRuntime, done: Callable[[Results], bool], timeout_s: float = 30) -> Results:
    """Accumulate results (vLLM polls every step) until `done` holds; bounded."""
    total = Results()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        r = runtime.results()
        total.finished_sending |= r.finished_sending
        total.finished_recving |= r.finished_recving
        total.failed_recving |= r.failed_recving
        if done(total):
            return total
        time.sleep(0.01)
    raise AssertionError(f"timed out; got {total}")


def pull_step(prefill: WorkerRuntime, request_id: str, src: list[int], dst: list[int]) -> StepMeta:
    from workers.vllm.connector.transfer_core import PullSpec

    return StepMeta(pulls=[PullSpec(request_id, [prefill.pull_address], "p1", src, dst)])


def test_a_pull_lands_in_the_allocated_blocks_and_releases_the_hold(pair: Pair) -> None:
    prefill, decode, src, dst, _ = pair
    prefill.step(StepMeta(holds=["p1"]))
    assert prefill.results().finished_sending == set()  # held until pulled
    decode.step(pull_step(prefill, "d1", [2, 5, 6], [9, 0, 4]))
    got = wait_results(decode, lambda r: "d1" in r.finished_recving)
    assert got.failed_recving == set() and decode.pulls_done == 1
    for s, d in zip(src, dst):
        for a, b in ((2, 9), (5, 0), (6, 4)):
            assert torch.equal(d[b], s[a])
        assert torch.count_nonzero(d[1]) == 0  # nothing else written
    assert wait_results(prefill, lambda r: "p1" in r.finished_sending).finished_sending == {"p1"}
    assert prefill.agent is not None and prefill.agent.buffer_bytes == 0
    assert decode.agent is not None and decode.agent.buffer_bytes == 0


def test_a_pull_that_arrives_before_its_hold_is_kept_for_it(pair: Pair) -> None:
    prefill, decode, _, _, _ = pair
    decode.step(pull_step(prefill, "d1", [1], [1]))  # the prefill's next step has not run yet
    wait_results(decode, lambda r: "d1" in r.finished_recving)
    prefill.step(StepMeta(holds=["p1"]))
    assert prefill.results().finished_sending == {"p1"}


def test_an_unpulled_hold_is_freed_at_its_timeout(pair: Pair) -> None:
    prefill, _, _, _, clock = pair
    prefill.step(StepMeta(holds=["p1"]))
    clock.now += 29
    assert prefill.results().finished_sending == set()
    clock.now += 2
    assert prefill.results().finished_sending == {"p1"}
    assert prefill.results().finished_sending == set()  # reported once


def test_a_pull_from_a_dead_prefill_worker_is_a_failed_load(pair: Pair) -> None:
    _, decode, _, _, _ = pair
    from workers.vllm.connector.transfer_core import PullSpec

    decode.step(StepMeta(pulls=[PullSpec("d1", ["127.0.0.1:1"], "p1", [1], [1])]))
    got = wait_results(decode, lambda r: "d1" in r.finished_recving)
    # Reported both received (out of WAITING_FOR_REMOTE_KVS) and failed (recompute).
    assert got.failed_recving == {"d1"} and decode.pulls_failed == 1


def test_a_block_order_mismatch_is_refused_as_a_failed_load(pair: Pair) -> None:
    prefill, _, _, _, _ = pair
    other = WorkerRuntime(backend="host", pull_timeout_s=20)
    caches = [torch.zeros(2, BLOCKS, BS, HEADS, DIM) for _ in range(LAYERS)]
    try:
        other.start(layout("NHD"), [c[0] for c in caches], [c[1] for c in caches])
        prefill.step(StepMeta(holds=["p1"]))
        other.step(pull_step(prefill, "d1", [1], [1]))
        assert wait_results(other, lambda r: "d1" in r.finished_recving).failed_recving == {"d1"}
        assert torch.count_nonzero(caches[0]) == 0
        # The refused pull still lets the prefill worker free its blocks.
        assert wait_results(prefill, lambda r: "p1" in r.finished_sending).finished_sending == {"p1"}
    finally:
        other.shutdown()


def test_the_runtime_thread_is_a_daemon_and_stops(pair: Pair) -> None:
    prefill, _, _, _, _ = pair
    threads = [t for t in threading.enumerate() if t.name == "dynamo-kv-transfer"]
    assert threads and all(t.daemon for t in threads)
    assert HOLD_KEY in hold_params()


def test_block_order_is_negotiated_and_a_mismatch_named() -> None:
    from kvbm.transfer.layout import KvLayoutMismatch, check_compatible

    check_compatible(layout("HND"), layout("HND"))
    with pytest.raises(KvLayoutMismatch, match="block_order: local HND, peer NHD"):
        check_compatible(layout("HND"), layout("NHD"))
    # Old peers (no field on the wire) are NHD, the built-in engine's order.
    assert KvLayoutSpec(num_layers=1, block_size_tokens=4, num_kv_heads=1, head_dim=8, dtype="float32").block_order == "NHD"


def test_vllm_nixl_is_refused_for_an_engine_without_its_own_connector() -> None:
    import asyncio

    from dynamo import errors
    from workers.disagg import start_disagg
    from workers.mocker.args import MockerConfig
    from workers.mocker.engine import MockerEngine

    engine = MockerEngine(MockerConfig())
    with pytest.raises(errors.EngineError, match="vllm-nixl is vLLM's own connector"):
        asyncio.run(start_disagg(None, engine, "decode", "backend", DisaggConfig(kv_transfer_backend="vllm-nixl")))  # type: ignore[arg-type]
