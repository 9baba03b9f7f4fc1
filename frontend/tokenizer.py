"""A model's tokenizer as the frontend needs it: fast encode/decode (`tokenizers`), the chat
template (jinja2, compiled once, rendered the way transformers renders it) and the EOS ids."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer, pre_tokenizers

try:
    import regex  # \p{L} classes; installed with transformers
except ImportError:  # pragma: no cover - then every encode goes through `tokenizers` as a whole
    regex = None

from dynamo import errors
from frontend.schemas import ChatMessage


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, **_: Any) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent)


def _compile_template(source: str) -> jinja2.Template:
    # The same environment settings transformers uses, so templates written for it render alike.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    return env.from_string(source)


def _token_text(value: Any) -> str | None:
    """tokenizer_config stores special tokens as strings or as AddedToken dicts."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


# The split of tokenizers' ByteLevel pre-tokenizer with use_regex=true (GPT-2's pattern).
_BYTE_LEVEL_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_PIECE_CACHE_LIMIT = 1 << 16  # pieces (words); a few MB at most


class ByteLevelEncoder:
    """`tokenizer.encode(text, add_special_tokens=False).ids` for byte-level BPE tokenizers
    (GPT-2 style: no normalizer, the ByteLevel pre-tokenizer with its regex), with the BPE of
    each pre-tokenized piece cached.

    In `tokenizers` the regex split alone costs ~0.4 us per character (about 150 us of a
    110-token prompt) and each word is merged again on every request; here the split runs in
    the `regex` module and a piece seen before costs one dict lookup. The steps are the ones
    `tokenizers` takes: split out added tokens (leftmost-longest), split the rest with the
    pattern, BPE each piece. The BPE itself is still done by `tokenizers` (on a copy without
    the regex split), so merges and byte mapping cannot drift from it."""

    __slots__ = ("_added", "_added_ids", "_pattern", "_piece", "_cache")

    def __init__(self, tokenizer: Tokenizer, spec: dict[str, Any]) -> None:
        assert regex is not None
        added = {t["content"]: t["id"] for t in spec.get("added_tokens") or ()}
        # Longest first, so the alternation takes the longest token at the leftmost match.
        alternatives = "|".join(re.escape(t) for t in sorted(added, key=len, reverse=True))
        self._added = re.compile(alternatives) if added else None
        self._added_ids = added
        self._pattern = regex.compile(_BYTE_LEVEL_PATTERN)
        piece = Tokenizer.from_str(tokenizer.to_str())
        piece.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        self._piece = piece
        self._cache: dict[str, list[int]] = {}

    @classmethod
    def supports(cls, spec: dict[str, Any]) -> bool:
        """Only the configuration whose behaviour this class reproduces step by step."""
        if regex is None or spec.get("normalizer") is not None:
            return False
        pre = spec.get("pre_tokenizer") or {}
        model = spec.get("model") or {}
        if not (
            pre.get("type") == "ByteLevel"
            and pre.get("use_regex", True)
            and not pre.get("add_prefix_space", False)
            and model.get("type") == "BPE"
            and model.get("dropout") is None
        ):
            return False
        # Added tokens with stripping or word-boundary rules split differently: not handled.
        return all(
            not (t.get("lstrip") or t.get("rstrip") or t.get("single_word")) and t.get("content")
            for t in spec.get("added_tokens") or ()
        )

    def encode(self, text: str) -> list[int]:
        if self._added is None:
            return self._encode_plain(text)
        ids: list[int] = []
        start = 0
        for match in self._added.finditer(text):
            if match.start() > start:
                ids += self._encode_plain(text[start : match.start()])
            ids.append(self._added_ids[match.group()])
            start = match.end()
        if start < len(text):
            ids += self._encode_plain(text[start:])
        return ids

    def _encode_plain(self, text: str) -> list[int]:
        cache = self._cache
        ids: list[int] = []
        for piece in self._pattern.findall(text):
            piece_ids = cache.get(piece)
            if piece_ids is None:
                piece_ids = self._piece.encode(piece, add_special_tokens=False).ids
                if len(cache) < _PIECE_CACHE_LIMIT:
                    cache[piece] = piece_ids
            ids += piece_ids
        return ids


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    return data if isinstance(data, dict) else {}


@dataclass(frozen=True, slots=True)
class ModelTokenizer:
    """Loaded once per model directory and shared by every request for it."""

    model_path: str
    tokenizer: Tokenizer
    chat_template: jinja2.Template | None
    eos_token_ids: tuple[int, ...]
    bos_token: str
    eos_token: str
    vocab_size: int
    # Same ids as `tokenizer` without special tokens, faster; None where it does not apply.
    fast_encoder: ByteLevelEncoder | None = field(default=None, compare=False)
    chat_template_globals: dict[str, Any] = field(default_factory=dict, compare=False)
    chat_template_source: str = field(default="", compare=False)

    @classmethod
    def load(cls, model_path: str) -> ModelTokenizer:
        root = Path(model_path)
        tokenizer_file = root / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise errors.DynamoError(f"no tokenizer.json in model directory {model_path!r}")
        tokenizer = Tokenizer.from_file(str(tokenizer_file))
        spec = _read_json(tokenizer_file)
        fast_encoder = ByteLevelEncoder(tokenizer, spec) if ByteLevelEncoder.supports(spec) else None
        config = _read_json(root / "tokenizer_config.json")
        generation = _read_json(root / "generation_config.json")

        template_source = config.get("chat_template")
        if isinstance(template_source, list):  # named templates: take the default one
            named = {t.get("name"): t.get("template") for t in template_source if isinstance(t, dict)}
            template_source = named.get("default") or next(iter(named.values()), None)
        if template_source is None and (root / "chat_template.jinja").is_file():
            template_source = (root / "chat_template.jinja").read_text()

        bos = _token_text(config.get("bos_token")) or ""
        eos = _token_text(config.get("eos_token")) or ""
        eos_ids: list[int] = []
        gen_eos = generation.get("eos_token_id")
        for value in gen_eos if isinstance(gen_eos, list) else [gen_eos]:
            if isinstance(value, int) and value not in eos_ids:
                eos_ids.append(value)
        eos_id = tokenizer.token_to_id(eos) if eos else None
        chat_template = _compile_template(template_source) if template_source else None
        if eos_id is not None and eos_id not in eos_ids:
            eos_ids.append(eos_id)
        return cls(
            model_path=model_path,
            tokenizer=tokenizer,
            chat_template=chat_template,
            eos_token_ids=tuple(eos_ids),
            bos_token=bos,
            eos_token=eos,
            vocab_size=tokenizer.get_vocab_size(with_added_tokens=True),
            fast_encoder=fast_encoder,
            chat_template_globals=dict(chat_template.globals) if chat_template is not None else {},
            chat_template_source=template_source or "",
        )

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        if not add_special_tokens and self.fast_encoder is not None:
            return self.fast_encoder.encode(text)
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def check_tools_supported(self) -> None:
        """Tools reach a model only through its chat template; one that never reads `tools`
        would drop them without a word."""
        if "tools" not in self.chat_template_source:
            raise errors.InvalidRequest(
                f"the chat template of model {self.model_path!r} cannot present tools to the model",
                param="tools",
            )

    def render_chat(
        self,
        messages: Sequence[ChatMessage],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        template_kwargs: dict[str, Any] | None = None,
    ) -> str:
        """The prompt text for a conversation. `tools` are OpenAI tool objects
        ({"type": "function", "function": {...}}), as transformers passes them to templates;
        `template_kwargs` are extra template variables (e.g. enable_thinking)."""
        if self.chat_template is None:
            raise errors.InvalidRequest(
                f"model at {self.model_path!r} has no chat template; use /v1/completions"
            )
        if tools:
            self.check_tools_supported()
        variables: dict[str, Any] = dict(template_kwargs or {})
        variables.update(
            messages=[_message_dict(i, m) for i, m in enumerate(messages)],
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
            tools=tools or None,
        )
        try:
            return _render(self.chat_template, self.chat_template_globals or dict(self.chat_template.globals), **variables)
        except jinja2.TemplateError as exc:
            # Templates reject conversations they cannot express (e.g. roles out of order).
            raise errors.InvalidRequest(f"chat template rejected the messages: {exc}", param="messages") from None


def _render(template: jinja2.Template, template_globals: dict[str, Any], **variables: Any) -> str:
    """`template.render(**variables)` without rebuilding the globals per call: render() merges
    the template's ChainMap of globals into a new dict each time, most of a short template's
    cost. `template_globals` is that merge done once (`dict(template.globals)`); the context is
    the same dict render() would build."""
    context = template.new_context({**template_globals, **variables}, shared=True)
    try:
        return template.environment.concat(template.root_render_func(context))  # type: ignore[attr-defined,no-any-return]
    except Exception:
        template.environment.handle_exception()  # re-raises, with the template's line numbers
        raise  # pragma: no cover - handle_exception never returns


def _message_dict(index: int, message: ChatMessage) -> dict[str, Any]:
    """Templates index messages as dicts: the one place a Struct becomes a dict, for jinja."""
    content = message.content
    if isinstance(content, list):
        texts = []
        for i, part in enumerate(content):
            if part.type != "text" or part.text is None:
                raise errors.InvalidRequest(
                    f"content part of type {part.type!r} is not supported; this model takes text parts only",
                    param=f"messages[{index}].content[{i}].type",
                )
            texts.append(part.text)
        content = "".join(texts)
    out: dict[str, Any] = {"role": message.role, "content": content or ""}
    if message.name is not None:
        out["name"] = message.name
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    if message.reasoning_content is not None:
        out["reasoning_content"] = message.reasoning_content
    if message.tool_calls:
        # Templates (Qwen's, Llama's, Hermes') iterate arguments as a mapping, as transformers
        # hands them over; clients send them as JSON text.
        out["tool_calls"] = [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.function.name, "arguments": _arguments(call.function.arguments)},
            }
            for call in message.tool_calls
        ]
    return out


def _arguments(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


class TokenizerCache:
    """One ModelTokenizer per model directory; loads run in a thread (big vocabularies take
    hundreds of milliseconds) and concurrent first requests share one load."""

    def __init__(self) -> None:
        self._loaded: dict[str, ModelTokenizer] = {}
        self._loading: dict[str, asyncio.Future[ModelTokenizer]] = {}

    def get_loaded(self, model_path: str) -> ModelTokenizer | None:
        return self._loaded.get(model_path)

    async def get(self, model_path: str) -> ModelTokenizer:
        loaded = self._loaded.get(model_path)
        if loaded is not None:
            return loaded
        future = self._loading.get(model_path)
        if future is None:
            future = asyncio.ensure_future(asyncio.to_thread(ModelTokenizer.load, model_path))
            self._loading[model_path] = future
            future.add_done_callback(lambda f: self._done(model_path, f))
        return await asyncio.shield(future)

    def _done(self, model_path: str, future: asyncio.Future[ModelTokenizer]) -> None:
        self._loading.pop(model_path, None)
        if not future.cancelled() and future.exception() is None:
            self._loaded[model_path] = future.result()
