"""SGLang's KV events, re-hashed with the project's block hash. SGLang 0.5.23 publishes the same
wire format as vLLM (ZMQ PUB frames [topic, seq u64 BE, msgpack [ts, events, dp_rank]], events as
maps tagged BlockStored / BlockRemoved / AllBlocksCleared; its extra fields such as lora_id,
cache_salt, session_id are skipped by the decoder), one BlockStored per page. So the vLLM worker's
decoder, translator and subscriber are used as they are, with SGLang's storage-medium names."""

from __future__ import annotations

import json
from typing import Any

from dynamo.wire import KvTier
from kvbm.block_pool import KvEventSink
from workers.vllm.kv_events import KvEventSubscriber, KvEventTranslator

# sglang.srt.disaggregation.kv_events.StorageMedium values.
SGLANG_TIERS: dict[str | None, KvTier] = {
    None: "device",
    "GPU": "device",
    "CPU_PINNED": "host",
    "DISK": "disk",
    "EXTERNAL": "remote",
}


def translator(sink: KvEventSink, page_size: int) -> KvEventTranslator:
    return KvEventTranslator(sink, page_size, SGLANG_TIERS)


def kv_events_config(endpoint: str, topic: str = "") -> str:
    """The --kv-events-config JSON that makes SGLang's PUB connect to our SUB at `endpoint`
    (a concrete host with bind false: SGLang connects rather than binds)."""
    return json.dumps({"publisher": "zmq", "endpoint": endpoint, "topic": topic, "bind": False})


def user_zmq_endpoint(config: str | None) -> tuple[str, str] | None:
    """(endpoint, topic) of a user's own zmq --kv-events-config, to subscribe to instead."""
    if not config:
        return None
    try:
        parsed: Any = json.loads(config)
    except json.JSONDecodeError:
        return None
    if not isinstance(parsed, dict) or parsed.get("publisher") != "zmq":
        return None
    return str(parsed.get("endpoint") or "tcp://*:5557"), str(parsed.get("topic") or "")


def wire_kv_events(
    server_kwargs: dict[str, Any], sink: KvEventSink, page_size: int
) -> tuple[dict[str, Any], KvEventTranslator, KvEventSubscriber]:
    """Our SUB socket, its translator, and the server kwargs that make SGLang publish to it.
    A user's own zmq config is kept and subscribed to."""
    trans = translator(sink, page_size)
    user = user_zmq_endpoint(server_kwargs.get("kv_events_config"))
    if user is not None:
        endpoint, topic = user
        subscriber = KvEventSubscriber(trans, topic)
        subscriber.connect(endpoint)
        return server_kwargs, trans, subscriber
    subscriber = KvEventSubscriber(trans)
    endpoint = subscriber.bind_loopback()
    return {**server_kwargs, "kv_events_config": kv_events_config(endpoint)}, trans, subscriber
