"""Two real worker processes on one host that see different GPUs: the prefill worker must pick
host transfer for the decode worker from the first request on, never CUDA IPC.

The bug this guards against (issue 18, defect 4): on ECS with host networking a prefill and a
decode task on one instance share hostname and boot id, so the transfer layer took them for
one host and chose CUDA IPC between containers that cannot see each other's GPU; every
remote prefill failed and fell back to prefilling locally.

This machine has no GPU, so each worker runs the built-in engine on the CPU with a stand-in
for the CUDA IPC backend installed in front of the real ones (`python -m
tests.integration.test_transfer_same_host ...` below): it advertises handles and chooses peers
exactly as the real backend does (equal host_id), but its handles never open, as for a GPU
the process cannot see. "Different devices" are made through the same inputs that real
containers differ in: CUDA_VISIBLE_DEVICES (the host_id's GPU domain, kvbm/transfer/locality.py).

- different CUDA_VISIBLE_DEVICES: no CUDA IPC attempt at all, the KV moves with the host
  backend, the prefill worker logs why, and the answer equals aggregated serving's;
- the same CUDA_VISIBLE_DEVICES (same domain): CUDA IPC is tried, its handles do not open, and
  the same transfer still completes over host (the handshake fallback), logged.

Both run on real nats-server and etcd (tests/infra.py), like the other integration tests."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# --------------------------------------------------------------------------- worker process


def _install_stand_in(record: Path) -> None:
    """Put a CPU stand-in for CudaIpcBackend first in every agent's backends, and record each
    transfer's backend and each attempt to open a peer's handles in `record`."""
    from kvbm.transfer import factory
    from kvbm.transfer.agent import KvTransferAgent
    from kvbm.transfer.cuda_ipc import CudaIpcBackend

    def note(line: str) -> None:
        with record.open("a") as f:
            f.write(line + "\n")

    class CpuIpcStandIn(CudaIpcBackend):
        async def start(self, agent: KvTransferAgent) -> None:
            self._handles = b"stand-in handles"

        def can_reach(self, local, peer):  # type: ignore[no-untyped-def]
            # The real rule less the device check (these KV caches are on the CPU).
            return self.name in peer.backends and peer.host_id == local.host_id and bool(peer.cuda_ipc)

        @staticmethod
        def _open(k, v, peer):  # type: ignore[no-untyped-def]
            note("open-attempt")
            raise RuntimeError("CUDA error: invalid device context")

    real_make_backends = factory.make_backends

    def make_backends(choice, memory):  # type: ignore[no-untyped-def]
        return [CpuIpcStandIn(), *real_make_backends(choice, memory)]

    factory.make_backends = make_backends  # type: ignore[assignment]
    real_send = KvTransferAgent.send

    async def send(self, peer, transfer_id, src, dst):  # type: ignore[no-untyped-def]
        num_bytes, backend = await real_send(self, peer, transfer_id, src, dst)
        note(f"sent {backend}")
        return num_bytes, backend

    KvTransferAgent.send = send  # type: ignore[method-assign]


def _worker_main(argv: list[str]) -> None:
    _install_stand_in(Path(os.environ["TRANSFER_TEST_RECORD"]))
    from workers.cli import main

    main(argv)


if __name__ == "__main__":
    _worker_main(sys.argv[1:])
    raise SystemExit(0)


# ------------------------------------------------------------------------------------ tests

torch = pytest.importorskip("torch")

from dynamo.config import RuntimeConfig  # noqa: E402
from dynamo.runtime import Runtime  # noqa: E402
from dynamo.wire import OUTPUT_CODEC, PreprocessedRequest, StopConditions, encode  # noqa: E402
from tests.e2e.procs import TINY_MODEL, Stack, base_env, free_port, http_ok, wait_until  # noqa: E402

pytestmark = pytest.mark.integration

MODEL = "tiny"
ENGINE = ["--engine", "builtin", "--model", TINY_MODEL, "--served-model-name", MODEL, "--device", "cpu",
          "--dtype", "float32", "--block-size", "4", "--num-gpu-blocks", "96", "--max-num-batched-tokens", "64"]
MODULE = "tests.integration.test_transfer_same_host"


def _request(rid: str, prompt: list[int]) -> PreprocessedRequest:
    return PreprocessedRequest(rid, MODEL, prompt, stop=StopConditions(max_tokens=6, ignore_eos=True))


_AGGREGATED: dict[tuple[int, ...], list[int]] = {}


async def _aggregated(prompt: list[int]) -> list[int]:
    """Greedy tokens of the same request served whole by one engine in this process."""
    if tuple(prompt) in _AGGREGATED:
        return _AGGREGATED[tuple(prompt)]
    from workers.builtin.args import BuiltinConfig
    from workers.builtin.engine import BuiltinEngine

    config = BuiltinConfig(model=TINY_MODEL, dtype="float32", device="cpu", block_size_tokens=4,
                           num_gpu_blocks=96, max_num_batched_tokens=64)
    async with BuiltinEngine(config) as engine:
        tokens = [t for o in [x async for x in engine.generate(_request("agg", prompt))] for t in o.token_ids]
    _AGGREGATED[tuple(prompt)] = tokens
    return tokens


class Fleet:
    def __init__(self, stack: Stack, namespace: str, record: Path, prefill: str, decode: str) -> None:
        self.stack, self.namespace, self.record = stack, namespace, record
        self.prefill_log, self.decode_log = prefill, decode

    def records(self) -> list[str]:
        return self.record.read_text().splitlines() if self.record.exists() else []

    def log(self, name: str) -> str:
        return next(p for p in self.stack.procs if p.name == name).log_path.read_text(errors="replace")


@pytest.fixture
def fleet_factory(nats_server: str, etcd_server: str, tmp_path: Path) -> Iterator:
    stacks: list[Stack] = []

    def start(prefill_devices: str, decode_devices: str) -> Fleet:
        namespace = f"samehost{free_port()}"
        record = tmp_path / f"{namespace}.record"
        env = base_env(NATS_SERVER=nats_server, ETCD_ENDPOINTS=etcd_server, DYN_NAMESPACE=namespace,
                       DYN_LEASE_TTL_S="3", DYN_LOG="INFO", DYN_REQUEST_PLANE_HOST="127.0.0.1",
                       DYN_KV_TRANSFER_HOST="127.0.0.1", TRANSFER_TEST_RECORD=str(record))
        stack = Stack(tmp_path, env)
        stacks.append(stack)
        ports = {"prefill": free_port(), "decode": free_port()}
        procs = {}
        for role, devices in (("prefill", prefill_devices), ("decode", decode_devices)):
            stack.env = {**env, "CUDA_VISIBLE_DEVICES": devices}
            extra = ["--component", "prefill"] if role == "prefill" else ["--disagg-min-prefill-tokens", "1"]
            procs[role] = stack.start(role, MODULE, *ENGINE, "--role", role, *extra, "--system-port", str(ports[role]))
        for role, proc in procs.items():
            try:
                wait_until(lambda: http_ok(f"http://127.0.0.1:{ports[role]}/ready") or proc.popen.poll() is not None,
                           120, f"{role} worker ready")
            except TimeoutError:
                raise AssertionError(f"{role} worker not ready:\n{proc.log()}") from None
            assert proc.popen.poll() is None, proc.log()
        return Fleet(stack, namespace, record, "prefill", "decode")

    yield start
    for stack in stacks:
        stack.stop_all()


async def _serve_until_remote(fleet: Fleet, nats_server: str, etcd_server: str, prompt: list[int]) -> list[int]:
    """Send the request to the decode worker until one was prefilled remotely (the decode
    worker may not have seen the prefill worker's registration yet); its tokens."""
    config = RuntimeConfig(backend="distributed", nats_server=nats_server, etcd_endpoints=(etcd_server,),
                           namespace=fleet.namespace, request_plane_host="127.0.0.1")
    async with await Runtime.create(config) as rt:
        client = await rt.endpoint("backend", "generate").client()
        try:
            (instance,) = await client.wait_for_instances(30)
            for attempt in range(20):
                req = _request(f"r{attempt}", prompt)
                stream = await client.generate(encode(req), instance, req.request_id)
                tokens = [t async for p in stream for t in OUTPUT_CODEC.decode(p).token_ids]
                if any(r.startswith("sent") for r in fleet.records()):
                    return tokens
                await asyncio.sleep(0.5)
        finally:
            await client.close()
    raise AssertionError(f"no request was prefilled remotely\n--- prefill\n{fleet.log('prefill')[-3000:]}"
                         f"\n--- decode\n{fleet.log('decode')[-3000:]}")


PROMPT = list(range(10, 50))


async def test_workers_that_see_different_gpus_pick_host_transfer(fleet_factory, nats_server, etcd_server) -> None:
    fleet = fleet_factory("0", "1")
    tokens = await _serve_until_remote(fleet, nats_server, etcd_server, PROMPT)
    assert tokens == await _aggregated(PROMPT)
    records = fleet.records()
    assert "open-attempt" not in records, "CUDA IPC was tried between processes that see different GPUs"
    assert set(records) == {"sent host"}, records
    prefill_log = fleet.log("prefill")
    assert "uses host, not cuda-ipc" in prefill_log and "GPU domain" in prefill_log, prefill_log[-3000:]
    assert "prefilling locally" not in fleet.log("decode")


async def test_handles_that_do_not_open_fall_back_to_host_on_the_same_transfer(fleet_factory, nats_server,
                                                                               etcd_server) -> None:
    fleet = fleet_factory("0", "0")
    tokens = await _serve_until_remote(fleet, nats_server, etcd_server, PROMPT)
    assert tokens == await _aggregated(PROMPT)
    records = fleet.records()
    # Tried once, for the first transfer; that transfer and every later one went over host.
    assert records.count("open-attempt") == 1, records
    assert records[records.index("open-attempt") + 1:] and set(records) == {"open-attempt", "sent host"}, records
    assert "cuda-ipc unavailable" in fleet.log("prefill")
    assert "prefilling locally" not in fleet.log("decode")
