"""TensorRT-LLM's KV cache events (dicts from `LLM.get_kv_cache_events_async`, as its
KVCacheEventSerializer writes them) re-hashed with the project's block hash, through the same
translator as vLLM's events (parents mapped, reference-counted removals).

    {"event_id": n, "window_size": w, "data": {"type": "stored", "parent_hash": h | None,
        "blocks": [{"type": "stored_block", "block_hash": h, "tokens": [{"token_id": t, ...}],
                    "cache_level": 0 | 1, "priority": p}]}}
    {"event_id": n, "data": {"type": "removed", "block_hashes": [h, ...]}}
    "created" (pool sizes) and "updated" (priority / level changes) carry nothing to route on.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from kvbm.block_pool import KvEventSink
from workers.vllm.kv_events import (
    VLLM_TIERS,
    KvEventTranslator,
    VllmAllBlocksCleared,
    VllmBlockRemoved,
    VllmBlockStored,
)

log = logging.getLogger(__name__)

# cache_level 0 is the GPU (primary) pool, 1 the host (secondary) offload pool.
_LEVEL_MEDIUM = {0: "GPU", 1: "CPU"}


class TrtllmKvEvents:
    """Feeds TensorRT-LLM event dicts into a KvEventTranslator. A gap in event ids means lost
    events: everything is cleared, so the router under-claims rather than routes to blocks
    that are gone."""

    def __init__(self, sink: KvEventSink, tokens_per_block: int) -> None:
        self.translator = KvEventTranslator(sink, tokens_per_block, VLLM_TIERS)
        self._next_id: int | None = None
        self.total_blocks: int | None = None  # from the "created" event, when it comes
        self.partial_blocks = 0

    @property
    def tokens_per_block(self) -> int:
        return self.translator.block_size_tokens

    @tokens_per_block.setter
    def tokens_per_block(self, value: int) -> None:
        self.translator.block_size_tokens = value

    def apply(self, event: Mapping[str, Any]) -> None:
        event_id = event.get("event_id")
        if isinstance(event_id, int):
            if self._next_id is not None and event_id > self._next_id:
                log.warning(
                    "lost TensorRT-LLM KV events %d..%d: clearing this worker's blocks", self._next_id, event_id - 1
                )
                self.translator.apply(VllmAllBlocksCleared())
            self._next_id = event_id + 1
        data = event.get("data") or {}
        kind = data.get("type")
        if kind == "stored":
            self._stored(data)
        elif kind == "removed":
            self._removed(data)
        elif kind == "created":
            levels = data.get("num_blocks_per_cache_level") or []
            if levels:
                self.total_blocks = int(levels[0])

    def _stored(self, data: Mapping[str, Any]) -> None:
        size = self.tokens_per_block
        parent = data.get("parent_hash")
        run: list[int] = []
        run_tokens: list[int] = []
        run_medium: str | None = None
        run_parent = parent
        for block in data.get("blocks") or []:
            tokens = [int(t["token_id"]) if isinstance(t, Mapping) else int(t) for t in block.get("tokens") or []]
            if len(tokens) != size:
                # A partial block (the tail of a sequence) is not a routable prefix block, and
                # nothing chained after it can be re-hashed either.
                self.partial_blocks += 1
                break
            medium = _LEVEL_MEDIUM.get(int(block.get("cache_level") or 0), "GPU")
            if run and medium != run_medium:
                self._emit(run, run_parent, run_tokens, run_medium)
                run_parent = run[-1]
                run, run_tokens = [], []
            run_medium = medium
            run.append(int(block["block_hash"]))
            run_tokens.extend(tokens)
        if run:
            self._emit(run, run_parent, run_tokens, run_medium)

    def _emit(self, hashes: list[int], parent: Any, tokens: list[int], medium: str | None) -> None:
        self.translator.apply(
            VllmBlockStored(
                block_hashes=list(hashes),
                parent_block_hash=None if parent is None else int(parent),
                token_ids=tokens,
                block_size=self.tokens_per_block,
                medium=medium,
            )
        )

    def _removed(self, data: Mapping[str, Any]) -> None:
        hashes = [int(h) for h in data.get("block_hashes") or []]
        if not hashes:
            return
        # TensorRT-LLM removes from the GPU pool; an offloaded copy is stored anew at level 1.
        self.translator.apply(VllmBlockRemoved(block_hashes=hashes, medium="GPU"))
