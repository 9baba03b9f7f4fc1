"""deploy/k8s/components/planner and planner-keda on the disaggregated topology: built-in kinds
valid (strict) against the Kubernetes schemas, ScaledObjects against KEDA's published CRD, the
renderer agreeing with `kubectl kustomize`, the RBAC exactly what the Kubernetes connector
calls (GET/PATCH deployments/{name}/scale on the Deployments it is configured with), the
topology's own autoscalers paused under the planner, and KEDA following the planner's
dynamo_planner_desired_replicas under planner-keda."""

from __future__ import annotations

import re
import shutil

import pytest

from test_deploy_behaviour import combo_docs, combo_kubectl  # type: ignore[import-not-found]
from test_manifests import CRD_KINDS, crd_schema_errors, find, pod_containers  # type: ignore[import-not-found]

COMPONENTS = ("planner", "planner-keda")


def docs(component: str) -> list[dict]:
    return combo_docs(("overlays/disagg",), (f"components/{component}",))


def planner_container(d: list[dict]) -> dict:
    [deployment] = find(d, "Deployment", "dynamo-planner")
    [container] = pod_containers(deployment)
    return container


def env(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container.get("env", [])}


@pytest.mark.parametrize("component", COMPONENTS)
def test_objects_are_valid(component: str) -> None:
    kv = pytest.importorskip("kubernetes_validate")
    for d in docs(component):
        if d["kind"] in CRD_KINDS:
            assert not crd_schema_errors(d), (d["metadata"]["name"], crd_schema_errors(d))
        else:
            kv.validate(d, kv.latest_version(), strict=True)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (kustomize) not on PATH")
@pytest.mark.parametrize("component", COMPONENTS)
def test_kubectl_kustomize_renders_the_same(component: str) -> None:
    key = lambda d: (d["kind"], d["metadata"]["name"])  # noqa: E731
    ours = sorted(docs(component), key=key)
    theirs = sorted(combo_kubectl(("overlays/disagg",), (f"components/{component}",)), key=key)
    assert [key(d) for d in ours] == [key(d) for d in theirs]
    for a, b in zip(ours, theirs):
        assert a == b, key(a)


def test_rbac_is_what_the_kubernetes_connector_calls() -> None:
    from planner.config import PLANNER_FLAGS

    d = docs("planner")
    [deployment] = find(d, "Deployment", "dynamo-planner")
    pod = deployment["spec"]["template"]["spec"]
    [binding] = find(d, "RoleBinding", "dynamo-planner")
    [role] = find(d, "Role", binding["roleRef"]["name"])
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": pod["serviceAccountName"], "namespace": "dynamo"}] or \
        binding["subjects"] == [{"kind": "ServiceAccount", "name": pod["serviceAccountName"]}]
    assert find(d, "ServiceAccount", pod["serviceAccountName"])
    [rule] = role["rules"]
    assert rule["apiGroups"] == ["apps"] and rule["resources"] == ["deployments/scale"]
    assert sorted(rule["verbs"]) == ["get", "patch"]
    named = {PLANNER_FLAGS[f].default for f in ("--k8s-prefill-deployment", "--k8s-decode-deployment",
                                                "--k8s-agg-deployment")}
    assert set(rule["resourceNames"]) == named
    deployments = {x["metadata"]["name"] for x in find(d, "Deployment")}
    assert {"dynamo-prefill", "dynamo-decode"} <= deployments & named
    assert env(planner_container(d))["DYN_PLANNER_CONNECTOR"] == "kubernetes"


def test_the_topologys_autoscalers_are_paused_under_the_planner() -> None:
    scaled = find(docs("planner"), "ScaledObject")
    assert {s["spec"]["scaleTargetRef"]["name"] for s in scaled} == {"dynamo-prefill", "dynamo-decode"}
    for s in scaled:
        assert s["metadata"]["annotations"]["autoscaling.keda.sh/paused"] == "true"


def test_keda_follows_the_planners_desired_replicas() -> None:
    d = docs("planner-keda")
    assert env(planner_container(d))["DYN_PLANNER_CONNECTOR"] == "metrics"
    scaled = find(d, "ScaledObject")
    assert len(scaled) == 2
    for s in scaled:
        role = s["spec"]["scaleTargetRef"]["name"].removeprefix("dynamo-")
        assert "autoscaling.keda.sh/paused" not in s["metadata"].get("annotations", {})
        [trigger] = s["spec"]["triggers"]
        assert trigger["metricType"] == "AverageValue" and trigger["metadata"]["threshold"] == "1"
        assert re.fullmatch(rf'max\(dynamo_planner_desired_replicas\{{namespace="dynamo", role="{role}"\}}\)',
                            trigger["metadata"]["query"])
        assert s["spec"]["minReplicaCount"] == 0  # the planner's own minimum decides
