"""How a decision becomes replicas: `local` runs worker processes on this host, `kubernetes`
sets Deployments' scale, `metrics` only exports the desired replicas for KEDA or an HPA."""

from __future__ import annotations

from typing import Protocol

from planner.config import Role


class Connector(Protocol):
    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def replicas(self) -> dict[Role, int]:
        """Each pool's replicas as this connector last set or found them (workers starting
        included, workers draining excluded)."""
        ...

    async def scale(self, role: Role, replicas: int) -> None: ...
