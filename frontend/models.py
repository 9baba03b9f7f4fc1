"""Follows the ModelWatcher: for each served model, its cards, tokenizer, the Client of its
endpoint and its Router. A model's client and router live from its first instance to its last."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import Gauge

from dynamo import errors
from dynamo.tasks import TaskSet
from dynamo.model_registry import ModelEntry, ModelWatcher
from dynamo.runtime import Client, Runtime
from dynamo.wire import ModelCard
from frontend.tokenizer import ModelTokenizer, TokenizerCache
from router.base import Router

log = logging.getLogger(__name__)

RouterFactory = Callable[[ModelCard], Router]

# A model whose client/tokenizer are still being set up is waited for this long by a request.
_OPEN_TIMEOUT_S = 30.0


@dataclass(slots=True)
class ServedModel:
    """Everything a request for one model needs, once `opened` is set."""

    name: str
    entry: ModelEntry  # the watcher's live entry: cards by instance id
    card: ModelCard  # the card the client/router were built from
    opened: asyncio.Event = field(default_factory=asyncio.Event)
    tokenizer: ModelTokenizer | None = None
    client: Client | None = None
    router: Router | None = None
    error: Exception | None = None
    closed: bool = False

    def instance_ids(self) -> list[int]:
        """Instances both registered for this model and live on its endpoint."""
        client = self.client
        if client is None:
            return []
        live = client.instances
        return [i for i, card in self.entry.cards.items() if i in live and card.role != "prefill"]

    async def wait_open(self) -> None:
        if not self.opened.is_set():
            try:
                await asyncio.wait_for(self.opened.wait(), _OPEN_TIMEOUT_S)
            except TimeoutError:
                raise errors.NoInstances(f"model {self.name!r} is still starting") from None
        if self.error is not None:
            raise errors.DynamoError(f"model {self.name!r} could not be opened: {self.error}")
        if self.closed:
            raise errors.NoInstances(f"model {self.name!r} has no live workers")


class ModelManager:
    """Async context manager: `start` subscribes to the watcher, `close` closes every model's
    client and router. Set-up and tear-down run as tasks it owns."""

    def __init__(
        self,
        runtime: Runtime,
        watcher: ModelWatcher,
        router_factory: RouterFactory,
        tokenizers: TokenizerCache | None = None,
        scale_from_zero_wait_s: float = 0.0,
        held: Gauge | None = None,
    ) -> None:
        self.runtime = runtime
        # Models that had workers and have none now (scaled to zero by the planner), and models
        # a planner announces, are known: a request for one waits this long for a worker
        # instead of a 404.
        self.scale_from_zero_wait_s = scale_from_zero_wait_s
        self._held = held  # requests waiting so, by model (the planner's cue to scale up)
        self._seen: set[str] = set()
        self._held_count: dict[str, int] = {}
        self.watcher = watcher
        self.router_factory = router_factory
        self.tokenizers = tokenizers if tokenizers is not None else TokenizerCache()
        self.models: dict[str, ServedModel] = {}
        self._tasks = TaskSet("model manager task", log=log)
        self._changed = asyncio.Condition()

    async def start(self) -> None:
        self.watcher.on_change(self._on_model_change)
        for name, entry in list(self.watcher.models.items()):
            if name not in self.models and entry.cards:
                self._add(name, entry)

    async def close(self) -> None:
        await self._tasks.wait_all()  # opens and closes under way finish; nothing is cut short
        for model in list(self.models.values()):
            await self._close_model(model)
        self.models.clear()

    async def __aenter__(self) -> ModelManager:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------------------- lookups

    def get(self, name: str) -> ServedModel:
        model = self.models.get(name)
        if model is None:
            raise errors.ModelNotFound(f"The model `{name}` does not exist.", param="model")
        return model

    async def acquire(self, name: str) -> ServedModel:
        """`get`, except that a model with no worker now that this frontend has served, or that
        a planner announces (it scales it from zero), is waited for (bounded) until a worker
        registers; then 503 with Retry-After."""
        known = name in self._seen or name in self.watcher.planned
        if name in self.models or not known or self.scale_from_zero_wait_s <= 0:
            return self.get(name)
        self._holding(name, +1)
        try:
            await self.wait_until(lambda: name in self.models, self.scale_from_zero_wait_s)
        except TimeoutError:
            raise errors.NoInstances(
                f"model {name!r} has no workers (scaled to zero); none registered within "
                f"{self.scale_from_zero_wait_s:g}s"
            ) from None
        finally:
            self._holding(name, -1)
        return self.models[name]

    def held_requests(self, name: str) -> int:
        """Requests waiting in `acquire` for a worker of `name`."""
        return self._held_count.get(name, 0)

    def _holding(self, name: str, delta: int) -> None:
        self._held_count[name] = self._held_count.get(name, 0) + delta
        if self._held is not None:
            self._held.labels(name).inc(delta)

    def ready(self) -> bool:
        """At least one model, and every model has an opened, live instance."""
        if not self.models:
            return False
        return all(m.opened.is_set() and m.error is None and m.instance_ids() for m in self.models.values())

    async def wait_until(self, predicate: Callable[[], bool], timeout_s: float) -> None:
        """For tests and entry points: wait for a condition over the models (no polling)."""

        async def wait() -> None:
            async with self._changed:
                await self._changed.wait_for(predicate)

        await asyncio.wait_for(wait(), timeout_s)

    # ------------------------------------------------------------------------- lifecycle

    def _on_model_change(self, name: str, card: ModelCard, added: bool) -> None:
        entry = self.watcher.models.get(name)
        model = self.models.get(name)
        if added and model is None and entry is not None:
            self._add(name, entry)
        elif added and model is not None and entry is not None and model.card.role == "prefill" != card.role:
            # Opened from a prefill worker's card (it came first): reopen on the component
            # that clients are served by.
            del self.models[name]
            self._spawn(self._close_model(model))
            self._add(name, entry)
        elif not added and model is not None and entry is None:
            # The last instance is gone: forget the model (a later instance opens it afresh).
            del self.models[name]
            self._spawn(self._close_model(model))
        else:
            self._spawn(self._notify())

    def _add(self, name: str, entry: ModelEntry) -> None:
        model = ServedModel(name=name, entry=entry, card=entry.any_card())
        self.models[name] = model
        self._seen.add(name)
        self._spawn(self._open_model(model))

    async def _open_model(self, model: ServedModel) -> None:
        card = model.card
        try:
            model.tokenizer = await self.tokenizers.get(card.model_path)
            endpoint = self.runtime.endpoint(card.component, card.endpoint, card.namespace)
            model.client = await endpoint.client()
            router = self.router_factory(card)
            await router.start()
            model.router = router
            model.client.on_change(lambda instance_id, up: self._on_instance_change(model, instance_id, up))
            log.info("model %s opened (%s/%s/%s)", model.name, card.namespace, card.component, card.endpoint)
        except Exception as exc:  # noqa: BLE001 - any failure is kept and reported per request
            # Kept on the model so each request says why, instead of a bare 500.
            model.error = exc
            log.error("model %s could not be opened: %s", model.name, exc)
        finally:
            model.opened.set()
            await self._notify()

    def _on_instance_change(self, model: ServedModel, instance_id: int, up: bool) -> None:
        if not up and model.router is not None:
            model.router.instance_removed(instance_id)
        self._spawn(self._notify())

    async def _close_model(self, model: ServedModel) -> None:
        await model.opened.wait()
        model.closed = True
        if model.router is not None:
            await model.router.close()
        if model.client is not None:
            await model.client.close()
        log.info("model %s closed: no instances left", model.name)
        await self._notify()

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        self._tasks.spawn(coro)
