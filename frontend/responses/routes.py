"""The Responses API routes: POST /v1/responses (JSON or SSE), GET and DELETE
/v1/responses/{id}; errors in OpenAI's shape."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import msgspec
from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from dynamo import errors
from frontend.config import FrontendConfig
from frontend.errors import HttpError, error_body, error_info, http_error, to_response
from frontend.models import ModelManager
from frontend.pipeline import Pipeline
from frontend.responses.convert import to_chat_request
from frontend.responses.encode import base_response, new_id, response_events, response_object
from frontend.endpoint import ApiEndpoint, JsonReply, Reply, StreamReply
from frontend.pipeline import reasoning_available
from frontend.responses.schemas import (
    DeletedResponse,
    ResponseObject,
    ResponsesRequest,
    StoredResponse,
    decode_responses_request,
)
from frontend.responses.input_items import InputItemList, list_input_items, with_ids
from frontend.schemas import ApiOperation
from frontend.responses.store import DiscoveryResponseStore, ResponseNotFound, ResponseStore

log = logging.getLogger(__name__)

_encode = msgspec.json.encode

ENDPOINT_LABEL = "responses"


class PreviousResponseNotFound(errors.InvalidRequest):
    """OpenAI answers an unknown previous_response_id with 400 and this code."""

    api_code = "previous_response_not_found"


def openai_http_error(exc: BaseException) -> HttpError:
    """frontend/errors.py's status, headers and body, with the Responses API's own codes for
    the errors that have one (the status still comes from the project error they derive from)."""
    error = http_error(exc)
    if isinstance(exc, PreviousResponseNotFound):
        code: str | None = PreviousResponseNotFound.api_code
    elif isinstance(exc, ResponseNotFound):
        code = None  # OpenAI's 404 for an unknown response id carries no code
    else:
        return error
    status, info = error_info(exc)
    return HttpError(status, error_body(msgspec.structs.replace(info, code=code)), error.headers)


def register_responses_routes(
    app: FastAPI, pipeline: Pipeline, manager: ModelManager, config: FrontendConfig
) -> ResponseStore:
    """Add the routes to `app` (after create_app set `app.state.inflight_limit`). Returns the
    store, kept in the runtime's discovery under the frontend's namespace."""
    store = DiscoveryResponseStore(
        manager.runtime.discovery, config.namespace or manager.runtime.namespace, config.response_store_ttl_s
    )
    app.state.response_store = store

    async def create(body: bytes, arrived_s: float) -> Reply:
        request = decode_responses_request(body)
        previous = None
        if request.previous_response_id is not None:
            record = await store.get(request.previous_response_id)
            if record is None:
                raise PreviousResponseNotFound(
                    f"Previous response with id '{request.previous_response_id}' not found.",
                    param="previous_response_id",
                )
            previous = record.conversation()
        model = await manager.acquire(request.model)  # waits for a scaled-to-zero model
        await model.wait_open()
        tokenizer = model.tokenizer
        assert tokenizer is not None
        converted = to_chat_request(request, previous, reasoning_available(pipeline, model))
        generation = await pipeline.open_request(ENDPOINT_LABEL, converted.chat, arrived_s, len(body))
        base = base_response(request, new_id("resp"), generation.model)

        def count_tokens(text: str) -> int:
            return len(tokenizer.encode(text, add_special_tokens=False))

        async def save(response: ResponseObject) -> None:
            if not request.store:
                return
            record = StoredResponse(
                response=response, input=with_ids(converted.conversation), expires_at_s=store.expires_at()
            )
            try:
                await store.put(record)
            except errors.DynamoError as exc:
                # The answer is still the client's; continuing it will get the not-found 400.
                log.error("response %s could not be stored: %s", response.id, exc.message)

        if request.stream:
            return StreamReply(response_events(generation, base, count_tokens, save), close=generation.aclose)
        results = await generation.results()
        response = response_object(base, results[0], generation.usage(), count_tokens)
        await save(response)
        return JsonReply(_encode(response))

    async def stored(request: Request) -> StoredResponse:
        response_id = request.path_params["response_id"]
        record = await store.get(response_id)
        if record is None:
            raise ResponseNotFound(f"Response with id '{response_id}' not found.")
        return record

    async def retrieve(request: Request) -> Response:
        try:
            # OpenAI's retrieve also takes include/stream/starting_after: none is served here.
            refuse_query(request.query_params)
            record = await stored(request)
        except Exception as exc:  # noqa: BLE001 - every error becomes an OpenAI error body
            return to_response(openai_http_error(exc))
        return Response(_encode(record.response), media_type="application/json")

    async def input_items(request: Request) -> Response:
        try:
            page = list_input_items(await stored(request), request.query_params)
        except Exception as exc:  # noqa: BLE001 - every error becomes an OpenAI error body
            return to_response(openai_http_error(exc))
        return Response(_encode(page), media_type="application/json")

    async def delete(request: Request) -> Response:
        response_id = request.path_params["response_id"]
        try:
            refuse_query(request.query_params)
            if not await store.delete(response_id):
                raise ResponseNotFound(f"Response with id '{response_id}' not found.")
        except Exception as exc:  # noqa: BLE001 - every error becomes an OpenAI error body
            return to_response(openai_http_error(exc))
        return Response(_encode(DeletedResponse(response_id)), media_type="application/json")

    endpoint = ApiEndpoint(create, openai_http_error, config.max_request_body_bytes, app.state.inflight_limit)
    app.router.routes.append(Route("/v1/responses", endpoint, methods=["POST"]))
    app.router.routes.append(Route("/v1/responses/{response_id}", retrieve, methods=["GET"]))
    app.router.routes.append(Route("/v1/responses/{response_id}", delete, methods=["DELETE"]))
    app.router.routes.append(Route("/v1/responses/{response_id}/input_items", input_items, methods=["GET"]))
    return store


def refuse_query(query: Mapping[str, str]) -> None:
    for name in query:
        raise errors.InvalidRequest(f"Unrecognized query parameter: {name}", param=name)


OPENAPI_OPERATIONS = (
    ApiOperation("/v1/responses", "post", "Create a response", ResponseObject, ResponsesRequest, streams=True),
    ApiOperation("/v1/responses/{response_id}", "get", "A stored response", ResponseObject, error_statuses=(400, 404)),
    ApiOperation("/v1/responses/{response_id}", "delete", "Delete a stored response", DeletedResponse,
                 error_statuses=(400, 404)),
    ApiOperation("/v1/responses/{response_id}/input_items", "get", "The input items of a stored response",
                 InputItemList, error_statuses=(400, 404),
                 query=(("limit", {"type": "integer"}), ("order", {"type": "string", "enum": ["asc", "desc"]}),
                        ("after", {"type": "string"}))),
)
