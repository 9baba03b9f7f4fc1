"""TrtllmEngine: TensorRT-LLM's `LLM` (its executor runs in worker processes it starts) behind
our Engine interface. NOT VERIFIED against a running TensorRT-LLM: written against 1.2.1's LLM
API; see docs/engines.md."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from dynamo import errors
from dynamo.wire import EngineOutput, KvEventData, LoadMetrics, PreprocessedRequest
from kvbm.block_pool import KvEventSink
from workers.engine import Engine, EngineInfo
from workers.inflight import InflightRequests
from workers.trtllm.args import INSTALL_HINT, TrtllmConfig, with_kv_events
from workers.trtllm.kv_events import TrtllmKvEvents
from workers.trtllm.sampling import finish_reason, sampled_logprobs, sampling_kwargs, top_logprobs
from workers.trtllm.stats import load_from_stats

log = logging.getLogger(__name__)

DEFAULT_TOKENS_PER_BLOCK = 32  # TensorRT-LLM's default KV block size


class TrtllmEngine(Engine):
    name = "trtllm"

    def __init__(self, config: TrtllmConfig) -> None:
        self.config = config
        self.info: EngineInfo | None = None
        self._llm: Any = None
        self._sampling_cls: Any = None
        self._guided_cls: Any = None
        self._events: TrtllmKvEvents | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._load = LoadMetrics(worker_id=0)
        self._inflight = InflightRequests()

    async def start(self, kv_events: KvEventSink | None = None) -> EngineInfo:
        if self._llm is not None:
            raise RuntimeError("trtllm engine already started")
        try:
            from tensorrt_llm import LLM, SamplingParams
            from tensorrt_llm.sampling_params import GuidedDecodingParams
        except ImportError as exc:
            raise SystemExit(f"{INSTALL_HINT} ({exc})") from None
        kwargs = dict(self.config.llm_kwargs)
        follow_events = kv_events is not None and self.config.publish_kv_events
        if follow_events:
            kwargs = with_kv_events(kwargs)
        # Building loads (or compiles) the model in TensorRT-LLM's worker processes: off the loop.
        self._llm = await asyncio.to_thread(lambda: LLM(model=self.config.model, **kwargs))
        self._sampling_cls = SamplingParams
        self._guided_cls = GuidedDecodingParams
        args = self._llm.args
        tokens_per_block = _tokens_per_block(args)
        max_seq_len = int(getattr(args, "max_seq_len", None) or _model_max_len(self.config.model) or 0)
        self.info = EngineInfo(
            context_length=max_seq_len,
            kv_block_size=tokens_per_block,
            kv_total_blocks=0,  # known from the first stats or "created" event
            eos_token_ids=_eos_ids(self.config.model),
        )
        if follow_events:
            assert kv_events is not None
            self._events = TrtllmKvEvents(kv_events, tokens_per_block)
            self._tasks.append(asyncio.create_task(self._follow_events(), name="trtllm-kv-events"))
        self._tasks.append(asyncio.create_task(self._follow_stats(), name="trtllm-stats"))
        log.info("TensorRT-LLM engine up: KV blocks of %d tokens, max_seq_len %d", tokens_per_block, max_seq_len)
        return self.info

    async def stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        llm, self._llm = self._llm, None
        if llm is not None:
            await asyncio.to_thread(llm.shutdown)

    async def _follow_events(self) -> None:
        # get_kv_cache_events_async yields what arrives within `timeout`, then ends: loop on it.
        while self._llm is not None and self._events is not None:
            try:
                async for event in self._llm.get_kv_cache_events_async(timeout=5):
                    self._events.apply(event)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("reading TensorRT-LLM KV events failed", exc_info=True)
                await asyncio.sleep(1.0)

    async def _follow_stats(self) -> None:
        while self._llm is not None:
            try:
                async for stats in self._llm.get_stats_async(timeout=self.config.stats_poll_s):
                    self._load = load_from_stats(stats)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.debug("reading TensorRT-LLM stats failed", exc_info=True)
            await asyncio.sleep(self.config.stats_poll_s)

    async def generate(self, request: PreprocessedRequest) -> AsyncIterator[EngineOutput]:
        llm, info = self._llm, self.info
        if llm is None or info is None:
            raise errors.EngineError("trtllm engine is not running")
        kwargs = sampling_kwargs(
            request,
            info.context_length,
            info.eos_token_ids,
            guided_decoding_backend=self.config.llm_kwargs.get("guided_decoding_backend"),
        )
        if "guided_decoding" in kwargs:
            kwargs["guided_decoding"] = self._guided_cls(**kwargs["guided_decoding"])
        try:
            params = self._sampling_cls(**kwargs)
        except ValueError as exc:  # SamplingParams._validate
            raise errors.InvalidRequest(str(exc)) from None
        try:
            result = llm.generate_async(list(request.token_ids), sampling_params=params, streaming=True)
        except ValueError as exc:  # argument checks: prompt too long, ...
            raise errors.InvalidRequest(str(exc)) from None
        rid = request.request_id
        want_logprobs = request.sampling.logprobs or request.sampling.top_logprobs > 0
        top_k = request.sampling.top_logprobs
        self._inflight.started(rid, len(request.token_ids))
        first = True
        finished = False
        try:
            async for out in result:
                completion = out.outputs[0]
                token_ids = list(completion.token_ids_diff)
                finish = finish_reason(completion.finish_reason)
                if finish is None and out.finished:
                    finish = "stop"
                if not token_ids and finish is None:
                    continue
                chunk = EngineOutput(token_ids=token_ids, finish_reason=finish)
                if first:
                    first = False
                    self._inflight.first_output(rid)
                    chunk.cached_tokens = int(getattr(out, "cached_tokens", 0) or 0)
                if want_logprobs:
                    diff = list(completion.logprobs_diff or [])
                    chunk.logprobs = sampled_logprobs(diff, token_ids)
                    chunk.top_logprobs = top_logprobs(diff, token_ids, top_k)
                yield chunk
                if finish is not None:
                    finished = True
                    return
        except ValueError as exc:
            raise errors.InvalidRequest(str(exc)) from None
        except RuntimeError as exc:  # tensorrt_llm's RequestError and executor failures
            raise errors.EngineError(f"TensorRT-LLM failed request {rid}: {exc}") from None
        finally:
            self._inflight.ended(rid)
            if not finished:
                result.abort()  # frees its KV blocks in the executor

    def load_metrics(self) -> LoadMetrics:
        load = self._load
        total = load.kv_total_blocks or (self._events.total_blocks if self._events else None) or 0
        if self._inflight.lags(load):
            return self._inflight.load(load.kv_active_blocks, total, time.time())
        return LoadMetrics(
            worker_id=0,
            active_requests=load.active_requests,
            waiting_requests=load.waiting_requests,
            kv_active_blocks=load.kv_active_blocks,
            kv_total_blocks=total,
            waiting_prefill_tokens=self._inflight.waiting_prefill_tokens,
            timestamp_s=load.timestamp_s or time.time(),
        )

    def kv_snapshot(self) -> list[KvEventData]:
        return self._events.translator.snapshot() if self._events is not None else []


def _tokens_per_block(args: Any) -> int:
    kv = getattr(args, "kv_cache_config", None)
    for source in (kv, getattr(args, "build_config", None)):
        value = getattr(source, "tokens_per_block", None) if source is not None else None
        if value:
            return int(value)
    return DEFAULT_TOKENS_PER_BLOCK


def _hf_config(model: str) -> dict[str, Any]:
    path = Path(model) / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _model_max_len(model: str) -> int | None:
    value = _hf_config(model).get("max_position_embeddings")
    return int(value) if value else None


def _eos_ids(model: str) -> tuple[int, ...]:
    eos = _hf_config(model).get("eos_token_id")
    if isinstance(eos, int):
        return (eos,)
    return tuple(int(e) for e in eos or ())
