"""Model-output parsers of the frontend, pure and engine-independent: tool calls and reasoning
are parsed out of the generated text once, here, for every engine (streamed and not)."""

from frontend.parsers.reasoning import REASONING_PARSERS, ReasoningParser, reasoning_parser
from frontend.parsers.tool_calls import (
    TOOL_CALL_PARSERS,
    ParsedDelta,
    ToolCallDelta,
    ToolCallParser,
    ToolSpec,
    tool_call_parser,
)

__all__ = [
    "REASONING_PARSERS",
    "TOOL_CALL_PARSERS",
    "ParsedDelta",
    "ReasoningParser",
    "ToolCallDelta",
    "ToolCallParser",
    "ToolSpec",
    "reasoning_parser",
    "tool_call_parser",
]
