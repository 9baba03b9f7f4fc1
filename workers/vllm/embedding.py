"""Embedding models on vLLM (workers/embedding.py's EmbeddingEngine for VllmEngine): the engine
args that start vLLM's pooling runner with the worker's pooling type, and one request's inputs
embedded as concurrent vLLM pooling requests (vLLM batches them in its scheduler). vLLM returns
the pooled vectors unnormalised; the worker truncates and normalises, as for every engine."""

from __future__ import annotations

import asyncio
import dataclasses

import numpy as np
from vllm import PoolingParams
from vllm.config.pooler import PoolerConfig
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.inputs.engine import tokens_input
from vllm.v1.engine.async_llm import AsyncLLM

from dynamo import errors
from dynamo.wire import EmbeddingRequest, PoolingType
from workers.embedding import EmbeddingConfig, PooledBatch

# Our pooling types -> vLLM's sequence pooling types.
VLLM_POOLING = {"last": "LAST", "mean": "MEAN", "cls": "CLS"}


def pooling_engine_args(engine_args: AsyncEngineArgs, config: EmbeddingConfig) -> AsyncEngineArgs:
    """vLLM's pooling runner (a *ForCausalLM converts to an embedding model) pooling our way
    (--pooling-type, in place of a --pooler-config), its own normalisation off."""
    pooler = PoolerConfig(pooling_type=VLLM_POOLING[config.pooling], use_activation=False)
    return dataclasses.replace(engine_args, runner="pooling", pooler_config=pooler)


async def embed(llm: AsyncLLM, request: EmbeddingRequest, pooling: PoolingType, config: EmbeddingConfig) -> PooledBatch:
    """Every input as its own vLLM pooling request, all at once; cancelling aborts those left."""
    if pooling != config.pooling:
        raise errors.InvalidRequest(
            f"this vLLM worker pools with {config.pooling!r} (its --pooling-type); {pooling!r} was asked",
            param="pooling",
        )
    params = PoolingParams(task="embed", use_activation=False)

    async def one(i: int, ids: list[int]) -> np.ndarray:
        stream = llm.encode(tokens_input(list(ids)), params, f"{request.request_id}-{i}")
        try:
            final = None
            async for out in stream:
                final = out
            if final is None:
                raise errors.EngineError(f"vLLM returned nothing for input {i}")
            return final.outputs.data.float().cpu().numpy()
        finally:
            await stream.aclose()  # aborts the request in vLLM if it is still running

    tasks = [asyncio.ensure_future(one(i, ids)) for i, ids in enumerate(request.inputs)]
    try:
        rows = await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    return PooledBatch(np.stack(rows).astype(np.float32), sum(len(ids) for ids in request.inputs))
