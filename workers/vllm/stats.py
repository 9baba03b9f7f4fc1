"""Load metrics from vLLM's scheduler stats, caught with a stat logger that keeps the latest
numbers (vLLM calls it on the event loop, from AsyncLLM's output handler, after each step)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vllm.v1.metrics.loggers import StatLoggerBase


@dataclass(slots=True)
class SchedulerSnapshot:
    seen: bool = False
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0  # fraction of the KV blocks in use
    # Gets each step's KV-connector stats payload (our KVBM connector's counters come this way
    # out of vLLM's engine core: workers/vllm/connector/offload.py).
    on_connector_stats: Callable[[Any], None] | None = None


class _LatestStats(StatLoggerBase):
    def __init__(self, vllm_config: Any, engine_index: int = 0, *, into: SchedulerSnapshot) -> None:
        self._into = into

    def record(
        self,
        scheduler_stats: Any,
        iteration_stats: Any,
        mm_cache_stats: Any = None,
        engine_idx: int = 0,
    ) -> None:
        if scheduler_stats is None:
            return
        into = self._into
        into.seen = True
        into.num_running = scheduler_stats.num_running_reqs
        into.num_waiting = scheduler_stats.num_waiting_reqs + scheduler_stats.num_skipped_waiting_reqs
        into.kv_cache_usage = scheduler_stats.kv_cache_usage
        payload = getattr(scheduler_stats, "kv_connector_stats", None)
        if payload and into.on_connector_stats is not None:
            into.on_connector_stats(payload)

    def log_engine_initialized(self) -> None:
        pass


def stat_logger_factory(into: SchedulerSnapshot) -> Any:
    """A vLLM StatLoggerFactory whose loggers write into `into`."""

    def make(vllm_config: Any, engine_index: int = 0) -> StatLoggerBase:
        return _LatestStats(vllm_config, engine_index, into=into)

    return make
