"""The standalone router service and RemoteRouter, over the embedded runtime's planes."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from dynamo import errors
from dynamo.config import RuntimeConfig
from dynamo.events import KvEventPublisher, kv_events_subject
from dynamo.kv_hash import block_hashes
from dynamo.runtime import Runtime
from dynamo.runtime.planes import RequestContext
from dynamo.wire import BlockStored, PreprocessedRequest
from router.args import RouterConfig
from router.kv_router import KvRouter
from router.remote import RemoteRouter
from router.service import RouterService
from tests.turns import until

BLOCK = 16
PROMPT = list(range(10 * BLOCK))
HASHES = block_hashes(PROMPT, BLOCK)



async def idle_worker(payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
    yield b""


@pytest.fixture
async def runtime() -> AsyncIterator[Runtime]:
    async with await Runtime.create(RuntimeConfig()) as rt:
        yield rt


async def test_remote_router_gets_the_services_decision(runtime: Runtime) -> None:
    # Two fake workers registered in discovery, each under its own lease.
    worker_a, worker_b = runtime.sibling(), runtime.sibling()
    served_a = await worker_a.endpoint("backend", "generate").serve(idle_worker)
    served_b = await worker_b.endpoint("backend", "generate").serve(idle_worker)
    a, b = served_a.instance_id, served_b.instance_id

    config = RouterConfig(kv_block_size=BLOCK, seed=0)
    async with RouterService(runtime.sibling(), config, mode="kv") as service:
        router = service.router
        assert isinstance(router, KvRouter) and router.index is not None
        publisher = KvEventPublisher(runtime.events, kv_events_subject(runtime.namespace, "backend"), b)
        await publisher.publish(BlockStored(HASHES))
        await until(lambda: router.index.find_matches(HASHES) == {b: 10})

        remote = RemoteRouter(runtime.sibling())
        await remote.start()
        try:
            request = PreprocessedRequest(request_id="r1", model="m", token_ids=PROMPT)
            decision = await remote.select(request, [a, b])
            assert (decision.instance_id, decision.overlap_blocks) == (b, 10)
            assert router.load.inflight_requests() == 1

            remote.first_token("r1", b)
            remote.request_finished("r1", b)
            await until(lambda: router.load.inflight_requests() == 0)

            with pytest.raises(errors.NoInstances):
                await remote.select(request, [])
        finally:
            await remote.close()

        # A worker whose registration ends leaves the service's index at once.
        await worker_b.shutdown()
        await until(lambda: b not in router.index.workers())
        assert router.index.find_matches(HASHES) == {}
    await worker_a.shutdown()
