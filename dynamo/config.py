"""Runtime settings shared by every entry point: flags with environment-variable fallbacks.

Each entry point calls `add_runtime_args` once and turns the result into a `RuntimeConfig`
with `RuntimeConfig.from_args`; library code takes the dataclass, never the environment.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Literal

Backend = Literal["embedded", "distributed"]


def env_default(name: str, default: str | None = None) -> str | None:
    return os.environ.get(name, default)


@dataclass(frozen=True, slots=True)
class RuntimeConfig:
    backend: Backend = "embedded"
    nats_server: str = "nats://127.0.0.1:4222"
    etcd_endpoints: tuple[str, ...] = ("http://127.0.0.1:2379",)
    namespace: str = "dynamo"
    lease_ttl_s: float = 10.0
    request_ack_timeout_s: float = 5.0

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
        )


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
