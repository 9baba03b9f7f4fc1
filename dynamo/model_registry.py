"""Model registration (workers) and model discovery (frontends).

A worker puts its ModelCard at `v1/models/{namespace}/{served_model_name}/{instance_id}` under
its lease; a frontend watches `v1/models/` and keeps, per model name, the cards of the
instances serving it. A card vanishes with its worker's lease.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from dynamo.runtime.planes import Discovery, Watch
from dynamo.wire import MODEL_CARD_CODEC, ModelCard, encode

log = logging.getLogger(__name__)

MODELS_ROOT = "v1/models/"
# `v1/planned_models/{namespace}/{served_model_name}`: a model a planner scales (from zero
# included), put under the planner's lease, so a frontend knows it while no worker serves it.
PLANNED_ROOT = "v1/planned_models/"


def model_key(card: ModelCard) -> str:
    return f"{MODELS_ROOT}{card.namespace}/{card.served_model_name}/{card.instance_id:x}"


def planned_model_key(namespace: str, served_model_name: str) -> str:
    return f"{PLANNED_ROOT}{namespace}/{served_model_name}"


async def register_model(discovery: Discovery, card: ModelCard, lease_id: int) -> str:
    key = model_key(card)
    await discovery.put(key, encode(card), lease_id=lease_id)
    return key


@dataclass(slots=True)
class ModelEntry:
    """Every instance currently serving one model name, by instance id."""

    name: str
    cards: dict[int, ModelCard] = field(default_factory=dict)

    def any_card(self) -> ModelCard:
        """A card to open the model with: one of a worker clients reach (aggregated or decode)
        when there is one; prefill workers serve another component."""
        for card in self.cards.values():
            if card.role != "prefill":
                return card
        return next(iter(self.cards.values()))


ModelListener = Callable[[str, ModelCard, bool], None]


class ModelWatcher:
    """Keeps the set of served models and their instances in step with discovery."""

    def __init__(self, discovery: Discovery, namespace: str | None = None) -> None:
        self._discovery = discovery
        self._prefix = MODELS_ROOT if namespace is None else f"{MODELS_ROOT}{namespace}/"
        self._planned_prefix = PLANNED_ROOT if namespace is None else f"{PLANNED_ROOT}{namespace}/"
        self.planned: set[str] = set()  # model names a planner scales, served or not right now
        self._planned_watch: Watch | None = None
        self._planned_task: asyncio.Task[None] | None = None
        self.models: dict[str, ModelEntry] = {}
        self._by_key: dict[str, ModelCard] = {}
        self._watch: Watch | None = None
        self._task: asyncio.Task[None] | None = None
        self._changed = asyncio.Condition()
        self._listeners: list[ModelListener] = []

    def on_change(self, listener: ModelListener) -> None:
        """`listener(model_name, card, added)` runs on every instance added or removed."""
        self._listeners.append(listener)

    async def start(self) -> None:
        self._watch = await self._discovery.watch_prefix(self._prefix)
        self._task = asyncio.create_task(self._run(self._watch))
        self._planned_watch = await self._discovery.watch_prefix(self._planned_prefix)
        self._planned_task = asyncio.create_task(self._run_planned(self._planned_watch))

    async def _run_planned(self, watch: Watch) -> None:
        async for event in watch:
            name = event.key.rsplit("/", 1)[-1]
            if event.kind == "put":
                self.planned.add(name)
            else:
                self.planned.discard(name)

    async def _run(self, watch: Watch) -> None:
        async for event in watch:
            if event.kind == "put":
                card = MODEL_CARD_CODEC.decode(event.value)
                self._by_key[event.key] = card
                entry = self.models.setdefault(card.served_model_name, ModelEntry(card.served_model_name))
                added = card.instance_id not in entry.cards
                entry.cards[card.instance_id] = card
                if added:
                    log.info("model %s: instance %x added", card.served_model_name, card.instance_id)
                    for listener in self._listeners:
                        listener(card.served_model_name, card, True)
            else:
                card = self._by_key.pop(event.key, None)
                if card is None:
                    continue
                entry = self.models.get(card.served_model_name)
                if entry is not None:
                    entry.cards.pop(card.instance_id, None)
                    if not entry.cards:
                        del self.models[card.served_model_name]
                log.info("model %s: instance %x removed", card.served_model_name, card.instance_id)
                for listener in self._listeners:
                    listener(card.served_model_name, card, False)
            async with self._changed:
                self._changed.notify_all()

    async def wait_for_model(self, name: str, timeout_s: float) -> ModelEntry:
        async def wait() -> None:
            async with self._changed:
                await self._changed.wait_for(lambda: name in self.models)

        await asyncio.wait_for(wait(), timeout_s)
        return self.models[name]

    async def close(self) -> None:
        for watch in (self._watch, self._planned_watch):
            if watch is not None:
                await watch.close()
        for task in (self._task, self._planned_task):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
