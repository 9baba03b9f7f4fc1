"""KVBM settings: the --kvbm-* flags (with DYN_KVBM_* environment fallbacks), declared once for
whichever engine an entry point serves, and the frozen KvbmConfig the tiers are built from."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Literal

from dynamo.flags import Flag, FlagGroup

OffloadPolicyName = Literal["all", "reused", "frequency"]
EvictionName = Literal["lru", "slru"]
DiskLoadName = Literal["auto", "sync", "async"]
OFFLOAD_POLICIES: tuple[OffloadPolicyName, ...] = ("all", "reused", "frequency")
EVICTIONS: tuple[EvictionName, ...] = ("lru", "slru")
ONBOARD_COSTS = ("on", "requester", "off")
DISK_LOADS: tuple[DiskLoadName, ...] = ("auto", "sync", "async")

# Disk size when a directory is given but no size: enough for a few thousand 2 MiB blocks.
DEFAULT_DISK_GB = 16.0


@dataclass(frozen=True, slots=True)
class KvbmConfig:
    """Lower KV tiers below the engine's device pool (G1). Everything off by default.

    Sizes: `host_blocks` wins over `host_gb` (likewise for disk); gigabytes are turned into
    blocks once the engine knows its block's bytes (`host_capacity_blocks`). The mocker
    simulates the disk tier, so it needs no `disk_dir`; the built-in engine does.
    Bandwidths (GB/s) feed the mocker's time model and start the onboard cost model's estimates
    (kvbm/onboard_cost.py) before it has measured a tier: 55 is the pinned-host copy measured on
    an H200 (DESIGN.md), 5 a PCIe 4 NVMe drive's sequential read. With `disk_probe` a real disk
    tier's read estimate is measured when it opens instead (kvbm/disk_probe.py).
    """

    host_blocks: int | None = None
    host_gb: float | None = None
    disk_dir: str | None = None
    disk_blocks: int | None = None
    disk_gb: float | None = None
    offload_policy: OffloadPolicyName = "all"
    offload_min_hits: int = 2  # "frequency": a prefix must have been looked up this often
    eviction: EvictionName = "slru"  # slru: LRU that protects blocks hit more than once
    protected_fraction: float = 0.8  # slru: share of a tier that re-used blocks may hold
    # Disk writes planned or in flight at most (beyond, blocks are not kept on disk); also how
    # close to eviction a host block is written ahead (kvbm/tiered.py).
    disk_queue_blocks: int = 256
    host_gbps: float = 55.0
    disk_gbps: float = 5.0
    # The mocker's simulated disk writes (GB/s, one block at a time off the steps); None: they
    # take no simulated time. The built-in engine's take what its disk takes.
    disk_write_gbps: float | None = None
    # Onboard a hit only when its measured read cost is below recomputing its tokens
    # (kvbm/onboard_cost.py); off: onboard every hit.
    onboard_cost: bool = True
    # Offload to a tier only while it pays: its measured hits' savings against what keeping it
    # costs the step (kvbm/offload_value.py); off: offload every evicted block the policy allows.
    offload_cost: bool = True
    # Weigh a recomputed token by the requests of the step it lengthens (a read delays only its
    # own request); off: by the requester's time alone.
    onboard_cost_sharing: bool = True
    # Device-to-host copies of offloaded blocks wait (in device staging) until this many are
    # gathered or the next step boundary, so small evictions move in fewer, larger copies.
    offload_flush_blocks: int = 16
    # vLLM's connector: how a request with disk hits loads. sync: its files are read on the model
    # thread before the forward pass of the step that schedules it (every request of the step
    # waits); async: read off that thread while vLLM holds the request back (it runs a step
    # later); auto: per request, sync when its estimated read is short next to a step
    # (workers/vllm/connector/offload.py). The built-in engine always reads off its model thread.
    disk_load: DiskLoadName = "auto"
    # Time reads of a few block files when a real disk tier opens (from the device or the page
    # cache, as the tier's size says its hits will be): the onboard cost model's disk estimate
    # until a real read replaces it, so the tier is judged from its first eviction
    # (kvbm/disk_probe.py); off: `disk_gbps` stands.
    disk_probe: bool = True

    def __post_init__(self) -> None:
        for name in ("host_blocks", "disk_blocks"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        for name in ("host_gb", "disk_gb"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if self.offload_policy not in OFFLOAD_POLICIES:
            raise ValueError(f"offload_policy must be one of {OFFLOAD_POLICIES}, got {self.offload_policy!r}")
        if self.eviction not in EVICTIONS:
            raise ValueError(f"eviction must be one of {EVICTIONS}, got {self.eviction!r}")
        if self.offload_min_hits < 1:
            raise ValueError(f"offload_min_hits must be >= 1, got {self.offload_min_hits}")
        if not 0 <= self.protected_fraction <= 1:
            raise ValueError(f"protected_fraction must be in [0, 1], got {self.protected_fraction}")
        if self.disk_queue_blocks < 1:
            raise ValueError(f"disk_queue_blocks must be >= 1, got {self.disk_queue_blocks}")
        if not (self.host_gbps > 0 and self.disk_gbps > 0) or (self.disk_write_gbps is not None and self.disk_write_gbps <= 0):
            raise ValueError("bandwidths must be positive")
        if self.offload_flush_blocks < 1:
            raise ValueError(f"offload_flush_blocks must be >= 1, got {self.offload_flush_blocks}")
        if self.disk_load not in DISK_LOADS:
            raise ValueError(f"disk_load must be one of {DISK_LOADS}, got {self.disk_load!r}")

    def host_capacity_blocks(self, block_bytes: int) -> int:
        if self.host_blocks is not None:
            return self.host_blocks
        return int(self.host_gb * 1e9) // block_bytes if self.host_gb else 0

    def disk_capacity_blocks(self, block_bytes: int) -> int:
        if self.disk_blocks is not None:
            return self.disk_blocks
        gb = self.disk_gb if self.disk_gb is not None else (DEFAULT_DISK_GB if self.disk_dir else 0.0)
        return int(gb * 1e9) // block_bytes

    @property
    def enabled(self) -> bool:
        return bool(self.host_blocks or self.host_gb or self.disk_dir or self.disk_blocks or self.disk_gb)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> KvbmConfig:
        """Tolerates a namespace without the kvbm flags (then KVBM is off)."""
        d = cls()
        return cls(
            host_blocks=getattr(args, "kvbm_host_blocks", None),
            host_gb=getattr(args, "kvbm_host_gb", None),
            disk_dir=getattr(args, "kvbm_disk_dir", None),
            disk_blocks=getattr(args, "kvbm_disk_blocks", None),
            disk_gb=getattr(args, "kvbm_disk_gb", None),
            offload_policy=getattr(args, "kvbm_offload_policy", d.offload_policy),
            offload_min_hits=getattr(args, "kvbm_offload_min_hits", d.offload_min_hits),
            eviction=getattr(args, "kvbm_eviction", d.eviction),
            host_gbps=getattr(args, "kvbm_host_gbps", d.host_gbps),
            disk_gbps=getattr(args, "kvbm_disk_gbps", d.disk_gbps),
            onboard_cost=getattr(args, "kvbm_onboard_cost", "on") != "off",
            onboard_cost_sharing=getattr(args, "kvbm_onboard_cost", "on") == "on",
            offload_cost=getattr(args, "kvbm_offload_cost", "on") != "off",
            offload_flush_blocks=getattr(args, "kvbm_offload_flush_blocks", d.offload_flush_blocks),
            disk_load=getattr(args, "kvbm_disk_load", d.disk_load),
            disk_probe=getattr(args, "kvbm_disk_probe", "on") != "off",
        )


_D = KvbmConfig()
KVBM_FLAGS = FlagGroup(
    "KV block manager (host and disk tiers)",
    [
        Flag("--kvbm-host-blocks", "G2 host-memory tier size in blocks", None, "DYN_KVBM_HOST_BLOCKS", int),
        Flag("--kvbm-host-gb", "G2 host-memory tier size in GB (pinned on CUDA)", None, "DYN_KVBM_HOST_GB", float),
        Flag("--kvbm-disk-dir", "G3 disk tier directory; shared by workers of one model layout and kept across "
             "restarts", None, "DYN_KVBM_DISK_DIR"),
        Flag("--kvbm-disk-blocks", "G3 disk tier size in blocks", None, "DYN_KVBM_DISK_BLOCKS", int),
        Flag("--kvbm-disk-gb", "G3 disk tier size in GB", None, "DYN_KVBM_DISK_GB", float,
             default_doc=f"{DEFAULT_DISK_GB:g} with a directory"),
        Flag("--kvbm-offload-policy", "which blocks evicted from the device are kept below: all, reused (hit at "
             "least once) or frequency (prefix looked up --kvbm-offload-min-hits times)", _D.offload_policy,
             "DYN_KVBM_OFFLOAD_POLICY", choices=OFFLOAD_POLICIES),
        Flag("--kvbm-offload-min-hits", "frequency policy threshold", _D.offload_min_hits,
             "DYN_KVBM_OFFLOAD_MIN_HITS", int),
        Flag("--kvbm-eviction", "lower-tier eviction: lru, or slru (LRU that protects re-used blocks)",
             _D.eviction, "DYN_KVBM_EVICTION", choices=EVICTIONS),
        Flag("--kvbm-host-gbps", "host-to-device bandwidth: the mocker's simulated one, and the onboard cost "
             "model's estimate until it has measured one", _D.host_gbps, "DYN_KVBM_HOST_GBPS", float),
        Flag("--kvbm-disk-gbps", "disk read bandwidth: the mocker's simulated one, and the onboard cost model's "
             "estimate until it has measured one (with --kvbm-disk-probe off)", _D.disk_gbps, "DYN_KVBM_DISK_GBPS",
             float),
        Flag("--kvbm-onboard-cost", "onboard a lower-tier hit only when its measured read cost is below "
             "recomputing its tokens at the engine's measured prefill rate, a recomputed token weighed by the "
             "requests of the step it lengthens (on), or by the requester's time alone (requester); off: always "
             "onboard", "on", "DYN_KVBM_ONBOARD_COST", choices=ONBOARD_COSTS),
        Flag("--kvbm-offload-cost", "offload to a tier only while it pays: its measured hits per offloaded block "
             "times what a hit saves (recompute less the read) against the measured cost of an offload on the "
             "step's critical path; a tier that does not pay takes one eviction batch in 8, none while its hits "
             "would be recomputed anyway (on); off: offload whatever the policy allows", "on",
             "DYN_KVBM_OFFLOAD_COST", choices=("on", "off")),
        Flag("--kvbm-offload-flush-blocks", "device-to-host offload copies wait until this many blocks are "
             "gathered or the next step", _D.offload_flush_blocks, "DYN_KVBM_OFFLOAD_FLUSH_BLOCKS", int),
        Flag("--kvbm-disk-load", "vLLM worker: how a request with disk hits loads: sync (read on the model "
             "thread before the step that schedules it), async (read off it while vLLM holds the request back a "
             "step), or auto (sync when its measured read, times the step's requests, is shorter than a step)",
             _D.disk_load, "DYN_KVBM_DISK_LOAD", choices=DISK_LOADS),
        Flag("--kvbm-disk-probe", "when the disk tier opens, time reading back a few block files written "
             "under its directory (dropped from the page cache first when the tier is larger than half the memory "
             "available to cache it): the onboard cost model's disk estimate until a real disk hit is read, so a disk "
             "slower than recompute takes no offload from the first eviction (on); off: --kvbm-disk-gbps stands until "
             "then", "on", "DYN_KVBM_DISK_PROBE", choices=("on", "off")),
    ],
)


def add_kvbm_args(parser: argparse.ArgumentParser) -> None:
    KVBM_FLAGS.add_to(parser)
