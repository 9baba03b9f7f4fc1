"""Offline checks of everything under deploy/: container image, docker-compose, Kubernetes
(kustomize base, overlays, components, LeaderWorkerSet examples), ECS task definitions,
Prometheus and Grafana.

No cluster, Docker engine or AWS account is needed. What runs where:
- Kustomize overlays are rendered by a small resolver in this file (resources, components,
  strategic-merge and JSON 6902 patches with targets, namespace, images) and, when `kubectl` is on
  PATH, also by `kubectl kustomize`; the two renderings must agree.
- Kubernetes objects of built-in kinds are validated in strict mode against the OpenAPI schemas
  that the `kubernetes-validate` package ships (skipped if it is not installed); KEDA
  ScaledObjects, ServiceMonitors and LeaderWorkerSets are validated, strictly, against the OpenAPI
  v3 schemas of their projects' published CRDs (tests/unit/deploy/schemas, with `jsonschema`),
  and get project-specific checks written here.
- ECS task definitions are rendered by `deploy.sh` (DRY_RUN=1) and validated against botocore's
  ECS service model, RegisterTaskDefinition input shape (skipped without botocore).
- Consistency: every dynamo flag used in any manifest is one the CLI accepts (the real argparse
  parsers where their modules exist, and always the documented interface below), every DYN_*
  variable is one the code reads, and every metric a dashboard or autoscaler queries is one the
  code exports (per component, once that component defines metrics).
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import shlex
import shutil
import subprocess
from functools import cache
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[3]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
OVERLAYS = ["agg", "agg-kv", "agg-router", "agg-kv-tls", "disagg", "eks", "gke", "aks"]
# One LeaderWorkerSet overlay per engine (deploy/k8s/lws/<engine>), applied on top of a topology.
LWS_OVERLAYS = ["lws/vllm", "lws/sglang", "lws/trtllm"]
CODE_DIRS = ["dynamo", "frontend", "router", "workers", "kvbm", "planner"]
NAMESPACE = "dynamo"

# The documented command-line interface (README, issue 6). Flags per entry point.
RUNTIME_FLAGS = {"--runtime", "--nats-server", "--etcd-endpoints", "--namespace", "--lease-ttl-s",
                 "--request-ack-timeout-s", "--log-level", "--log-json", "-h", "--help"}
CONTRACT_FLAGS = {
    "dynamo.frontend": RUNTIME_FLAGS | {"--http-port", "--router-mode"},
    "dynamo.router": RUNTIME_FLAGS | {"--router-mode"},
    "dynamo.worker": RUNTIME_FLAGS | {
        "--engine", "--model", "--served-model-name", "--role", "--system-port", "--system-host",
        "--component", "--endpoint", "--migration-limit",
        "--block-size", "--max-num-seqs", "--max-model-len", "--num-gpu-blocks", "--speedup-ratio"},
    "dynamo.serve": RUNTIME_FLAGS | {"--http-port", "--router-mode", "--engine", "--model",
                                     "--served-model-name", "--num-workers"},
    # docs/planner.md
    "dynamo.planner": RUNTIME_FLAGS | {
        "--mode", "--topology", "--connector", "--ttft-ms", "--itl-ms", "--perf-model", "--adjustment-interval-s",
        "--lead-time-s", "--prometheus-url", "--frontend-metrics-url", "--model", "--decode-min", "--decode-max",
        "--prefill-min", "--prefill-max", "--agg-min", "--agg-max", "--scale-down-cooldown-s", "--gpu-budget"},
}
CHOICES = {
    "--router-mode": {"round-robin", "random", "kv", "least-loaded", "remote"},
    "--role": {"aggregated", "prefill", "decode"},
    "--engine": {"mocker", "builtin", "vllm", "sglang", "trtllm"},
}
# Engines that wrap external engines land with issue 9; the LeaderWorkerSet examples use their
# own flag spellings (vLLM's, SGLang's, TensorRT-LLM's), passed through by those workers.
PLANNED_ENGINE_FLAGS = {
    "vllm": {"--tensor-parallel-size", "--pipeline-parallel-size", "--distributed-executor-backend"},
    "sglang": {"--tp-size", "--nnodes", "--node-rank", "--dist-init-addr"},
    "trtllm": {"--tensor-parallel-size"},
}
# Metric names the dashboards and autoscalers may use (README / issue 6).
CONTRACT_METRICS = {
    "dynamo_frontend_requests_total", "dynamo_frontend_inflight_requests",
    "dynamo_frontend_time_to_first_token_seconds", "dynamo_frontend_inter_token_latency_seconds",
    "dynamo_worker_kv_blocks_active", "dynamo_worker_kv_blocks_total",
    "dynamo_worker_requests_waiting", "dynamo_worker_requests_active",
    "dynamo_worker_output_tokens_total", "dynamo_worker_requests_total",
    # docs/routing.md and docs/kvbm.md list these
    "dynamo_router_decisions_total", "dynamo_router_overlap_blocks", "dynamo_router_index_blocks",
    # docs/planner.md
    "dynamo_planner_desired_replicas", "dynamo_planner_current_replicas", "dynamo_planner_decisions_total",
    "dynamo_planner_predicted_request_rate", "dynamo_planner_observed_request_rate",
    "dynamo_planner_observed_ttft_p90_seconds", "dynamo_planner_observed_itl_p90_seconds",
    "dynamo_frontend_held_requests",
    "dynamo_router_kv_events_total", "dynamo_router_kv_event_lag_seconds", "dynamo_router_load_report_lag_seconds",
    "dynamo_kvbm_blocks_used", "dynamo_kvbm_blocks_total",
    "dynamo_kvbm_hit_blocks_total", "dynamo_kvbm_offload_bytes_total", "dynamo_kvbm_onboard_bytes_total",
}
# Environment variables set in manifests that are not read by dynamo's Python code.
EXTERNAL_ENV = {
    "HF_TOKEN", "HF_HOME",  # huggingface_hub
    "LD_LIBRARY_PATH", "PATH", "NVIDIA_VISIBLE_DEVICES", "NVIDIA_DRIVER_CAPABILITIES",
    "PYTHONUNBUFFERED", "PIP_NO_CACHE_DIR", "PIP_DISABLE_PIP_VERSION_CHECK", "DEBIAN_FRONTEND", "POD_NAME", "POD_NAMESPACE",
    "HEALTHCHECK_PORTS",  # deploy/docker/healthcheck.py
    "CC", "TRITON_CACHE_DIR",  # Triton: the C compiler for its launcher modules and where it caches them
    "GF_AUTH_ANONYMOUS_ENABLED", "GF_AUTH_ANONYMOUS_ORG_ROLE",  # grafana
}
# Secrets the manifests reference but never contain (a placeholder would overwrite the real
# value on every `kubectl apply -k`): name -> (keys, optional). docs/deploy/kubernetes.md shows
# how to create each (test_deploy_behaviour.py checks that).
OUT_OF_BAND_SECRETS = {
    "hf-token": ({"HF_TOKEN"}, True),
    "dynamo-api-key": ({"DYN_API_KEY"}, False),
    "dynamo-frontend-tls": ({"tls.crt", "tls.key"}, False),
    "dynamo-trtllm-ssh": ({"id_ed25519", "authorized_keys", "ssh_host_ed25519_key"}, False),
    "dynamo-nats-tls": ({"tls.crt", "tls.key", "ca.crt"}, False),
    "dynamo-etcd-server-tls": ({"tls.crt", "tls.key", "ca.crt"}, False),
    "dynamo-etcd-client-tls": ({"tls.crt", "tls.key", "ca.crt"}, False),
}
CLUSTER_SCOPED = {"Namespace", "StorageClass", "ClusterRole", "ClusterRoleBinding", "PersistentVolume",
                  "CustomResourceDefinition", "IngressClass", "PriorityClass"}


# ---------------------------------------------------------------------------------------------
# YAML, kustomize
# ---------------------------------------------------------------------------------------------


def load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def smp_merge(base, patch):
    """Strategic merge, the subset these manifests use: maps merge; lists of named maps merge by
    name (containers, env, volumes, ports...); other lists are replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            out[k] = smp_merge(base[k], v) if k in base else copy.deepcopy(v)
        return out
    if (isinstance(base, list) and isinstance(patch, list) and patch
            and all(isinstance(x, dict) and "name" in x for x in base + patch)):
        # like kustomize: items new to the list come first, in the patch's order
        by_name = {x["name"]: x for x in patch}
        merged = [smp_merge(x, by_name[x["name"]]) if x["name"] in by_name else copy.deepcopy(x) for x in base]
        base_names = {x["name"] for x in base}
        return [copy.deepcopy(x) for x in patch if x["name"] not in base_names] + merged
    return copy.deepcopy(patch)


def json6902(doc: dict, ops: list[dict]) -> dict:
    doc = copy.deepcopy(doc)
    for op in ops:
        parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
        parent = doc
        for p in parts[:-1]:
            parent = parent[int(p)] if isinstance(parent, list) else parent[p]
        last = parts[-1]
        if op["op"] in ("add", "replace"):
            if isinstance(parent, list):
                if last == "-":
                    parent.append(op["value"])
                elif op["op"] == "add":
                    parent.insert(int(last), op["value"])
                else:
                    parent[int(last)] = op["value"]
            else:
                assert op["op"] == "add" or last in parent, op
                parent[last] = op["value"]
        elif op["op"] == "remove":
            del parent[int(last) if isinstance(parent, list) else last]
        else:
            raise AssertionError(f"unsupported op {op}")
    return doc


def matches(doc: dict, target: dict) -> bool:
    if "kind" in target and doc["kind"] != target["kind"]:
        return False
    if "name" in target and doc["metadata"]["name"] != target["name"]:
        return False
    if "labelSelector" in target:
        labels = doc["metadata"].get("labels", {})
        for term in target["labelSelector"].split(","):
            k, v = term.split("=")
            if labels.get(k.strip()) != v.strip():
                return False
    return True


def kustomize(directory: Path) -> list[dict]:
    kz = yaml.safe_load((directory / "kustomization.yaml").read_text())
    docs: list[dict] = []
    for res in kz.get("resources", []):
        p = directory / res
        docs += kustomize(p) if p.is_dir() else load_docs(p)
    for comp in kz.get("components", []):
        docs = apply_kustomization(docs, directory / comp)
    return apply_kustomization(docs, directory, kz, include_resources=False)


def apply_kustomization(docs, directory: Path, kz=None, include_resources=True):
    kz = kz or yaml.safe_load((directory / "kustomization.yaml").read_text())
    if include_resources:
        for res in kz.get("resources", []):
            docs = docs + load_docs(directory / res)
        for comp in kz.get("components", []):  # a component's own components
            docs = apply_kustomization(docs, directory / comp)
    for patch in kz.get("patches", []):
        body = yaml.safe_load((directory / patch["path"]).read_text()) if "path" in patch else yaml.safe_load(patch["patch"])
        target = patch.get("target")
        if target is None:  # strategic merge onto the object the patch names
            target = {"kind": body["kind"], "name": body["metadata"]["name"]}
        hit = False
        for i, d in enumerate(docs):
            if matches(d, target):
                docs[i] = json6902(d, body) if isinstance(body, list) else smp_merge(d, {k: v for k, v in body.items() if k != "metadata"})
                hit = True
        # kustomize: a patch with a target selector may match nothing (a component's LWS patch in
        # an overlay without LeaderWorkerSets); one that names its object must find it
        assert hit or "target" in patch, f"patch {patch} in {directory} matched nothing"
    if "namespace" in kz:
        for d in docs:
            if d["kind"] not in CLUSTER_SCOPED:
                d.setdefault("metadata", {})["namespace"] = kz["namespace"]
    for image in kz.get("images", []):
        for d in docs:
            for c in pod_containers(d):
                name, _, tag = c["image"].partition(":")
                if name == image["name"]:
                    c["image"] = image.get("newName", name) + ":" + image.get("newTag", tag)
    return docs


def pod_spec(doc: dict) -> list[dict]:
    """The pod specs inside a workload (LeaderWorkerSet has two)."""
    spec = doc.get("spec", {})
    if doc["kind"] in ("Deployment", "StatefulSet", "Job", "DaemonSet"):
        return [spec["template"]["spec"]]
    if doc["kind"] == "LeaderWorkerSet":
        t = spec["leaderWorkerTemplate"]
        return [x["spec"] for x in (t.get("leaderTemplate"), t["workerTemplate"]) if x]
    return []


def pod_containers(doc: dict) -> list[dict]:
    return [c for ps in pod_spec(doc) for c in ps.get("containers", []) + ps.get("initContainers", [])]


def overlay_path(overlay: str) -> Path:
    return K8S / overlay if overlay.startswith(("lws/", "combo/")) else K8S / "overlays" / overlay


@cache
def rendered(overlay: str, renderer: str) -> tuple:
    path = overlay_path(overlay)
    if renderer == "python":
        docs = kustomize(path)
    else:
        out = subprocess.run(["kubectl", "kustomize", str(path)], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    return tuple(json.dumps(d, sort_keys=True) for d in docs)


def docs_of(overlay: str, renderer: str = "python") -> list[dict]:
    return [json.loads(s) for s in rendered(overlay, renderer)]


RENDERERS = ["python", pytest.param("kubectl", marks=pytest.mark.skipif(
    shutil.which("kubectl") is None, reason="kubectl (kustomize) not on PATH"))]
ALL_K8S = OVERLAYS + LWS_OVERLAYS


def find(docs, kind, name=None):
    out = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    return out


# ---------------------------------------------------------------------------------------------
# Kubernetes
# ---------------------------------------------------------------------------------------------


def test_every_yaml_file_parses():
    files = sorted(list(DEPLOY.rglob("*.yaml")) + list(DEPLOY.rglob("*.yml")))
    assert len(files) > 20
    for f in files:
        load_docs(f)


def test_every_kustomization_is_built():
    """Each kustomization directory is rendered by these tests: the overlays directly, the
    components through them or through the combinations of test_deploy_behaviour.py."""
    dirs = {p.parent.relative_to(K8S).as_posix() for p in K8S.rglob("kustomization.yaml")}
    assert dirs == {"base", *LWS_OVERLAYS, *(f"overlays/{o}" for o in OVERLAYS),
                    *(f"components/{c}" for c in ("eks", "gke", "aks", "eks-gpu", "gke-gpu", "aks-gpu",
                                                  "standalone-router", "kvbm", "tls", "planner",
                                                  "planner-keda"))}


@pytest.mark.parametrize("renderer", RENDERERS)
@pytest.mark.parametrize("overlay", ALL_K8S)
def test_overlay_renders(overlay, renderer):
    docs = docs_of(overlay, renderer)
    keys = [(d["kind"], d["metadata"]["name"]) for d in docs]
    assert len(keys) == len(set(keys)), "duplicate objects"
    for d in docs:
        if d["kind"] not in CLUSTER_SCOPED:
            assert d["metadata"].get("namespace") == NAMESPACE, d["metadata"]
        assert d["metadata"].get("labels", {}).get("app.kubernetes.io/part-of") == "dynamo", keys


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (kustomize) not on PATH")
@pytest.mark.parametrize("overlay", ALL_K8S)
def test_python_renderer_agrees_with_kustomize(overlay):
    key = lambda d: (d["kind"], d["metadata"]["name"])  # noqa: E731
    ours = sorted(docs_of(overlay, "python"), key=key)
    theirs = sorted(docs_of(overlay, "kubectl"), key=key)
    assert [key(d) for d in ours] == [key(d) for d in theirs]
    for a, b in zip(ours, theirs):
        assert a == b, key(a)


CRD_KINDS = {"ScaledObject", "ServiceMonitor", "LeaderWorkerSet", "BackendConfig"}


@pytest.mark.parametrize("overlay", ALL_K8S)
def test_builtin_kinds_match_kubernetes_schema_strict(overlay):
    kv = pytest.importorskip("kubernetes_validate")
    version = kv.latest_version()
    for d in docs_of(overlay):
        if d["kind"] in CRD_KINDS:
            continue
        try:
            kv.validate(d, version, strict=True)
        except kv.ValidationError as e:  # pragma: no cover - message for the failure
            pytest.fail(f"{d['kind']}/{d['metadata']['name']} in {overlay}: {e}")


def check_scaled_object(so, docs):
    spec = so["spec"]
    assert so["apiVersion"] == "keda.sh/v1alpha1"
    assert set(spec) <= {"scaleTargetRef", "minReplicaCount", "maxReplicaCount", "pollingInterval",
                         "cooldownPeriod", "idleReplicaCount", "advanced", "triggers", "fallback"}
    ref = spec["scaleTargetRef"]
    assert find(docs, ref.get("kind", "Deployment"), ref["name"]), ref
    assert 0 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    for t in spec["triggers"]:
        assert t["type"] == "prometheus"
        assert set(t) <= {"type", "name", "metadata", "metricType", "authenticationRef", "useCachedMetrics"}
        assert t.get("metricType", "AverageValue") in {"AverageValue", "Value", "Utilization"}
        md = t["metadata"]
        assert {"serverAddress", "query", "threshold"} <= set(md)
        assert all(isinstance(v, str) for v in md.values()), "KEDA trigger metadata values are strings"
        float(md["threshold"])
        assert md["serverAddress"].startswith("http")


def check_service_monitor(sm, docs):
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    sel = sm["spec"]["selector"]["matchLabels"]
    services = [s for s in find(docs, "Service") if sel.items() <= s["metadata"].get("labels", {}).items()]
    assert services, f"ServiceMonitor {sm['metadata']['name']} selects no Service"
    for ep in sm["spec"]["endpoints"]:
        assert any(ep["port"] in {p.get("name") for p in s["spec"]["ports"]} for s in services)
        for r in ep.get("relabelings", []):
            assert set(r) <= {"sourceLabels", "targetLabel", "regex", "replacement", "action", "separator"}


def check_lws(lws):
    assert lws["apiVersion"] == "leaderworkerset.x-k8s.io/v1"
    t = lws["spec"]["leaderWorkerTemplate"]
    assert isinstance(t["size"], int) and t["size"] >= 2
    assert t.get("restartPolicy") in {None, "RecreateGroupOnPodRestart", "Default", "None"}
    assert lws["spec"].get("startupPolicy") in {None, "LeaderCreated", "LeaderReady"}
    kv = pytest.importorskip("kubernetes_validate")
    for tmpl in (t["leaderTemplate"], t["workerTemplate"]):
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x", **tmpl.get("metadata", {})}, "spec": tmpl["spec"]}
        kv.validate(pod, kv.latest_version(), strict=True)


@pytest.mark.parametrize("overlay", ALL_K8S)
def test_custom_resources_are_well_formed(overlay):
    docs = docs_of(overlay)
    for d in docs:
        if d["kind"] == "ScaledObject":
            check_scaled_object(d, docs)
        elif d["kind"] == "ServiceMonitor":
            check_service_monitor(d, docs)
        elif d["kind"] == "LeaderWorkerSet":
            check_lws(d)


# Custom resources against the OpenAPI v3 schemas their projects publish in their CRDs
# (tests/unit/deploy/schemas/README.md says where each comes from), strictly, like
# `kubeconform -strict` with CRD schemas: an object that declares `properties` admits no other
# field unless it says `additionalProperties` or `x-kubernetes-preserve-unknown-fields`. The
# schema files stay as published; strictness is added here when they are loaded. CEL rules
# (`x-kubernetes-validations`) and `format` are not checked (kubeconform does not run CEL either).
CRD_SCHEMA_DIR = Path(__file__).resolve().parent / "schemas"
CRD_SCHEMAS = {
    ("keda.sh/v1alpha1", "ScaledObject"): "keda.sh_scaledobject_v1alpha1.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "monitoring.coreos.com_servicemonitor_v1.json",
    ("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet"): "leaderworkerset.x-k8s.io_leaderworkerset_v1.json",
    ("cloud.google.com/v1", "BackendConfig"): "cloud.google.com_backendconfig_v1.json",
}
# CRDs leave the top-level metadata to the API server (`type: object`); check it minimally.
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
OBJECT_META = {"type": "object", "required": ["name"],
               "properties": {"name": {"type": "string", "minLength": 1}, "namespace": {"type": "string"},
                              "labels": STRING_MAP, "annotations": STRING_MAP}}


def strict_schema(node, structural: bool = True):
    """A copy of a CRD schema with kubeconform's -strict and the Kubernetes schema extensions
    expressed in plain JSON Schema. `structural` is False inside anyOf/allOf/oneOf/not, which in a
    structural schema only constrain values and must not forbid fields."""
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key == "properties":
            out[key] = {name: strict_schema(sub, structural) for name, sub in value.items()}
        elif key in ("items", "additionalProperties") and isinstance(value, dict):
            out[key] = strict_schema(value, structural)
        elif key in ("anyOf", "allOf", "oneOf"):
            out[key] = [strict_schema(sub, False) for sub in value]
        elif key == "not":
            out[key] = strict_schema(value, False)
        else:  # description, enum, default, example, x-kubernetes-*: data, not schemas
            out[key] = copy.deepcopy(value)
    if out.get("x-kubernetes-embedded-resource"):
        out.setdefault("properties", {})
        out["properties"] = {"apiVersion": {"type": "string"}, "kind": {"type": "string"},
                             "metadata": {"type": "object"}, **out["properties"]}
    if out.get("x-kubernetes-int-or-string") and "type" not in out and "anyOf" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if out.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if (structural and "properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@cache
def crd_validator(api_version: str, kind: str):
    jsonschema = pytest.importorskip("jsonschema")
    published = json.loads((CRD_SCHEMA_DIR / CRD_SCHEMAS[(api_version, kind)]).read_text())
    schema = strict_schema(published)
    schema["required"] = sorted({"apiVersion", "kind", "metadata", *schema.get("required", [])})
    schema["properties"]["apiVersion"] = {"type": "string", "enum": [api_version]}
    schema["properties"]["kind"] = {"type": "string", "enum": [kind]}
    schema["properties"]["metadata"] = OBJECT_META
    # OpenAPI v3.0 schemas are JSON Schema draft 4 (boolean exclusiveMinimum, no `const`).
    jsonschema.Draft4Validator.check_schema(schema)
    return jsonschema.Draft4Validator(schema)


def crd_schema_errors(doc: dict) -> list[str]:
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key not in CRD_SCHEMAS:
        return [f"no published schema for apiVersion {key[0]!r} kind {key[1]!r}"]
    validator = crd_validator(*key)
    return sorted(f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
                  for e in validator.iter_errors(doc))


CRD_SOURCES = ALL_K8S + ["lws-files"]


def crd_objects(source: str) -> list[tuple[str, dict]]:
    """(where, object) for each ScaledObject, ServiceMonitor and LeaderWorkerSet of a rendered
    overlay, or ("lws-files") of the LeaderWorkerSet manifests as written."""
    if source == "lws-files":
        docs = [(f.relative_to(ROOT).as_posix(), d) for f in sorted((K8S / "lws").rglob("*.yaml"))
                if f.name != "kustomization.yaml" for d in load_docs(f)]
    else:
        docs = [(source, d) for d in docs_of(source)]
    return [(f"{where}: {d['kind']}/{d.get('metadata', {}).get('name')}", d)
            for where, d in docs if d.get("kind") in CRD_KINDS]


@pytest.mark.parametrize("source", CRD_SOURCES)
def test_custom_resources_match_published_crd_schemas_strict(source):
    failures = [f"{where}: {err}" for where, d in crd_objects(source) for err in crd_schema_errors(d)]
    assert not failures, "\n".join(failures)


def test_every_custom_resource_kind_is_schema_validated():
    """The schema test above is not vacuous: each kind occurs, and has a schema file."""
    assert {kind for _, kind in CRD_SCHEMAS} == CRD_KINDS
    counts = {kind: 0 for kind in CRD_KINDS}
    for source in CRD_SOURCES:
        for _, d in crd_objects(source):
            counts[d["kind"]] += 1
    assert all(n >= 1 for n in counts.values()), counts
    files = {p.name for p in CRD_SCHEMA_DIR.glob("*.json")} - {"eksctl.io_clusterconfig_v1alpha5.json"}
    assert files == set(CRD_SCHEMAS.values()), files
    readme = (CRD_SCHEMA_DIR / "README.md").read_text()
    assert all(f in readme for f in files), "every schema file's source is recorded in README.md"


def _first(kind: str) -> dict:
    for source in CRD_SOURCES:
        for _, d in crd_objects(source):
            if d["kind"] == kind:
                return copy.deepcopy(d)
    raise AssertionError(f"no {kind} in the manifests")


def _rename(mapping: dict, old: str, new: str) -> None:
    mapping[new] = mapping.pop(old)


def _lws_container(d: dict) -> dict:
    return d["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"]["containers"][0]


BROKEN_CRS = {
    # name: (kind, mutation, text the error must contain)
    "scaledobject-misspelled-field": ("ScaledObject", lambda d: _rename(d["spec"], "scaleTargetRef", "scaleTargetRefx"),
                                      "'scaleTargetRefx' was unexpected"),
    "scaledobject-replicas-not-integer": ("ScaledObject", lambda d: d["spec"].update(minReplicaCount="one"),
                                          "spec.minReplicaCount: 'one' is not of type 'integer'"),
    "scaledobject-trigger-metadata-not-string": ("ScaledObject", lambda d: d["spec"]["triggers"][0]["metadata"].update(threshold=4),
                                                 "spec.triggers.0.metadata.threshold: 4 is not of type 'string'"),
    "scaledobject-no-triggers": ("ScaledObject", lambda d: d["spec"].pop("triggers"), "'triggers' is a required property"),
    "scaledobject-wrong-api-version": ("ScaledObject", lambda d: d.update(apiVersion="keda.sh/v1"), "no published schema"),
    "scaledobject-no-name": ("ScaledObject", lambda d: d["metadata"].pop("name"), "metadata: 'name' is a required property"),
    "servicemonitor-misspelled-endpoint-field": ("ServiceMonitor", lambda d: _rename(d["spec"]["endpoints"][0], "interval", "intervall"),
                                                 "'intervall' was unexpected"),
    "servicemonitor-bad-relabel-action": ("ServiceMonitor", lambda d: d["spec"]["endpoints"][0]["relabelings"][0].update(action="rename"),
                                          "spec.endpoints.0.relabelings.0.action: 'rename' is not one of"),
    "lws-size-not-integer": ("LeaderWorkerSet", lambda d: d["spec"]["leaderWorkerTemplate"].update(size="2"),
                             "spec.leaderWorkerTemplate.size: '2' is not of type 'integer'"),
    "lws-bad-startup-policy": ("LeaderWorkerSet", lambda d: d["spec"].update(startupPolicy="WorkersFirst"),
                               "spec.startupPolicy: 'WorkersFirst' is not one of"),
    "lws-misspelled-container-field": ("LeaderWorkerSet", lambda d: _rename(_lws_container(d), "image", "imagee"),
                                       "'imagee' was unexpected"),
    "backendconfig-timeout-as-string": ("BackendConfig", lambda d: d["spec"].update(timeoutSec="3600s"),
                                        "spec.timeoutSec: '3600s' is not of type 'integer'"),
    "backendconfig-misspelled-health-check": ("BackendConfig", lambda d: _rename(d["spec"], "healthCheck", "healthcheck"),
                                              "'healthcheck' was unexpected"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_CRS))
def test_crd_schema_validation_rejects_broken_objects(case):
    kind, mutate, expected = BROKEN_CRS[case]
    doc = _first(kind)
    assert crd_schema_errors(doc) == [], "the unbroken object must pass"
    mutate(doc)
    errors = crd_schema_errors(doc)
    assert any(expected in e for e in errors), errors


def selects(selector: dict, labels: dict) -> bool:
    return selector.items() <= labels.items()


def template_labels(d):
    if d["kind"] == "LeaderWorkerSet":
        return [t["metadata"]["labels"] for t in (d["spec"]["leaderWorkerTemplate"]["leaderTemplate"],
                                                  d["spec"]["leaderWorkerTemplate"]["workerTemplate"])]
    return [d["spec"]["template"]["metadata"]["labels"]] if pod_spec(d) else []


@pytest.mark.parametrize("overlay", ALL_K8S)
def test_references_resolve(overlay):
    docs = docs_of(overlay)
    # a LeaderWorkerSet overlay is applied on top of a topology overlay, which provides the rest
    context = docs + (docs_of("agg-kv") if overlay in LWS_OVERLAYS else [])
    configmaps = {d["metadata"]["name"]: d.get("data", {}) for d in find(context, "ConfigMap")}
    secrets = {d["metadata"]["name"]: {**d.get("data", {}), **d.get("stringData", {})} for d in find(context, "Secret")}
    secrets |= {name: dict.fromkeys(keys, "") for name, (keys, _) in OUT_OF_BAND_SECRETS.items() if name not in secrets}
    pvcs = {d["metadata"]["name"] for d in find(context, "PersistentVolumeClaim")}
    storage_classes = {d["metadata"]["name"] for d in find(context, "StorageClass")}
    all_pod_labels = [lbl for d in docs for lbl in template_labels(d)]
    for d in docs:
        kind, name = d["kind"], d["metadata"]["name"]
        if pod_spec(d) and kind not in ("Job", "LeaderWorkerSet"):
            sel = d["spec"]["selector"]["matchLabels"]
            assert all(selects(sel, lbl) for lbl in template_labels(d)), f"{kind}/{name} selector"
        for ps in pod_spec(d):
            volumes = {v["name"]: v for v in ps.get("volumes", [])}
            volumes |= {t["metadata"]["name"]: t for t in d["spec"].get("volumeClaimTemplates", [])}
            for v in volumes.values():
                if "persistentVolumeClaim" in v:
                    assert v["persistentVolumeClaim"]["claimName"] in pvcs
                if "configMap" in v:
                    assert v["configMap"]["name"] in configmaps
                if "secret" in v:
                    assert v["secret"]["secretName"] in secrets, f"{kind}/{name}: Secret {v['secret']['secretName']}"
                    for item in v["secret"].get("items", []):
                        assert item["key"] in secrets[v["secret"]["secretName"]]
            for c in ps.get("containers", []) + ps.get("initContainers", []):
                env = {e["name"] for e in c.get("env", [])}
                if kind == "LeaderWorkerSet":  # the LWS pod webhook adds these to every container
                    env |= {"LWS_LEADER_ADDRESS", "LWS_GROUP_SIZE", "LWS_WORKER_INDEX", "LWS_NAME"}
                for src in c.get("envFrom", []):
                    env |= set(configmaps[src["configMapRef"]["name"]])
                for e in c.get("env", []):
                    ref = e.get("valueFrom", {}).get("secretKeyRef")
                    if ref:
                        assert ref["key"] in secrets[ref["name"]]
                for m in c.get("volumeMounts", []):
                    assert m["name"] in volumes, f"{kind}/{name}: mount {m['name']}"
                # $(VAR) in command/args expands only from the container's own environment
                for arg in c.get("command", []) + c.get("args", []):
                    for var in re.findall(r"(?<!\$)\$\(([A-Za-z_][A-Za-z0-9_]*)\)", arg):
                        assert var in env, f"{kind}/{name}/{c['name']}: $({var}) undefined"
                ports = {p["name"] for p in c.get("ports", []) if "name" in p}
                for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                    port = c.get(probe, {}).get("httpGet", {}).get("port")
                    if isinstance(port, str):
                        assert port in ports, f"{kind}/{name}: {probe} port {port}"
        if kind == "Service":
            assert any(selects(d["spec"]["selector"], lbl) for lbl in all_pod_labels), f"Service/{name} selects nothing"
        if kind == "PodDisruptionBudget":
            assert any(selects(d["spec"]["selector"]["matchLabels"], lbl) for lbl in all_pod_labels), name
        if kind == "HorizontalPodAutoscaler":
            assert find(docs, d["spec"]["scaleTargetRef"]["kind"], d["spec"]["scaleTargetRef"]["name"])
        if kind == "Ingress":
            for tls in d["spec"].get("tls", []):
                assert tls["secretName"] in secrets, f"Ingress/{name}: TLS Secret {tls['secretName']}"
            for rule in d["spec"]["rules"]:
                for p in rule["http"]["paths"]:
                    svc = find(docs, "Service", p["backend"]["service"]["name"])
                    assert svc and p["backend"]["service"]["port"]["name"] in {x["name"] for x in svc[0]["spec"]["ports"]}
        if kind == "PersistentVolumeClaim" and d["spec"].get("storageClassName"):
            sc = d["spec"]["storageClassName"]
            assert sc in storage_classes or sc in {"azurefile-csi-premium", "managed-csi-premium"}, sc
        if kind == "StatefulSet":
            assert find(docs, "Service", d["spec"]["serviceName"])
            sc = (d["spec"].get("volumeClaimTemplates") or [{"spec": {}}])[0]["spec"].get("storageClassName")
            assert sc is None or sc in storage_classes or sc == "managed-csi-premium", sc


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_workers_have_gpus_probes_pdbs_and_autoscalers(overlay):
    docs = docs_of(overlay)
    workers = [d for d in find(docs, "Deployment") if d["metadata"]["labels"].get("dynamo.io/gpu-worker") == "true"]
    assert workers
    pdbs = find(docs, "PodDisruptionBudget")
    scaled = {so["spec"]["scaleTargetRef"]["name"] for so in find(docs, "ScaledObject")}
    for w in workers:
        ps = w["spec"]["template"]["spec"]
        c = next(c for c in ps["containers"] if c["name"] == "worker")
        assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert {"startupProbe", "livenessProbe", "readinessProbe"} <= set(c)
        assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
        assert c["livenessProbe"]["httpGet"]["path"] == "/health"
        assert any(t["key"] == "nvidia.com/gpu" for t in ps["tolerations"])
        assert ps["securityContext"]["runAsNonRoot"] is True
        labels = w["spec"]["template"]["metadata"]["labels"]
        assert any(selects(p["spec"]["selector"]["matchLabels"], labels) for p in pdbs)
        assert w["metadata"]["name"] in scaled, "worker without a KEDA ScaledObject"
    frontend = find(docs, "Deployment", "dynamo-frontend")[0]
    assert find(docs, "HorizontalPodAutoscaler", "dynamo-frontend")
    assert find(docs, "Ingress", "dynamo-frontend")
    assert frontend["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["path"] == "/ready"


def flags_configmap(docs):
    return find(docs, "ConfigMap", "dynamo-flags")[0]["data"]


def worker_roles(docs):
    roles = set()
    for d in find(docs, "Deployment"):
        for c in pod_containers(d):
            args = c.get("args", [])
            if "--role" in args:
                roles.add(args[args.index("--role") + 1])
    return roles


@pytest.mark.parametrize("overlay,router,roles", [
    ("agg", "round-robin", {"aggregated"}), ("agg-kv", "kv", {"aggregated"}),
    ("disagg", "kv", {"prefill", "decode"}), ("eks", "kv", {"prefill", "decode"}),
    ("gke", "kv", {"aggregated"}), ("aks", "kv", {"aggregated"}),
])
def test_topologies(overlay, router, roles):
    docs = docs_of(overlay)
    assert flags_configmap(docs)["ROUTER_MODE"] == router
    assert worker_roles(docs) == roles
    frontend = find(docs, "Deployment", "dynamo-frontend")[0]["spec"]["template"]["spec"]["containers"][0]
    assert frontend["args"][frontend["args"].index("--router-mode") + 1] == "$(ROUTER_MODE)"


def gpu_worker_specs(docs):
    return [d["spec"]["template"]["spec"] for d in find(docs, "Deployment")
            if d["metadata"]["labels"].get("dynamo.io/gpu-worker") == "true"]


def test_eks_overlay():
    docs = docs_of("eks")
    sc = find(docs, "StorageClass", "dynamo-efs")[0]
    assert sc["provisioner"] == "efs.csi.aws.com"
    assert find(docs, "PersistentVolumeClaim", "dynamo-model-cache")[0]["spec"]["storageClassName"] == "dynamo-efs"
    ing = find(docs, "Ingress", "dynamo-frontend")[0]
    assert ing["spec"]["ingressClassName"] == "alb"
    assert ing["metadata"]["annotations"]["alb.ingress.kubernetes.io/target-type"] == "ip"
    cluster = load_docs(K8S / "clusters" / "eks-cluster.yaml")[0]
    groups = {g["name"] for g in cluster["managedNodeGroups"]}
    for ps in gpu_worker_specs(docs):
        assert ps["nodeSelector"]["eks.amazonaws.com/nodegroup"] in groups


def test_gke_overlay():
    docs = docs_of("gke")
    assert find(docs, "StorageClass", "dynamo-filestore")[0]["provisioner"] == "filestore.csi.storage.gke.io"
    assert find(docs, "StorageClass", "dynamo-pd-ssd")[0]["provisioner"] == "pd.csi.storage.gke.io"
    for ps in gpu_worker_specs(docs):
        env = {e["name"]: e.get("value") for e in ps["containers"][0]["env"]}
        assert "/usr/local/nvidia/lib64" in env["LD_LIBRARY_PATH"].split(":")
        path = env["PATH"].split(":")
        assert "/usr/local/nvidia/bin" in path and "/opt/venv/bin" in path  # the image's venv too
        assert "cloud.google.com/gke-accelerator" in ps["nodeSelector"]
        assert any(t["key"] == "cloud.google.com/gke-spot" for t in ps["tolerations"])
        assert any(t["key"] == "nvidia.com/gpu" for t in ps["tolerations"])
    ing = find(docs, "Ingress", "dynamo-frontend")[0]
    assert ing["metadata"]["annotations"]["kubernetes.io/ingress.class"] == "gce"


def test_aks_overlay():
    docs = docs_of("aks")
    assert find(docs, "PersistentVolumeClaim", "dynamo-model-cache")[0]["spec"]["storageClassName"] == "azurefile-csi-premium"
    for ps in gpu_worker_specs(docs):
        assert ps["nodeSelector"]["kubernetes.azure.com/agentpool"] == "gpunp"
        assert {t["key"] for t in ps["tolerations"]} >= {"sku", "nvidia.com/gpu"}


# ---------------------------------------------------------------------------------------------
# docker-compose, Dockerfile
# ---------------------------------------------------------------------------------------------


@cache
def compose() -> dict:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


def compose_default(value: str) -> str:
    """${VAR:-default} -> default (what compose substitutes with VAR unset)."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)


def test_compose_structure():
    c = compose()
    assert set(c) <= {"name", "services", "volumes", "networks", "configs", "secrets"} | {k for k in c if k.startswith("x-")}
    services = c["services"]
    allowed = {"image", "build", "command", "entrypoint", "environment", "volumes", "ports", "expose", "depends_on",
               "restart", "healthcheck", "profiles", "deploy", "stop_grace_period"}
    for name, s in services.items():
        assert set(s) <= allowed, (name, set(s) - allowed)
        assert "healthcheck" in s, f"{name} has no healthcheck"
        assert s["healthcheck"]["test"][0] in ("CMD", "CMD-SHELL")
        for dep, cond in s.get("depends_on", {}).items():
            assert dep in services and cond["condition"] in {"service_healthy", "service_started", "service_completed_successfully"}
        for v in s.get("volumes", []):
            src = v.split(":")[0]
            if src.startswith("."):
                assert (DEPLOY / src).exists(), v
            else:
                assert src in c["volumes"], v
        if "build" in s:
            assert (DEPLOY / s["build"]["context"] / s["build"]["dockerfile"]).is_file()
            assert compose_default(s["build"]["target"]) in {"cpu", "cuda"}
    nats = services["nats"]
    assert nats["command"][0] == "nats-server" and "-js" in nats["command"], "JetStream: shared rate limits"
    assert "etcd" in services and "profiles" not in nats and "profiles" not in services["etcd"]
    for name, s in services.items():
        if name.startswith(("frontend", "worker", "prefill", "decode")):
            assert s["depends_on"]["nats"]["condition"] == "service_healthy"
            assert s["depends_on"]["etcd"]["condition"] == "service_healthy"
            assert "/models" in [v.split(":")[1] for v in s["volumes"]]
            assert s["environment"]["NATS_SERVER"] == "nats://nats:4222"
            assert s["environment"]["ETCD_ENDPOINTS"] == "http://etcd:2379"


@pytest.mark.parametrize("profile,router,roles", [
    ("aggregated", "round-robin", {"aggregated"}), ("kv", "kv", {"aggregated"}), ("disagg", "kv", {"prefill", "decode"})])
def test_compose_profiles(profile, router, roles):
    services = {n: s for n, s in compose()["services"].items() if profile in s.get("profiles", [profile])}
    frontends = [s for n, s in services.items() if n.startswith("frontend")]
    assert len(frontends) == 1
    cmd = frontends[0]["command"]
    assert cmd[cmd.index("--router-mode") + 1] == router
    assert any(p.endswith(":8000") for p in frontends[0]["ports"])
    found = set()
    for s in services.values():
        cmd = [compose_default(str(x)) for x in s.get("command", [])]
        if "dynamo.worker" in cmd:
            found.add(cmd[cmd.index("--role") + 1])
            assert cmd[cmd.index("--model") + 1] == "/models/dynamo-tiny"
            assert (ROOT / "models" / "dynamo-tiny" / "config.json").is_file()
    assert found == roles


def test_compose_env_file_selects_a_profile():
    env = dict(line.split("=", 1) for line in (DEPLOY / ".env").read_text().splitlines() if line and not line.startswith("#"))
    profiles = {p for s in compose()["services"].values() for p in s.get("profiles", [])}
    assert set(env["COMPOSE_PROFILES"].split(",")) <= profiles


@cache
def dockerfile() -> str:
    return (DEPLOY / "docker" / "Dockerfile").read_text()


def dockerfile_stages() -> dict[str, str]:
    stages, current = {}, None
    for line in dockerfile().splitlines():
        m = re.match(r"FROM\s+\S+\s+AS\s+(\S+)", line, re.I)
        if m:
            current = m.group(1)
            stages[current] = ""
        elif current:
            stages[current] += line + "\n"
    return stages


def test_dockerfile():
    stages = dockerfile_stages()
    assert {"cpu", "cuda"} <= set(stages)
    for target in ("cpu", "cuda"):
        body = stages[target]
        user = re.findall(r"^USER\s+(\S+)", body, re.M)
        assert user and not user[-1].startswith(("0", "root")), "final stage must not run as root"
        assert re.search(r"^HEALTHCHECK .*CMD", body, re.M)
        assert re.search(r'^VOLUME \["/models"\]', body, re.M)
    for engine in ("builtin", "vllm", "sglang", "trtllm"):
        assert engine in stages["cuda-build"]
    for pkg in ("vllm", "sglang", "tensorrt_llm"):
        assert f"pip install $extra {pkg}" in stages["cuda-build"]
    # everything COPY'd from the build context exists in the repository
    for src in re.findall(r"^COPY\s+(?!--from)(.+)\s+\S+$", dockerfile(), re.M):
        for p in src.split():
            assert (ROOT / p).exists(), p
    ignore = (DEPLOY / "docker" / "Dockerfile.dockerignore").read_text()
    for p in ("dynamo/", "frontend/", "router/", "workers/", "kvbm/", "models/dynamo-tiny/", "deploy/docker/healthcheck.py"):
        assert f"!{p}" in ignore
    compile((DEPLOY / "docker" / "healthcheck.py").read_text(), "healthcheck.py", "exec")


def _apt_packages(stage_body: str) -> set[str]:
    """Packages a stage installs with apt-get (every `apt-get install` of its RUN lines)."""
    body = stage_body.replace("\\\n", " ")
    pkgs: set[str] = set()
    for m in re.finditer(r"apt-get install ([^&;\n]+)", body):
        pkgs |= {w for w in m.group(1).split() if not w.startswith("-")}
    return pkgs


def test_cuda_runtime_stage_can_build_triton_launchers():
    """Triton compiles a C launcher (cuda_utils.c, driver.c) on a kernel's first launch in a
    process, with the compiler in $CC (else cc/gcc/clang on PATH), libc headers and Python.h
    of the interpreter that runs it. The final CUDA stage is what GPU workers run, so it must
    carry all three, for the same python3 the venv was built with."""
    stages = dockerfile_stages()
    runtime, build = stages["cuda"], stages["cuda-build"]
    pkgs = _apt_packages(runtime)
    assert pkgs & {"gcc", "clang", "build-essential"}, f"no C compiler in the cuda stage: {sorted(pkgs)}"
    assert "build-essential" in pkgs or "libc6-dev" in pkgs, "gcc without libc6-dev has no stdio.h (--no-install-recommends)"
    assert pkgs & {"python3-dev"} or any(re.fullmatch(r"python3\.\d+-dev", p) for p in pkgs), "no Python headers"
    # The venv copied from cuda-build is made by that stage's python3: same base image, same python3.
    assert "python3 -m venv /opt/venv" in build and "python3" in pkgs
    assert re.search(r"^FROM \$\{CUDA_IMAGE\} AS cuda-build$", dockerfile(), re.M)
    assert re.search(r"^FROM \$\{CUDA_IMAGE\} AS cuda$", dockerfile(), re.M)
    # Triton writes its compiled launchers to a cache directory; the user's home may be read-only.
    assert re.search(r"TRITON_CACHE_DIR=/tmp/", runtime)


# ---------------------------------------------------------------------------------------------
# ECS
# ---------------------------------------------------------------------------------------------


@cache
def ecs_taskdefs() -> dict[str, dict]:
    out = Path(subprocess.run(["mktemp", "-d"], capture_output=True, text=True, check=True).stdout.strip())
    env = {"PATH": "/usr/bin:/bin", "DRY_RUN": "1", "OUT_DIR": str(out), "AWS_REGION": "us-east-1",
           "IMAGE_CPU": "123456789012.dkr.ecr.us-east-1.amazonaws.com/dynamo-py:cpu",
           "IMAGE_CUDA": "123456789012.dkr.ecr.us-east-1.amazonaws.com/dynamo-py:cuda",
           "EFS_FILE_SYSTEM_ID": "fs-0123456789abcdef0"}
    r = subprocess.run(["bash", str(DEPLOY / "ecs" / "deploy.sh")], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    tds = {p.stem: json.loads(p.read_text()) for p in out.glob("*.json")}
    shutil.rmtree(out)
    return tds


def test_ecs_deploy_script():
    script = DEPLOY / "ecs" / "deploy.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    declared = set(re.search(r"TEMPLATE_VARS=\(([^)]*)\)", text).group(1).split())
    used = {v for p in (DEPLOY / "ecs" / "task-definitions").glob("*.json") for v in re.findall(r"\$\{([A-Z_]+)\}", p.read_text())}
    assert used <= declared, used - declared
    # services are created in dependency order: infrastructure, frontend, workers
    order = [text.index(s) for s in ("dynamo-etcd", "dynamo-nats", "dynamo-frontend", 'dynamo-${role}')]
    assert order == sorted(order)
    assert ecs_taskdefs().keys() == {"etcd", "nats", "frontend", "worker", "prefill", "decode"}


@pytest.mark.parametrize("name", ["etcd", "nats", "frontend", "worker", "prefill", "decode"])
def test_ecs_task_definition_matches_botocore_model(name):
    botocore_session = pytest.importorskip("botocore.session")
    from botocore.validate import ParamValidator

    shape = botocore_session.get_session().get_service_model("ecs").operation_model("RegisterTaskDefinition").input_shape
    report = ParamValidator().validate(ecs_taskdefs()[name], shape)
    assert not report.has_errors(), report.generate_report()


def test_ecs_task_definitions():
    tds = ecs_taskdefs()
    for name in ("etcd", "nats", "frontend"):
        assert tds[name]["networkMode"] == "awsvpc" and tds[name]["requiresCompatibilities"] == ["FARGATE"]
    ports = set()
    for name in ("worker", "prefill", "decode"):
        td = tds[name]
        assert td["networkMode"] == "host" and td["requiresCompatibilities"] == ["EC2"]
        c = td["containerDefinitions"][0]
        assert {"type": "GPU", "value": "1"} in c["resourceRequirements"]
        cmd = c["command"]
        assert cmd[cmd.index("--role") + 1] == ("aggregated" if name == "worker" else name)
        ports.add(cmd[cmd.index("--system-port") + 1])
    assert len(ports) == 3, "host networking: each worker role needs its own system port"
    for td in tds.values():
        for c in td["containerDefinitions"]:
            assert c["logConfiguration"]["logDriver"] == "awslogs"
            assert c["healthCheck"]["command"][0] in ("CMD", "CMD-SHELL")
            if list(invocations_in(c.get("command", []))):
                env = {e["name"]: e["value"] for e in c.get("environment", [])}
                assert env["NATS_SERVER"].startswith("nats://") and env["ETCD_ENDPOINTS"].startswith("http://")


# ---------------------------------------------------------------------------------------------
# Consistency with the code: flags, environment variables, metrics
# ---------------------------------------------------------------------------------------------

SEPARATORS = {"&&", "||", ";", "|", "&"}


def invocations_in(tokens: list[str]):
    """(module, [tokens after `python -m module`]) for each dynamo invocation in a command."""
    flat: list[str] = []
    for t in tokens:
        t = str(t)
        flat += shlex.split(t.replace("$(", "__K8S__(")) if (" " in t and len(tokens) <= 3) else [t]
    flat = [t.replace("__K8S__(", "$(") for t in flat]
    for i in range(len(flat) - 2):
        if flat[i].endswith(("python", "python3")) and flat[i + 1] == "-m" and flat[i + 2].startswith("dynamo."):
            rest = []
            for t in flat[i + 3:]:
                if t in SEPARATORS or t.endswith(";"):
                    break
                rest.append(t)
            yield flat[i + 2], rest


@cache
def all_invocations() -> list[tuple[str, str, tuple[str, ...]]]:
    """(where, module, args) for every dynamo process any manifest starts."""
    out = []
    for name, s in compose()["services"].items():
        for mod, args in invocations_in([compose_default(str(x)) for x in s.get("command", [])]):
            out.append((f"compose:{name}", mod, tuple(args)))
    k8s = {o: docs_of(o) for o in ALL_K8S}
    k8s["standalone-router"] = load_docs(K8S / "components" / "standalone-router" / "router.yaml")
    k8s["planner"] = load_docs(K8S / "components" / "planner" / "planner.yaml")
    for o, docs in k8s.items():
        for d in docs:
            for c in pod_containers(d):
                for mod, args in invocations_in(c.get("command", []) + c.get("args", [])):
                    out.append((f"k8s:{o}:{d['metadata']['name']}", mod, tuple(args)))
    for name, td in ecs_taskdefs().items():
        for c in td["containerDefinitions"]:
            for mod, args in invocations_in(c.get("command", [])):
                out.append((f"ecs:{name}", mod, tuple(args)))
    for m in re.finditer(r"^CMD (\[.*\])$", dockerfile(), re.M):
        for mod, args in invocations_in(json.loads(m.group(1))):
            out.append(("Dockerfile", mod, tuple(args)))
    return sorted(set(out))


def flags_of(args) -> list[str]:
    return [a.split("=", 1)[0] for a in args if a.startswith("--")]


def engine_of(where: str, args) -> set[str]:
    """The engine(s) an invocation may run: a literal, or every engine a variable may hold."""
    args = list(args)
    if "--engine" not in args:
        return {"mocker", "builtin"}
    value = args[args.index("--engine") + 1]
    return {value} if not value.startswith("$") else {"mocker", "builtin"}


def test_every_manifest_starts_known_modules():
    invs = all_invocations()
    modules = {m for _, m, _ in invs}
    assert modules <= set(CONTRACT_FLAGS), modules
    assert {"dynamo.frontend", "dynamo.worker"} <= modules
    assert len(invs) > 15


def test_flags_and_values_match_the_documented_interface():
    for where, mod, args in all_invocations():
        allowed = set(CONTRACT_FLAGS[mod])
        for engine in engine_of(where, args):
            allowed |= PLANNED_ENGINE_FLAGS.get(engine, set())
        unknown = set(flags_of(args)) - allowed
        assert not unknown, f"{where}: {mod} does not document {sorted(unknown)}"
        for flag, choices in CHOICES.items():
            if flag in args:
                value = args[args.index(flag) + 1]
                assert value.startswith("$") or value in choices, f"{where}: {flag} {value}"


def test_configured_flag_values_are_valid():
    for o in OVERLAYS:
        flags = flags_configmap(docs_of(o))
        assert flags["ROUTER_MODE"] in CHOICES["--router-mode"]
        assert flags["ENGINE"] in CHOICES["--engine"]
    text = (DEPLOY / "ecs" / "deploy.sh").read_text()
    assert re.search(r'ROUTER_MODE:=([a-z-]+)', text).group(1) in CHOICES["--router-mode"]
    assert re.search(r'ENGINE:=([a-z-]+)', text).group(1) in CHOICES["--engine"]


def real_parser(mod: str, engine: str | None):
    """The entry point's own argparse parser, or None while its modules do not exist yet."""
    import importlib

    try:
        m = importlib.import_module(mod)
        if hasattr(m, "build_parser"):
            return m.build_parser(["--engine", engine] if engine else [])
        parser = argparse.ArgumentParser(conflict_handler="resolve")
        m.add_args(parser, "distributed")
        return parser
    except (ImportError, AttributeError):
        return None
    except SystemExit:  # engine_spec: unknown engine
        return None


def test_flags_are_accepted_by_the_real_parsers():
    checked, missing = 0, set()
    for where, mod, args in all_invocations():
        for engine in sorted(engine_of(where, args)) if mod in ("dynamo.worker", "dynamo.serve") else [None]:
            parser = real_parser(mod, engine)
            if parser is None:
                missing.add(f"{mod}[{engine}]" if engine else mod)
                continue
            options = {o for a in parser._actions for o in a.option_strings}
            planned = PLANNED_ENGINE_FLAGS.get(engine, set())
            unknown = set(flags_of(args)) - options - planned
            assert not unknown, f"{where}: {mod} {engine or ''} does not accept {sorted(unknown)}"
            for a in parser._actions:
                if a.choices and a.option_strings and a.option_strings[0] in args:
                    value = args[args.index(a.option_strings[0]) + 1]
                    assert value.startswith("$") or value in a.choices, f"{where}: {value}"
            checked += 1
    if not checked:
        pytest.skip(f"no entry point's parser importable yet: {sorted(missing)}")


@cache
def code_text() -> str:
    return "\n".join(p.read_text() for d in CODE_DIRS for p in (ROOT / d).rglob("*.py"))


def manifest_env() -> dict[str, set[str]]:
    """Environment variable names set for containers, by where they are set."""
    out: dict[str, set[str]] = {}

    def add(where, names):
        out.setdefault(where, set()).update(names)

    for name, s in compose()["services"].items():
        add(f"compose:{name}", s.get("environment", {}))
    for o in ALL_K8S:
        docs = docs_of(o)
        for cm in find(docs, "ConfigMap"):
            if cm["metadata"]["name"] in ("dynamo-runtime", "dynamo-flags"):
                add(f"k8s:{o}:configmap/{cm['metadata']['name']}", cm["data"])
        for d in docs:
            for c in pod_containers(d):
                add(f"k8s:{o}:{d['metadata']['name']}", {e["name"] for e in c.get("env", [])})
    for name, td in ecs_taskdefs().items():
        for c in td["containerDefinitions"]:
            add(f"ecs:{name}", {e["name"] for e in c.get("environment", []) + c.get("secrets", [])})
    for m in re.finditer(r"^ENV\s+(.+?)(?<!\\)$", dockerfile().replace("\\\n", " "), re.M):
        add("Dockerfile", re.findall(r"([A-Z_][A-Z0-9_]*)=", m.group(1)))
    return out


def expanded_vars() -> set[str]:
    """Variables that manifests expand in commands: k8s $(VAR) and shell ${VAR} / $VAR."""
    text = "\n".join(json.dumps(list(rendered(o, "python"))) for o in ALL_K8S)
    return set(re.findall(r"\$\(([A-Z_][A-Z0-9_]*)\)", text)) | set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)\}", text))


def test_environment_variables_are_read_by_the_code_or_used():
    code = code_text()
    used = expanded_vars()
    for where, names in manifest_env().items():
        for n in names:
            if n.startswith("DYN_") or n in ("NATS_SERVER", "ETCD_ENDPOINTS"):
                assert f'"{n}"' in code, f"{where}: {n} is not read by the code"
            elif f'"{n}"' in code:  # read by the code under a name of its own (NATS_TLS_CA, ETCD_CA...)
                continue
            else:
                assert n in EXTERNAL_ENV or n in used, f"{where}: {n} is neither external nor used in a command"


def exported_metric_names(prefix: str) -> set[str]:
    """Metric names the code defines: string literals, and f"{CONST}name" with CONST = "prefix"."""
    names: set[str] = set()
    for d in CODE_DIRS:
        for p in (ROOT / d).rglob("*.py"):
            text = p.read_text()
            names |= set(re.findall(rf'"({prefix}[a-z0-9_]+)"', text))
            for const, value in re.findall(r'^(\w+)\s*=\s*"(dynamo_[a-z0-9]+_)"', text, re.M):
                if value == prefix:
                    names |= {value + n for n in re.findall(r'f"\{' + const + r'\}([a-z0-9_]+)"', text)}
    return names


def queried_metrics() -> dict[str, set[str]]:
    """Metric names each dashboard/autoscaler queries, from Grafana panels and KEDA triggers."""
    out: dict[str, set[str]] = {}
    dash = json.loads((DEPLOY / "grafana" / "dashboards" / "dynamo.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    out["grafana"] = {m for e in exprs for m in re.findall(r"\bdynamo_[a-z0-9_]+", e)}
    for o in OVERLAYS:
        for so in find(docs_of(o), "ScaledObject"):
            for t in so["spec"]["triggers"]:
                out.setdefault(f"keda:{o}:{so['metadata']['name']}", set()).update(
                    re.findall(r"\bdynamo_[a-z0-9_]+", t["metadata"]["query"]))
    return out


def base_name(metric: str, known: set[str]) -> str | None:
    for candidate in (metric, *(metric[: -len(s)] for s in ("_bucket", "_sum", "_count", "_total", "_created") if metric.endswith(s))):
        if candidate in known or candidate + "_total" in known:
            return candidate
    return None


def test_queried_metrics_are_documented():
    contract = CONTRACT_METRICS | {m[: -len("_total")] for m in CONTRACT_METRICS if m.endswith("_total")}
    queried = queried_metrics()
    assert queried["grafana"] and any(k.startswith("keda:") for k in queried)
    for where, metrics in queried.items():
        for m in metrics:
            assert base_name(m, contract), f"{where}: {m} is not a documented metric"


@pytest.mark.parametrize("component", ["frontend", "worker", "router", "kvbm", "planner"])
def test_queried_metrics_are_exported_by_the_code(component):
    prefix = f"dynamo_{component}_"
    queried = {(w, m) for w, ms in queried_metrics().items() for m in ms if m.startswith(prefix)}
    if not queried:
        pytest.skip(f"nothing queries {prefix}*")
    defined = exported_metric_names(prefix)
    if not defined:
        pytest.skip(f"the code defines no {prefix}* metric yet")
    for where, m in queried:
        assert base_name(m, defined), f"{where}: {m} is not exported (code has {sorted(defined)})"


def test_prometheus_configs():
    compose_cfg = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in compose_cfg["scrape_configs"]}
    names = {n for j in jobs.values() for sd in j.get("dns_sd_configs", []) for n in sd["names"]}
    dynamo_services = {n for n, s in compose()["services"].items() if n.startswith(("frontend", "worker", "prefill", "decode"))}
    assert dynamo_services <= names
    k8s_cfg = yaml.safe_load((DEPLOY / "prometheus" / "kubernetes.yml").read_text())
    assert any(r.get("target_label") == "component" for j in k8s_cfg["scrape_configs"] for r in j["relabel_configs"])
    dash = json.loads((DEPLOY / "grafana" / "dashboards" / "dynamo.json").read_text())
    assert {"title", "panels", "templating", "uid"} <= set(dash)
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
