"""LoadTracker: reports corrected by this router's in-flight requests, never counted twice."""

from __future__ import annotations

from dynamo.wire import LoadMetrics
from router.load import LoadTracker, WorkerLoad


def test_in_flight_requests_count_before_any_report() -> None:
    load = LoadTracker()
    load.add("a", 1, prefill_tokens=100, decode_blocks=10)
    load.add("b", 1, prefill_tokens=50, decode_blocks=5)
    assert load.load(1) == WorkerLoad(150, 15)
    load.first_token("a")
    assert load.load(1) == WorkerLoad(50, 15)
    load.finished("a")
    load.finished("b")
    assert load.load(1) == WorkerLoad(0, 0)
    assert load.inflight_requests() == 0


def test_a_report_covers_what_was_sent_before_it() -> None:
    load = LoadTracker()
    load.add("a", 1, prefill_tokens=100, decode_blocks=10)
    # The worker reports request a (plus another router's 7 blocks): not counted twice.
    load.update(LoadMetrics(worker_id=1, kv_active_blocks=17, waiting_prefill_tokens=100))
    assert load.load(1) == WorkerLoad(100, 17)
    load.add("b", 1, prefill_tokens=30, decode_blocks=3)
    assert load.load(1) == WorkerLoad(130, 20)
    load.first_token("a")
    load.finished("a")  # its blocks left since the report
    assert load.load(1) == WorkerLoad(30, 10)


def test_estimate_never_below_own_in_flight_work() -> None:
    load = LoadTracker()
    load.add("a", 1, prefill_tokens=100, decode_blocks=10)
    # A report produced before request a arrived at the worker.
    load.update(LoadMetrics(worker_id=1))
    load.add("b", 1, prefill_tokens=10, decode_blocks=1)
    load.first_token("a")
    assert load.load(1) == WorkerLoad(10, 11)


def test_rerouted_request_and_removed_worker() -> None:
    load = LoadTracker()
    load.add("a", 1, prefill_tokens=100, decode_blocks=10)
    load.add("a", 2, prefill_tokens=100, decode_blocks=10)  # migrated to worker 2
    assert load.load(1) == WorkerLoad(0, 0)
    assert load.load(2) == WorkerLoad(100, 10)
    load.remove_worker(2)
    assert load.load(2) == WorkerLoad(0, 0)
    load.finished("a")  # harmless after removal
    load.first_token("zzz")
    assert load.inflight_requests() == 0
