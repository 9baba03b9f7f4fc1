"""The vLLM-free half of the transfer connector (workers/vllm/connector/transfer.py): its
KVTransferConfig, the parameters that travel with a request, the scheduler-side bookkeeping and
the worker-side transfer runtime. Kept free of vLLM imports so the main venv tests it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from workers.vllm.args import VllmConfig

CONNECTOR_NAME = "DynamoTransferConnector"
CONNECTOR_MODULE = "workers.vllm.connector.transfer"
VLLM_NIXL = "vllm-nixl"


def transfer_connector_config(config: VllmConfig) -> dict[str, Any] | None:
    """KVTransferConfig fields for a prefill or decode worker; None when aggregated.
    `--kv-transfer-backend vllm-nixl` selects vLLM's own NixlConnector instead of ours."""
    disagg = config.disagg
    if config.role == "aggregated" or disagg is None:
        return None
    # A failed or timed-out load is recomputed by the decode worker (vLLM's default fails it).
    common = {"kv_role": "kv_both", "kv_load_failure_policy": "recompute"}
    if disagg.kv_transfer_backend == VLLM_NIXL:
        return {"kv_connector": "NixlConnector", **common}
    return {
        "kv_connector": CONNECTOR_NAME,
        "kv_connector_module_path": CONNECTOR_MODULE,
        **common,
        "kv_connector_extra_config": {
            "role": config.role,
            "backend": disagg.kv_transfer_backend,
            "host": disagg.kv_transfer_host,
            "pull_timeout_s": disagg.prefill_timeout_s,
            # Held prefill blocks are freed when the decode worker has pulled them, or after this.
            "hold_timeout_s": max(60.0, 2 * disagg.prefill_timeout_s),
        },
    }
