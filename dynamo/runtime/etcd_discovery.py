"""Discovery on etcd v3 (aetcd): leases kept alive by owned tasks, and prefix watches that deliver
a snapshot and then every later change, with no gap and no duplicate between the two.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import TypeVar
from urllib.parse import urlsplit

import aetcd
import grpc
from aetcd import exceptions as etcd_errors
from aetcd.rtypes import EventKind
from grpc.aio import AioRpcError

from dynamo import errors
from dynamo.config import redact_url
from dynamo.runtime.planes import Discovery, LeaseLostCallback, Watch, WatchEvent

log = logging.getLogger(__name__)

T = TypeVar("T")

# Errors that mean "etcd is unreachable or refused", as opposed to bugs.
_ETCD_ERRORS = (etcd_errors.ClientError, AioRpcError)
_RECONNECT_MAX_DELAY_S = 2.0


def parse_endpoint(url: str) -> tuple[str, int]:
    """`http://host:port` (or bare `host:port`) -> (host, port); etcd's default port is 2379."""
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if not parts.hostname:
        raise errors.DynamoError(f"bad etcd endpoint {url!r}: expected http://host:port")
    return parts.hostname, parts.port or 2379


@dataclass(frozen=True, slots=True)
class EtcdSecurity:
    """TLS (CA, optional client cert/key for mTLS) and user/password for etcd."""

    ca_path: str | None = None
    cert_path: str | None = None
    key_path: str | None = field(default=None, repr=False)
    user: str | None = None
    password: str | None = field(default=None, repr=False)

    def credentials(self) -> grpc.ChannelCredentials | None:
        if not (self.ca_path or self.cert_path):
            return None

        def read(path: str | None) -> bytes | None:
            if path is None:
                return None
            try:
                with open(path, "rb") as f:
                    return f.read()
            except OSError as exc:
                raise errors.DynamoError(f"cannot read etcd TLS file {path!r}: {exc}") from exc

        return grpc.ssl_channel_credentials(read(self.ca_path), read(self.key_path), read(self.cert_path))


class _TlsClient(aetcd.Client):
    """aetcd opens only insecure channels; this opens a TLS one, then lets aetcd finish
    connecting (authentication and stubs) on it."""

    def __init__(self, credentials: grpc.ChannelCredentials, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self._credentials = credentials

    async def connect(self) -> None:
        if self._connected.is_set() or self._is_connecting:
            return await super().connect()
        insecure = aetcd.rpc.insecure_channel
        credentials = self._credentials

        def secure(target: str, options: object = None) -> grpc.aio.Channel:
            return grpc.aio.secure_channel(target, credentials, options=options)  # type: ignore[arg-type]

        # aetcd.Client.connect builds its channel with rpc.insecure_channel: swap it for the
        # duration of this call (single-threaded event loop: no one else connects meanwhile).
        aetcd.rpc.insecure_channel = secure  # type: ignore[assignment]
        try:
            return await super().connect()
        finally:
            aetcd.rpc.insecure_channel = insecure  # type: ignore[assignment]


class _EtcdWatch(Watch):
    """Events of one prefix. A task pumps etcd's watch stream into a queue; if the stream
    breaks (etcd restarted), it is reopened from the next unseen revision, and if that revision
    was compacted away meanwhile, the prefix is re-read and the difference emitted."""

    def __init__(self, discovery: EtcdDiscovery, prefix: str, revision: int, snapshot: dict[str, bytes]) -> None:
        self._discovery = discovery
        self.prefix = prefix
        self._prefix_b = prefix.encode()
        self._next_revision = revision + 1
        self._known: set[str] = set(snapshot)
        self.queue: asyncio.Queue[WatchEvent | None] = asyncio.Queue()
        for key in sorted(snapshot):
            self.queue.put_nowait(WatchEvent("put", key, snapshot[key]))
        self._stream: aetcd.rtypes.Watch | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    async def start(self) -> None:
        # Opened here rather than in the task so that a failure reaches watch_prefix's caller.
        self._stream = await self._discovery._call(
            f"watch {self.prefix!r}",
            self._discovery._client.watch_prefix(self._prefix_b, start_revision=self._next_revision),
        )
        self._task = asyncio.create_task(self._pump(), name=f"etcd-watch:{self.prefix}")

    async def _pump(self) -> None:
        delay_s = 0.1
        while not self._closed:
            try:
                stream = self._stream or await self._reopen()
                async for event in stream:
                    self._deliver(event)
                    delay_s = 0.1
                if self._closed:
                    return
                log.warning("etcd watch on %r ended; reopening", self.prefix)
            except etcd_errors.RevisionCompactedError as exc:
                log.warning("etcd watch on %r lost history (%s); re-reading the prefix", self.prefix, exc)
                await self._resync()
            except (TimeoutError, *_ETCD_ERRORS) as exc:
                log.warning("etcd watch on %r broke (%r); reopening in %.1fs", self.prefix, exc, delay_s)
            self._stream = None
            await asyncio.sleep(delay_s)  # reconnect backoff, not a synchronisation
            delay_s = min(delay_s * 2, _RECONNECT_MAX_DELAY_S)

    async def _reopen(self) -> aetcd.rtypes.Watch:
        self._stream = await asyncio.wait_for(
            self._discovery._client.watch_prefix(self._prefix_b, start_revision=self._next_revision),
            self._discovery.op_timeout_s + 1.0,
        )
        log.info("etcd watch on %r resumed at revision %d", self.prefix, self._next_revision)
        return self._stream

    def _deliver(self, event: aetcd.rtypes.Event) -> None:
        key = event.kv.key.decode()
        if event.kind == EventKind.PUT:
            self._known.add(key)
            self.queue.put_nowait(WatchEvent("put", key, event.kv.value))
        else:
            self._known.discard(key)
            self.queue.put_nowait(WatchEvent("delete", key))
        self._next_revision = event.kv.mod_revision + 1

    async def _resync(self) -> None:
        try:
            revision, current = await self._discovery._get_prefix_at(self.prefix)
        except errors.DynamoError as exc:
            log.warning("could not re-read %r: %s", self.prefix, exc)
            return  # the pump retries; the next attempt hits the compaction again and resyncs
        for key in sorted(self._known - set(current)):
            self.queue.put_nowait(WatchEvent("delete", key))
        for key in sorted(current):
            self.queue.put_nowait(WatchEvent("put", key, current[key]))
        self._known = set(current)
        self._next_revision = revision + 1

    async def __anext__(self) -> WatchEvent:
        item = await self.queue.get()
        if item is None:
            self.queue.put_nowait(None)  # stay closed for any later reader
            raise StopAsyncIteration
        return item

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._discovery._watches.discard(self)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        stream, self._stream = self._stream, None
        if stream is not None:
            try:
                await asyncio.wait_for(stream.cancel(), self._discovery.op_timeout_s)
            except (TimeoutError, AttributeError, *_ETCD_ERRORS) as exc:
                # The client may already be closed (AttributeError inside aetcd): nothing to cancel.
                log.debug("cancelling etcd watch on %r: %r", self.prefix, exc)
        self.queue.put_nowait(None)


class EtcdDiscovery(Discovery):
    """Discovery on one etcd endpoint. Every network wait is bounded by `op_timeout_s`.

    `on_lease_lost(lease_id)` is awaited when a keep-alive finds its lease gone (it expired
    while etcd was unreachable, or someone revoked it): the keys under it are gone, and the
    owner must re-register under a new lease or exit. Without a callback, only a warning is logged.
    """

    def __init__(
        self,
        client: aetcd.Client,
        url: str,
        *,
        op_timeout_s: float = 5.0,
        on_lease_lost: LeaseLostCallback | None = None,
    ) -> None:
        self._client = client
        self.url = url
        self.op_timeout_s = op_timeout_s
        self.on_lease_lost = on_lease_lost
        self._keepalives: dict[int, asyncio.Task[None]] = {}
        self._watches: set[_EtcdWatch] = set()

    @classmethod
    async def connect(
        cls,
        url: str,
        *,
        timeout_s: float = 5.0,
        on_lease_lost: LeaseLostCallback | None = None,
        security: EtcdSecurity | None = None,
    ) -> EtcdDiscovery:
        host, port = parse_endpoint(url)
        security = security or EtcdSecurity()
        kwargs: dict[str, object] = {"host": host, "port": port, "timeout": timeout_s}
        if security.user is not None:
            kwargs["username"] = security.user
            kwargs["password"] = security.password or ""
        credentials = security.credentials()
        client = aetcd.Client(**kwargs) if credentials is None else _TlsClient(credentials, **kwargs)  # type: ignore[arg-type]
        discovery = cls(client, redact_url(url), op_timeout_s=timeout_s, on_lease_lost=on_lease_lost)
        try:
            # gRPC connects lazily: one read proves the endpoint answers.
            await discovery._call("connect", client.get(b"\0dynamo-probe"))
        except errors.DynamoError:
            await client.close()
            raise
        return discovery

    async def _call(self, what: str, op: Awaitable[T]) -> T:
        try:
            return await asyncio.wait_for(op, self.op_timeout_s + 1.0)
        except TimeoutError:
            raise errors.DynamoError(f"etcd at {self.url}: {what} timed out after {self.op_timeout_s}s") from None
        except _ETCD_ERRORS as exc:
            raise errors.DynamoError(f"etcd at {self.url}: {what} failed: {exc}") from exc

    # ------------------------------------------------------------------------------- leases

    async def create_lease(self, ttl_s: float, keep_alive: bool = True) -> int:
        lease = await self._call("grant lease", self._client.lease(max(1, math.ceil(ttl_s))))
        lease_id = int(lease.id)
        if not keep_alive:
            return lease_id  # etcd expires it; close() revokes only the leases kept alive
        self._keepalives[lease_id] = asyncio.create_task(
            self._keep_alive(lease_id, float(lease.ttl)), name=f"etcd-keepalive:{lease_id:x}"
        )
        return lease_id

    async def _keep_alive(self, lease_id: int, ttl_s: float) -> None:
        interval_s = ttl_s / 3
        while True:
            await asyncio.sleep(interval_s)  # the refresh timer
            try:
                reply = await asyncio.wait_for(self._client.refresh_lease(lease_id), self.op_timeout_s + 1.0)
            except (TimeoutError, *_ETCD_ERRORS) as exc:
                # Keep trying: the lease survives an outage shorter than its TTL.
                log.warning("could not refresh lease %x at %s: %s", lease_id, self.url, exc)
                continue
            if reply is not None and reply.TTL > 0:
                continue
            log.warning("lease %x at %s is gone (expired or revoked); its keys were deleted", lease_id, self.url)
            try:
                # Still listed in _keepalives while the callback runs, so close() cancels it.
                if self.on_lease_lost is not None:
                    await self.on_lease_lost(lease_id)
            except Exception:  # a broken callback must not hide the lost lease
                log.exception("on_lease_lost callback failed for lease %x", lease_id)
            finally:
                self._keepalives.pop(lease_id, None)
            return

    async def _stop_keepalive(self, lease_id: int) -> None:
        task = self._keepalives.pop(lease_id, None)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def revoke_lease(self, lease_id: int) -> None:
        await self._stop_keepalive(lease_id)
        try:
            await self._call(f"revoke lease {lease_id:x}", self._client.revoke_lease(lease_id))
        except errors.DynamoError as exc:
            if "not found" not in str(exc):  # already expired: revoking is done
                raise

    # ---------------------------------------------------------------------------- key/value

    async def put(self, key: str, value: bytes, lease_id: int | None = None) -> None:
        try:
            await self._call(f"put {key!r}", self._client.put(key.encode(), value, lease=lease_id))
        except errors.DynamoError as exc:
            if lease_id is not None and "lease not found" in str(exc):
                raise errors.DynamoError(f"lease {lease_id:x} does not exist") from exc
            raise

    async def delete(self, key: str) -> None:
        await self._call(f"delete {key!r}", self._client.delete(key.encode()))

    async def _get_prefix_at(self, prefix: str) -> tuple[int, dict[str, bytes]]:
        result = await self._call(f"get prefix {prefix!r}", self._client.get_prefix(prefix.encode()))
        return result.header.revision, {kv.key.decode(): kv.value for kv in result.kvs}

    async def get_prefix(self, prefix: str) -> dict[str, bytes]:
        return (await self._get_prefix_at(prefix))[1]

    async def watch_prefix(self, prefix: str) -> Watch:
        # Snapshot at revision R, then watch from R + 1: every change lands exactly once.
        revision, snapshot = await self._get_prefix_at(prefix)
        watch = _EtcdWatch(self, prefix, revision, snapshot)
        await watch.start()
        self._watches.add(watch)
        return watch

    # ------------------------------------------------------------------------------- close

    async def close(self) -> None:
        """Close watches, revoke the leases still held (their keys vanish now, not after the
        TTL) and close the connection."""
        for watch in list(self._watches):
            await watch.close()
        for lease_id in list(self._keepalives):
            try:
                await self.revoke_lease(lease_id)
            except errors.DynamoError as exc:
                log.warning("could not revoke lease %x at close: %s", lease_id, exc)
        await self._client.close()
