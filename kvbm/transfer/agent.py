"""KvTransferAgent: one per worker. It registers the engine's KV memory and layout, describes
itself to peers (KvAgentInfo), sends batches of blocks to a peer with the fastest backend both
sides have, and on the receiving side resolves a future per expected transfer the moment its
blocks have landed (a notification on its TCP listener, never polling)."""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass, field

import torch

from dynamo import errors
from dynamo.runtime.tcp_plane import DEAD_PEER_S, bound_dead_peer, default_advertise_host
from dynamo.wire import FRAME_DATA, FRAME_END, FRAME_ERROR, KvAgentInfo, KvLayoutSpec, TransferHeader
from kvbm.transfer.backends import PREFERENCE, BackendUnavailable, TransferBackend
from kvbm.transfer.framing import header_bytes, read_header
from kvbm.transfer.layout import KvMemory, block_bytes, check_compatible
from kvbm.transfer.locality import local_host_id, split_host_id
from kvbm.transfer.torch_ops import scatter_blocks

log = logging.getLogger(__name__)

RECV_CHUNK_BYTES = 8 << 20
CONNECT_TIMEOUT_S: float = DEAD_PEER_S


class TransferFailed(errors.DynamoError):
    """A KV transfer did not complete: the peer died, closed early or reported an error."""

    code = "kv_transfer_failed"


@dataclass(slots=True)
class _Expected:
    dst_block_ids: list[int]
    future: asyncio.Future[int]  # KV bytes that landed
    begun: bool = False  # a frame of it has been read: its connection's dead-peer bound covers the rest


@dataclass(slots=True)
class TransferStats:
    sent_transfers: int = 0
    sent_bytes: int = 0
    received_transfers: int = 0
    received_bytes: int = 0
    failed_transfers: int = 0
    by_backend: dict[str, int] = field(default_factory=dict)


class KvTransferAgent:
    """Use as an async context manager. `info` is what peers need; `expect` (receiver) and
    `send` (sender) are the whole transfer API."""

    def __init__(
        self,
        layout: KvLayoutSpec,
        memory: KvMemory | None,
        backends: list[TransferBackend],
        host: str | None = "127.0.0.1",
        port: int = 0,
        host_id: str | None = None,
        chunk_bytes: int = RECV_CHUNK_BYTES,
    ) -> None:
        if not backends:
            raise ValueError("a transfer agent needs at least one backend")
        self.layout = layout
        self.memory = memory
        self.backends = {b.name: b for b in backends}
        # None: listen on every interface and advertise this host's default-route address, as
        # the TCP request plane does, so peers on other hosts (or containers) can connect.
        self.bind_host = host if host is not None else "0.0.0.0"
        self.host = host if host is not None else default_advertise_host()
        self.port = port
        # Equal host_ids: CUDA IPC between the two agents works (same machine, PID and IPC
        # namespaces, and the same GPUs under the same indices; kvbm/transfer/locality.py).
        on_gpu = memory is not None and memory.k[0].device.type == "cuda"
        self.host_id = host_id or local_host_id(cuda=on_gpu)
        self.agent_id = uuid.uuid4().hex
        self.chunk_bytes = chunk_bytes
        self.block_bytes = block_bytes(layout)
        self.stats = TransferStats()
        # Bytes of gather/receive buffers alive now; 0 whenever no transfer is in flight.
        self.buffer_bytes = 0
        self._expected: dict[str, _Expected] = {}
        self._server: asyncio.Server | None = None
        self._conns: dict[asyncio.Task[None], asyncio.StreamWriter] = {}
        self._info: KvAgentInfo | None = None
        # (backend, peer agent_id) pairs that failed before moving any data (a CUDA IPC handle
        # that would not open): later transfers to that peer skip the backend.
        self._unreachable: set[tuple[str, str]] = set()
        self._explained: set[str] = set()  # peers whose backend choice was logged

    # ---------------------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        # A large stream limit: fewer pause/resume cycles of the socket while a payload streams in.
        self._server = await asyncio.start_server(
            self._serve_connection, self.bind_host, self.port, limit=self.chunk_bytes
        )
        self.port = self._server.sockets[0].getsockname()[1]
        for backend in self.backends.values():
            await backend.start(self)
        extra: dict[str, object] = {}
        for backend in self.backends.values():
            extra.update(backend.advertise())
        self._info = KvAgentInfo(
            agent_id=self.agent_id,
            host_id=self.host_id,
            address=f"{self.host}:{self.port}",
            layout=self.layout,
            backends=list(self.backends),
            device=self.memory.device if self.memory is not None else "none",
            **extra,  # type: ignore[arg-type]
        )
        log.info("KV transfer agent on %s:%d, backends %s, host id %s",
                 self.host, self.port, ", ".join(self.backends), self.host_id)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        # Abort the connections rather than cancel their tasks: each handler then ends on its
        # own (failing the transfer it was receiving), which asyncio's stream callbacks expect.
        for writer in self._conns.values():
            writer.transport.abort()
        await asyncio.gather(*self._conns, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        for transfer_id in list(self._expected):
            self._fail(transfer_id, TransferFailed("transfer agent closed"))
        for backend in self.backends.values():
            await backend.close()

    async def __aenter__(self) -> KvTransferAgent:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def info(self) -> KvAgentInfo:
        if self._info is None:
            raise RuntimeError("transfer agent not started")
        return self._info

    # ----------------------------------------------------------------------------- receiver

    def expect(self, transfer_id: str, dst_block_ids: list[int]) -> asyncio.Future[int]:
        """Announce an incoming transfer into `dst_block_ids`; the future resolves (to the KV
        bytes received) when every block has landed, or fails with TransferFailed."""
        if transfer_id in self._expected:
            raise ValueError(f"transfer {transfer_id} is already expected")
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._expected[transfer_id] = _Expected(list(dst_block_ids), future)
        return future

    def begun(self, transfer_id: str) -> bool:
        """Whether a frame of an expected transfer has arrived (so it is on its way, not lost)."""
        expected = self._expected.get(transfer_id)
        return expected is not None and expected.begun

    def forget(self, transfer_id: str) -> None:
        """Stop waiting for a transfer (the caller gave up); data arriving later is refused."""
        expected = self._expected.pop(transfer_id, None)
        if expected is not None and not expected.future.done():
            expected.future.cancel()

    def _resolve(self, transfer_id: str, num_bytes: int) -> None:
        expected = self._expected.pop(transfer_id, None)
        if expected is not None and not expected.future.done():
            self.stats.received_transfers += 1
            self.stats.received_bytes += num_bytes
            expected.future.set_result(num_bytes)

    def _fail(self, transfer_id: str, error: Exception) -> None:
        expected = self._expected.pop(transfer_id, None)
        if expected is not None and not expected.future.done():
            self.stats.failed_transfers += 1
            expected.future.set_exception(error)
            expected.future.exception()  # retrieved: a caller that gave up logs nothing

    async def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns[task] = writer
        # A peer gone mid-transfer fails it within DEAD_PEER_S on either end, not after the
        # kernel's ~15 minutes of retransmissions.
        bound_dead_peer(writer)
        current: str | None = None
        try:
            while True:
                try:
                    header = await read_header(reader)
                except asyncio.IncompleteReadError as exc:
                    if exc.partial:
                        raise
                    return  # clean end of the connection between frames
                current = header.transfer_id
                expected = self._expected.get(current)
                if expected is not None:
                    expected.begun = True
                if header.kind == FRAME_ERROR:
                    self._fail(current, TransferFailed(f"sender reported: {header.error}"))
                elif header.kind == FRAME_END:
                    self._check_count(current, header.num_blocks)
                    self._resolve(current, header.payload_bytes)
                elif header.kind == FRAME_DATA:
                    await self._receive_data(reader, header)
                else:
                    raise TransferFailed(f"unknown transfer frame kind {header.kind}")
                current = None
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            if current is not None:
                self._fail(current, TransferFailed(f"sender went away mid-transfer ({exc!r})"))
        except Exception as exc:  # a bad frame ends this connection, and only this transfer
            log.warning("KV transfer connection failed: %s", exc)
            if current is not None:
                self._fail(current, exc if isinstance(exc, errors.DynamoError) else TransferFailed(str(exc)))
        finally:
            self._conns.pop(task, None)
            writer.close()

    def _check_count(self, transfer_id: str, num_blocks: int) -> _Expected:
        expected = self._expected.get(transfer_id)
        if expected is None:
            raise TransferFailed(f"transfer {transfer_id} is not expected (given up, or never asked for)")
        if num_blocks != len(expected.dst_block_ids):
            raise TransferFailed(
                f"transfer {transfer_id}: {num_blocks} blocks sent, {len(expected.dst_block_ids)} expected"
            )
        return expected

    async def _receive_data(self, reader: asyncio.StreamReader, header: TransferHeader) -> None:
        expected = self._check_count(header.transfer_id, header.num_blocks)
        if self.memory is None:
            raise TransferFailed("this agent has no KV memory to receive blocks into")
        size = header.num_blocks * self.block_bytes
        if header.payload_bytes != size:
            raise TransferFailed(f"payload of {header.payload_bytes} bytes; {size} expected for the layout")
        memory = self.memory
        buffer = bytearray(size)
        view = memoryview(buffer)
        self.buffer_bytes += size
        try:
            offset = 0
            while offset < size:
                chunk = await reader.readexactly(min(self.chunk_bytes, size - offset))
                view[offset : offset + len(chunk)] = chunk
                offset += len(chunk)
            dst = expected.dst_block_ids
            dtype = getattr(torch, self.layout.dtype)

            def scatter() -> None:
                flat = torch.frombuffer(buffer, dtype=dtype)
                scatter_blocks(memory.k, memory.v, dst, flat.view(len(memory.k), 2, len(dst), *memory.k[0].shape[1:]))

            if header.transfer_id in self._expected:  # not given up while the bytes streamed in
                await memory.run(scatter)
            self._resolve(header.transfer_id, size)
        finally:
            view.release()
            del buffer
            self.buffer_bytes -= size

    # ------------------------------------------------------------------------------- sender

    def choose_backend(self, peer: KvAgentInfo) -> TransferBackend:
        local = self.info
        for name in PREFERENCE:
            backend = self.backends.get(name)
            if backend is None or (name, peer.agent_id) in self._unreachable:
                continue
            if backend.can_reach(local, peer):
                self._explain(peer, backend)
                return backend
        raise TransferFailed(
            f"no common KV transfer backend: this worker has {sorted(self.backends)}, the peer "
            f"{peer.backends} on {'this' if peer.host_id == local.host_id else 'another'} host"
        )

    def _explain(self, peer: KvAgentInfo, chosen: TransferBackend) -> None:
        """Once per peer: why a peer on this very machine does not get CUDA IPC."""
        if peer.agent_id in self._explained:
            return
        self._explained.add(peer.agent_id)
        machine, domain = split_host_id(self.host_id)
        peer_machine, peer_domain = split_host_id(peer.host_id)
        if (chosen.name not in ("cuda-ipc", "same-process") and "cuda-ipc" in self.backends and "cuda-ipc" in peer.backends
                and machine == peer_machine):
            why = ("it could not open the peer's CUDA IPC handles" if ("cuda-ipc", peer.agent_id) in self._unreachable
                   else f"the peer's GPUs are not reachable from this process (GPU domain {peer_domain or 'unknown'}, "
                   f"here {domain}: other visible GPUs or device order, or another PID/IPC namespace)")
            log.warning("KV transfer to %s (%s) on this machine uses %s, not cuda-ipc: %s",
                        peer.agent_id, peer.address, chosen.name, why)

    async def send(
        self, peer: KvAgentInfo, transfer_id: str, src_block_ids: list[int], dst_block_ids: list[int]
    ) -> tuple[int, str]:
        """Move blocks `src_block_ids` of this agent's memory into the peer's `dst_block_ids`;
        returns (KV bytes, backend name) once the peer has been told they are complete."""
        check_compatible(self.layout, peer.layout)
        if len(src_block_ids) != len(dst_block_ids):
            raise ValueError(f"{len(src_block_ids)} source blocks but {len(dst_block_ids)} target blocks")
        backend = self.choose_backend(peer)
        reader, writer = await connect_to_agent(peer.address)
        try:
            while True:
                try:
                    num_bytes = await backend.send(self, peer, transfer_id, src_block_ids, dst_block_ids, writer)
                    break
                except BackendUnavailable as exc:
                    # Nothing was written yet: the same connection carries the next backend.
                    self._unreachable.add((backend.name, peer.agent_id))
                    log.warning("KV transfer to %s: %s unavailable (%s); trying the next backend",
                                peer.agent_id, backend.name, exc)
                    self._explained.discard(peer.agent_id)
                    backend = self.choose_backend(peer)
            await writer.drain()
        except Exception as exc:
            # Tell the receiver now rather than leaving it to notice the closed connection.
            if not writer.is_closing():
                try:
                    writer.write(header_bytes(TransferHeader(transfer_id, FRAME_ERROR, error=str(exc))))
                    await writer.drain()
                except (ConnectionError, RuntimeError):
                    pass  # the receiver is gone too: it sees the connection close instead
            raise
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except ConnectionError:
                pass
        self.stats.sent_transfers += 1
        self.stats.sent_bytes += num_bytes
        self.stats.by_backend[backend.name] = self.stats.by_backend.get(backend.name, 0) + 1
        return num_bytes, backend.name


async def connect_to_agent(address: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection to the transfer agent at `address` (host:port), with the dead-peer bound."""
    host, _, port = address.rpartition(":")
    try:
        # Bounded like the connection itself: a peer behind a cut link drops the SYNs, and the
        # kernel's retries would hold the sender (and its prefilled blocks) for up to two minutes.
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), CONNECT_TIMEOUT_S)
    except (OSError, TimeoutError) as exc:
        raise TransferFailed(f"cannot reach the peer's transfer agent at {address}: {exc!r}") from exc
    bound_dead_peer(writer)
    return reader, writer
