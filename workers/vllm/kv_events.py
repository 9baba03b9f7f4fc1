"""vLLM's KV events (ZMQ PUB, msgpack batches) re-hashed with the project's block hash and
forwarded to the worker's sink, so that a router's prefix match is exactly a vLLM cache hit."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import msgspec

from dynamo.kv_hash import block_hash
from dynamo.wire import AllBlocksCleared, BlockRemoved, BlockStored, KvEventData, KvTier
from kvbm.block_pool import KvEventSink

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------
# vLLM's wire format (vllm/distributed/kv_events.py, 0.32): frames [topic, seq u64 BE, payload];
# the payload is an array-like KVEventBatch [ts, events, dp_rank] whose events are maps tagged
# by class name. Only the fields we use are declared; msgspec skips the rest, so later vLLM
# releases that add fields still decode.
# ------------------------------------------------------------------------------------------

VllmBlockHash = int | bytes  # int with VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES, else the raw digest


class VllmBlockStored(msgspec.Struct, tag="BlockStored"):
    block_hashes: list[VllmBlockHash]
    parent_block_hash: VllmBlockHash | None
    token_ids: list[int]
    block_size: int
    medium: str | None = None
    group_idx: int | None = None


class VllmBlockRemoved(msgspec.Struct, tag="BlockRemoved"):
    block_hashes: list[VllmBlockHash]
    medium: str | None = None
    group_idx: int | None = None


class VllmAllBlocksCleared(msgspec.Struct, tag="AllBlocksCleared"):
    pass


VllmKvEvent = VllmBlockStored | VllmBlockRemoved | VllmAllBlocksCleared


class VllmKvEventBatch(msgspec.Struct, array_like=True):
    ts: float
    events: list[VllmKvEvent]
    data_parallel_rank: int | None = None


BATCH_DECODER = msgspec.msgpack.Decoder(VllmKvEventBatch)

# vLLM's `medium` names. SGLang publishes the same wire format with its own names
# (workers/sglang/kv_events.py passes its map to the translator).
VLLM_TIERS: dict[str | None, KvTier] = {None: "device", "GPU": "device", "CPU": "host", "STORAGE": "disk"}
# Media of events whose block hashes are ours already: our KVBM connector inside vLLM
# (workers/vllm/connector/offload.py) announces its tiers on vLLM's event stream with them.
OUR_HASH_MEDIA: dict[str, KvTier] = {"dynamo-host": "host", "dynamo-disk": "disk"}


@dataclass(slots=True)
class _Block:
    our_hash: int
    our_parent: int | None
    refs: int  # vLLM can cache equal blocks more than once; each copy is stored/removed apart


class KvEventTranslator:
    """Turns vLLM events into ours. Keeps vLLM hash -> our hash (to translate parents and
    removals) with reference counts: vLLM may store the same hash twice, and two vLLM hashes
    (different LoRA or cache salt) may carry the same tokens and so the same hash of ours.
    A removal is forwarded only when no copy of our hash is left."""

    def __init__(
        self,
        sink: KvEventSink,
        block_size_tokens: int,
        tiers: dict[str | None, KvTier] | None = None,
    ) -> None:
        self._sink = sink
        self.block_size_tokens = block_size_tokens
        self._tiers = VLLM_TIERS if tiers is None else tiers
        self._blocks: dict[tuple[KvTier, VllmBlockHash], _Block] = {}
        self._our_refs: dict[tuple[KvTier, int], int] = {}
        self.dropped_events = 0

    def apply(self, event: VllmKvEvent) -> None:
        if isinstance(event, VllmBlockStored):
            self._stored(event)
        elif isinstance(event, VllmBlockRemoved):
            self._removed(event)
        else:
            self.clear()

    def clear(self) -> None:
        """Forget everything and tell the router to do the same (also after lost events)."""
        self._blocks.clear()
        self._our_refs.clear()
        self._sink(AllBlocksCleared())

    def snapshot(self) -> list[KvEventData]:
        """Every cached block as BlockStored events in store order, a chain per event."""
        events: list[KvEventData] = []
        seen: set[tuple[KvTier, int]] = set()
        chain: list[int] = []
        chain_parent: int | None = None
        chain_tier: KvTier = "device"
        for (tier, _), block in self._blocks.items():
            if (tier, block.our_hash) in seen:
                continue
            seen.add((tier, block.our_hash))
            if chain and tier == chain_tier and block.our_parent == chain[-1]:
                chain.append(block.our_hash)
                continue
            if chain:
                events.append(BlockStored(block_hashes=chain, parent_hash=chain_parent, tier=chain_tier))
            chain, chain_parent, chain_tier = [block.our_hash], block.our_parent, tier
        if chain:
            events.append(BlockStored(block_hashes=chain, parent_hash=chain_parent, tier=chain_tier))
        return events

    def cached_prefix_blocks(self, our_hashes: list[int]) -> int:
        """How many leading blocks of a prompt (our hashes, in order) vLLM's device cache holds."""
        n = 0
        for h in our_hashes:
            if self._our_refs.get(("device", h), 0) <= 0:
                break
            n += 1
        return n

    def _stored(self, event: VllmBlockStored) -> None:
        if not self._accept(event.group_idx, event.block_size) or not event.block_hashes:
            return
        if event.medium in OUR_HASH_MEDIA:
            self._stored_ours(event, OUR_HASH_MEDIA[event.medium])
            return
        tier = self._tiers.get(event.medium, "device")
        parent: int | None = None
        if event.parent_block_hash is not None:
            known = self._blocks.get((tier, event.parent_block_hash))
            if known is None:
                # Its parent's store was lost (or predates us): the chain cannot be re-hashed.
                self.dropped_events += 1
                log.debug("dropping vLLM BlockStored whose parent block is unknown")
                return
            parent = known.our_hash
        size = event.block_size
        tokens = event.token_ids
        if len(tokens) != size * len(event.block_hashes):
            self.dropped_events += 1
            log.warning(
                "dropping vLLM BlockStored with %d tokens for %d blocks of %d",
                len(tokens), len(event.block_hashes), size,
            )
            return
        first_parent = parent
        ours: list[int] = []
        for i, vllm_hash in enumerate(event.block_hashes):
            our_hash = block_hash(parent, tokens[i * size : (i + 1) * size])
            block = self._blocks.get((tier, vllm_hash))
            if block is None:
                self._blocks[(tier, vllm_hash)] = _Block(our_hash, parent, 1)
            else:
                block.refs += 1
            key = (tier, our_hash)
            self._our_refs[key] = self._our_refs.get(key, 0) + 1
            ours.append(our_hash)
            parent = our_hash
        # Re-storing a block the router already has is harmless: its index is a set.
        self._sink(BlockStored(block_hashes=ours, parent_hash=first_parent, tier=tier))

    def _stored_ours(self, event: VllmBlockStored, tier: KvTier) -> None:
        """Forwarded as they are; kept like re-hashed blocks (our hash for both keys)."""
        first = event.parent_block_hash
        ours = [h for h in event.block_hashes if isinstance(h, int)]
        if len(ours) != len(event.block_hashes) or not (first is None or isinstance(first, int)):
            self.dropped_events += 1
            return
        parent = first
        for h in ours:
            block = self._blocks.get((tier, h))
            if block is None:
                self._blocks[(tier, h)] = _Block(h, parent, 1)
            else:
                block.refs += 1
            self._our_refs[(tier, h)] = self._our_refs.get((tier, h), 0) + 1
            parent = h
        self._sink(BlockStored(block_hashes=ours, parent_hash=first, tier=tier))

    def _removed(self, event: VllmBlockRemoved) -> None:
        if not self._accept(event.group_idx, self.block_size_tokens):
            return
        tier = OUR_HASH_MEDIA.get(event.medium or "") or self._tiers.get(event.medium, "device")
        gone: list[int] = []
        for vllm_hash in event.block_hashes:
            block = self._blocks.get((tier, vllm_hash))
            if block is None:
                continue
            block.refs -= 1
            if block.refs == 0:
                del self._blocks[(tier, vllm_hash)]
            key = (tier, block.our_hash)
            left = self._our_refs[key] - 1
            if left:
                self._our_refs[key] = left
            else:
                del self._our_refs[key]
                gone.append(block.our_hash)
        if gone:
            self._sink(BlockRemoved(block_hashes=gone, tier=tier))

    def _accept(self, group_idx: int | None, block_size: int) -> bool:
        # Only the full-attention group of a plain decoder is routed on; other KV cache groups
        # (hybrid/sliding-window models) hash other token spans.
        if group_idx not in (None, 0):
            return False
        if block_size != self.block_size_tokens:
            self.dropped_events += 1
            log.warning("vLLM block size %d differs from the registered %d", block_size, self.block_size_tokens)
            return False
        return True


class KvEventSubscriber:
    """A ZMQ SUB socket bound on a free loopback port (vLLM's PUB connects to it: no port race,
    and nothing listens beyond this host) or connected to a user-configured vLLM endpoint,
    plus the one task that reads it. A gap in vLLM's sequence numbers means lost events: the
    translator clears, so the router under-claims rather than routes to blocks that are gone."""

    def __init__(self, translator: KvEventTranslator, topic: str = "") -> None:
        import zmq
        import zmq.asyncio

        self._translator = translator
        self._ctx = zmq.asyncio.Context()
        self._sock: Any = self._ctx.socket(zmq.SUB)
        self._sock.setsockopt(zmq.SUBSCRIBE, topic.encode())
        self._sock.setsockopt(zmq.RCVHWM, 0)  # never drop on our side; vLLM's PUB has its own HWM
        self._task: asyncio.Task[None] | None = None
        self._next_seq: int | None = None
        self.batches = 0

    def bind_loopback(self) -> str:
        """Binds 127.0.0.1 on a free port; returns the endpoint for vLLM's PUB to connect to."""
        port = self._sock.bind_to_random_port("tcp://127.0.0.1")
        return f"tcp://127.0.0.1:{port}"

    def connect(self, endpoint: str) -> None:
        """Connects to a vLLM PUB that binds (`tcp://*:5557` is reached on 127.0.0.1)."""
        self._sock.connect(endpoint.replace("*", "127.0.0.1"))

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="vllm-kv-events")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait([task])
        self._sock.close(linger=0)
        self._ctx.term()

    async def _run(self) -> None:
        while True:
            frames = await self._sock.recv_multipart()
            if len(frames) != 3:
                log.warning("ignoring a vLLM KV event message of %d frames", len(frames))
                continue
            _, seq_bytes, payload = frames
            seq = int.from_bytes(seq_bytes, "big", signed=True)
            if seq < 0:  # vLLM's end-of-replay marker
                continue
            if self._next_seq is not None and seq != self._next_seq:
                log.warning("lost vLLM KV events %d..%d: clearing this worker's blocks", self._next_seq, seq - 1)
                self._translator.clear()
            self._next_seq = seq + 1
            try:
                batch = BATCH_DECODER.decode(payload)
            except msgspec.DecodeError as exc:
                log.warning("undecodable vLLM KV event batch: %s; clearing this worker's blocks", exc)
                self._translator.clear()
                continue
            self.batches += 1
            for event in batch.events:
                self._translator.apply(event)
