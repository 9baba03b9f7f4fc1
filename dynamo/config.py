"""Runtime settings shared by every entry point: flags with environment-variable fallbacks,
declared once (dynamo/flags.py), and the frozen `RuntimeConfig` they are turned into.

Each entry point calls `add_runtime_args` once and turns the result into a `RuntimeConfig`
with `RuntimeConfig.from_args`; library code takes the dataclass, never the environment.
"""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass, field
from typing import Literal

from dynamo.flags import Flag, FlagGroup

Backend = Literal["embedded", "distributed"]
RequestPlaneKind = Literal["nats", "tcp"]
# Direct TCP, as NVIDIA Dynamo defaults to: no broker hop per request and per response frame
# (benchmarks/RESULTS.md, "Direct TCP request plane").
DEFAULT_REQUEST_PLANE: RequestPlaneKind = "tcp"


def env_default(name: str, default: str | None = None) -> str | None:
    """The environment's value of `name`. For flag modules not yet declared with
    dynamo/flags.py (frontend/config.py, the engines' args modules); new flags use `Flag`."""
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
    # The NATS request plane's response fast path (dynamo/runtime/nats_fastpath.py), where the
    # installed nats-py is one it was tested with; False: nats-py's public API only.
    nats_fastpath: bool = True
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
            nats_fastpath=args.nats_fastpath,
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
    if chosen == "nats":
        return "nats"
    if chosen == "tcp":
        return "tcp"
    secured = bool(args.nats_tls_ca or args.nats_creds or _URL_USERINFO.search(args.nats_server or ""))
    return "nats" if secured else DEFAULT_REQUEST_PLANE


_D = RuntimeConfig()

RUNTIME_FLAGS = FlagGroup(
    "runtime",
    [
        Flag(
            "--runtime",
            "embedded: one process, no servers; distributed: NATS + etcd",
            default="distributed",
            env="DYN_RUNTIME",
            choices=("embedded", "distributed"),
            default_doc="distributed (dynamo.serve: embedded)",
        ),
        Flag("--nats-server", "NATS URL(s), comma separated", default=_D.nats_server, env="NATS_SERVER"),
        Flag(
            "--etcd-endpoints",
            "etcd endpoints, comma separated",
            default=",".join(_D.etcd_endpoints),
            env="ETCD_ENDPOINTS",
        ),
        Flag(
            "--namespace",
            "namespace that groups the components of one deployment",
            default=_D.namespace,
            env="DYN_NAMESPACE",
        ),
        Flag(
            "--lease-ttl-s",
            "discovery lease TTL in seconds; a dead worker is forgotten within it",
            default=_D.lease_ttl_s,
            env="DYN_LEASE_TTL_S",
            type=float,
        ),
        Flag(
            "--request-ack-timeout-s",
            "how long a caller waits for a worker to accept a request",
            default=_D.request_ack_timeout_s,
            env="DYN_REQUEST_ACK_TIMEOUT_S",
            type=float,
        ),
        Flag(
            "--request-plane",
            "distributed: how workers serve requests; tcp: direct connections to each worker "
            "(no broker hop, no TLS or auth), nats: through nats-server. Callers reach workers of "
            "either kind; events stay on NATS",
            env="DYN_REQUEST_PLANE",
            choices=("nats", "tcp"),
            default_doc=f"{DEFAULT_REQUEST_PLANE}, or nats when NATS has TLS or credentials configured",
        ),
        Flag(
            "--request-plane-host",
            "tcp request plane: host to listen on and advertise to callers",
            env="DYN_REQUEST_PLANE_HOST",
            default_doc="this host's address on its default route, listening on every interface",
        ),
        Flag(
            "--request-plane-port",
            "tcp request plane: port to listen on; 0 = ephemeral",
            default=_D.request_plane_port,
            env="DYN_REQUEST_PLANE_PORT",
            type=int,
        ),
        Flag(
            "--nats-fastpath",
            "NATS request plane: hand response frames from nats-py's protocol parser straight to "
            "the stream (dynamo/runtime/nats_fastpath.py; on only for the nats-py versions it was "
            "tested with); --no-nats-fastpath uses nats-py's public API only",
            default=_D.nats_fastpath,
            env="DYN_NATS_FASTPATH",
            type=bool,
        ),
    ],
)

RUNTIME_SECURITY_FLAGS = FlagGroup(
    "runtime security",
    [
        Flag(
            "--nats-tls-ca",
            "CA bundle to verify the NATS server (enables TLS); user:password may go in the NATS URL",
            env="NATS_TLS_CA",
        ),
        Flag("--nats-creds", "NATS credentials file (JWT + nkey seed)", env="NATS_CREDS"),
        Flag("--etcd-ca", "CA bundle to verify etcd (enables TLS)", env="ETCD_CA"),
        Flag("--etcd-cert", "client certificate for etcd mTLS", env="ETCD_CERT"),
        Flag("--etcd-key", "client key for etcd mTLS", env="ETCD_KEY"),
        Flag("--etcd-user", "etcd user; the password is read from env ETCD_PASSWORD only", env="ETCD_USER"),
    ],
)


def add_runtime_args(parser: argparse.ArgumentParser, default_backend: Backend) -> None:
    RUNTIME_FLAGS.add_to(parser, defaults={"runtime": default_backend})
    RUNTIME_SECURITY_FLAGS.add_to(parser)
