"""Tool-call parsing by model family, selected by name (`--dyn-tool-call-parser`): turns the
generated text into OpenAI `tool_calls` fragments and the content around them, streaming."""

from __future__ import annotations

from frontend.parsers.tools.base import ParsedDelta, ToolCallDelta, ToolCallParser, ToolSpec
from frontend.parsers.tools.hermes import HermesParser
from frontend.parsers.tools.llama3_json import Llama3JsonParser
from frontend.parsers.tools.mistral import MistralParser
from frontend.parsers.tools.pythonic import PythonicParser
from frontend.parsers.tools.qwen3_coder import Qwen3CoderParser

__all__ = ["TOOL_CALL_PARSERS", "ParsedDelta", "ToolCallDelta", "ToolCallParser", "ToolSpec", "tool_call_parser"]

_FAMILIES: dict[str, type[HermesParser | Llama3JsonParser | MistralParser | PythonicParser | Qwen3CoderParser]] = {
    "hermes": HermesParser,
    "llama3_json": Llama3JsonParser,
    "mistral": MistralParser,
    "pythonic": PythonicParser,
    "qwen3_coder": Qwen3CoderParser,
}

TOOL_CALL_PARSERS: tuple[str, ...] = tuple(_FAMILIES)


def tool_call_parser(name: str, tools: list[ToolSpec] | None) -> ToolCallParser:
    """A fresh parser for one choice of one request. `tools` (the request's) gives the names
    it expects and, for XML formats, the parameter types."""
    try:
        family = _FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown tool-call parser {name!r}; choose one of: {', '.join(TOOL_CALL_PARSERS)}") from None
    return family(tools)
