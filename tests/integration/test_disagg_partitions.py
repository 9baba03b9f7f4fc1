"""Disaggregation across a cut link, between real hosts (network namespaces, tests/netns.py):
nats-server, etcd, a frontend, a prefill and a decode mocker worker, each on its own host, and
the link between the two workers cut.

On the NATS request plane the decode worker still reaches the prefill worker through
nats-server; only the KV (prefill -> decode, to the decode worker's transfer agent) has to cross
the cut link, and what ends each attempt is the prefill worker's bounded connect to that agent.
On the TCP plane the request itself crosses it, and the request plane's acknowledgement bound
ends the attempt. Either way every request sent during the cut is answered whole, prefilled on
the decode worker, and within the requests' bound although the decode worker's prefill timeout
is longer than that bound. After the heal, prompts are prefilled remotely again. Waits are
bounded waits on observable conditions (/ready, /metrics); the only timed thing is how long the
link stays cut.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.e2e.procs import TINY_MODEL, Stack, host_env, metric_samples, rigged_stack, wait_until
from tests.netns import Rig

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

MODEL = "tiny"
PREFILL, DECODE = "pw", "dw"  # host names (tests/netns.py allows five letters)
HOSTS = ("nats", "etcd", "fe", PREFILL, DECODE)
HTTP_PORT, SYSTEM_PORT = 8000, 9100
# Longer than BOUND_S on purpose: a remote prefill that only this timeout ended would leave its
# request unanswered past the bound.
PREFILL_TIMEOUT_S = 300
BOUND_S = 60.0
REQUESTS = 6


@dataclass
class Fleet:
    rig: Rig
    stack: Stack
    plane: str

    def base(self) -> str:
        return f"http://{self.rig.addresses['fe']}:{HTTP_PORT}"

    def prefills(self) -> dict[str, float]:
        """The decode worker's dynamo_worker_prefills_total by where (and why, when local)."""
        url = f"http://{self.rig.addresses[DECODE]}:{SYSTEM_PORT}/metrics"
        samples = metric_samples(url, "dynamo_worker_prefills_total") or {}
        out: dict[str, float] = {}
        for line, value in samples.items():
            key = "remote" if 'where="remote"' in line else line[line.index('reason="') + 8:].split('"')[0]
            out[key] = out.get(key, 0.0) + value
        return out

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.log()}" for p in self.stack.procs)


@pytest.fixture(scope="module", params=["nats", "tcp"])
def fleet(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    # A long lease: disaggregated workers import the transfer stack (torch) after their lease
    # is granted, which on a loaded machine can outlast the default TTL.
    with rigged_stack(
        HOSTS, tmp_path_factory.mktemp(f"disagg-partitions-{request.param}"), DYN_NAMESPACE="disaggparts",
        DYN_REQUEST_PLANE=request.param, DYN_LEASE_TTL_S="60",
    ) as rigged:
        rig, stack, env = rigged.rig, rigged.stack, rigged.env
        mocker = ("--engine", "mocker", "--model", TINY_MODEL, "--served-model-name", MODEL, "--speedup-ratio", "10",
                  "--system-port", str(SYSTEM_PORT))
        for role, host, extra in (
            ("prefill", PREFILL, ()),
            ("decode", DECODE, ("--disagg-min-prefill-tokens", "1", "--disagg-prefill-timeout-s", str(PREFILL_TIMEOUT_S))),
        ):
            stack.start(role, "dynamo.worker", *mocker, "--role", role, *extra, wrap=rig.wrap(host),
                        env={**env, **host_env(rig.addresses[host])})
        stack.start("fe", "dynamo.frontend", "--http-port", str(HTTP_PORT), wrap=rig.wrap("fe"),
                    env={**env, **host_env(rig.addresses["fe"])})
        f = Fleet(rig, stack, request.param)
        try:
            # Ready once a request was prefilled on the prefill worker: every piece is up, and
            # the decode worker has found the prefill worker.
            wait_until(lambda: _one(f, "warm") and f.prefills().get("remote", 0) >= 1, 120,
                       "a remote prefill through the fleet", 0.2)
        except (TimeoutError, AssertionError):
            raise AssertionError(f"fleet did not come up:\n{f.logs()}") from None
        yield f


BODY = {"model": MODEL, "max_tokens": 8, "ignore_eos": True}


def _one(fleet: Fleet, tag: str) -> bool:
    try:
        resp = httpx.post(f"{fleet.base()}/v1/completions", json={**BODY, "prompt": f"{tag}: " + "words " * 40},
                          timeout=10, trust_env=False)
    except httpx.HTTPError:
        return False
    return resp.status_code == 200


async def _requests(fleet: Fleet, tag: str) -> tuple[list[str], float]:
    """REQUESTS concurrent completions, each with its own prompt: what went wrong with each
    that did not come back whole within BOUND_S, and how long the last one took."""
    async def one(client: httpx.AsyncClient, i: int) -> str | None:
        body = {**BODY, "prompt": f"{tag} {i}: " + "tokens to prefill " * 30}
        try:
            resp = await client.post(f"{fleet.base()}/v1/completions", json=body)
        except httpx.HTTPError as exc:
            return f"{i}: {exc!r}"
        if resp.status_code != 200:
            return f"{i}: HTTP {resp.status_code} {resp.text[:200]}"
        if resp.json()["usage"]["completion_tokens"] != BODY["max_tokens"]:
            return f"{i}: {resp.text[:200]}"
        return None

    started = time.monotonic()
    async with httpx.AsyncClient(timeout=httpx.Timeout(BOUND_S), trust_env=False) as client:
        results = await asyncio.gather(*(one(client, i) for i in range(REQUESTS)))
    return [r for r in results if r is not None], time.monotonic() - started


async def test_link_cut_between_prefill_and_decode_falls_back_to_local_prefill_within_the_bound(fleet: Fleet) -> None:
    before = fleet.prefills()
    fleet.rig.cut(PREFILL, DECODE)
    try:
        failures, took_s = await _requests(fleet, "cut")
        during = fleet.prefills()
    finally:
        fleet.rig.heal(PREFILL, DECODE)
    assert failures == [], f"{failures}\n{fleet.logs()}"
    fell_back = during.get("remote failed", 0) - before.get("remote failed", 0)
    remote = during.get("remote", 0) - before.get("remote", 0)
    print(f"\n[kv link cut, {fleet.plane} plane] {REQUESTS} requests: {fell_back:.0f} prefilled locally after a failed remote "
          f"prefill, {remote:.0f} remotely; the last answered after {took_s:.1f} s")
    assert (fell_back, remote) == (REQUESTS, 0), during

    # Healed: prompts are prefilled on the prefill worker again, once the decode worker's
    # connection to it works. On the TCP plane the connection the cut outlasted dies at the
    # dead-peer bound, taking with it requests sent on it just after the heal (they too are
    # prefilled locally); the next ones open a new connection.
    healed = time.monotonic()
    wait_until(lambda: _one(fleet, "heal") and fleet.prefills().get("remote", 0) > during.get("remote", 0),
               60, "a remote prefill after the heal", 0.2)
    print(f"[kv link cut, {fleet.plane} plane] remote prefills again {time.monotonic() - healed:.1f} s after the heal")
    before = fleet.prefills()
    failures, _ = await _requests(fleet, "healed")
    assert failures == [], failures
    after = fleet.prefills()
    assert after.get("remote", 0) - before.get("remote", 0) == REQUESTS, f"{after}\n{fleet.logs()}"
