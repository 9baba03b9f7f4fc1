#!/usr/bin/env python3
"""dynamo-advertise: set the addresses a worker advertises, then run the worker.

    dynamo-advertise --from ecs -- python -m dynamo.worker ...
    dynamo-advertise --from hostname -- python -m dynamo.worker ...

A worker registers two addresses in discovery: its request-plane listener
(DYN_REQUEST_PLANE_HOST, which frontends and the router connect to) and its KV-transfer
listener (DYN_KV_TRANSFER_HOST, which peer workers connect to). Left unset, each is guessed
from the default route, which in a container or on a multi-homed host can be an address the
peers cannot reach. Kubernetes sets both from the pod IP (downward API); where there is no
downward API this sets them from the platform's own record of the container's address:

  ecs       the ECS task metadata endpoint (ECS_CONTAINER_METADATA_URI_V4): the container's
            network address in awsvpc or bridge mode; in host mode the instance's private
            address from the EC2 instance metadata service (IMDSv2), which is the task's.
  hostname  the container's own host name as /etc/hosts resolves it: Docker writes the
            container's address on its network there (docker-compose).

A variable already set is kept. When no address can be found the command fails instead of
starting a worker that advertises a guess. Standard library only; runs in both images.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import socket
import sys
import urllib.request

VARIABLES = ("DYN_REQUEST_PLANE_HOST", "DYN_KV_TRANSFER_HOST")
IMDS_URL = "http://169.254.169.254"
TIMEOUT_S = 3.0


class NoAddress(RuntimeError):
    pass


def _usable(address: str, source: str) -> str:
    ip = ipaddress.ip_address(address)
    if ip.is_loopback or ip.is_unspecified or ip.is_link_local:
        raise NoAddress(f"{source} gave {address}, which peers cannot reach")
    return address


def from_hostname() -> str:
    name = socket.gethostname()
    try:
        address = socket.gethostbyname(name)
    except OSError as exc:
        raise NoAddress(f"the host name {name!r} does not resolve: {exc}") from exc
    return _usable(address, f"the host name {name!r}")


def _get(url: str, headers: dict[str, str] | None = None, method: str = "GET") -> str:
    request = urllib.request.Request(url, headers=headers or {}, method=method)
    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:  # noqa: S310 (fixed hosts)
        return response.read().decode()


def _imds_private_ipv4(imds_url: str) -> str:
    token = _get(f"{imds_url}/latest/api/token", {"X-aws-ec2-metadata-token-ttl-seconds": "60"}, "PUT")
    return _get(f"{imds_url}/latest/meta-data/local-ipv4", {"X-aws-ec2-metadata-token": token}).strip()


def from_ecs(metadata_uri: str | None, imds_url: str = IMDS_URL) -> str:
    if not metadata_uri:
        raise NoAddress("ECS_CONTAINER_METADATA_URI_V4 is not set (not an ECS task, or an agent before 1.39)")
    try:
        container = json.loads(_get(metadata_uri))
    except (OSError, ValueError) as exc:
        raise NoAddress(f"the task metadata endpoint did not answer: {exc}") from exc
    networks = container.get("Networks") or []
    mode = networks[0].get("NetworkMode", "") if networks else ""
    if mode != "host":
        for network in networks:
            for address in network.get("IPv4Addresses") or []:
                return _usable(address, f"task metadata ({network.get('NetworkMode')} mode)")
        raise NoAddress(f"task metadata lists no IPv4 address ({mode or 'no'} network mode)")
    try:
        return _usable(_imds_private_ipv4(imds_url), "the instance metadata service")
    except (OSError, ValueError) as exc:
        raise NoAddress(f"host network mode, and the instance metadata service did not answer: {exc}") from exc


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="dynamo-advertise", description=__doc__.split("\n\n")[0])
    parser.add_argument("--from", dest="source", choices=("ecs", "hostname"), required=True)
    parser.add_argument("--imds-url", default=IMDS_URL, help=argparse.SUPPRESS)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --")
    missing = [v for v in VARIABLES if not os.environ.get(v)]
    if missing:
        try:
            if args.source == "ecs":
                address = from_ecs(os.environ.get("ECS_CONTAINER_METADATA_URI_V4"), args.imds_url)
            else:
                address = from_hostname()
        except NoAddress as exc:
            print(f"dynamo-advertise: no address to advertise: {exc}", file=sys.stderr)
            raise SystemExit(78) from None
        for name in missing:
            os.environ[name] = address
        print(f"dynamo-advertise: {', '.join(missing)}={address} (from {args.source})", file=sys.stderr, flush=True)
    os.execvp(command[0], command)


if __name__ == "__main__":
    main()
