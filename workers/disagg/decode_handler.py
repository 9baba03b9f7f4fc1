"""The decode role: the frontend routes requests here by load; this handler decides per request
whether to prefill locally (short or mostly cached prompts, busy prefill pool, no prefill
worker) or remotely: it reserves blocks, picks a prefill worker with a KV-aware router over the
prefill component, asks it to prefill and send the KV, and decodes from the first token as soon
as the blocks have landed. Any remote failure or timeout falls back to a local prefill."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import msgspec

from dynamo import errors, tracing
from dynamo.runtime import Client, ResponseStream, Runtime
from dynamo.runtime.tcp_plane import DEAD_PEER_S
from dynamo.wire import (
    REMOTE_PREFILL_RESULT_CODEC,
    EngineOutput,
    PreprocessedRequest,
    RemotePrefillRequest,
    RemotePrefillResult,
    encode,
)
from kvbm.transfer.agent import KvTransferAgent, TransferFailed
from router.args import RouterConfig
from router.base import Router
from router.kv_router import KvRouter
from router.modes import make_router
from workers.disagg.args import DisaggConfig
from workers.disagg.prefill_handler import PREFILL_ENDPOINT
from workers.engine import ConnectorDisaggEngine, DisaggEngine, Reservation

log = logging.getLogger(__name__)

# The sender's last frame follows its answer by a link's delivery time; the dead-peer bound is
# the longest this runtime lets any silent link go unnoticed.
LANDING_GRACE_S: float = DEAD_PEER_S


@dataclass(slots=True)
class DecodeStats:
    local_prefills: int = 0
    remote_prefills: int = 0
    fallbacks: int = 0  # remote attempts that failed and were prefilled locally


class DecodeHandler:
    """Async context manager owning the prefill client and the prefill router."""

    def __init__(
        self,
        runtime: Runtime,
        engine: DisaggEngine | ConnectorDisaggEngine,
        agent: KvTransferAgent | None,
        config: DisaggConfig,
        on_prefill: Callable[[str, str], None] | None = None,
    ) -> None:
        self.runtime = runtime
        # (where, why local): the worker's dynamo_worker_prefills_total.
        self._on_prefill = on_prefill
        self.engine = engine
        self.agent = agent
        self.config = config
        self.stats = DecodeStats()
        self.client: Client | None = None
        self.router: Router | None = None

    async def start(self) -> None:
        comp = self.config.prefill_component
        self.client = await self.runtime.endpoint(comp, PREFILL_ENDPOINT).client()
        self.client.on_change(self._instance_changed)
        config = RouterConfig(kv_block_size=self.engine.kv_layout().block_size_tokens)
        # Prefill workers are chosen by KV overlap (and prefill load): a prompt whose prefix a
        # prefill worker holds costs only its uncached part.
        self.router = make_router("kv", config, self.runtime.events, self.runtime.namespace, comp)
        await self.router.start()

    async def close(self) -> None:
        if self.router is not None:
            await self.router.close()
        if self.client is not None:
            await self.client.close()

    def _instance_changed(self, instance_id: int, added: bool) -> None:
        if not added and self.router is not None:
            self.router.instance_removed(instance_id)

    # ------------------------------------------------------------------------------ serving

    def local_reason(self, request: PreprocessedRequest) -> str | None:
        """Why this request is prefilled here, or None to prefill remotely."""
        candidates = self.client.instance_ids() if self.client is not None else []
        if not candidates:
            return "no prefill worker"
        uncached = len(request.token_ids) - self.engine.cached_prefix_tokens(request.token_ids)
        if uncached < self.config.min_prefill_tokens:
            return "short"
        router = self.router
        if isinstance(router, KvRouter):
            queued = min(router.load.load(w).prefill_tokens for w in candidates)
            if queued > self.config.max_prefill_queue_tokens:
                return "prefill queue full"
        return None

    async def generate(self, request: PreprocessedRequest) -> AsyncIterator[EngineOutput]:
        reason = self.local_reason(request)
        if reason is None:
            outputs = await self._remote(request)
            if outputs is not None:
                self.stats.remote_prefills += 1
                self._count("remote", "")
                async for output in outputs:
                    yield output
                return
            self.stats.fallbacks += 1
            reason = "remote failed"
        self.stats.local_prefills += 1
        self._count("local", reason)
        log.debug("request %s: prefilled locally (%s)", request.request_id, reason)
        async for output in self.engine.generate(request):
            yield output

    def _count(self, where: str, reason: str) -> None:
        if self._on_prefill is not None:
            self._on_prefill(where, reason)

    async def _remote(self, request: PreprocessedRequest) -> AsyncIterator[EngineOutput] | None:
        """The request's outputs decoded from remotely prefilled KV, or None to prefill here."""
        engine = self.engine
        # Traced: routing, the prefill worker's part and the KV transfer as one span, the parent
        # of the prefill worker's spans; decoding stays under the worker's span (`request`).
        with tracing.span("remote_prefill", request.trace) as span:
            asked = request if span is None else msgspec.structs.replace(request, trace=tracing.traceparent(span))
            if isinstance(engine, ConnectorDisaggEngine):
                answer = await self._remote_prefill_connector(asked, engine)
                if span is not None and answer is None:
                    tracing.fail(span, "remote prefill failed: prefilling locally")
                return None if answer is None else engine.generate_from_params(request, *answer)
            prefilled = await self._remote_prefill(asked, engine)
            if span is not None and prefilled is None:
                tracing.fail(span, "remote prefill failed or no room: prefilling locally")
        return None if prefilled is None else engine.generate_from_kv(request, *prefilled)

    async def _remote_prefill_connector(
        self, request: PreprocessedRequest, engine: ConnectorDisaggEngine
    ) -> tuple[EngineOutput, bytes] | None:
        """An engine with its own KV connector: the prefill worker's first token and transfer
        parameters, or None (reason logged) to prefill locally. The KV moves later, pulled by
        the engine; a pull that fails there is recomputed by the engine itself."""
        assert self.client is not None and self.router is not None
        instance_id: int | None = None
        stream: ResponseStream | None = None
        try:
            decision = await self.router.select(request, self.client.instance_ids())
            instance_id = decision.instance_id
            body = RemotePrefillRequest(
                request=request, transfer_id=uuid.uuid4().hex, decode_agent=engine.kv_agent_info(), dst_block_ids=[]
            )
            stream = await self.client.generate(encode(body), instance_id, request.request_id)
            result = await asyncio.wait_for(self._read_result(stream), self.config.prefill_timeout_s)
            if not result.kv_params:
                raise errors.EngineError("the prefill worker's engine sent no KV transfer parameters")
            self.router.first_token(request.request_id, instance_id)
            return result.first, result.kv_params
        except (errors.DynamoError, OSError, TimeoutError) as exc:
            log.warning("remote prefill of %s failed (%s); prefilling locally", request.request_id, exc)
            return None
        finally:
            if stream is not None:
                await stream.aclose()
            if instance_id is not None:
                self.router.request_finished(request.request_id, instance_id)

    async def _remote_prefill(
        self, request: PreprocessedRequest, engine: DisaggEngine
    ) -> tuple[EngineOutput, Reservation] | None:
        """The first token with the prompt's KV landed in reserved blocks, or None (reason
        logged, everything released) when this request should be prefilled locally."""
        assert self.client is not None and self.router is not None and self.agent is not None
        reservation = engine.reserve(request.token_ids)
        if reservation is None:
            return None
        transfer_id = uuid.uuid4().hex
        landed = self.agent.expect(transfer_id, reservation.transfer_block_ids)
        instance_id: int | None = None
        stream: ResponseStream | None = None
        done = False
        try:
            decision = await self.router.select(request, self.client.instance_ids())
            instance_id = decision.instance_id
            body = RemotePrefillRequest(
                request=request,
                transfer_id=transfer_id,
                decode_agent=self.agent.info,
                dst_block_ids=reservation.transfer_block_ids,
                skip_blocks=reservation.matched_blocks,
            )
            stream = await self.client.generate(encode(body), instance_id, request.request_id)
            result = await asyncio.wait_for(self._await_prefill(stream, landed, transfer_id), self.config.prefill_timeout_s)
            self.router.first_token(request.request_id, instance_id)
            done = True
            log.debug(
                "request %s: prefilled on worker %x, %d blocks (%d bytes) over %s",
                request.request_id, instance_id, result.num_blocks, result.kv_bytes, result.backend,
            )
            return result.first, reservation
        except (errors.DynamoError, OSError, TimeoutError) as exc:
            # Includes a dead or stopped prefill worker, a transfer cut short, a layout
            # mismatch: the request is still answered, by prefilling here.
            log.warning("remote prefill of %s failed (%s); prefilling locally", request.request_id, exc)
            return None
        finally:
            if not done:
                self.agent.forget(transfer_id)
                engine.release(reservation)
            if stream is not None:
                await stream.aclose()
            if instance_id is not None:
                self.router.request_finished(request.request_id, instance_id)

    async def _await_prefill(
        self, stream: ResponseStream, landed: asyncio.Future[int], transfer_id: str
    ) -> RemotePrefillResult:
        """The prefill worker's answer and the landing notice, whichever fails first fails.

        The answer comes once the sender has handed its last frame to its kernel; a link cut
        before any frame of the transfer got here loses it without either end seeing an error
        (the sender has closed; the receiver's idle connection names no transfer). So if
        nothing of it arrived LANDING_GRACE_S after the answer, it is taken as lost, not late.
        A transfer whose frames are arriving is bounded by its own connection instead (the
        dead-peer bound), and its landing may wait for the model thread's current step."""
        answer = asyncio.ensure_future(self._read_result(stream))
        assert self.agent is not None
        try:
            pending: set[asyncio.Future[object]] = {answer, landed}  # type: ignore[arg-type]
            while pending:
                grace = LANDING_GRACE_S if pending == {landed} and not self.agent.begun(transfer_id) else None
                done, pending = await asyncio.wait(pending, timeout=grace, return_when=asyncio.FIRST_COMPLETED)
                if not done and not self.agent.begun(transfer_id):
                    raise TransferFailed(f"no KV arrived within {LANDING_GRACE_S:g} s of the prefill worker's answer")
                for fut in done:
                    fut.result()  # raises the first failure
            return answer.result()
        finally:
            answer.cancel()
            await asyncio.gather(answer, return_exceptions=True)

    @staticmethod
    async def _read_result(stream: ResponseStream) -> RemotePrefillResult:
        result: RemotePrefillResult | None = None
        async for payload in stream:
            result = REMOTE_PREFILL_RESULT_CODEC.decode(payload)
        if result is None:
            raise errors.StreamBroken("prefill worker ended without a result")
        return result
