"""Disaggregated prefill/decode: the per-role handlers a Worker attaches (start_disagg) and their
flags. What they need from an engine is workers.engine.DisaggEngine (PagedEngine has it)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from dynamo import errors
from dynamo.wire import EngineOutput, PreprocessedRequest
from workers.disagg.args import ENGINE_BACKEND_CHOICES, DisaggConfig
from workers.engine import ConnectorDisaggEngine, DisaggEngine

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from dynamo.runtime import Runtime, ServedEndpoint
    from kvbm.transfer.agent import KvTransferAgent
    from workers.disagg.decode_handler import DecodeHandler
    from workers.engine import Engine

__all__ = ["DisaggConfig", "DisaggRole", "start_disagg"]

log = logging.getLogger(__name__)


class DisaggRole:
    """What a prefill or decode worker adds to an aggregated one: a transfer agent, and
    either the `prefill` endpoint or the decode handler. `generate` replaces the engine's."""

    def __init__(
        self,
        engine: Engine,
        agent: KvTransferAgent | None,
        decode: DecodeHandler | None,
        served: ServedEndpoint | None,
    ) -> None:
        self.engine = engine
        self.agent = agent  # None: the engine moves KV through its own connector
        self.decode = decode
        self.served = served  # the prefill endpoint

    def generate(self, request: PreprocessedRequest) -> AsyncIterator[EngineOutput]:
        if self.decode is not None:
            return self.decode.generate(request)
        return self.engine.generate(request)

    async def close(self) -> None:
        if self.served is not None:
            await self.served.stop()
        if self.decode is not None:
            await self.decode.close()
        if self.agent is not None:
            await self.agent.close()


async def start_disagg(
    runtime: Runtime,
    engine: Engine,
    role: str,
    component: str,
    config: DisaggConfig,
    on_prefill: Callable[[str, str], None] | None = None,
) -> DisaggRole:
    """Start the transfer agent and the role's handler for a started engine. A prefill worker
    serves `prefill` on its own component (which should be config.prefill_component)."""
    from kvbm.transfer.factory import make_agent
    from workers.disagg.decode_handler import DecodeHandler
    from workers.disagg.prefill_handler import PREFILL_ENDPOINT, PrefillHandler

    agent: KvTransferAgent | None = None
    if isinstance(engine, ConnectorDisaggEngine):
        pass  # its KV moves inside the engine (vLLM: workers/vllm/connector): no agent here
    elif not isinstance(engine, DisaggEngine):
        raise errors.EngineError(f"the {engine.name} engine cannot serve as a {role} worker (no KV export/import)")
    elif config.kv_transfer_backend in ENGINE_BACKEND_CHOICES:
        raise errors.EngineError(
            f"--kv-transfer-backend {config.kv_transfer_backend} is vLLM's own connector: --engine vllm only"
        )
    else:
        agent = await make_agent(
            config.kv_transfer_backend, engine.kv_layout(), engine.kv_memory(),
            host=config.kv_transfer_host, simulated_link_bytes_per_s=config.kv_link_gbs * 1e9,
            speedup_ratio=engine.speedup_ratio,
        )
    try:
        decode = None
        served = None
        if role == "prefill":
            if component != config.prefill_component:
                log.warning("prefill worker on component %r; decode workers look for %r",
                            component, config.prefill_component)
            served = await runtime.endpoint(component, PREFILL_ENDPOINT).serve(PrefillHandler(engine, agent).handle)
        elif role == "decode":
            decode = DecodeHandler(runtime, engine, agent, config, on_prefill)
            await decode.start()
        else:
            raise ValueError(f"role {role!r} is not disaggregated")
    except BaseException:
        if agent is not None:
            await agent.close()
        raise
    return DisaggRole(engine, agent, decode, served)
