"""OpenAI request and response bodies as msgspec Structs: parsed straight from request bytes
(typed, with errors that name the offending field) and the source of /openapi.json."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar

import msgspec
from msgspec import Meta, Struct

from dynamo import errors

# ------------------------------------------------------------------------------------ requests
#
# Request Structs forbid unknown fields: a field this server does not know would otherwise be
# dropped without a word, and a client must never believe a parameter was applied when it was
# not. Every declared field is honoured (preprocess.py) or refused there with a 400 naming it.

Temperature = Annotated[float, Meta(ge=0.0, le=2.0, description="0 to 2; 0 means greedy")]
TopP = Annotated[float, Meta(gt=0.0, le=1.0)]
MaxTokens = Annotated[int, Meta(ge=1)]
Penalty = Annotated[float, Meta(ge=-2.0, le=2.0)]
StopList = Annotated[list[str], Meta(max_length=4)]
TokenId = Annotated[int, Meta(ge=0)]
NumChoices = Annotated[int, Meta(ge=1, le=128)]
TopLogprobs = Annotated[int, Meta(ge=0, le=20)]
Bias = Annotated[float, Meta(ge=-100.0, le=100.0)]


class StreamOptions(Struct, forbid_unknown_fields=True, omit_defaults=True):
    include_usage: bool = False


class ContentPart(Struct, forbid_unknown_fields=True, omit_defaults=True):
    """One part of a multi-part message content; only text parts are understood (others are
    refused by name in the tokenizer)."""

    type: str
    text: str | None = None
    image_url: Any = None
    input_audio: Any = None
    file: Any = None


class FunctionCallSpec(Struct, forbid_unknown_fields=True):
    name: str
    arguments: str  # JSON object text, as the model produced it


class MessageToolCall(Struct, forbid_unknown_fields=True):
    """A tool call of an earlier assistant turn, sent back in the history."""

    id: str
    function: FunctionCallSpec
    type: Literal["function"] = "function"


class ChatMessage(Struct, forbid_unknown_fields=True, omit_defaults=True):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[MessageToolCall] | None = None
    # An earlier turn's reasoning, for templates that render it (Qwen3's, DeepSeek's).
    reasoning_content: str | None = None


class FunctionSpec(Struct, forbid_unknown_fields=True, omit_defaults=True):
    name: Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")]
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema; none means no arguments
    strict: bool | None = None


class Tool(Struct, forbid_unknown_fields=True):
    function: FunctionSpec
    type: Literal["function"] = "function"


class NamedFunction(Struct, forbid_unknown_fields=True):
    name: str


class NamedToolChoice(Struct, forbid_unknown_fields=True):
    function: NamedFunction
    type: Literal["function"] = "function"


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class JsonSchemaSpec(Struct, forbid_unknown_fields=True, omit_defaults=True):
    name: str = "response"
    description: str | None = None
    schema: dict[str, Any] | None = None
    strict: bool | None = None  # always enforced here: the grammar makes the output valid


class ResponseFormat(Struct, forbid_unknown_fields=True, omit_defaults=True):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None


class StructuredOutputs(Struct, forbid_unknown_fields=True, omit_defaults=True):
    """vLLM's `structured_outputs` extension: exactly one of these constrains the output."""

    json: dict[str, Any] | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


class SamplingFields(Struct, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    """Fields shared by chat and text completions, OpenAI's plus vLLM-style extensions."""

    model: str
    max_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    n: NumChoices = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | StopList | None = None
    seed: int | None = None
    frequency_penalty: Penalty | None = None
    presence_penalty: Penalty | None = None
    logit_bias: dict[str, Bias] | None = None  # token id (as a string) -> bias
    user: str | None = None  # an end-user id: logged with the request
    # Extensions, spelled as vLLM spells them.
    top_k: int | None = None
    min_p: Annotated[float, Meta(ge=0.0, le=1.0)] | None = None
    repetition_penalty: Annotated[float, Meta(gt=0.0, le=2.0)] | None = None
    min_tokens: Annotated[int, Meta(ge=0)] = 0
    ignore_eos: bool = False
    stop_token_ids: list[TokenId] | None = None
    structured_outputs: StructuredOutputs | None = None
    # vLLM's older spellings of structured_outputs.
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    # OpenAI fields this server refuses with a 400 naming them when set (preprocess.py):
    # declared so that the refusal says why instead of "unknown field".
    service_tier: str | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None


class ChatCompletionRequest(SamplingFields, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    messages: Annotated[list[ChatMessage], Meta(min_length=1)]
    max_completion_tokens: MaxTokens | None = None
    logprobs: bool = False
    top_logprobs: TopLogprobs | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool = True
    response_format: ResponseFormat | None = None
    # Variables for the chat template (vLLM's extension), e.g. {"enable_thinking": false}.
    chat_template_kwargs: dict[str, Any] | None = None
    # Refused when set (preprocess.py): the deprecated function-calling fields and the output
    # modes this server has no engine for.
    functions: list[Any] | None = None
    function_call: Any = None
    modalities: list[str] | None = None
    audio: Any = None
    prediction: Any = None
    reasoning_effort: str | None = None
    web_search_options: Any = None


# A token-id list, a string, or a list of strings or of token-id lists (a batch). msgspec cannot
# tell list[str] from list[int] in a union, so the items are a union checked in preprocess.
PromptItem = str | TokenId | list[TokenId]


class CompletionRequest(SamplingFields, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    prompt: str | Annotated[list[PromptItem], Meta(min_length=1)]
    echo: bool = False
    logprobs: TopLogprobs | None = None
    suffix: str | None = None
    best_of: int | None = None
    response_format: ResponseFormat | None = None  # vLLM accepts it on completions too


# ----------------------------------------------------------------------------------- responses


class PromptTokensDetails(Struct):
    cached_tokens: int = 0


class Usage(Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class TopLogprob(Struct):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(Struct):
    """One generated token with its logprob and the most likely alternatives (chat's
    `logprobs.content[i]`)."""

    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(Struct):
    content: list[TokenLogprob] | None


class CompletionLogprobs(Struct):
    """The legacy completions shape: parallel lists, one entry per token."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class FunctionCall(Struct):
    name: str
    arguments: str  # JSON object text


class ToolCall(Struct):
    id: str
    function: FunctionCall
    type: Literal["function"] = "function"


class ResponseMessage(Struct, omit_defaults=True):
    role: Literal["assistant"]
    content: str | None
    reasoning_content: str | None = None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(Struct):
    index: int
    message: ResponseMessage
    finish_reason: str | None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionResponse(Struct):
    id: str
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    object: Literal["chat.completion"] = "chat.completion"


class CompletionChoice(Struct):
    index: int
    text: str
    finish_reason: str | None
    logprobs: CompletionLogprobs | None = None


class CompletionResponse(Struct):
    id: str
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    object: Literal["text_completion"] = "text_completion"


class FunctionDelta(Struct, omit_defaults=True):
    name: str | None = None
    arguments: str | None = None


class ToolCallChunk(Struct, omit_defaults=True):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionDelta | None = None


class ChunkDelta(Struct, omit_defaults=True):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallChunk] | None = None


class ChatChunkChoice(Struct):
    index: int
    delta: ChunkDelta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(Struct, omit_defaults=True):
    """One chat stream chunk; sse.py derives its per-token byte templates from this Struct.
    With stream_options.include_usage, every chunk carries `"usage": null` and the last one
    the usage; without, `usage` is left out (UNSET)."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None | msgspec.UnsetType = msgspec.UNSET


class CompletionChunk(Struct, omit_defaults=True):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None | msgspec.UnsetType = msgspec.UNSET


class ModelObject(Struct):
    id: str
    created: int
    owned_by: str = "dynamo"
    object: Literal["model"] = "model"
    # The APIs it serves: ["chat", "completions"] (generative) or ["embeddings"].
    capabilities: list[str] = []
    max_model_len: int | None = None  # its context length, as vLLM reports it


class ModelList(Struct):
    data: list[ModelObject]
    object: Literal["list"] = "list"


class ErrorInfo(Struct):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(Struct):
    error: ErrorInfo


class ReadyModel(Struct):
    name: str
    instances: list[int]


class ReadyStatus(Struct):
    status: Literal["ready", "not_ready"]
    models: list[ReadyModel]


# ------------------------------------------------------------------------------------- parsing

T = TypeVar("T")

_CHAT_DECODER = msgspec.json.Decoder(ChatCompletionRequest)
_COMPLETION_DECODER = msgspec.json.Decoder(CompletionRequest)
# "Expected `int`, got `str` - at `$.messages[0].role`" -> param "messages[0].role"
_AT_PATH = re.compile(r" - at `\$\.?([^`]*)`$")
_MISSING = re.compile(r"missing required field `([^`]+)`")
_UNKNOWN = re.compile(r"Object contains unknown field `([^`]+)`")


def decode_struct(decoder: msgspec.json.Decoder[T], body: bytes) -> T:
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise validation_error(str(exc)) from None
    except msgspec.DecodeError as exc:
        raise errors.InvalidRequest(f"Malformed JSON in request body: {exc}") from None


def validation_error(text: str) -> errors.InvalidRequest:
    at = _AT_PATH.search(text)
    detail = text[: at.start()] if at else text
    param = at.group(1) if at else None
    unknown = _UNKNOWN.search(detail)
    if unknown is not None:
        name = f"{param}.{unknown.group(1)}" if param else unknown.group(1)
        return errors.InvalidRequest(
            f"Unrecognized request argument supplied: {name} (this server neither knows nor ignores it)", param=name
        )
    missing = _MISSING.search(detail)
    if missing is not None:
        name = f"{param}.{missing.group(1)}" if param else missing.group(1)
        return errors.InvalidRequest(f"Missing required parameter `{name}`", param=name)
    if param:
        return errors.InvalidRequest(f"Invalid value for `{param}`: {detail}", param=param)
    return errors.InvalidRequest(f"Invalid request body: {detail}")


def decode_chat_request(body: bytes) -> ChatCompletionRequest:
    return decode_struct(_CHAT_DECODER, body)


def decode_completion_request(body: bytes) -> CompletionRequest:
    return decode_struct(_COMPLETION_DECODER, body)


# ------------------------------------------------------------------------------------- OpenAPI


@dataclass(frozen=True)
class ApiOperation:
    """One route of /openapi.json. Each API package lists its own (`OPENAPI_OPERATIONS`), so the
    document is generated from the same Structs that decode and encode the route's bodies."""

    path: str
    method: Literal["get", "post", "delete"]
    summary: str
    response: Any  # a Struct type (or a union of them); None for text/plain
    request: Any = None  # a Struct type, or a tuple of alternatives
    error: Any = None  # defaults to OpenAI's ErrorResponse
    error_statuses: tuple[int, ...] = (400, 404, 413, 429, 500, 502, 503)
    streams: bool = False
    query: tuple[tuple[str, dict[str, Any]], ...] = ()  # optional query parameters: name, schema


def openapi_schema(title: str, version: str, operations: Sequence[ApiOperation] = ()) -> dict[str, Any]:
    """An OpenAPI 3.1 document for the core routes and `operations`, generated from their Structs."""
    ops = [*CORE_OPERATIONS, *operations]
    types: list[Any] = []
    for op in ops:
        requests = op.request if isinstance(op.request, tuple) else (op.request,)
        types += [t for t in (*requests, op.response, op.error or ErrorResponse) if t is not None]
    schemas, components = msgspec.json.schema_components(types, ref_template=_REF)
    schema_of = iter(schemas)
    paths: dict[str, dict[str, Any]] = {}
    for op in ops:
        request: dict[str, Any] | None = None
        if isinstance(op.request, tuple):  # alternatives msgspec cannot express as one union
            request = {"anyOf": [next(schema_of) for _ in op.request]}
        elif op.request is not None:
            request = next(schema_of)
        response = next(schema_of) if op.response is not None else None
        error = next(schema_of)
        ok: dict[str, Any] = (
            {"application/json": {"schema": response}} if response is not None
            else {"text/plain": {"schema": {"type": "string"}}}
        )
        if op.streams:
            ok["text/event-stream"] = {"schema": {"type": "string"}}
        responses: dict[str, Any] = {"200": {"description": "ok", "content": ok}}
        for status in op.error_statuses:
            content = {"application/json": {"schema": error}} if op.method != "get" or op.response is not None else ok
            responses[str(status)] = {"description": "error", "content": content}
        operation: dict[str, Any] = {"summary": op.summary, "responses": responses}
        if request is not None:
            operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": request}}}
        params = [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
            for name in _PATH_PARAM.findall(op.path)
        ]
        params += [{"name": name, "in": "query", "required": False, "schema": schema} for name, schema in op.query]
        if params:
            operation["parameters"] = params
        paths.setdefault(op.path, {})[op.method] = operation
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version},
        "paths": paths,
        "components": {"schemas": components},
    }


_REF = "#/components/schemas/{name}"
_PATH_PARAM = re.compile(r"\{(\w+)\}")

CORE_OPERATIONS: tuple[ApiOperation, ...] = (
    ApiOperation("/v1/chat/completions", "post", "Chat completion", ChatCompletionResponse,
                 ChatCompletionRequest, streams=True),
    ApiOperation("/v1/completions", "post", "Text completion", CompletionResponse, CompletionRequest, streams=True),
    ApiOperation("/v1/models", "get", "Models served by at least one live worker", ModelList, error_statuses=()),
    ApiOperation("/health", "get", "Liveness", None, error_statuses=()),
    ApiOperation("/ready", "get", "Readiness: every known model has a live worker", ReadyStatus,
                 error=ReadyStatus, error_statuses=(503,)),
    ApiOperation("/metrics", "get", "Prometheus metrics", None, error_statuses=()),
)
