"""Round-trip cost of the request plane: streaming requests of N small frames, over real NATS
and over the direct TCP plane (the server in a second process, as in a deployment), and over
the embedded plane for reference.

    python benchmarks/request_plane_roundtrip.py [--requests 1000] [--frames 32] [--nats-url URL]
        [--nats-public-api]   (NATS without dynamo/runtime/nats_fastpath.py, on both sides)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dynamo.runtime.embedded import EmbeddedRequestPlane  # noqa: E402
from dynamo.runtime.nats_planes import NatsConnection, NatsRequestPlane  # noqa: E402
from dynamo.runtime.planes import Handler, RequestContext, RequestPlane  # noqa: E402
from dynamo.runtime.tcp_plane import TcpRequestPlane  # noqa: E402
from dynamo.wire import EngineOutput, encode  # noqa: E402

ADDRESS = "bench.backend.generate.1"
# One decode step's output, as a worker sends it: a token id in an EngineOutput.
FRAME = encode(EngineOutput(token_ids=[31337]))


def make_handler(frames: int) -> Handler:
    async def handler(payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
        for _ in range(frames):
            yield FRAME

    return handler


async def serve_forever(url: str, frames: int, fastpath: bool = True) -> None:
    """Serves ADDRESS on NATS (`url`) and on a TCP plane; prints the TCP address."""
    conn = await NatsConnection.connect([url], name="bench-server", fastpath=fastpath)
    plane = await NatsRequestPlane.create(conn, ack_timeout_s=5)
    await plane.serve(ADDRESS, make_handler(frames))
    tcp = TcpRequestPlane(ack_timeout_s=5, advertise_host="127.0.0.1")
    served = await tcp.serve(ADDRESS, make_handler(frames))
    print(f"ready {served.transport}", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until the parent closes stdin
    await tcp.close()
    await plane.close()


async def one(plane: RequestPlane, i: int, frames: int, address: str = ADDRESS) -> float:
    start = time.perf_counter()
    stream = await plane.call(address, f"r{i}", b"prompt")
    n = 0
    async for _ in stream:
        n += 1
    assert n == frames, n
    return time.perf_counter() - start


async def measure(
    plane: RequestPlane, label: str, requests: int, frames: int, concurrency: int, address: str = ADDRESS
) -> None:
    for i in range(50):  # warm-up
        await one(plane, -i, frames, address)
    latencies = []
    start = time.perf_counter()
    for i in range(requests):
        latencies.append(await one(plane, i, frames, address))
    sequential_s = time.perf_counter() - start

    sem = asyncio.Semaphore(concurrency)

    async def bounded(i: int) -> float:
        async with sem:
            return await one(plane, i, frames, address)

    start = time.perf_counter()
    await asyncio.gather(*(bounded(i) for i in range(requests)))
    concurrent_s = time.perf_counter() - start

    lat_us = sorted(x * 1e6 for x in latencies)
    p50, p99 = lat_us[len(lat_us) // 2], lat_us[int(len(lat_us) * 0.99)]
    print(
        f"{label:9s} sequential: {requests} req x {frames} frames in {sequential_s:.2f}s | per request "
        f"p50 {p50:.0f} us, p99 {p99:.0f} us, mean {statistics.mean(lat_us):.0f} us | "
        f"{requests * frames / sequential_s:,.0f} frames/s"
    )
    print(
        f"{label:9s} concurrency {concurrency}: {requests / concurrent_s:,.0f} req/s, "
        f"{requests * frames / concurrent_s:,.0f} frames/s"
    )


async def main(args: argparse.Namespace) -> None:
    embedded = EmbeddedRequestPlane()
    await embedded.serve(ADDRESS, make_handler(args.frames))
    await measure(embedded, "embedded", args.requests, args.frames, args.concurrency)

    nats_proc = None
    url = args.nats_url
    if url is None:
        from tests.infra import start_nats

        nats_proc = start_nats()
        url = nats_proc.url
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve", url, "--frames", str(args.frames)]
        + (["--no-uvloop"] if args.no_uvloop else [])
        + (["--nats-public-api"] if args.nats_public_api else []),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        ready, tcp_address = server.stdout.readline().split()
        assert ready == "ready"
        conn = await NatsConnection.connect([url], name="bench-caller", fastpath=not args.nats_public_api)
        plane = await NatsRequestPlane.create(conn, ack_timeout_s=5)
        label = "nats-api" if args.nats_public_api else "nats"
        await measure(plane, label, args.requests, args.frames, args.concurrency)
        await plane.close()
        tcp = TcpRequestPlane(ack_timeout_s=5)
        await measure(tcp, "tcp", args.requests, args.frames, args.concurrency, tcp_address)
        await tcp.close()
    finally:
        assert server.stdin is not None
        server.stdin.close()
        server.wait(timeout=10)
        if nats_proc is not None:
            nats_proc.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--nats-url", default=None, help="use this server instead of starting one")
    parser.add_argument("--no-uvloop", action="store_true")
    parser.add_argument(
        "--nats-public-api", action="store_true", help="NATS without the response fast path (both sides)"
    )
    parser.add_argument("--serve", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    coro = serve_forever(args.serve, args.frames, not args.nats_public_api) if args.serve else main(args)
    if args.no_uvloop or os.name == "nt":
        asyncio.run(coro)
    else:
        import uvloop

        uvloop.run(coro)
