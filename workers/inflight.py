"""The requests an engine adapter (vLLM, SGLang, TensorRT-LLM) has handed to its engine, as the
adapter counts them itself: how many are in flight and the prompt tokens of those that have not
produced a first output yet. Load reports use it where the engine's own figures lag behind."""

from __future__ import annotations

from dynamo.wire import LoadMetrics


class InflightRequests:
    """`started` when a request is handed to the engine, `first_output` when its first output
    comes back, `ended` when its stream closes (however it ends)."""

    __slots__ = ("count", "_prefill_tokens")

    def __init__(self) -> None:
        self.count = 0
        # Prompt tokens of requests that have not produced their first output yet.
        self._prefill_tokens: dict[str, int] = {}

    def started(self, request_id: str, prompt_tokens: int) -> None:
        self.count += 1
        self._prefill_tokens[request_id] = prompt_tokens

    def first_output(self, request_id: str) -> None:
        self._prefill_tokens.pop(request_id, None)

    def ended(self, request_id: str) -> None:
        self.count -= 1
        self._prefill_tokens.pop(request_id, None)

    @property
    def waiting(self) -> int:
        """Requests with no output yet."""
        return len(self._prefill_tokens)

    @property
    def running(self) -> int:
        """Requests that have produced output and not ended."""
        return self.count - len(self._prefill_tokens)

    @property
    def waiting_prefill_tokens(self) -> int:
        """Prompt tokens of the waiting requests."""
        return sum(self._prefill_tokens.values())

    def lags(self, load: LoadMetrics) -> bool:
        """`load`, the engine's last report, shows no request although some are in flight: it
        was taken before they arrived."""
        return self.count > 0 and not load.active_requests and not load.waiting_requests

    def load(self, kv_active_blocks: int, kv_total_blocks: int, timestamp_s: float) -> LoadMetrics:
        """The load as counted here, with the engine's KV figures; worker_id is the worker's to
        fill in."""
        return LoadMetrics(
            worker_id=0,
            active_requests=self.running,
            waiting_requests=self.waiting,
            kv_active_blocks=kv_active_blocks,
            kv_total_blocks=kv_total_blocks,
            waiting_prefill_tokens=self.waiting_prefill_tokens,
            timestamp_s=timestamp_s,
        )
