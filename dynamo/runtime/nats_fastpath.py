"""The NATS request plane's speed trick, in one place: a nats-py client whose protocol parser
hands the response inbox's messages straight to a plain function.

What it buys: the response inbox receives one NATS message per streamed token, and nats-py's
ordinary path costs, per message, a regular-expression match, two buffer trims, a Msg object, a
trip through the subscription's pending queue and task, and an awaited callback. The fast path
splits complete `MSG` lines with bytes.find, trims the buffer once per read, and calls the
plane's frame handler directly. Measured (benchmarks/RESULTS.md, "NATS request plane: the
response fast path"; request_plane_roundtrip.py, 32 one-token frames a request, medians of 5
alternating pairs on a quiet 16-core host): p50 per request 508 us against 767 us with
nats-py's public API, 1.5x the frames per second sequentially and 2.1x at concurrency 64.

It subclasses nats-py's private `Parser` and reaches into `Client._ps` and
`Client._process_msg`, so it is used only on nats-py versions it was read and tested against
(`TESTED_VERSIONS`); elsewhere, or when turned off (`--no-nats-fastpath`, env
`DYN_NATS_FASTPATH=0`), the plane uses nats-py's public API only: a subscription callback per
message. The integration tests run the request plane both ways.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version

from nats.aio.client import Client as NatsClient
from nats.protocol.parser import AWAITING_CONTROL_LINE, Parser

log = logging.getLogger(__name__)

# [first, end) of the nats-py versions whose Parser and Client internals this module was
# checked against. Upgrading nats-py past it turns the fast path off (and
# tests/integration/test_nats_planes.py says so) until the internals are re-read.
TESTED_VERSIONS = ((2, 16), (2, 17))

DirectHandler = Callable[[bytes, bytes], None]


def nats_py_version() -> tuple[int, ...]:
    try:
        text = version("nats-py")
    except PackageNotFoundError:
        return ()
    parts: list[int] = []
    for part in text.split(".")[:3]:
        digits = "".join(c for c in part if c.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def fastpath_supported() -> bool:
    """Whether the installed nats-py is one the fast path was checked against."""
    first, end = TESTED_VERSIONS
    return first <= nats_py_version()[:2] < end


class _FastParser(Parser):
    """nats-py's protocol parser with a fast path for what a response inbox mostly receives:
    complete `MSG` lines without headers. They are split with bytes.find instead of nats-py's
    regular expression, the buffer is trimmed once per read rather than twice per message, and
    messages of direct subscriptions are handed over without an awaited call. Anything else
    (HMSG, PING, INFO, -ERR, a message cut by the read) goes to nats-py's parser unchanged."""

    nc: DirectClient

    async def parse(self, data: bytes = b"") -> None:
        buf = self.buf
        buf.extend(data)
        nc = self.nc
        direct = nc.direct
        stats = nc.stats
        pos = 0
        size = len(buf)
        while self.state == AWAITING_CONTROL_LINE and buf.startswith(b"MSG ", pos):
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                break
            args = bytes(buf[pos + 4 : eol]).split()
            if len(args) == 3:
                subject, sid_text, length_text = args
                reply = b""
            elif len(args) == 4:
                subject, sid_text, reply, length_text = args
            else:
                break  # malformed: nats-py's parser reports it
            try:
                sid = int(sid_text)
                end = eol + 2 + int(length_text)
            except ValueError:
                break  # malformed: nats-py's parser reports it
            start = eol + 2
            if end + 2 > size:
                break  # the payload is still on its way
            payload = bytes(buf[start:end])
            pos = end + 2
            handler = direct.get(sid)
            if handler is not None:
                stats["in_msgs"] += 1
                stats["in_bytes"] += len(payload)
                handler(subject, payload)
            else:
                await nc._process_msg(sid, subject, reply, payload, None)
                if self.buf is not buf:
                    return  # the connection was reset meanwhile: the rest is stale
        if pos:
            del buf[:pos]
        if buf:
            await super().parse()


class DirectClient(NatsClient):
    """nats-py's client with a direct path for chosen subscriptions: a message for one of them
    goes from the protocol parser straight to a plain function, skipping the Msg object, the
    subscription's pending queue and its task, and one awaited callback. Messages with headers
    (never sent by our workers; the server's no-responders status is one) take nats-py's
    ordinary path, so the subscription's own callback still sees them."""

    def __init__(self) -> None:
        super().__init__()
        self.direct: dict[int, DirectHandler] = {}
        self._ps = _FastParser(self)

    async def _process_msg(
        self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes | None
    ) -> None:
        direct = self.direct.get(sid)
        if direct is None or headers:
            await super()._process_msg(sid, subject, reply, data, headers)  # type: ignore[arg-type]
            return
        stats = self.stats
        stats["in_msgs"] += 1
        stats["in_bytes"] += len(data)
        direct(subject, data)


def make_client(fastpath: bool) -> NatsClient:
    """A DirectClient when `fastpath` is asked for and this nats-py is one it was checked
    against; otherwise nats-py's plain client."""
    if fastpath and fastpath_supported():
        return DirectClient()
    if fastpath:
        log.info(
            "NATS fast path off: nats-py %s is outside the versions it was tested with (%s); "
            "using nats-py's public API",
            ".".join(map(str, nats_py_version())),
            " to ".join(".".join(map(str, v)) for v in TESTED_VERSIONS),
        )
    return NatsClient()


def add_direct(nc: NatsClient, sid: int, handler: DirectHandler) -> bool:
    """Deliver subscription `sid`'s header-less messages to `handler(subject, payload)` directly
    when `nc` has the fast path; False (nothing changed) when it has not."""
    if isinstance(nc, DirectClient):
        nc.direct[sid] = handler
        return True
    return False


def remove_direct(nc: NatsClient, sid: int) -> None:
    if isinstance(nc, DirectClient):
        nc.direct.pop(sid, None)
