"""The vLLM-free half of the transfer connector (workers/vllm/connector/transfer.py): its
KVTransferConfig, the parameters that travel with a request, the scheduler-side bookkeeping and
the worker-side transfer runtime. Kept free of vLLM imports so the main venv tests it."""

from __future__ import annotations

import asyncio
import logging
import os
import struct
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec
import torch

from dynamo.wire import KvAgentInfo, KvLayoutSpec
from kvbm.transfer.agent import KvTransferAgent, TransferFailed
from kvbm.transfer.layout import KvMemory

if TYPE_CHECKING:
    from workers.vllm.args import VllmConfig

log = logging.getLogger(__name__)
T = TypeVar("T")
M = TypeVar("M", bound=msgspec.Struct)

CONNECTOR_NAME = "DynamoTransferConnector"
CONNECTOR_MODULE = "workers.vllm.connector.transfer"
VLLM_NIXL = "vllm-nixl"


def transfer_connector_config(config: VllmConfig) -> dict[str, Any] | None:
    """KVTransferConfig fields for a prefill or decode worker; None when aggregated.
    `--kv-transfer-backend vllm-nixl` selects vLLM's own NixlConnector instead of ours."""
    disagg = config.disagg
    if config.role == "aggregated" or disagg is None:
        return None
    # A failed or timed-out load is recomputed by the decode worker (vLLM's default fails it).
    common = {"kv_role": "kv_both", "kv_load_failure_policy": "recompute"}
    if disagg.kv_transfer_backend == VLLM_NIXL:
        return {"kv_connector": "NixlConnector", **common}
    return {
        "kv_connector": CONNECTOR_NAME,
        "kv_connector_module_path": CONNECTOR_MODULE,
        **common,
        "kv_connector_extra_config": {
            "role": config.role,
            "backend": disagg.kv_transfer_backend,
            "host": disagg.kv_transfer_host,
            "pull_timeout_s": disagg.prefill_timeout_s,
            # Held prefill blocks are freed when the decode worker has pulled them, or after this.
            "hold_timeout_s": max(60.0, 2 * disagg.prefill_timeout_s),
        },
    }


# ------------------------------------------------------------------ parameters of a request
#
# Prefill worker: the request carries {HOLD_KEY: True}; when it finishes, the scheduler side
# keeps its blocks and returns {PULL_KEY: {...}} as the request's kv_transfer_params (vLLM puts
# them on the final output). Decode worker: the request carries those same parameters; the
# scheduler side reports the prompt as externally computed, and the worker side pulls the
# blocks from the prefill worker's pull server into the slots vLLM allocated.

HOLD_KEY = "dynamo_hold"
PULL_KEY = "dynamo_pull"
_DONE_KEY = "dynamo_pull_done"  # set on the request's own dict: one transfer per request


def hold_params() -> dict[str, Any]:
    return {HOLD_KEY: True}


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


@dataclass(slots=True)
class PullSpec:
    """Worker side, decode: pull `src_block_ids` of the prefill worker's request
    `remote_request_id` into `dst_block_ids` here. No blocks: only release them there."""

    request_id: str
    addresses: list[str]  # the prefill worker's pull servers, by TP rank
    remote_request_id: str
    src_block_ids: list[int]
    dst_block_ids: list[int]

    @property
    def release_only(self) -> bool:
        return not self.dst_block_ids


@dataclass(slots=True)
class StepMeta:
    """Scheduler side -> worker side, once per step."""

    pulls: list[PullSpec] = field(default_factory=list)
    holds: list[str] = field(default_factory=list)  # prefill requests whose blocks are now held


class SchedulerState:
    """The scheduler side's bookkeeping, vLLM-free: which requests load remote KV (decode), which
    hold their blocks for a pull (prefill), and what the worker side must do this step."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.addresses: list[str] = []  # this engine's pull servers, by TP rank (handshake)
        self._local_tokens: dict[str, int] = {}  # decode: prompt tokens cached here
        self._meta = StepMeta()
        self.held: set[str] = set()  # prefill requests whose blocks wait for a pull

    # decode ------------------------------------------------------------------------------
    def num_new_matched_tokens(
        self, request_id: str, params: dict[str, Any] | None, num_prompt_tokens: int, num_computed: int
    ) -> tuple[int, bool]:
        """All uncached prompt tokens are external when the request arrives with pull
        parameters not used yet; vLLM recomputes the last one itself to sample from."""
        if not params or PULL_KEY not in params or params.get(_DONE_KEY):
            return 0, False
        self._local_tokens[request_id] = num_computed
        count = num_prompt_tokens - num_computed
        return (count, True) if count > 0 else (0, False)

    def after_alloc(
        self, request_id: str, params: dict[str, Any] | None, block_ids: list[int], num_external_tokens: int
    ) -> None:
        if not params or PULL_KEY not in params or params.get(_DONE_KEY):
            return
        pull = params[PULL_KEY]
        remote = list(pull["block_ids"])
        num_tokens = int(pull["num_tokens"])
        local = self._local_tokens.pop(request_id, 0)
        params[_DONE_KEY] = True
        if num_external_tokens <= 0:
            dst: list[int] = []  # all cached here: the prefill worker only has to let go
            src: list[int] = []
        else:
            first = local // self.block_size
            last = blocks_for(num_tokens, self.block_size)
            dst = list(block_ids[first:last])
            src = remote[first:last]
            if len(src) != len(dst):
                raise ValueError(
                    f"request {request_id}: {len(src)} prefilled blocks for {len(dst)} slots "
                    f"(block size {self.block_size}, {num_tokens} prompt tokens, {local} cached)"
                )
        self._meta.pulls.append(PullSpec(request_id, list(pull["addresses"]), str(pull["request_id"]), src, dst))

    def not_scheduled(self, request_id: str, params: dict[str, Any] | None) -> None:
        """A request with pull parameters finished before it was scheduled (aborted): the
        prefill worker's blocks are released now rather than at its timeout."""
        if params and PULL_KEY in params and not params.get(_DONE_KEY):
            params[_DONE_KEY] = True
            pull = params[PULL_KEY]
            self._meta.pulls.append(PullSpec(request_id, list(pull["addresses"]), str(pull["request_id"]), [], []))
        self._local_tokens.pop(request_id, None)

    # prefill -----------------------------------------------------------------------------
    def finished(
        self, request_id: str, params: dict[str, Any] | None, completed: bool, block_ids: list[int],
        num_prompt_tokens: int,
    ) -> tuple[bool, dict[str, Any] | None]:
        """(keep the blocks, parameters for the decode worker): a prefill that completed keeps
        its prompt's blocks until the decode worker pulled them (or the hold times out)."""
        if not params or not params.get(HOLD_KEY) or not completed or not block_ids or not self.addresses:
            return False, None
        keep = block_ids[: blocks_for(num_prompt_tokens, self.block_size)]
        self.held.add(request_id)
        self._meta.holds.append(request_id)
        return True, {
            PULL_KEY: {
                "addresses": list(self.addresses),
                "request_id": request_id,
                "block_ids": keep,
                "num_tokens": num_prompt_tokens,
            }
        }

    def sent(self, request_ids: set[str]) -> None:
        self.held -= request_ids

    def take_meta(self) -> StepMeta:
        meta, self._meta = self._meta, StepMeta()
        return meta


# ------------------------------------------------------------------- worker side: the runtime

_LEN = struct.Struct(">I")
# Test hook: while the file this names exists, a prefill worker's pull server stalls each pull
# before sending (and says so on stderr), so a test can kill it mid-transfer.
STALL_ENV = "DYN_VLLM_TRANSFER_TEST_STALL_FILE"
STALL_MARK = "dynamo-transfer: stalling pull"


class PullRequest(msgspec.Struct, frozen=True):
    """Decode worker -> prefill worker's pull server: send blocks of a held request into these
    blocks of my agent (announced with `expect` before this is sent); then release them."""

    transfer_id: str
    request_id: str
    decode_agent: KvAgentInfo
    src_block_ids: list[int]
    dst_block_ids: list[int]


class PullReply(msgspec.Struct, frozen=True, omit_defaults=True):
    ok: bool
    error: str = ""
    kv_bytes: int = 0
    backend: str = ""


class HandshakeInfo(msgspec.Struct, frozen=True):
    """What one worker rank tells its scheduler (vLLM's handshake metadata) and our worker
    process (VllmEngine.kv_layout): where its pull server listens, and its agent."""

    pull_address: str
    agent: KvAgentInfo


async def _write_msg(writer: asyncio.StreamWriter, msg: msgspec.Struct) -> None:
    data = msgspec.msgpack.encode(msg)
    writer.write(_LEN.pack(len(data)) + data)
    await writer.drain()


async def _read_msg(reader: asyncio.StreamReader, kind: type[M]) -> M:
    (size,) = _LEN.unpack(await reader.readexactly(_LEN.size))
    return msgspec.msgpack.decode(await reader.readexactly(size), type=kind)


def split_kv(cache: torch.Tensor, block_size: int, num_kv_heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """One layer's vLLM KV cache as K and V views with blocks on dim 0, and their block order.
    Views, not copies: the transfer layer writes through them into vLLM's own memory."""
    shape = tuple(cache.shape)
    if len(shape) == 5 and shape[0] == 2:  # [2, blocks, ...]: flash-attention style
        k, v = cache[0], cache[1]
    elif len(shape) == 5 and shape[1] == 2:  # [blocks, 2, ...]
        k, v = cache[:, 0], cache[:, 1]
    elif len(shape) == 4 and shape[1:] == (num_kv_heads, block_size, 2 * head_dim):
        # vLLM's CPU attention: [blocks, heads, block, 2 x head dim] holding, per head, the
        # block's K rows then its V rows.
        kv = cache.view(shape[0], num_kv_heads, 2, block_size, head_dim)
        k, v = kv[:, :, 0], kv[:, :, 1]
    else:
        raise ValueError(f"unsupported vLLM KV cache shape {shape}")
    inner = tuple(k.shape[1:])
    if inner == (block_size, num_kv_heads, head_dim):
        return k, v, "NHD"
    if inner == (num_kv_heads, block_size, head_dim):
        return k, v, "HND"
    raise ValueError(f"unsupported vLLM KV block shape {inner} (block {block_size}, heads {num_kv_heads}, dim {head_dim})")


@dataclass(slots=True)
class Results:
    """Worker side -> scheduler, per step (vLLM's get_transfer_results)."""

    finished_sending: set[str] = field(default_factory=set)
    finished_recving: set[str] = field(default_factory=set)
    failed_recving: set[str] = field(default_factory=set)


class WorkerRuntime:
    """The worker side's transfer machinery: a KvTransferAgent over vLLM's KV tensors and a pull
    server, on an asyncio loop of their own in a daemon thread (vLLM calls the connector's
    hooks from its model-runner thread, which must never wait on the network). The hooks only
    hand work to the loop and read results under a lock.

    Copies run on a helper thread while vLLM computes: safe because the blocks involved are
    untouchable by the model until this runtime reports them (a decode request waits in
    WAITING_FOR_REMOTE_KVS; a held prefill request's blocks are not freed)."""

    def __init__(
        self,
        *,
        backend: str = "host",
        host: str | None = "127.0.0.1",
        pull_timeout_s: float = 30.0,
        hold_timeout_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.backend = "auto" if backend == VLLM_NIXL else backend
        self.host = host
        self.pull_timeout_s = pull_timeout_s
        self.hold_timeout_s = hold_timeout_s
        self.clock = clock
        self.stall_file = os.environ.get(STALL_ENV) or None
        self.agent: KvTransferAgent | None = None
        self.pull_address = ""
        self.rank = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._lock = threading.Lock()
        self._holds: dict[str, float] = {}  # prefill request -> release deadline
        self._released: dict[str, float] = {}  # pulled (or refused) requests -> when
        self._results = Results()
        self.pulls_done = 0
        self.pulls_failed = 0
        self.last_pull_s = 0.0

    # lifecycle ------------------------------------------------------------------------------
    def start(self, layout: KvLayoutSpec, k: list[torch.Tensor], v: list[torch.Tensor]) -> HandshakeInfo:
        self.rank = layout.tp_rank
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name="dynamo-kv-transfer", daemon=True)
        self._thread.start()

        async def run(fn: Callable[[], T]) -> T:
            return await asyncio.to_thread(fn)

        memory = KvMemory(k=k, v=v, layout=layout, run=run)
        return asyncio.run_coroutine_threadsafe(self._start(layout, memory), loop).result(timeout=60)

    async def _start(self, layout: KvLayoutSpec, memory: KvMemory) -> HandshakeInfo:
        from kvbm.transfer.factory import make_agent

        self.agent = await make_agent(self.backend, layout, memory, host=self.host)
        bind = self.host if self.host is not None else "0.0.0.0"
        self._server = await asyncio.start_server(self._serve_pull, bind, 0)
        port = self._server.sockets[0].getsockname()[1]
        self.pull_address = f"{self.agent.host}:{port}"
        return HandshakeInfo(self.pull_address, self.agent.info)

    def shutdown(self) -> None:
        loop, self._loop = self._loop, None
        if loop is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(self._close(), loop).result(timeout=10)
        except Exception:  # shutting down anyway
            log.debug("transfer runtime close failed", exc_info=True)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=10)

    async def _close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            self._server.close()
        if self.agent is not None:
            await self.agent.close()

    # hooks (vLLM's thread) ---------------------------------------------------------------------
    def step(self, meta: StepMeta) -> None:
        """Take this step's work: holds to time, pulls to start."""
        now = self.clock()
        with self._lock:
            for request_id in meta.holds:
                self._holds[request_id] = now + self.hold_timeout_s
        loop = self._loop
        if loop is None:
            return
        for spec in meta.pulls:
            loop.call_soon_threadsafe(self._spawn, spec)

    def results(self) -> Results:
        """Completed pulls and released holds since the last call."""
        now = self.clock()
        with self._lock:
            out, self._results = self._results, Results()
            for request_id, deadline in list(self._holds.items()):
                if request_id in self._released or deadline <= now:
                    if request_id not in self._released:
                        log.warning("prefill request %s: blocks not pulled within %.0f s, freed",
                                    request_id, self.hold_timeout_s)
                    del self._holds[request_id]
                    self._released.pop(request_id, None)
                    out.finished_sending.add(request_id)
            # A release for a hold this rank never heard of (a stale or foreign id) expires.
            for request_id, when in list(self._released.items()):
                if when + self.hold_timeout_s <= now:
                    del self._released[request_id]
        return out

    # decode: pulls ------------------------------------------------------------------------------
    def _spawn(self, spec: PullSpec) -> None:
        task = asyncio.get_running_loop().create_task(self._pull(spec))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _pull(self, spec: PullSpec) -> None:
        agent = self.agent
        assert agent is not None
        ok = False
        transfer_id = uuid.uuid4().hex
        landed = agent.expect(transfer_id, spec.dst_block_ids) if spec.dst_block_ids else None
        writer: asyncio.StreamWriter | None = None
        started = time.perf_counter()
        try:
            # With tensor parallelism rank r pulls from rank r (each holds its own heads).
            address = spec.addresses[min(self.rank, len(spec.addresses) - 1)]
            host, _, port = address.rpartition(":")
            async with asyncio.timeout(self.pull_timeout_s):
                reader, writer = await asyncio.open_connection(host, int(port))
                await _write_msg(writer, PullRequest(
                    transfer_id, spec.remote_request_id, agent.info, spec.src_block_ids, spec.dst_block_ids
                ))
                if landed is None:
                    return  # a release: nothing to wait for
                reply = await _read_msg(reader, PullReply)
                if not reply.ok:
                    raise TransferFailed(f"prefill worker refused the pull: {reply.error}")
                await landed
            ok = True
            self.last_pull_s = time.perf_counter() - started
            log.debug("request %s: %d blocks pulled (%d bytes over %s) in %.1f ms", spec.request_id,
                      len(spec.dst_block_ids), reply.kv_bytes, reply.backend, self.last_pull_s * 1000)
        except (Exception, asyncio.CancelledError) as exc:
            if landed is not None:
                # The scheduler recomputes the prompt (kv_load_failure_policy "recompute").
                log.warning("request %s: KV pull from %s failed (%r); the prompt is recomputed here",
                            spec.request_id, spec.addresses, exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
        finally:
            if not ok and landed is not None:
                agent.forget(transfer_id)
            if writer is not None:
                writer.close()
            if landed is not None:
                with self._lock:
                    self._results.finished_recving.add(spec.request_id)
                    if ok:
                        self.pulls_done += 1
                    else:
                        self.pulls_failed += 1
                        self._results.failed_recving.add(spec.request_id)

    async def _test_stall(self, request_id: str) -> None:
        if self.stall_file is None or not os.path.exists(self.stall_file):
            return
        print(f"{STALL_MARK} {request_id}", file=sys.stderr, flush=True)
        for _ in range(3000):  # bounded: 5 minutes
            if not os.path.exists(self.stall_file):
                return
            await asyncio.sleep(0.1)

    # prefill: the pull server -------------------------------------------------------------------
    async def _serve_pull(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        agent = self.agent
        assert agent is not None
        request_id: str | None = None
        try:
            req = await _read_msg(reader, PullRequest)
            request_id = req.request_id
            if not req.src_block_ids:
                return
            await self._test_stall(request_id)
            try:
                num_bytes, backend = await agent.send(req.decode_agent, req.transfer_id, req.src_block_ids,
                                                      req.dst_block_ids)
                reply = PullReply(True, kv_bytes=num_bytes, backend=backend)
            except Exception as exc:  # a layout mismatch, the decode worker gone, ...
                log.warning("pull of prefill request %s failed: %s", request_id, exc)
                reply = PullReply(False, error=str(exc))
            await _write_msg(writer, reply)
        except (asyncio.IncompleteReadError, ConnectionError, msgspec.DecodeError) as exc:
            log.debug("pull connection ended: %r", exc)
        finally:
            if request_id is not None:
                with self._lock:
                    self._released[request_id] = self.clock()
            writer.close()
