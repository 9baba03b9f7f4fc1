"""POST /v1/embeddings (OpenAI's API): the body's inputs tokenized here, sent as one
EmbeddingRequest to one worker of the embedding model (routed by load: router/modes.py gives
embedding models least-loaded), its float32 vectors answered as JSON floats or base64."""

from __future__ import annotations

import asyncio
import base64
import itertools
import logging
import time
import uuid
from typing import Annotated, Literal

import msgspec
import numpy as np
from fastapi import FastAPI
from msgspec import Meta, Struct
from starlette.routing import Route

from dynamo import errors
from dynamo.wire import EMBEDDING_OUTPUT_CODEC, EmbeddingOutput, EmbeddingRequest, PreprocessedRequest, encode
from frontend.config import FrontendConfig
from frontend.errors import http_error
from frontend.metrics import FrontendMetrics
from frontend.models import ModelManager, ServedModel
from frontend.endpoint import ApiEndpoint, InflightLimit, JsonReply, Reply
from frontend.schemas import ApiOperation, PromptItem, decode_struct
from frontend.tokenizer import ModelTokenizer

log = logging.getLogger(__name__)

ENDPOINT_LABEL = "embeddings"
# Lists of strings longer than this are tokenized in a thread (tokenizers releases the GIL and
# encodes a batch in parallel), so a large request does not stall every other stream.
_THREAD_TOKENIZE_TEXTS = 8

# ------------------------------------------------------------------------------------ schemas


class EmbeddingsBody(Struct, kw_only=True, forbid_unknown_fields=True):
    """OpenAI's embeddings request. `input`: a string, a list of strings, a list of token ids,
    or a list of token-id lists."""

    model: str
    input: str | list[PromptItem]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Meta(ge=1)] | None = None
    user: str | None = None


class EmbeddingObject(Struct, kw_only=True):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str  # base64: the float32 values, little-endian


class EmbeddingsUsage(Struct):
    prompt_tokens: int
    total_tokens: int


class EmbeddingsResponse(Struct, kw_only=True):
    object: Literal["list"] = "list"
    data: list[EmbeddingObject]
    model: str
    usage: EmbeddingsUsage


_DECODER = msgspec.json.Decoder(EmbeddingsBody)
_encode = msgspec.json.encode

_INPUT_SHAPES = "input must be a string, a list of strings, a list of token ids, or a list of token-id lists"


# ------------------------------------------------------------------------------ preprocessing


def check_embedding_model(model: ServedModel) -> None:
    if model.card.model_type != "embedding":
        raise errors.InvalidRequest(
            f"model {model.name!r} is a generative model: it does not serve /v1/embeddings "
            "(use /v1/chat/completions or /v1/completions)",
            param="model",
        )


def tokenize_inputs(body: EmbeddingsBody, tokenizer: ModelTokenizer, context_length: int) -> list[list[int]]:
    """Every input as token ids (strings with the tokenizer's special tokens, as vLLM does),
    refusing empty, mixed, out-of-vocabulary and over-long inputs with a 400 naming the input."""
    items = body.input
    if isinstance(items, str):
        inputs = [tokenizer.encode(items, add_special_tokens=True)]
    elif not items:
        raise errors.InvalidRequest("input must not be an empty list", param="input")
    elif all(isinstance(i, int) for i in items):
        inputs = [list(items)]  # type: ignore[arg-type]  # one input as token ids
    elif all(isinstance(i, str) for i in items):
        texts: list[str] = items  # type: ignore[assignment]
        if len(texts) == 1:
            inputs = [tokenizer.encode(texts[0], add_special_tokens=True)]
        else:
            inputs = [e.ids for e in tokenizer.tokenizer.encode_batch(texts, add_special_tokens=True)]
    elif all(isinstance(i, list) for i in items):
        inputs = items  # type: ignore[assignment]
    else:
        raise errors.InvalidRequest(_INPUT_SHAPES, param="input")
    vocab = tokenizer.vocab_size
    single = len(inputs) == 1
    for i, ids in enumerate(inputs):
        param = "input" if single else f"input[{i}]"
        if not ids:
            raise errors.InvalidRequest(f"{param} is empty: it has no tokens", param=param)
        if len(ids) > context_length:
            raise errors.InvalidRequest(
                f"{param} has {len(ids)} tokens; this model's context is {context_length} tokens",
                param=param,
            )
        if max(ids) >= vocab:
            raise errors.InvalidRequest(f"{param} has a token id outside the vocabulary (size {vocab})", param=param)
    return inputs


def response_body(output: EmbeddingOutput, n: int, model: str, encoding_format: str) -> bytes:
    """The OpenAI response for a worker's vectors: JSON floats, or base64 of each vector's
    little-endian float32 bytes (what the openai client asks for by default)."""
    if len(output.data) != 4 * n * output.dim:
        raise errors.StreamBroken(f"worker sent {len(output.data)} bytes for {n} vectors of {output.dim}")
    data: list[EmbeddingObject]
    if encoding_format == "base64":
        view = memoryview(output.data)
        step = 4 * output.dim
        data = [
            EmbeddingObject(index=i, embedding=base64.b64encode(view[i * step : (i + 1) * step]).decode("ascii"))
            for i in range(n)
        ]
    else:
        rows = np.frombuffer(output.data, dtype="<f4").reshape(n, output.dim).tolist()
        data = [EmbeddingObject(index=i, embedding=row) for i, row in enumerate(rows)]
    usage = EmbeddingsUsage(prompt_tokens=output.prompt_tokens, total_tokens=output.prompt_tokens)
    return _encode(EmbeddingsResponse(data=data, model=model, usage=usage))


# -------------------------------------------------------------------------------------- serving


class EmbeddingsService:
    """Serves one embeddings request: parse, tokenize, route by load, call one worker (another
    when the chosen one is gone or full: embedding is idempotent), encode."""

    def __init__(self, manager: ModelManager, metrics: FrontendMetrics, config: FrontendConfig) -> None:
        self.manager = manager
        self.metrics = metrics
        self.max_dispatch_attempts = config.max_dispatch_attempts
        self.request_timeout_s = config.request_timeout_s

    async def handle(self, body: bytes, arrived_s: float) -> Reply:
        model_label = "unknown"
        status = "error"
        inflight = None
        try:
            request = decode_struct(_DECODER, body)
            model = await self.manager.acquire(request.model)  # waits for a scaled-to-zero model
            model_label = model.name
            await model.wait_open()
            check_embedding_model(model)
            tokenizer = model.tokenizer
            assert tokenizer is not None
            request_id = uuid.uuid4().hex
            if request.user is not None:
                log.info("request %s: user %r", request_id, request.user)
            context = model.card.context_length
            if isinstance(request.input, list) and len(request.input) > _THREAD_TOKENIZE_TEXTS:
                inputs = await asyncio.to_thread(tokenize_inputs, request, tokenizer, context)
            else:
                inputs = tokenize_inputs(request, tokenizer, context)
            inflight = self.metrics.for_model(model.name).inflight
            inflight.inc()
            wire = EmbeddingRequest(
                request_id=request_id, model=model.name, inputs=inputs, dimensions=request.dimensions
            )
            if self.request_timeout_s > 0:
                try:
                    async with asyncio.timeout(self.request_timeout_s - (time.perf_counter() - arrived_s)):
                        output = await self._dispatch(model, wire)
                except TimeoutError:
                    raise errors.RequestTimeout(
                        f"no embeddings within the request timeout of {self.request_timeout_s}s"
                    ) from None
            else:
                output = await self._dispatch(model, wire)
            reply = response_body(output, len(inputs), request.model, request.encoding_format)
            status = "success"
            return JsonReply(reply)
        except asyncio.CancelledError:
            status = "cancelled"
            raise
        finally:
            if inflight is not None:
                inflight.dec()
                self.metrics.for_model(model_label).duration.observe(time.perf_counter() - arrived_s)
            self.metrics.count(model_label, ENDPOINT_LABEL, "unary", status)

    async def _dispatch(self, model: ServedModel, request: EmbeddingRequest) -> EmbeddingOutput:
        router, client = model.router, model.client
        if router is None or client is None:
            raise errors.NoInstances(f"model {model.name!r} has no live workers")
        payload = encode(request)
        # The router weighs work by prompt tokens: it sees the inputs as one prompt.
        routed = PreprocessedRequest(
            request_id=request.request_id,
            model=request.model,
            token_ids=list(itertools.chain.from_iterable(request.inputs)),
        )
        tried: list[int] = []
        last_error: errors.DynamoError | None = None
        for _ in range(self.max_dispatch_attempts):
            candidates = [i for i in model.instance_ids() if i not in tried]
            if not candidates:
                break
            instance_id = (await router.select(routed, candidates)).instance_id
            tried.append(instance_id)
            try:
                async with await client.generate(payload, instance_id, request.request_id) as stream:
                    frames = [frame async for frame in stream]
                if frames:
                    return EMBEDDING_OUTPUT_CODEC.decode(frames[0])
                last_error = errors.StreamBroken(f"worker {instance_id:x} ended the stream without output")
            except (errors.InstanceUnavailable, errors.StreamBroken, errors.Overloaded) as exc:
                last_error = exc
            finally:
                router.request_finished(request.request_id, instance_id)
            log.warning("embeddings %s: instance %x failed, retrying: %s", request.request_id, instance_id, last_error)
        if last_error is not None:
            raise last_error
        raise errors.NoInstances(f"model {model.name!r} has no live workers")


def register_embeddings(app: FastAPI, manager: ModelManager, metrics: FrontendMetrics, config: FrontendConfig) -> None:
    """POST /v1/embeddings, under the frontend's in-flight limit (create_app's, when set)."""
    limit: InflightLimit | None = getattr(app.state, "inflight_limit", None)
    service = EmbeddingsService(manager, metrics, config)
    endpoint = ApiEndpoint(service.handle, http_error, config.max_request_body_bytes, limit)
    app.router.routes.append(Route("/v1/embeddings", endpoint, methods=["POST"]))


OPENAPI_OPERATIONS = (ApiOperation("/v1/embeddings", "post", "Embeddings", EmbeddingsResponse, EmbeddingsBody),)
