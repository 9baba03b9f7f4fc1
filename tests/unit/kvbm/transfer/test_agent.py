"""KvTransferAgent over the host backend on CPU: blocks land bit-exact in the chosen target
blocks with a notification, layouts are negotiated with a clear error, failures reach the
waiting side, the simulated backend takes bytes / bandwidth, and buffers are freed."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import TypeVar

import pytest

torch = pytest.importorskip("torch")

from dynamo.wire import KvLayoutSpec  # noqa: E402
from kvbm.transfer.agent import KvTransferAgent, TransferFailed, connect_to_agent  # noqa: E402
from kvbm.transfer.factory import make_agent  # noqa: E402
from kvbm.transfer.host import HostBackend  # noqa: E402
from kvbm.transfer.layout import KvLayoutMismatch, KvMemory, block_bytes, check_compatible  # noqa: E402

T = TypeVar("T")
LAYOUT = KvLayoutSpec(num_layers=3, block_size_tokens=4, num_kv_heads=2, head_dim=8, dtype="float32")


async def run_inline(fn: Callable[[], T]) -> T:
    return await asyncio.to_thread(fn)


def memory(seed: int, num_blocks: int = 16, layout: KvLayoutSpec = LAYOUT) -> KvMemory:
    g = torch.Generator().manual_seed(seed)
    shape = (num_blocks, layout.block_size_tokens, layout.num_kv_heads, layout.head_dim)
    k = [torch.randn(shape, generator=g) for _ in range(layout.num_layers)]
    v = [torch.randn(shape, generator=g) for _ in range(layout.num_layers)]
    return KvMemory(k, v, layout, run_inline)


async def test_host_backend_moves_blocks_into_the_expected_slots() -> None:
    src_mem, dst_mem = memory(1), memory(2)
    before = [t.clone() for t in dst_mem.k]
    async with KvTransferAgent(LAYOUT, src_mem, [HostBackend()]) as src, \
            KvTransferAgent(LAYOUT, dst_mem, [HostBackend()], chunk_bytes=1000) as dst:
        src_ids, dst_ids = [3, 0, 7, 12], [9, 1, 2, 15]
        landed = dst.expect("t1", dst_ids)
        num_bytes, backend = await src.send(dst.info, "t1", src_ids, dst_ids)
        assert (num_bytes, backend) == (4 * block_bytes(LAYOUT), "host")
        assert await asyncio.wait_for(landed, 5) == num_bytes
        for layer in range(LAYOUT.num_layers):
            for s, d in zip(src_ids, dst_ids):
                assert torch.equal(dst_mem.k[layer][d], src_mem.k[layer][s])
                assert torch.equal(dst_mem.v[layer][d], src_mem.v[layer][s])
            untouched = [b for b in range(16) if b not in dst_ids]
            assert torch.equal(dst_mem.k[layer][untouched], before[layer][untouched])
        assert src.buffer_bytes == 0 and dst.buffer_bytes == 0


async def test_agent_without_a_host_listens_everywhere_and_advertises_its_route_address() -> None:
    """The default for workers: peers in other containers or hosts reach the advertised
    address (not loopback, unless the host has no route at all)."""
    from dynamo.runtime.tcp_plane import default_advertise_host

    src_mem, dst_mem = memory(1), memory(2)
    async with KvTransferAgent(LAYOUT, src_mem, [HostBackend()], host=None) as src, \
            KvTransferAgent(LAYOUT, dst_mem, [HostBackend()], host=None) as dst:
        assert dst.bind_host == "0.0.0.0"
        assert dst.info.address == f"{default_advertise_host()}:{dst.port}"
        landed = dst.expect("t1", [4])
        await src.send(dst.info, "t1", [2], [4])
        await asyncio.wait_for(landed, 5)
        assert torch.equal(dst_mem.k[0][4], src_mem.k[0][2])


@pytest.mark.skipif(not hasattr(socket, "TCP_USER_TIMEOUT"), reason="Linux socket options")
async def test_transfer_connections_carry_the_dead_peer_bound_on_both_ends() -> None:
    """A peer gone mid-transfer (host lost, link cut) fails the transfer within DEAD_PEER_S on
    both sides, as on the request plane, not after the kernel's minutes of retransmissions."""
    from dynamo.runtime.tcp_plane import DEAD_PEER_S

    def bounded(sock: socket.socket) -> bool:
        return (sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
                and sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == DEAD_PEER_S * 1000)

    async with KvTransferAgent(LAYOUT, memory(2), [HostBackend()]) as dst:
        _, writer = await connect_to_agent(dst.info.address)
        try:
            assert bounded(writer.get_extra_info("socket"))
            for _ in range(500):  # the agent's accept callback runs on this loop
                if dst._conns:
                    break
                await asyncio.sleep(0.01)
            (accepted,) = dst._conns.values()
            assert bounded(accepted.get_extra_info("socket"))
        finally:
            writer.close()


async def test_a_peer_that_drops_the_connect_fails_the_send_at_the_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    """A peer behind a cut link drops the SYNs; the send fails at CONNECT_TIMEOUT_S, not after
    the kernel's two minutes of retries. The dropping peer is a real listener whose accept
    queue is full (Linux drops a SYN then), with no accept ever called."""
    import msgspec

    from kvbm.transfer import agent as agent_mod

    monkeypatch.setattr(agent_mod, "CONNECT_TIMEOUT_S", 0.3)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    address = listener.getsockname()
    fillers: list[socket.socket] = []
    try:
        while len(fillers) < 8:  # backlog 0 admits one; the next SYN is dropped
            filler = socket.socket()
            filler.settimeout(1.0)
            fillers.append(filler)
            try:
                filler.connect(address)
            except (TimeoutError, ConnectionRefusedError):  # dropped; or reset where the host aborts on overflow
                break
        else:
            pytest.fail("the listener's accept queue never filled")
        async with KvTransferAgent(LAYOUT, memory(1), [HostBackend()]) as src, \
                KvTransferAgent(LAYOUT, memory(2), [HostBackend()]) as dst:
            silent = msgspec.structs.replace(dst.info, address=f"127.0.0.1:{address[1]}")
            with pytest.raises(TransferFailed, match="cannot reach"):
                await asyncio.wait_for(src.send(silent, "t", [0], [1]), 30)
    finally:
        for sock in (*fillers, listener):
            sock.close()


def test_layout_mismatch_is_a_clear_error() -> None:
    other = KvLayoutSpec(num_layers=3, block_size_tokens=16, num_kv_heads=2, head_dim=8, dtype="bfloat16", tp_rank=1, tp_size=2)
    with pytest.raises(KvLayoutMismatch) as info:
        check_compatible(LAYOUT, other)
    message = str(info.value)
    assert "block_size_tokens: local 4, peer 16" in message
    assert "dtype: local float32, peer bfloat16" in message
    assert "tp_rank" in message and "--block-size" in message


async def test_send_refuses_a_peer_with_another_layout() -> None:
    other = KvLayoutSpec(num_layers=2, block_size_tokens=4, num_kv_heads=2, head_dim=8, dtype="float32")
    async with KvTransferAgent(LAYOUT, memory(1), [HostBackend()]) as src, \
            KvTransferAgent(other, memory(2, layout=other), [HostBackend()]) as dst:
        with pytest.raises(KvLayoutMismatch, match="num_layers: local 3, peer 2"):
            await src.send(dst.info, "t", [0], [0])


async def test_unexpected_or_mis_sized_transfers_fail_the_waiter_not_the_agent() -> None:
    async with KvTransferAgent(LAYOUT, memory(1), [HostBackend()]) as src, \
            KvTransferAgent(LAYOUT, memory(2), [HostBackend()]) as dst:
        landed = dst.expect("t", [1, 2])
        await src.send(dst.info, "t", [0], [1])  # one block where two are expected
        with pytest.raises(TransferFailed, match="1 blocks sent, 2 expected"):
            await asyncio.wait_for(landed, 5)
        # Given up: a late sender is refused, the agent keeps working.
        dst.forget("t")
        await src.send(dst.info, "t", [0, 1], [1, 2])
        ok = dst.expect("t2", [4])
        await src.send(dst.info, "t2", [5], [4])
        assert await asyncio.wait_for(ok, 5) == block_bytes(LAYOUT)
        assert dst.buffer_bytes == 0


async def test_closing_the_receiver_fails_pending_transfers() -> None:
    dst = KvTransferAgent(LAYOUT, memory(2), [HostBackend()])
    await dst.start()
    landed = dst.expect("t", [1])
    await dst.close()
    with pytest.raises(TransferFailed, match="closed"):
        await landed


async def test_simulated_link_takes_bytes_over_bandwidth() -> None:
    # 1 MB per block at 100 MB/s, sped up 10x: 4 blocks take 4 ms.
    layout = KvLayoutSpec(num_layers=1, block_size_tokens=1, num_kv_heads=1, head_dim=125_000, dtype="float32")
    src = await make_agent("auto", layout, None, simulated_link_bytes_per_s=100e6, speedup_ratio=10)
    dst = await make_agent("auto", layout, None, simulated_link_bytes_per_s=100e6, speedup_ratio=10)
    try:
        landed = dst.expect("t", [0, 1, 2, 3])
        loop = asyncio.get_running_loop()
        start = loop.time()
        _, backend = await src.send(dst.info, "t", [0, 1, 2, 3], [0, 1, 2, 3])
        assert await landed == 4 * block_bytes(layout) == 4_000_000
        assert backend == "simulated" and loop.time() - start >= 0.004
    finally:
        await src.close()
        await dst.close()


def test_named_backends_say_what_they_need() -> None:
    from kvbm.transfer.factory import make_backends
    from kvbm.transfer.nixl import nixl_available

    with pytest.raises(ValueError, match="needs the KV cache on a GPU"):
        make_backends("cuda-ipc", memory(1))
    assert [b.name for b in make_backends("auto", memory(1))] == ["same-process", "host"]
    if not nixl_available():
        with pytest.raises(ImportError, match="pip install nixl"):
            make_backends("nixl", memory(1))
