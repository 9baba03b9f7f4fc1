"""KVBM's host and disk tiers below vLLM for CPUs (`pytest -m vllm`), through our connector
(workers/vllm/connector/offload.py): with vLLM's own KV cache made tiny, a prompt pushed out of
it by others and asked again is onboarded from the tiers (part from disk, where the small host
tier spilled its oldest blocks, part from host): its cached_tokens cover them, the tier hit
metric counts them, and the greedy output is the cold run's; the tiers' blocks are announced as
tier-tagged KV events with the project's block hashes. With a disk hit the load goes one of two
ways, both run here: asynchronously (vLLM holds the request in WAITING_FOR_REMOTE_KVS while the
worker process reads the files), which the connector chooses while it has measured no file read
yet (`disk_load` auto, the first disk hit), or synchronously (the files read on the model thread
in the step that runs the request; `disk_load` sync). The onboard cost model runs on what the
worker side measured (prefill passes, reads): its estimates and decisions reach the metrics."""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from dynamo.kv_hash import block_hashes
from dynamo.wire import BlockStored, EngineOutput, KvEventData, PreprocessedRequest, SamplingOptions, StopConditions

HAVE_VLLM = importlib.util.find_spec("vllm") is not None
VLLM_REQUIRED = os.environ.get("DYN_TEST_VLLM") == "1"
BLOCK = 32
# 24 blocks of 32 tokens (one is vLLM's null block): two 300-token requests fit, a third evicts.
DEVICE_BLOCKS = 24
PROMPT_TOKENS = 300  # 9 full blocks usable for caching (the last prompt token is always computed)
HOST_BLOCKS = 20  # two prompts' blocks; the third spills the oldest to disk
MAX_TOKENS = 8

pytestmark = [pytest.mark.vllm, pytest.mark.asyncio(loop_scope="module")]


def prompt(seed: int) -> list[int]:
    return [(i * 7 + seed * 1009) % 8000 + 10 for i in range(PROMPT_TOKENS)]


class Harness:
    def __init__(self, engine: Any, events: list[KvEventData], registry: Any, loads: str) -> None:
        self.engine = engine
        self.events = events
        self.registry = registry
        self.loads = loads  # how the connector loads the first disk hit: "async" or "sync"

    def hits(self, tier: str) -> float:
        value = self.registry.get_sample_value("dynamo_kvbm_hit_blocks_total", {"model": "tiny", "tier": tier})
        return value or 0.0

    def onboarded(self, tier: str) -> float:
        value = self.registry.get_sample_value("dynamo_kvbm_onboard_decision_blocks_total",
                                               {"model": "tiny", "tier": tier, "decision": "onboard"})
        return value or 0.0

    def read_gbps(self, tier: str) -> float:
        value = self.registry.get_sample_value("dynamo_kvbm_read_gbps", {"model": "tiny", "tier": tier})
        return value or 0.0

    def recompute_rate(self) -> float:
        value = self.registry.get_sample_value("dynamo_kvbm_recompute_tokens_per_second", {"model": "tiny"})
        return value or 0.0

    async def run(self, token_ids: list[int], request_id: str) -> tuple[list[int], int | None]:
        req = PreprocessedRequest(
            request_id=request_id, model="tiny", token_ids=token_ids, sampling=SamplingOptions(),
            stop=StopConditions(max_tokens=MAX_TOKENS),
        )
        outs: list[EngineOutput] = [out async for out in self.engine.generate(req)]
        return [t for out in outs for t in out.token_ids], outs[0].cached_tokens


# KvbmConfig.disk_load, and how the first disk hit then loads.
DISK_LOADS = {"auto": "async", "sync": "sync"}


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=list(DISK_LOADS))
async def harness(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Harness]:
    if not HAVE_VLLM:
        message = "vllm is not importable here: run scripts/install_vllm.sh and pytest from that venv"
        if VLLM_REQUIRED:
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    from prometheus_client import CollectorRegistry

    from kvbm.config import KvbmConfig
    from kvbm.metrics import KvbmMetrics
    from tests.integration.vllm_model import build_vllm_test_model
    from workers.vllm.args import VllmConfig
    from workers.vllm.engine import VllmEngine

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    model = build_vllm_test_model(tmp_path_factory.mktemp("vllm-kvbm-model"))
    config = VllmConfig.for_model(
        str(model), dtype="float32", max_model_len=512, block_size=BLOCK, enforce_eager=True,
        num_gpu_blocks_override=DEVICE_BLOCKS,
    )
    disk = tmp_path_factory.mktemp("vllm-kvbm-disk")
    kvbm = KvbmConfig(host_blocks=HOST_BLOCKS, disk_dir=str(disk), disk_blocks=64, disk_load=request.param)
    config = dataclasses.replace(config, kvbm=kvbm)
    events: list[KvEventData] = []
    engine = VllmEngine(config)
    await engine.start(events.append)
    registry = CollectorRegistry()
    # What workers/worker.py does for an engine with KVBM tiers.
    assert engine.kvbm is not None
    engine.kvbm.cache.bind_metrics(KvbmMetrics(registry, "tiny"))
    try:
        yield Harness(engine, events, registry, DISK_LOADS[request.param])
    finally:
        await engine.stop()


async def wait_for(condition: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(0.02)


async def test_evicted_prompt_is_onboarded_from_host_and_disk(harness: Harness) -> None:
    a = prompt(0)
    cold, cached = await harness.run(a, "a-cold")
    assert cached == 0
    for i in (1, 2):  # push a out of vLLM's cache, and most of it out of the host tier
        await harness.run(prompt(i), f"evict-{i}")

    warm, cached = await harness.run(a, "a-warm")
    assert warm == cold
    assert cached is not None and cached >= 8 * BLOCK, cached
    await wait_for(lambda: harness.hits("host") > 0 and harness.hits("disk") > 0, 30, "host and disk hits")
    # Every cached block beyond vLLM's own prefix hit came from a tier.
    assert harness.hits("host") + harness.hits("disk") <= cached // BLOCK
    # The cost model had measured the prefill passes before the warm run's lookup (reads were
    # still at their priors, far cheaper than this model's recompute) and chose to onboard.
    await wait_for(lambda: harness.recompute_rate() > 0, 30, "the measured prefill rate")
    tiers = ("host", "disk")
    await wait_for(lambda: sum(map(harness.onboarded, tiers)) == sum(map(harness.hits, tiers)), 30, "onboard decisions")
    # The load took the expected path, and its disk reads were timed on the worker and reached
    # the cost model.
    view = harness.engine.kvbm
    await wait_for(lambda: sum(view.disk_loads.values()) > 0, 30, "the disk load's stats")
    assert view.disk_loads == {harness.loads: 1}
    await wait_for(lambda: harness.read_gbps("disk") > 0, 30, "the measured disk read rate")

    ours = set(block_hashes(a, BLOCK)[: PROMPT_TOKENS // BLOCK])

    def stored(tier: str) -> set[int]:
        return {h for e in harness.events if isinstance(e, BlockStored) and e.tier == tier for h in e.block_hashes}

    # Offloaded to host when the cold run ended, some spilled to disk when the host tier filled.
    await wait_for(lambda: ours <= stored("host") and bool(ours & stored("disk")), 30, "tier-tagged KV events")
