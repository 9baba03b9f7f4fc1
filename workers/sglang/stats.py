"""Load metrics from SGLang's per-rank load snapshots (TokenizerManager.get_loads(): a list of
sglang.srt.managers.load_snapshot.LoadSnapshot read from shared memory, cheap to poll)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from dynamo.wire import LoadMetrics


def load_from_snapshots(snapshots: Sequence[Any], page_size: int) -> LoadMetrics:
    """Sums the data-parallel ranks; KV usage is counted in pages (our blocks)."""
    page = max(1, page_size)
    running = waiting = waiting_tokens = used_tokens = total_tokens = 0
    for snap in snapshots:
        running += int(getattr(snap, "num_running_reqs", 0))
        waiting += int(getattr(snap, "num_waiting_reqs", 0))
        waiting_tokens += int(getattr(snap, "num_waiting_uncached_tokens", 0))
        used_tokens += int(getattr(snap, "num_used_tokens", 0))
        total_tokens += int(getattr(snap, "max_total_num_tokens", 0))
    return LoadMetrics(
        worker_id=0,
        active_requests=running,
        waiting_requests=waiting,
        kv_active_blocks=-(-used_tokens // page),
        kv_total_blocks=total_tokens // page,
        waiting_prefill_tokens=waiting_tokens,
        timestamp_s=time.time(),
    )
