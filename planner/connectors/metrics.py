"""The metrics connector: the planner decides, something else acts. Its decisions are already
on the planner's /metrics page as `dynamo_planner_desired_replicas{role=...}` (every connector
exports them); a KEDA ScaledObject (deploy/k8s/components/planner-keda) or an HPA on an
external metric scales the Deployments to that number."""

from __future__ import annotations

from planner.config import Role


class MetricsConnector:
    def __init__(self, initial: dict[Role, int] | None = None) -> None:
        self._desired: dict[Role, int] = dict(initial or {})

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def replicas(self) -> dict[Role, int]:
        return dict(self._desired)

    async def scale(self, role: Role, replicas: int) -> None:
        self._desired[role] = replicas
