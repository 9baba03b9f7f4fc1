"""Every routing mode by name: `make_router` builds one for a component's workers, and
`model_router_factory` gives a frontend one router per model card (the `remote` mode asks the
standalone router service instead)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from dynamo.runtime.planes import EventPlane
from dynamo.runtime.runtime import Runtime
from dynamo.wire import ModelCard
from router.args import RouterConfig
from router.base import RandomRouter, RoundRobinRouter, Router
from router.kv_router import KvRouter
from router.load_aware import LeastLoadedRouter
from router.metrics import RouterMetrics
from router.remote import RemoteRouter


def make_router(
    mode: str,
    config: RouterConfig,
    events: EventPlane,
    namespace: str,
    component: str,
    *,
    metrics: RouterMetrics | None = None,
) -> Router:
    """A router of `mode` (round-robin, random, kv, least-loaded) for one component's workers.
    The caller awaits `start()` before the first `select()` and `close()` at the end."""
    mode = mode.replace("_", "-")
    if mode == "round-robin":
        return RoundRobinRouter()
    if mode == "random":
        return RandomRouter(config.seed)
    if mode == "kv":
        return KvRouter(config, events, namespace, component, metrics)
    if mode == "least-loaded":
        return LeastLoadedRouter(config, events, namespace, component, metrics)
    raise ValueError(f"unknown router mode {mode!r}")


def model_router_factory(
    runtime: Runtime, mode: str, config: RouterConfig, metrics: RouterMetrics
) -> Callable[[ModelCard], Router]:
    """For a frontend: each model gets its own router of `mode`, sized by the block size its
    workers registered; all of them report into `metrics` (the frontend's registry)."""

    def make(card: ModelCard) -> Router:
        # An embedding model leaves no KV to reuse: its requests go by load (least-loaded
        # instead of the kv and remote modes; round-robin and random stay as asked).
        model_mode = "least-loaded" if card.model_type == "embedding" and mode in ("kv", "remote") else mode
        if model_mode == "remote":
            return RemoteRouter(runtime, namespace=card.namespace)
        block_size = card.kv_block_size or config.kv_block_size
        return make_router(
            model_mode,
            replace(config, kv_block_size=block_size),
            runtime.events,
            card.namespace,
            card.component,
            metrics=metrics,
        )

    return make
