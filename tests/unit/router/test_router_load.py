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


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_report_counts_what_was_in_flight_when_it_was_taken_not_when_it_arrived() -> None:
    clock = FakeClock()
    load = LoadTracker(clock)
    load.add("a", 1, prefill_tokens=264, decode_blocks=9)
    clock.now += 0.01
    taken = clock.now  # the worker takes a report while request a is prefilling
    clock.now += 0.01
    load.first_token("a")
    clock.now += 0.01
    load.finished("a")
    clock.now += 0.01
    # ... and it arrives after the router saw request a finish: a is not counted again.
    load.update(LoadMetrics(worker_id=1, kv_active_blocks=9, waiting_prefill_tokens=264, timestamp_s=taken))
    assert load.load(1) == WorkerLoad(0, 0)
    # A request sent after the report was taken is not in it, even though it was sent before
    # the report arrived.
    load.add("b", 1, prefill_tokens=40, decode_blocks=3)
    clock.now += 0.01
    load.update(LoadMetrics(worker_id=1, kv_active_blocks=9, waiting_prefill_tokens=264, timestamp_s=taken))
    assert load.load(1) == WorkerLoad(40, 3)


def test_a_report_stamped_in_the_future_counts_as_taken_on_arrival() -> None:
    clock = FakeClock()
    load = LoadTracker(clock)
    load.add("a", 1, prefill_tokens=100, decode_blocks=10)
    load.update(LoadMetrics(worker_id=1, kv_active_blocks=10, waiting_prefill_tokens=100, timestamp_s=clock.now + 5))
    assert load.load(1) == WorkerLoad(100, 10)
    clock.now += 1
    load.finished("a")
    assert load.load(1) == WorkerLoad(0, 0)


def test_history_stays_bounded_for_a_worker_that_never_reports() -> None:
    clock = FakeClock()
    load = LoadTracker(clock)
    for i in range(1000):
        load.add(f"r{i}", 1, prefill_tokens=1, decode_blocks=1)
        load.finished(f"r{i}")
        clock.now += 0.1
    assert len(load._workers[1].history) <= 2 * 10 / 0.1 + 2
    # An old report (older than the history kept) is matched to the oldest totals kept.
    load.update(LoadMetrics(worker_id=1, kv_active_blocks=5, timestamp_s=1.0))
    assert load.load(1) == WorkerLoad(0, 5)


def test_own_requests_leave_a_report_in_its_units_whole_prompts() -> None:
    # A repeat of a cached prompt: the router expects 11 uncached tokens, the worker (which
    # cannot know the hit before scheduling) reports the whole 267-token prompt as pending.
    clock = FakeClock()
    load = LoadTracker(clock)
    load.add("repeat", 1, prefill_tokens=11, decode_blocks=9, prompt_tokens=267)
    clock.now += 0.01
    load.update(LoadMetrics(worker_id=1, kv_active_blocks=9, waiting_prefill_tokens=267, timestamp_s=clock.now))
    assert load.load(1) == WorkerLoad(11, 9)
    load.first_token("repeat")
    load.finished("repeat")
    # The report still stands until the worker's next one: no phantom prefill is left.
    assert load.load(1) == WorkerLoad(0, 0)
    # Another router's 100-token prompt in the same report is kept.
    load.add("mine", 1, prefill_tokens=5, decode_blocks=2, prompt_tokens=64)
    clock.now += 0.01
    load.update(LoadMetrics(worker_id=1, kv_active_blocks=2 + 7, waiting_prefill_tokens=64 + 100, timestamp_s=clock.now))
    assert load.load(1) == WorkerLoad(105, 9)
