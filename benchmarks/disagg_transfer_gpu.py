"""KV transfer on two GPUs of one host, torch only (no msgspec on the GPU machine): the cuda-ipc
backend's copy (gather, one peer copy, scatter) in one process and across processes through
real CUDA IPC handles, the host backend's data path (gather to pinned host, upload, scatter;
the TCP hop is measured on CPU), and the raw peer-copy ceiling. One JSON line per result.

    PYTHONPATH=. python benchmarks/disagg_transfer_gpu.py
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import torch
import torch.multiprocessing as mp

from kvbm.transfer.torch_ops import buffer_shape, copy_blocks, export_handles, gather_blocks, open_handles, scatter_blocks

# name: (layers, block_size, kv_heads, head_dim, blocks moved); bf16
CASES = {
    "256x2MiB": (32, 16, 8, 128, 256),  # 16 tokens of an 8B Llama: 2 MiB per block
    "4096x32KiB": (2, 16, 4, 64, 4096),  # many small blocks
}


def kv(case: str, device: str, seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor], int]:
    layers, bs, heads, dim, n = CASES[case]
    g = torch.Generator(device=device).manual_seed(seed)
    shape = (2 * n, bs, heads, dim)
    k = [torch.randn(shape, generator=g, device=device).to(torch.bfloat16) for _ in range(layers)]
    v = [torch.randn(shape, generator=g, device=device).to(torch.bfloat16) for _ in range(layers)]
    return k, v, n


def timed(fn: Callable[[], None], repeats: int = 10) -> float:
    fn()
    torch.cuda.synchronize(0)
    torch.cuda.synchronize(1)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize(0)
        torch.cuda.synchronize(1)
        best = min(best, time.perf_counter() - start)
    return best


def report(case: str, path: str, num_bytes: int, seconds: float, ceiling_gbs: float) -> None:
    gbs = num_bytes / seconds / 1e9
    print(json.dumps({"case": case, "path": path, "bytes": num_bytes, "best_ms": round(seconds * 1e3, 3),
                      "gbs": round(gbs, 1), "pct_of_ceiling": round(100 * gbs / ceiling_gbs, 1)}), flush=True)


def ipc_child(handles: bytes, case: str, queue: mp.Queue) -> None:
    """The 'prefill worker' process: opens the decode worker's KV by handle, copies into it."""
    torch.cuda.set_device(0)
    dst = open_handles(handles)
    half = len(dst) // 2
    k, v, n = kv(case, "cuda:0", 1)
    src_ids, dst_ids = list(range(0, 2 * n, 2)), list(range(1, 2 * n, 2))
    seconds = timed(lambda: copy_blocks(k, v, src_ids, dst[:half], dst[half:], dst_ids))
    checksum = float(k[-1][src_ids[7]].float().sum())
    queue.put((seconds, checksum))


def main() -> None:
    assert torch.cuda.device_count() >= 2, "needs two GPUs"
    print(json.dumps({"gpus": [torch.cuda.get_device_name(i) for i in range(2)],
                      "peer_access": torch.cuda.can_device_access_peer(0, 1), "torch": torch.__version__}))
    for case in CASES:
        k0, v0, n = kv(case, "cuda:0", 1)
        k1, v1, _ = kv(case, "cuda:1", 2)
        src_ids, dst_ids = list(range(0, 2 * n, 2)), list(range(1, 2 * n, 2))
        num_bytes = n * k0[0][0].numel() * 2 * len(k0) * 2
        # Ceiling: one contiguous peer copy of the same bytes.
        a = torch.empty(num_bytes, dtype=torch.uint8, device="cuda:0")
        b = torch.empty(num_bytes, dtype=torch.uint8, device="cuda:1")
        report(case, "raw-peer-copy", num_bytes, timed(lambda: b.copy_(a)), 394)
        report(case, "cuda-ipc-backend(1 process)", num_bytes,
               timed(lambda: copy_blocks(k0, v0, src_ids, k1, v1, dst_ids)), 394)
        assert torch.equal(k1[-1][dst_ids[3]].cpu(), k0[-1][src_ids[3]].cpu())
        pinned = torch.empty(buffer_shape(k0, n), dtype=torch.bfloat16, pin_memory=True)

        def host_path() -> None:
            gather_blocks(k0, v0, src_ids, out=pinned)
            torch.cuda.synchronize(0)
            scatter_blocks(k1, v1, dst_ids, pinned)

        report(case, "host-backend-data-path(pinned, no TCP)", num_bytes, timed(host_path), 55)
        del a, b, pinned
        # Across processes with real CUDA IPC handles, as two workers would run.
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        handles = export_handles([*k1, *v1])
        child = ctx.Process(target=ipc_child, args=(handles, case, queue))
        child.start()
        seconds, checksum = queue.get(timeout=300)
        child.join(60)
        report(case, "cuda-ipc-backend(2 processes)", num_bytes, seconds, 394)
        assert abs(float(k1[-1][dst_ids[7]].float().sum()) - checksum) < 1e-3, "IPC copy did not land"
        del k0, v0, k1, v1
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
