"""Per-worker load as the router sees it: the worker's last LoadMetrics report, corrected by the
requests this router sent (or finished) since that report was taken."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from dynamo.wire import LoadMetrics


@dataclass(slots=True)
class _Prediction:
    worker_id: int
    prefill_tokens: int  # prompt tokens the worker must compute; pending until first_token
    prompt_tokens: int  # the whole prompt: what the worker reports as pending until first_token
    decode_blocks: int  # KV blocks the request holds; active until request_finished
    prefilling: bool = True


@dataclass(slots=True)
class _WorkerLoad:
    reported: LoadMetrics | None = None
    own_prefill_tokens: int = 0  # uncached prompt tokens of own requests before first token
    own_prompt_tokens: int = 0  # whole prompts of the same requests, in the report's units
    own_decode_blocks: int = 0
    # Own totals when the last report was taken: the part of the report that is this router's.
    own_prompt_at_report: int = 0
    own_decode_at_report: int = 0
    # (wall time, own_prompt_tokens, own_decode_blocks) after each recent change, oldest first,
    # and the totals before the oldest one: a report is matched to the totals of its own time.
    history: deque[tuple[float, int, int]] = field(default_factory=deque)
    base_prompt: int = 0
    base_decode: int = 0


@dataclass(frozen=True, slots=True)
class WorkerLoad:
    prefill_tokens: int  # prompt tokens queued for prefill
    decode_blocks: int  # KV blocks in use by running requests


# How long a worker's report may lag behind this router's own bookkeeping and still be matched to
# the totals of its time; an older report is matched to the oldest totals kept.
HISTORY_S = 10.0


class LoadTracker:
    """Estimated load = what the last report shows beyond this router's own requests at the time
    it was taken (other routers' work), plus this router's own in-flight work now.

    - A burst of requests between two reports is seen at once (no herding onto one worker), and
      nothing is counted twice once the worker reports it.
    - Reports are matched by their timestamp, not by when they arrive: a report taken while a
      request ran but delivered after it finished must not count that request again (a worker
      that has just cached a prompt would look busy and the prompt's repeat would go elsewhere).
      A timestamp later than arrival (a worker's clock ahead of ours) counts as arrival.
    - Own requests are taken out of a report in the report's units: a worker cannot know a
      request's cache hit before scheduling it, so it reports whole prompts pending prefill,
      while this router's own estimate counts only the uncached part.
    """

    __slots__ = ("_workers", "_requests", "_clock")

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._workers: dict[int, _WorkerLoad] = {}
        self._requests: dict[str, _Prediction] = {}
        self._clock = clock  # wall clock: the workers' report timestamps are wall-clock times

    def update(self, metrics: LoadMetrics) -> None:
        state = self._worker(metrics.worker_id)
        state.reported = metrics
        now = self._clock()
        taken = min(metrics.timestamp_s, now) if metrics.timestamp_s > 0 else now
        state.own_prompt_at_report, state.own_decode_at_report = self._totals_at(state, taken)
        # A worker's reports arrive in order: changes up to this one's time are settled.
        self._prune(state, taken)

    def add(
        self,
        request_id: str,
        worker_id: int,
        prefill_tokens: int,
        decode_blocks: int,
        prompt_tokens: int | None = None,
    ) -> None:
        """`prefill_tokens`: uncached prompt tokens; `prompt_tokens`: the whole prompt (default:
        the same)."""
        if request_id in self._requests:  # re-routed (migration or retry): the old one is gone
            self.finished(request_id)
        prompt = prefill_tokens if prompt_tokens is None else prompt_tokens
        state = self._worker(worker_id)
        self._requests[request_id] = _Prediction(worker_id, prefill_tokens, prompt, decode_blocks)
        state.own_prefill_tokens += prefill_tokens
        state.own_prompt_tokens += prompt
        state.own_decode_blocks += decode_blocks
        self._changed(state)

    def first_token(self, request_id: str) -> None:
        prediction = self._requests.get(request_id)
        if prediction is None or not prediction.prefilling:
            return
        prediction.prefilling = False
        state = self._workers.get(prediction.worker_id)
        if state is not None:
            state.own_prefill_tokens -= prediction.prefill_tokens
            state.own_prompt_tokens -= prediction.prompt_tokens
            self._changed(state)

    def finished(self, request_id: str) -> None:
        prediction = self._requests.pop(request_id, None)
        if prediction is None:
            return
        state = self._workers.get(prediction.worker_id)
        if state is None:
            return
        if prediction.prefilling:
            state.own_prefill_tokens -= prediction.prefill_tokens
            state.own_prompt_tokens -= prediction.prompt_tokens
        state.own_decode_blocks -= prediction.decode_blocks
        self._changed(state)

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
        others_prefill = max(reported.waiting_prefill_tokens - state.own_prompt_at_report, 0)
        others_decode = max(reported.kv_active_blocks - state.own_decode_at_report, 0)
        return WorkerLoad(
            others_prefill + state.own_prefill_tokens, others_decode + state.own_decode_blocks
        )

    def inflight_requests(self) -> int:
        return len(self._requests)

    def _changed(self, state: _WorkerLoad) -> None:
        now = self._clock()
        state.history.append((now, state.own_prompt_tokens, state.own_decode_blocks))
        self._prune(state, now - HISTORY_S)  # bounded for workers that stopped reporting

    @staticmethod
    def _totals_at(state: _WorkerLoad, at: float) -> tuple[int, int]:
        """This router's own (prompt tokens, decode blocks) for the worker at wall time `at`."""
        for changed_at, prompt, decode in reversed(state.history):
            if changed_at <= at:
                return prompt, decode
        return state.base_prompt, state.base_decode

    @staticmethod
    def _prune(state: _WorkerLoad, before: float) -> None:
        history = state.history
        while history and history[0][0] <= before:
            _, state.base_prompt, state.base_decode = history.popleft()

    def _worker(self, worker_id: int) -> _WorkerLoad:
        state = self._workers.get(worker_id)
        if state is None:
            state = self._workers[worker_id] = _WorkerLoad()
        return state
