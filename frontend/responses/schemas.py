"""OpenAI Responses API bodies as msgspec Structs: the request (unknown fields refused by name),
the conversation items (input and output share them), the `response` object, its stream events
and what the store keeps. Names follow OpenAI's API reference and the official client's
`openai.types.responses`, which the tests decode our output with."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

from dynamo import errors
from frontend.schemas import decode_struct, validation_error

# ---------------------------------------------------------------------------- content parts


class InputText(Struct, tag_field="type", tag="input_text", forbid_unknown_fields=True, omit_defaults=True):
    text: str


class OutputText(Struct, tag_field="type", tag="output_text", omit_defaults=False):
    text: str
    annotations: list[Any] = []
    logprobs: list[Any] = []


class Refusal(Struct, tag_field="type", tag="refusal", forbid_unknown_fields=True):
    refusal: str


class InputImage(Struct, tag_field="type", tag="input_image"):
    """Declared so that the refusal names it (convert.py): the models served take text only."""


class InputFile(Struct, tag_field="type", tag="input_file"):
    pass


class InputAudio(Struct, tag_field="type", tag="input_audio"):
    pass


ContentPart = InputText | OutputText | Refusal | InputImage | InputFile | InputAudio


class ReasoningText(Struct, tag_field="type", tag="reasoning_text"):
    text: str


class SummaryText(Struct, tag_field="type", tag="summary_text"):
    text: str


# ------------------------------------------------------------------------------------- items

ItemStatus = Literal["in_progress", "completed", "incomplete"]


class MessageItem(Struct, tag_field="type", tag="message", forbid_unknown_fields=True, omit_defaults=True):
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[ContentPart]
    id: str | None = None
    status: ItemStatus | None = None
    phase: str | None = None  # an assistant message's commentary/final_answer mark: kept, no effect


class FunctionCallItem(Struct, tag_field="type", tag="function_call", forbid_unknown_fields=True, omit_defaults=True):
    call_id: str
    name: str
    arguments: str
    id: str | None = None
    status: ItemStatus | None = None


class FunctionCallOutputItem(
    Struct, tag_field="type", tag="function_call_output", forbid_unknown_fields=True, omit_defaults=True
):
    call_id: str
    output: str | list[ContentPart]
    id: str | None = None
    status: ItemStatus | None = None


class ReasoningItem(Struct, tag_field="type", tag="reasoning", forbid_unknown_fields=True):
    """`summary` is always written (the client's type requires it), so no omit_defaults."""

    id: str | None = None
    summary: list[SummaryText] = []
    content: list[ReasoningText] | None = None
    encrypted_content: str | None = None  # refused (convert.py): this server never produces it
    status: ItemStatus | None = None


Item = MessageItem | FunctionCallItem | FunctionCallOutputItem | ReasoningItem

# Item types of OpenAI's that this server does not take, by name (so the refusal can say so).
_ITEM_DECODERS: dict[str, msgspec.json.Decoder[Any]] = {
    "message": msgspec.json.Decoder(MessageItem),
    "function_call": msgspec.json.Decoder(FunctionCallItem),
    "function_call_output": msgspec.json.Decoder(FunctionCallOutputItem),
    "reasoning": msgspec.json.Decoder(ReasoningItem),
}


class _ItemType(Struct):
    type: str = "message"  # an "easy" input message ({role, content}) has no type


# ------------------------------------------------------------------------------------ request


class FunctionToolSpec(Struct, forbid_unknown_fields=True, omit_defaults=True):
    """A tool of the request. Only `function` tools are served; the hosted tools (file_search,
    web_search, ...) are refused by name (convert.py)."""

    type: str
    name: str | None = None
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolChoiceObject(Struct, forbid_unknown_fields=True, omit_defaults=True):
    type: str
    name: str | None = None


class TextFormat(Struct, forbid_unknown_fields=True, omit_defaults=True):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    schema: dict[str, Any] | None = None
    description: str | None = None
    strict: bool | None = None


class TextConfig(Struct, forbid_unknown_fields=True, omit_defaults=True):
    format: TextFormat | None = None
    verbosity: str | None = None  # refused unless medium (convert.py)


class ReasoningConfig(Struct, forbid_unknown_fields=True, omit_defaults=True):
    effort: str | None = None
    summary: str | None = None
    generate_summary: str | None = None


class ResponsesRequest(Struct, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    model: str
    input: str | list[Item]
    instructions: str | None = None
    max_output_tokens: Annotated[int, Meta(ge=1)] | None = None
    temperature: Annotated[float, Meta(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Meta(gt=0.0, le=1.0)] | None = None
    tools: list[FunctionToolSpec] | None = None
    tool_choice: Literal["none", "auto", "required"] | ToolChoiceObject | None = None
    parallel_tool_calls: bool = True
    text: TextConfig | None = None
    reasoning: ReasoningConfig | None = None
    stream: bool = False
    store: bool = True
    previous_response_id: str | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    safety_identifier: str | None = None
    truncation: Literal["auto", "disabled"] | None = None
    service_tier: str | None = None
    # Refused when set (convert.py): declared so that the refusal says why.
    include: list[str] | None = None
    background: bool | None = None
    top_logprobs: int | None = None
    max_tool_calls: int | None = None
    prompt: Any = None
    prompt_cache_key: str | None = None
    conversation: Any = None
    stream_options: Any = None


class _RawInput(Struct):
    input: str | list[msgspec.Raw] | None = None


_RAW_INPUT = msgspec.json.Decoder(_RawInput)
_AT_PATH = re.compile(r" - at `\$")


def decode_responses_request(body: bytes) -> ResponsesRequest:
    """Parse a request; input items without a `type` are messages (OpenAI's "easy" form).
    Raises InvalidRequest naming the offending field (`input[2].content[0].type`, ...)."""
    raw = decode_struct(_RAW_INPUT, body)  # malformed JSON is reported here
    items: list[Item] | None = None
    if isinstance(raw.input, list):
        items = [_decode_item(i, r) for i, r in enumerate(raw.input)]
    # Everything but `input` is checked by the request Struct, with the items replaced by a
    # placeholder string (then put back): one pass of msgspec's own validation for the rest.
    data = msgspec.json.decode(body)
    if isinstance(data, dict) and items is not None:
        data["input"] = ""
    try:
        request = msgspec.convert(data, ResponsesRequest)
    except msgspec.ValidationError as exc:
        raise validation_error(str(exc)) from None
    if items is not None:
        request.input = items
    return request


def _decode_item(index: int, raw: msgspec.Raw) -> Item:
    param = f"input[{index}]"
    try:
        kind = msgspec.json.decode(raw, type=_ItemType).type
    except msgspec.ValidationError as exc:
        raise validation_error(_AT_PATH.sub(f" - at `$.{param}", str(exc))) from None
    decoder = _ITEM_DECODERS.get(kind)
    if decoder is None:
        raise errors.InvalidRequest(
            f"input item type {kind!r} is not supported; this server takes message, function_call, "
            "function_call_output and reasoning items",
            param=f"{param}.type",
        )
    try:
        item: Item = decoder.decode(raw)
    except msgspec.ValidationError as exc:
        text = str(exc)
        text = _AT_PATH.sub(f" - at `$.{param}", text) if _AT_PATH.search(text) else f"{text} - at `$.{param}`"
        raise validation_error(text) from None
    return item


# ----------------------------------------------------------------------------------- response


class InputTokensDetails(Struct):
    cached_tokens: int = 0
    cache_write_tokens: int = 0


class OutputTokensDetails(Struct):
    reasoning_tokens: int = 0


class ResponseUsage(Struct):
    input_tokens: int
    output_tokens: int
    total_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens_details: OutputTokensDetails


class ResponseError(Struct):
    code: str
    message: str


class IncompleteDetails(Struct):
    reason: str


class FunctionToolOut(Struct, tag_field="type", tag="function"):
    name: str
    description: str | None
    parameters: dict[str, Any] | None
    strict: bool | None


class ToolChoiceFunction(Struct, tag_field="type", tag="function"):
    name: str


class TextFormatOut(Struct, omit_defaults=True):
    type: str
    name: str | None = None
    schema: dict[str, Any] | None = None
    description: str | None = None
    strict: bool | None = None


class TextConfigOut(Struct):
    format: TextFormatOut


class ReasoningOut(Struct):
    effort: str | None = None
    summary: str | None = None


ResponseStatus = Literal["completed", "failed", "in_progress", "incomplete"]


class ResponseObject(Struct, kw_only=True):
    id: str
    created_at: int
    model: str
    status: ResponseStatus
    output: list[Item]
    tools: list[FunctionToolOut]
    tool_choice: str | ToolChoiceFunction
    parallel_tool_calls: bool
    text: TextConfigOut
    reasoning: ReasoningOut
    store: bool
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    previous_response_id: str | None = None
    metadata: dict[str, str] = {}
    user: str | None = None
    usage: ResponseUsage | None = None
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    truncation: str = "disabled"
    service_tier: str = "default"
    background: bool = False
    object: Literal["response"] = "response"


class DeletedResponse(Struct):
    id: str
    object: Literal["response.deleted"] = "response.deleted"
    deleted: bool = True


# -------------------------------------------------------------------------------------- store


class StoredResponse(Struct, kw_only=True):
    """What the store keeps of one response: the object GET returns, and the conversation a
    continuation starts from (every input item of the chain, without instructions, which
    OpenAI does not carry over)."""

    response: ResponseObject
    input: list[Item]
    expires_at_s: float  # wall-clock time after which the response is gone

    def conversation(self) -> list[Item]:
        """Input then output: what a request with previous_response_id continues."""
        return [*self.input, *self.response.output]
