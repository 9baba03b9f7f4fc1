"""A real frontend stack on the embedded runtime: a scripted worker handler that registers a
ModelCard, a ModelManager following it, and create_app driven through httpx's ASGITransport."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry

from dynamo.config import RuntimeConfig
from dynamo.model_registry import ModelWatcher, register_model
from dynamo.runtime import RequestContext, Runtime, ServedEndpoint
from dynamo.wire import REQUEST_CODEC, EngineOutput, ModelCard, PreprocessedRequest, PromptTokenLogprob, encode
from frontend.app import create_app
from frontend.config import FrontendConfig
from frontend.metrics import FrontendMetrics
from frontend.models import ModelManager
from frontend.tokenizer import ModelTokenizer
from router.base import RoundRobinRouter

TINY_MODEL = str(Path(__file__).resolve().parents[3] / "models" / "dynamo-tiny")
MODEL = "tiny"
CONTEXT = 256


@pytest.fixture(scope="session")
def tokenizer() -> ModelTokenizer:
    return ModelTokenizer.load(TINY_MODEL)


def ids(tokenizer: ModelTokenizer, text: str) -> list[int]:
    """`text` as token ids without special tokens (a scripted worker's script)."""
    return tokenizer.encode(text, add_special_tokens=False)


@dataclass
class ScriptedWorker:
    """A worker handler that answers every request with `script` (token ids), one per frame,
    then finish_reason `finish`. Records requests and cancellations for the tests."""

    runtime: Runtime
    script: list[int]
    finish: str = "length"
    cached_tokens: int = 3
    # When set, the handler waits on it before each token after the first (the test paces it).
    gate: asyncio.Event | None = None
    requests: list[PreprocessedRequest] = field(default_factory=list)
    started: asyncio.Event = field(default_factory=asyncio.Event)
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    fail_after: int | None = None
    served: ServedEndpoint | None = None
    instance_id: int = 0
    model_path: str = TINY_MODEL

    async def handle(self, payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
        request = REQUEST_CODEC.decode(payload)
        self.requests.append(request)
        self.started.set()
        limit = request.stop.max_tokens or len(self.script)
        tokens = self.script[:limit]
        try:
            for i, token in enumerate(tokens):
                if self.fail_after is not None and i == self.fail_after:
                    raise RuntimeError("engine exploded")
                if i > 0 and self.gate is not None:
                    await self.gate.wait()
                last = i == len(tokens) - 1
                reason = ("stop" if token in request.stop.stop_token_ids else self.finish) if last else None
                out = EngineOutput([token], reason, self.cached_tokens if i == 0 else None)
                if request.sampling.logprobs:
                    # Scripted, but shaped like an engine's: the chosen token is the most likely.
                    out.logprobs = [-0.25 - 0.01 * i]
                    k = request.sampling.top_logprobs
                    out.top_logprobs = [[(token + j, -0.25 - 0.01 * i - j) for j in range(k)]]
                if i == 0 and request.prompt_logprobs is not None:
                    out.prompt_logprobs = [None] + [
                        PromptTokenLogprob(-1.0, [(t, -1.0)][: request.prompt_logprobs]) for t in request.token_ids[1:]
                    ]
                yield encode(out)
        finally:
            if ctx.cancelled.is_set():
                self.cancelled.set()

    async def start(self, name: str = MODEL) -> None:
        lease = await self.runtime.primary_lease()
        self.instance_id = lease
        self.served = await self.runtime.endpoint("backend", "generate").serve(self.handle)
        card = ModelCard(
            served_model_name=name,
            model_path=self.model_path,
            context_length=CONTEXT,
            kv_block_size=16,
            namespace=self.runtime.namespace,
            instance_id=lease,
        )
        await register_model(self.runtime.discovery, card, lease)


@dataclass
class Stack:
    runtime: Runtime
    manager: ModelManager
    registry: CollectorRegistry
    client: httpx.AsyncClient
    app: object
    make_worker: Callable[..., ScriptedWorker]
    workers: list[ScriptedWorker] = field(default_factory=list)


@pytest.fixture
async def stack(tokenizer: ModelTokenizer) -> AsyncIterator[Stack]:
    runtime = await Runtime.create(RuntimeConfig())
    workers: list[Runtime] = []

    def make_worker(script: list[int], **kwargs: object) -> ScriptedWorker:
        # Each worker gets its own lease (instance id) on the shared embedded planes.
        worker_rt = runtime.sibling()
        workers.append(worker_rt)
        return ScriptedWorker(worker_rt, script, **kwargs)  # type: ignore[arg-type]

    watcher = ModelWatcher(runtime.discovery, runtime.namespace)
    await watcher.start()
    manager = ModelManager(runtime, watcher, lambda card: RoundRobinRouter())
    await manager.start()
    registry = CollectorRegistry()
    app = create_app(manager, FrontendMetrics(registry), FrontendConfig(max_request_body_bytes=1 << 20))
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")
    try:
        yield Stack(runtime, manager, registry, client, app, make_worker)
    finally:
        await client.aclose()
        await manager.close()
        await watcher.close()
        for rt in workers:
            await rt.shutdown()
        await runtime.shutdown()


async def start_worker(stack: Stack, script: list[int], **kwargs: object) -> ScriptedWorker:
    worker = stack.make_worker(script, **kwargs)
    stack.workers.append(worker)
    await worker.start()
    await stack.manager.wait_until(
        lambda: stack.manager.ready() and worker.instance_id in stack.manager.models[MODEL].instance_ids(), 5
    )
    return worker
