"""The three planes a runtime backend provides: discovery, requests and events.

Backends (embedded in-process, distributed on NATS + etcd) implement these; everything above
them (Runtime, Endpoint, Client) is backend-agnostic.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal


@dataclass(slots=True)
class RequestContext:
    """What a handler knows about the request it serves."""

    request_id: str
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    # Set by the server before it cancels the handler for its own reasons (shutting down):
    # the caller then gets a StreamBroken frame saying so, and can migrate the request.
    stop_reason: str | None = None

    def is_cancelled(self) -> bool:
        return self.cancelled.is_set()


# A handler takes one request payload and yields response payloads. It is run as a task;
# a caller's cancellation cancels that task (CancelledError inside the handler).
Handler = Callable[[bytes, RequestContext], AsyncIterator[bytes]]


class ResponseStream(ABC):
    """An in-order stream of response payloads. Iterating raises the remote error, if any,
    or StreamBroken when frames are lost or the stream dies. `aclose()` cancels the request
    on the server if it is still running."""

    request_id: str
    # Set by the client that tracks the stream; called once when the stream ends either way.
    on_finish: Callable[[], None] | None = None

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    @abstractmethod
    async def __anext__(self) -> bytes: ...

    @abstractmethod
    async def aclose(self) -> None: ...

    @abstractmethod
    def abort(self, error: Exception) -> None:
        """Fail the stream from the caller's side (its instance died); wakes the reader."""

    # Batching: a reader that got one payload takes every payload that has already arrived
    # with it, so a burst of tokens costs one write downstream. Streams that cannot tell what
    # has arrived keep these defaults and are read one payload at a time.

    def next_ready(self) -> bytes | None:
        """The next payload if it has already arrived as plain data, without waiting; None
        otherwise (nothing yet, or an end or error that `__anext__` reports as usual)."""
        return None

    def frames_ready(self) -> bool:
        """Whether `__anext__` would return (or raise) without waiting."""
        return False

    async def next_burst(self) -> list[bytes]:
        """Wait for the next payload, then take every payload already behind it. Raises what
        `__anext__` raises (StopAsyncIteration at the end) only when nothing was taken."""
        burst = [await self.__anext__()]
        more = self.next_ready()
        while more is not None:
            burst.append(more)
            more = self.next_ready()
        return burst

    async def __aenter__(self) -> ResponseStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class Served(ABC):
    """A running server of one address; `stop()` stops taking requests and cancels those
    in flight, telling each caller its stream broke (graceful draining belongs to the caller
    of stop)."""

    @abstractmethod
    async def stop(self) -> None: ...

    @property
    @abstractmethod
    def inflight(self) -> int: ...

    @property
    def transport(self) -> str | None:
        """The address callers pass to `RequestPlane.call`, when it is not the served address
        itself (a direct TCP plane adds its host and port); goes into the discovery record."""
        return None


class RequestPlane(ABC):
    @abstractmethod
    async def serve(self, address: str, handler: Handler) -> Served: ...

    @abstractmethod
    async def call(self, address: str, request_id: str, payload: bytes) -> ResponseStream:
        """Send a request; returns once the server accepted it.
        Raises InstanceUnavailable when nobody serves `address`."""

    def on_reachability(self, listener: Callable[[bool], None]) -> None:
        """`listener(False)` once callers can no longer reach what this plane serves (its
        link to a broker was found dead), `listener(True)` once they can again. A plane that
        callers reach directly never calls it: a caller finds a dead server itself."""
        return None

    async def close(self) -> None:
        return None


class Subscription(ABC):
    """An event subscription: an async iterator of payloads until closed."""

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    @abstractmethod
    async def __anext__(self) -> bytes: ...

    @abstractmethod
    async def close(self) -> None: ...


class EventPlane(ABC):
    @abstractmethod
    async def publish(self, subject: str, payload: bytes) -> None: ...

    @abstractmethod
    async def subscribe(self, subject: str) -> Subscription:
        """Subscribe to `subject`; a trailing `.>` matches every subject below the prefix."""

    async def close(self) -> None:
        return None


@dataclass(frozen=True, slots=True)
class WatchEvent:
    kind: Literal["put", "delete"]
    key: str
    value: bytes = b""


class Watch(ABC):
    """A prefix watch: yields the current contents as puts, then every change, in order."""

    def __aiter__(self) -> AsyncIterator[WatchEvent]:
        return self

    @abstractmethod
    async def __anext__(self) -> WatchEvent: ...

    @abstractmethod
    async def close(self) -> None: ...


LeaseLostCallback = Callable[[int], Awaitable[None]]


class Discovery(ABC):
    @abstractmethod
    async def create_lease(self, ttl_s: float, keep_alive: bool = True) -> int:
        """Grant a lease. Kept alive (the default), it lasts until revoked or the discovery is
        closed, and a dead holder's keys vanish a TTL later; not kept alive, it expires at its TTL
        whatever becomes of the holder, and closing the discovery leaves it be."""

    @abstractmethod
    async def revoke_lease(self, lease_id: int) -> None: ...

    @abstractmethod
    async def put(self, key: str, value: bytes, lease_id: int | None = None) -> None: ...

    @abstractmethod
    async def delete(self, key: str) -> None: ...

    @abstractmethod
    async def get_prefix(self, prefix: str) -> dict[str, bytes]: ...

    @abstractmethod
    async def watch_prefix(self, prefix: str) -> Watch: ...

    async def close(self) -> None:
        return None
