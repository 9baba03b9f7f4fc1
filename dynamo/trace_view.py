"""Read the span files that `--trace-file` / DYN_TRACE_FILE writes (one JSON object per span,
dynamo/tracing.py `span_record`) and print each trace as a tree, the spans of every process
that wrote one of the files assembled by their parent ids:

    python -m dynamo.trace_view /tmp/dynamo-spans.jsonl [more files] [--trace TRACE_ID]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

Span = dict[str, Any]


def read_spans(paths: Iterable[str | Path]) -> list[Span]:
    """Every complete line of the files (a line still being written is skipped)."""
    spans: list[Span] = []
    for path in paths:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            continue
        for line in text.splitlines():
            try:
                spans.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return spans


def by_trace(spans: Iterable[Span]) -> dict[str, list[Span]]:
    traces: dict[str, list[Span]] = defaultdict(list)
    for s in spans:
        traces[s["trace_id"]].append(s)
    return dict(traces)


def roots(trace: list[Span]) -> list[Span]:
    """The spans whose parent is not among `trace` (a client's span, or none)."""
    ids = {s["span_id"] for s in trace}
    return sorted((s for s in trace if s["parent_id"] not in ids), key=lambda s: s["start_ns"])


def render(trace: list[Span]) -> str:
    children: dict[str | None, list[Span]] = defaultdict(list)
    for s in trace:
        children[s["parent_id"]].append(s)
    top = roots(trace)
    origin = min((s["start_ns"] for s in trace), default=0)
    lines: list[str] = []

    def walk(s: Span, depth: int) -> None:
        start_ms = (s["start_ns"] - origin) / 1e6
        took_ms = (s["end_ns"] - s["start_ns"]) / 1e6
        status = "" if s["status"] != "error" else "  ERROR"
        lines.append(f"{start_ms:9.2f} ms {took_ms:9.2f} ms  {'  ' * depth}{s['name']}  [{s['service']}]{status}")
        for child in sorted(children.get(s["span_id"], []), key=lambda c: c["start_ns"]):
            walk(child, depth + 1)

    for s in top:
        walk(s, 0)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dynamo.trace_view", description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", help="span files (JSON lines)")
    parser.add_argument("--trace", help="only this trace id (32 hex digits)")
    parser.add_argument(
        "--wait-s", type=float, default=10.0,
        help="with --trace: wait up to this long for its HTTP request's span to be written (default: 10)",
    )
    args = parser.parse_args(argv)
    deadline = time.monotonic() + args.wait_s
    while True:
        traces = by_trace(read_spans(args.files))
        if args.trace is None:
            break
        trace = traces.get(args.trace.lower(), [])
        # The frontend's request span ends last: once it is written the trace is whole.
        if any(s["kind"] == "server" and s["name"].startswith("POST ") for s in trace) or time.monotonic() > deadline:
            traces = {args.trace.lower(): trace} if trace else {}
            break
        time.sleep(0.05)
    if not traces:
        sys.exit(f"no spans{' of trace ' + args.trace if args.trace else ''} in {', '.join(args.files)}")
    for trace_id, trace in traces.items():
        print(f"trace {trace_id}")
        print(render(trace))


if __name__ == "__main__":
    main()
