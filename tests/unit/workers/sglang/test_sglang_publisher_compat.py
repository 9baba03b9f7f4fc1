"""SGLang's own KV event classes and ZmqEventPublisher, loaded from SGLang's sources, publishing
to the SGLang worker's subscriber: the wire format is SGLang's, not our copy of it. Runs only
with DYN_SGLANG_SRC set to an unpacked sglang 0.5.23 package dir (`.../sglang`; e.g. from
`pip download --no-deps sglang==0.5.23` and unzip): SGLang cannot be installed here (see
docs/engines.md). Its imports unrelated to KV events are stubbed; pyzmq and psutil must be there
(the vLLM venv has both)."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import sys
import time
import types
from pathlib import Path
from typing import Any

import pytest

from dynamo.kv_hash import block_hashes
from dynamo.wire import AllBlocksCleared, BlockRemoved, BlockStored, KvEventData

SRC = os.environ.get("DYN_SGLANG_SRC")
pytestmark = pytest.mark.skipif(not SRC, reason="DYN_SGLANG_SRC (unpacked sglang 0.5.23 sources) not set")
PAGE = 16


def load_sglang_kv_events(monkeypatch: pytest.MonkeyPatch) -> Any:
    pytest.importorskip("zmq")
    pytest.importorskip("psutil")
    srt = Path(str(SRC)) / "srt"
    for name in ("sglang", "sglang.srt", "sglang.srt.utils", "sglang.srt.disaggregation"):
        pkg = types.ModuleType(name)
        pkg.__path__ = []
        monkeypatch.setitem(sys.modules, name, pkg)
    ctx = types.ModuleType("sglang.srt.runtime_context")
    ctx.get_parallel = lambda: types.SimpleNamespace(pp_rank=0, attn_tp_rank=0, attn_cp_rank=0)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "sglang.srt.runtime_context", ctx)
    mod: Any = None
    for name, path in (("sglang.srt.utils.network", srt / "utils" / "network.py"),
                       ("sglang.srt.disaggregation.kv_events", srt / "disaggregation" / "kv_events.py")):
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, name, mod)
        spec.loader.exec_module(mod)
    return mod


async def test_sglang_publisher_reaches_our_subscriber(monkeypatch: pytest.MonkeyPatch) -> None:
    from workers.sglang.kv_events import wire_kv_events

    kv = load_sglang_kv_events(monkeypatch)
    seen: list[KvEventData] = []
    kwargs, _, sub = wire_kv_events({"model_path": "/m"}, seen.append, PAGE)
    cfg = kv.KVEventsConfig(**json.loads(kwargs["kv_events_config"]))  # SGLang parses our config
    sub.start()
    pub = kv.ZmqEventPublisher(0, endpoint=cfg.endpoint, topic=cfg.topic, bind=cfg.bind)
    tokens = list(range(1000, 1064))
    hashes = [(7919 * (i + 1)) & 0x7FFF_FFFF_FFFF_FFFF for i in range(4)]
    stored, parent = [], None
    for i, h in enumerate(hashes):
        stored.append(kv.BlockStored(block_hashes=[h], parent_block_hash=parent, token_ids=tokens[i * PAGE:(i + 1) * PAGE],
                                     block_size=PAGE, lora_id=None, medium=kv.StorageMedium.GPU, session_id="s"))
        parent = h
    try:
        deadline = time.monotonic() + 10
        # Its PUB connects to us and drops what it sends before the subscription lands: send
        # clears (which reset everything) until one arrives, then the events under test.
        while not seen and time.monotonic() < deadline:
            pub.publish(kv.KVEventBatch(ts=time.time(), events=[kv.AllBlocksCleared()]))
            await asyncio.sleep(0.1)
        seen.clear()
        pub.publish(kv.KVEventBatch(ts=time.time(), events=stored))
        host_copy = kv.BlockStored(block_hashes=[hashes[0] ^ 1], parent_block_hash=None, token_ids=tokens[:PAGE],
                                   block_size=PAGE, lora_id=None, medium=kv.StorageMedium.CPU)
        for events in ([host_copy], [kv.BlockRemoved(block_hashes=[hashes[3]], medium=kv.StorageMedium.GPU)],
                       [kv.AllBlocksCleared()]):
            pub.publish(kv.KVEventBatch(ts=time.time(), events=events))
        while not any(isinstance(e, AllBlocksCleared) for e in seen) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
    finally:
        pub.shutdown()
        await sub.stop()
    ours = block_hashes(tokens, PAGE)
    device = {h for e in seen if isinstance(e, BlockStored) and e.tier == "device" for h in e.block_hashes}
    host = [h for e in seen if isinstance(e, BlockStored) and e.tier == "host" for h in e.block_hashes]
    assert device == set(ours)
    assert host == ours[:1]
    assert BlockRemoved(block_hashes=[ours[3]], tier="device") in seen
    assert isinstance(seen[-1], AllBlocksCleared)
