"""The frontend's output-parser cost per streamed token (frontend/parsers): each tool-call and
reasoning parser fed one token-sized piece (4 characters) at a time, as the pipeline feeds
detokenized deltas, over a ~500-token output.

Workloads (fixed text, built below):
- calls: a realistic ~500-token reply with 2 tool calls in the family's own spelling: a
  sentence of preamble (formats that allow text before calls), a small call with a nested
  object, and a call carrying a ~1,600-character string argument (a file's content, unicode);
- plain: ~500 tokens of prose with markdown (links, lists, code spans), no call: the common
  case, which should take the fast path (no marker character in the piece);
- reasoning: ~300 tokens of <think> reasoning then ~200 of answer; and the answer alone.

A run creates a fresh parser (one per choice of one request, as the pipeline does), feeds every
piece, calls finish(). Timed with time.perf_counter_ns around the whole run; a run is repeated
--repeats times and the median and the minimum are reported, in microseconds per token. The
baseline row is the same loop calling a function that returns its argument.

    python benchmarks/parser_cost.py [--repeats 200] [--json-out benchmarks/results/parser_cost.json]
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from frontend.parsers import REASONING_PARSERS, TOOL_CALL_PARSERS, ToolSpec, reasoning_parser, tool_call_parser  # noqa: E402

CHARS_PER_TOKEN = 4

FILE_TEXT = (
    "def fibonacci(n: int) -> list[int]:\n"
    '    """The first n Fibonacci numbers — «golden» ratio ≈ 1.618."""\n'
    "    out = [0, 1]\n"
    "    while len(out) < n:\n"
    "        out.append(out[-1] + out[-2])\n"
    "    return out[:n]\n\n"
) * 8 + "# end of file\n"
PREAMBLE = "I'll look up the weather in Paris first, then write the helper module you asked for.\n\n"
SMALL_ARGS: dict[str, Any] = {"city": "Paris", "unit": "celsius", "days": 3, "options": {"hourly": True, "lang": "fr"}}
BIG_ARGS: dict[str, Any] = {"path": "src/fib.py", "content": FILE_TEXT, "overwrite": False}
TOOLS = [
    ToolSpec(
        "get_weather",
        {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "unit": {"type": "string"},
                "days": {"type": "integer"},
                "options": {"type": "object"},
            },
        },
    ),
    ToolSpec(
        "write_file",
        {
            "type": "object",
            "properties": {"path": {"type": "string"}, "content": {"type": "string"}, "overwrite": {"type": "boolean"}},
        },
    ),
]
CALLS = [("get_weather", SMALL_ARGS), ("write_file", BIG_ARGS)]


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _xml_value(value: Any) -> str:
    return value if isinstance(value, str) else _dumps(value)


def calls_text(family: str) -> str:
    """The 2-call reply in the family's spelling."""
    if family == "hermes":
        return PREAMBLE + "".join(
            f'<tool_call>\n{_dumps({"name": n, "arguments": a})}\n</tool_call>\n' for n, a in CALLS
        )
    if family == "llama3_json":  # calls come first in this format
        return "<|python_tag|>" + "; ".join(_dumps({"name": n, "parameters": a}) for n, a in CALLS)
    if family == "mistral":
        return PREAMBLE + "".join(f"[TOOL_CALLS]{n}[ARGS]{_dumps(a)}" for n, a in CALLS)
    if family == "pythonic":  # calls come first in this format
        return "[" + ", ".join(f"{n}(" + ", ".join(f"{k}={v!r}" for k, v in a.items()) + ")" for n, a in CALLS) + "]"
    if family == "qwen3_coder":
        return PREAMBLE + "".join(
            f"<tool_call>\n<function={n}>\n"
            + "".join(f"<parameter={k}>\n{_xml_value(v)}\n</parameter>\n" for k, v in a.items())
            + "</function>\n</tool_call>\n"
            for n, a in CALLS
        )
    raise ValueError(family)


PLAIN_TEXT = (
    "The capital of France is **Paris**, on the Seine. It has been the country's capital since "
    "the 10th century (see [Wikipedia](https://en.wikipedia.org/wiki/Paris) for the history).\n\n"
    "- Population: about 2.1 million in the city proper, 12 million in the metro area;\n"
    "- Known for: the Louvre, the Eiffel Tower, `croissants` and café culture — «la vie parisienne».\n\n"
) * 6
PLAIN_TEXT = PLAIN_TEXT[:2000]
THOUGHT = (
    "The user asks for the capital of France. That is Paris; I should double-check whether they "
    "mean the administrative capital or the largest city — both are Paris. I will also mention "
    "the population figures, but keep the answer short.\n"
) * 5
ANSWER = PLAIN_TEXT[:800]


def pieces(text: str) -> list[str]:
    return [text[i : i + CHARS_PER_TOKEN] for i in range(0, len(text), CHARS_PER_TOKEN)]


def time_runs(run: Callable[[], object], n_tokens: int, repeats: int) -> dict[str, float]:
    run()  # warm-up (imports, regex caches)
    samples = []
    gc.collect()
    for _ in range(repeats):
        t0 = time.perf_counter_ns()
        run()
        samples.append((time.perf_counter_ns() - t0) / 1e3 / n_tokens)
    return {"median_us_per_token": statistics.median(samples), "min_us_per_token": min(samples)}


def tool_run(family: str, chunks: list[str]) -> Callable[[], int]:
    def run() -> int:
        parser = tool_call_parser(family, TOOLS)
        n = 0
        for chunk in chunks:
            n += len(parser.feed(chunk).tool_calls)
        return n + len(parser.finish().tool_calls)

    return run


def reasoning_run(name: str, chunks: list[str]) -> Callable[[], None]:
    def run() -> None:
        parser = reasoning_parser(name)
        for chunk in chunks:
            parser.feed(chunk)
        parser.finish()

    return run


def baseline_run(chunks: list[str]) -> Callable[[], None]:
    def identity(text: str) -> str:
        return text

    def run() -> None:
        for chunk in chunks:
            identity(chunk)

    return run


def check_calls(family: str, text: str) -> None:
    """The workload really parses to its 2 calls (so the figures time the call path)."""
    parser = tool_call_parser(family, TOOLS)
    args: dict[int, str] = {}
    names: dict[int, str] = {}
    for delta in [parser.feed(c) for c in pieces(text)] + [parser.finish()]:
        for frag in delta.tool_calls:
            if frag.name:
                names[frag.index] = frag.name
            args[frag.index] = args.get(frag.index, "") + frag.arguments
    got = [(names[i], json.loads(args[i])) for i in sorted(names)]
    assert got == CALLS, (family, got)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args()

    rows: list[dict[str, Any]] = []

    def add(parser: str, workload: str, text: str, run_for: Callable[[list[str]], Callable[[], object]]) -> None:
        chunks = pieces(text)
        row = {"parser": parser, "workload": workload, "tokens": len(chunks), "chars": len(text)}
        row.update(time_runs(run_for(chunks), len(chunks), args.repeats))
        rows.append(row)

    add("(baseline: identity call)", "plain", PLAIN_TEXT, baseline_run)
    for family in TOOL_CALL_PARSERS:
        text = calls_text(family)
        check_calls(family, text)
        add(family, "2 calls", text, functools.partial(tool_run, family))
        add(family, "plain", PLAIN_TEXT, functools.partial(tool_run, family))
    for name in REASONING_PARSERS:
        opened = "" if name == "deepseek_r1" else "<think>\n"
        add(name, "think + answer", opened + THOUGHT + "</think>\n\n" + ANSWER, functools.partial(reasoning_run, name))
    add("qwen3", "answer only", PLAIN_TEXT, functools.partial(reasoning_run, "qwen3"))

    machine = {
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "load_1m": os.getloadavg()[0],
    }
    print(f"# parser cost, {CHARS_PER_TOKEN} chars per token, {args.repeats} runs each; {machine}")
    print("| parser | workload | tokens | median µs/token | min µs/token |")
    print("|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['parser']} | {r['workload']} | {r['tokens']} | {r['median_us_per_token']:.3f} | {r['min_us_per_token']:.3f} |")
    if args.json_out:
        args.json_out.write_text(json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
