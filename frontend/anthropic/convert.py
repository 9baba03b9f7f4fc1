"""Anthropic Messages request -> the ChatCompletionRequest the pipeline serves. Every field is
carried over or refused with a 400 naming it:

- `system` and `role: "system"` messages -> system messages; text blocks of a message are joined;
- `tool_use` blocks -> the assistant message's `tool_calls` (input as JSON text); `tool_result`
  blocks -> `tool` messages (is_error: the content is prefixed with "Error: "), in block order;
- `thinking` blocks of earlier turns -> `reasoning_content`;
- `tools` -> function tools; `tool_choice` auto/any/tool/none -> auto/required/named/none,
  `disable_parallel_tool_use` -> parallel_tool_calls=false;
- `thinking` enabled/adaptive -> only for a model served with a reasoning parser (else 400), and
  the template's `enable_thinking`; disabled -> enable_thinking=false;
- `output_config.format` (JSON schema) -> response_format json_schema;
- `metadata.user_id` -> user; stop_sequences -> stop; cache_control is accepted everywhere:
  prefix caching here is automatic, no breakpoint is needed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from dynamo import errors
from frontend.anthropic.schemas import (
    ContentBlock,
    CountTokensRequest,
    DocumentBlock,
    ImageBlock,
    InputMessage,
    MessagesRequest,
    RedactedThinkingBlock,
    TextBlock,
    ThinkingBlock,
    ToolChoice,
    ToolResultBlock,
    ToolSpec,
    ToolUseBlock,
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

# Anthropic asks for budget_tokens >= 1024; served models may have less context than that, so
# only Anthropic's other rule (budget below max_tokens) is kept.
MIN_THINKING_BUDGET_TOKENS = 1
# The chat schema's limit on stop strings (OpenAI's); Anthropic allows more, this server does not.
MAX_STOP_SEQUENCES = 4


@dataclass(frozen=True, slots=True)
class Converted:
    chat: ChatCompletionRequest
    # thinking.display == "omitted": thinking blocks are sent without their text.
    omit_thinking: bool = False


def to_chat_request(body: MessagesRequest, reasoning_parser: bool) -> Converted:
    """`reasoning_parser`: whether the model is served with one (thinking can be separated)."""
    for name in ("service_tier", "container", "mcp_servers", "context_management"):
        if getattr(body, name) is not None:
            raise errors.InvalidRequest(f"`{name}` is not supported by this server", param=name)
    stop = body.stop_sequences
    if stop is not None:
        if len(stop) > MAX_STOP_SEQUENCES:
            raise errors.InvalidRequest(
                f"at most {MAX_STOP_SEQUENCES} stop_sequences are supported, got {len(stop)}", param="stop_sequences"
            )
        if any(not s for s in stop):
            raise errors.InvalidRequest("stop_sequences must not be empty strings", param="stop_sequences")
    template_kwargs, omit_thinking = _thinking(body, reasoning_parser)
    tools, tool_choice, parallel = _tools(body.tools, body.tool_choice)
    chat = ChatCompletionRequest(
        model=body.model,
        messages=to_chat_messages(body.system, body.messages),
        max_tokens=body.max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        stop=list(stop) if stop else None,
        stream=body.stream,
        user=body.metadata.user_id if body.metadata is not None else None,
        tools=tools,
        tool_choice=tool_choice,
        parallel_tool_calls=parallel,
        response_format=_response_format(body),
        chat_template_kwargs=template_kwargs,
    )
    return Converted(chat, omit_thinking)


def count_tokens_request(body: CountTokensRequest, reasoning_parser: bool) -> ChatCompletionRequest:
    """The chat request whose prompt count_tokens counts (max_tokens is irrelevant there)."""
    full = MessagesRequest(
        model=body.model,
        max_tokens=1 << 30,
        messages=body.messages,
        system=body.system,
        tools=body.tools,
        tool_choice=body.tool_choice,
        thinking=body.thinking,
        output_config=body.output_config,
    )
    return to_chat_request(full, reasoning_parser).chat


# ------------------------------------------------------------------------------------ messages


def to_chat_messages(system: str | list[TextBlock] | None, messages: list[InputMessage]) -> list[ChatMessage]:
    out: list[ChatMessage] = []
    if system is not None:
        text = system if isinstance(system, str) else _texts(system, "system")
        out.append(ChatMessage(role="system", content=text))
    for i, message in enumerate(messages):
        param = f"messages[{i}]"
        content = message.content
        if isinstance(content, str):
            out.append(ChatMessage(role=message.role, content=content))
        elif message.role == "assistant":
            out.append(_assistant(content, param))
        else:
            out.extend(_user(message.role, content, param))
    return out


def _assistant(blocks: list[ContentBlock], param: str) -> ChatMessage:
    texts: list[str] = []
    thinking: list[str] = []
    calls: list[MessageToolCall] = []
    for j, block in enumerate(blocks):
        where = f"{param}.content[{j}]"
        if isinstance(block, TextBlock):
            _check_citations(block, where)
            texts.append(block.text)
        elif isinstance(block, ThinkingBlock):
            thinking.append(block.thinking)
        elif isinstance(block, ToolUseBlock):
            calls.append(MessageToolCall(id=block.id, function=FunctionCallSpec(block.name, json.dumps(block.input))))
        else:
            _refuse_block(block, where, "an assistant message")
    return ChatMessage(
        role="assistant",
        content="".join(texts) if texts or not calls else None,
        tool_calls=calls or None,
        reasoning_content="".join(thinking) if thinking else None,
    )


def _user(role: str, blocks: list[ContentBlock], param: str) -> list[ChatMessage]:
    """Text runs become user (or system) messages and tool results tool messages, in order."""
    out: list[ChatMessage] = []
    texts: list[str] = []

    def flush() -> None:
        if texts:
            out.append(ChatMessage(role=role, content="".join(texts)))  # type: ignore[arg-type]
            texts.clear()

    for j, block in enumerate(blocks):
        where = f"{param}.content[{j}]"
        if isinstance(block, TextBlock):
            _check_citations(block, where)
            texts.append(block.text)
        elif isinstance(block, ToolResultBlock) and role == "user":
            flush()
            content = block.content
            if content is None:
                text = ""
            elif isinstance(content, str):
                text = content
            else:
                text = _texts(content, f"{where}.content")
            if block.is_error:
                text = f"Error: {text}"
            out.append(ChatMessage(role="tool", content=text, tool_call_id=block.tool_use_id))
        else:
            _refuse_block(block, where, f"a {role} message")
    flush()
    return out


def _texts(blocks: list[TextBlock] | list[TextBlock | ImageBlock | DocumentBlock], param: str) -> str:
    texts: list[str] = []
    for j, block in enumerate(blocks):
        if not isinstance(block, TextBlock):
            _refuse_block(block, f"{param}[{j}]", "this place")
        else:
            _check_citations(block, f"{param}[{j}]")
            texts.append(block.text)
    return "\n".join(texts)


def _check_citations(block: TextBlock, param: str) -> None:
    if block.citations:
        raise errors.InvalidRequest("citations in text blocks are not supported", param=f"{param}.citations")


def _refuse_block(block: object, param: str, place: str) -> None:
    if isinstance(block, ImageBlock):
        message = "image content blocks are not supported: the models served here take text only"
    elif isinstance(block, DocumentBlock):
        message = "document content blocks are not supported: send the document's text in a text block"
    elif isinstance(block, RedactedThinkingBlock):
        message = "redacted_thinking blocks are not supported: this server never produces them"
    else:
        kind = type(block).__struct_config__.tag  # type: ignore[attr-defined]
        message = f"a {kind} content block is not allowed in {place}"
    raise errors.InvalidRequest(message, param=f"{param}.type")


# --------------------------------------------------------------------------------------- tools


def _tools(
    tools: list[ToolSpec] | None, choice: ToolChoice | None
) -> tuple[list[Tool] | None, ChatToolChoice | None, bool]:
    out: list[Tool] | None = None
    if tools is not None:
        out = []
        for i, tool in enumerate(tools):
            if tool.type not in (None, "custom"):
                raise errors.InvalidRequest(
                    f"tool type {tool.type!r} is a server tool, which this server does not run; "
                    "only client tools (name, description, input_schema) are supported",
                    param=f"tools[{i}].type",
                )
            if tool.input_schema is None:
                raise errors.InvalidRequest(
                    f"Missing required parameter `tools[{i}].input_schema`", param=f"tools[{i}].input_schema"
                )
            out.append(
                Tool(function=FunctionSpec(tool.name, tool.description, tool.input_schema, tool.strict))
            )
    if choice is None:
        return out, None, True
    parallel = not choice.disable_parallel_tool_use
    if choice.type == "tool":
        if not choice.name:
            raise errors.InvalidRequest("tool_choice of type `tool` needs a `name`", param="tool_choice.name")
        return out, NamedToolChoice(function=NamedFunction(choice.name)), parallel
    if choice.name is not None:
        raise errors.InvalidRequest(
            f"tool_choice.name is only allowed with type `tool`, not {choice.type!r}", param="tool_choice.name"
        )
    mapped = {"auto": "auto", "any": "required", "none": "none"}[choice.type]
    return out, mapped, parallel  # type: ignore[return-value]


# ------------------------------------------------------------------------- thinking and output


def _thinking(body: MessagesRequest, reasoning_parser: bool) -> tuple[dict[str, bool] | None, bool]:
    thinking = body.thinking
    if thinking is None:
        return None, False
    if thinking.type == "disabled":
        if thinking.budget_tokens is not None or thinking.display is not None:
            raise errors.InvalidRequest("disabled thinking takes no budget_tokens or display", param="thinking")
        # A model without a reasoning parser has no thinking to turn off.
        return ({"enable_thinking": False} if reasoning_parser else None), False
    if not reasoning_parser:
        raise errors.InvalidRequest(
            f"thinking is not available for model {body.model!r}: it is served without a reasoning parser",
            param="thinking",
        )
    if thinking.type == "enabled":
        budget = thinking.budget_tokens
        if budget is None:
            raise errors.InvalidRequest(
                "Missing required parameter `thinking.budget_tokens`", param="thinking.budget_tokens"
            )
        if budget < MIN_THINKING_BUDGET_TOKENS or budget >= body.max_tokens:
            raise errors.InvalidRequest(
                f"thinking.budget_tokens must be at least {MIN_THINKING_BUDGET_TOKENS} and less than "
                f"max_tokens ({body.max_tokens}), got {budget}",
                param="thinking.budget_tokens",
            )
    elif thinking.budget_tokens is not None:
        raise errors.InvalidRequest("adaptive thinking takes no budget_tokens", param="thinking.budget_tokens")
    return {"enable_thinking": True}, thinking.display == "omitted"


def _response_format(body: MessagesRequest) -> ResponseFormat | None:
    config = body.output_config
    if config is None:
        return None
    if config.effort is not None:
        raise errors.InvalidRequest("output_config.effort is not supported", param="output_config.effort")
    if config.format is None:
        return None
    return ResponseFormat(
        type="json_schema", json_schema=JsonSchemaSpec(name="output", schema=config.format.schema, strict=True)
    )
