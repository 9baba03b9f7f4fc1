"""Tenants: API keys -> tenant (name, priority class, limits), from a YAML or JSON keys file
that is re-read when it changes, plus `--api-key`'s keys as the tenant `default`. Keys are
held only as SHA-256 digests: a lookup hashes the presented key, so its timing says nothing
about the stored keys."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)

# The tenant of `--api-key`'s keys (declare it in the file to give it limits).
DEFAULT_TENANT = "default"


@dataclass(frozen=True, slots=True)
class TenantLimits:
    """Per-minute limits; 0 is unlimited."""

    requests_per_min: int = 0
    input_tokens_per_min: int = 0
    output_tokens_per_min: int = 0


@dataclass(frozen=True, slots=True)
class Tenant:
    name: str
    # The priority class its requests queue in when the frontend is saturated (frontend/admission.py).
    priority: str = "default"
    limits: TenantLimits = field(default_factory=TenantLimits)
    # Its share of a class's capacity against the class's other tenants (weighted fair queuing).
    weight: float = 1.0
    # May choose a request's class with the `x-dynamo-priority` header.
    trusted: bool = False


@dataclass(frozen=True, slots=True)
class PriorityClass:
    """A priority band of the admission queue, with its TTFT target (SLO-aware admission)."""

    name: str
    # 0: no target. A request predicted to miss it is shed (503) or held back, by `over_target`.
    ttft_target_s: float = 0.0
    over_target: str = "shed"  # "shed" | "queue"
    # How long a request of this class may wait for admission; None: --queue-timeout-s.
    queue_timeout_s: float | None = None


# Without `priority_classes:` in the file: these bands, highest first.
DEFAULT_CLASSES = (PriorityClass("interactive"), PriorityClass("default"), PriorityClass("batch"))
OVER_TARGET_POLICIES = ("shed", "queue")


class TenantsFileError(ValueError):
    pass


def key_digest(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()


@dataclass(frozen=True, slots=True)
class TenantTable:
    """Key digest -> tenant: what ApiKeyMiddleware looks a key up in."""

    by_digest: dict[bytes, Tenant]
    # Highest first.
    classes: tuple[PriorityClass, ...] = DEFAULT_CLASSES

    def priority_class(self, name: str) -> PriorityClass | None:
        for cls in self.classes:
            if cls.name == name:
                return cls
        return None

    def lookup(self, key: bytes) -> Tenant | None:
        return self.by_digest.get(key_digest(key))

    def __len__(self) -> int:
        return len(self.by_digest)


def parse_tenants(data: Any, default_keys: Iterable[str] = ()) -> TenantTable:
    """The keys file's content (see docs/tenants.md) plus `--api-key`'s keys -> a TenantTable.

        tenants:
          team-a:
            priority: interactive
            limits: {requests_per_min: 600, input_tokens_per_min: 200000, output_tokens_per_min: 50000}
            keys: [sk-team-a-1]
            keys_sha256: [<hex digest of a key>]   # instead of the key itself
    """
    if data is None:
        data = {}
    if not isinstance(data, dict) or not isinstance(data.get("tenants", {}), dict):
        raise TenantsFileError("the tenants file must be a mapping with a `tenants:` mapping of name -> tenant")
    unknown_top = set(data) - {"tenants", "priority_classes"}
    if unknown_top:
        raise TenantsFileError(f"unknown top-level fields {sorted(unknown_top)}")
    classes = _classes(data.get("priority_classes"))
    class_names = {c.name for c in classes}
    by_digest: dict[bytes, Tenant] = {}
    tenants: dict[str, Tenant] = {}

    def add(digest: bytes, tenant: Tenant) -> None:
        other = by_digest.setdefault(digest, tenant)
        if other is not tenant:
            raise TenantsFileError(f"a key of tenant {tenant.name!r} is also a key of {other.name!r}")

    for name, spec in (data.get("tenants") or {}).items():
        spec = spec or {}
        if not isinstance(spec, dict):
            raise TenantsFileError(f"tenant {name!r}: expected a mapping")
        unknown = set(spec) - {"priority", "limits", "keys", "keys_sha256", "weight", "trusted"}
        if unknown:
            raise TenantsFileError(f"tenant {name!r}: unknown fields {sorted(unknown)}")
        priority = str(spec.get("priority", "default"))
        if priority not in class_names:
            raise TenantsFileError(f"tenant {name!r}: priority {priority!r} is not one of {sorted(class_names)}")
        weight = _number(f"tenant {name!r}: weight", spec.get("weight", 1.0))
        if weight <= 0:
            raise TenantsFileError(f"tenant {name!r}: weight must be > 0")
        trusted = spec.get("trusted", False)
        if not isinstance(trusted, bool):
            raise TenantsFileError(f"tenant {name!r}: trusted is true or false")
        tenant = Tenant(
            str(name), priority, _limits(str(name), spec.get("limits") or {}), weight=weight, trusted=trusted
        )
        tenants[tenant.name] = tenant
        for key in spec.get("keys") or ():
            add(key_digest(str(key).encode()), tenant)
        for hex_digest in spec.get("keys_sha256") or ():
            try:
                digest = bytes.fromhex(str(hex_digest))
            except ValueError:
                digest = b""
            if len(digest) != 32:
                raise TenantsFileError(f"tenant {name!r}: keys_sha256 entries are 64 hex digits")
            add(digest, tenant)
    default = tenants.get(DEFAULT_TENANT) or Tenant(DEFAULT_TENANT)
    for key in default_keys:
        add(key_digest(key.encode()), default)
    return TenantTable(by_digest, classes)


def _number(what: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TenantsFileError(f"{what} must be a number")
    return float(value)


def _classes(spec: Any) -> tuple[PriorityClass, ...]:
    """`priority_classes:`, a list highest first: name, ttft_target_ms, over_target, queue_timeout_s.
    A class `default` is appended (lowest) when the list lacks it: tenants without a `priority`
    are in it."""
    if spec is None:
        return DEFAULT_CLASSES
    if not isinstance(spec, list) or not spec:
        raise TenantsFileError("priority_classes must be a non-empty list, highest priority first")
    classes: list[PriorityClass] = []
    for entry in spec:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise TenantsFileError("each of priority_classes is a mapping with a `name`")
        name = entry["name"]
        unknown = set(entry) - {"name", "ttft_target_ms", "over_target", "queue_timeout_s"}
        if unknown:
            raise TenantsFileError(f"priority class {name!r}: unknown fields {sorted(unknown)}")
        if any(c.name == name for c in classes):
            raise TenantsFileError(f"priority class {name!r} is declared twice")
        target_ms = _number(f"priority class {name!r}: ttft_target_ms", entry.get("ttft_target_ms", 0))
        over_target = entry.get("over_target", "shed")
        if over_target not in OVER_TARGET_POLICIES:
            raise TenantsFileError(f"priority class {name!r}: over_target is one of {list(OVER_TARGET_POLICIES)}")
        timeout = entry.get("queue_timeout_s")
        timeout_s = None if timeout is None else _number(f"priority class {name!r}: queue_timeout_s", timeout)
        if target_ms < 0 or (timeout_s is not None and timeout_s <= 0):
            raise TenantsFileError(f"priority class {name!r}: ttft_target_ms >= 0 and queue_timeout_s > 0")
        classes.append(PriorityClass(name, target_ms / 1000.0, over_target, timeout_s))
    if not any(c.name == "default" for c in classes):
        classes.append(PriorityClass("default"))
    return tuple(classes)


def _limits(name: str, spec: Any) -> TenantLimits:
    if not isinstance(spec, dict):
        raise TenantsFileError(f"tenant {name!r}: limits must be a mapping")
    unknown = set(spec) - set(TenantLimits.__slots__)
    if unknown:
        raise TenantsFileError(f"tenant {name!r}: unknown limits {sorted(unknown)}")
    values = {k: int(v) for k, v in spec.items()}
    if any(v < 0 for v in values.values()):
        raise TenantsFileError(f"tenant {name!r}: limits are >= 0 (0: unlimited)")
    return TenantLimits(**values)


def read_tenants_file(path: Path, default_keys: Iterable[str] = ()) -> TenantTable:
    """Blocking: run it in a thread. JSON for a `.json` file, YAML (a superset) otherwise."""
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise TenantsFileError(f"{path}: {exc}") from None
    return parse_tenants(data, default_keys)


def _signature(st: os.stat_result) -> tuple[int, int, int]:
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class TenantRegistry:
    """The current TenantTable; with a file, one owned task polls its mtime every `poll_s`
    and swaps in the new table (a file that fails to parse keeps the old one, with an error in
    the log). `reloaded` is set after each successful reload: to wait for the next one, clear
    it before changing the file."""

    def __init__(self, path: Path | None, default_keys: Iterable[str] = (), poll_s: float = 2.0) -> None:
        self.path = path
        self.poll_s = poll_s
        self._default_keys = tuple(default_keys)
        self._signature: tuple[int, int, int] | None = None
        self.table = parse_tenants({}, self._default_keys)
        self.reloaded = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        if path is not None:
            # At startup a bad file is an error, not a log line.
            self._signature = _signature(path.stat())
            self.table = read_tenants_file(path, self._default_keys)

    def lookup(self, key: bytes) -> Tenant | None:
        return self.table.lookup(key)

    async def reload(self) -> bool:
        """Re-read the file if it changed (mtime, size or inode: an atomic rename or a
        Kubernetes Secret's symlink swap changes the inode); True when a new table is in place."""
        if self.path is None:
            return False
        try:
            signature = _signature(await asyncio.to_thread(os.stat, self.path))
            if signature == self._signature:
                return False
            table = await asyncio.to_thread(read_tenants_file, self.path, self._default_keys)
        except (OSError, TenantsFileError, UnicodeDecodeError) as exc:
            log.error("tenants file %s not reloaded, keeping the previous one: %s", self.path, exc)
            return False
        self._signature = signature
        self.table = table
        log.info("tenants file %s reloaded: %d keys", self.path, len(table))
        self.reloaded.set()
        return True

    def start(self) -> None:
        """Start the poller (idempotent; needs a running loop). Frontend.start() calls it; so
        does ApiKeyMiddleware on a request, for apps served without the Frontend service."""
        if self._task is None and self.path is not None:
            self._task = asyncio.get_running_loop().create_task(self._poll(), name="tenants-file-poll")

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            await self.reload()

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def __aenter__(self) -> TenantRegistry:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
