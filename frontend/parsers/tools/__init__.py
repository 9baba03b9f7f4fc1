"""One module per tool-call format family; `frontend.parsers.tool_calls` selects them by name."""
