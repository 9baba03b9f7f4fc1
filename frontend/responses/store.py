"""Where stored responses live, for GET/DELETE /v1/responses/{id} and for continuing a
conversation by previous_response_id from any frontend replica.

`DiscoveryResponseStore` keeps them in the runtime's discovery KV: etcd in the distributed
runtime (every frontend of the namespace reads what any of them wrote), the in-memory registry
in the embedded one. Why there: the frontends already share it, it needs no new server, and
etcd's leases give expiry for free. A record is one key (`v1/responses/<namespace>/<id>`), the
whole conversation in it, so a continuation is one read whatever the chain's length. etcd caps a
value at ~1.5 MB: conversations beyond that are not stored (logged), and continuing them gets
the not-found 400.

TTL -> leases: time is cut into buckets `ttl_s / BUCKETS_PER_TTL` wide; every record written in
one bucket goes under that bucket's lease (granted on the bucket's first write, so the lease
count stays at BUCKETS_PER_TTL + 1 per replica, not one per response), and the lease is revoked
once the bucket's last record is `ttl_s` old. A record is thus kept between ttl_s and ttl_s plus
one bucket; reads check the record's own expiry, so what a client sees expires at exactly ttl_s.
Leases are revoked lazily, by the store's next call past the due time (no timer task to own).
A lease is granted with TTL ttl_s + one bucket and is not kept alive: granted at the bucket's
first write, it expires no earlier than the bucket's last record is due, so etcd frees the
records by itself when no store call comes. Nothing ties them to the writer's life: a frontend
that crashes, restarts or shuts down cleanly (a rolling update) leaves the responses it stored
readable by the other replicas for their whole TTL (docs/api.md)."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable

import msgspec

from dynamo import errors
from dynamo.runtime.planes import Discovery
from frontend.responses.schemas import StoredResponse

log = logging.getLogger(__name__)

RESPONSES_ROOT = "v1/responses/"
BUCKETS_PER_TTL = 4
DEFAULT_TTL_S = 3600.0

_decoder = msgspec.msgpack.Decoder(StoredResponse)
_encode = msgspec.msgpack.encode


class ResponseNotFound(errors.ModelNotFound):
    """GET/DELETE of an id the store does not have (404, like the project's other not-found)."""


class ResponseStore(ABC):
    ttl_s: float

    @abstractmethod
    async def put(self, record: StoredResponse) -> None: ...

    @abstractmethod
    async def get(self, response_id: str) -> StoredResponse | None:
        """None when unknown or expired."""

    @abstractmethod
    async def delete(self, response_id: str) -> bool:
        """Whether it was there."""


class DiscoveryResponseStore(ResponseStore):
    def __init__(
        self,
        discovery: Discovery,
        namespace: str,
        ttl_s: float = DEFAULT_TTL_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if ttl_s <= 0:
            raise ValueError(f"response store TTL must be positive, got {ttl_s}")
        self.discovery = discovery
        self.prefix = f"{RESPONSES_ROOT}{namespace}/"
        self.ttl_s = ttl_s
        self.bucket_s = ttl_s / BUCKETS_PER_TTL
        self._clock = clock  # wall clock: expiry times are compared across replicas
        self._leases: dict[int, int] = {}  # bucket number -> lease id
        self._granting = asyncio.Lock()  # concurrent first writes of a bucket share one lease

    def key(self, response_id: str) -> str:
        return self.prefix + response_id

    def expires_at(self) -> float:
        return self._clock() + self.ttl_s

    async def put(self, record: StoredResponse) -> None:
        await self._revoke_due()
        bucket = math.floor(self._clock() / self.bucket_s)
        async with self._granting:
            lease = self._leases.get(bucket)
            if lease is None:
                lease = await self.discovery.create_lease(self.ttl_s + self.bucket_s, keep_alive=False)
                self._leases[bucket] = lease
        await self.discovery.put(self.key(record.response.id), _encode(record), lease_id=lease)

    async def get(self, response_id: str) -> StoredResponse | None:
        await self._revoke_due()
        key = self.key(response_id)
        value = (await self.discovery.get_prefix(key)).get(key)
        if value is None:
            return None
        record = _decoder.decode(value)
        if record.expires_at_s <= self._clock():
            return None  # its bucket's lease is not revoked yet; the record is gone all the same
        return record

    async def delete(self, response_id: str) -> bool:
        if await self.get(response_id) is None:
            return False
        await self.discovery.delete(self.key(response_id))
        return True

    async def _revoke_due(self) -> None:
        """Revoke the leases of buckets whose every record is past its TTL."""
        now = self._clock()
        for bucket in [b for b in self._leases if (b + 1) * self.bucket_s + self.ttl_s <= now]:
            lease = self._leases.pop(bucket)
            try:
                await self.discovery.revoke_lease(lease)
            except errors.DynamoError as exc:  # etcd drops it at its own TTL anyway
                log.warning("could not revoke response-store lease %x: %s", lease, exc)
