"""KVBM's host and disk tiers (kvbm/) below vLLM's own KV cache, as a vLLM v1 KV connector
(`DynamoKvbmConnector`, loaded by vLLM through `kv_connector_module_path`).

Where the state lives. vLLM builds this class twice, both inside its engine-core process (and
with tensor parallelism, the worker side once more per rank, in vLLM's worker processes):

- scheduler side (`_SchedulerSide`, on the engine core's scheduler thread): the tiers'
  bookkeeping, kvbm.tiered.TieredCache: which of the project's block hashes (dynamo/kv_hash.py)
  sit in which host slot or disk file, the offload policy, the tier events. It answers
  get_num_new_matched_tokens from its indexes and turns each step's decisions into a
  TransferPlan, sent to the workers as this connector's metadata;
- worker side (`_WorkerSide`, on the thread that runs the model): the bytes: the host tier
  (one kvbm.host_tier.HostStore tensor, its slots numbered by the scheduler side) and the disk
  tier's files (kvbm.disk_tier.DiskStore, written by its own thread, read ahead of their
  onboards by a kvbm.disk_tier.DiskReader's threads). It runs each plan with
  kvbm.plan_executor, the built-in engine's executor, in handle_preemptions(), which vLLM calls
  at every step, before its forward pass and in steps without one (start_load_kv may run after
  the forward is launched when no request of the step loads synchronously). On a GPU the
  copies go on a side stream that the forward pass waits for only where it reads or overwrites
  their blocks; disk writes report back through the worker metadata, and their host slots stay
  pinned until then.

vLLM's offloading-connector contract, as this connector keeps it: a request's full, computed
blocks are offered to the tiers when the request releases them (request_finished; the copy runs
before the next forward pass, the first that may overwrite them, so vLLM need not hold them);
hits beyond vLLM's own prefix cache are reported by get_num_new_matched_tokens and loaded into
the slots vLLM allocated (update_state_after_alloc). Host hits alone load synchronously, before
the forward pass that reads them. A request with a disk hit loads synchronously too (its files
read on the model thread, in the step that schedules it) when its estimated read is short next
to a step (`_DiskLoadChoice`), and otherwise asynchronously, as vLLM's NIXL and offloading
connectors do: vLLM holds it in WAITING_FOR_REMOTE_KVS while the worker side reads its files
off the model thread; once they are read, the request's onboards (host and disk hits together)
are copied in at the end of that step (get_finished, which reports the load) or with the next
step's plan, and the request runs from the step after. Its
pins (host slots, files) are held until vLLM reports the load finished, also when the request
is aborted meanwhile (vLLM frees its blocks only then). A block that cannot be read (a vanished
disk file) is reported through get_block_ids_with_load_errors, and vLLM recomputes it.

What leaves the engine core: tier KV events go out on vLLM's own KV-event stream with media of
our own (`dynamo-host`, `dynamo-disk`: hashes already ours; workers/vllm/kv_events.py forwards
them tier-tagged), and counters as this connector's stats (vLLM's SchedulerStats), which
`KvbmView` in the worker process turns into the dynamo_kvbm_* metrics. Requests whose KV depends
on more than their tokens (LoRA, cache salt, multimodal inputs, prompt embeddings) are neither
offloaded nor onboarded: the project's block hash covers tokens only.
"""

from __future__ import annotations

import dataclasses
import logging
import operator
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import torch
from vllm.distributed.kv_events import BlockRemoved as VllmBlockRemoved
from vllm.distributed.kv_events import BlockStored as VllmBlockStored
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics, KVConnectorStats
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from dynamo.kv_hash import block_hash
from dynamo.wire import BlockRemoved, BlockStored, KvEventData, KvLayoutSpec
from kvbm.block_pool import EvictedBlock
from kvbm.config import DiskLoadName, KvbmConfig
from kvbm.disk_probe import probe_disk_tier
from kvbm.disk_tier import BlockReads, DiskReader, DiskStore
from kvbm.forward_timer import ForwardTimer
from kvbm.host_tier import HostStore
from kvbm.layout import block_bytes, elements_per_layer
from kvbm.metrics import KvbmMetrics
from kvbm.onboard_cost import LinearRate
from kvbm.plan_executor import Executed, PlanExecutor
from kvbm.tiered import DISK, HOST, DeleteOp, Hits, OffloadOp, OnboardOp, TieredCache, TransferPlan, WriteOp

if TYPE_CHECKING:
    from workers.vllm.args import VllmConfig

log = logging.getLogger(__name__)

CONNECTOR_NAME = "DynamoKvbmConnector"
MODULE_PATH = __name__
# kv_connector_extra_config key holding the KvbmConfig fields; also the key of our stats payload.
EXTRA_KEY = "dynamo_kvbm"
# KV-event media whose block hashes are already the project's (kv_events.OUR_HASH_MEDIA).
MEDIA = {HOST: "dynamo-host", DISK: "dynamo-disk"}


def connector_config(kvbm: KvbmConfig) -> dict[str, Any]:
    """KVTransferConfig fields that load this connector with `kvbm`'s tiers."""
    return {
        "kv_connector": CONNECTOR_NAME,
        "kv_connector_module_path": MODULE_PATH,
        "kv_role": "kv_both",
        # A block that could not be loaded (a vanished disk file) is recomputed, not an error.
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {EXTRA_KEY: dataclasses.asdict(kvbm)},
    }


def offload_connector_config(config: VllmConfig) -> dict[str, Any] | None:
    """The hook's source (workers/vllm/connector/__init__.py): on when a tier is given a size."""
    return connector_config(config.kvbm) if config.kvbm.enabled else None


def layout_of(kv_cache_config: Any, tp_rank: int = 0, tp_size: int = 1) -> KvLayoutSpec:
    """Our layout spec for vLLM's KV cache: one full-attention group (a plain decoder)."""
    groups = kv_cache_config.kv_cache_groups
    if len(groups) != 1:
        raise ValueError(f"KVBM tiers for vLLM need one KV cache group (a plain decoder), got {len(groups)}")
    spec = groups[0].kv_cache_spec
    if type(spec).__name__ != "FullAttentionSpec":
        raise ValueError(f"KVBM tiers for vLLM need full attention, got {type(spec).__name__}")
    return KvLayoutSpec(
        num_layers=len(groups[0].layer_names),
        block_size_tokens=spec.block_size,
        num_kv_heads=spec.num_kv_heads,
        head_dim=spec.head_size,
        dtype=str(spec.dtype).removeprefix("torch."),
        tp_rank=tp_rank,
        tp_size=tp_size,
    )


def disk_root(config: KvbmConfig, layout: KvLayoutSpec) -> Path | None:
    """vLLM lays a block out differently from the built-in engine (kvbm/layout.py) under the
    same layout fingerprint: its files get a directory of their own, one per TP rank."""
    if not config.disk_dir or config.disk_capacity_blocks(block_bytes(layout)) <= 0:
        return None
    root = Path(config.disk_dir).expanduser() / "vllm"
    return root / f"tp{layout.tp_rank}of{layout.tp_size}" if layout.tp_size > 1 else root


def _tokens_only(request: Any) -> bool:
    """Whether the request's KV is a function of its token ids alone (what our hash covers)."""
    return not (
        getattr(request, "lora_request", None) is not None
        or getattr(request, "cache_salt", None)
        or getattr(request, "mm_features", None)
        or getattr(request, "prompt_embeds", None) is not None
    )


# ----------------------------------------------------------------------------- metadata


@dataclass(slots=True)
class OffloadMetadata(KVConnectorMetadata):
    """One step's TransferPlan, as plain tuples (it is pickled to the workers), executed in
    this order: writes (host slot -> file: written ahead of host evictions, from slots earlier
    plans filled), offloads (device block -> host slot or file), onboards (host slot or
    file -> device block), deletes (files). Besides the plan: the step's new asynchronous loads,
    which join a later step's plan once their disk reads are done."""

    writes: list[tuple[int, int | None, int]] = field(default_factory=list)  # hash, parent, host slot
    offloads: list[tuple[int, int, int | None, str, int]] = field(default_factory=list)  # block, hash, parent, tier, slot
    onboards: list[tuple[int, str, int, int]] = field(default_factory=list)  # hash, tier, slot, block
    deletes: list[int] = field(default_factory=list)
    # Requests vLLM holds in WAITING_FOR_REMOTE_KVS for a disk hit: request id and all its
    # onboards (as `onboards`), host hits included (one load, reported finished at once).
    loads: list[tuple[str, list[tuple[int, str, int, int]]]] = field(default_factory=list)
    # Device blocks promised to vLLM that nothing can fill (a hit gone before its load was
    # planned): reported as load errors so that vLLM recomputes them.
    lost_blocks: list[int] = field(default_factory=list)
    # Tokens the step's forward pass computes: the worker times the passes that compute any
    # (a plan's truth does not depend on it).
    step_tokens: int = 0
    # The step's number: the key under which every rank reports the files it read in line.
    step: int = 0

    def __bool__(self) -> bool:
        return bool(self.writes or self.offloads or self.onboards or self.deletes or self.loads or self.lost_blocks)


def _onboards(plan: TransferPlan) -> list[tuple[int, str, int, int]]:
    return [(op.block_hash, op.tier, op.slot, op.device_block) for op in plan.onboards]


@dataclass(slots=True)
class OffloadWorkerMetadata(KVConnectorWorkerMetadata):
    """Worker -> scheduler: disk files that could not be read (the scheduler side forgets
    them), the outcome of each disk write (its host slot and file stay pinned until every rank
    has reported it); and what the cost models measure, which only the worker can time: forward
    passes, reads and the offloads' hold on the step. vLLM aggregates one step's metadata over
    the ranks."""

    unreadable: set[int] = field(default_factory=set)
    written: list[tuple[int, bool]] = field(default_factory=list)  # block hash, written
    steps: list[tuple[int, float]] = field(default_factory=list)  # forward passes: tokens, seconds
    reads: list[tuple[str, int, float]] = field(default_factory=list)  # onboards: tier, bytes, seconds
    upkeep: list[tuple[int, float]] = field(default_factory=list)  # offloads and writes: blocks, seconds
    # The file reads alone, as one thread reading them in turn takes them: a load's (by request
    # id) or a step's in-line reads (by step number), bytes, seconds. Every rank reports each.
    file_reads: list[tuple[str | int, int, float]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.unreadable or self.written or self.steps or self.reads or self.upkeep or self.file_reads)

    def aggregate(self, other: Any) -> OffloadWorkerMetadata:
        # Concatenated: a rank's reads of a load may end a step after another's, so the
        # scheduler side pairs them by key (_RankReports) rather than this one step's output.
        return OffloadWorkerMetadata(self.unreadable | other.unreadable, self.written + other.written,
                                     self.steps + other.steps, self.reads + other.reads,
                                     self.upkeep + other.upkeep, self.file_reads + other.file_reads)


K = TypeVar("K")
V = TypeVar("V")


class _RankReports(Generic[K, V]):
    """What the workers report of one thing each rank does on its own part (with tensor
    parallelism, each rank writes and reads its own part of a block, in its own directory):
    complete once every rank has reported the key, their values combined by `merge`."""

    def __init__(self, ranks: int, merge: Callable[[V, V], V]) -> None:
        self.ranks = ranks
        self._merge = merge
        self._partial: dict[K, tuple[int, V]] = {}  # key -> (ranks reported, merged value)
        self._done: list[tuple[K, V]] = []

    def report(self, results: Iterable[tuple[K, V]]) -> None:
        for key, value in results:
            seen = self._partial.pop(key, None)
            count = 1
            if seen is not None:
                count, value = seen[0] + 1, self._merge(seen[1], value)
            if count >= self.ranks:
                self._done.append((key, value))
            else:
                self._partial[key] = (count, value)

    def completed(self) -> list[tuple[K, V]]:
        done, self._done = self._done, []
        return done


def _reported_writes(ranks: int) -> _RankReports[int, bool]:
    """kvbm.tiered.DiskWrites for the scheduler side: a block is on disk once every rank's part
    is (and failed if any rank's failed)."""
    return _RankReports(ranks, operator.and_)


def _slowest(a: tuple[int, float], b: tuple[int, float]) -> tuple[int, float]:
    """Two ranks' reads of one load: the load waits for the slower."""
    return max(a[0], b[0]), max(a[1], b[1])


# -------------------------------------------------------------------------------- stats


def _empty_stats() -> dict[str, Any]:
    # skipped: {"tier/reason": blocks} (KvbmStats.skipped_by); decisions: {"tier/decision":
    # blocks} (KvbmStats.decisions); estimates: the onboard cost model's (latest wins); plans:
    # the model thread's seconds per executed plan (the dynamo_kvbm_plan_seconds histogram);
    # disk_loads: {"sync" or "async": requests} with a disk hit, by how they loaded
    return {"hits": {}, "offload_blocks": {}, "offload_bytes": {}, "onboard_blocks": {}, "onboard_bytes": {},
            "skipped": {}, "decisions": {}, "estimates": {}, "usage": {}, "transfer": {}, "plans": [],
            "disk_loads": {}}

# Tallies ({key: n}) summed when payloads aggregate.
_TALLIES = ("hits", "offload_blocks", "offload_bytes", "onboard_blocks", "onboard_bytes", "disk_loads")

# Counters keyed "tier/reason" or "tier/decision" (KvbmStats.skipped_by and .decisions, in
# this order): summed when payloads aggregate.
_KEYED = ("skipped", "decisions")


class KvbmConnectorStats(KVConnectorStats):
    """Counter deltas since the last report ({tier: n} tallies, {"tier/reason": n} ones, disk
    loads by how they loaded), tier usage ({tier: [used, total]}) and the onboard cost model's
    estimates (latest wins both), and worker-side transfer time ({direction: [bytes, seconds]})
    and plan times ([seconds]), under EXTRA_KEY so the worker process finds them inside a
    MultiConnector's payload too."""

    def __init__(self, data: dict[str, Any] | None = None) -> None:
        super().__init__(data=data if data is not None else {EXTRA_KEY: _empty_stats()})

    @property
    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = self.data.setdefault(EXTRA_KEY, _empty_stats())
        return body

    def reset(self) -> None:
        self.data = {EXTRA_KEY: _empty_stats()}

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        mine, theirs = self.body, other.data.get(EXTRA_KEY) or _empty_stats()
        for key in _TALLIES:
            for tier, n in theirs[key].items():
                mine[key][tier] = mine[key].get(tier, 0) + n
        for keyed in _KEYED:
            for key, n in theirs[keyed].items():
                mine[keyed][key] = mine[keyed].get(key, 0) + n
        mine["usage"].update(theirs["usage"])
        mine["estimates"].update(theirs["estimates"])
        for direction, (nbytes, seconds) in theirs["transfer"].items():
            b, s = mine["transfer"].get(direction, (0, 0.0))
            mine["transfer"][direction] = [b + nbytes, s + seconds]
        mine["plans"] = mine["plans"] + theirs["plans"]
        return self

    def reduce(self) -> dict[str, int | float]:
        body = self.body
        out: dict[str, int | float] = {}
        for key in ("hits", "offload_blocks", "onboard_blocks", "disk_loads"):
            for tier, n in body[key].items():
                out[f"kvbm_{key}_{tier}"] = n
        out["kvbm_skipped"] = sum(body["skipped"].values())
        return out

    def is_empty(self) -> bool:
        body = self.body
        return not any(body[k] for k in ("hits", "offload_blocks", "onboard_blocks", "usage", "transfer",
                                          "estimates", "plans", "disk_loads", *_KEYED))


def find_stats(payload: Any) -> dict[str, Any] | None:
    """Our stats body in a SchedulerStats.kv_connector_stats payload: at its top level, or one
    level down when vLLM's MultiConnector keys its connectors' payloads by class name."""
    if not isinstance(payload, dict):
        return None
    body = payload.get(EXTRA_KEY)
    if isinstance(body, dict):
        return body
    for value in payload.values():
        if isinstance(value, dict) and isinstance(value.get(EXTRA_KEY), dict):
            return value[EXTRA_KEY]
    return None


class KvbmView:
    """The tiers as the worker process sees them (the bookkeeping itself lives in vLLM's engine
    core): a TieredCache used only for its counters and metric binding (workers/worker.py binds
    `cache` as it does for the built-in engine), fed by `apply` with the connector's stats;
    `disk_loads`: the requests with a disk hit so far, by how they loaded ("sync", "async")."""

    def __init__(self, config: KvbmConfig) -> None:
        # Capacities are in the engine core's hands; the usage reports carry them.
        self.cache = TieredCache(dataclasses.replace(config, host_blocks=0, disk_blocks=0, host_gb=None, disk_gb=None,
                                                     disk_dir=None), 1)
        self.disk_loads: Counter[str] = Counter()

    def apply(self, payload: Any) -> None:
        body = find_stats(payload)
        if body is None:
            return
        stats = self.cache.stats
        for tier, n in body["hits"].items():
            stats.hit(tier, n)
        for tier, n in body["offload_blocks"].items():
            stats.offloaded(tier, n, body["offload_bytes"].get(tier, 0))
        for tier, n in body["onboard_blocks"].items():
            stats.onboarded(tier, n, body["onboard_bytes"].get(tier, 0))
        for key, n in body["skipped"].items():
            tier, _, reason = key.partition("/")
            stats.skip(tier, reason, n)
        for key, n in body["decisions"].items():
            tier, _, decision = key.partition("/")
            stats.decided(tier, decision, n)
        if body["estimates"]:
            stats.estimates(body["estimates"])
        metrics: KvbmMetrics | None = stats.metrics
        if metrics is not None:
            for tier, (used, total) in body["usage"].items():
                metrics.tier(tier, used, total)
        for direction, (nbytes, seconds) in body["transfer"].items():
            stats.transfer(direction, nbytes, seconds)
        for seconds in body["plans"]:
            stats.plan_executed(seconds)
        self.disk_loads.update(body["disk_loads"])


# ------------------------------------------------------------------------ scheduler side

# A synchronous disk load reads its files on the model thread before the forward pass of the
# step that schedules its request: every request of that step waits for the read. An
# asynchronous one costs the others nothing but costs its own request about one step: it is
# reported at the end of the step in which its reads end, and runs in the next, where a
# synchronous one runs in the step that reads it. So a load goes asynchronously when its read,
# times the requests it would hold up, exceeds this many steps (the recompute of a declined hit
# is weighed by the step's requests likewise, kvbm.tiered.TieredCache.lookup).
ASYNC_LOAD_STEPS = 1.0
# Weight of the newest step in the step estimate: about the last four count. The step a
# synchronous read would stall, or an asynchronous load wait through, is the next one, most like
# the latest (a burst of long prefills some twenty steps back says little about it).
STEP_ALPHA = 0.25


class _DiskLoadChoice:
    """Whether a request's disk hits load synchronously or asynchronously (`mode` "auto"; or
    always one way), from two estimates: the read of its files, as the model thread would take
    it, and a step. Each is an exponentially weighted kvbm.onboard_cost.LinearRate. Until both
    are measured, asynchronously: a read of unknown length on the model thread could stall
    every running request for as long."""

    def __init__(self, mode: DiskLoadName, ranks: int = 1) -> None:
        self.mode = mode
        # Seconds to read a load's bytes of files, one file after another (the model thread
        # reads them so; reader threads' reads are summed alike), the slowest rank's: the
        # reads alone, not the onboard cost model's start-to-admission time, which includes
        # the wait for a step and so would feed this choice back into itself.
        self.read = LinearRate()
        # Forward passes of steps that compute tokens, one unit each: its per-unit cost is the
        # mean step, the recent ones weighing most (every rank times each step: each weighs a
        # rank's share). Timed after the step's plan, so a synchronous read does not lengthen
        # the step it is weighed against.
        self.step = LinearRate(alpha=STEP_ALPHA / ranks)
        self.taken: Counter[str] = Counter()  # "sync"/"async" loads not yet reported in stats

    def is_async(self, nbytes: int, step_requests: int) -> bool:
        """Whether a load of `nbytes` of files goes asynchronously, with `step_requests` in the
        last scheduled step (at least one: a read on the model thread also holds up the requests
        that arrive meanwhile)."""
        if self.mode != "auto":
            return self.mode == "async"
        read_s, step_s = self.read.cost_s(nbytes), self.step.per_unit_s()
        if read_s is None or step_s is None:
            return True
        return read_s * max(1, step_requests) > ASYNC_LOAD_STEPS * step_s


@dataclass(slots=True)
class _Request:
    hashes: list[int] = field(default_factory=list)  # of the leading full blocks of all_token_ids
    local_tokens: int = 0  # vLLM's own prefix hit at the last get_num_new_matched_tokens
    # Hits that lookup left to recompute (cheaper than reading them), per tier: counted at
    # admission when nothing is loaded (after_alloc then looks nothing up).
    declined: Counter[str] = field(default_factory=Counter)
    onboarded: dict[str, int] = field(default_factory=dict)  # tier -> tokens, for hit sources
    # The hits of the last lookup include a disk hit, and vLLM was told to load them
    # asynchronously (_DiskLoadChoice).
    load_async: bool = False
    # Its asynchronous load is planned: vLLM's second update_state_after_alloc, once the load
    # is in, has nothing to plan and nothing to count again.
    loaded_async: bool = False


class _SchedulerSide:
    def __init__(self, config: KvbmConfig, layout: KvLayoutSpec) -> None:
        self.block_size = layout.block_size_tokens
        self.block_bytes = block_bytes(layout)
        root = disk_root(config, layout)
        if root is None:
            config = dataclasses.replace(config, disk_dir=None, disk_blocks=0, disk_gb=None)
        # The cost model weighs a recomputed token by the requests of the step it lengthens
        # (build_meta reports them) against a read that delays only its own request, as with
        # the built-in engine: a disk hit is read while vLLM holds its request back, unless
        # its read is short enough not to matter to the step's other requests (_DiskLoadChoice).
        # A host hit is copied before the step's forward pass, but in a fraction of a
        # recompute's time.
        self._events: list[KvEventData] = []
        self._written = _reported_writes(layout.tp_size)
        self._file_reads: _RankReports[str | int, tuple[int, float]] = _RankReports(layout.tp_size, _slowest)
        self.disk_load = _DiskLoadChoice(config.disk_load, layout.tp_size)
        self._steps = 0  # build_meta's, numbering the plans
        self.cache = TieredCache(config, self.block_bytes, self._events.append, disk_writes=self._written,
                                 block_size_tokens=self.block_size)
        if root is not None and self.cache.disk is not None:
            # Only reads headers (a restart's or a neighbour's files); the worker side writes.
            store = DiskStore(root, layout)
            self.cache.disk_probe = store.exists
            adopted = self.cache.adopt_disk(store.scan())
            if adopted:
                log.info("kvbm: found %d vLLM blocks in %s", adopted, store.dir)
            # What a disk read costs, before the first eviction is offered to the tier (the
            # worker side reads the same directory).
            probe_disk_tier(config, self.cache.cost, root, layout)
        self._requests: dict[str, _Request] = {}
        # Asynchronous loads, by request id, until vLLM reports them finished (every rank's):
        # each a plan of its own, so that its pins outlive the step that sent it.
        self._loads: dict[str, TransferPlan] = {}
        self._new_loads: list[tuple[str, TransferPlan]] = []  # not sent to the workers yet
        # Unreadable files a load in flight still pins: forgotten once it ends.
        self._unreadable: set[int] = set()
        self._reported = _empty_stats()

    # ------------------------------------------------------------------------- hashing

    def _hashes(self, request: Any, num_tokens: int) -> list[int]:
        """Our hashes of the full blocks of request.all_token_ids[:num_tokens]."""
        state = self._requests.setdefault(request.request_id, _Request())
        want = num_tokens // self.block_size
        hashes = state.hashes
        if len(hashes) < want:
            tokens = request.all_token_ids
            bs = self.block_size
            parent = hashes[-1] if hashes else None
            for i in range(len(hashes), want):
                parent = block_hash(parent, tokens[i * bs : (i + 1) * bs])
                hashes.append(parent)
        return hashes[:want]

    # ----------------------------------------------------------------------- admission

    def num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int, bool]:
        """Tokens the tiers hold beyond vLLM's own prefix hit, and whether they load
        asynchronously: with a disk hit among them whose read would hold up the step's other
        requests for long (_DiskLoadChoice), the files are read off the model thread while
        vLLM holds the request back; otherwise everything is copied (and read) before the
        step's forward pass."""
        state = self._requests.setdefault(request.request_id, _Request())
        state.local_tokens = num_computed_tokens
        # vLLM asks only before a request's (re)admission: any earlier load is behind it.
        state.load_async = state.loaded_async = False
        if getattr(request, "skip_reading_prefix_cache", False) or not _tokens_only(request):
            return 0, False
        if num_computed_tokens % self.block_size:
            return 0, False  # a partial local hit: vLLM keeps it, nothing of ours lines up behind it
        # At least the last prompt token is computed: its logits are the first sample.
        hashes = self._hashes(request, request.num_tokens - 1)
        hits = self.cache.lookup(hashes, num_computed_tokens // self.block_size)
        self.cache.release(hits)  # side-effect free: looked up again once slots are allocated
        state.declined = hits.declined
        on_disk = sum(1 for hit in hits if hit.tier == DISK)
        state.load_async = on_disk > 0 and self.disk_load.is_async(
            on_disk * self.block_bytes, self.cache.last_step_requests)
        return len(hits) * self.block_size, state.load_async

    def after_alloc(self, request: Any, block_ids: Sequence[int], num_external_tokens: int) -> list[int]:
        """Plan the onboard of `num_external_tokens` (a whole number of blocks) into the slots
        vLLM allocated; returns the device blocks that nothing can fill (normally none). A load
        vLLM was told is asynchronous gets a plan of its own, sent once by build_meta and
        finished by loads_done."""
        state = self._requests.setdefault(request.request_id, _Request())
        if state.loaded_async and not num_external_tokens:
            # vLLM's second call, once the load is in: planned, counted and recorded at the first.
            state.loaded_async = False
            return []
        state.onboarded = {}
        device_blocks = state.local_tokens // self.block_size
        if not _tokens_only(request):
            return []
        hashes = self._hashes(request, request.num_tokens - 1)
        n = num_external_tokens // self.block_size
        if n == 0:
            self.cache.onboard(hashes, device_blocks, Hits((), state.declined), [])
            return []
        found = self.cache.lookup(hashes, device_blocks)
        self.cache.release(found[n:])
        hits = Hits(found[:n], found.declined)
        targets = list(block_ids[device_blocks : device_blocks + n])
        plan = None
        if state.load_async:
            # Registered even with no hit left to load: vLLM waits for it to be reported.
            plan = TransferPlan()
            self._loads[request.request_id] = plan
            self._new_loads.append((request.request_id, plan))
            state.loaded_async = True
        self.cache.onboard(hashes, device_blocks, hits, targets[: len(hits)], plan=plan)
        for hit in hits:
            state.onboarded[hit.tier] = state.onboarded.get(hit.tier, 0) + self.block_size
        if DISK in state.onboarded:
            self.disk_load.taken["async" if state.load_async else "sync"] += 1
        return targets[len(hits):]

    def hit_sources(self, request: Any, num_external_tokens: int) -> dict[CacheHitSource, int]:
        state = self._requests.get(request.request_id)
        if state is None or not num_external_tokens:
            return {}
        sources = {CacheHitSource(tier): n for tier, n in state.onboarded.items() if n}
        if sum(sources.values()) != num_external_tokens:
            return {CacheHitSource.EXTERNAL_UNSPECIFIED: num_external_tokens}
        return sources

    # ------------------------------------------------------------------------- offload

    def finished(self, request: Any, block_ids: Sequence[int]) -> None:
        """The request releases its blocks: offer its full, computed blocks to the tiers."""
        if request.request_id in self._loads:
            # Aborted while loading: vLLM counts the blocks being loaded as computed, but they
            # may hold nothing yet. It frees them once the load is reported finished, and the
            # load's pins go then (loads_done).
            self._requests.pop(request.request_id, None)
            return
        done = request.num_computed_tokens - getattr(request, "num_in_flight_tokens", 0)
        usable = min(done, request.num_tokens - 1, len(block_ids) * self.block_size)
        hashes = self._hashes(request, usable) if _tokens_only(request) else []
        self._requests.pop(request.request_id, None)
        if not hashes:
            return
        blocks = [EvictedBlock(block_ids[i], h, hashes[i - 1] if i else None) for i, h in enumerate(hashes)]
        self.cache.evicted(blocks)

    # ------------------------------------------------------------------------ the step

    def build_meta(self, lost_blocks: list[int], step_tokens: int, step_requests: int = 1) -> OffloadMetadata:
        self.cache.step_requests(step_requests)
        self._steps += 1
        plan = self.cache.take_plan()
        # Plans run on the workers in step order, their copies in order on one stream, so a
        # later plan's copies follow this one's: its pins can go now. Disk writes, which the
        # disk thread reads from host slots, keep theirs until the workers report them done.
        self.cache.finish(plan)
        # An asynchronous load's pins stay until vLLM reports it finished (loads_done).
        loads, self._new_loads = self._new_loads, []
        return OffloadMetadata(
            writes=[(op.block_hash, op.parent_hash, op.host_slot) for op in plan.writes],
            offloads=[(op.device_block, op.block_hash, op.parent_hash, op.tier, op.slot) for op in plan.offloads],
            onboards=_onboards(plan),
            deletes=[op.block_hash for op in plan.deletes],
            loads=[(request_id, _onboards(load)) for request_id, load in loads],
            lost_blocks=lost_blocks,
            step_tokens=step_tokens,
            step=self._steps,
        )

    def loads_done(self, request_ids: Iterable[str]) -> None:
        """vLLM reports these requests' loads finished on every rank: their copies are queued
        (on a GPU, on the side stream, ahead of any later plan's reuse of a slot they read;
        staging rows are fenced), so their pins go. Ids of other connectors' loads (under
        vLLM's MultiConnector) are not ours: ignored."""
        finished = False
        for request_id in request_ids:
            plan = self._loads.pop(request_id, None)
            if plan is not None:
                self.cache.finish(plan)
                finished = True
        if finished and self._unreadable:
            pending, self._unreadable = self._unreadable, set()
            for h in pending:
                self._forget_unreadable(h)

    def _forget_unreadable(self, block_hash: int) -> None:
        disk = self.cache.disk
        entry = disk.get(block_hash) if disk is not None else None
        if entry is not None and entry.ref_count:
            # Pinned by a load in flight (its own, until every rank has reported it; forget_disk
            # leaves pinned files alone): tried again when a load ends.
            self._unreadable.add(block_hash)
        else:
            self.cache.forget_disk(block_hash)

    def worker_output(self, meta: Any) -> None:
        if not isinstance(meta, OffloadWorkerMetadata):
            return
        for h in meta.unreadable:
            log.warning("kvbm: disk block %016x unreadable; recomputed", h)
            self._forget_unreadable(h)
        self._written.report(meta.written)
        cache = self.cache
        cache.writes_done(self._written.completed())  # before the next lookups: announced now
        for tokens, seconds in meta.steps:
            cache.observe_step(tokens, seconds)  # the cost model takes prefill-sized ones
            self.disk_load.step.observe(1, seconds)
        for tier, nbytes, seconds in meta.reads:
            cache.observe_read(tier, nbytes, seconds)
        for blocks, seconds in meta.upkeep:
            cache.observe_upkeep(seconds, blocks)
        self._file_reads.report((key, (nbytes, seconds)) for key, nbytes, seconds in meta.file_reads)
        for _, (nbytes, seconds) in self._file_reads.completed():
            self.disk_load.read.observe(nbytes, seconds)  # a load none of whose files was read: ignored

    def take_events(self) -> list[Any]:
        events, self._events[:] = list(self._events), []
        out: list[Any] = []
        for event in events:
            if isinstance(event, BlockStored):
                out.append(VllmBlockStored(
                    block_hashes=list(event.block_hashes), parent_block_hash=event.parent_hash, token_ids=[],
                    block_size=self.block_size, lora_id=None, medium=MEDIA[event.tier], lora_name=None,
                ))
            elif isinstance(event, BlockRemoved):
                out.append(VllmBlockRemoved(block_hashes=list(event.block_hashes), medium=MEDIA[event.tier]))
        return out

    def stats(self) -> KvbmConnectorStats | None:
        """Deltas since the last call, plus the tiers' usage when it changed."""
        current = self.cache.stats
        body = _empty_stats()
        last = self._reported
        for key in ("hits", "offload_blocks", "offload_bytes", "onboard_blocks", "onboard_bytes"):
            tally = getattr(current, key)
            for tier, n in tally.items():
                delta = n - last[key].get(tier, 0)
                if delta:
                    body[key][tier] = delta
                last[key][tier] = n
        for name, keyed in zip(_KEYED, (current.skipped_by, current.decisions)):
            for (tier, what), n in keyed.items():
                key = f"{tier}/{what}"
                delta = n - last[name].get(key, 0)
                if delta:
                    body[name][key] = delta
                last[name][key] = n
        usage = {tier.name: [len(tier), tier.capacity_blocks] for tier in self.cache.tiers}
        if usage != last["usage"]:
            body["usage"] = usage
            last["usage"] = usage
        estimates = self.cache.cost.snapshot()
        if estimates != last["estimates"]:
            body["estimates"] = estimates
            last["estimates"] = estimates
        body["disk_loads"], self.disk_load.taken = dict(self.disk_load.taken), Counter()
        stats = KvbmConnectorStats({EXTRA_KEY: body})
        return None if stats.is_empty() else stats


# --------------------------------------------------------------------------- worker side


@dataclass(slots=True)
class _Load:
    """A request's onboards waiting for its disk reads (None: nothing to read here)."""

    onboards: list[OnboardOp]
    reads: BlockReads | None
    started: float  # time.perf_counter() when the reads were started


class _WorkerSide:
    """Moves whole blocks, every layer, between vLLM's KV cache tensors and the tiers through
    kvbm.plan_executor (as the built-in engine does: on a GPU, copies on a side stream the
    forward pass waits for only where it must). A block of one layer is whatever vLLM's
    attention backend keeps at one index of the tensor's block dimension (K and V together, or
    K and V apart where the tensor is [2, num_blocks, ...]); host slots and files keep those
    bytes as they are (files are read back only by vLLM workers)."""

    def __init__(self, config: KvbmConfig, layout: KvLayoutSpec, layer_names: Sequence[str], num_blocks: int) -> None:
        self.config = config
        self.layout = layout
        self.layer_names = list(layer_names)
        self.num_blocks = num_blocks
        self.executor: PlanExecutor | None = None
        self.reader: DiskReader | None = None
        self._loads: dict[str, _Load] = {}  # by request id: reads in flight
        self._loaded: set[str] = set()  # loads queued, not yet reported by get_finished
        self._lost: set[int] = set()  # device blocks of this step that could not be loaded
        self._transfer: dict[str, list[float]] = {}
        self._plans: list[float] = []  # seconds of each executed plan, not yet reported
        self._measured = OffloadWorkerMetadata()  # not yet reported
        self._step_tokens = 0  # of the step whose plan ran last
        self._forward: ForwardTimer | None = None

    @property
    def host(self) -> HostStore | None:
        return self.executor.host if self.executor is not None else None

    @property
    def disk(self) -> DiskStore | None:
        return self.executor.disk if self.executor is not None else None

    def register(self, kv_caches: dict[str, torch.Tensor]) -> None:
        names = [n for n in self.layer_names if n in kv_caches] or list(kv_caches)
        per_block = 2 * elements_per_layer(self.layout)
        pieces: list[torch.Tensor] = []
        for name in names:
            t = kv_caches[name]
            if t.dim() > 0 and t.shape[0] == self.num_blocks and t[0].numel() == per_block:
                pieces.append(t)  # [num_blocks, ...]: K and V of a block together
            elif t.dim() > 1 and t.shape[:2] == (2, self.num_blocks) and 2 * t[0, 0].numel() == per_block:
                pieces += [t[0], t[1]]  # [2, num_blocks, ...]: K and V apart (FlashAttention)
            else:
                raise ValueError(f"KVBM: unexpected vLLM KV cache shape {tuple(t.shape)} for layer {name}")
        first = pieces[0]
        self._forward = ForwardTimer(first.device)
        cuda = first.device.type == "cuda"
        capacity = self.config.host_capacity_blocks(block_bytes(self.layout))
        host = None
        if capacity > 0:
            host = HostStore(capacity, len(names), elements_per_layer(self.layout), first.dtype, pin=cuda)
        disk = None
        root = disk_root(self.config, self.layout)
        if root is not None:
            disk = DiskStore(root, self.layout, self.config.disk_queue_blocks, report_writes=True)
            disk.start()
            self.reader = DiskReader.for_tier(disk, first.dtype, cuda,
                                              self.config.disk_capacity_blocks(block_bytes(self.layout)))
        self.executor = PlanExecutor(self.layout, pieces, host, disk, flush_blocks=self.config.offload_flush_blocks,
                                     disk_queue_blocks=self.config.disk_queue_blocks, reader=self.reader)
        log.info("kvbm: vLLM connector with %d host blocks%s", capacity,
                 f", disk tier in {disk.dir}" if disk else "")

    # --------------------------------------------------------------------------- the plan

    def execute(self, meta: OffloadMetadata) -> None:
        """The step's plan, with the onboards of the asynchronous loads whose reads ended since
        the last step ended (vLLM calls this at every step, also while only such loads are left)."""
        self._lost.update(meta.lost_blocks)
        self._step_tokens = meta.step_tokens
        if self.executor is None:
            return
        for request_id, onboards in meta.loads:
            self._start_load(request_id, [OnboardOp(h, tier, slot, block) for h, tier, slot, block in onboards])
        loaded = self._take_loaded() if self._loads else []
        if not meta and not loaded:
            return
        plan = TransferPlan(
            writes=[WriteOp(h, parent, slot) for h, parent, slot in meta.writes],
            offloads=[OffloadOp(block, h, parent, tier, slot) for block, h, parent, tier, slot in meta.offloads],
            onboards=[OnboardOp(h, tier, slot, block) for h, tier, slot, block in meta.onboards] + loaded,
            deletes=[DeleteOp(h) for h in meta.deletes],
        )
        done = self._run(plan)
        if any(tier == DISK for _, tier, _, _ in meta.onboards):
            # Synchronous disk loads: the executor read their files here, on this thread (its
            # one DISK read entry; none when no file could be read). Reported even then, so
            # that the scheduler side hears from every rank.
            inline = [(nbytes, seconds) for tier, nbytes, seconds in done.reads if tier == DISK]
            nbytes, seconds = inline[0] if inline else (0, 0.0)
            self._measured.file_reads.append((meta.step, nbytes, seconds))

    def finish_loads(self) -> None:
        """At the end of a step (get_finished): the loads whose reads ended during its forward
        pass are copied in now, so that vLLM hears of them with this step's output and
        schedules them in the next step rather than one later."""
        if self._loads and self.executor is not None:
            loaded = self._take_loaded()
            if loaded:
                self._run(TransferPlan(onboards=loaded))

    def _run(self, plan: TransferPlan) -> Executed:
        """Execute `plan`; keep what it measured for the scheduler side."""
        assert self.executor is not None
        # Loads among its onboards are reported finished by this step's get_finished, right
        # after their copies are queued, not done: on a GPU the plan ends with vLLM's current
        # stream waiting for the side stream's copies (the executor's end-of-plan wait_event),
        # and vLLM schedules the request at the earliest in the next step, on that stream.
        done = self.executor.execute(plan)
        self._plans.append(done.elapsed)
        measured = self._measured
        self._lost.update(done.failed)
        measured.unreadable.update(done.unreadable)
        measured.reads += done.reads
        if (plan.writes or plan.offloads) and plan.upkeep_s is not None:
            # In line, before the forward pass: what it held up the step.
            measured.upkeep.append((len(plan.writes) + len(plan.offloads), plan.upkeep_s))
        if done.onboard_bytes:
            entry = self._transfer.setdefault("onboard", [0, 0.0])
            entry[0] += done.onboard_bytes
            entry[1] += done.elapsed
        return done

    def _start_load(self, request_id: str, onboards: list[OnboardOp]) -> None:
        on_disk = [op.block_hash for op in onboards if op.tier == DISK]
        # Without a reader (no disk tier here) the executor would read in line: never expected.
        reads = self.reader.start(on_disk) if on_disk and self.reader is not None else None
        self._loads[request_id] = _Load(onboards, reads, time.perf_counter())

    def _take_loaded(self) -> list[OnboardOp]:
        """The onboards of the loads whose reads are done, their disk hits staged; those
        requests are then reported finished. A file that was not read is left out (handed
        to the executor unstaged, it would be read here, on the model thread): its device
        block is reported as a load error."""
        out: list[OnboardOp] = []
        for request_id, load in list(self._loads.items()):
            reads = load.reads
            if reads is not None and not reads.done:
                continue
            del self._loads[request_id]
            self._loaded.add(request_id)
            if reads is None:
                out += load.onboards
                continue
            read = 0
            for op in load.onboards:
                if op.tier == DISK:
                    staged = reads.staged(op.block_hash)
                    if staged is None:
                        self._lost.add(op.device_block)
                        if reads.buf is not None:
                            # Read and failed. (No buffer: nothing was read, for want of
                            # staging memory or a reader: the file may well be fine.)
                            self._measured.unreadable.add(op.block_hash)
                        continue
                    op = dataclasses.replace(op, staged=staged)
                    read += 1
                out.append(op)
            if read:
                # From the start of the reads to their being found done: what the disk hit
                # cost its request (the cost model's disk read; the copy up is timed apart).
                self._measured.reads.append((DISK, read * block_bytes(self.layout), time.perf_counter() - load.started))
            # Also with nothing read, so that the scheduler side hears from every rank.
            self._measured.file_reads.append((request_id, reads.read_blocks * block_bytes(self.layout), reads.read_s))
            # Before the plan that copies out of the rows: released rows are reused only once
            # the next plan's fence, recorded after those copies are queued, has completed.
            reads.close()
        return out

    # --------------------------------------------------------------------- step results

    def take_finished(self) -> set[str]:
        """Loads whose copies are queued since the last call (get_finished)."""
        loaded, self._loaded = self._loaded, set()
        return loaded

    def take_lost(self) -> set[int]:
        lost, self._lost = self._lost, set()
        return lost

    def forward_started(self) -> None:
        """The step's plan has run; its forward pass comes next. Timed when it computes
        anything: a step (_DiskLoadChoice), and when prefill-sized, what recomputing a declined
        hit's tokens costs."""
        if self._forward is not None and self._step_tokens > 0:
            self._forward.start(self._step_tokens)

    def forward_done(self) -> None:
        if self._forward is not None:
            self._forward.stop()

    def worker_meta(self) -> OffloadWorkerMetadata | None:
        measured = self._measured
        if self._forward is not None:
            measured.steps.extend(self._forward.take())
        if self.disk is not None:
            measured.written.extend(self.disk.completed())
        if not measured:
            return None
        self._measured = OffloadWorkerMetadata()
        return measured

    def stats(self) -> KvbmConnectorStats | None:
        if not self._transfer and not self._plans:
            return None
        body = _empty_stats()
        body["transfer"], self._transfer = self._transfer, {}
        body["plans"], self._plans = self._plans, []
        return KvbmConnectorStats({EXTRA_KEY: body})

    def shutdown(self) -> None:
        for load in self._loads.values():
            if load.reads is not None:
                load.reads.close()  # reads still running drop their rows when done
        self._loads.clear()
        if self.reader is not None:
            self.reader.stop()  # the reads already queued finish: file reads, bounded
            self.reader = None
        disk = self.disk
        if disk is not None:
            disk.stop()  # queued writes are what a restart finds
            self.executor = None


# ----------------------------------------------------------------------------- connector


class DynamoKvbmConnector(KVConnectorBase_V1):
    """vLLM's connector interface over `_SchedulerSide` (role SCHEDULER) or `_WorkerSide`
    (role WORKER); see the module docstring for which state lives where."""

    def __init__(self, vllm_config: Any, role: Any, kv_cache_config: Any = None) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        extra = self._kv_transfer_config.kv_connector_extra_config or {}
        config = KvbmConfig(**extra.get(EXTRA_KEY, {}))
        parallel = vllm_config.parallel_config
        tp_size = parallel.tensor_parallel_size
        tp_rank = 0
        if role == KVConnectorRole.WORKER and tp_size > 1:
            from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

            tp_rank = get_tensor_model_parallel_rank()
        layout = layout_of(kv_cache_config, tp_rank, tp_size)
        self._scheduler: _SchedulerSide | None = None
        self._worker: _WorkerSide | None = None
        self._lost: list[int] = []
        if role == KVConnectorRole.SCHEDULER:
            self._scheduler = _SchedulerSide(config, layout)
        else:
            self._worker = _WorkerSide(config, layout, kv_cache_config.kv_cache_groups[0].layer_names,
                                       kv_cache_config.num_blocks)

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a cache: a dropped offload is a later miss, never a broken request

    # ------------------------------------------------------------------------ worker side

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        assert self._worker is not None
        self._worker.register(kv_caches)

    def handle_preemptions(self, kv_connector_metadata: Any) -> None:
        # vLLM calls this at every step, before its forward pass if it has one (see the module
        # docstring).
        assert self._worker is not None
        if isinstance(kv_connector_metadata, OffloadMetadata):
            self._worker.execute(kv_connector_metadata)
            self._worker.forward_started()

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        pass  # loaded in handle_preemptions, asynchronous loads included

    def wait_for_layer_load(self, layer_name: str) -> None:
        pass

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        pass

    def wait_for_save(self) -> None:
        # vLLM calls this once the step's forward pass is launched (or, on a CPU, done).
        if self._worker is not None:
            self._worker.forward_done()

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        # Asynchronous loads queued this step. vLLM calls get_block_ids_with_load_errors right
        # after, in the same step: their failed blocks are reported with them, as it requires.
        if self._worker is None:
            return None, None
        self._worker.finish_loads()
        return None, self._worker.take_finished() or None

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._worker.take_lost() if self._worker is not None else set()

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        return self._worker.worker_meta() if self._worker is not None else None

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.shutdown()

    # --------------------------------------------------------------------- scheduler side

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
        assert self._scheduler is not None
        # Asynchronously (vLLM holds the request in WAITING_FOR_REMOTE_KVS) when a disk hit's
        # read would hold up the step for long; otherwise synchronously, before the step's
        # forward pass.
        return self._scheduler.num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        assert self._scheduler is not None
        block_ids = blocks.get_block_ids()[0] if num_external_tokens else []
        self._lost.extend(self._scheduler.after_alloc(request, block_ids, num_external_tokens))

    def get_external_cache_hit_sources(self, request: Any, num_external_tokens: int) -> dict[Any, int]:
        assert self._scheduler is not None
        return self._scheduler.hit_sources(request, num_external_tokens)

    def build_connector_meta(self, scheduler_output: Any) -> KVConnectorMetadata:
        assert self._scheduler is not None
        lost, self._lost = self._lost, []
        return self._scheduler.build_meta(lost, scheduler_output.total_num_scheduled_tokens,
                                          len(scheduler_output.num_scheduled_tokens))

    def update_connector_output(self, connector_output: Any) -> None:
        assert self._scheduler is not None
        # Loads first: an unreadable file they pinned can then be forgotten at once.
        self._scheduler.loads_done(getattr(connector_output, "finished_recving", None) or ())
        self._scheduler.worker_output(getattr(connector_output, "kv_connector_worker_meta", None))

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        assert self._scheduler is not None
        self._scheduler.finished(request, block_ids)
        # Copied before any forward pass can overwrite them: free them now. (Aborted while
        # loading, vLLM keeps them until the load is reported finished anyway.)
        return False, None

    def take_events(self) -> Iterable[Any]:
        return self._scheduler.take_events() if self._scheduler is not None else ()

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        if self._scheduler is not None:
            return self._scheduler.stats()
        return self._worker.stats() if self._worker is not None else None

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVConnectorStats | None:
        return KvbmConnectorStats(data)

    @classmethod
    def build_prom_metrics(
        cls,
        vllm_config: Any,
        metric_types: dict[Any, Any],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> KVConnectorPromMetrics | None:
        # Alone, vLLM skips a connector without Prometheus metrics; under MultiConnector (with the
        # transfer connector on a decode worker) it asserts every connector with stats has them.
        # Ours reach dynamo_kvbm_* through the worker (KvbmView), so vLLM's observer records nothing.
        return _NoPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)


class _NoPromMetrics(KVConnectorPromMetrics):
    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        return None

    @classmethod
    def get_required_kvcache_layout(cls, vllm_config: Any) -> str | None:
        return None


def _register() -> None:
    """vLLM's MultiConnector rebuilds each connector's stats from vLLM's registry by class name
    (its stat loggers, in the worker process); a connector loaded by module path is not in it."""
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    try:
        KVConnectorFactory.register_connector(CONNECTOR_NAME, MODULE_PATH, CONNECTOR_NAME)
    except ValueError:
        pass  # registered already


_register()
