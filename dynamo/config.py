"""Runtime settings shared by every entry point: flags with environment-variable fallbacks.

Each entry point calls `add_runtime_args` once and turns the result into a `RuntimeConfig`
with `RuntimeConfig.from_args`; library code takes the dataclass, never the environment.
"""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass, field
from typing import Literal

Backend = Literal["embedded", "distributed"]
RequestPlaneKind = Literal["nats", "tcp"]
# Direct TCP, as NVIDIA Dynamo defaults to: no broker hop per request and per response frame
# (benchmarks/RESULTS.md, "Direct TCP request plane").
DEFAULT_REQUEST_PLANE: RequestPlaneKind = "tcp"


def env_default(name: str, default: str | None = None) -> str | None:
    return os.environ.get(name, default)


_URL_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]+@")


def redact_url(text: str) -> str:
    """`nats://user:secret@host` -> `nats://***@host` (every URL in `text`), for log lines."""
    return _URL_USERINFO.sub(r"\g<scheme>***@", text)


@dataclass(frozen=True, slots=True)
class RuntimeConfig:
    backend: Backend = "embedded"
    nats_server: str = "nats://127.0.0.1:4222"
    etcd_endpoints: tuple[str, ...] = ("http://127.0.0.1:2379",)
    namespace: str = "dynamo"
    lease_ttl_s: float = 10.0
    request_ack_timeout_s: float = 5.0
    # Distributed only: where workers serve requests (callers reach either kind). tcp: each
    # worker listens on its own port, advertised in discovery as host:port; nats: via the broker.
    request_plane: RequestPlaneKind = DEFAULT_REQUEST_PLANE
    request_plane_host: str | None = None  # advertised (and bound) host; None: the default route's
    request_plane_port: int = 0  # 0: an ephemeral port
    # Security: TLS roots and credentials. Secrets are excluded from repr so they never reach logs.
    nats_tls_ca: str | None = None
    nats_creds: str | None = field(default=None, repr=False)  # a NATS .creds file path
    etcd_ca: str | None = None
    etcd_cert: str | None = None
    etcd_key: str | None = field(default=None, repr=False)
    etcd_user: str | None = None
    etcd_password: str | None = field(default=None, repr=False)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> RuntimeConfig:
        endpoints = tuple(e.strip() for e in args.etcd_endpoints.split(",") if e.strip())
        return cls(
            backend=args.runtime,
            nats_server=args.nats_server,
            etcd_endpoints=endpoints,
            namespace=args.namespace,
            lease_ttl_s=args.lease_ttl_s,
            request_ack_timeout_s=args.request_ack_timeout_s,
            request_plane=resolve_request_plane(args.request_plane, args),
            request_plane_host=args.request_plane_host or None,
            request_plane_port=args.request_plane_port,
            nats_tls_ca=args.nats_tls_ca or None,
            nats_creds=args.nats_creds or None,
            etcd_ca=args.etcd_ca or None,
            etcd_cert=args.etcd_cert or None,
            etcd_key=args.etcd_key or None,
            etcd_user=args.etcd_user or None,
            # Only from the environment: a password on the command line shows in `ps`.
            etcd_password=os.environ.get("ETCD_PASSWORD") or None,
        )


def resolve_request_plane(chosen: str | None, args: argparse.Namespace) -> RequestPlaneKind:
    """The flag (or env) when given; otherwise tcp, unless the NATS connection is secured (TLS,
    a creds file or a password in the URL): the TCP plane has neither, so a deployment that
    secured its request path keeps it on NATS until it opts in."""
    if chosen in ("nats", "tcp"):
        return chosen  # type: ignore[return-value]
    secured = bool(args.nats_tls_ca or args.nats_creds or _URL_USERINFO.search(args.nats_server or ""))
    return "nats" if secured else DEFAULT_REQUEST_PLANE


def add_runtime_args(parser: argparse.ArgumentParser, default_backend: Backend) -> None:
    group = parser.add_argument_group("runtime")
    group.add_argument(
        "--runtime",
        choices=["embedded", "distributed"],
        default=env_default("DYN_RUNTIME", default_backend),
        help="embedded: one process, no servers; distributed: NATS + etcd [env DYN_RUNTIME]",
    )
    group.add_argument(
        "--nats-server",
        default=env_default("NATS_SERVER", "nats://127.0.0.1:4222"),
        help="NATS URL(s), comma separated [env NATS_SERVER]",
    )
    group.add_argument(
        "--etcd-endpoints",
        default=env_default("ETCD_ENDPOINTS", "http://127.0.0.1:2379"),
        help="etcd endpoints, comma separated [env ETCD_ENDPOINTS]",
    )
    group.add_argument(
        "--namespace",
        default=env_default("DYN_NAMESPACE", "dynamo"),
        help="namespace that groups the components of one deployment [env DYN_NAMESPACE]",
    )
    group.add_argument(
        "--lease-ttl-s",
        type=float,
        default=float(env_default("DYN_LEASE_TTL_S", "10") or 10),
        help="discovery lease TTL; a dead worker is forgotten within it [env DYN_LEASE_TTL_S]",
    )
    group.add_argument(
        "--request-ack-timeout-s",
        type=float,
        default=float(env_default("DYN_REQUEST_ACK_TIMEOUT_S", "5") or 5),
        help="how long a caller waits for a worker to accept a request [env DYN_REQUEST_ACK_TIMEOUT_S]",
    )
    group.add_argument(
        "--request-plane",
        choices=["nats", "tcp"],
        default=env_default("DYN_REQUEST_PLANE"),
        help="distributed: how workers serve requests; tcp: direct connections to each worker "
        "(no broker hop, no TLS or auth), nats: through nats-server. Default tcp, or nats when "
        "NATS has TLS or credentials configured. Callers reach workers of either kind; events "
        "stay on NATS [env DYN_REQUEST_PLANE]",
    )
    group.add_argument(
        "--request-plane-host",
        default=env_default("DYN_REQUEST_PLANE_HOST"),
        help="tcp request plane: host to listen on and advertise to callers (default: this "
        "host's address on its default route, listening on every interface) [env DYN_REQUEST_PLANE_HOST]",
    )
    group.add_argument(
        "--request-plane-port",
        type=int,
        default=int(env_default("DYN_REQUEST_PLANE_PORT", "0") or 0),
        help="tcp request plane: port to listen on; 0 = ephemeral [env DYN_REQUEST_PLANE_PORT]",
    )
    sec = parser.add_argument_group("runtime security")
    sec.add_argument(
        "--nats-tls-ca",
        default=env_default("NATS_TLS_CA"),
        help="CA bundle to verify the NATS server (enables TLS); user:password may go in the "
        "NATS URL [env NATS_TLS_CA]",
    )
    sec.add_argument(
        "--nats-creds",
        default=env_default("NATS_CREDS"),
        help="NATS credentials file (JWT + nkey seed) [env NATS_CREDS]",
    )
    sec.add_argument("--etcd-ca", default=env_default("ETCD_CA"), help="CA bundle to verify etcd (enables TLS) [env ETCD_CA]")
    sec.add_argument("--etcd-cert", default=env_default("ETCD_CERT"), help="client certificate for etcd mTLS [env ETCD_CERT]")
    sec.add_argument("--etcd-key", default=env_default("ETCD_KEY"), help="client key for etcd mTLS [env ETCD_KEY]")
    sec.add_argument(
        "--etcd-user",
        default=env_default("ETCD_USER"),
        help="etcd user; the password is read from env ETCD_PASSWORD only [env ETCD_USER]",
    )
