"""One request end to end: parse, preprocess, open one worker stream per choice, then turn the
streams' outputs into typed per-choice deltas (frontend/outputs.py) for the API encoders.

`Pipeline.open` does everything up to and including every choice's first output, so each error
a request can meet before its first token becomes a proper HTTP status; later errors end the
stream with an error event, unless the choice can migrate to another worker
(frontend/choice_stream.py)."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Literal, TypeVar

from dynamo import errors, tracing
from dynamo.logs import request_id_var
from dynamo.wire import EngineOutput
from frontend.choice_stream import ChoiceStream, DispatchPolicy
from frontend.metrics import FrontendMetrics, ModelMetrics
from frontend.models import ModelManager, ServedModel
from frontend.outputs import ChoiceAccumulator, ChoiceDelta, ChoiceResult
from frontend.postprocess import ChoiceOutput, TokenTexts
from frontend.preprocess import ParserNames, Prepared, preprocess_chat, preprocess_completion, reasoning_parser_for
from frontend.rate_limit import CURRENT_ADMISSION
from frontend.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    PromptTokensDetails,
    Usage,
    decode_chat_request,
    decode_completion_request,
)
from frontend.session import request_session, with_session

log = logging.getLogger(__name__)

EndpointKind = Literal["chat", "completion"]

ENDPOINT_LABEL = {"chat": "chat_completions", "completion": "completions"}

# Bodies above this are preprocessed in a thread: tokenizers releases the GIL, and tokenizing a
# long prompt on the event loop would stall every other stream (~3 us/token on a busy core).
_THREAD_PREPROCESS_BYTES = 16 * 1024

P = TypeVar("P")


async def _run(body_bytes: int, fn: Callable[..., P], *args: object) -> P:
    if body_bytes > _THREAD_PREPROCESS_BYTES:
        return await asyncio.to_thread(fn, *args)
    return fn(*args)


@dataclass(frozen=True, slots=True)
class PipelineConfig:
    # Instances tried for one request when the chosen one turns out dead before answering.
    max_dispatch_attempts: int = 3
    # None: each model's card decides; otherwise overrides every card (frontend/config.py).
    migration_limit: int | None = None
    request_timeout_s: float = 0.0
    # A request without a session header uses its `user` as the session id (frontend/session.py).
    session_from_user: bool = False


class Pipeline:
    def __init__(self, manager: ModelManager, metrics: FrontendMetrics, config: PipelineConfig | None = None) -> None:
        self.manager = manager
        self.metrics = metrics
        self.config = config or PipelineConfig()
        self._policy = DispatchPolicy(self.config.max_dispatch_attempts, self.config.migration_limit)

    async def open(self, kind: EndpointKind, body: bytes, arrived_s: float, body_bytes: int = 0) -> RequestGeneration:
        """Parse an OpenAI body and open it. Raises DynamoError for anything that should become
        an HTTP error status."""
        try:
            request: ChatCompletionRequest | CompletionRequest = (
                decode_chat_request(body) if kind == "chat" else decode_completion_request(body)
            )
        except errors.DynamoError:
            self.metrics.count("unknown", ENDPOINT_LABEL[kind], "unary", "error")
            raise
        return await self.open_request(ENDPOINT_LABEL[kind], request, arrived_s, len(body))

    async def open_request(
        self,
        endpoint: str,
        body: ChatCompletionRequest | CompletionRequest,
        arrived_s: float,
        body_bytes: int = 0,
    ) -> RequestGeneration:
        """Preprocess, route and wait for every choice's first output. `endpoint` is the
        metrics label (the API the request came in on)."""
        model_label = "unknown"
        try:
            model = await self.manager.acquire(body.model)  # waits for a scaled-to-zero model
            model_label = model.name
            if model.card.model_type == "embedding":
                raise errors.InvalidRequest(
                    f"model {model.name!r} is an embedding model: it serves /v1/embeddings, not chat or completions",
                    param="model",
                )
            await model.wait_open()
            assert model.tokenizer is not None
            request_id = uuid.uuid4().hex
            request_id_var.set(request_id)  # this request's task logs under its id
            preprocess_s = time.perf_counter()
            if isinstance(body, ChatCompletionRequest):
                parsers = ParserNames(model.card.tool_call_parser or None, model.card.reasoning_parser or None)
                prepared = await _run(body_bytes, preprocess_chat, body, model.card, model.tokenizer, request_id, parsers)
            else:
                prepared = await _run(body_bytes, preprocess_completion, body, model.card, model.tokenizer, request_id)
        except errors.DynamoError:
            # Unknown names are not used as labels: clients control them (unbounded cardinality).
            self.metrics.count(model_label, endpoint, "unary", "error")
            raise
        if tracing.active and tracing.recording():
            # The current span is the request's server span (frontend/endpoint.py).
            tracing.annotate({"dynamo.request_id": request_id, "dynamo.model": model.name})
            tracing.emit(
                "preprocess", tracing.CURRENT, preprocess_s, time.perf_counter(),
                {"dynamo.prompt_tokens": prepared.prompt_tokens, "dynamo.choices": len(prepared.choices)},
            )
        if body.user is not None:
            # OpenAI's `user` identifies the end user for abuse monitoring: it goes to the log.
            log.info("request %s: user %r", request_id, body.user)
        session = request_session(body.user, self.config.session_from_user)
        if session:
            prepared = with_session(prepared, session)
        kind: EndpointKind = "chat" if isinstance(body, ChatCompletionRequest) else "completion"
        generation = RequestGeneration(kind, endpoint, model, prepared, arrived_s, self)
        await generation.open(self.config.request_timeout_s)
        admission = CURRENT_ADMISSION.get()
        if admission is not None:
            # The tenant's token buckets (frontend/rate_limit.py): the real prompt size now,
            # and where to read the output count when the request ends.
            admission.opened(prepared.prompt_tokens, lambda: generation.usage().completion_tokens)
        return generation


class RequestGeneration:
    """An opened request: one ChoiceStream and one ChoiceOutput per choice. Implements
    frontend.outputs.Generation. Every path out of `bursts()`/`results()` closes it, and
    `close()` may be called again safely."""

    def __init__(
        self,
        kind: EndpointKind,
        endpoint: str,
        model: ServedModel,
        prepared: Prepared,
        arrived_s: float,
        pipeline: Pipeline,
    ) -> None:
        self.kind = kind
        self.endpoint = endpoint
        self.prepared = prepared
        self.arrived_s = arrived_s
        self.response_id = ("chatcmpl-" if kind == "chat" else "cmpl-") + prepared.request_id
        self.created = int(time.time())
        self.model = prepared.model
        self.num_choices = len(prepared.choices)
        self.status = "cancelled"
        self._model = model
        self._pipeline = pipeline
        self._frontend_metrics = pipeline.metrics
        self.metrics: ModelMetrics = pipeline.metrics.for_model(model.name)
        self.request_type = "stream" if prepared.stream else "unary"
        tokenizer = model.tokenizer
        assert tokenizer is not None
        texts = TokenTexts(tokenizer) if prepared.output.logprobs else None
        self.streams = [
            ChoiceStream(c.request, model, pipeline.manager, pipeline._policy, pipeline.metrics)
            for c in prepared.choices
        ]
        self.outputs = [
            ChoiceOutput(c.index, prepared.output, tokenizer, texts, c.echo_text, c.request.token_ids) for c in prepared.choices
        ]
        self._firsts: list[EngineOutput] = []
        self._closed = False
        self._timer: asyncio.TimerHandle | None = None
        self._deadline: float | None = None
        self._timeout_s = 0.0
        self.metrics.inflight.inc()
        self.metrics.input_tokens.observe(prepared.prompt_tokens)

    # ------------------------------------------------------------------------------ open

    async def open(self, timeout_s: float) -> None:
        try:
            if timeout_s > 0:
                self._timeout_s = timeout_s
                loop = asyncio.get_running_loop()
                self._deadline = loop.time() + timeout_s - (time.perf_counter() - self.arrived_s)
                for s in self.streams:
                    s.deadline = self._deadline
                try:
                    async with asyncio.timeout_at(self._deadline):
                        await self._open_all()
                except TimeoutError:
                    raise errors.RequestTimeout(f"no output within the request timeout of {timeout_s}s") from None
                # From now on the deadline fails the worker streams: a timer instead of a
                # per-token timeout keeps the token path free of timer work.
                self._timer = loop.call_at(self._deadline, self._on_deadline)
            else:
                await self._open_all()
        except asyncio.CancelledError:
            await self.close("cancelled")
            raise
        except BaseException:
            await self.close("error")
            raise
        self.metrics.ttft.observe(time.perf_counter() - self.arrived_s)

    async def _open_all(self) -> None:
        if len(self.streams) == 1:
            self._firsts = [await self.streams[0].open()]
            return
        tasks = [asyncio.ensure_future(s.open()) for s in self.streams]
        try:
            self._firsts = list(await asyncio.gather(*tasks))
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    def _on_deadline(self) -> None:
        error = errors.RequestTimeout(f"request {self.prepared.request_id} timed out")
        for s in self.streams:
            s.abort(error)

    @property
    def finished(self) -> bool:
        """Every choice has its finish_reason."""
        return all(o.finish_reason is not None for o in self.outputs)

    @property
    def stream(self) -> bool:
        return self.prepared.stream

    @property
    def include_usage(self) -> bool:
        return self.prepared.include_usage

    # ---------------------------------------------------------------------------- outputs

    def usage(self) -> Usage:
        completion = sum(o.completion_tokens for o in self.outputs)
        prompt = self.prepared.prompt_tokens
        cached = sum(s.cached_tokens for s, c in zip(self.streams, self.prepared.choices) if c.index % self._n() == 0)
        return Usage(
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=prompt + completion,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
        )

    def _n(self) -> int:
        choices = self.prepared.choices
        prompts = choices[-1].prompt_index + 1
        return len(choices) // prompts

    def _feed(self, i: int, outs: list[EngineOutput], deltas: list[ChoiceDelta]) -> None:
        output = self.outputs[i]
        for out in outs:
            delta = output.feed(out)
            if delta is not None:
                deltas.append(delta)
            if output.finish_reason is not None:
                self.streams[i].finished()
                return

    async def bursts(self) -> AsyncIterator[list[ChoiceDelta]]:
        """Every choice's deltas, a burst at a time: all that had arrived when asked.

        The one-choice case (nearly every request) is this generator's own loop rather than a
        generator it delegates to: each level of async generators costs every burst a resume."""
        self.status = "cancelled"
        try:
            if len(self.streams) == 1:
                stream, output = self.streams[0], self.outputs[0]
                feed = output.feed
                itl = self.metrics.itl
                perf_counter = time.perf_counter
                deltas: list[ChoiceDelta] = []
                self._feed(0, [self._firsts[0], *stream.take_pending()], deltas)
                last = perf_counter()
                if deltas:
                    yield deltas
                while output.finish_reason is None:
                    outs = await stream.next_burst(output.generated)
                    now = perf_counter()
                    deltas = []
                    n = 0
                    for out in outs:
                        n += len(out.token_ids)
                        delta = feed(out)
                        if delta is not None:
                            deltas.append(delta)
                        if output.finish_reason is not None:
                            stream.finished()
                            break
                    if n:  # one observation per burst: the mean gap of its tokens
                        itl.observe((now - last) / n)
                    last = now
                    if deltas:
                        yield deltas
            else:
                async for burst in self._merged():
                    yield burst
            self.status = "success"
        except errors.DynamoError as exc:
            self.status = "error"
            log.warning("request %s failed mid-stream: %s", self.prepared.request_id, exc.message)
            for stream in self.streams:  # traced: the answer went out 200, the spans say it failed
                tracing.fail(stream.span, exc)
            raise
        finally:
            await self.close(self.status)

    async def _merged(self) -> AsyncIterator[list[ChoiceDelta]]:
        """n choices (or several prompts): one reader task per choice feeding one queue; each
        burst is whatever the queue holds when the consumer asks."""
        queue: asyncio.Queue[tuple[int, list[EngineOutput] | BaseException]] = asyncio.Queue()

        async def pump(i: int) -> None:
            stream, output = self.streams[i], self.outputs[i]
            try:
                outs = [self._firsts[i], *stream.take_pending()]
                queue.put_nowait((i, outs))
                # Read until the worker says it is done (the consumer may finish the choice
                # earlier, on max_tokens or a stop string, and then cancels this task).
                while not any(o.finish_reason is not None for o in outs):
                    outs = await stream.next_burst(output.generated)
                    queue.put_nowait((i, outs))
            except asyncio.CancelledError:
                raise
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which raises it
                queue.put_nowait((i, exc))

        tasks = [asyncio.create_task(pump(i), name=f"choice-{i}") for i in range(len(self.streams))]
        try:
            while any(o.finish_reason is None for o in self.outputs):
                items = [await queue.get()]
                while not queue.empty():
                    items.append(queue.get_nowait())
                deltas: list[ChoiceDelta] = []
                for i, item in items:
                    if isinstance(item, BaseException):
                        raise item
                    if self.outputs[i].finish_reason is None:
                        self._feed(i, item, deltas)
                        if self.outputs[i].finish_reason is not None:
                            tasks[i].cancel()
                if deltas:
                    yield deltas
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def results(self) -> list[ChoiceResult]:
        accumulators = [ChoiceAccumulator(c.index) for c in self.prepared.choices]
        async for burst in self.bursts():
            for delta in burst:
                accumulators[delta.index].add(delta)
        return [a.result() for a in accumulators]

    # ---------------------------------------------------------------------------- closing

    async def aclose(self) -> None:
        """Close with the status reached so far (cancelled unless it ran to its end)."""
        await self.close(self.status)

    async def close(self, status: str) -> None:
        if self._closed:
            return
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        try:
            for stream, output in zip(self.streams, self.outputs):
                await stream.close(output.worker_finished)
        finally:
            m = self.metrics
            m.inflight.dec()
            m.duration.observe(time.perf_counter() - self.arrived_s)
            if status == "success":
                m.output_tokens.observe(sum(o.completion_tokens for o in self.outputs))
            self._frontend_metrics.count(self._model.name, self.endpoint, self.request_type, status)


def reasoning_available(pipeline: Pipeline, model: ServedModel) -> bool:
    """Whether the pipeline splits this model's reasoning from its answer (a reasoning parser
    configured for the frontend or the model, or recognised from its chat template): what
    Anthropic's `thinking` and the Responses `reasoning` need. Call after `model.wait_open()`."""
    assert model.tokenizer is not None
    names = ParserNames(None, model.card.reasoning_parser or None)
    return reasoning_parser_for(model.tokenizer, names, {}) is not None
