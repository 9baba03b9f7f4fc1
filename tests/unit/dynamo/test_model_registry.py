import asyncio

from dynamo.config import RuntimeConfig
from dynamo.model_registry import ModelWatcher, register_model
from dynamo.runtime import Runtime
from dynamo.runtime.embedded import EmbeddedDiscovery
from dynamo.wire import ModelCard


def card(instance_id: int, name: str = "m") -> ModelCard:
    return ModelCard(served_model_name=name, model_path="/x", context_length=128, kv_block_size=16,
                     instance_id=instance_id)


async def test_models_follow_registrations_and_lease_expiry() -> None:
    async with await Runtime.create(RuntimeConfig()) as rt:
        discovery = rt.discovery
        assert isinstance(discovery, EmbeddedDiscovery)
        watcher = ModelWatcher(discovery)
        changes: list[tuple[str, int, bool]] = []
        watcher.on_change(lambda name, c, added: changes.append((name, c.instance_id, added)))
        await watcher.start()
        lease_a = await discovery.create_lease(5)
        lease_b = await discovery.create_lease(5)
        await register_model(discovery, card(lease_a), lease_a)
        await register_model(discovery, card(lease_b), lease_b)
        entry = await watcher.wait_for_model("m", 5)
        while len(entry.cards) < 2:
            await asyncio.sleep(0)
        discovery.expire_lease(lease_a)
        while lease_a in entry.cards:
            await asyncio.sleep(0)
        assert set(entry.cards) == {lease_b}
        discovery.expire_lease(lease_b)
        while "m" in watcher.models:
            await asyncio.sleep(0)
        assert changes == [("m", lease_a, True), ("m", lease_b, True), ("m", lease_a, False), ("m", lease_b, False)]
        await watcher.close()


async def test_watcher_sees_models_registered_before_it_started() -> None:
    async with await Runtime.create(RuntimeConfig()) as rt:
        lease = await rt.primary_lease()
        await register_model(rt.discovery, card(lease, "early"), lease)
        watcher = ModelWatcher(rt.discovery)
        await watcher.start()
        entry = await watcher.wait_for_model("early", 5)
        assert lease in entry.cards
        await watcher.close()
