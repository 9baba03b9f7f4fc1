"""Issue 14's request surface end to end on the built-in engine, with the official openai client
(sync, async and streaming) against `python -m dynamo.serve` on models/dynamo-tiny (whose chat
template presents `tools`, Hermes style): logit_bias forces a token; json_schema output validates;
required and named tool choice give arguments that validate against the tool's schema, streamed
deltas concatenating to the non-streamed call; n=2 with a seed; the greedy token's logprob is
the largest of its top_logprobs; stop strings cut exactly before the stop. Then a structured
output request whose worker drains mid-stream (migration on) still validates, and equals the
request served without a migration: the new worker replays the grammar.

Every check is greedy or seeded, so deterministic. The project's packages for the in-process
fleet are imported inside its test (see test_embedded_reliability.py for why)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

import jsonschema
import openai
import pytest
from tokenizers import Tokenizer

from tests.e2e.procs import TINY_MODEL, serving

if TYPE_CHECKING:
    from frontend.service import Frontend
    from workers.worker import Worker

pytestmark = pytest.mark.e2e

MODEL = "dynamo-tiny"
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "member": {"type": "boolean"},
        "level": {"enum": ["low", "mid", "high"]},
    },
    "required": ["name", "age", "member", "level"],
    "additionalProperties": False,
}
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
WEATHER_ARGS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 10},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "unit", "days"],
    "additionalProperties": False,
}
TIME_ARGS = {
    "type": "object",
    "properties": {"zone": {"enum": ["UTC", "CET", "PST"]}},
    "required": ["zone"],
    "additionalProperties": False,
}
TOOLS: list[Any] = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather forecast", "parameters": WEATHER_ARGS}},
    {"type": "function", "function": {"name": "get_time", "description": "Current time", "parameters": TIME_ARGS}},
]
TOOL_SCHEMAS = {"get_weather": WEATHER_ARGS, "get_time": TIME_ARGS}
USER: list[Any] = [{"role": "user", "content": "Tell me about the weather in Paris this week."}]
MIGRATIONS = "dynamo_frontend_migrations_total"


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with serving(tmp_path_factory.mktemp("serve-features"), "--engine", "builtin", "--model", TINY_MODEL) as base:
        yield base


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_file(f"{TINY_MODEL}/tokenizer.json")


def client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)


def async_client(base: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)


# ------------------------------------------------------------------------------ sampling


def test_logit_bias_forces_a_token(base_url: str, tokenizer: Tokenizer) -> None:
    (forced,) = tokenizer.encode(" loop", add_special_tokens=False).ids
    resp = client(base_url).chat.completions.create(
        model=MODEL, messages=USER, max_tokens=4, temperature=0, logit_bias={str(forced): 100},
        logprobs=True, top_logprobs=1,
    )
    choice = resp.choices[0]
    assert choice.message.content == " loop" * 4
    assert choice.logprobs is not None and choice.logprobs.content is not None
    assert [t.token for t in choice.logprobs.content] == [" loop"] * 4
    # Logprobs are the model's own: " loop" is not what it would have chosen.
    assert all(t.logprob < t.top_logprobs[0].logprob for t in choice.logprobs.content)


def test_greedy_logprob_is_the_largest_top_logprob(base_url: str) -> None:
    chat = client(base_url).chat.completions.create(
        model=MODEL, messages=USER, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3
    )
    content = chat.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == 8
    for token in content:
        assert len(token.top_logprobs) == 3
        assert token.logprob == max(t.logprob for t in token.top_logprobs)
        assert token.top_logprobs[0].token == token.token
    completion = client(base_url).completions.create(
        model=MODEL, prompt="The for statement", max_tokens=6, temperature=0, logprobs=2, echo=True
    )
    lp = completion.choices[0].logprobs
    assert lp is not None and lp.token_logprobs is not None and lp.top_logprobs is not None
    prompt_len = len(lp.token_logprobs) - 6
    assert lp.token_logprobs[0] is None  # the first prompt token has none
    assert all(v is not None for v in lp.token_logprobs[1:])
    for value, top in zip(lp.token_logprobs[prompt_len:], lp.top_logprobs[prompt_len:]):
        assert value == max(top.values())


async def test_n_choices_with_a_seed(base_url: str) -> None:
    async def ask() -> list[str]:
        resp = await async_client(base_url).chat.completions.create(
            model=MODEL, messages=USER, max_tokens=12, temperature=1.0, seed=11, n=2
        )
        assert [c.index for c in resp.choices] == [0, 1]
        return [c.message.content or "" for c in resp.choices]

    first, second = await asyncio.gather(ask(), ask())
    assert first == second  # seeded: reproducible, and the two choices get their own seeds
    assert first[0] != first[1]


def test_stop_strings_cut_exactly_before_the_stop(base_url: str) -> None:
    c = client(base_url)
    prompt = "The while statement"
    whole = c.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0).choices[0].text
    stop = whole[len(whole) // 2 : len(whole) // 2 + 3]
    cut = whole[: whole.index(stop)]
    resp = c.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0, stop=[stop])
    assert resp.choices[0].text == cut and resp.choices[0].finish_reason == "stop"
    streamed = c.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0, stop=[stop], stream=True)
    assert "".join(ch.choices[0].text for ch in streamed if ch.choices) == cut


# ---------------------------------------------------------------------- structured outputs


def test_json_schema_output_validates(base_url: str) -> None:
    resp = client(base_url).chat.completions.create(
        model=MODEL, messages=USER, max_tokens=120, temperature=0, response_format=RESPONSE_FORMAT  # type: ignore[arg-type]
    )
    content = resp.choices[0].message.content
    assert content is not None and resp.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(content), PERSON)
    streamed = client(base_url).chat.completions.create(
        model=MODEL, messages=USER, max_tokens=120, temperature=0, response_format=RESPONSE_FORMAT,  # type: ignore[arg-type]
        stream=True,
    )
    assert "".join(ch.choices[0].delta.content or "" for ch in streamed if ch.choices) == content


async def test_json_schema_output_validates_async_and_sampled(base_url: str) -> None:
    resp = await async_client(base_url).chat.completions.create(
        model=MODEL, messages=USER, max_tokens=120, temperature=1.0, seed=3, n=2,
        response_format=RESPONSE_FORMAT,  # type: ignore[arg-type]
    )
    for choice in resp.choices:
        jsonschema.validate(json.loads(choice.message.content or ""), PERSON)


def _calls(message: Any) -> list[tuple[str, str]]:
    return [(c.function.name, c.function.arguments) for c in message.tool_calls or []]


def _streamed_calls(chunks: Any) -> list[tuple[str, str]]:
    calls: dict[int, list[str]] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            for delta in choice.delta.tool_calls or []:
                name, args = calls.setdefault(delta.index, ["", ""])
                fn = delta.function
                calls[delta.index] = [name + (fn.name or "" if fn else ""), args + (fn.arguments or "" if fn else "")]
    return [(name, args) for _, (name, args) in sorted(calls.items())]


@pytest.mark.parametrize(
    "tool_choice", ["required", {"type": "function", "function": {"name": "get_time"}}], ids=["required", "named"]
)
def test_forced_tool_calls_validate_and_stream_the_same(base_url: str, tool_choice: Any) -> None:
    c = client(base_url)
    kwargs: dict[str, Any] = dict(
        model=MODEL, messages=USER, tools=TOOLS, tool_choice=tool_choice, max_tokens=160, temperature=0,
        parallel_tool_calls=False,
    )
    resp = c.chat.completions.create(**kwargs)
    choice = resp.choices[0]
    calls = _calls(choice.message)
    assert len(calls) == 1 and choice.finish_reason == "tool_calls"
    name, arguments = calls[0]
    if isinstance(tool_choice, dict):
        assert name == "get_time"
    jsonschema.validate(json.loads(arguments), TOOL_SCHEMAS[name])
    assert _streamed_calls(c.chat.completions.create(**kwargs, stream=True)) == calls


async def test_forced_tool_call_async(base_url: str) -> None:
    resp = await async_client(base_url).chat.completions.create(
        model=MODEL, messages=USER, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=160, temperature=0,
    )
    ((name, arguments),) = _calls(resp.choices[0].message)
    assert name == "get_weather"
    jsonschema.validate(json.loads(arguments), WEATHER_ARGS)


# -------------------------------------------------------------------------------- migration


@contextlib.asynccontextmanager
async def builtin_fleet(num_workers: int, registry: Any) -> AsyncIterator[tuple[Frontend, list[Worker]]]:
    """A frontend (migration on) and built-in workers on CPU in this process, embedded runtime."""
    from dynamo.config import RuntimeConfig
    from dynamo.runtime import Runtime
    from dynamo.serve import build_parser
    from frontend.config import FrontendConfig
    from frontend.service import Frontend
    from router.base import RoundRobinRouter
    from workers.registry import engine_spec
    from workers.worker import Worker, WorkerConfig

    argv = ["--engine", "builtin", "--model", TINY_MODEL, "--device", "cpu", "--num-gpu-blocks", "256"]
    args = build_parser(argv).parse_args(argv)
    async with contextlib.AsyncExitStack() as stack:
        runtime = await stack.enter_async_context(await Runtime.create(RuntimeConfig()))
        workers = []
        for _ in range(num_workers):
            rt = await stack.enter_async_context(runtime.sibling())
            engine = engine_spec("builtin").create(args)
            workers.append(await stack.enter_async_context(Worker(rt, engine, WorkerConfig(MODEL, TINY_MODEL, "builtin"))))
        config = FrontendConfig(http_host="127.0.0.1", http_port=0, migration_limit=3)
        front = await stack.enter_async_context(
            Frontend(runtime, config, lambda card: RoundRobinRouter(), registry=registry)
        )
        manager = front.manager
        await manager.wait_until(lambda: manager.ready() and len(manager.models[MODEL].instance_ids()) == num_workers, 30)
        yield front, workers


async def test_structured_output_survives_a_migration() -> None:
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    async with builtin_fleet(2, registry) as (front, workers):
        api = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{front.port}/v1", api_key="unused", max_retries=0, timeout=120)
        kwargs: dict[str, Any] = dict(
            model=MODEL, messages=USER, max_tokens=120, temperature=0, response_format=RESPONSE_FORMAT
        )
        unmoved = (await api.chat.completions.create(**kwargs)).choices[0].message.content
        assert unmoved is not None
        stream = await api.chat.completions.create(**kwargs, stream=True)
        parts: list[str] = []
        drained = None
        async for chunk in stream:
            parts.extend(ch.delta.content or "" for ch in chunk.choices)
            if drained is None and len(parts) >= 4:
                # Mid-stream: the worker serving it stops; its stream moves to the other one.
                (victim,) = [w for w in workers if w._active]
                drained = asyncio.create_task(victim.drain(timeout_s=0.0))
        assert drained is not None
        await drained
        text = "".join(parts)
    assert registry.get_sample_value(MIGRATIONS, {"model": MODEL}) == 1
    assert len(parts) > 4  # the stream went on after the drain
    jsonschema.validate(json.loads(text), PERSON)
    assert text == unmoved
