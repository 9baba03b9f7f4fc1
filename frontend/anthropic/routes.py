"""The Anthropic Messages routes: POST /v1/messages (JSON or SSE) and
POST /v1/messages/count_tokens; errors in Anthropic's shape."""

from __future__ import annotations

import msgspec
from fastapi import FastAPI
from starlette.routing import Route

from frontend.anthropic.convert import count_tokens_request, to_chat_request
from frontend.anthropic.encode import message_body, message_events
from frontend.anthropic.errors import anthropic_http_error
from frontend.anthropic.schemas import (
    CountTokensRequest,
    ErrorBody,
    Message,
    MessagesRequest,
    TokenCount,
    decode_count_tokens_request,
    decode_messages_request,
)
from frontend.config import FrontendConfig
from frontend.models import ModelManager
from frontend.pipeline import Pipeline
from frontend.endpoint import ApiEndpoint, JsonReply, Reply, StreamReply
from frontend.pipeline import reasoning_available
from frontend.schemas import ApiOperation
from frontend.tokenize_api import chat_prompt_ids, tool_dicts

_encode = msgspec.json.encode

ENDPOINT_LABEL = "messages"


def register_anthropic_routes(app: FastAPI, pipeline: Pipeline, manager: ModelManager, config: FrontendConfig) -> None:
    """Add the routes to `app` (after create_app set `app.state.inflight_limit`)."""

    async def create(body: bytes, arrived_s: float) -> Reply:
        request = decode_messages_request(body)
        model = await manager.acquire(request.model)  # waits for a scaled-to-zero model
        await model.wait_open()
        converted = to_chat_request(request, reasoning_available(pipeline, model))
        generation = await pipeline.open_request(ENDPOINT_LABEL, converted.chat, arrived_s, len(body))
        if request.stream:
            return StreamReply(message_events(generation, converted.omit_thinking), close=generation.aclose)
        results = await generation.results()
        return JsonReply(message_body(generation, results[0], generation.usage(), converted.omit_thinking))

    async def count_tokens(body: bytes, arrived_s: float) -> Reply:
        request = decode_count_tokens_request(body)
        model = manager.get(request.model)
        await model.wait_open()
        tokenizer = model.tokenizer
        assert tokenizer is not None
        chat = count_tokens_request(request, reasoning_available(pipeline, model))
        # Tools are in the prompt unless tool_choice none keeps them out (as the chat route does).
        tools = tool_dicts(chat.tools) if chat.tool_choice != "none" else None
        ids = chat_prompt_ids(tokenizer, chat.messages, tools=tools, template_kwargs=chat.chat_template_kwargs)
        return JsonReply(_encode(TokenCount(len(ids))))

    limit = app.state.inflight_limit
    messages = ApiEndpoint(create, anthropic_http_error, config.max_request_body_bytes, limit)
    counting = ApiEndpoint(count_tokens, anthropic_http_error, config.max_request_body_bytes, None)
    app.router.routes.append(Route("/v1/messages", messages, methods=["POST"]))
    app.router.routes.append(Route("/v1/messages/count_tokens", counting, methods=["POST"]))


OPENAPI_OPERATIONS = (
    ApiOperation("/v1/messages", "post", "Anthropic Messages", Message, MessagesRequest, error=ErrorBody, streams=True),
    ApiOperation("/v1/messages/count_tokens", "post", "Anthropic token count", TokenCount, CountTokensRequest,
                 error=ErrorBody),
)
