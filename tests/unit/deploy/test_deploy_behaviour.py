"""What the deploy tree does on a real cluster, checked offline (issue 18): each test here
would have caught one of the defects a platform engineer found reading the manifests beside
the cloud guides, where the shape checks of test_manifests.py passed.

- secrets: no rendered Secret carries an empty value; the ones created out of band are
  documented (defect 5);
- GKE: every Service behind a GCE Ingress has a BackendConfig with a stream-length timeout,
  draining and a /health check (defect 6);
- advertised addresses: every worker sets its request-plane and KV-transfer host from
  status.podIP (Kubernetes), the task metadata (ECS) or its container address (compose),
  through dynamo-advertise, whose lookups are exercised here (defect 11);
- NetworkPolicies select every pod, and an evaluator of their rules gives the intended flows
  (defect 8), API keys and TLS on every public entry point, NATS TLS / etcd mTLS overlay;
- the standalone router is asked by the frontends and can write /tmp (defect 3);
- no EFA claim without an EFA-capable image (defect 2);
- LeaderWorkerSets: one per overlay, labels of their own, cloud placement reaching their pods,
  ssh keys from a Secret (defect 9);
- the EKS cluster config against eksctl's schema, with IAM for the CSI drivers and a node
  autoscaler that can grow the minSize-0 GPU group (defect 10);
- etcd Helm image, JetStream, the model-download Job on retry (run here), GKE Spot taint, KVBM
  option (defects 7, 12).

Everything renders with the resolver of test_manifests.py (and, where kubectl is on PATH, a
sample with `kubectl kustomize`); nothing reaches a cluster.
"""

from __future__ import annotations

import http.server
import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from functools import cache
from pathlib import Path

import pytest
import yaml

from test_manifests import (  # type: ignore[import-not-found]
    ALL_K8S,
    CRD_KINDS,
    DEPLOY,
    K8S,
    LWS_OVERLAYS,
    NAMESPACE,
    OUT_OF_BAND_SECRETS,
    OVERLAYS,
    ROOT,
    compose,
    compose_default,
    crd_schema_errors,
    docs_of,
    dockerfile_stages,
    ecs_taskdefs,
    find,
    invocations_in,
    kustomize,
    load_docs,
    pod_containers,
    pod_spec,
    selects,
)

DOCS = ROOT / "docs" / "deploy"
CLOUDS = ("eks", "gke", "aks")
TOPOLOGIES = ("agg", "agg-kv", "agg-router", "disagg")

# ---------------------------------------------------------------------------------------------
# Combinations that ship as separate pieces: a cloud's GPU component on a LeaderWorkerSet
# overlay, a cloud on every topology, the KVBM component on agg and disagg.
# ---------------------------------------------------------------------------------------------

_COMBO_ROOT = Path(tempfile.mkdtemp(prefix="dynamo-kustomize-"))


@cache
def combo(resources: tuple[str, ...], components: tuple[str, ...]) -> tuple[str, ...]:
    """Render a kustomization made of deploy/k8s `resources` and `components` (paths under
    deploy/k8s), with the resolver; the documents as JSON strings."""
    d = _COMBO_ROOT / ("_".join(x.replace("/", "-") for x in resources + components))
    d.mkdir(exist_ok=True)
    kz = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "namespace": NAMESPACE,
          "resources": [os.path.relpath(K8S / r, d) for r in resources],
          "components": [os.path.relpath(K8S / c, d) for c in components]}
    (d / "kustomization.yaml").write_text(yaml.safe_dump(kz))
    return tuple(json.dumps(x, sort_keys=True) for x in kustomize(d))


def combo_docs(resources: tuple[str, ...], components: tuple[str, ...] = ()) -> list[dict]:
    return [json.loads(s) for s in combo(resources, components)]


def combo_kubectl(resources: tuple[str, ...], components: tuple[str, ...]) -> list[dict]:
    combo(resources, components)
    d = _COMBO_ROOT / ("_".join(x.replace("/", "-") for x in resources + components))
    out = subprocess.run(["kubectl", "kustomize", str(d)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [x for x in yaml.safe_load_all(out.stdout) if x]


def all_renders() -> dict[str, list[dict]]:
    """Every shipped overlay, each LWS overlay on a topology, and the cloud/KVBM combinations."""
    out = {o: docs_of(o) for o in ALL_K8S}
    for cloud in CLOUDS:
        for topo in TOPOLOGIES:
            out[f"{cloud}+{topo}"] = combo_docs((f"overlays/{topo}",), (f"components/{cloud}",))
        for lws in LWS_OVERLAYS:
            out[f"{cloud}-gpu+{lws}"] = combo_docs((lws,), (f"components/{cloud}-gpu",))
    for topo in ("agg", "disagg"):
        out[f"{topo}+kvbm"] = combo_docs((f"overlays/{topo}",), ("components/kvbm",))
    for planner in ("planner", "planner-keda"):
        out[f"disagg+{planner}"] = combo_docs(("overlays/disagg",), (f"components/{planner}",))
    return out


RENDERS = cache(all_renders)


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def runs(container: dict, module: str) -> bool:
    return any(mod == module for mod, _ in invocations_in(container.get("command", []) + container.get("args", [])))


def dynamo_image(container: dict) -> bool:
    return container["image"].split(":")[0].endswith("dynamo-py")


# ---------------------------------------------------------------------------------------------
# Defect 5: secrets
# ---------------------------------------------------------------------------------------------


def test_no_rendered_secret_has_an_empty_value():
    """A placeholder Secret overwrites the real one on every `kubectl apply -k`."""
    for where, docs in RENDERS().items():
        for secret in find(docs, "Secret"):
            values = {**secret.get("data", {}), **secret.get("stringData", {})}
            assert values, f"{where}: Secret/{secret['metadata']['name']} is empty"
            empty = [k for k, v in values.items() if not str(v).strip()]
            assert not empty, f"{where}: Secret/{secret['metadata']['name']} has empty {empty}"
        assert not find(docs, "Secret", "hf-token"), f"{where}: ships an hf-token Secret"


def test_secrets_created_out_of_band_are_referenced_as_documented():
    text = "\n".join(p.read_text() for p in DOCS.glob("*.md"))
    referenced: dict[str, bool] = {}
    for docs in RENDERS().values():
        for d in docs:
            for ps in pod_spec(d):
                for c in ps.get("containers", []) + ps.get("initContainers", []):
                    for e in c.get("env", []):
                        ref = e.get("valueFrom", {}).get("secretKeyRef")
                        if ref:
                            referenced[ref["name"]] = bool(ref.get("optional"))
                for v in ps.get("volumes", []):
                    if "secret" in v:
                        referenced[v["secret"]["secretName"]] = bool(v["secret"].get("optional"))
            if d["kind"] == "Ingress":
                for tls in d["spec"].get("tls", []):
                    referenced[tls["secretName"]] = False
    assert set(referenced) == set(OUT_OF_BAND_SECRETS), set(referenced) ^ set(OUT_OF_BAND_SECRETS)
    for name, optional in referenced.items():
        assert optional == OUT_OF_BAND_SECRETS[name][1], f"{name}: optional={optional}"
        assert re.search(rf"create secret (generic|tls) {re.escape(name)}\b", text), \
            f"docs/deploy never shows how to create the {name} Secret"


# ---------------------------------------------------------------------------------------------
# Defect 6: GKE BackendConfig
# ---------------------------------------------------------------------------------------------


def gke_renders() -> dict[str, list[dict]]:
    return {k: v for k, v in RENDERS().items() if k == "gke" or k.startswith("gke+")}


def test_every_gke_ingress_backend_has_its_backend_config():
    assert len(gke_renders()) == 1 + len(TOPOLOGIES)
    for where, docs in gke_renders().items():
        ingresses = find(docs, "Ingress")
        assert ingresses
        for ing in ingresses:
            ann = ing["metadata"]["annotations"]
            assert ann["kubernetes.io/ingress.class"] == "gce"
            assert ann.get("kubernetes.io/ingress.allow-http") == "false" and ing["spec"].get("tls"), \
                f"{where}: the GCE Ingress must serve HTTPS only"
            for rule in ing["spec"]["rules"]:
                for path in rule["http"]["paths"]:
                    svc = find(docs, "Service", path["backend"]["service"]["name"])[0]
                    refs = json.loads(svc["metadata"].get("annotations", {}).get("cloud.google.com/backend-config", "{}"))
                    port_name = path["backend"]["service"]["port"]["name"]
                    bc_name = refs.get("ports", {}).get(port_name) or refs.get("default")
                    assert bc_name, f"{where}: Service/{svc['metadata']['name']} has no backend-config annotation"
                    bc = find(docs, "BackendConfig", bc_name)
                    assert bc, f"{where}: BackendConfig/{bc_name} is not rendered"
                    spec = bc[0]["spec"]
                    assert spec["timeoutSec"] >= 600, "GCE's 30 s default cuts SSE streams"
                    assert spec["connectionDraining"]["drainingTimeoutSec"] > 0
                    hc = spec["healthCheck"]
                    assert hc["requestPath"] == "/health" and hc["type"] == "HTTP"
                    # the health check port is the port the frontend container serves on
                    target = next(p for p in svc["spec"]["ports"] if p["name"] == port_name)["targetPort"]
                    pods = [c for d in find(docs, "Deployment") if selects(svc["spec"]["selector"], d["spec"]["template"]["metadata"]["labels"])
                            for c in d["spec"]["template"]["spec"]["containers"]]
                    assert any(p["containerPort"] == hc["port"] and p.get("name") == target for c in pods for p in c["ports"])
                    assert not crd_schema_errors(bc[0])


def test_backend_config_is_validated_as_a_custom_resource():
    assert "BackendConfig" in CRD_KINDS


# ---------------------------------------------------------------------------------------------
# Defect 11: advertised addresses
# ---------------------------------------------------------------------------------------------

ADVERTISED = ("DYN_REQUEST_PLANE_HOST", "DYN_KV_TRANSFER_HOST")


def test_every_worker_container_advertises_its_pod_ip():
    seen = 0
    for where, docs in RENDERS().items():
        for d in docs:
            for c in pod_containers(d):
                wanted = ADVERTISED if runs(c, "dynamo.worker") else ADVERTISED[:1] if runs(c, "dynamo.router") else ()
                env = env_of(c)
                for name in wanted:
                    seen += 1
                    field = env.get(name, {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
                    assert field == "status.podIP", f"{where}: {d['kind']}/{d['metadata']['name']} {name}: {env.get(name)}"
    assert seen > 50


def test_compose_and_ecs_workers_advertise_through_dynamo_advertise():
    for name, s in compose()["services"].items():
        cmd = [compose_default(str(x)) for x in s.get("command", [])]
        if "dynamo.worker" in cmd:
            assert s["entrypoint"] == ["python", "/usr/local/bin/dynamo-advertise", "--from", "hostname", "--"], name
            assert not set(ADVERTISED) & set(s.get("environment", {})), f"compose:{name} sets a fixed address"
    for name, td in ecs_taskdefs().items():
        for c in td["containerDefinitions"]:
            if "dynamo.worker" in c.get("command", []):
                assert c["entryPoint"] == ["python", "/usr/local/bin/dynamo-advertise", "--from", "ecs", "--"], name
    for stage in ("cpu", "cuda"):
        assert "COPY deploy/docker/advertise.py /usr/local/bin/dynamo-advertise" in dockerfile_stages()[stage]
    assert "!deploy/docker/advertise.py" in (DEPLOY / "docker" / "Dockerfile.dockerignore").read_text()


ADVERTISE = DEPLOY / "docker" / "advertise.py"


class _Metadata(http.server.BaseHTTPRequestHandler):
    """A stand-in for the ECS task metadata endpoint and the EC2 instance metadata service."""

    container: dict = {}

    def _send(self, body: str, code: int = 200) -> None:
        self.send_response(code)
        self.end_headers()
        self.wfile.write(body.encode())

    def do_GET(self) -> None:  # noqa: N802
        if self.path == "/container":
            self._send(json.dumps(self.container))
        elif self.path == "/latest/meta-data/local-ipv4":
            ok = self.headers.get("X-aws-ec2-metadata-token") == "tok"
            self._send("10.1.2.3" if ok else "no token", 200 if ok else 401)
        else:
            self._send("", 404)

    def do_PUT(self) -> None:  # noqa: N802
        if self.path == "/latest/api/token":
            self._send("tok")
        else:
            self._send("", 404)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def metadata_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Metadata)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def advertise(args: list[str], **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ADVERTISED}
    code = "import os; print(os.environ['DYN_REQUEST_PLANE_HOST'], os.environ['DYN_KV_TRANSFER_HOST'])"
    return subprocess.run([sys.executable, str(ADVERTISE), *args, "--", sys.executable, "-c", code],
                          env={**base, **env}, capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("mode,expected", [("awsvpc", "10.0.7.9"), ("host", "10.1.2.3")])
def test_dynamo_advertise_reads_the_ecs_task_address(metadata_server, mode, expected):
    _Metadata.container = {"Networks": [{"NetworkMode": mode, **({"IPv4Addresses": ["10.0.7.9"]} if mode != "host" else {})}]}
    r = advertise(["--from", "ecs", "--imds-url", metadata_server], ECS_CONTAINER_METADATA_URI_V4=f"{metadata_server}/container")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [expected, expected]


def test_dynamo_advertise_refuses_to_guess(metadata_server):
    r = advertise(["--from", "ecs"])  # no metadata endpoint: not on ECS
    assert r.returncode == 78 and "no address to advertise" in r.stderr and not r.stdout
    _Metadata.container = {"Networks": [{"NetworkMode": "awsvpc", "IPv4Addresses": ["127.0.0.1"]}]}
    r = advertise(["--from", "ecs"], ECS_CONTAINER_METADATA_URI_V4=f"{metadata_server}/container")
    assert r.returncode == 78 and "peers cannot reach" in r.stderr
    # an address given explicitly wins, and nothing is looked up
    r = advertise(["--from", "ecs"], DYN_REQUEST_PLANE_HOST="10.9.9.9", DYN_KV_TRANSFER_HOST="10.9.9.9")
    assert r.returncode == 0 and r.stdout.split() == ["10.9.9.9", "10.9.9.9"]


def test_dynamo_advertise_uses_the_container_address_from_etc_hosts(monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("dynamo_advertise", ADVERTISE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    monkeypatch.setattr(module.socket, "gethostname", lambda: "3f2a9c1b7d0e")
    monkeypatch.setattr(module.socket, "gethostbyname", lambda name: {"3f2a9c1b7d0e": "172.18.0.5"}[name])
    assert module.from_hostname() == "172.18.0.5"
    monkeypatch.setattr(module.socket, "gethostbyname", lambda name: "127.0.1.1")
    with pytest.raises(module.NoAddress, match="peers cannot reach"):
        module.from_hostname()


# ---------------------------------------------------------------------------------------------
# Defect 8: NetworkPolicies, API keys, TLS
# ---------------------------------------------------------------------------------------------


def pod_templates(docs: list[dict]) -> list[tuple[str, dict]]:
    """(where, labels) of every pod a workload creates."""
    out = []
    for d in docs:
        if d["kind"] == "LeaderWorkerSet":
            t = d["spec"]["leaderWorkerTemplate"]
            out += [(f"{d['metadata']['name']}/{k}", t[k]["metadata"]["labels"]) for k in ("leaderTemplate", "workerTemplate")]
        elif pod_spec(d):
            out.append((f"{d['kind']}/{d['metadata']['name']}", d["spec"]["template"]["metadata"]["labels"]))
    return out


def _peer_matches(peer: dict, src: dict) -> bool:
    if "ipBlock" in peer:
        return src.get("ip") is not None and ipaddress.ip_address(src["ip"]) in ipaddress.ip_network(peer["ipBlock"]["cidr"])
    if src.get("ip") is not None and "labels" not in src:
        return False
    ns_sel = peer.get("namespaceSelector")
    if ns_sel is None:
        if src["namespace"] != NAMESPACE:
            return False
    elif not selects(ns_sel.get("matchLabels", {}), {"kubernetes.io/metadata.name": src["namespace"]}):
        return False
    pod_sel = peer.get("podSelector")
    return pod_sel is None or selects(pod_sel.get("matchLabels", {}), src.get("labels", {}))


def allowed(policies: list[dict], dst_labels: dict, src: dict, port: int, port_names: dict[str, int]) -> bool:
    """Whether NetworkPolicy lets `src` ({namespace, labels} or {ip}) reach a pod with
    `dst_labels` of this namespace on `port`: the Kubernetes semantics for ingress rules."""
    selecting = [p for p in policies if "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
                 and selects(p["spec"]["podSelector"].get("matchLabels", {}), dst_labels)]
    if not selecting:
        return True
    for p in selecting:
        for rule in p["spec"].get("ingress", []):
            ports = rule.get("ports")
            if ports and not any(port_names.get(x["port"], x["port"]) == port for x in ports):
                continue
            peers = rule.get("from")
            if not peers or any(_peer_matches(peer, src) for peer in peers):
                return True
    return False


def network_renders() -> dict[str, list[dict]]:
    out = {}
    for where, docs in RENDERS().items():
        if where in LWS_OVERLAYS or "+lws/" in where:  # applied on top of a topology: add one
            docs = docs + docs_of("agg-kv")
        out[where] = docs
    return out


def test_network_policies_select_every_pod():
    for where, docs in network_renders().items():
        policies = find(docs, "NetworkPolicy")
        assert policies, where
        for pod, labels in pod_templates(docs):
            selecting = [p["metadata"]["name"] for p in policies if selects(p["spec"]["podSelector"].get("matchLabels", {}), labels)]
            assert "dynamo-default-deny" in selecting, f"{where}: {pod} is not isolated"
            if labels.get("app.kubernetes.io/component") != "model-download":  # a Job: takes no connections
                assert len(selecting) >= 2, f"{where}: {pod} accepts no connection at all ({selecting})"


INGRESS_SOURCE = {  # where each cloud's load balancer connects from
    "base": {"namespace": "ingress-nginx", "labels": {}},
    "eks": {"ip": "192.168.33.4"},
    "gke": {"ip": "35.191.12.7"},
    "aks": {"namespace": "app-routing-system", "labels": {}},
}


def _cloud(where: str) -> str:
    return next((c for c in CLOUDS if where == c or where.startswith(f"{c}+")), "base")


def test_network_policies_allow_the_intended_flows_only():
    names = {"client": 2379, "peer": 2380, "http": 8000, "system": 9090}
    for where, docs in network_renders().items():
        if where in LWS_OVERLAYS or "-gpu+" in where:
            continue  # GPU placement combos: same policies as the topologies checked here
        pol = find(docs, "NetworkPolicy")
        pods = dict((p, lbl) for p, lbl in pod_templates(docs))
        frontend = pods["Deployment/dynamo-frontend"]
        workers = [lbl for k, lbl in pods.items() if lbl.get("dynamo.io/gpu-worker") == "true"]
        etcd, nats = pods["StatefulSet/dynamo-etcd"], pods["StatefulSet/dynamo-nats"]
        job = pods["Job/dynamo-model-download"]
        here = lambda lbl: {"namespace": NAMESPACE, "labels": lbl}  # noqa: E731
        other_ns = {"namespace": "default", "labels": frontend}
        prometheus = {"namespace": "monitoring", "labels": {"app.kubernetes.io/name": "prometheus"}}
        outside = {"ip": "203.0.113.9"}
        lb = INGRESS_SOURCE[_cloud(where)]
        # frontend <- the load balancer and Prometheus only
        assert allowed(pol, frontend, lb, 8000, names), f"{where}: the load balancer cannot reach the frontend"
        assert allowed(pol, frontend, prometheus, 8000, names)
        for src in (outside, other_ns, here(job), *(here(w) for w in workers)):
            assert not allowed(pol, frontend, src, 8000, names), f"{where}: frontend open to {src}"
        # workers <- frontend, router, peers (any port); Prometheus on 9090 only
        for w in workers:
            for src in (here(frontend), here({"app.kubernetes.io/name": "dynamo", "app.kubernetes.io/component": "router"}),
                        *(here(x) for x in workers)):
                assert allowed(pol, w, src, 41234, names), f"{where}: {src['labels']} cannot reach worker {w}"
            assert allowed(pol, w, prometheus, 9090, names) and not allowed(pol, w, prometheus, 41234, names)
            for src in (here(job), other_ns, outside, lb):
                assert not allowed(pol, w, src, 41234, names), f"{where}: worker open to {src}"
        # etcd and NATS <- this namespace only
        for target, port in ((etcd, 2379), (nats, 4222)):
            for src in (here(frontend), *(here(w) for w in workers)):
                assert allowed(pol, target, src, port, names)
            for src in (other_ns, outside, prometheus):
                assert not allowed(pol, target, src, port, names), f"{where}: {target} open to {src}"


def test_frontends_require_an_api_key_and_ingresses_serve_tls():
    for where, docs in RENDERS().items():
        for d in docs:
            for c in pod_containers(d):
                if runs(c, "dynamo.frontend"):
                    ref = env_of(c).get("DYN_API_KEY", {}).get("valueFrom", {}).get("secretKeyRef")
                    assert ref and ref["name"] == "dynamo-api-key" and not ref.get("optional"), f"{where}: no API key"
        for ing in find(docs, "Ingress"):
            assert ing["spec"].get("tls"), f"{where}: Ingress without TLS"
            ann = ing["metadata"].get("annotations", {})
            if ing["spec"].get("ingressClassName") == "alb":
                assert "HTTPS" in ann["alb.ingress.kubernetes.io/listen-ports"]
                assert ann["alb.ingress.kubernetes.io/ssl-redirect"] == "443"
    frontend = ecs_taskdefs()["frontend"]["containerDefinitions"][0]
    assert any(s["name"] == "DYN_API_KEY" for s in frontend["secrets"])
    text = (DOCS / "kubernetes.md").read_text() + (DOCS / "eks.md").read_text()
    assert "cert-manager.io/cluster-issuer" in text and "alb.ingress.kubernetes.io/certificate-arn" in text


def test_tls_overlay_secures_nats_and_etcd_with_the_runtime_flags():
    from dynamo.config import RUNTIME_SECURITY_FLAGS

    flag_envs = {f.env for f in RUNTIME_SECURITY_FLAGS.flags}
    docs = docs_of("agg-kv-tls")
    runtime = find(docs, "ConfigMap", "dynamo-runtime")[0]["data"]
    for name in ("NATS_TLS_CA", "ETCD_CA", "ETCD_CERT", "ETCD_KEY"):
        assert name in flag_envs and runtime[name].startswith("/")
    assert runtime["ETCD_ENDPOINTS"].startswith("https://")
    secrets = {n: keys for n, (keys, _) in OUT_OF_BAND_SECRETS.items()}

    def mounted_file(ps: dict, c: dict, path: str) -> bool:
        vols = {v["name"]: v for v in ps.get("volumes", [])}
        for m in c.get("volumeMounts", []):
            if path.startswith(m["mountPath"].rstrip("/") + "/"):
                key = path[len(m["mountPath"].rstrip("/")) + 1:]
                sec = vols[m["name"]].get("secret")
                if sec:
                    items = {i["path"]: i["key"] for i in sec.get("items", [])} or {k: k for k in secrets[sec["secretName"]]}
                    return items.get(key) in secrets[sec["secretName"]]
        return False

    dynamo_pods = [d for d in find(docs, "Deployment") if dynamo_image(d["spec"]["template"]["spec"]["containers"][0])]
    assert len(dynamo_pods) >= 2
    for d in dynamo_pods:
        ps = d["spec"]["template"]["spec"]
        for name in ("NATS_TLS_CA", "ETCD_CA", "ETCD_CERT", "ETCD_KEY"):
            assert mounted_file(ps, ps["containers"][0], runtime[name]), f"{d['metadata']['name']}: {runtime[name]}"
    nats_conf = find(docs, "ConfigMap", "dynamo-nats-config")[0]["data"]["nats.conf"]
    nats = find(docs, "StatefulSet", "dynamo-nats")[0]["spec"]["template"]["spec"]
    for f in re.findall(r"(?:cert|key|ca)_file: (\S+)", nats_conf):
        assert mounted_file(nats, nats["containers"][0], f), f
    etcd = find(docs, "StatefulSet", "dynamo-etcd")[0]["spec"]["template"]["spec"]
    cmd = etcd["containers"][0]["command"]
    assert "--client-cert-auth" in cmd and "--peer-client-cert-auth" in cmd
    assert all(u.startswith("https://") for a in cmd if a.startswith(("--listen-client-urls", "--listen-peer-urls"))
               for u in a.split("=", 1)[1].split(","))
    for a in cmd:
        if a.startswith(("--cert-file", "--key-file", "--trusted-ca-file", "--peer-cert-file", "--peer-key-file")):
            assert mounted_file(etcd, etcd["containers"][0], a.split("=", 1)[1]), a
    # the kubelet has no client certificate: probes go to the plain health listener
    metrics = next(a for a in cmd if a.startswith("--listen-metrics-urls=")).rsplit(":", 1)[1]
    ports = {p["name"]: p["containerPort"] for p in etcd["containers"][0]["ports"]}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert str(ports[etcd["containers"][0][probe]["httpGet"]["port"]]) == metrics


# ---------------------------------------------------------------------------------------------
# Defect 3: the standalone router
# ---------------------------------------------------------------------------------------------


def test_overlays_with_the_router_service_route_through_it():
    from router.protocol import ROUTER_COMPONENT

    with_router = [w for w, docs in RENDERS().items() if find(docs, "Deployment", "dynamo-router")]
    assert "agg-router" in with_router
    for where in with_router:
        docs = RENDERS()[where]
        assert find(docs, "ConfigMap", "dynamo-flags")[0]["data"]["ROUTER_MODE"] == "remote", where
        router = find(docs, "Deployment", "dynamo-router")[0]["spec"]["template"]["spec"]["containers"][0]
        frontend = find(docs, "Deployment", "dynamo-frontend")[0]["spec"]["template"]["spec"]["containers"][0]
        # both read DYN_NAMESPACE from the same ConfigMap: remote mode finds the router's
        # `router` component in the frontend's namespace through discovery
        assert {"configMapRef": {"name": "dynamo-runtime"}} in router["envFrom"]
        assert {"configMapRef": {"name": "dynamo-runtime"}} in frontend["envFrom"]
        assert ROUTER_COMPONENT == "router"
    for where, docs in RENDERS().items():
        if where not in with_router and find(docs, "ConfigMap", "dynamo-flags"):
            assert find(docs, "ConfigMap", "dynamo-flags")[0]["data"]["ROUTER_MODE"] != "remote", where


def test_read_only_dynamo_containers_have_a_writable_tmp():
    for where, docs in RENDERS().items():
        for d in docs:
            for ps in pod_spec(d):
                vols = {v["name"]: v for v in ps.get("volumes", [])}
                for c in ps.get("containers", []):
                    if dynamo_image(c) and c.get("securityContext", {}).get("readOnlyRootFilesystem"):
                        tmp = [m for m in c.get("volumeMounts", []) if m["mountPath"] == "/tmp"]
                        assert tmp and "emptyDir" in vols[tmp[0]["name"]] and not tmp[0].get("readOnly"), \
                            f"{where}: {d['metadata']['name']}/{c['name']} has a read-only root and no /tmp"


# ---------------------------------------------------------------------------------------------
# Defect 2: EFA
# ---------------------------------------------------------------------------------------------


def test_no_efa_without_an_image_that_can_use_it():
    """EFA devices in a pod carry nothing unless the image has libfabric with the EFA provider
    and a transport on it (NIXL). If an EFA variant is ever shipped, it must be complete."""
    stages = dockerfile_stages()
    efa_image = "efa" in stages
    efa_pods = []
    for where, docs in RENDERS().items():
        for d in docs:
            for ps in pod_spec(d):
                for c in ps.get("containers", []):
                    req = c.get("resources", {}).get("limits", {})
                    env = env_of(c)
                    if "vpc.amazonaws.com/efa" in req or any(n.startswith("FI_") for n in env):
                        efa_pods.append((where, d, c))
    cluster = load_docs(K8S / "clusters" / "eks-cluster.yaml")[0]
    efa_nodes = [g["name"] for g in cluster["managedNodeGroups"] if g.get("efaEnabled")]
    if not efa_image:
        assert not efa_pods and not efa_nodes, "EFA requested, but no image can use it"
        text = "\n".join(p.read_text() for p in DOCS.glob("*.md"))
        assert not re.search(r"(KV transfer|transfers?) over EFA|over EFA/RDMA|GPUDirect RDMA over EFA", text)
        return
    body = stages["efa"]
    assert "libfabric" in body and "nixl" in body
    for where, d, c in efa_pods:
        gpus = int(c["resources"]["limits"]["nvidia.com/gpu"])
        assert int(c["resources"]["limits"]["vpc.amazonaws.com/efa"]) == 4 * gpus, where
        assert "IPC_LOCK" in c["securityContext"]["capabilities"].get("add", []), where
        assert env_of(c)["DYN_KV_TRANSFER_BACKEND"]["value"] == "nixl", where


# ---------------------------------------------------------------------------------------------
# Defect 9: LeaderWorkerSets
# ---------------------------------------------------------------------------------------------


def test_one_leader_worker_set_per_overlay_with_labels_of_its_own():
    components = set()
    topology_docs = [x for o in OVERLAYS for x in docs_of(o)]
    for lws_overlay in LWS_OVERLAYS:
        docs = docs_of(lws_overlay)
        sets = find(docs, "LeaderWorkerSet")
        assert len(sets) == 1, f"{lws_overlay}: {len(sets)} LeaderWorkerSets"
        labels = [lbl for _, lbl in pod_templates(docs)]
        comp = {lbl["app.kubernetes.io/component"] for lbl in labels}
        assert len(comp) == 1
        components |= comp
        # no Service, PDB or autoscaler of a topology selects these pods; only NetworkPolicies
        # and the metrics ServiceMonitor may
        for d in topology_docs:
            sel = None
            if d["kind"] == "Service":
                sel = d["spec"].get("selector")
            elif d["kind"] == "PodDisruptionBudget":
                sel = d["spec"]["selector"]["matchLabels"]
            if sel:
                assert not any(selects(sel, lbl) for lbl in labels), f"{lws_overlay}: selected by {d['kind']}/{d['metadata']['name']}"
            if d["kind"] == "ScaledObject":
                for t in d["spec"]["triggers"]:
                    assert not any(f'component="{c}"' in t["metadata"]["query"] for c in comp)
        svc = find(docs, "Service")
        assert svc and all(selects(s["spec"]["selector"], labels[0]) for s in svc), "leader metrics Service"
    assert len(components) == len(LWS_OVERLAYS)
    assert not (K8S / "lws" / "kustomization.yaml").exists(), "one overlay applying every engine at once"


CLOUD_GPU = {
    "eks": lambda ps, c: ps["nodeSelector"]["eks.amazonaws.com/nodegroup"] == "gpu",
    "gke": lambda ps, c: ps["nodeSelector"]["cloud.google.com/gke-accelerator"].startswith("nvidia-")
    and "/usr/local/nvidia/lib64" in env_of(c)["LD_LIBRARY_PATH"]["value"],
    "aks": lambda ps, c: ps["nodeSelector"]["kubernetes.azure.com/agentpool"] == "gpunp"
    and any(t["key"] == "sku" for t in ps["tolerations"]),
}


def test_cloud_gpu_placement_reaches_every_gpu_pod():
    checked = 0
    for where, docs in RENDERS().items():
        cloud = next((c for c in CLOUDS if where == c or where.startswith((f"{c}+", f"{c}-gpu+"))), None)
        if cloud is None:
            continue
        for d in docs:
            gpu_pods = []
            if d["kind"] == "LeaderWorkerSet":
                gpu_pods = pod_spec(d)
            elif d["kind"] == "Deployment" and d["metadata"]["labels"].get("dynamo.io/gpu-worker") == "true":
                gpu_pods = pod_spec(d)
            for ps in gpu_pods:
                assert CLOUD_GPU[cloud](ps, ps["containers"][0]), f"{where}: {d['metadata']['name']}"
                checked += 1
    assert checked >= 3 * (len(TOPOLOGIES) + 2 * len(LWS_OVERLAYS))


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (kustomize) not on PATH")
@pytest.mark.parametrize("cloud", CLOUDS)
def test_kustomize_applies_the_cloud_gpu_component_to_a_leader_worker_set(cloud):
    ours = combo_docs(("lws/trtllm",), (f"components/{cloud}-gpu",))
    theirs = combo_kubectl(("lws/trtllm",), (f"components/{cloud}-gpu",))
    key = lambda d: (d["kind"], d["metadata"]["name"])  # noqa: E731
    assert sorted(ours, key=key) == sorted(theirs, key=key)


def test_trtllm_ssh_keys_come_from_a_secret():
    docs = docs_of("lws/trtllm")
    sshd = find(docs, "ConfigMap", "dynamo-trtllm-sshd")[0]["data"]["sshd_config"]
    conf = dict(line.split(None, 1) for line in sshd.splitlines() if line.strip() and not line.startswith("#"))
    assert conf["Port"] == "2222" and conf["PasswordAuthentication"] == "no"
    for key in ("HostKey", "AuthorizedKeysFile", "PidFile"):
        assert conf[key].startswith("/tmp/ssh/"), "sshd as uid 1000 writes and reads its own directory"
    lws = find(docs, "LeaderWorkerSet")[0]
    for ps in pod_spec(lws):
        assert ps["securityContext"]["runAsNonRoot"] is True
        vols = {v["name"]: v for v in ps["volumes"]}
        c = ps["containers"][0]
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        assert vols[mounts["/etc/dynamo-ssh"]]["secret"]["secretName"] == "dynamo-trtllm-ssh"
        assert vols[mounts["/etc/dynamo-sshd"]]["configMap"]["name"] == "dynamo-trtllm-sshd"
        script = " ".join(c["command"])
        assert "cp /etc/dynamo-ssh/* /tmp/ssh/" in script and "chmod 600 /tmp/ssh/*" in script
        assert "sshd" in script and "-f /etc/dynamo-sshd/sshd_config" in script
    leader = lws["spec"]["leaderWorkerTemplate"]["leaderTemplate"]["spec"]["containers"][0]
    assert "-p 2222 -i /tmp/ssh/id_ed25519" in " ".join(leader["command"])
    cuda = dockerfile_stages()["cuda"]
    assert re.search(r'if \[ "\$ENGINE" = "trtllm" \]; then.*openssh-server.*openmpi-bin.*usermod --shell /bin/bash',
                     cuda.replace("\\\n", " ").replace("\n", " ")) or \
        re.search(r'if \[ "\$ENGINE" = "trtllm" \]; then.*openmpi-bin.*openssh-server.*usermod --shell /bin/bash',
                  cuda.replace("\\\n", " ").replace("\n", " "))


# ---------------------------------------------------------------------------------------------
# Defect 10: the EKS cluster config
# ---------------------------------------------------------------------------------------------


@cache
def eks_cluster() -> dict:
    return load_docs(K8S / "clusters" / "eks-cluster.yaml")[0]


def test_eks_cluster_config_matches_eksctl_schema():
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((Path(__file__).parent / "schemas" / "eksctl.io_clusterconfig_v1alpha5.json").read_text())
    validator = jsonschema.Draft7Validator(schema)
    errors = [f"{e.json_path}: {e.message}" for e in validator.iter_errors(eks_cluster())]
    assert not errors, errors
    broken = json.loads(json.dumps(eks_cluster()))
    broken["managedNodeGroups"][1]["minsize"] = 0
    assert any("'minsize' was unexpected" in e.message for e in validator.iter_errors(broken))


def test_eks_cluster_gives_the_csi_drivers_iam_and_can_grow_the_gpu_group():
    c = eks_cluster()
    addons = {a["name"]: a for a in c["addons"]}
    for name, policy in (("aws-ebs-csi-driver", "ebsCSIController"), ("aws-efs-csi-driver", "efsCSIController")):
        a = addons[name]
        has_iam = (a.get("wellKnownPolicies", {}).get(policy) or a.get("attachPolicyARNs") or a.get("serviceAccountRoleARN")
                   or a.get("podIdentityAssociations") or a.get("useDefaultPodIdentityAssociations"))
        assert has_iam, f"{name} has no IAM role: its volumes would stay Pending"
        if a.get("wellKnownPolicies") or a.get("attachPolicyARNs"):
            assert c["iam"]["withOIDC"] is True, "IRSA needs the cluster's OIDC provider"
    assert json.loads(addons["vpc-cni"]["configurationValues"])["enableNetworkPolicy"] == "true"
    autoscaler = c.get("karpenter") or any(
        sa.get("wellKnownPolicies", {}).get("autoScaler") for sa in c["iam"].get("serviceAccounts", []))
    assert autoscaler, "no node autoscaler: a minSize 0 group never grows"
    text = (DOCS / "eks.md").read_text()
    assert "cluster-autoscaler" in text and "autoDiscovery.clusterName" in text
    for g in c["managedNodeGroups"]:
        if g["minSize"] == 0:
            tags = g.get("tags", {})
            assert g.get("propagateASGTags") is True, g["name"]
            prefix = "k8s.io/cluster-autoscaler/node-template/"
            assert tags.get(f"{prefix}label/eks.amazonaws.com/nodegroup") == g["name"]
            for k, v in g.get("labels", {}).items():
                assert tags.get(f"{prefix}label/{k}") == v, f"{g['name']}: label {k} not known at zero nodes"
            for t in g.get("taints", []):
                assert tags.get(f"{prefix}taint/{t['key']}") == f"{t['value']}:{t['effect']}"
    # the GPU pods select a group that exists
    groups = {g["name"] for g in c["managedNodeGroups"]}
    for ps in [p for d in docs_of("eks") if d["kind"] == "Deployment" for p in pod_spec(d)]:
        sel = ps.get("nodeSelector", {}).get("eks.amazonaws.com/nodegroup")
        assert sel is None or sel in groups


# ---------------------------------------------------------------------------------------------
# Defects 7 and 12: etcd Helm image, JetStream, model download, GKE Spot, KVBM
# ---------------------------------------------------------------------------------------------


def test_etcd_images_exist():
    values = yaml.safe_load((K8S / "helm-values" / "etcd.yaml").read_text())
    image = values["image"]
    assert image["repository"] != "bitnami/etcd", "docker.io/bitnami/etcd no longer has these images"
    assert image["repository"] in {"bitnamilegacy/etcd"} and image.get("tag")
    assert values["global"]["security"]["allowInsecureImages"] is True, "the chart refuses a non-Bitnami image otherwise"
    for o in OVERLAYS:
        for d in find(docs_of(o), "StatefulSet", "dynamo-etcd"):
            assert d["spec"]["template"]["spec"]["containers"][0]["image"].startswith("quay.io/coreos/etcd:v3.")


def test_jetstream_is_on_memory_only_for_the_shared_rate_limits():
    # What uses JetStream: the tenant rate limits shared by frontend replicas, in a memory bucket.
    users = sorted(
        str(p.relative_to(ROOT)) for d in ("dynamo", "frontend", "router", "workers", "kvbm", "planner")
        for p in (ROOT / d).rglob("*.py") if re.search(r"\.jetstream\(|\.jsm\(|\bkey_value\(|from nats\.js\b", p.read_text())
    )
    assert users == ["frontend/rate_limit_store.py"], f"JetStream has a new user: {users}; say what for in deploy/"
    assert "StorageType.MEMORY" in (ROOT / "frontend" / "rate_limit_store.py").read_text()
    nats_conf = find(docs_of("agg"), "ConfigMap", "dynamo-nats-config")[0]["data"]["nats.conf"]
    assert re.search(r"jetstream\s*\{[^}]*max_file_store:\s*0", nats_conf), nats_conf
    assert "-js" in compose()["services"]["nats"]["command"]
    assert "-js" in ecs_taskdefs()["nats"]["containerDefinitions"][0]["command"]
    jetstream = yaml.safe_load((K8S / "helm-values" / "nats.yaml").read_text())["config"]["jetstream"]
    assert jetstream["enabled"] is True and jetstream["fileStore"]["enabled"] is False
    assert jetstream["memoryStore"]["enabled"] is True
    for o in OVERLAYS:
        nats = find(docs_of(o), "StatefulSet", "dynamo-nats")[0]
        assert not nats["spec"].get("volumeClaimTemplates"), "memory-only JetStream keeps no state"
        pod = nats["spec"]["template"]["spec"]
        c = pod["containers"][0]
        # The store directory must be writable under a read-only root filesystem.
        store = re.search(r"store_dir:\s*(\S+)", nats_conf)
        assert store is not None
        mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
        assert any(store.group(1).startswith(path) and "emptyDir" in v for name, path in mounts.items()
                   for v in pod["volumes"] if v["name"] == name), (store.group(1), mounts)


def _download_script() -> str:
    job = find(docs_of("agg"), "Job", "dynamo-model-download")[0]
    return job["spec"]["template"]["spec"]["containers"][0]["command"][2]


def _run_download(tmp: Path, hf_model: str = "", fail_hf: bool = False) -> subprocess.CompletedProcess:
    script = _download_script().replace("/opt/dynamo/models", "@IMAGE@").replace("/models", str(tmp / "models"))
    script = script.replace("@IMAGE@", str(tmp / "image"))
    bin_dir = tmp / "bin"
    bin_dir.mkdir(exist_ok=True)
    hf = bin_dir / "hf"
    # a stand-in for `hf download REPO --local-dir DIR`: resumes (keeps what is there), adds files
    hf.write_text("#!/bin/sh\nset -e\nmkdir -p \"$4\"\necho part >> \"$4/weights.part\"\n"
                  + ("exit 1\n" if fail_hf else "echo '{}' > \"$4/config.json\"\n"))
    hf.chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "MODEL_NAME": "m", "HF_MODEL_ID": hf_model}
    return subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True, timeout=30)


def test_model_download_job_survives_retries(tmp_path: Path):
    image = tmp_path / "image" / "dynamo-tiny"
    image.mkdir(parents=True)
    (image / "config.json").write_text("{}")
    (image / "model.safetensors").write_text("w")
    models = tmp_path / "models"
    models.mkdir()
    # an earlier attempt died after the copy started and left both directories behind
    (models / "m.partial" / "dynamo-tiny").mkdir(parents=True)
    (models / "m").mkdir()
    (models / "m" / "junk").write_text("x")
    r = _run_download(tmp_path)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (models / "m").iterdir()) == ["config.json", "model.safetensors"]
    assert not (models / "m.partial").exists()
    r = _run_download(tmp_path)
    assert r.returncode == 0 and "already" in r.stdout
    # Hugging Face: a failed attempt leaves a partial download that the retry resumes
    shutil.rmtree(models / "m")
    assert _run_download(tmp_path, "org/model", fail_hf=True).returncode != 0
    assert not (models / "m").exists() and (models / "m.partial" / "weights.part").exists()
    r = _run_download(tmp_path, "org/model")
    assert r.returncode == 0, r.stderr
    assert (models / "m" / "weights.part").read_text() == "part\npart\n" and (models / "m" / "config.json").exists()


def test_filestore_share_is_handed_to_the_pods_user():
    job = find(docs_of("gke"), "Job", "dynamo-model-download")[0]["spec"]["template"]["spec"]
    init = {c["name"]: c for c in job["initContainers"]}["filestore-permissions"]
    assert "chown 1000:1000 /models" in " ".join(init["command"])
    sc = init["securityContext"]
    assert sc["runAsUser"] == 0 and sc["capabilities"]["drop"] == ["ALL"] and set(sc["capabilities"]["add"]) <= {"CHOWN", "FOWNER"}
    assert job["securityContext"]["runAsUser"] == 1000
    assert not find(docs_of("eks"), "Job", "dynamo-model-download")[0]["spec"]["template"]["spec"].get("initContainers")


def test_gke_spot_pools_are_tainted_where_the_workers_expect_it():
    """GKE Standard does not taint Spot nodes: the docs must create the pool with the taint
    the workers tolerate, and not claim GKE adds it."""
    text = (DOCS / "gke.md").read_text()
    tolerated = any(t["key"] == "cloud.google.com/gke-spot" for ps in
                    [p for d in docs_of("gke") if d["kind"] == "Deployment" for p in pod_spec(d)] for t in ps.get("tolerations", []))
    assert tolerated
    spot_cmd = next(b for b in re.split(r"\n(?=    gcloud )", text) if "--spot" in b)
    assert "--node-taints cloud.google.com/gke-spot=true:NoSchedule" in spot_cmd
    assert not re.search(r"tainted[^\n]*by GKE", text)


@pytest.mark.parametrize("topology", ["agg", "disagg"])
def test_kvbm_option_sizes_memory_and_a_local_disk_tier(topology):
    docs = RENDERS()[f"{topology}+kvbm"]
    text = (K8S / "overlays" / topology / "kustomization.yaml").read_text()
    assert "../../components/kvbm" in text, "the option is listed in the overlay"
    base = {d["metadata"]["name"]: d for d in find(docs_of(topology), "Deployment")}
    workers = [d for d in find(docs, "Deployment") if d["metadata"]["labels"].get("dynamo.io/gpu-worker") == "true"]
    assert workers
    for d in workers:
        ps = d["spec"]["template"]["spec"]
        c = ps["containers"][0]
        env = {k: v.get("value") for k, v in env_of(c).items()}
        host_gb, disk_gb = float(env["DYN_KVBM_HOST_GB"]), float(env["DYN_KVBM_DISK_GB"])
        gi = lambda q: float(q.removesuffix("Gi"))  # noqa: E731
        before = base[d["metadata"]["name"]]["spec"]["template"]["spec"]["containers"][0]["resources"]
        assert gi(c["resources"]["requests"]["memory"]) >= gi(before["requests"]["memory"]) + host_gb * 1e9 / 2**30
        assert gi(c["resources"]["limits"]["memory"]) > gi(c["resources"]["requests"]["memory"])
        mount = next(m for m in c["volumeMounts"] if m["mountPath"] == env["DYN_KVBM_DISK_DIR"])
        vol = next(v for v in ps["volumes"] if v["name"] == mount["name"])
        assert gi(vol["emptyDir"]["sizeLimit"]) * 2**30 >= disk_gb * 1e9
        assert gi(c["resources"]["requests"]["ephemeral-storage"]) >= gi(vol["emptyDir"]["sizeLimit"])
    kv = pytest.importorskip("kubernetes_validate")
    for d in docs:
        if d["kind"] not in CRD_KINDS:
            kv.validate(d, kv.latest_version(), strict=True)


# ---------------------------------------------------------------------------------------------
# Docs: what was never applied to a real cluster
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("page", ["README.md", "kubernetes.md", "eks.md", "gke.md", "aks.md", "ecs.md", "compose.md"])
def test_each_deploy_page_says_it_was_never_applied(page):
    text = (DOCS / page).read_text()
    assert re.search(r"^## Never (applied|run)", text, re.M), f"{page}: no 'Never applied/run' section"
    assert "doc-test: skip" in text
