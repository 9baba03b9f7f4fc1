"""A Generation as a Responses API `response` object, or as its stream of events: each with a
`sequence_number`, as `event: <type>` / `data: <json>` lines.

Output items come in the order the model produced them: a reasoning item (reasoning_text
content), a message (one output_text part), then one function_call item per tool call. A stream
is `response.created`, `response.in_progress`, per item `response.output_item.added`, its
content/argument events and `response.output_item.done`, then `response.completed` (or
`response.incomplete` when max_output_tokens cut it, `response.failed` on an error)."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgspec
from msgspec import Struct

from dynamo import errors
from frontend.errors import error_info
from frontend.outputs import ChoiceDelta, ChoiceResult, Generation
from frontend.responses.schemas import (
    FunctionCallItem,
    FunctionToolOut,
    IncompleteDetails,
    InputTokensDetails,
    Item,
    ItemStatus,
    MessageItem,
    OutputText,
    OutputTokensDetails,
    ReasoningItem,
    ReasoningOut,
    ReasoningText,
    ResponseError,
    ResponseObject,
    ResponsesRequest,
    ResponseUsage,
    TextConfigOut,
    TextFormatOut,
    ToolChoiceFunction,
)
from frontend.schemas import Usage

log = logging.getLogger(__name__)

_encode = msgspec.json.encode
_replace = msgspec.structs.replace

CountTokens = Callable[[str], int]
OnDone = Callable[[ResponseObject], Awaitable[None]]


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def base_response(body: ResponsesRequest, response_id: str, model: str) -> ResponseObject:
    """The response as created: the request's settings, no output yet."""
    tools = [
        FunctionToolOut(t.name or "", t.description, t.parameters, t.strict) for t in body.tools or ()
    ]
    choice = body.tool_choice
    fmt = body.text.format if body.text is not None else None
    text = TextConfigOut(
        TextFormatOut("text")
        if fmt is None
        else TextFormatOut(fmt.type, fmt.name, fmt.schema, fmt.description, fmt.strict)
    )
    reasoning = body.reasoning
    return ResponseObject(
        id=response_id,
        created_at=int(time.time()),
        model=model,
        status="in_progress",
        output=[],
        tools=tools,
        tool_choice=("auto" if choice is None else choice if isinstance(choice, str) else ToolChoiceFunction(choice.name or "")),
        parallel_tool_calls=body.parallel_tool_calls,
        text=text,
        reasoning=ReasoningOut(reasoning.effort, reasoning.summary) if reasoning is not None else ReasoningOut(),
        store=body.store,
        instructions=body.instructions,
        max_output_tokens=body.max_output_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        previous_response_id=body.previous_response_id,
        metadata=dict(body.metadata or {}),
        user=body.user,
    )


def response_usage(usage: Usage, reasoning_tokens: int) -> ResponseUsage:
    cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details is not None else 0
    return ResponseUsage(
        input_tokens=usage.prompt_tokens,
        output_tokens=usage.completion_tokens,
        total_tokens=usage.prompt_tokens + usage.completion_tokens,
        input_tokens_details=InputTokensDetails(cached_tokens=cached),
        output_tokens_details=OutputTokensDetails(reasoning_tokens=reasoning_tokens),
    )


def finished(base: ResponseObject, output: list[Item], usage: ResponseUsage, finish_reason: str) -> ResponseObject:
    truncated = finish_reason == "length"
    return _replace(
        base,
        status="incomplete" if truncated else "completed",
        output=output,
        usage=usage,
        incomplete_details=IncompleteDetails("max_output_tokens") if truncated else None,
    )


def failed(base: ResponseObject, output: list[Item], exc: BaseException) -> ResponseObject:
    _, info = error_info(exc)
    return _replace(base, status="failed", output=output, error=ResponseError(info.code or info.type, info.message))


# ------------------------------------------------------------------------------ non-streaming


def output_items(result: ChoiceResult) -> list[Item]:
    items: list[Item] = []
    if result.reasoning:
        items.append(ReasoningItem(id=new_id("rs"), content=[ReasoningText(result.reasoning)], status="completed"))
    if result.content or not (result.reasoning or result.tool_calls):
        status: ItemStatus = "incomplete" if result.finish_reason == "length" else "completed"
        items.append(MessageItem(role="assistant", content=[OutputText(result.content)], id=new_id("msg"), status=status))
    for call in result.tool_calls:
        items.append(
            FunctionCallItem(
                call_id=call.id, name=call.function.name, arguments=call.function.arguments,
                id=new_id("fc"), status="completed",
            )
        )
    return items


def response_object(base: ResponseObject, result: ChoiceResult, usage: Usage, count_tokens: CountTokens) -> ResponseObject:
    reasoning_tokens = count_tokens(result.reasoning) if result.reasoning else 0
    return finished(base, output_items(result), response_usage(usage, reasoning_tokens), result.finish_reason)


# ------------------------------------------------------------------------------------- events


class LifecycleEvent(Struct):
    type: str
    sequence_number: int
    response: ResponseObject


class OutputItemEvent(Struct):
    type: str
    sequence_number: int
    output_index: int
    item: Item


class ContentPartEvent(Struct):
    type: str
    sequence_number: int
    item_id: str
    output_index: int
    content_index: int
    part: OutputText | ReasoningText


class TextDeltaEvent(Struct):
    type: str
    sequence_number: int
    item_id: str
    output_index: int
    content_index: int
    delta: str
    logprobs: list[Any] = []


class TextDoneEvent(Struct):
    type: str
    sequence_number: int
    item_id: str
    output_index: int
    content_index: int
    text: str
    logprobs: list[Any] = []


class ReasoningDeltaEvent(Struct):
    type: str
    sequence_number: int
    item_id: str
    output_index: int
    content_index: int
    delta: str


class ReasoningDoneEvent(Struct):
    type: str
    sequence_number: int
    item_id: str
    output_index: int
    content_index: int
    text: str


class ArgumentsDeltaEvent(Struct):
    type: str
    sequence_number: int
    item_id: str
    output_index: int
    delta: str


class ArgumentsDoneEvent(Struct):
    type: str
    sequence_number: int
    item_id: str
    output_index: int
    arguments: str
    name: str


class _Open:
    """An output item being streamed."""

    __slots__ = ("kind", "id", "output_index", "parts", "call_id", "name")

    def __init__(self, kind: str, item_id: str, output_index: int, call_id: str = "", name: str = "") -> None:
        self.kind = kind  # "reasoning", "message" or "call"
        self.id = item_id
        self.output_index = output_index
        self.parts: list[str] = []
        self.call_id = call_id
        self.name = name


class ResponseStream:
    """The state of one streamed response: the sequence number, the open items, and the
    items already done (the final response's output). `feed` turns one delta into events."""

    def __init__(self, base: ResponseObject) -> None:
        self.base = base
        self.sequence = 0
        self.output: list[Item | None] = []  # by output_index; None while the item is open
        self._text: _Open | None = None  # the open reasoning or message item
        self._calls: dict[int, _Open] = {}  # open function calls by tool call index
        self.reasoning = ""

    def _event(self, struct_type: type[Struct], kind: str, **fields: Any) -> bytes:
        event = struct_type(type=kind, sequence_number=self.sequence, **fields)
        self.sequence += 1
        return b"event: " + kind.encode() + b"\ndata: " + _encode(event) + b"\n\n"

    def start(self) -> bytes:
        return self._event(LifecycleEvent, "response.created", response=self.base) + self._event(
            LifecycleEvent, "response.in_progress", response=self.base
        )

    def _add(self, item: Item, open_item: _Open, out: list[bytes]) -> None:
        self.output.append(None)
        out.append(self._event(OutputItemEvent, "response.output_item.added", output_index=open_item.output_index, item=item))

    def _open_text(self, kind: str, out: list[bytes]) -> _Open:
        current = self._text
        if current is not None and current.kind == kind:
            return current
        self._close_text(out, "completed")
        self._close_calls(out)
        prefix = "rs" if kind == "reasoning" else "msg"
        opened = _Open(kind, new_id(prefix), len(self.output))
        if kind == "reasoning":
            item: Item = ReasoningItem(id=opened.id, content=[], status="in_progress")
            part: OutputText | ReasoningText = ReasoningText("")
        else:
            item = MessageItem(role="assistant", content=[], id=opened.id, status="in_progress")
            part = OutputText("")
        self._add(item, opened, out)
        out.append(
            self._event(
                ContentPartEvent, "response.content_part.added",
                item_id=opened.id, output_index=opened.output_index, content_index=0, part=part,
            )
        )
        self._text = opened
        return opened

    def _close_text(self, out: list[bytes], status: ItemStatus) -> None:
        current, self._text = self._text, None
        if current is None:
            return
        text = "".join(current.parts)
        where = {"item_id": current.id, "output_index": current.output_index, "content_index": 0}
        if current.kind == "reasoning":
            out.append(self._event(ReasoningDoneEvent, "response.reasoning_text.done", text=text, **where))
            part: OutputText | ReasoningText = ReasoningText(text)
            item: Item = ReasoningItem(id=current.id, content=[ReasoningText(text)], status="completed")
        else:
            out.append(self._event(TextDoneEvent, "response.output_text.done", text=text, **where))
            part = OutputText(text)
            item = MessageItem(role="assistant", content=[OutputText(text)], id=current.id, status=status)
        out.append(self._event(ContentPartEvent, "response.content_part.done", part=part, **where))
        out.append(self._event(OutputItemEvent, "response.output_item.done", output_index=current.output_index, item=item))
        self.output[current.output_index] = item

    def _close_calls(self, out: list[bytes]) -> None:
        for call in self._calls.values():
            arguments = "".join(call.parts)
            out.append(
                self._event(
                    ArgumentsDoneEvent, "response.function_call_arguments.done",
                    item_id=call.id, output_index=call.output_index, arguments=arguments, name=call.name,
                )
            )
            item = FunctionCallItem(call_id=call.call_id, name=call.name, arguments=arguments, id=call.id, status="completed")
            out.append(self._event(OutputItemEvent, "response.output_item.done", output_index=call.output_index, item=item))
            self.output[call.output_index] = item
        self._calls.clear()

    def feed(self, delta: ChoiceDelta, out: list[bytes]) -> None:
        if delta.reasoning:
            item = self._open_text("reasoning", out)
            item.parts.append(delta.reasoning)
            self.reasoning += delta.reasoning
            out.append(
                self._event(
                    ReasoningDeltaEvent, "response.reasoning_text.delta",
                    item_id=item.id, output_index=item.output_index, content_index=0, delta=delta.reasoning,
                )
            )
        if delta.content:
            item = self._open_text("message", out)
            item.parts.append(delta.content)
            out.append(
                self._event(
                    TextDeltaEvent, "response.output_text.delta",
                    item_id=item.id, output_index=item.output_index, content_index=0, delta=delta.content,
                )
            )
        for fragment in delta.tool_calls:
            call = self._calls.get(fragment.index)
            if call is None:
                self._close_text(out, "completed")
                call = _Open("call", new_id("fc"), len(self.output), fragment.id or "", fragment.name or "")
                self._calls[fragment.index] = call
                added = FunctionCallItem(call_id=call.call_id, name=call.name, arguments="", id=call.id, status="in_progress")
                self._add(added, call, out)
            if fragment.arguments:
                call.parts.append(fragment.arguments)
                out.append(
                    self._event(
                        ArgumentsDeltaEvent, "response.function_call_arguments.delta",
                        item_id=call.id, output_index=call.output_index, delta=fragment.arguments,
                    )
                )

    def finish(self, finish_reason: str, usage: ResponseUsage, out: list[bytes]) -> ResponseObject:
        if not self.output:  # nothing generated: still one (empty) message
            self._open_text("message", out)
        self._close_text(out, "incomplete" if finish_reason == "length" else "completed")
        self._close_calls(out)
        return finished(self.base, [i for i in self.output if i is not None], usage, finish_reason)

    def final_event(self, response: ResponseObject) -> bytes:
        kind = {"completed": "response.completed", "incomplete": "response.incomplete"}.get(
            response.status, "response.failed"
        )
        return self._event(LifecycleEvent, kind, response=response)

    def fail(self, exc: BaseException) -> bytes:
        return self.final_event(failed(self.base, [i for i in self.output if i is not None], exc))


async def response_events(
    generation: Generation, base: ResponseObject, count_tokens: CountTokens, on_done: OnDone
) -> AsyncIterator[bytes]:
    """The SSE bytes of a streamed response, one write per burst. `on_done(response)` runs
    before the final event goes out (the store write: a client that continues at once finds
    it). Closing the iterator early closes the generation's bursts, cancelling the work."""
    stream = ResponseStream(base)
    out: list[bytes] = [stream.start()]
    bursts = generation.bursts()
    try:
        async for burst in bursts:
            for delta in burst:
                if delta.index != 0:
                    continue  # the Responses API has no `n`: the request asked for one choice
                stream.feed(delta, out)
                if delta.finish_reason is not None:
                    reasoning_tokens = count_tokens(stream.reasoning) if stream.reasoning else 0
                    usage = response_usage(generation.usage(), reasoning_tokens)
                    response = stream.finish(delta.finish_reason, usage, out)
                    await on_done(response)
                    out.append(stream.final_event(response))
            if out:
                yield b"".join(out)
                out.clear()
    except errors.DynamoError as exc:
        log.warning("response %s failed mid-stream: %s", base.id, exc.message)
        out.append(stream.fail(exc))
        yield b"".join(out)
    finally:
        await bursts.aclose()  # type: ignore[attr-defined]
