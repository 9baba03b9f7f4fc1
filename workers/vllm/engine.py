"""VllmEngine: vLLM's AsyncLLM in this process (its engine core is a child process it spawns),
behind our Engine interface: token-delta streams, aborts on cancel, re-hashed KV events, load."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from http import HTTPStatus
from collections.abc import AsyncIterator
from typing import Any

import msgspec

from vllm.config.kv_events import KVEventsConfig
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.exceptions import GracefulHTTPError, VLLMClientError
from vllm.inputs.engine import tokens_input
from vllm.usage.usage_lib import UsageContext
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError

from dynamo import errors
from dynamo.kv_hash import block_hashes
from dynamo.wire import (
    EmbeddingRequest,
    EngineOutput,
    KvAgentInfo,
    KvEventData,
    KvLayoutSpec,
    LoadMetrics,
    PoolingType,
    PreprocessedRequest,
)
from kvbm.block_pool import KvEventSink
from workers.embedding import EmbeddingConfig, PooledBatch
from workers.engine import Engine, EngineInfo
from workers.inflight import InflightRequests
from workers.vllm.args import VllmConfig
from workers.vllm.connector import kv_transfer_config
from workers.vllm.connector.offload import KvbmView
from workers.vllm.embedding import embed, pooling_engine_args
from workers.vllm.kv_events import KvEventSubscriber, KvEventTranslator
from workers.vllm.logprobs import prompt_logprobs, sample_logprobs
from workers.vllm.replay import PROCESSOR_FQCN
from workers.vllm.sampling import FINISH_REASONS, ConstraintValidator, invalid_request, sampling_params
from workers.vllm.stats import SchedulerSnapshot, stat_logger_factory

log = logging.getLogger(__name__)

# What a vLLM decode worker advertises as its transfer backend in RemotePrefillRequest.
CONNECTOR_BACKEND = "vllm-connector"


class VllmEngine(Engine):
    name = "vllm"

    def __init__(self, config: VllmConfig) -> None:
        self.config = config
        self.info: EngineInfo | None = None
        self._llm: AsyncLLM | None = None
        self._subscriber: KvEventSubscriber | None = None
        self._translator: KvEventTranslator | None = None
        self._stats = SchedulerSnapshot()
        self._inflight = InflightRequests()
        # Whether vLLM runs our migration-replay logits processor (workers/vllm/replay.py).
        self._replay = False
        self._validator: ConstraintValidator | None = None
        self._embedding: EmbeddingConfig | None = None  # serving an embedding model (workers/vllm/embedding.py)
        self._kv_layout: KvLayoutSpec | None = None  # --role prefill|decode: the connector's layout
        self._kvbm: KvbmView | None = None  # --kvbm-*: the tiers' counters, fed from vLLM's engine core

    # ---------------------------------------------------------------------------- lifecycle

    async def start(self, kv_events: KvEventSink | None = None) -> EngineInfo:
        if self._llm is not None:
            raise RuntimeError("vllm engine already started")
        engine_args = self.config.engine_args
        subscriber = None
        if kv_events is not None and self.config.publish_kv_events:
            engine_args, subscriber = self._kv_events_wiring(engine_args, kv_events)
        if self._embedding is not None:  # the pooling runner: no sampling, no replay processor
            engine_args = pooling_engine_args(engine_args, self._embedding)
        else:
            engine_args = self._with_replay(engine_args)
            if self.config.kvbm.enabled:
                self._watch_kvbm()
        engine_args = self._with_connectors(engine_args)
        try:
            # Building AsyncLLM blocks for as long as the engine core takes to load the model and
            # profile memory (tens of seconds): keep it off the event loop. AsyncLLM starts its
            # output handler lazily on the first request, on this loop.
            self._llm = await asyncio.to_thread(self._build, engine_args)
        except BaseException:
            if subscriber is not None:
                await subscriber.stop()
            raise
        vllm_config = self._llm.vllm_config
        processor = self._llm.input_processor
        self._validator = ConstraintValidator(
            processor.model_config, processor.structured_outputs_config, processor.tokenizer
        )
        hf_eos = getattr(vllm_config.model_config.hf_config, "eos_token_id", None)
        eos_ids = (hf_eos,) if isinstance(hf_eos, int) else tuple(hf_eos or ())
        self.info = EngineInfo(
            context_length=vllm_config.model_config.max_model_len,
            kv_block_size=vllm_config.cache_config.block_size,
            kv_total_blocks=vllm_config.cache_config.num_gpu_blocks or 0,
            eos_token_ids=eos_ids,
        )
        if subscriber is not None:
            assert self._translator is not None
            self._translator.block_size_tokens = self.info.kv_block_size
            self._subscriber = subscriber
            subscriber.start()
        if self.config.role != "aggregated":
            await self._learn_kv_layout()
        log.info(
            "vLLM engine up: %d KV blocks of %d tokens, context %d",
            self.info.kv_total_blocks, self.info.kv_block_size, self.info.context_length,
        )
        return self.info

    async def stop(self) -> None:
        subscriber, self._subscriber = self._subscriber, None
        if subscriber is not None:
            await subscriber.stop()
        llm, self._llm = self._llm, None
        if llm is not None:
            # Joins the engine core process: blocking, so off the loop.
            await asyncio.to_thread(llm.shutdown)

    def _build(self, engine_args: AsyncEngineArgs) -> AsyncLLM:
        return AsyncLLM.from_engine_args(
            engine_args,
            usage_context=UsageContext.ENGINE_CONTEXT,
            stat_loggers=[stat_logger_factory(self._stats)],
        )

    def _with_replay(self, engine_args: AsyncEngineArgs) -> AsyncEngineArgs:
        """The engine args with our migration-replay logits processor added to the user's own,
        so that a migrated request resumes its grammar and penalties. vLLM refuses custom logits
        processors with speculative decoding: there, such migrations are refused instead."""
        self._replay = engine_args.speculative_config is None
        if not self._replay:
            log.warning("speculative decoding is on: migrated constrained or penalised requests will be refused")
            return engine_args
        processors = list(engine_args.logits_processors or [])
        if PROCESSOR_FQCN not in processors:
            processors.append(PROCESSOR_FQCN)
        return dataclasses.replace(engine_args, logits_processors=processors)

    def _watch_kvbm(self) -> None:
        """The KVBM tiers' counters here: they come out of vLLM's engine core with its stats
        (the offload connector itself is installed by _with_connectors)."""
        self._kvbm = KvbmView(self.config.kvbm)
        self._stats.on_connector_stats = self._kvbm.apply

    @property
    def kvbm(self) -> KvbmView | None:
        return self._kvbm

    def _with_connectors(self, engine_args: AsyncEngineArgs) -> AsyncEngineArgs:
        """Our KV connectors (workers/vllm/connector: transfer for --role prefill|decode, KVBM
        offload), unless the user passed a kv_transfer_config of their own."""
        config = kv_transfer_config(self.config)
        if config is None:
            return engine_args
        if engine_args.kv_transfer_config is not None:
            raise errors.EngineError(
                "--kv-transfer-config conflicts with the worker's own KV connectors (--role, --kvbm-*): "
                "pass one or the other"
            )
        return dataclasses.replace(engine_args, kv_transfer_config=config)

    def _kv_events_wiring(
        self, engine_args: AsyncEngineArgs, kv_events: KvEventSink
    ) -> tuple[AsyncEngineArgs, KvEventSubscriber]:
        """Our SUB socket and the engine args that make vLLM publish to it. A user's own
        zmq KVEventsConfig is kept and subscribed to; otherwise vLLM's PUB connects to us."""
        # The real block size is known only once the engine is up; start() sets it.
        self._translator = KvEventTranslator(kv_events, engine_args.block_size or 16)
        user = engine_args.kv_events_config
        if user is not None and user.enable_kv_cache_events and user.publisher == "zmq":
            subscriber = KvEventSubscriber(self._translator, user.topic)
            subscriber.connect(user.endpoint)
            return engine_args, subscriber
        subscriber = KvEventSubscriber(self._translator)
        endpoint = subscriber.bind_loopback()
        config = KVEventsConfig(enable_kv_cache_events=True, publisher="zmq", endpoint=endpoint)
        return dataclasses.replace(engine_args, kv_events_config=config), subscriber

    # ------------------------------------------------------------------------------ serving

    def generate(self, request: PreprocessedRequest) -> AsyncIterator[EngineOutput]:
        return self._generate(request)

    async def _generate(
        self,
        request: PreprocessedRequest,
        kv_params: dict[str, Any] | None = None,
        kv_out: dict[str, Any] | None = None,
    ) -> AsyncIterator[EngineOutput]:
        """`kv_params`: the request's kv_transfer_params for our connectors; `kv_out` receives
        the ones vLLM returns with the final output."""
        llm, info = self._llm, self.info
        if llm is None or info is None:
            raise errors.EngineError("vllm engine is not running")
        if llm.errored:
            raise errors.EngineError(f"vllm engine is dead: {llm.dead_error}")
        params = sampling_params(
            request, info.context_length, info.eos_token_ids, replay_available=self._replay, validator=self._validator
        )
        request_id = request.request_id
        want_logprobs = params.logprobs is not None
        top_k = request.sampling.top_logprobs
        want_prompt_logprobs = params.prompt_logprobs is not None
        if kv_params is not None:
            params.extra_args = {**(params.extra_args or {}), "kv_transfer_params": kv_params}
        stream = llm.generate(tokens_input(list(request.token_ids)), params, request_id)
        self._inflight.started(request_id, len(request.token_ids))
        first = True
        try:
            async for out in stream:
                completion = out.outputs[0]
                token_ids = list(completion.token_ids)
                reason = completion.finish_reason
                finish = FINISH_REASONS.get(reason, "stop") if reason is not None else None
                if finish == "error":
                    raise errors.EngineError(f"vLLM failed request {request_id}")
                if not token_ids and finish is None:
                    continue
                chunk = EngineOutput(token_ids=token_ids, finish_reason=finish)
                if first:
                    first = False
                    self._inflight.first_output(request_id)
                    chunk.cached_tokens = out.num_cached_tokens
                if want_prompt_logprobs and out.prompt_logprobs is not None:
                    want_prompt_logprobs = False  # DELTA: vLLM sends them once, with the first output
                    chunk.prompt_logprobs = prompt_logprobs(out.prompt_logprobs, request.token_ids, params.prompt_logprobs)
                if want_logprobs and completion.logprobs is not None:
                    chunk.logprobs, chunk.top_logprobs = sample_logprobs(completion.logprobs, token_ids, top_k)
                if finish is not None and kv_out is not None and out.kv_transfer_params:
                    kv_out.update(out.kv_transfer_params)
                yield chunk
                if finish is not None:
                    return
        except EngineDeadError as exc:
            raise errors.EngineError(f"vllm engine died: {exc}") from None
        except (VLLMClientError, ValueError) as exc:  # request validation: prompt too long, ...
            raise invalid_request(exc) from None
        except GracefulHTTPError as exc:  # admission control: the queue is full
            if exc.http_status == HTTPStatus.SERVICE_UNAVAILABLE:
                raise errors.Overloaded(exc.message) from None
            raise errors.InvalidRequest(exc.message) from None
        except EngineGenerateError as exc:
            raise errors.EngineError(f"vLLM failed request {request_id}: {exc.__cause__!r}") from None
        finally:
            self._inflight.ended(request_id)
            # Closing vLLM's stream while the request runs (we were closed or cancelled) makes
            # vLLM abort it, freeing its KV blocks at once.
            await stream.aclose()

    def load_metrics(self) -> LoadMetrics:
        stats = self._stats
        total = self.info.kv_total_blocks if self.info is not None else 0
        inflight = self._inflight
        if inflight.count == 0 or not stats.seen:
            # vLLM reports stats only after a step; when nothing runs the last report is stale.
            running, waiting = inflight.running, inflight.waiting
            kv_active = round(stats.kv_cache_usage * total) if inflight.count else 0
        else:
            running, waiting = stats.num_running, stats.num_waiting
            kv_active = round(stats.kv_cache_usage * total)
        return LoadMetrics(
            worker_id=0,
            active_requests=running,
            waiting_requests=waiting,
            kv_active_blocks=kv_active,
            kv_total_blocks=total,
            waiting_prefill_tokens=inflight.waiting_prefill_tokens,
            timestamp_s=time.time(),
        )

    def kv_snapshot(self) -> list[KvEventData]:
        return self._translator.snapshot() if self._translator is not None else []

    # ------------------------------------------- embeddings (workers/vllm/embedding.py)

    def enable_embeddings(self, config: EmbeddingConfig) -> None:
        self._embedding = config

    @property
    def embedding_dim(self) -> int:
        return int(self._llm.vllm_config.model_config.embedding_size) if self._llm is not None else 0

    async def embed(self, request: EmbeddingRequest, pooling: PoolingType) -> PooledBatch:
        llm, config = self._llm, self._embedding
        if llm is None or config is None:
            raise errors.EngineError("vllm engine is not running an embedding model")
        try:
            return await embed(llm, request, pooling, config)
        except EngineDeadError as exc:
            raise errors.EngineError(f"vllm engine died: {exc}") from None
        except (VLLMClientError, ValueError) as exc:
            raise invalid_request(exc) from None

    # ------------------------------- disaggregation (workers/disagg, workers/vllm/connector)
    # The ConnectorDisaggEngine capability: the prompt's KV moves inside vLLM, through our
    # transfer connector (or vLLM's NixlConnector with --kv-transfer-backend vllm-nixl).

    async def _learn_kv_layout(self) -> None:
        """The KV layout as the connector in vLLM's worker registered it (its handshake), for
        the prefill worker's early layout check; from the model config where that is not
        available (vLLM's own NIXL connector)."""
        from workers.vllm.connector.transfer_core import VLLM_NIXL

        assert self._llm is not None
        disagg = self.config.disagg
        if disagg is not None and disagg.kv_transfer_backend != VLLM_NIXL:
            from workers.vllm.connector.transfer import find_handshakes

            reply = await self._llm.collective_rpc("get_kv_connector_handshake_metadata")
            infos = sorted(find_handshakes(reply), key=lambda info: info.agent.layout.tp_rank)
            if infos:
                self._kv_layout = infos[0].agent.layout
                return
            log.warning("vLLM's workers did not report the transfer connector's KV layout (%r); "
                        "taking it from the model config", reply)
        self._kv_layout = self._config_layout()

    def _config_layout(self) -> KvLayoutSpec:
        from vllm.platforms import current_platform

        assert self._llm is not None
        config = self._llm.vllm_config
        model, parallel = config.model_config, config.parallel_config
        dtype = str(config.cache_config.cache_dtype)
        if dtype == "auto":
            dtype = str(model.dtype).removeprefix("torch.")
        return KvLayoutSpec(
            num_layers=int(model.get_num_layers(parallel)),
            block_size_tokens=int(config.cache_config.block_size),
            num_kv_heads=int(model.get_num_kv_heads(parallel)),
            head_dim=int(model.get_head_size()),
            dtype=dtype,
            tp_size=int(parallel.tensor_parallel_size),
            block_order="HND" if current_platform.is_cpu() else "NHD",
        )

    def kv_layout(self) -> KvLayoutSpec:
        if self._kv_layout is None:
            raise errors.EngineError("the vLLM engine runs aggregated: no KV transfer layout")
        return self._kv_layout

    def kv_agent_info(self) -> KvAgentInfo:
        """This engine's KV as prefill workers need to check it; the agent that receives the
        blocks lives in vLLM's worker process and introduces itself when it pulls."""
        return KvAgentInfo(agent_id="vllm", host_id="", address="", layout=self.kv_layout(),
                           backends=[CONNECTOR_BACKEND])

    def cached_prefix_tokens(self, token_ids: list[int]) -> int:
        """From the prefix cache as vLLM's KV events announced it (0 without KV events)."""
        if self._translator is None or self.info is None:
            return 0
        size = self.info.kv_block_size
        return self._translator.cached_prefix_blocks(block_hashes(token_ids, size)) * size

    async def prefill_export(self, request: PreprocessedRequest) -> tuple[EngineOutput, bytes]:
        """Run the prompt to its first token, its blocks kept in vLLM for the decode worker to
        pull; returns the first token and the transfer parameters."""
        from workers.vllm.connector.transfer_core import VLLM_NIXL, hold_params

        disagg = self.config.disagg
        nixl = disagg is not None and disagg.kv_transfer_backend == VLLM_NIXL
        # The decode worker applies min_tokens / ignore_eos: here only the first token.
        prefill = msgspec.structs.replace(request, stop=msgspec.structs.replace(request.stop, max_tokens=1, min_tokens=0))
        kv_in: dict[str, Any] = {"do_remote_decode": True} if nixl else hold_params()
        kv_out: dict[str, Any] = {}
        first: EngineOutput | None = None
        async for chunk in self._generate(prefill, kv_in, kv_out):
            if first is None:
                first = chunk
            else:
                first.token_ids.extend(chunk.token_ids)
                first.finish_reason = chunk.finish_reason
        if first is None or not kv_out:
            raise errors.EngineError(f"vLLM kept no KV for prefill request {request.request_id}")
        return first, msgspec.msgpack.encode(kv_out)

    def generate_from_params(
        self, request: PreprocessedRequest, first: EngineOutput, kv_params: bytes
    ) -> AsyncIterator[EngineOutput]:
        """Decode `request` from the KV a prefill worker holds: vLLM pulls it into the slots it
        allocates, recomputes the last prompt token and samples the first token itself (equal
        to `first` under greedy sampling); a failed pull makes it recompute the prompt."""
        return self._generate(request, msgspec.msgpack.decode(kv_params))
