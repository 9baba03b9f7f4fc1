"""Responses API request (plus the stored conversation it continues) -> the ChatCompletionRequest
the pipeline serves. Every field is carried over or refused with a 400 naming it:

- `instructions` -> a leading system message (not carried into continuations, as OpenAI does);
- message items -> messages (developer -> system; input_text/output_text/refusal parts joined;
  images, files and audio refused); function_call items -> the assistant message's tool_calls;
  function_call_output items -> tool messages; reasoning items -> the next assistant message's
  reasoning_content;
- function tools -> tools (hosted tools refused by their type); tool_choice;
  `text.format` -> response_format; max_output_tokens -> max_tokens; user / safety_identifier ->
  user; `metadata` is kept with the response (stored, returned), not sent to the model.

Reasoning: `reasoning.effort` "none" turns the template's thinking off; "medium" (OpenAI's
default) is the model's own reasoning and needs a model served with a reasoning parser; other
efforts are refused, because served models reason at one level (the chat route refuses
`reasoning_effort` for the same reason). `reasoning.summary` "auto" is accepted (no summarizer
here: reasoning comes back as reasoning_text content, never as a summary), others are refused.
"""

from __future__ import annotations

from dataclasses import dataclass

from dynamo import errors
from frontend.responses.schemas import (
    ContentPart,
    FunctionCallItem,
    FunctionCallOutputItem,
    InputAudio,
    InputFile,
    InputImage,
    InputText,
    Item,
    MessageItem,
    OutputText,
    ReasoningItem,
    Refusal,
    ResponsesRequest,
)
from frontend.schemas import (
    ChatCompletionRequest,
    ChatMessage,
    FunctionCallSpec,
    FunctionSpec,
    JsonSchemaSpec,
    MessageToolCall,
    NamedFunction,
    NamedToolChoice,
    ResponseFormat,
    Tool,
)
from frontend.schemas import ToolChoice as ChatToolChoice

# Efforts a served model can honour: "none" (thinking off) and "medium" (its own reasoning).
_EFFORTS = ("none", "medium")


@dataclass(frozen=True, slots=True)
class Converted:
    chat: ChatCompletionRequest
    # The whole conversation this response answers (previous input + output + this input),
    # without instructions: what the store keeps for a continuation.
    conversation: list[Item]


def to_chat_request(body: ResponsesRequest, previous: list[Item] | None, reasoning_parser: bool) -> Converted:
    """`previous`: the stored conversation of `previous_response_id` (input + output)."""
    _refuse_unsupported(body)
    new_items: list[Item] = (
        [MessageItem(role="user", content=body.input)] if isinstance(body.input, str) else list(body.input)
    )
    if not new_items or (isinstance(body.input, str) and not body.input):
        raise errors.InvalidRequest("input must not be empty", param="input")
    conversation = [*(previous or ()), *new_items]
    messages: list[ChatMessage] = []
    if body.instructions:
        messages.append(ChatMessage(role="system", content=body.instructions))
    offset = len(previous or ())
    messages.extend(to_chat_messages(conversation, offset))
    tools, tool_choice = _tools(body)
    chat = ChatCompletionRequest(
        model=body.model,
        messages=messages,
        max_tokens=body.max_output_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        stream=body.stream,
        user=body.user or body.safety_identifier,
        tools=tools,
        tool_choice=tool_choice,
        parallel_tool_calls=body.parallel_tool_calls,
        response_format=_response_format(body),
        chat_template_kwargs=_thinking(body, reasoning_parser),
    )
    return Converted(chat, conversation)


def _refuse_unsupported(body: ResponsesRequest) -> None:
    if body.include:
        raise errors.InvalidRequest(f"include {body.include} is not supported", param="include")
    if body.background:
        raise errors.InvalidRequest("background responses are not supported", param="background")
    if body.top_logprobs:
        raise errors.InvalidRequest("top_logprobs is not supported on /v1/responses", param="top_logprobs")
    if body.truncation == "auto":
        raise errors.InvalidRequest(
            "truncation=auto is not supported: a conversation longer than the context gets a 400", param="truncation"
        )
    if body.service_tier not in (None, "auto", "default"):
        raise errors.InvalidRequest(
            f"service_tier {body.service_tier!r} is not supported; this server has one tier (auto/default)",
            param="service_tier",
        )
    for name in ("max_tool_calls", "prompt", "prompt_cache_key", "conversation", "stream_options"):
        if getattr(body, name) is not None:
            raise errors.InvalidRequest(f"{name} is not supported by this server", param=name)
    if body.text is not None and body.text.verbosity not in (None, "medium"):
        raise errors.InvalidRequest(
            f"text.verbosity {body.text.verbosity!r} is not supported (served models have one verbosity)",
            param="text.verbosity",
        )


# ------------------------------------------------------------------------------------ messages


def to_chat_messages(items: list[Item], offset: int = 0) -> list[ChatMessage]:
    """Conversation items as chat messages. `offset`: how many leading items came from the
    store (error params count only the request's own items)."""
    out: list[ChatMessage] = []
    reasoning: list[str] = []  # of the next assistant turn

    def assistant() -> ChatMessage:
        """The assistant message function calls attach to: the last one if it is the turn's."""
        if out and out[-1].role == "assistant" and not reasoning:
            return out[-1]
        message = ChatMessage(role="assistant", content=None, reasoning_content="".join(reasoning) or None)
        reasoning.clear()
        out.append(message)
        return message

    for i, item in enumerate(items):
        param = f"input[{i - offset}]" if i >= offset else f"previous_response_id (item {i})"
        if isinstance(item, MessageItem):
            text = item.content if isinstance(item.content, str) else _parts(item.content, f"{param}.content")
            if item.role == "assistant":
                out.append(ChatMessage(role="assistant", content=text, reasoning_content="".join(reasoning) or None))
                reasoning.clear()
            else:
                out.append(ChatMessage(role="system" if item.role == "developer" else item.role, content=text))
        elif isinstance(item, FunctionCallItem):
            message = assistant()
            call = MessageToolCall(id=item.call_id, function=FunctionCallSpec(item.name, item.arguments))
            message.tool_calls = [*(message.tool_calls or ()), call]
        elif isinstance(item, FunctionCallOutputItem):
            text = item.output if isinstance(item.output, str) else _parts(item.output, f"{param}.output")
            out.append(ChatMessage(role="tool", content=text, tool_call_id=item.call_id))
        elif isinstance(item, ReasoningItem):
            if item.encrypted_content is not None:
                raise errors.InvalidRequest(
                    "encrypted reasoning is not supported: this server never produces it",
                    param=f"{param}.encrypted_content",
                )
            reasoning.extend(part.text for part in item.content or ())
    return out


def _parts(parts: list[ContentPart], param: str) -> str:
    texts: list[str] = []
    for j, part in enumerate(parts):
        if isinstance(part, (InputText, OutputText)):
            texts.append(part.text)
        elif isinstance(part, Refusal):
            texts.append(part.refusal)
        else:
            kind = {InputImage: "input_image", InputFile: "input_file", InputAudio: "input_audio"}[type(part)]
            raise errors.InvalidRequest(
                f"{kind} content is not supported: the models served here take text only", param=f"{param}[{j}].type"
            )
    return "".join(texts)


# --------------------------------------------------------------------------------------- tools


def _tools(body: ResponsesRequest) -> tuple[list[Tool] | None, ChatToolChoice | None]:
    tools: list[Tool] | None = None
    if body.tools is not None:
        tools = []
        for i, tool in enumerate(body.tools):
            if tool.type != "function":
                raise errors.InvalidRequest(
                    f"tool type {tool.type!r} is not supported; this server serves function tools only",
                    param=f"tools[{i}].type",
                )
            if not tool.name:
                raise errors.InvalidRequest(f"Missing required parameter `tools[{i}].name`", param=f"tools[{i}].name")
            tools.append(Tool(function=FunctionSpec(tool.name, tool.description, tool.parameters, tool.strict)))
    choice = body.tool_choice
    if choice is None or isinstance(choice, str):
        return tools, choice
    if choice.type != "function":
        raise errors.InvalidRequest(
            f"tool_choice of type {choice.type!r} is not supported; use none, auto, required or a function",
            param="tool_choice.type",
        )
    if not choice.name:
        raise errors.InvalidRequest("Missing required parameter `tool_choice.name`", param="tool_choice.name")
    return tools, NamedToolChoice(function=NamedFunction(choice.name))


# ------------------------------------------------------------------------ format and reasoning


def _response_format(body: ResponsesRequest) -> ResponseFormat | None:
    fmt = body.text.format if body.text is not None else None
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return ResponseFormat(type="json_object")
    if fmt.schema is None:
        raise errors.InvalidRequest("Missing required parameter `text.format.schema`", param="text.format.schema")
    if not fmt.name:
        raise errors.InvalidRequest("Missing required parameter `text.format.name`", param="text.format.name")
    return ResponseFormat(
        type="json_schema",
        json_schema=JsonSchemaSpec(name=fmt.name, description=fmt.description, schema=fmt.schema, strict=fmt.strict),
    )


def _thinking(body: ResponsesRequest, reasoning_parser: bool) -> dict[str, bool] | None:
    config = body.reasoning
    if config is None:
        return None
    for name in ("summary", "generate_summary"):
        value = getattr(config, name)
        if value not in (None, "auto"):
            raise errors.InvalidRequest(
                f"reasoning.{name} {value!r} is not supported: this server has no summarizer "
                "(reasoning is returned as reasoning_text content); use auto or leave it out",
                param=f"reasoning.{name}",
            )
    effort = config.effort
    if effort is None:
        return None
    if effort not in _EFFORTS:
        raise errors.InvalidRequest(
            f"reasoning.effort {effort!r} is not supported: served models reason at one level; "
            "use none (no thinking) or medium (the model's own reasoning)",
            param="reasoning.effort",
        )
    if effort == "none":
        return {"enable_thinking": False} if reasoning_parser else None
    if not reasoning_parser:
        raise errors.InvalidRequest(
            f"reasoning is not available for model {body.model!r}: it is served without a reasoning parser",
            param="reasoning.effort",
        )
    return {"enable_thinking": True}
