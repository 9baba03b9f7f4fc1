"""The Kubernetes connector: reads and sets `spec.replicas` of the prefill/decode (or
aggregated) Deployments through their scale subresource (autoscaling/v1 Scale), with the
official `kubernetes` client (an optional dependency: pip install 'dynamo-py[planner-k8s]').

The RBAC it needs (get/patch on deployments/scale in the namespace) is in
deploy/k8s/components/planner. Pods removed by a scale-down get SIGTERM and drain like any
worker (deregister first, in-flight streams finish or migrate) within the pod's
terminationGracePeriodSeconds."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dynamo import errors
from planner.config import Role

log = logging.getLogger(__name__)

# A JSON merge patch (RFC 7386) of the Scale object: only spec.replicas changes. The client's
# default content type for PATCH is json-patch (a list of operations), which this body is not.
PATCH_CONTENT_TYPE = "application/merge-patch+json"


def scale_patch_body(replicas: int) -> dict[str, Any]:
    if replicas < 0:
        raise ValueError("replicas must be >= 0")
    return {"spec": {"replicas": replicas}}


@dataclass(frozen=True, slots=True)
class ScaleState:
    desired: int  # spec.replicas
    current: int  # status.replicas (pods that exist, draining ones included)


def parse_scale(doc: Mapping[str, Any]) -> ScaleState:
    """An autoscaling/v1 Scale document (the answer of GET or PATCH .../scale)."""
    if doc.get("kind") != "Scale":
        raise ValueError(f"not a Scale object: kind {doc.get('kind')!r}")
    spec = doc.get("spec") or {}
    status = doc.get("status") or {}
    return ScaleState(int(spec.get("replicas", 0)), int(status.get("replicas", 0)))


class KubernetesConnector:
    """`api`: an AppsV1Api (tests pass one whose HTTP layer records the requests); None: one
    configured from the pod's service account, else from ~/.kube/config."""

    def __init__(self, namespace: str, deployments: Mapping[Role, str], roles: tuple[Role, ...],
                 timeout_s: float, api: Any = None) -> None:
        self._namespace = namespace
        self._deployments = {role: deployments[role] for role in roles}
        self._timeout_s = timeout_s
        self._api = api

    async def start(self) -> None:
        if self._api is not None:
            return
        try:
            from kubernetes import client, config
        except ImportError as exc:
            raise errors.DynamoError(
                "the kubernetes connector needs the `kubernetes` package (pip install 'dynamo-py[planner-k8s]')"
            ) from exc
        try:
            config.load_incluster_config()
        except config.ConfigException:
            await asyncio.to_thread(config.load_kube_config)
        self._api = client.AppsV1Api()

    async def close(self) -> None:
        api_client = getattr(self._api, "api_client", None)
        if api_client is not None:
            await asyncio.to_thread(api_client.close)

    async def _call(self, what: str, fn: Any, **kwargs: Any) -> ScaleState:
        try:
            # The client is blocking: a thread, bounded by the request timeout and our own.
            result = await asyncio.wait_for(
                asyncio.to_thread(fn, namespace=self._namespace, _request_timeout=self._timeout_s, **kwargs),
                self._timeout_s + 1.0,
            )
        except TimeoutError:
            raise errors.DynamoError(f"kubernetes: {what} timed out after {self._timeout_s}s") from None
        except Exception as exc:  # noqa: BLE001 - ApiException and transport errors alike
            raise errors.DynamoError(f"kubernetes: {what} failed: {exc}") from exc
        return parse_scale(self._api.api_client.sanitize_for_serialization(result))

    async def replicas(self) -> dict[Role, int]:
        assert self._api is not None, "start() first"
        out: dict[Role, int] = {}
        for role, name in self._deployments.items():
            state = await self._call(f"read scale of {name}", self._api.read_namespaced_deployment_scale, name=name)
            out[role] = state.desired
        return out

    async def scale(self, role: Role, replicas: int) -> None:
        assert self._api is not None, "start() first"
        name = self._deployments[role]
        state = await self._call(
            f"scale {name} to {replicas}",
            self._api.patch_namespaced_deployment_scale,
            name=name,
            body=scale_patch_body(replicas),
            _content_type=PATCH_CONTENT_TYPE,
        )
        log.info("kubernetes: deployment %s/%s scaled to %d (was running %d)", self._namespace, name, state.desired, state.current)
