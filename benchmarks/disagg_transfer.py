"""KV transfer throughput over the host backend (TCP on loopback, CPU tensors): realistic KV
(256 blocks of 2 MiB: 16 tokens of an 8B Llama in bf16) and many small blocks (4096 of 32 KiB).
Prints one JSON line per case: GB/s end to end (gather, stream, scatter, notification)."""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import torch

from dynamo.wire import KvLayoutSpec
from kvbm.transfer.agent import KvTransferAgent
from kvbm.transfer.host import HostBackend
from kvbm.transfer.layout import KvMemory, block_bytes

CASES = {
    # 32 layers x K,V x 16 tokens x 8 heads x 128 dims x 2 bytes = 2 MiB per block
    "256x2MiB": (KvLayoutSpec(32, 16, 8, 128, "bfloat16"), 256),
    # 2 layers x K,V x 16 tokens x 4 heads x 64 dims x 2 bytes = 32 KiB per block
    "4096x32KiB": (KvLayoutSpec(2, 16, 4, 64, "bfloat16"), 4096),
}


def memory(layout: KvLayoutSpec, num_blocks: int) -> KvMemory:
    shape = (num_blocks, layout.block_size_tokens, layout.num_kv_heads, layout.head_dim)
    k = [torch.randn(shape).to(torch.bfloat16) for _ in range(layout.num_layers)]
    v = [torch.randn(shape).to(torch.bfloat16) for _ in range(layout.num_layers)]
    return KvMemory(k, v, layout, asyncio.to_thread)


async def run_case(name: str, repeats: int) -> dict[str, object]:
    layout, n = CASES[name]
    total_blocks = n * 2
    async with KvTransferAgent(layout, memory(layout, total_blocks), [HostBackend()]) as src, \
            KvTransferAgent(layout, memory(layout, total_blocks), [HostBackend()]) as dst:
        src_ids = list(range(0, total_blocks, 2))  # scattered: every other block
        dst_ids = list(range(1, total_blocks, 2))
        times = []
        for i in range(repeats + 1):
            landed = dst.expect(f"t{i}", dst_ids)
            start = time.perf_counter()
            await src.send(dst.info, f"t{i}", src_ids, dst_ids)
            await landed
            if i:  # the first run warms up allocations
                times.append(time.perf_counter() - start)
        assert torch.equal(dst.memory.k[-1][dst_ids[5]], src.memory.k[-1][src_ids[5]])  # type: ignore[union-attr]
    size = n * block_bytes(layout)
    best, median = min(times), sorted(times)[len(times) // 2]
    return {"case": name, "backend": "host-tcp-loopback", "bytes": size, "best_s": round(best, 5),
            "median_s": round(median, 5), "best_gbs": round(size / best / 1e9, 3),
            "median_gbs": round(size / median / 1e9, 3), "torch_threads": torch.get_num_threads()}


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    for name in CASES:
        print(json.dumps(await run_case(name, args.repeats)), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
