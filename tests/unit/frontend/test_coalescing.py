"""The streaming fast path: outputs that arrive together leave in one body write with several
`data:` events (same events, same order, `[DONE]` last, usage kept), a lone output leaves at
once, FrameStream.next_ready hands over only plain data frames, the completion routes skip
FastAPI's middleware yet keep CORS and OpenAI error bodies, the byte-level fast encoder gives
exactly the ids `tokenizers` gives, and a worker sends the outputs its engine already holds
as one message."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest

from dynamo import errors
from dynamo.runtime import RequestContext
from dynamo.runtime.streaming import FrameStream
from dynamo.wire import (
    FRAME_DATA,
    FRAME_END,
    FRAME_ERROR,
    OUTPUT_CODEC,
    EngineOutput,
    LoadMetrics,
    PreprocessedRequest,
    StopConditions,
    StreamFrame,
    encode,
)
from frontend.app import FrontendApp
from frontend.schemas import ChatCompletionChunk
from frontend.tokenizer import ByteLevelEncoder, ModelTokenizer
from tests.unit.frontend.conftest import MODEL, Stack, start_worker
from workers.engine import Engine, EngineInfo
from workers.worker import Worker, WorkerConfig

TEXT = "Coalesced writes keep every token, in order, exactly once."


def _body(**extra: Any) -> bytes:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True, **extra}
    return json.dumps(body).encode()


async def _asgi_post(app: Any, path: str, body: bytes, headers: list[tuple[bytes, bytes]] | None = None) -> list[dict[str, Any]]:
    """Drives the ASGI app like a server would and returns every message it sent."""
    sent: list[dict[str, Any]] = []
    delivered = False
    never = asyncio.Event()

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await never.wait()  # the client stays connected
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"",
        "headers": [(b"content-type", b"application/json"), *(headers or [])],
        "client": ("127.0.0.1", 1), "server": ("test", 80),
    }  # fmt: skip
    await app(scope, receive, send)
    return sent


def _events(bodies: list[bytes]) -> list[str]:
    raw = b"".join(bodies).decode()
    assert raw.endswith("\n\n")
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events), events
    return [e[len("data: ") :] for e in events]


def _body_writes(sent: list[dict[str, Any]]) -> list[bytes]:
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 200
    return [m["body"] for m in sent[1:] if m["body"]]


async def test_ready_outputs_leave_in_one_write_with_every_event(stack: Stack, tokenizer: ModelTokenizer) -> None:
    script = tokenizer.encode(TEXT, add_special_tokens=False)
    # On the embedded plane the handler's frames are all queued before the frontend reads them.
    await start_worker(stack, script)
    sent = await _asgi_post(stack.app, "/v1/chat/completions", _body(stream_options={"include_usage": True}))
    writes = _body_writes(sent)
    events = _events(writes)
    assert len(writes) < len(events)  # coalesced
    assert any(w.count(b"data: ") > 1 for w in writes)
    assert all(w.endswith(b"\n\n") for w in writes)  # a write never splits an event
    assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
    chunks = [msgspec.json.decode(e, type=ChatCompletionChunk) for e in events[:-1]]
    assert chunks[0].choices[0].delta.role == "assistant"
    # One event per token (this text has no multi-byte characters), in order, each once.
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].finish_reason is None]
    assert deltas == [tokenizer.decode([t]) for t in script]
    assert "".join(deltas) == TEXT
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == len(script)
    assert all(c.usage is None for c in chunks[:-1])


async def test_a_lone_output_is_written_without_waiting_for_more(stack: Stack, tokenizer: ModelTokenizer) -> None:
    script = tokenizer.encode(TEXT, add_special_tokens=False)
    gate = asyncio.Event()
    await start_worker(stack, script, gate=gate)
    # The worker sends one token per gate release; each must be written before the next exists.
    writes: list[bytes] = []
    written = asyncio.Event()
    delivered = False
    never = asyncio.Event()

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": _body(), "more_body": False}
        await never.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body" and message["body"]:
            writes.append(message["body"])
            written.set()

    scope = {
        "type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": [], "query_string": b"",
        "root_path": "", "scheme": "http", "http_version": "1.1", "asgi": {"version": "3.0"},
    }  # fmt: skip
    serving = asyncio.ensure_future(stack.app(scope, receive, send))  # type: ignore[operator]
    await asyncio.wait_for(written.wait(), 5)  # the first token needs no gate
    for i in range(1, len(script) - 1):
        written.clear()
        gate.set()
        gate.clear()  # releases exactly the waiting handler step: one token
        await asyncio.wait_for(written.wait(), 5)
        assert len(writes) == i + 1
        assert writes[-1].count(b"data: ") == 1  # its own write, sent before the next token exists
        assert json.loads(writes[-1][len(b"data: ") :])["choices"][0]["delta"]["content"] == tokenizer.decode([script[i]])
    gate.set()
    await asyncio.wait_for(serving, 5)
    assert _events(writes)[-1] == "[DONE]"


async def test_mid_stream_error_keeps_the_events_before_it(stack: Stack, tokenizer: ModelTokenizer) -> None:
    script = tokenizer.encode(TEXT, add_special_tokens=False)
    await start_worker(stack, script, fail_after=5)
    sent = await _asgi_post(stack.app, "/v1/chat/completions", _body())
    events = _events(_body_writes(sent))
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "internal_error"
    chunks = [msgspec.json.decode(e, type=ChatCompletionChunk) for e in events[:-2]]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == tokenizer.decode(script[:5])


async def test_cors_requests_take_the_middleware_stack(stack: Stack, tokenizer: ModelTokenizer) -> None:
    from prometheus_client import CollectorRegistry

    from frontend.app import create_app
    from frontend.config import FrontendConfig
    from frontend.metrics import FrontendMetrics

    await start_worker(stack, tokenizer.encode(TEXT, add_special_tokens=False))
    config = FrontendConfig(cors_allow_origins=("https://app.example",))
    app = create_app(stack.manager, FrontendMetrics(CollectorRegistry()), config)
    assert isinstance(app, FrontendApp)
    with_origin = await _asgi_post(app, "/v1/chat/completions", _body(), [(b"origin", b"https://app.example")])
    headers = dict(with_origin[0]["headers"])
    assert headers[b"access-control-allow-origin"] == b"https://app.example"
    plain = await _asgi_post(app, "/v1/chat/completions", _body())
    assert b"access-control-allow-origin" not in dict(plain[0]["headers"])
    assert _events(_body_writes(with_origin))[-1] == _events(_body_writes(plain))[-1] == "[DONE]"


async def test_unexpected_error_before_the_stream_is_an_openai_500(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    await start_worker(stack, [300, 301])
    pipeline = stack.app.state.pipeline  # type: ignore[attr-defined]

    async def broken(*_: object) -> None:
        raise ZeroDivisionError("bug")

    monkeypatch.setattr(pipeline, "open", broken)
    sent = await _asgi_post(stack.app, "/v1/chat/completions", _body())
    assert sent[0]["status"] == 500
    assert json.loads(sent[1]["body"])["error"]["code"] == "internal_error"


# ------------------------------------------------------------------------ FrameStream.next_ready


async def test_next_ready_hands_over_only_plain_data_frames() -> None:
    stream = FrameStream("r", None)
    assert stream.next_ready() is None
    stream.feed(StreamFrame(0, FRAME_DATA, b"a"))
    stream.feed(StreamFrame(1, FRAME_DATA, b"b"))
    stream.feed(StreamFrame(2, FRAME_END))
    assert await anext(stream) == b"a"
    assert stream.next_ready() == b"b"
    assert stream.next_ready() is None  # the end frame is __anext__'s to report
    with pytest.raises(StopAsyncIteration):
        await anext(stream)
    assert stream.next_ready() is None


async def test_next_ready_leaves_errors_gaps_and_aborts_to_anext() -> None:
    cancelled: list[bool] = []

    async def cancel() -> None:
        cancelled.append(True)

    failing = FrameStream("r", None)
    failing.feed(StreamFrame(0, FRAME_ERROR, error="nope", code="invalid_request"))
    assert failing.next_ready() is None
    with pytest.raises(errors.InvalidRequest):
        await anext(failing)

    gap = FrameStream("r", cancel)
    gap.feed(StreamFrame(0, FRAME_DATA, b"a"))
    gap.feed(StreamFrame(2, FRAME_DATA, b"c"))
    assert gap.next_ready() == b"a"
    assert gap.next_ready() is None
    with pytest.raises(errors.StreamBroken):
        await anext(gap)
    assert cancelled == [True]

    aborted = FrameStream("r", None)
    aborted.feed(StreamFrame(0, FRAME_DATA, b"a"))
    aborted.abort(errors.StreamBroken("gone"))
    assert aborted.next_ready() == b"a"
    assert aborted.next_ready() is None
    with pytest.raises(errors.StreamBroken):
        await anext(aborted)


async def test_a_waiting_reader_wakes_on_feed_and_survives_cancellation() -> None:
    stream = FrameStream("r", None)
    reader = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0)
    reader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reader
    reader = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0)
    stream.feed(StreamFrame(0, FRAME_DATA, b"x"))
    assert await asyncio.wait_for(reader, 1) == b"x"


# ------------------------------------------------------------------------- byte-level fast encoder


def _differences(encoder: ByteLevelEncoder, tokenizer: ModelTokenizer, texts: list[str]) -> list[str]:
    return [t for t in texts if encoder.encode(t) != tokenizer.tokenizer.encode(t, add_special_tokens=False).ids]


def test_fast_encoder_matches_tokenizers_on_random_text(tokenizer: ModelTokenizer) -> None:
    encoder = tokenizer.fast_encoder
    assert encoder is not None  # the project's tokenizer is byte-level BPE
    rng = random.Random(7)
    alphabet = [
        *"abcXYZ  \t\n\r'sdtmlrve0123456789.,!?-_()[]{}\"", "é", "ß", "中", "文", "😀", "\u00a0", "\u0085",
        "\u2028", "\u3000", "\x1c", "\x0b", "٣", "Ⅻ", "\u200b", "\ufeff", "<|im_start|>", "<|im_end|>",
        "<|begin_of_text|>", "<|im_", "'S", "'ll", "  ", "\n\n",
    ]  # fmt: skip
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(5000)]
    assert _differences(encoder, tokenizer, texts) == []
    # The second pass is served from the piece cache: still the same.
    assert _differences(encoder, tokenizer, texts[:500]) == []


def test_fast_encoder_matches_tokenizers_across_code_points(tokenizer: ModelTokenizer) -> None:
    encoder = tokenizer.fast_encoder
    assert encoder is not None
    chars = [chr(cp) for cp in range(0, 0x30000, 11) if not 0xD800 <= cp < 0xE000]
    texts = [f"a{c} b{c}{c}  {c}\n" for c in chars]
    assert _differences(encoder, tokenizer, texts) == []


def test_fast_encoder_applies_only_where_it_reproduces_tokenizers(tokenizer: ModelTokenizer) -> None:
    spec = json.loads(tokenizer.tokenizer.to_str())
    assert ByteLevelEncoder.supports(spec)
    assert not ByteLevelEncoder.supports({**spec, "normalizer": {"type": "NFC"}})
    assert not ByteLevelEncoder.supports({**spec, "pre_tokenizer": {"type": "Metaspace"}})
    assert not ByteLevelEncoder.supports({**spec, "pre_tokenizer": {**spec["pre_tokenizer"], "add_prefix_space": True}})
    stripped = [{**spec["added_tokens"][0], "lstrip": True}, *spec["added_tokens"][1:]]
    assert not ByteLevelEncoder.supports({**spec, "added_tokens": stripped})
    # With special tokens requested, `tokenizers` (and its post-processor) does the work.
    text = "hello there"
    assert tokenizer.encode(text, add_special_tokens=True) == tokenizer.tokenizer.encode(text).ids


# ------------------------------------------------------------- worker: ready outputs in one message


async def test_next_if_ready_takes_ready_items_and_resumes_a_waiting_step() -> None:
    from dynamo.runtime.streaming import Suspended, next_if_ready

    gate = asyncio.Event()
    closed: list[bool] = []

    async def items() -> AsyncIterator[int]:
        try:
            yield 1
            yield 2
            await gate.wait()
            yield 3
        finally:
            closed.append(True)

    it = items()
    assert next_if_ready(it) == 1
    assert next_if_ready(it) == 2
    step = next_if_ready(it)
    assert isinstance(step, Suspended)
    waiter = asyncio.ensure_future(_await(step))
    await asyncio.sleep(0)
    assert not waiter.done()
    gate.set()
    assert await asyncio.wait_for(waiter, 1) == 3
    with pytest.raises(StopAsyncIteration):
        next_if_ready(it)
    assert closed == [True]

    # Abandoning a waiting step closes the generator, as cancelling the step would.
    gate.clear()
    closed.clear()
    it = items()
    assert next_if_ready(it) == 1 and next_if_ready(it) == 2
    step = next_if_ready(it)
    assert isinstance(step, Suspended)
    step.close()
    assert closed == [True]

    # Cancelling the task that awaits a step cancels the step inside the generator.
    closed.clear()
    it = items()
    assert next_if_ready(it) == 1 and next_if_ready(it) == 2
    step = next_if_ready(it)
    assert isinstance(step, Suspended)
    waiter = asyncio.ensure_future(_await(step))
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert closed == [True]


async def _await(step: Any) -> Any:
    return await step


class _BurstEngine(Engine):
    """Yields its outputs in bursts: every output of a burst is ready at once; the next burst
    waits for `gate`."""

    name = "burst"

    def __init__(self, bursts: list[list[EngineOutput]]) -> None:
        self.bursts = bursts
        self.gate = asyncio.Event()
        self.closed = asyncio.Event()

    async def start(self, kv_events: object = None) -> EngineInfo:
        return EngineInfo(context_length=64, kv_block_size=4, kv_total_blocks=8)

    async def stop(self) -> None:
        pass

    async def generate(self, request: PreprocessedRequest) -> AsyncIterator[EngineOutput]:  # type: ignore[override]
        try:
            for i, burst in enumerate(self.bursts):
                if i:
                    await self.gate.wait()
                    self.gate.clear()
                for output in burst:
                    yield output
        finally:
            self.closed.set()

    def load_metrics(self) -> LoadMetrics:
        return LoadMetrics(worker_id=0)


def _worker(engine: Engine) -> Worker:
    worker = Worker(None, engine, WorkerConfig(served_model_name="m", model_path="/nowhere", engine_name="burst"))  # type: ignore[arg-type]
    worker.info = EngineInfo(context_length=64, kv_block_size=4, kv_total_blocks=8)
    return worker


async def test_worker_sends_the_outputs_an_engine_holds_as_one_message() -> None:
    bursts = [
        [EngineOutput([1], cached_tokens=2), EngineOutput([2]), EngineOutput([3])],
        [EngineOutput([4])],
        [EngineOutput([5]), EngineOutput([6], "length")],
    ]
    engine = _BurstEngine(bursts)
    worker = _worker(engine)
    payload = encode(PreprocessedRequest("r", "m", [7, 8, 9], stop=StopConditions(max_tokens=6)))
    handler = worker.handle(payload, RequestContext("r"))
    messages: list[EngineOutput] = []
    messages.append(OUTPUT_CODEC.decode(await anext(handler)))
    engine.gate.set()
    messages.append(OUTPUT_CODEC.decode(await anext(handler)))
    engine.gate.set()
    messages += [OUTPUT_CODEC.decode(m) async for m in handler]
    assert messages == [
        EngineOutput([1, 2, 3], cached_tokens=2),  # a burst is one message; a lone output is sent alone
        EngineOutput([4]),
        EngineOutput([5, 6], "length"),
    ]
    tokens = worker.registry.get_sample_value("dynamo_worker_output_tokens_total", {"model": "m"})
    assert tokens is None or tokens == 6  # counted once per request (if the worker exports it)
    assert engine.closed.is_set()


async def test_worker_keeps_outputs_apart_when_logprobs_would_not_line_up() -> None:
    engine = _BurstEngine([[EngineOutput([1]), EngineOutput([2], logprobs=[-0.5]), EngineOutput([3], "length", logprobs=[-1.0])]])
    worker = _worker(engine)
    payload = encode(PreprocessedRequest("r", "m", [7], stop=StopConditions(max_tokens=3)))
    messages = [OUTPUT_CODEC.decode(m) async for m in worker.handle(payload, RequestContext("r"))]
    assert messages == [EngineOutput([1]), EngineOutput([2, 3], "length", logprobs=[-0.5, -1.0])]


async def test_closing_the_worker_stream_while_the_engine_waits_closes_the_engine_stream() -> None:
    engine = _BurstEngine([[EngineOutput([1])], [EngineOutput([2], "length")]])
    worker = _worker(engine)
    handler = worker.handle(encode(PreprocessedRequest("r", "m", [7])), RequestContext("r"))
    assert OUTPUT_CODEC.decode(await anext(handler)) == EngineOutput([1])
    await handler.aclose()  # type: ignore[attr-defined]
    assert engine.closed.is_set()
    assert worker._active == 0


# ------------------------------------------------------------------ NATS parser fast path


class _RecordingClient:
    """What _FastParser needs of a nats-py client, recording what reaches it."""

    def __init__(self) -> None:
        self.direct = {7: self._direct}
        self.stats = {"in_msgs": 0, "in_bytes": 0}
        self.seen: list[tuple[str, int, bytes, bytes, bytes | None]] = []

    def _direct(self, subject: bytes, data: bytes) -> None:
        self.seen.append(("direct", 7, subject, data, None))

    async def _process_msg(self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes | None) -> None:
        if sid in self.direct and not headers:  # as _DirectClient does for what nats-py parsed
            self.direct[sid](subject, data)
        else:
            self.seen.append(("msg", sid, subject, data, headers))

    async def _process_ping(self) -> None:
        self.seen.append(("ping", 0, b"", b"", None))

    async def _process_pong(self) -> None:
        self.seen.append(("pong", 0, b"", b"", None))


_HEADERS = b"NATS/1.0\r\nA: b\r\n\r\n"


@pytest.mark.parametrize("cut", [1, 3, 7, 64, 100_000])
async def test_fast_parser_reads_every_message_whatever_the_read_boundaries(cut: int) -> None:
    from dynamo.runtime.nats_fastpath import _FastParser

    wire = b"".join(
        [
            b"MSG _INBOX.a.1 7 5\r\nhello\r\n",
            b"MSG _INBOX.a.2 7 0\r\n\r\n",
            b"MSG other 3 _INBOX.reply 4\r\n\r\n\r\n\r\n",  # a payload of CR LF CR LF
            b"PING\r\n",
            b"HMSG hdr 3 %d %d\r\n%sabc\r\n" % (len(_HEADERS), len(_HEADERS) + 3, _HEADERS),
            b"MSG _INBOX.a.3 7 3\r\nxyz\r\n",
            b"PONG\r\n",
            b"MSG _INBOX.a.4 7 2\r\nok\r\n",
        ]
    )
    nc = _RecordingClient()
    parser = _FastParser(nc)
    for i in range(0, len(wire), cut):
        await parser.parse(wire[i : i + cut])
    assert [(kind, sid, subject, data) for kind, sid, subject, data, _ in nc.seen] == [
        ("direct", 7, b"_INBOX.a.1", b"hello"),
        ("direct", 7, b"_INBOX.a.2", b""),
        ("msg", 3, b"other", b"\r\n\r\n"),
        ("ping", 0, b"", b""),
        ("msg", 3, b"hdr", b"abc"),
        ("direct", 7, b"_INBOX.a.3", b"xyz"),
        ("pong", 0, b"", b""),
        ("direct", 7, b"_INBOX.a.4", b"ok"),
    ]
    assert nc.seen[4][4] == _HEADERS
    assert parser.buf == bytearray()


# ------------------------------------------------------------------------- chat template rendering


def test_rendering_with_merged_globals_equals_jinja_render() -> None:
    from frontend.tokenizer import _compile_template, _render

    source = (
        "{% for m in messages %}{% if m.role == 'bad' %}{{ raise_exception('no ' ~ m.role) }}{% endif %}"
        "{{ bos_token }}{{ m.role }}:{{ m.content | tojson }}{% for i in range(2) %}.{% endfor %}{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    template = _compile_template(source)
    variables = {"messages": [{"role": "user", "content": "hé \"x\""}], "add_generation_prompt": True, "bos_token": "<s>"}
    assert _render(template, dict(template.globals), **variables) == template.render(**variables)
    import jinja2

    with pytest.raises(jinja2.TemplateError, match="no bad"):
        _render(template, dict(template.globals), messages=[{"role": "bad", "content": ""}])
