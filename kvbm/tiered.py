"""The bookkeeping of KVBM's lower tiers (G2 host, G3 disk): what is where, what an eviction from
the device copies down, what a prompt can onboard. It moves no bytes: it turns decisions into a
TransferPlan that an executor (real tensors in kvbm/manager.py, a time model in
kvbm/simulated.py, vLLM's worker side) carries out, and it emits the tiers' KV events.

A tier is a cache: its upkeep may be skipped, never waited for. Host blocks next in line for
eviction are written to disk ahead of time (WriteOp), so evicting them later costs nothing;
a write holds its host slot until it completes, and a block that finds every slot held, or the
disk writer behind, is not kept (counted by reason). A file is announced, and found by
lookups, only once its write has completed."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from dynamo.wire import BlockRemoved, BlockStored, KvEventData
from kvbm.block_pool import EvictedBlock, KvEventSink
from kvbm.config import KvbmConfig
from kvbm.metrics import KvbmMetrics, KvbmStats
from kvbm.offload_value import OffloadValue
from kvbm.onboard_cost import OnboardCostModel
from kvbm.policy import OffloadPolicy
from kvbm.registry import TierEntry, TierIndex

HOST = "host"
DISK = "disk"


@dataclass(slots=True, frozen=True)
class WriteOp:
    """Host slot -> disk file: a host block written ahead of its eviction. The slot was filled
    by an earlier plan; it and the file's index entry stay pinned until the write completes
    (TieredCache polls DiskWrites.completed()), so no plan reuses the slot meanwhile."""

    block_hash: int
    parent_hash: int | None
    host_slot: int


@dataclass(slots=True, frozen=True)
class OffloadOp:
    """Device block -> host slot, or -> disk file when there is no host tier (pinned and
    unannounced until written, like a WriteOp's)."""

    device_block: int
    block_hash: int
    parent_hash: int | None
    tier: str
    slot: int


@dataclass(slots=True, frozen=True)
class OnboardOp:
    """Host slot or disk file -> device block, after the offloads read the device blocks it
    reuses."""

    block_hash: int
    tier: str
    slot: int
    device_block: int
    # A disk block already read off the model thread (a DiskReads row the executor copies
    # from); None: the executor reads the file itself.
    staged: Any = None


@dataclass(slots=True, frozen=True)
class DeleteOp:
    """A disk file evicted from the index; deleted after any write of it still queued."""

    block_hash: int


@dataclass(slots=True)
class TransferPlan:
    """Work gathered between two engine steps: offloads (their device-side reads) before the
    onboards that may reuse those device blocks; deletes queued for the disk before writes.
    Every entry read or written here is pinned, until TieredCache.finish() for offloads and
    onboards, until the write completes for writes: no slot is both evicted and read."""

    writes: list[WriteOp] = field(default_factory=list)
    offloads: list[OffloadOp] = field(default_factory=list)
    onboards: list[OnboardOp] = field(default_factory=list)
    deletes: list[DeleteOp] = field(default_factory=list)
    pinned: list[tuple[TierIndex, TierEntry]] = field(default_factory=list)
    # Seconds the executor's thread spent on the plan's offloads, writes and deletes, its
    # onboards excluded (None: not measured, as in the mocker, whose upkeep costs no step time).
    upkeep_s: float | None = None

    def __bool__(self) -> bool:
        return bool(self.writes or self.offloads or self.onboards or self.deletes)


@dataclass(slots=True, frozen=True)
class LowerHit:
    """A prompt block found below the device, pinned until onboarded or released."""

    block_hash: int
    tier: str
    entry: TierEntry
    staged: Any = None  # see OnboardOp.staged


class Hits(list[LowerHit]):
    """lookup()'s answer: the hits worth onboarding, in prefix order, and per tier how many
    further hits were left to recompute because reading them would have cost more."""

    def __init__(self, hits: Sequence[LowerHit] = (), declined: Counter[str] | None = None) -> None:
        super().__init__(hits)
        self.declined: Counter[str] = declined if declined is not None else Counter()


class DiskReads(Protocol):
    """Reads of disk blocks started for one held-back request (kvbm/manager.py's executor
    makes them). `done` turns true from another thread; `staged(h)` is then the block's bytes
    (an opaque row for the executor), or None if it could not be read."""

    hits: list[LowerHit]  # the request's lower-tier hits, pinned until TieredCache.close_reads

    @property
    def done(self) -> bool: ...

    def staged(self, block_hash: int) -> Any: ...

    def close(self) -> None: ...


class DiskReader(Protocol):
    def start(self, hashes: Sequence[int]) -> DiskReads:
        """Start reading (only files whose writes have completed: the index holds no other)."""
        ...


class DiskWrites(Protocol):
    """The disk writer as the cache sees it (kvbm.disk_tier.DiskStore, or the mocker's
    simulated one). Without one the executor is synchronous: a plan's writes count as done
    when it is taken (vLLM's worker side copies them out before the next plan runs)."""

    def completed(self) -> list[tuple[int, bool]]:
        """(block hash, written) of the writes finished since the last call, in order."""
        ...


class TieredCache:
    """G2 and G3 indexes (either may be absent), the offload policy and the pending plan.

    Call from one thread (the engine's scheduling thread). `evicted` is the device pool's
    eviction hook; `lookup` / `onboard` / `release` serve admission; `take_plan` hands the
    pending work to the executor and `finish` unpins it afterwards.
    """

    def __init__(
        self,
        config: KvbmConfig,
        block_bytes: int,
        on_event: KvEventSink | None = None,
        disk_writes: DiskWrites | None = None,
        block_size_tokens: int | None = None,
    ) -> None:
        self.config = config
        self.block_bytes = block_bytes
        # Tokens per block: what a declined hit costs to recompute. None: no cost model.
        self.block_size_tokens = block_size_tokens
        self.cost = OnboardCostModel(config.host_gbps, config.disk_gbps,
                                     enabled=config.onboard_cost and block_size_tokens is not None)
        self._declined: dict[object, Counter[str]] = {}  # of requests held back for reads
        # Reads in progress: when they started and the bytes they read. From start to the
        # request's admission is what a disk hit costs it (the read, then the wait for a step).
        self._read_started: dict[object, tuple[float, int]] = {}
        # The engine's clock for step times (the mocker's simulated one, set by SimulatedKvbm).
        self.clock: Callable[[], float] = time.perf_counter
        self._step_starts: dict[int, float] = {}  # id(batch) -> when it was scheduled
        self._last_step_end = float("-inf")
        self._step_seqs = 1  # requests in the last scheduled step
        host_blocks = config.host_capacity_blocks(block_bytes)
        disk_blocks = config.disk_capacity_blocks(block_bytes)
        args = (config.eviction, config.protected_fraction)
        self.host = TierIndex(HOST, host_blocks, *args) if host_blocks > 0 else None
        self.disk = TierIndex(DISK, disk_blocks, *args) if disk_blocks > 0 else None
        # Host first: lookups prefer it. Fixed for the cache's life; read for every prompt block.
        self.tiers: tuple[TierIndex, ...] = tuple(t for t in (self.host, self.disk) if t is not None)
        self.policy = OffloadPolicy(config.offload_policy, config.offload_min_hits)
        # Whether offloading to a tier pays (its hits' savings against the upkeep's cost).
        self.offload_value = OffloadValue(enabled=config.offload_cost and block_size_tokens is not None)
        self._disk_bypassed = False  # the last eviction batch left the disk out: no writes ahead
        self.stats = KvbmStats()
        self._on_event = on_event
        self._disk_writes = disk_writes
        # Writes planned and not yet reported done, by block hash: the host entry they read
        # (None: a device block written straight to disk) and the file's entry. Both are
        # pinned; the file is announced, and found by lookups, once done. At most
        # config.disk_queue_blocks: past that the disk is behind and blocks are not kept.
        self._writing: dict[int, tuple[TierEntry | None, TierEntry]] = {}
        self._write_failed: set[int] = set()  # host blocks whose write failed: not tried again
        self._plan = TransferPlan()
        # Set by an executor that reads disk blocks off the model thread: a prompt hitting
        # the disk is then held back until its reads are done (see start_reads).
        self.reader: DiskReader | None = None
        # Set by an executor whose disk tier is a directory other workers may share: whether
        # a block's file exists there. A prompt block no tier knows is then looked for on
        # disk (a neighbour may have written it since this worker started) and adopted.
        self.disk_probe: Callable[[int], bool] | None = None
        # What the gauges were last set to (_report_usage).
        self._reported_usage: list[tuple[str, int, int]] | None = None
        self._reported_estimates: dict[str, float | None] | None = None

    # ------------------------------------------------------------------------------ queries

    def has_pending(self) -> bool:
        return bool(self._plan)

    def bind_metrics(self, metrics: KvbmMetrics) -> None:
        self.stats.metrics = metrics
        self._reported_usage, self._reported_estimates = None, None  # a new registry: report all
        self._report_usage()

    # ---------------------------------------------------------------------------- admission

    def lookup(self, block_hashes: Sequence[int], device_blocks: int) -> Hits:
        """Pin the leading blocks of `block_hashes[device_blocks:]` that a lower tier holds
        (host preferred), up to the first miss, and of those keep the leading ones the cost
        model finds cheaper to onboard than to recompute (the rest are unpinned and counted
        in `declined`). `block_hashes` is the prompt's usable prefix."""
        self._poll_writes()
        hits = self._lookup(block_hashes, device_blocks)
        if not hits or not self.cost.enabled:
            return Hits(hits)
        assert self.block_size_tokens is not None
        # A recomputed token lengthens steps every running request shares; a read delays only
        # its own request (measured on the mocker: weighing by the step's requests beat
        # weighing by the requester alone or by the step's prefills, benchmarks/RESULTS.md).
        keep = self.cost.choose([hit.tier for hit in hits], self.block_bytes, self.block_size_tokens, self._sharing())
        if keep == len(hits):
            return Hits(hits)
        self.release(hits[keep:])
        return Hits(hits[:keep], Counter(hit.tier for hit in hits[keep:]))

    def _lookup(self, block_hashes: Sequence[int], device_blocks: int) -> list[LowerHit]:
        hits: list[LowerHit] = []
        writing = self._writing
        for i in range(device_blocks, len(block_hashes)):
            h = block_hashes[i]
            for tier in self.tiers:
                entry = tier.get(h)
                if entry is not None and not (tier is self.disk and h in writing):  # a file being written is no hit
                    tier.pin(entry)
                    hits.append(LowerHit(h, tier.name, entry))
                    break
            else:
                entry = self._adopt_neighbours_block(h, block_hashes[i - 1] if i > 0 else None)
                if entry is None:
                    break
                self.disk.pin(entry)  # type: ignore[union-attr]
                hits.append(LowerHit(h, DISK, entry))
        return hits

    def _adopt_neighbours_block(self, block_hash: int, parent_hash: int | None) -> TierEntry | None:
        """A block another worker sharing the disk directory wrote after this one started:
        index it (announcing it, tier disk), if the disk tier has room. One stat per prompt at
        most: lookups stop at the first block found nowhere. None without a stat where no disk
        hit could pay for its read (a fast GPU's case): the stat runs on the event loop."""
        disk, probe = self.disk, self.disk_probe
        if disk is None or probe is None or block_hash in disk or len(disk) >= disk.capacity_blocks:
            return None
        if not self.cost.can_pay(DISK, self.block_bytes, self.block_size_tokens or 0, self._sharing()):
            return None
        if not probe(block_hash):
            return None
        entry, _ = disk.insert(block_hash, parent_hash)
        if entry is not None:
            self.stats.adopted += 1
            self._emit_changes({DISK: [(block_hash, parent_hash)]}, {})
        return entry

    def start_reads(self, hits: Sequence[LowerHit]) -> DiskReads | None:
        """With a reader set and some `hits` on disk: start reading those blocks off the
        model thread and return the reads, which keep every hit pinned (so neither the host
        blocks nor the files of the prefix go meanwhile). The caller holds its request back
        until `done`, then admits it with lookup_staged(). None: nothing to read, admit now."""
        if self.reader is None:
            return None
        on_disk = [hit.block_hash for hit in hits if hit.tier == DISK]
        if not on_disk:
            return None
        reads = self.reader.start(on_disk)
        reads.hits = list(hits)
        self._read_started[reads] = (self.clock(), len(on_disk) * self.block_bytes)
        declined = getattr(hits, "declined", None)
        if declined:
            self._declined[reads] = declined
        return reads

    def lookup_staged(self, block_hashes: Sequence[int], device_blocks: int, reads: DiskReads) -> list[LowerHit]:
        """lookup() for a request whose disk reads are done: disk hits carry their staged
        bytes, and the hits stop at the first disk block that was not read (it is
        recomputed; an unreadable file is dropped from the index). Never starts new reads.
        The reads are paid for: what they staged is onboarded without asking the cost model
        again (its first decision chose which blocks to read)."""
        started = self._read_started.pop(reads, None)
        if started is not None:
            self.cost.observe_read(DISK, started[1], self.clock() - started[0])
        hits = self._lookup(block_hashes, device_blocks)
        declined = self._declined.get(reads)
        kept = Hits(declined=declined)
        # What the cost model declined stays declined, even where a tier holds it now.
        limit = len(reads.hits) if declined else len(hits)
        for i, hit in enumerate(hits):
            if i == limit:
                self.release(hits[i:])
                break
            if hit.tier == DISK:
                row = reads.staged(hit.block_hash)
                if row is None:
                    self.release(hits[i:])
                    break
                hit = LowerHit(hit.block_hash, hit.tier, hit.entry, row)
            kept.append(hit)
        return kept

    def close_reads(self, reads: DiskReads) -> None:
        """Drop reads (their request was admitted or aborted): unpin their entries and
        forget the files that could not be read."""
        self.release(reads.hits)
        self._declined.pop(reads, None)
        self._read_started.pop(reads, None)
        if reads.done:
            for hit in reads.hits:
                if hit.tier == DISK and reads.staged(hit.block_hash) is None:
                    self.forget_disk(hit.block_hash)
        reads.hits = []
        reads.close()

    def release(self, hits: Sequence[LowerHit]) -> None:
        """Unpin hits that will not be onboarded (the request was not admitted)."""
        for hit in hits:
            self._tier(hit.tier).unpin(hit.entry)

    def onboard(self, block_hashes: Sequence[int], device_blocks: int, hits: Sequence[LowerHit],
                device_block_ids: Sequence[int], plan: TransferPlan | None = None) -> None:
        """Plan copying each hit into the fresh device block beside it; the pins move to the
        plan: `plan`, one the caller finishes itself (a load that outlives the step), or
        None for the pending plan. Also tells the policy about the admitted prompt."""
        target = self._plan if plan is None else plan
        self.policy.record(block_hashes, device_blocks + len(hits))
        stats = self.stats
        for tier_name, blocks in getattr(hits, "declined", {}).items():
            stats.decided(tier_name, "recompute", blocks)
        per_tier: Counter[str] = Counter()
        for hit, block_id in zip(hits, device_block_ids, strict=True):
            tier = self._tier(hit.tier)
            tier.touch(hit.block_hash)
            target.onboards.append(OnboardOp(hit.block_hash, hit.tier, hit.entry.slot, block_id, hit.staged))
            target.pinned.append((tier, hit.entry))
            per_tier[hit.tier] += 1
        # Tallied per tier, not per block (as offloads are): each costs a Prometheus lookup.
        for tier_name, blocks in per_tier.items():
            self.offload_value.hit(tier_name, blocks)
            stats.hit(tier_name, blocks)
            stats.onboarded(tier_name, blocks, blocks * self.block_bytes)
            stats.decided(tier_name, "onboard", blocks)

    def step_started(self, batch: Any) -> None:
        """The scheduler picked a step (a ScheduledBatch; step_finished times it)."""
        starts = self._step_starts
        if len(starts) > 64:  # steps that never finished (a failed engine): forget them
            starts.clear()
        starts[id(batch)] = self.clock()
        self.step_requests(len(batch.seqs))

    def step_requests(self, count: int) -> None:
        """The engine scheduled a step of `count` requests: how many a recomputed prompt token
        delays (lookup weighs recompute with it; step_started counts its batch's itself)."""
        self._step_seqs = max(1, count)

    @property
    def last_step_requests(self) -> int:
        """Requests in the last scheduled step (at least one)."""
        return self._step_seqs

    def step_finished(self, batch: Any, num_tokens: int) -> None:
        """A step's results are in: its time, from when it was picked or, when steps overlap,
        from when the one before it finished (the device runs one at a time), is what
        recomputing a prompt block is weighed with."""
        start = self._step_starts.pop(id(batch), None)
        if start is None:
            return
        now = self.clock()
        began, self._last_step_end = max(start, self._last_step_end), now
        self.cost.observe_step(num_tokens, now - began)

    def observe_step(self, num_tokens: int, seconds: float) -> None:
        """The engine computed a step of `num_tokens` tokens in `seconds` (its forward pass):
        what recomputing a declined hit costs."""
        self.cost.observe_step(num_tokens, seconds)

    def observe_upkeep(self, seconds: float, blocks: int) -> None:
        """Carrying out `blocks` offloads and disk writes (launching copies, queueing writes,
        or copying where an executor does it in line) held up a step for `seconds`: the
        executor's part of what an offload costs (kvbm/offload_value.py)."""
        self.offload_value.observe_cost("execute", seconds, blocks)

    def observe_read(self, tier: str, nbytes: int, seconds: float) -> None:
        """An executor moved `nbytes` of `tier` toward the device in `seconds` (see
        OnboardCostModel.observe_read)."""
        self.cost.observe_read(tier, nbytes, seconds)

    def record(self, block_hashes: Sequence[int], cached_blocks: int) -> None:
        """An admitted prompt with no lower-tier hits (the policy still counts it)."""
        self.policy.record(block_hashes, cached_blocks)

    # ------------------------------------------------------------------------------ offload

    def evicted(self, blocks: Sequence[EvictedBlock]) -> None:
        """The device pool's eviction hook: plan copying each chosen block down before the
        device block is reused (the executor runs the plan before the next forward pass).
        Never waits: a block that finds no slot it can take at once is not kept (counted)."""
        if not self.tiers:
            return
        started = self.clock()
        self._poll_writes()
        stored: dict[str, list[tuple[int, int | None]]] = {HOST: [], DISK: []}
        removed: dict[str, list[int]] = {HOST: [], DISK: []}
        # A tier whose offloads do not pay takes this batch only now and then (offload_value).
        host = self.host if self.host is not None and self._keeps(HOST, self.host) else None
        disk = self.disk if self.disk is not None and self._keeps(DISK, self.disk) else None
        self._disk_bypassed = self.disk is not None and disk is None
        # Blocks left out: the host's whole batch, or the disk's when nothing above takes it (a
        # disk behind a host that took the batch loses only the host's victims: counted there).
        if self.host is not None and host is None:
            self.stats.skip(HOST, "cost_model", len(blocks))
        if self._disk_bypassed and host is None:
            self.stats.skip(DISK, "cost_model", len(blocks))
        if host is None and disk is None:
            return  # no tier takes the batch: nothing to do per block (the usual case on a fast GPU)
        offloads_before = len(self._plan.offloads)
        for block in blocks:
            h = block.block_hash
            if not self.policy.should_offload(h):
                self.stats.skip(self.tiers[0].name, "policy")
            elif host is None:
                if disk is not None and h not in disk:
                    self._offload_to_disk(block, removed)
            elif h in host:
                continue  # inclusive tiers: already kept below
            elif len(host) < host.capacity_blocks:
                self._offload_to_host(block, stored, removed)
            else:
                victim = host.next_victim()
                if victim is not None and (disk is None or victim.block_hash in disk):
                    self._offload_to_host(block, stored, removed)  # the victim is kept on disk already
                elif disk is not None and h in disk:
                    continue  # kept on disk already; the host's blocks stay
                elif disk is not None and len(self._writing) < self.config.disk_queue_blocks:
                    # The host's next victim is not on disk yet (a burst the writes ahead have
                    # not caught up with, or every slot pinned): keep both, this one on disk.
                    self._offload_to_disk(block, removed)
                elif victim is not None:
                    self._offload_to_host(block, stored, removed)  # the victim is lost (counted)
                else:
                    # Every slot is held by a write to disk or an onboard in progress.
                    self.stats.skip(HOST, "slots_busy")
        self._emit_changes(stored, removed)
        # Counted per batch, not per block: the tallies (and their Prometheus children) cost
        # about as much per call as the rest of a block's bookkeeping.
        added = self._plan.offloads[offloads_before:]
        to_host = sum(1 for op in added if op.tier == HOST)
        if to_host:
            self.stats.offloaded(HOST, to_host, to_host * self.block_bytes)
            self.offload_value.offloaded(HOST, to_host)
        self.offload_value.offloaded(DISK, len(added) - to_host)  # disk stats count completed writes
        self.offload_value.observe_cost("schedule", self.clock() - started, len(added))

    def _keeps(self, name: str, tier: TierIndex) -> bool:
        """Whether an eviction batch goes to this tier (for the disk: also the writes ahead
        until the next batch): see kvbm/offload_value.py. What a hit saves: recomputing a
        block, weighed as lookup() weighs it, less reading it back."""
        value = self.offload_value
        if not value.enabled:
            return True
        assert self.block_size_tokens is not None
        recompute = self.cost.recompute_s(self.block_size_tokens)
        saved = None
        if recompute is not None:
            read = self.cost.block_onboard_s(name, self.block_bytes)
            saved = recompute - read / max(1.0, self._sharing())  # per request of the step, as the cost is
        return value.keep_batch(name, saved, tier.capacity_blocks)

    def _sharing(self) -> float:
        """How many requests a recomputed token delays: those of the step it lengthens (a read
        delays only its own request), or 1 to weigh the requester's time alone."""
        return float(self._step_seqs) if self.config.onboard_cost_sharing else 1.0

    def _offload_to_host(self, block: EvictedBlock, stored: dict[str, list[tuple[int, int | None]]],
                         removed: dict[str, list[int]]) -> None:
        host = self.host
        assert host is not None
        entry, victims = host.insert(block.block_hash, block.parent_hash)
        assert entry is not None  # the caller saw a free slot or an unpinned victim
        for victim in victims:  # unpinned, so not being written
            h = victim.block_hash
            removed[HOST].append(h)
            if h in self._write_failed:
                self._write_failed.discard(h)  # counted when its write failed
            elif self.disk is not None and h not in self.disk:
                # Not written ahead: left out as not worth it, or the writer had no room.
                self.stats.skip(DISK, "cost_model" if self._disk_bypassed else "queue_full")
        host.pin(entry)
        self._plan.pinned.append((host, entry))
        self._plan.offloads.append(OffloadOp(block.block_id, block.block_hash, block.parent_hash, HOST, entry.slot))
        stored[HOST].append((block.block_hash, block.parent_hash))

    def _offload_to_disk(self, block: EvictedBlock, removed: dict[str, list[int]]) -> None:
        """The device block straight to a file (announced once written): no host tier, or no
        host slot free of blocks that are not on disk yet."""
        if len(self._writing) >= self.config.disk_queue_blocks:
            self.stats.skip(DISK, "queue_full")  # the disk cannot keep up: drop, never stall
            return
        entry = self._insert_disk(block.block_hash, block.parent_hash, removed)
        if entry is None:
            self.stats.skip(DISK, "slots_busy")
            return
        self._writing[block.block_hash] = (None, entry)
        self._plan.offloads.append(OffloadOp(block.block_id, block.block_hash, block.parent_hash, DISK, entry.slot))

    def _plan_writes(self) -> None:
        """Write ahead the host blocks next in line for eviction that are not on disk, while
        the writer has room: within `disk_queue_blocks` of eviction (free slots count as
        before them), so a block is on disk by the time its slot is wanted, and a host tier
        that never fills costs no disk writes. Pinned blocks are left for later (a pending
        offload's slot is filled only when its plan runs)."""
        host, disk = self.host, self.disk
        if host is None or disk is None:
            return
        lead = self.config.disk_queue_blocks
        room = lead - len(self._writing)
        free = host.capacity_blocks - len(host)
        if room <= 0 or free >= lead or self._disk_bypassed:  # bypassed: see _keeps
            return
        removed: list[int] = []
        planned = len(self._plan.writes)
        for i, entry in enumerate(host):  # eviction order: next victim first
            if free + i >= lead or room <= 0:
                break
            h = entry.block_hash
            if entry.ref_count or h in disk or h in self._write_failed:
                continue
            disk_entry = self._insert_disk(h, entry.parent_hash, {DISK: removed})
            if disk_entry is None:
                break  # every file pinned
            host.pin(entry)
            self._writing[h] = (entry, disk_entry)
            self._plan.writes.append(WriteOp(h, entry.parent_hash, entry.slot))
            room -= 1
        self.offload_value.offloaded(DISK, len(self._plan.writes) - planned)
        if removed:
            self._emit_changes({}, {DISK: removed})

    def _insert_disk(self, h: int, parent: int | None, removed: dict[str, list[int]]) -> TierEntry | None:
        """A pinned, unannounced index entry for a file about to be written; the files it
        evicts are deleted (queued before the plan's writes)."""
        disk = self.disk
        assert disk is not None
        entry, victims = disk.insert(h, parent)
        if entry is None:
            return None
        for victim in victims:
            self._plan.deletes.append(DeleteOp(victim.block_hash))
            removed[DISK].append(victim.block_hash)
        disk.pin(entry)
        return entry

    def _poll_writes(self) -> None:
        if self._disk_writes is not None and self._writing:
            done = self._disk_writes.completed()
            if done:
                self.writes_done(done)

    def writes_done(self, results: Sequence[tuple[int, bool]]) -> None:
        """Writes finished (block hash, written): unpin their host slots and files; a written
        file is announced, a failed one forgotten (it never was announced)."""
        disk = self.disk
        stored: list[tuple[int, int | None]] = []
        for h, ok in results:
            pending = self._writing.pop(h, None)
            if pending is None or disk is None:
                continue
            host_entry, entry = pending
            if host_entry is not None:
                assert self.host is not None
                self.host.unpin(host_entry)
            disk.unpin(entry)
            if ok:
                stored.append((h, entry.parent_hash))
            else:
                if entry.ref_count == 0 and disk.get(h) is entry:
                    disk.remove(h)
                if host_entry is not None:
                    self._write_failed.add(h)  # a full or failing disk: no retry loop
                self.stats.skip(DISK, "write_failed")
        if stored:
            self.stats.offloaded(DISK, len(stored), len(stored) * self.block_bytes)
        self._emit_changes({DISK: stored}, {})

    # ------------------------------------------------------------------------ restart / plan

    def adopt_disk(self, blocks: Sequence[tuple[int, int | None]]) -> int:
        """Index blocks already on disk (a restarted worker, or a neighbour's files), oldest
        first; returns how many were taken. Files past the capacity are left alone."""
        if self.disk is None:
            return 0
        stored: list[tuple[int, int | None]] = []
        for h, parent in blocks:
            if len(self.disk) >= self.disk.capacity_blocks:
                break
            entry, _ = self.disk.insert(h, parent)
            if entry is not None:
                stored.append((h, parent))
        self._emit_changes({DISK: stored}, {})
        return len(stored)

    def take_plan(self) -> TransferPlan:
        self._poll_writes()
        plan, self._plan = self._plan, TransferPlan()
        if self._disk_writes is None:  # a synchronous executor: written when the plan runs
            done = [(op.block_hash, True) for op in plan.writes]
            done += [(op.block_hash, True) for op in plan.offloads if op.tier == DISK]
            if done:
                self.writes_done(done)
        return plan

    def finish(self, plan: TransferPlan) -> None:
        """The plan's copies are done (or queued behind its pins' reads): unpin its entries
        (a write's stay pinned until it completes), and plan the writes ahead of host
        evictions that the disk has room for into the next plan (its offloads' slots are
        filled once this plan has run)."""
        for tier, entry in plan.pinned:
            tier.unpin(entry)
        if plan.upkeep_s is not None:
            self.observe_upkeep(plan.upkeep_s, len(plan.offloads) + len(plan.writes))
        self._poll_writes()
        self._plan_writes()
        self._report_usage()

    @property
    def writing(self) -> frozenset[int]:
        """Blocks whose disk writes are planned or in flight (pinned, not yet announced)."""
        return frozenset(self._writing)

    def forget_disk(self, block_hash: int) -> None:
        """A disk file turned out unreadable: drop it from the index."""
        if self.disk is not None and block_hash in self.disk:
            entry = self.disk.get(block_hash)
            if entry is not None and entry.ref_count == 0:
                self.disk.remove(block_hash)
                self._emit(BlockRemoved(block_hashes=[block_hash], tier=DISK))

    # ----------------------------------------------------------------------------- helpers

    def _tier(self, name: str) -> TierIndex:
        tier = self.host if name == HOST else self.disk
        assert tier is not None
        return tier

    def _emit_changes(self, stored: dict[str, list[tuple[int, int | None]]], removed: dict[str, list[int]]) -> None:
        for tier, hashes in removed.items():
            if hashes:
                self._emit(BlockRemoved(block_hashes=hashes, tier=tier))  # type: ignore[arg-type]
        for tier, blocks in stored.items():
            for chain, parent in _chains(blocks):
                self._emit(BlockStored(block_hashes=chain, parent_hash=parent, tier=tier))  # type: ignore[arg-type]

    def _emit(self, event: KvEventData) -> None:
        if self._on_event is not None:
            self._on_event(event)

    def _report_usage(self) -> None:
        """The tiers' usage and the cost model's estimates as gauges, where they changed: this
        runs after every step, and a gauge's set() takes a lock."""
        metrics = self.stats.metrics
        if metrics is None:
            return
        usage = [(tier.name, len(tier), tier.capacity_blocks) for tier in self.tiers]
        if usage != self._reported_usage:
            self._reported_usage = usage
            for name, used, total in usage:
                metrics.tier(name, used, total)
        if self.cost.enabled:
            estimates = self.cost.snapshot()
            if estimates != self._reported_estimates:
                self._reported_estimates = estimates
                self.stats.estimates(estimates)


def _chains(blocks: Sequence[tuple[int, int | None]]) -> list[tuple[list[int], int | None]]:
    """Split (hash, parent) pairs into runs where each block's parent is the one before, so
    every BlockStored keeps its meaning (hashes in prefix order after `parent_hash`)."""
    out: list[tuple[list[int], int | None]] = []
    for h, parent in blocks:
        if out and out[-1][0][-1] == parent:
            out[-1][0].append(h)
        else:
            out.append(([h], parent))
    return out
