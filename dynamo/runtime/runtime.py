"""Runtime, Endpoint and Client: addressing by namespace / component / endpoint on top of
whichever backend (embedded or distributed) provides the planes.

An instance is one server of an endpoint; it registers under the runtime's lease, so when the
process dies its registrations vanish within the lease TTL and every client forgets it. If the
lease is lost while the process lives (an etcd outage longer than the TTL), the runtime grants a
new one and re-puts every registration under it, keeping the same instance id. If callers cannot
reach its instances while its lease lives (its link to NATS is down, where it serves on NATS),
it withdraws them from discovery until they can.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from dynamo import errors
from dynamo.config import RuntimeConfig
from dynamo.runtime.planes import (
    Discovery,
    EventPlane,
    Handler,
    RequestPlane,
    ResponseStream,
    Served,
    Watch,
)
from dynamo.wire import INSTANCE_CODEC, InstanceInfo, encode

log = logging.getLogger(__name__)

# How long the request plane may stay unreachable before this runtime's instances are withdrawn
# from discovery. An instance callers cannot reach while its lease lives would take requests
# that wait out the ack timeout, and its callers' streams would wait for it as long as the
# outage lasts; withdrawn, it is dropped at once and its streams migrate. Shorter outages keep
# it registered: withdrawing costs routers their view of its cache.
WITHDRAW_AFTER_S = 10.0

INSTANCES_ROOT = "v1/instances/"


@dataclass(frozen=True, slots=True)
class EndpointPath:
    namespace: str
    component: str
    name: str

    @property
    def key_prefix(self) -> str:
        return f"{INSTANCES_ROOT}{self.namespace}/{self.component}/{self.name}/"

    def address(self, instance_id: int) -> str:
        # A NATS subject, also the embedded plane's address: tokens are dot-separated.
        return f"{self.namespace}.{self.component}.{self.name}.{instance_id:x}"


class Runtime:
    """Owns the backend planes and this process's primary lease. Use as an async context
    manager; leaving it revokes the lease (deregistering everything) and closes the planes."""

    def __init__(
        self,
        config: RuntimeConfig,
        discovery: Discovery,
        requests: RequestPlane,
        events: EventPlane,
        *,
        owns_planes: bool = True,
    ) -> None:
        self.config = config
        self._owns_planes = owns_planes
        self.discovery = discovery
        self.requests = requests
        self.events = events
        self._lease_id: int | None = None
        self._instance_id: int | None = None
        self._lease_lock = asyncio.Lock()
        self._served: list[ServedEndpoint] = []
        # Every key this runtime registered under its lease, to re-put after a lease loss.
        self._registrations: dict[str, bytes] = {}
        self._closing = False
        # Lease id -> owning runtime, shared by siblings: the discovery has one lease-lost hook.
        self._lease_owners: dict[int, Runtime] = {}
        if owns_planes and hasattr(discovery, "on_lease_lost"):
            discovery.on_lease_lost = self._dispatch_lease_lost  # type: ignore[attr-defined]
        # Instance keys taken out of discovery while callers cannot reach them.
        self._withdrawn: set[str] = set()
        self._reachability: asyncio.Task[None] | None = None
        requests.on_reachability(self._reachability_changed)

    @classmethod
    async def create(cls, config: RuntimeConfig) -> Runtime:
        if config.backend == "embedded":
            from dynamo.runtime.embedded import (
                EmbeddedDiscovery,
                EmbeddedEventPlane,
                EmbeddedRequestPlane,
            )

            return cls(config, EmbeddedDiscovery(), EmbeddedRequestPlane(), EmbeddedEventPlane())
        from dynamo.runtime.distributed import connect_distributed

        discovery, requests, events = await connect_distributed(config)
        return cls(config, discovery, requests, events)

    def sibling(self) -> Runtime:
        """Another runtime on the same planes with a lease of its own: several workers in one
        process (the embedded deployment) each need their own instance id."""
        sibling = Runtime(self.config, self.discovery, self.requests, self.events, owns_planes=False)
        sibling._lease_owners = self._lease_owners
        return sibling

    @property
    def namespace(self) -> str:
        return self.config.namespace

    async def primary_lease(self) -> int:
        """This runtime's current lease (granted on first use). Its first id is also the
        instance id; a lease granted after a loss has a new id, the instance id stays."""
        async with self._lease_lock:
            if self._lease_id is None:
                self._lease_id = await self.discovery.create_lease(self.config.lease_ttl_s)
                self._lease_owners[self._lease_id] = self
                if self._instance_id is None:
                    self._instance_id = self._lease_id
            return self._lease_id

    async def instance_id(self) -> int:
        """The id everything this runtime serves registers as; stable for its lifetime."""
        await self.primary_lease()
        assert self._instance_id is not None
        return self._instance_id

    async def register(self, key: str, value: bytes) -> None:
        """Put `key` under the primary lease and remember it, so it is re-put after a lease loss."""
        lease_id = await self.primary_lease()
        self._registrations[key] = value
        await self.discovery.put(key, value, lease_id=lease_id)

    async def deregister(self, key: str) -> None:
        self._registrations.pop(key, None)
        await self.discovery.delete(key)

    def _reachability_changed(self, reachable: bool) -> None:
        if self._closing:
            return
        previous = self._reachability
        if previous is not None:
            previous.cancel()  # a withdrawal not yet due, or a restore the outage overtook
        self._reachability = asyncio.ensure_future(
            self._restore(previous) if reachable else self._withdraw_after(WITHDRAW_AFTER_S, previous)
        )

    async def _withdraw_after(self, delay_s: float, previous: asyncio.Task[None] | None) -> None:
        if previous is not None:
            await asyncio.gather(previous, return_exceptions=True)
        await asyncio.sleep(delay_s)  # the grace an outage gets before callers are told
        keys = [served.key for served in self._served if served.key in self._registrations]
        for key in keys:
            try:
                await self.discovery.delete(key)
            except errors.DynamoError as exc:  # etcd gone too: the lease expires instead
                log.warning("could not withdraw %s: %s", key, exc)
                continue
            self._withdrawn.add(key)
        if keys:
            log.warning("instance %x withdrawn from discovery: callers have not reached it for %.0fs "
                        "(its request plane's link is down); it comes back when the link does",
                        self._instance_id or 0, delay_s)

    async def _restore(self, previous: asyncio.Task[None] | None) -> None:
        if previous is not None:
            await asyncio.gather(previous, return_exceptions=True)
        if not self._withdrawn:
            return

        async def put_back() -> None:
            lease_id = await self.primary_lease()
            for key in sorted(self._withdrawn):
                value = self._registrations.get(key)
                if value is not None:  # not deregistered meanwhile
                    await self.discovery.put(key, value, lease_id=lease_id)
                self._withdrawn.discard(key)

        if await self._retry(f"restoring instance {self._instance_id or 0:x} to discovery", put_back):
            log.warning("instance %x is reachable again and back in discovery", self._instance_id or 0)

    async def _retry(self, what: str, attempt: Callable[[], Awaitable[None]]) -> bool:
        """Run `attempt` until it succeeds (True) or this runtime closes (False), backing off
        while etcd is unreachable."""
        delay_s = 0.2
        while not self._closing:
            try:
                await attempt()
                return True
            except errors.DynamoError as exc:
                log.warning("%s failed (%s); retrying in %.1fs", what, exc, delay_s)
                await asyncio.sleep(delay_s)  # retry backoff while etcd is unreachable
                delay_s = min(delay_s * 2, 5.0)
        return False

    async def _dispatch_lease_lost(self, lease_id: int) -> None:
        owner = self._lease_owners.pop(lease_id, None)
        if owner is not None:
            await owner._on_lease_lost(lease_id)

    async def _on_lease_lost(self, lease_id: int) -> None:
        """etcd dropped our lease (and our keys with it): frontends have forgotten this
        instance. Grant a new lease and re-put every registration, retrying until it works."""
        new_lease = 0

        async def reregister() -> None:
            nonlocal new_lease
            async with self._lease_lock:
                if self._lease_id == lease_id:
                    self._lease_id = None
            new_lease = await self.primary_lease()
            for key, value in list(self._registrations.items()):
                if key not in self._withdrawn:  # put back when it is reachable again
                    await self.discovery.put(key, value, lease_id=new_lease)

        if await self._retry(f"re-registering instance {self._instance_id or 0:x} after losing lease {lease_id:x}",
                             reregister):
            log.warning(
                "lease %x was lost; instance %x re-registered %d keys under new lease %x",
                lease_id, self._instance_id or 0, len(self._registrations), new_lease,
            )

    def endpoint(self, component: str, name: str, namespace: str | None = None) -> Endpoint:
        return Endpoint(self, EndpointPath(namespace or self.namespace, component, name))

    async def __aenter__(self) -> Runtime:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown()

    async def shutdown(self) -> None:
        self._closing = True
        if self._reachability is not None:
            self._reachability.cancel()
            await asyncio.gather(self._reachability, return_exceptions=True)
        for served in reversed(self._served):
            await served.stop()
        self._served.clear()
        self._registrations.clear()
        if self._lease_id is not None:
            self._lease_owners.pop(self._lease_id, None)
            try:
                await self.discovery.revoke_lease(self._lease_id)
            except Exception as exc:  # infrastructure may already be gone at shutdown
                log.warning("could not revoke lease %x: %s", self._lease_id, exc)
            self._lease_id = None
        if not self._owns_planes:
            return
        await self.requests.close()
        await self.events.close()
        await self.discovery.close()


class Endpoint:
    def __init__(self, runtime: Runtime, path: EndpointPath) -> None:
        self.runtime = runtime
        self.path = path

    async def serve(self, handler: Handler) -> ServedEndpoint:
        """Start serving and register this instance in discovery (under the primary lease)."""
        instance_id = await self.runtime.instance_id()
        address = self.path.address(instance_id)
        served = await self.runtime.requests.serve(address, handler)
        info = InstanceInfo(
            instance_id=instance_id,
            namespace=self.path.namespace,
            component=self.path.component,
            endpoint=self.path.name,
            transport=served.transport or address,
        )
        key = f"{self.path.key_prefix}{instance_id:x}"
        await self.runtime.register(key, encode(info))
        result = ServedEndpoint(self.runtime, key, served, instance_id)
        self.runtime._served.append(result)
        return result

    async def client(self) -> Client:
        client = Client(self.runtime, self.path)
        await client.start()
        return client


class ServedEndpoint:
    def __init__(self, runtime: Runtime, key: str, served: Served, instance_id: int) -> None:
        self.runtime = runtime
        self.key = key
        self.served = served
        self.instance_id = instance_id
        self._stopped = False

    @property
    def inflight(self) -> int:
        return self.served.inflight

    async def deregister(self) -> None:
        """Stop being routed to; requests in flight keep running."""
        await self.runtime.deregister(self.key)

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        try:
            await self.deregister()
        except Exception as exc:
            log.warning("could not deregister %s: %s", self.key, exc)
        await self.served.stop()


class Client:
    """Watches an endpoint's instances and sends requests to a chosen one.

    When an instance disappears from discovery, every stream still open to it fails with
    StreamBroken, so no caller waits forever on a dead worker.
    """

    def __init__(self, runtime: Runtime, path: EndpointPath) -> None:
        self.runtime = runtime
        self.path = path
        self.instances: dict[int, InstanceInfo] = {}
        self._streams: dict[int, set[ResponseStream]] = {}
        self._changed = asyncio.Condition()
        self._watch: Watch | None = None
        self._task: asyncio.Task[None] | None = None
        self._listeners: list[Callable[[int, bool], None]] = []

    async def start(self) -> None:
        self._watch = await self.runtime.discovery.watch_prefix(self.path.key_prefix)
        self._task = asyncio.create_task(self._run_watch(self._watch))
        # The watch delivers the current contents first; let that land before returning so a
        # caller sees the instances that already exist.
        snapshot = await self.runtime.discovery.get_prefix(self.path.key_prefix)
        if snapshot:
            await self.wait_for_instances(timeout_s=5.0, at_least=1)

    def on_change(self, listener: Callable[[int, bool], None]) -> None:
        """Call `listener(instance_id, added)` whenever an instance appears or disappears."""
        self._listeners.append(listener)

    async def _run_watch(self, watch: Watch) -> None:
        async for event in watch:
            instance_id = int(event.key.rsplit("/", 1)[1], 16)
            if event.kind == "put":
                added = instance_id not in self.instances
                self.instances[instance_id] = INSTANCE_CODEC.decode(event.value)
                if added:
                    log.info("instance %x of %s is up", instance_id, self.path.key_prefix)
                    self._notify(instance_id, True)
            elif self.instances.pop(instance_id, None) is not None:
                log.info("instance %x of %s is gone", instance_id, self.path.key_prefix)
                for stream in self._streams.pop(instance_id, set()):
                    stream.abort(errors.StreamBroken(f"worker {instance_id:x} went away mid-stream"))
                self._notify(instance_id, False)
            async with self._changed:
                self._changed.notify_all()

    def _notify(self, instance_id: int, added: bool) -> None:
        for listener in self._listeners:
            listener(instance_id, added)

    def instance_ids(self) -> list[int]:
        return list(self.instances)

    async def wait_for_instances(self, timeout_s: float, at_least: int = 1) -> list[int]:
        async def wait() -> None:
            async with self._changed:
                await self._changed.wait_for(lambda: len(self.instances) >= at_least)

        try:
            await asyncio.wait_for(wait(), timeout_s)
        except TimeoutError:
            raise errors.NoInstances(
                f"fewer than {at_least} instances of {self.path.key_prefix} after {timeout_s}s"
            ) from None
        return self.instance_ids()

    async def generate(self, payload: bytes, instance_id: int, request_id: str) -> ResponseStream:
        info = self.instances.get(instance_id)
        if info is None:
            raise errors.InstanceUnavailable(f"instance {instance_id:x} is not registered")
        stream = await self.runtime.requests.call(info.transport, request_id, payload)
        bucket = self._streams.setdefault(instance_id, set())
        bucket.add(stream)
        stream.on_finish = lambda: bucket.discard(stream)
        if instance_id not in self.instances:  # vanished while we were sending
            stream.abort(errors.StreamBroken(f"worker {instance_id:x} went away"))
        return stream

    async def close(self) -> None:
        if self._watch is not None:
            await self._watch.close()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
