"""Anthropic Messages API bodies as msgspec Structs: the request (parsed straight from bytes,
unknown fields refused by name), the `message` response, its stream events and the error body.

Field names and shapes follow Anthropic's API reference (and the official `anthropic` client's
types, which the tests decode our output with)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

from frontend.schemas import decode_struct

# ------------------------------------------------------------------------------------ requests

CacheControl = dict[str, Any]  # {"type": "ephemeral", "ttl"?}: prefix caching here is automatic


class TextBlock(Struct, tag_field="type", tag="text", forbid_unknown_fields=True, omit_defaults=True):
    text: str
    cache_control: CacheControl | None = None
    citations: list[Any] | None = None  # refused when non-empty (convert.py)


class ImageBlock(Struct, tag_field="type", tag="image", forbid_unknown_fields=True):
    """Declared so that the refusal names it (convert.py): the models served are text-only."""

    source: Any = None
    cache_control: CacheControl | None = None


class DocumentBlock(Struct, tag_field="type", tag="document", forbid_unknown_fields=True):
    source: Any = None
    cache_control: CacheControl | None = None
    title: str | None = None
    context: str | None = None
    citations: Any = None


class ToolUseBlock(Struct, tag_field="type", tag="tool_use", forbid_unknown_fields=True, omit_defaults=True):
    id: str
    name: str
    input: dict[str, Any]
    cache_control: CacheControl | None = None


class ToolResultBlock(Struct, tag_field="type", tag="tool_result", forbid_unknown_fields=True, omit_defaults=True):
    tool_use_id: str
    content: str | list[TextBlock | ImageBlock | DocumentBlock] | None = None
    is_error: bool = False
    cache_control: CacheControl | None = None


class ThinkingBlock(Struct, tag_field="type", tag="thinking", forbid_unknown_fields=True):
    """An earlier assistant turn's thinking, sent back in the history."""

    thinking: str
    signature: str = ""  # opaque to this server: there is nothing to verify it against


class RedactedThinkingBlock(Struct, tag_field="type", tag="redacted_thinking", forbid_unknown_fields=True):
    data: str


ContentBlock = TextBlock | ImageBlock | DocumentBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock | RedactedThinkingBlock


class InputMessage(Struct, forbid_unknown_fields=True):
    role: Literal["user", "assistant", "system"]
    content: str | list[ContentBlock]


class ToolSpec(Struct, forbid_unknown_fields=True, omit_defaults=True):
    """A client tool. Anthropic's server tools (web search, code execution, ...) carry a
    versioned `type` and are refused by name (convert.py)."""

    name: Annotated[str, Meta(min_length=1, max_length=128)]
    input_schema: dict[str, Any] | None = None
    description: str | None = None
    type: str | None = None  # None or "custom": a client tool
    strict: bool | None = None
    cache_control: CacheControl | None = None


class ToolChoice(Struct, forbid_unknown_fields=True, omit_defaults=True):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool = False


class ThinkingConfig(Struct, forbid_unknown_fields=True, omit_defaults=True):
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = None
    display: Literal["summarized", "omitted"] | None = None


class Metadata(Struct, forbid_unknown_fields=True, omit_defaults=True):
    user_id: str | None = None


class OutputFormat(Struct, forbid_unknown_fields=True, omit_defaults=True):
    type: Literal["json_schema"]
    schema: dict[str, Any]


class OutputConfig(Struct, forbid_unknown_fields=True, omit_defaults=True):
    """Anthropic's structured outputs (`format`); `effort` is refused (convert.py)."""

    format: OutputFormat | None = None
    effort: str | None = None


class MessagesRequest(Struct, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    model: str
    max_tokens: Annotated[int, Meta(ge=1)]
    messages: Annotated[list[InputMessage], Meta(min_length=1)]
    system: str | list[TextBlock] | None = None
    stop_sequences: list[str] | None = None
    temperature: Annotated[float, Meta(ge=0.0, le=1.0)] | None = None
    top_p: Annotated[float, Meta(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Meta(ge=1)] | None = None
    stream: bool = False
    tools: list[ToolSpec] | None = None
    tool_choice: ToolChoice | None = None
    metadata: Metadata | None = None
    thinking: ThinkingConfig | None = None
    output_config: OutputConfig | None = None
    # Refused when set (convert.py): declared so that the refusal says why.
    service_tier: str | None = None
    container: Any = None
    mcp_servers: Any = None
    context_management: Any = None


class CountTokensRequest(Struct, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    """POST /v1/messages/count_tokens: a Messages request without the generation fields."""

    model: str
    messages: Annotated[list[InputMessage], Meta(min_length=1)]
    system: str | list[TextBlock] | None = None
    tools: list[ToolSpec] | None = None
    tool_choice: ToolChoice | None = None
    thinking: ThinkingConfig | None = None
    output_config: OutputConfig | None = None


_MESSAGES_DECODER = msgspec.json.Decoder(MessagesRequest)
_COUNT_DECODER = msgspec.json.Decoder(CountTokensRequest)


def decode_messages_request(body: bytes) -> MessagesRequest:
    """Raises InvalidRequest naming the offending field (e.g. `max_tokens` when missing)."""
    return decode_struct(_MESSAGES_DECODER, body)


def decode_count_tokens_request(body: bytes) -> CountTokensRequest:
    return decode_struct(_COUNT_DECODER, body)


# ----------------------------------------------------------------------------------- responses


class OutText(Struct, tag_field="type", tag="text"):
    text: str


class OutThinking(Struct, tag_field="type", tag="thinking"):
    thinking: str
    signature: str = ""


class OutToolUse(Struct, tag_field="type", tag="tool_use"):
    id: str
    name: str
    input: dict[str, Any]


OutBlock = OutText | OutThinking | OutToolUse


class MessageUsage(Struct):
    """Anthropic counts cached prompt tokens apart: input_tokens + cache_read_input_tokens
    (+ cache_creation_input_tokens, always 0 here) is the whole prompt."""

    input_tokens: int
    output_tokens: int
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0


class Message(Struct):
    id: str
    model: str
    content: list[OutBlock]
    stop_reason: str | None
    stop_sequence: str | None
    usage: MessageUsage
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"


class TokenCount(Struct):
    input_tokens: int


# ------------------------------------------------------------------------------ stream events


class MessageStart(Struct, tag_field="type", tag="message_start"):
    message: Message


class ContentBlockStart(Struct, tag_field="type", tag="content_block_start"):
    index: int
    content_block: OutBlock


class Ping(Struct, tag_field="type", tag="ping"):
    pass


class TextDelta(Struct, tag_field="type", tag="text_delta"):
    text: str


class InputJsonDelta(Struct, tag_field="type", tag="input_json_delta"):
    partial_json: str


class ThinkingDelta(Struct, tag_field="type", tag="thinking_delta"):
    thinking: str


class ContentBlockDelta(Struct, tag_field="type", tag="content_block_delta"):
    index: int
    delta: TextDelta | InputJsonDelta | ThinkingDelta


class ContentBlockStop(Struct, tag_field="type", tag="content_block_stop"):
    index: int


class StopDelta(Struct):
    stop_reason: str
    stop_sequence: str | None


class MessageDelta(Struct, tag_field="type", tag="message_delta"):
    delta: StopDelta
    usage: MessageUsage


class MessageStop(Struct, tag_field="type", tag="message_stop"):
    pass


# --------------------------------------------------------------------------------------- errors

ErrorType = Literal[
    "invalid_request_error",
    "authentication_error",
    "permission_error",
    "not_found_error",
    "request_too_large",
    "rate_limit_error",
    "api_error",
    "overloaded_error",
    "timeout_error",
]


class ErrorDetail(Struct):
    type: str
    message: str


class ErrorBody(Struct, tag_field="type", tag="error"):
    error: ErrorDetail
