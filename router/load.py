"""Per-worker load as the router sees it: the worker's last LoadMetrics report, corrected by the
requests this router sent (or finished) since that report."""

from __future__ import annotations

from dataclasses import dataclass

from dynamo.wire import LoadMetrics


@dataclass(slots=True)
class _Prediction:
    worker_id: int
    prefill_tokens: int  # prompt tokens the worker must compute; pending until first_token
    decode_blocks: int  # KV blocks the request holds; active until request_finished
    prefilling: bool = True


@dataclass(slots=True)
class _WorkerLoad:
    reported: LoadMetrics | None = None
    own_prefill_tokens: int = 0
    own_decode_blocks: int = 0
    # This router's own totals when the last report arrived: what the report already covers.
    own_prefill_at_report: int = 0
    own_decode_at_report: int = 0


@dataclass(frozen=True, slots=True)
class WorkerLoad:
    prefill_tokens: int  # prompt tokens queued for prefill
    decode_blocks: int  # KV blocks in use by running requests


class LoadTracker:
    """Estimated load = last report + (this router's in-flight totals now - at that report).

    A report already counts the requests this router had sent before it (other routers'
    requests too), so only the change since then is added: a burst of requests between two
    reports is seen at once (no herding onto one worker), and nothing is counted twice once
    the worker reports it. The estimate never drops below this router's own in-flight work.
    """

    __slots__ = ("_workers", "_requests")

    def __init__(self) -> None:
        self._workers: dict[int, _WorkerLoad] = {}
        self._requests: dict[str, _Prediction] = {}

    def update(self, metrics: LoadMetrics) -> None:
        state = self._worker(metrics.worker_id)
        state.reported = metrics
        state.own_prefill_at_report = state.own_prefill_tokens
        state.own_decode_at_report = state.own_decode_blocks

    def add(self, request_id: str, worker_id: int, prefill_tokens: int, decode_blocks: int) -> None:
        if request_id in self._requests:  # re-routed (migration or retry): the old one is gone
            self.finished(request_id)
        state = self._worker(worker_id)
        self._requests[request_id] = _Prediction(worker_id, prefill_tokens, decode_blocks)
        state.own_prefill_tokens += prefill_tokens
        state.own_decode_blocks += decode_blocks

    def first_token(self, request_id: str) -> None:
        prediction = self._requests.get(request_id)
        if prediction is None or not prediction.prefilling:
            return
        prediction.prefilling = False
        state = self._workers.get(prediction.worker_id)
        if state is not None:
            state.own_prefill_tokens -= prediction.prefill_tokens

    def finished(self, request_id: str) -> None:
        prediction = self._requests.pop(request_id, None)
        if prediction is None:
            return
        state = self._workers.get(prediction.worker_id)
        if state is None:
            return
        if prediction.prefilling:
            state.own_prefill_tokens -= prediction.prefill_tokens
        state.own_decode_blocks -= prediction.decode_blocks

    def remove_worker(self, worker_id: int) -> None:
        self._workers.pop(worker_id, None)
        for request_id in [r for r, p in self._requests.items() if p.worker_id == worker_id]:
            del self._requests[request_id]

    def load(self, worker_id: int) -> WorkerLoad:
        state = self._workers.get(worker_id)
        if state is None:
            return WorkerLoad(0, 0)
        reported = state.reported
        if reported is None:
            return WorkerLoad(state.own_prefill_tokens, state.own_decode_blocks)
        prefill = reported.waiting_prefill_tokens + state.own_prefill_tokens - state.own_prefill_at_report
        decode = reported.kv_active_blocks + state.own_decode_blocks - state.own_decode_at_report
        return WorkerLoad(max(prefill, state.own_prefill_tokens), max(decode, state.own_decode_blocks))

    def inflight_requests(self) -> int:
        return len(self._requests)

    def _worker(self, worker_id: int) -> _WorkerLoad:
        state = self._workers.get(worker_id)
        if state is None:
            state = self._workers[worker_id] = _WorkerLoad()
        return state
