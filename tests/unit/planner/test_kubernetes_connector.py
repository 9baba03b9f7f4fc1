"""planner/connectors/kubernetes.py against the scale subresource's shapes, with no API server
(none is reachable here): the official client builds the real requests and its HTTP layer is
replaced by a recorder that answers with Scale documents. Checked: the method, path and
content type of `PATCH /apis/apps/v1/namespaces/{namespace}/deployments/{name}/scale` and
`GET` of the same path (Kubernetes OpenAPI: replaceAppsV1NamespacedDeploymentScale /
patchAppsV1NamespacedDeploymentScale / readAppsV1NamespacedDeploymentScale), the body as a JSON
merge patch whose result is a valid autoscaling/v1 Scale, and the answers parsed."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pytest

from dynamo import errors
from planner.connectors.kubernetes import PATCH_CONTENT_TYPE, KubernetesConnector, parse_scale, scale_patch_body

k8s = pytest.importorskip("kubernetes")
kv = pytest.importorskip("kubernetes_validate")

NAMESPACE = "dynamo"


def scale_doc(name: str, spec: int, status: int) -> dict[str, Any]:
    """A Scale object as the API server answers GET or PATCH .../scale."""
    return {
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": {
            "name": name,
            "namespace": NAMESPACE,
            "uid": "0f2a7d4e-4c1b-4a3e-9d38-5c2f1e6b7a90",
            "resourceVersion": "41",
            "creationTimestamp": "2026-12-06T08:00:00Z",
        },
        "spec": {"replicas": spec},
        "status": {"replicas": status, "selector": "app.kubernetes.io/name=dynamo,app.kubernetes.io/component=decode"},
    }


@dataclass
class _Raw:
    status: int
    reason: str
    data: bytes
    headers: dict[str, str] = field(default_factory=lambda: {"content-type": "application/json"})


@dataclass
class Recorder:
    """Stands in for the client's urllib3 layer: records each request, answers from `state`
    (deployment name -> (spec replicas, status replicas)) as an API server would."""

    state: dict[str, tuple[int, int]]
    requests: list[dict[str, Any]] = field(default_factory=list)
    status: int = 200

    def request(self, method: str, url: str, headers: Any = None, body: Any = None,
                post_params: Any = None, _request_timeout: Any = None) -> Any:
        self.requests.append({"method": method, "url": url, "headers": dict(headers or {}), "body": body,
                              "timeout": _request_timeout})
        name = url.rstrip("/").split("/")[-2]
        spec, status = self.state[name]
        if method == "PATCH":
            spec = body["spec"]["replicas"]
            self.state[name] = (spec, status)
        if self.status != 200:
            doc: dict[str, Any] = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": self.status,
                                   "reason": "Forbidden", "message": "deployments.apps \"x\" is forbidden"}
        else:
            doc = scale_doc(name, spec, status)
        return k8s.client.rest.RESTResponse(_Raw(self.status, "OK" if self.status == 200 else "Forbidden",
                                                 json.dumps(doc).encode()))


def connector(recorder: Recorder) -> KubernetesConnector:
    configuration = k8s.client.Configuration(host="https://kubernetes.default.svc")
    api_client = k8s.client.ApiClient(configuration)
    api_client.rest_client = recorder
    api = k8s.client.AppsV1Api(api_client)
    return KubernetesConnector(NAMESPACE, {"prefill": "dynamo-prefill", "decode": "dynamo-decode",
                                           "aggregated": "dynamo-worker"}, ("prefill", "decode"), 5.0, api=api)


def test_patch_body_is_a_merge_patch_yielding_a_valid_scale() -> None:
    body = scale_patch_body(3)
    assert body == {"spec": {"replicas": 3}}
    merged = scale_doc("dynamo-decode", 1, 1)
    merged["spec"].update(body["spec"])  # RFC 7386 on this body: spec.replicas replaced
    kv.validate(merged, kv.latest_version(), strict=True)
    with pytest.raises(ValueError):
        scale_patch_body(-1)


def test_answers_are_valid_scale_documents_and_parse() -> None:
    doc = scale_doc("dynamo-decode", 4, 2)
    kv.validate(doc, kv.latest_version(), strict=True)
    state = parse_scale(doc)
    assert (state.desired, state.current) == (4, 2)
    with pytest.raises(ValueError):
        parse_scale({"kind": "Deployment"})


async def test_scale_sends_patch_to_the_scale_subresource() -> None:
    recorder = Recorder({"dynamo-prefill": (1, 1), "dynamo-decode": (2, 2)})
    c = connector(recorder)
    await c.start()
    await c.scale("decode", 5)
    [req] = recorder.requests
    assert req["method"] == "PATCH"
    assert req["url"] == "https://kubernetes.default.svc/apis/apps/v1/namespaces/dynamo/deployments/dynamo-decode/scale"
    assert req["headers"]["Content-Type"] == PATCH_CONTENT_TYPE == "application/merge-patch+json"
    assert req["body"] == {"spec": {"replicas": 5}}
    assert req["timeout"] == 5.0
    assert recorder.state["dynamo-decode"] == (5, 2)


async def test_replicas_reads_each_pools_scale() -> None:
    recorder = Recorder({"dynamo-prefill": (0, 0), "dynamo-decode": (3, 4)})
    c = connector(recorder)
    assert await c.replicas() == {"prefill": 0, "decode": 3}
    assert [(r["method"], r["url"].rsplit("/deployments/", 1)[1]) for r in recorder.requests] == [
        ("GET", "dynamo-prefill/scale"), ("GET", "dynamo-decode/scale"),
    ]


async def test_api_errors_become_dynamo_errors() -> None:
    recorder = Recorder({"dynamo-prefill": (0, 0), "dynamo-decode": (3, 4)}, status=403)
    with pytest.raises(errors.DynamoError, match="dynamo-decode"):
        await connector(recorder).scale("decode", 1)
