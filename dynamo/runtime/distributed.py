"""The distributed backend: events on NATS, discovery on etcd, requests on NATS or direct TCP
(`config.request_plane`: where this process serves; it calls workers on either).

`connect_distributed` connects both with bounded waits and fails with a DynamoError that names
the unreachable URL, so a worker started before its infrastructure says why it cannot start.
"""

from __future__ import annotations

import os

from dynamo import errors
from dynamo.config import RuntimeConfig
from dynamo.runtime.etcd_discovery import EtcdDiscovery, EtcdSecurity
from dynamo.runtime.nats_planes import NatsConnection, NatsEventPlane, NatsRequestPlane
from dynamo.runtime.planes import Discovery, EventPlane, LeaseLostCallback, RequestPlane
from dynamo.runtime.tcp_plane import SchemeRequestPlane, TcpRequestPlane

CONNECT_TIMEOUT_S = 5.0


async def connect_distributed(
    config: RuntimeConfig,
    *,
    connect_timeout_s: float = CONNECT_TIMEOUT_S,
    on_lease_lost: LeaseLostCallback | None = None,
) -> tuple[Discovery, RequestPlane, EventPlane]:
    """Connect to NATS (`config.nats_server`, comma separated) and to the first etcd endpoint.

    `on_lease_lost` is handed to EtcdDiscovery (see there); it can also be set later as
    `discovery.on_lease_lost`.
    """
    servers = [s.strip() for s in config.nats_server.split(",") if s.strip()]
    if not servers:
        raise errors.DynamoError("no NATS server configured (--nats-server / NATS_SERVER)")
    if not config.etcd_endpoints:
        raise errors.DynamoError("no etcd endpoint configured (--etcd-endpoints / ETCD_ENDPOINTS)")

    conn = await NatsConnection.connect(
        servers,
        name=f"dynamo:{config.namespace}:{os.getpid()}",
        timeout_s=connect_timeout_s,
        tls_ca=config.nats_tls_ca,
        creds_path=config.nats_creds,
        fastpath=config.nats_fastpath,
    )
    security = EtcdSecurity(
        ca_path=config.etcd_ca,
        cert_path=config.etcd_cert,
        key_path=config.etcd_key,
        user=config.etcd_user,
        password=config.etcd_password,
    )
    try:
        discovery = await EtcdDiscovery.connect(
            config.etcd_endpoints[0], timeout_s=connect_timeout_s, on_lease_lost=on_lease_lost, security=security
        )
    except BaseException:
        await conn.close()
        raise
    try:
        requests = await NatsRequestPlane.create(conn, ack_timeout_s=config.request_ack_timeout_s)
    except BaseException:
        await conn.close()
        await discovery.close()
        raise
    # Always both: NATS callers stay possible (workers of a not-yet-migrated deployment), and
    # the TCP plane opens nothing until it serves or calls.
    tcp = TcpRequestPlane(
        ack_timeout_s=config.request_ack_timeout_s,
        advertise_host=config.request_plane_host,
        port=config.request_plane_port,
    )
    events = NatsEventPlane(conn, timeout_s=connect_timeout_s)
    return discovery, SchemeRequestPlane(config.request_plane, requests, tcp), events
