"""A Generation as Anthropic Messages output: the `message` body, or the stream of named events
(`message_start`, `content_block_start`, `ping`, `content_block_delta`, `content_block_stop`,
`message_delta`, `message_stop`; `error` when the generation fails mid-stream).

Content blocks come in the order the model produced them: thinking (reasoning), text, then one
tool_use block per tool call."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator

import msgspec

from dynamo import errors
from frontend.anthropic.errors import error_detail
from frontend.anthropic.schemas import (
    ContentBlockDelta,
    ContentBlockStart,
    ContentBlockStop,
    ErrorBody,
    InputJsonDelta,
    Message,
    MessageDelta,
    MessageStart,
    MessageStop,
    MessageUsage,
    OutBlock,
    OutText,
    OutThinking,
    OutToolUse,
    Ping,
    StopDelta,
    TextDelta,
    ThinkingDelta,
)
from frontend.outputs import ChoiceDelta, ChoiceResult, Generation
from frontend.schemas import Usage

log = logging.getLogger(__name__)

_encode = msgspec.json.encode


def message_id(response_id: str) -> str:
    """`msg_<hex>` from the generation's id (whatever its own prefix)."""
    return "msg_" + response_id.rsplit("-", 1)[-1]


def stop_reason(finish_reason: str, stop_sequence: str | None, has_tool_calls: bool) -> str:
    if finish_reason == "length":
        return "max_tokens"
    if finish_reason == "tool_calls" or has_tool_calls:
        return "tool_use"
    if stop_sequence is not None:
        return "stop_sequence"
    return "end_turn"


def message_usage(usage: Usage, completion_tokens: int | None = None) -> MessageUsage:
    cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details is not None else 0
    return MessageUsage(
        input_tokens=usage.prompt_tokens - cached,
        output_tokens=usage.completion_tokens if completion_tokens is None else completion_tokens,
        cache_read_input_tokens=cached,
    )


def tool_input(arguments: str, truncated: bool) -> dict[str, object]:
    """A tool call's arguments as the JSON object Anthropic's `input` is. A call cut off by
    max_tokens keeps `{}` (stop_reason max_tokens says why); otherwise non-object arguments
    are the engine's failure, not something to pass on as if valid."""
    try:
        value = json.loads(arguments) if arguments.strip() else {}
    except ValueError:
        value = None
    if isinstance(value, dict):
        return value
    if truncated:
        return {}
    raise errors.EngineError(f"the model produced tool call arguments that are not a JSON object: {arguments[:200]!r}")


# ------------------------------------------------------------------------------ non-streaming


def message_body(generation: Generation, result: ChoiceResult, usage: Usage, omit_thinking: bool = False) -> bytes:
    blocks: list[OutBlock] = []
    if result.reasoning:
        blocks.append(OutThinking(thinking="" if omit_thinking else result.reasoning))
    if result.content or not (result.reasoning or result.tool_calls):
        blocks.append(OutText(result.content))
    truncated = result.finish_reason == "length"
    for call in result.tool_calls:
        blocks.append(OutToolUse(call.id, call.function.name, tool_input(call.function.arguments, truncated)))
    message = Message(
        id=message_id(generation.response_id),
        model=generation.model,
        content=blocks,
        stop_reason=stop_reason(result.finish_reason, result.stop_sequence, bool(result.tool_calls)),
        stop_sequence=result.stop_sequence,
        usage=message_usage(usage),
    )
    return _encode(message)


# ---------------------------------------------------------------------------------- streaming


def sse(name: bytes, payload: msgspec.Struct) -> bytes:
    return b"event: " + name + b"\ndata: " + _encode(payload) + b"\n\n"


_PING = sse(b"ping", Ping())
_TEXT, _THINKING = "text", "thinking"


class MessageStream:
    """The state of one streamed message: which content block is open, and the index of the
    block each tool call went to. `feed` turns one delta into the events it causes."""

    __slots__ = ("omit_thinking", "_next_index", "_open", "_open_index", "_tool_blocks", "_pinged", "_has_tools")

    def __init__(self, omit_thinking: bool = False) -> None:
        self.omit_thinking = omit_thinking
        self._next_index = 0
        self._open: str | None = None  # "text", "thinking", or "tool:<call index>"
        self._open_index = -1
        self._tool_blocks: dict[int, int] = {}  # tool call index -> content block index
        self._pinged = False
        self._has_tools = False

    def start(self, message_id: str, model: str, usage: Usage) -> bytes:
        message = Message(
            id=message_id,
            model=model,
            content=[],
            stop_reason=None,
            stop_sequence=None,
            usage=message_usage(usage, completion_tokens=0),
        )
        return sse(b"message_start", MessageStart(message))

    def _begin(self, kind: str, block: OutBlock, out: list[bytes]) -> int:
        self._close(out)
        index = self._next_index
        self._next_index += 1
        self._open, self._open_index = kind, index
        out.append(sse(b"content_block_start", ContentBlockStart(index, block)))
        if not self._pinged:
            out.append(_PING)
            self._pinged = True
        return index

    def _close(self, out: list[bytes]) -> None:
        if self._open is not None:
            out.append(sse(b"content_block_stop", ContentBlockStop(self._open_index)))
            self._open = None

    def feed(self, delta: ChoiceDelta, out: list[bytes]) -> None:
        if delta.reasoning:
            if self._open != _THINKING:
                self._begin(_THINKING, OutThinking(""), out)
            if not self.omit_thinking:
                out.append(sse(b"content_block_delta", ContentBlockDelta(self._open_index, ThinkingDelta(delta.reasoning))))
        if delta.content:
            if self._open != _TEXT:
                self._begin(_TEXT, OutText(""), out)
            out.append(sse(b"content_block_delta", ContentBlockDelta(self._open_index, TextDelta(delta.content))))
        for call in delta.tool_calls:
            self._has_tools = True
            index = self._tool_blocks.get(call.index)
            if index is None:
                index = self._begin(f"tool:{call.index}", OutToolUse(call.id or "", call.name or "", {}), out)
                self._tool_blocks[call.index] = index
            if call.arguments:
                # A late fragment of an earlier call goes to that call's block: clients
                # accumulate by block index.
                out.append(sse(b"content_block_delta", ContentBlockDelta(index, InputJsonDelta(call.arguments))))

    def finish(self, delta: ChoiceDelta, usage: Usage, out: list[bytes]) -> None:
        if self._next_index == 0:  # nothing generated: still one (empty) text block
            self._begin(_TEXT, OutText(""), out)
        self._close(out)
        assert delta.finish_reason is not None
        reason = stop_reason(delta.finish_reason, delta.stop_sequence, self._has_tools)
        out.append(sse(b"message_delta", MessageDelta(StopDelta(reason, delta.stop_sequence), message_usage(usage))))
        out.append(sse(b"message_stop", MessageStop()))


def error_event(exc: BaseException) -> bytes:
    _, detail = error_detail(exc)
    return sse(b"error", ErrorBody(detail))


async def message_events(generation: Generation, omit_thinking: bool = False) -> AsyncIterator[bytes]:
    """The SSE bytes of a streamed message, one write per burst. Closing it early closes the
    generation's bursts, which cancels the work on the worker."""
    stream = MessageStream(omit_thinking)
    out: list[bytes] = [stream.start(message_id(generation.response_id), generation.model, generation.usage())]
    bursts = generation.bursts()
    try:
        async for burst in bursts:
            for delta in burst:
                if delta.index != 0:
                    continue  # Anthropic has no `n`: the request asked for one choice
                stream.feed(delta, out)
                if delta.finish_reason is not None:
                    stream.finish(delta, generation.usage(), out)
            if out:
                yield b"".join(out)
                out.clear()
    except errors.DynamoError as exc:
        log.warning("anthropic message %s failed mid-stream: %s", generation.response_id, exc.message)
        out.append(error_event(exc))
        yield b"".join(out)
    finally:
        await bursts.aclose()  # type: ignore[attr-defined]
