"""POST /tokenize and POST /detokenize as vLLM names them: a prompt (or chat messages, through
the model's chat template) in, token ids out with the count and the model's context length;
token ids in, text out. Also the prompt counting Anthropic's count_tokens uses."""

from __future__ import annotations

from typing import Any

import msgspec
from fastapi import FastAPI
from msgspec import Struct
from starlette.routing import Route

from dynamo import errors
from frontend.config import FrontendConfig
from frontend.errors import http_error
from frontend.models import ModelManager, ServedModel
from frontend.preprocess import function_dict
from frontend.endpoint import ApiEndpoint, JsonReply, Reply
from frontend.schemas import ApiOperation, ChatMessage, TokenId, Tool, decode_struct
from frontend.tokenizer import ModelTokenizer

_encode = msgspec.json.encode

# ------------------------------------------------------------------------------------ schemas


class TokenizeCompletionRequest(Struct, kw_only=True, forbid_unknown_fields=True):
    prompt: str
    model: str | None = None  # optional, as in vLLM: the one model served
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeChatRequest(Struct, kw_only=True, forbid_unknown_fields=True):
    messages: list[ChatMessage]
    model: str | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    # The template already spells BOS and other special tokens (vLLM's default for chat).
    add_special_tokens: bool = False
    return_token_strs: bool = False
    tools: list[Tool] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    # Refused when set: declared so that the refusal says why.
    chat_template: str | None = None
    mm_processor_kwargs: Any = None


class TokenizeResponse(Struct, omit_defaults=True):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(Struct, kw_only=True, forbid_unknown_fields=True):
    tokens: list[TokenId]
    model: str | None = None


class DetokenizeResponse(Struct):
    prompt: str


class _Kind(Struct):
    """Which request this is: a body with `messages` is the chat form."""

    messages: Any = None


_KIND = msgspec.json.Decoder(_Kind)
_PROMPT = msgspec.json.Decoder(TokenizeCompletionRequest)
_CHAT = msgspec.json.Decoder(TokenizeChatRequest)
_DETOKENIZE = msgspec.json.Decoder(DetokenizeRequest)


# ------------------------------------------------------------------------------------ prompts


def tool_dicts(tools: list[Tool] | None) -> list[dict[str, Any]] | None:
    """Tools as chat templates take them (the same dicts the chat route renders)."""
    if not tools:
        return None
    return [{"type": "function", "function": function_dict(t)} for t in tools]


def chat_prompt_ids(
    tokenizer: ModelTokenizer,
    messages: list[ChatMessage],
    *,
    tools: list[dict[str, Any]] | None = None,
    template_kwargs: dict[str, Any] | None = None,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    add_special_tokens: bool = False,
) -> list[int]:
    """The token ids of a conversation rendered by the model's chat template. With
    `continue_final_message` the prompt ends inside the last message (transformers' rule: cut
    after its content), so the model continues it."""
    if continue_final_message:
        if add_generation_prompt:
            raise errors.InvalidRequest(
                "continue_final_message and add_generation_prompt cannot both be true", param="continue_final_message"
            )
        final = messages[-1].content if messages else None
        if not isinstance(final, str) or not final:
            raise errors.InvalidRequest(
                "continue_final_message needs a last message with text content", param="continue_final_message"
            )
    prompt = tokenizer.render_chat(
        messages, add_generation_prompt=add_generation_prompt, tools=tools, template_kwargs=template_kwargs
    )
    if continue_final_message:
        cut = prompt.rfind(final)  # type: ignore[arg-type]
        if cut < 0:
            raise errors.InvalidRequest(
                "the chat template does not reproduce the final message verbatim; it cannot be continued",
                param="continue_final_message",
            )
        prompt = prompt[: cut + len(final)]  # type: ignore[arg-type]
    return tokenizer.encode(prompt, add_special_tokens=add_special_tokens)


# ------------------------------------------------------------------------------------- routes


async def _model(manager: ModelManager, name: str | None) -> ServedModel:
    if name is None:
        names = [n for n, m in manager.models.items() if m.entry.cards]
        if len(names) != 1:
            raise errors.InvalidRequest(
                f"`model` is required: this server serves {len(names)} models", param="model"
            )
        name = names[0]
    model = manager.get(name)
    await model.wait_open()
    return model


async def tokenize(manager: ModelManager, body: bytes) -> TokenizeResponse:
    kind = decode_struct(_KIND, body)
    if kind.messages is not None:
        chat = decode_struct(_CHAT, body)
        for name in ("chat_template", "mm_processor_kwargs"):
            if getattr(chat, name) is not None:
                raise errors.InvalidRequest(f"{name} is not supported by this server", param=name)
        if not chat.messages:
            raise errors.InvalidRequest("messages must not be empty", param="messages")
        model = await _model(manager, chat.model)
        tokenizer = model.tokenizer
        assert tokenizer is not None
        ids = chat_prompt_ids(
            tokenizer,
            chat.messages,
            tools=tool_dicts(chat.tools),
            template_kwargs=chat.chat_template_kwargs,
            add_generation_prompt=chat.add_generation_prompt,
            continue_final_message=chat.continue_final_message,
            add_special_tokens=chat.add_special_tokens,
        )
        return_strs = chat.return_token_strs
    else:
        plain = decode_struct(_PROMPT, body)
        model = await _model(manager, plain.model)
        tokenizer = model.tokenizer
        assert tokenizer is not None
        ids = tokenizer.encode(plain.prompt, add_special_tokens=plain.add_special_tokens)
        return_strs = plain.return_token_strs
    strs = [tokenizer.tokenizer.id_to_token(i) or "" for i in ids] if return_strs else None
    return TokenizeResponse(len(ids), model.card.context_length, ids, strs)


async def detokenize(manager: ModelManager, body: bytes) -> DetokenizeResponse:
    request = decode_struct(_DETOKENIZE, body)
    model = await _model(manager, request.model)
    tokenizer = model.tokenizer
    assert tokenizer is not None
    for t in request.tokens:
        if t >= tokenizer.vocab_size:
            raise errors.InvalidRequest(f"token id {t} is outside the vocabulary (size {tokenizer.vocab_size})", param="tokens")
    return DetokenizeResponse(tokenizer.decode(request.tokens, skip_special_tokens=False))


def register_tokenize_routes(app: FastAPI, manager: ModelManager, config: FrontendConfig) -> None:
    """POST /tokenize and /detokenize (errors in OpenAI's shape, as vLLM answers them)."""

    async def on_tokenize(body: bytes, arrived_s: float) -> Reply:
        return JsonReply(_encode(await tokenize(manager, body)))

    async def on_detokenize(body: bytes, arrived_s: float) -> Reply:
        return JsonReply(_encode(await detokenize(manager, body)))

    for path, handler in (("/tokenize", on_tokenize), ("/detokenize", on_detokenize)):
        endpoint = ApiEndpoint(handler, http_error, config.max_request_body_bytes, None)
        app.router.routes.append(Route(path, endpoint, methods=["POST"]))


OPENAPI_OPERATIONS = (
    ApiOperation("/tokenize", "post", "Token ids of a prompt or chat", TokenizeResponse,
                 (TokenizeCompletionRequest, TokenizeChatRequest)),
    ApiOperation("/detokenize", "post", "Text of token ids", DetokenizeResponse, DetokenizeRequest),
)
