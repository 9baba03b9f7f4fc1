"""Load metrics from TensorRT-LLM's iteration stats (`LLM.get_stats_async`: one dict, or its
JSON text, per engine iteration; camelCase keys as the executor's IterationStats serializes)."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any

from dynamo.wire import LoadMetrics


def parse_stats(stats: Any) -> Mapping[str, Any]:
    if isinstance(stats, (str, bytes)):
        return json.loads(stats)
    return stats


def load_from_stats(stats: Any) -> LoadMetrics:
    data = parse_stats(stats)
    kv = data.get("kvCacheStats") or {}
    batching = data.get("inflightBatchingStats") or {}
    active = int(data.get("numActiveRequests", 0))
    queued = int(data.get("numQueuedRequests", 0))
    context = int(batching.get("numContextRequests", 0))
    total = int(kv.get("maxNumBlocks", 0))
    used = kv.get("usedNumBlocks")
    if used is None:
        used = total - int(kv.get("freeNumBlocks", total))
    return LoadMetrics(
        worker_id=0,
        active_requests=max(0, active - context),
        waiting_requests=queued + context,
        kv_active_blocks=int(used),
        kv_total_blocks=total,
        timestamp_s=time.time(),
    )
