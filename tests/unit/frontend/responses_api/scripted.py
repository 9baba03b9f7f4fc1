"""A Generation that yields scripted ChoiceDelta bursts: drives the API encoders in their unit
tests (the routes are tested over the real pipeline in test_routes.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx2

from dynamo import errors
from frontend.outputs import ChoiceAccumulator, ChoiceDelta, ChoiceResult
from frontend.schemas import PromptTokensDetails, Usage


@dataclass
class ScriptedGeneration:
    script: list[list[ChoiceDelta]]
    prompt_tokens: int = 10
    cached_tokens: int = 4
    fail_after: int | None = None  # bursts delivered before a StreamBroken
    response_id: str = "chatcmpl-0123abcd"
    created: int = 1700000000
    model: str = "tiny"
    num_choices: int = 1
    closed: bool = False
    completion_tokens: int = 0
    delivered: list[list[ChoiceDelta]] = field(default_factory=list)

    async def bursts(self) -> AsyncIterator[list[ChoiceDelta]]:
        try:
            for i, burst in enumerate(self.script):
                if self.fail_after is not None and i == self.fail_after:
                    raise errors.StreamBroken("the worker went away")
                # One token per non-empty delta, for the usage count.
                self.completion_tokens += sum(1 for d in burst if d.content or d.reasoning or d.tool_calls)
                self.delivered.append(burst)
                yield burst
        finally:
            self.closed = True

    def usage(self) -> Usage:
        return Usage(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            total_tokens=self.prompt_tokens + self.completion_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=self.cached_tokens),
        )

    async def results(self) -> list[ChoiceResult]:
        accumulators = [ChoiceAccumulator(i) for i in range(self.num_choices)]
        async for burst in self.bursts():
            for delta in burst:
                accumulators[delta.index].add(delta)
        return [a.result() for a in accumulators]


def serve_apis(stack: object, ttl_s: float = 3600.0) -> object:
    """Register the Anthropic, Responses and tokenize routes on a test stack's app, unless
    create_app already did; returns the response store serving them."""
    from frontend.anthropic import register_anthropic_routes
    from frontend.config import FrontendConfig
    from frontend.responses import register_responses_routes
    from frontend.tokenize_api import register_tokenize_routes

    app = stack.app  # type: ignore[attr-defined]
    if any(getattr(r, "path", None) == "/v1/messages" for r in app.router.routes):
        return app.state.response_store
    manager = stack.manager  # type: ignore[attr-defined]
    config = FrontendConfig(max_request_body_bytes=1 << 20, response_store_ttl_s=ttl_s)
    register_anthropic_routes(app, app.state.pipeline, manager, config)
    store = register_responses_routes(app, app.state.pipeline, manager, config)
    register_tokenize_routes(app, manager, config)
    return store


def sdk_http_client(stack: object) -> httpx2.AsyncClient:
    """The APIs served on a test stack's app (serve_apis) and an httpx2 client calling it in
    process: the `http_client` for the official SDK clients (openai, anthropic)."""
    serve_apis(stack)
    app = stack.app  # type: ignore[attr-defined]
    return httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://test")


def think_model(tmp_path: object) -> str:
    """The tiny model with a template that reads tools and mentions <think> (so the reasoning
    parser is recognised) and honours enable_thinking."""
    import json
    import shutil
    from pathlib import Path

    from tests.unit.frontend.conftest import TINY_MODEL
    from tests.unit.frontend.test_api_surface import TOOLS_TEMPLATE

    root = Path(str(tmp_path)) / "think-model"
    shutil.copytree(TINY_MODEL, root, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    config = json.loads((root / "tokenizer_config.json").read_text())
    config["chat_template"] = TOOLS_TEMPLATE + "{# <think> #}"
    (root / "tokenizer_config.json").write_text(json.dumps(config))
    return str(root)
