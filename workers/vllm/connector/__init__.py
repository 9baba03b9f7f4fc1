"""Our KV connectors inside vLLM (vLLM's v1 KV-connector API, `KVConnectorBase_V1` subclasses
that vLLM loads by module path): `transfer.py` moves a prompt's KV from a prefill worker to a
decode worker (--role prefill|decode); `offload.py` (KVBM host/disk tiers) offloads evicted
blocks and onboards hits.

The hook both use: `connector_configs(config)` lists the KVTransferConfig fields of every
connector the worker's flags enable, in priority order (the transfer connector first: for a
request that arrives with transfer parameters it, not a tier, supplies the prompt's KV);
`kv_transfer_config(config)` turns that list into vLLM's config (one connector as itself,
several through vLLM's MultiConnector), and VllmEngine.start passes it to vLLM. A connector
adds itself by appending a `(VllmConfig) -> dict | None` function to `CONNECTOR_SOURCES`
(returning None when its flags leave it off); each dict has at least `kv_connector`,
`kv_connector_module_path` and `kv_role`, optionally `kv_connector_extra_config`.

Nothing here imports vLLM at module level: the main venv imports it for the scheduler-side
bookkeeping tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from workers.vllm.args import VllmConfig

ConnectorSource = Callable[["VllmConfig"], "dict[str, Any] | None"]


def _transfer_source(config: VllmConfig) -> dict[str, Any] | None:
    from workers.vllm.connector.transfer_core import transfer_connector_config

    return transfer_connector_config(config)


def _offload_source(config: VllmConfig) -> dict[str, Any] | None:
    try:
        from workers.vllm.connector import offload
    except ImportError:  # not built yet
        return None
    source: ConnectorSource | None = getattr(offload, "offload_connector_config", None)
    return source(config) if source is not None else None


# Priority order: see the module docstring.
CONNECTOR_SOURCES: list[ConnectorSource] = [_transfer_source, _offload_source]


def connector_configs(config: VllmConfig) -> list[dict[str, Any]]:
    """KVTransferConfig fields of each enabled connector, transfer first."""
    out = []
    for source in CONNECTOR_SOURCES:
        entry = source(config)
        if entry is not None:
            out.append(entry)
    return out


def combined_config(entries: list[dict[str, Any]]) -> dict[str, Any] | None:
    """One connector as itself; several under vLLM's MultiConnector (each keeps its own
    kv_role and extra config; the combined role is kv_both)."""
    if not entries:
        return None
    if len(entries) == 1:
        return dict(entries[0])
    return {
        "kv_connector": "MultiConnector",
        "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"connectors": [dict(e) for e in entries]},
    }


def kv_transfer_config(config: VllmConfig) -> Any:
    """vLLM's KVTransferConfig for the enabled connectors, or None (then the user's own
    --kv-transfer-config, if any, is left as it is)."""
    fields = combined_config(connector_configs(config))
    if fields is None:
        return None
    from vllm.config import KVTransferConfig

    return KVTransferConfig(**fields)
