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
    # Read by nothing yet: priority queuing is the next slice of issue 20.
    priority: str = "default"
    limits: TenantLimits = field(default_factory=TenantLimits)


class TenantsFileError(ValueError):
    pass


def key_digest(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()


@dataclass(frozen=True, slots=True)
class TenantTable:
    """Key digest -> tenant: what ApiKeyMiddleware looks a key up in."""

    by_digest: dict[bytes, Tenant]

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
        unknown = set(spec) - {"priority", "limits", "keys", "keys_sha256"}
        if unknown:
            raise TenantsFileError(f"tenant {name!r}: unknown fields {sorted(unknown)}")
        tenant = Tenant(str(name), str(spec.get("priority", "default")), _limits(str(name), spec.get("limits") or {}))
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
    return TenantTable(by_digest)


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
