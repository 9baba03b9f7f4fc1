"""DynamoTransferConnector: prefill/decode KV transfer inside vLLM through the project's
transfer layer (kvbm/transfer: host memory over TCP on CPUs, CUDA IPC or NIXL on GPUs).

vLLM loads it from kv_transfer_config (kv_connector_module_path, built by
workers/vllm/connector), once in the scheduler (role SCHEDULER) and once in every worker
process (role WORKER). The flow, pull by the decode worker:

- prefill worker: a request marked `dynamo_hold` runs to its first token; request_finished
  keeps its blocks (delay free) and returns `dynamo_pull` parameters (its pull servers, the
  request and its block ids), which vLLM puts on the final output and our prefill handler sends
  to the decode worker. The blocks are freed once a decode worker pulled them (get_finished
  reports the request as sent) or after hold_timeout_s.
- decode worker: a request carrying `dynamo_pull` has every uncached prompt token reported as
  external (get_num_new_matched_tokens, loaded asynchronously); once vLLM allocated its slots
  (update_state_after_alloc) the worker side announces the transfer to its agent and asks the
  prefill worker's pull server to send the blocks there. vLLM keeps the request in
  WAITING_FOR_REMOTE_KVS until get_transfer_results reports it received, then recomputes only
  the last prompt token and decodes. A failed or timed-out pull is reported as failed: vLLM
  recomputes the prompt (kv_load_failure_policy "recompute").

The bookkeeping and the network live in transfer_core (vLLM-free, tested in the main venv);
this module adapts them to vLLM's hooks."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec
import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorHandshakeMetadata,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorTransferResults,
)

from dynamo.wire import KvLayoutSpec
from workers.vllm.connector.transfer_core import (
    HandshakeInfo,
    SchedulerState,
    StepMeta,
    WorkerRuntime,
    split_kv,
)

if TYPE_CHECKING:
    from vllm.config import VllmConfig

log = logging.getLogger(__name__)


@dataclass
class DynamoTransferMetadata(KVConnectorMetadata):
    step: StepMeta


@dataclass
class DynamoTransferHandshake(KVConnectorHandshakeMetadata):
    info: bytes  # HandshakeInfo, msgpack


def _layer_index(name: str) -> tuple[int, str]:
    numbers = re.findall(r"\d+", name)
    return (int(numbers[-1]) if numbers else 0, name)


def handshake_of(metadata: Any) -> HandshakeInfo | None:
    """Our handshake from vLLM's handshake metadata (None for another connector's)."""
    if isinstance(metadata, DynamoTransferHandshake):
        return msgspec.msgpack.decode(metadata.info, type=HandshakeInfo)
    return None


def find_handshakes(reply: Any) -> list[HandshakeInfo]:
    """Our handshakes anywhere in a collective_rpc reply of `get_kv_connector_handshake_metadata`
    (per worker a {(pp, tp): metadata} dict; across vLLM's engine-core socket the dataclass
    arrives as a dict or a list of its fields)."""
    found: list[HandshakeInfo] = []
    if isinstance(reply, DynamoTransferHandshake):
        reply = reply.info
    if isinstance(reply, (bytes, bytearray, memoryview)):
        try:
            found.append(msgspec.msgpack.decode(bytes(reply), type=HandshakeInfo))
        except (msgspec.DecodeError, msgspec.ValidationError):
            pass
    elif isinstance(reply, dict):
        for value in reply.values():
            found.extend(find_handshakes(value))
    elif isinstance(reply, (list, tuple)):
        for value in reply:
            found.extend(find_handshakes(value))
    return found


class DynamoTransferConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: VllmConfig, role: Any, kv_cache_config: Any = None) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        extra = dict(self._kv_transfer_config.kv_connector_extra_config or {})
        self._block_size = int(vllm_config.cache_config.block_size)
        self._scheduler: SchedulerState | None = None
        self._worker: WorkerRuntime | None = None
        self._handshake: HandshakeInfo | None = None
        if role == KVConnectorRole.SCHEDULER:
            self._scheduler = SchedulerState(self._block_size)
        else:
            self._worker = WorkerRuntime(
                backend=str(extra.get("backend", "auto")),
                host=extra.get("host"),
                pull_timeout_s=float(extra.get("pull_timeout_s", 30.0)),
                hold_timeout_s=float(extra.get("hold_timeout_s", 60.0)),
            )

    # ================================================================== worker side
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        assert self._worker is not None
        config = self._vllm_config
        model, parallel = config.model_config, config.parallel_config
        heads = int(model.get_num_kv_heads(parallel))
        head_dim = int(model.get_head_size())
        k: list[torch.Tensor] = []
        v: list[torch.Tensor] = []
        orders = set()
        for name in sorted(kv_caches, key=_layer_index):
            kl, vl, order = split_kv(kv_caches[name], self._block_size, heads, head_dim)
            k.append(kl)
            v.append(vl)
            orders.add(order)
        if len(orders) != 1:
            raise ValueError(f"vLLM KV layers differ in block order: {orders}")
        try:
            from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

            rank = int(get_tensor_model_parallel_rank())
        except Exception:  # no TP group (a single CPU worker)
            rank = 0
        layout = KvLayoutSpec(
            num_layers=len(k),
            block_size_tokens=self._block_size,
            num_kv_heads=heads,
            head_dim=head_dim,
            dtype=str(k[0].dtype).removeprefix("torch."),
            tp_rank=rank,
            tp_size=int(parallel.tensor_parallel_size),
            block_order=orders.pop(),
        )
        self._handshake = self._worker.start(layout, k, v)
        log.info("dynamo transfer connector: pull server %s, layout %s", self._handshake.pull_address, layout)

    def get_handshake_metadata(self) -> DynamoTransferHandshake | None:
        if self._handshake is None:
            return None
        return DynamoTransferHandshake(msgspec.msgpack.encode(self._handshake))

    def bind_connector_metadata(self, connector_metadata: Any) -> None:
        super().bind_connector_metadata(connector_metadata)
        if self._worker is not None and isinstance(connector_metadata, DynamoTransferMetadata):
            self._worker.step(connector_metadata.step)

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        return None  # pulls start in bind_connector_metadata and land between steps

    def wait_for_layer_load(self, layer_name: str) -> None:
        return None

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        return None

    def wait_for_save(self) -> None:
        return None

    def get_transfer_results(self, finished_req_ids: set[str]) -> KVConnectorTransferResults:
        if self._worker is None:
            return KVConnectorTransferResults()
        r = self._worker.results()
        return KVConnectorTransferResults(
            finished_sending=r.finished_sending,
            finished_recving=r.finished_recving,
            failed_recving=r.failed_recving,
        )

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        r = self.get_transfer_results(finished_req_ids)
        return r.finished_sending or None, r.finished_recving or None

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.shutdown()

    # =============================================================== scheduler side
    def set_xfer_handshake_metadata(self, metadata: dict[int, Any]) -> None:
        assert self._scheduler is not None
        infos = {rank: handshake_of(m) for rank, m in metadata.items()}
        self._scheduler.addresses = [info.pull_address for _, info in sorted(infos.items()) if info is not None]

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
        assert self._scheduler is not None
        return self._scheduler.num_new_matched_tokens(
            request.request_id, request.kv_transfer_params, len(request.prompt_token_ids or ()), num_computed_tokens
        )

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        assert self._scheduler is not None
        block_ids = blocks.get_block_ids()[0] if num_external_tokens > 0 else []
        self._scheduler.after_alloc(request.request_id, request.kv_transfer_params, list(block_ids), num_external_tokens)

    def build_connector_meta(self, scheduler_output: Any) -> DynamoTransferMetadata:
        assert self._scheduler is not None
        return DynamoTransferMetadata(self._scheduler.take_meta())

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        from vllm.v1.request import RequestStatus

        assert self._scheduler is not None
        params = request.kv_transfer_params
        self._scheduler.not_scheduled(request.request_id, params)
        completed = request.status in (RequestStatus.FINISHED_LENGTH_CAPPED, RequestStatus.FINISHED_STOPPED)
        return self._scheduler.finished(
            request.request_id, params, completed, list(block_ids), len(request.prompt_token_ids or ())
        )

    def update_connector_output(self, connector_output: Any) -> None:
        assert self._scheduler is not None
        self._scheduler.sent(set(connector_output.finished_sending or ()))
