"""KV transfer between two GPUs of one host, torch (+ Triton) only, no msgspec: every candidate
for the cuda-ipc backend's copy side by side in one run, each checked for landing the right
bytes, against the raw peer-copy ceiling measured in the same run. One JSON line per result,
then a table.

    PYTHONPATH=. python benchmarks/disagg_transfer_gpu.py [--out results.jsonl]

Candidates: the shipped Triton kernel (`BlockCopier`: one launch, each (block, layer) piece
straight into the peer's block; pushed from the source GPU, or pulled by the target GPU; a few
tile and warp sizes), the old staged path (gather, one peer copy, scatter), a chunked
gather / peer copy / scatter pipeline on three streams, one `copy_` per piece, the driver's
batched copy (cuMemcpyBatchAsync, copy engines, no SMs), one `copy_` per run of consecutive
ids (the contiguous case), the host backend's data path, and the kernel across two processes
over real CUDA IPC handles (as two workers run it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvbm.transfer.torch_ops import (  # noqa: E402
    BlockCopier, _staged_copy, block_runs, buffer_shape, ensure_peer_access, export_handles, gather_blocks,
    open_handles, scatter_blocks,
)

PEER_CEILING_GBS = 394.0  # issue 4's measured peer-copy ceiling; this run measures its own too
HOST_CEILING_GBS = 55.0
# name: (layers, block_size, kv_heads, head_dim, blocks moved, contiguous ids); bf16
CASES = {
    "256x2MiB": (32, 16, 8, 128, 256, False),  # 16 tokens of an 8B Llama: 2 MiB per block
    "256x2MiB-contiguous": (32, 16, 8, 128, 256, True),
    "1024x512KiB": (16, 16, 8, 64, 1024, False),  # the 1.1B Llama of builtin_gpu.py
    "4096x32KiB": (2, 16, 4, 64, 4096, False),  # many small blocks
}
RESULTS: list[dict[str, object]] = []


def kv(case: str, device: str, seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    layers, bs, heads, dim, n, _ = CASES[case]
    g = torch.Generator(device=device).manual_seed(seed)
    shape = (2 * n, bs, heads, dim)
    k = [torch.randn(shape, generator=g, device=device).to(torch.bfloat16) for _ in range(layers)]
    v = [torch.randn(shape, generator=g, device=device).to(torch.bfloat16) for _ in range(layers)]
    return k, v


def ids_for(case: str) -> tuple[list[int], list[int]]:
    n, contiguous = CASES[case][4], CASES[case][5]
    if contiguous:  # first half of the source into the second half of the target
        return list(range(n)), list(range(n, 2 * n))
    # Scattered both sides, never a run: even source blocks into odd target blocks, reversed.
    return list(range(0, 2 * n, 2)), list(range(2 * n - 1, 0, -2))


def sync_all() -> None:
    for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        torch.cuda.synchronize(i)


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """(best, median) seconds, wall clock around fn plus a sync of both GPUs: what a sender
    that announces completion afterwards pays, launch and sync included."""
    fn()
    sync_all()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync_all()
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times)


def report(case: str, path: str, num_bytes: int, seconds: tuple[float, float], ceiling_gbs: float,
           measured_ceiling_gbs: float | None = None, ok: bool | None = None) -> None:
    best, median = seconds
    gbs = num_bytes / best / 1e9
    row = {"case": case, "path": path, "bytes": num_bytes, "best_ms": round(best * 1e3, 3),
           "median_ms": round(median * 1e3, 3), "gbs": round(gbs, 1),
           "gbs_median": round(num_bytes / median / 1e9, 1), "ceiling_gbs": ceiling_gbs,
           "pct_of_ceiling": round(100 * gbs / ceiling_gbs, 1),
           "pct_of_measured_ceiling": round(100 * gbs / measured_ceiling_gbs, 1) if measured_ceiling_gbs else None,
           "landed_ok": ok}
    RESULTS.append(row)
    print(json.dumps(row), flush=True)


def poison(tensors: list[torch.Tensor]) -> None:
    for t in tensors:
        t.fill_(float("nan"))


def landed(src: list[torch.Tensor], src_ids: list[int], dst: list[torch.Tensor], dst_ids: list[int]) -> bool:
    """Every target block equals its source block (compared on the target's device)."""
    d = dst[0].device
    si = torch.tensor(src_ids, device=src[0].device)
    di = torch.tensor(dst_ids, device=d)
    return all(torch.equal(b.index_select(0, di), a.index_select(0, si).to(d)) for a, b in zip(src, dst))


def pipelined(k0: list[torch.Tensor], v0: list[torch.Tensor], src_ids: list[int], k1: list[torch.Tensor],
              v1: list[torch.Tensor], dst_ids: list[int], chunks: int,
              bufs: tuple[list[torch.Tensor], list[torch.Tensor]], streams: tuple[torch.cuda.Stream, ...]) -> None:
    """Gather chunk i+1 on the source while chunk i crosses NVLink and chunk i-1 is scattered."""
    g0, c0, c1, s1 = streams
    n = len(src_ids)
    step = n // chunks
    for c, lo in enumerate(range(0, n, step)):
        ids_s, ids_d = src_ids[lo:lo + step], dst_ids[lo:lo + step]
        b0, b1 = bufs[0][c], bufs[1][c]
        with torch.cuda.stream(g0):
            gather_blocks(k0, v0, ids_s, out=b0)
            gathered = g0.record_event()
        c0.wait_event(gathered)
        with torch.cuda.stream(c0), torch.cuda.stream(c1):
            b1.copy_(b0, non_blocking=True)
            copied = c1.record_event()
        s1.wait_event(copied)
        with torch.cuda.stream(s1):
            scatter_blocks(k1, v1, ids_d, b1)


def batched_memcpy(pieces: list[tuple[int, int, int]], stream: torch.cuda.Stream, src_dev: int, dst_dev: int) -> None:
    """cuMemcpyBatchAsync: one driver call for every piece, done by the copy engines."""
    from cuda.bindings import driver as cu

    attr = cu.CUmemcpyAttributes()
    attr.srcAccessOrder = cu.CUmemcpySrcAccessOrder.CU_MEMCPY_SRC_ACCESS_ORDER_STREAM
    src_loc, dst_loc = cu.CUmemLocation(), cu.CUmemLocation()
    src_loc.type = dst_loc.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
    src_loc.id, dst_loc.id = src_dev, dst_dev
    attr.srcLocHint, attr.dstLocHint = src_loc, dst_loc
    dsts = [cu.CUdeviceptr(d) for _, d, _ in pieces]
    srcs = [cu.CUdeviceptr(s) for s, _, _ in pieces]
    sizes = [n for _, _, n in pieces]
    result = cu.cuMemcpyBatchAsync(dsts, srcs, sizes, len(pieces), [attr], [0], 1, cu.CUstream(stream.cuda_stream))
    err = result[0] if isinstance(result, tuple) else result
    if err != cu.CUresult.CUDA_SUCCESS:
        raise RuntimeError(f"cuMemcpyBatchAsync: {err}")


def split_copy(push: BlockCopier, pull: BlockCopier, src_ids: list[int], dst_ids: list[int], pull_share: float) -> None:
    """The source GPU pushes part of the blocks while the target GPU pulls the rest."""
    cut = int(len(src_ids) * pull_share)
    pull.copy(src_ids[:cut], dst_ids[:cut])
    push.copy(src_ids[cut:], dst_ids[cut:])
    pull.synchronize()
    push.synchronize()


def ipc_child(handles: bytes, case: str, mode: str, repeats: int, queue: mp.Queue) -> None:
    """The 'prefill worker' process: opens the decode worker's KV by handle and copies into it,
    pushing from its own GPU, pulling with the target GPU, or both."""
    try:
        torch.cuda.set_device(0)
        # Peer access first: a mapping of another process's memory is made for the devices
        # that can reach its GPU when it is opened.
        ensure_peer_access(torch.device("cuda:0"), torch.device("cuda:1"))
        ensure_peer_access(torch.device("cuda:1"), torch.device("cuda:0"))
        dst = open_handles(handles)
        half = len(dst) // 2
        k, v = kv(case, "cuda:0", 1)
        src_ids, dst_ids = ids_for(case)
        push = BlockCopier(k, v, dst[:half], dst[half:])
        pull = BlockCopier(k, v, dst[:half], dst[half:], launch_device=torch.device("cuda:1"))

        def run() -> None:
            if mode == "split":
                split_copy(push, pull, src_ids, dst_ids, 0.5)
            else:
                copier = push if mode == "push" else pull
                copier.copy(src_ids, dst_ids)
                copier.synchronize()

        seconds = timed(run, repeats)
        si = torch.tensor(src_ids, device="cuda:0")
        sums = [float(t.index_select(0, si).float().sum()) for t in (*k, *v)]
        queue.put((seconds, sums, ""))
    except Exception as e:  # noqa: BLE001 - the parent reports it and goes on
        queue.put(((float("nan"), float("nan")), [], repr(e)))


def attempt(case: str, path: str, fn: Callable[[], None]) -> None:
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - one failed candidate must not end the run
        print(json.dumps({"case": case, "path": path, "error": repr(e)[:400]}), flush=True)
        RESULTS.append({"case": case, "path": path, "error": repr(e)[:400]})
        sync_all()


def run_case(case: str, args: argparse.Namespace) -> None:
    k0, v0 = kv(case, "cuda:0", 1)
    k1, v1 = kv(case, "cuda:1", 2)
    src_ids, dst_ids = ids_for(case)
    n = len(src_ids)
    src, dst = [*k0, *v0], [*k1, *v1]
    piece_bytes = k0[0][0].numel() * k0[0].element_size()
    num_bytes = n * piece_bytes * len(src)
    rep = args.repeats

    # The ceiling: one contiguous peer copy of the same bytes (copy engines over NVLink).
    a = torch.empty(num_bytes, dtype=torch.uint8, device="cuda:0")
    b = torch.empty(num_bytes, dtype=torch.uint8, device="cuda:1")
    ceiling = timed(lambda: b.copy_(a), rep)
    ceiling_gbs = num_bytes / ceiling[0] / 1e9
    report(case, "raw contiguous peer copy (ceiling)", num_bytes, ceiling, PEER_CEILING_GBS, ceiling_gbs)
    del a, b

    def check(path: str, seconds: tuple[float, float]) -> None:
        report(case, path, num_bytes, seconds, PEER_CEILING_GBS, ceiling_gbs, landed(src, src_ids, dst, dst_ids))

    def kernel(launch: str, block_words: int, warps: int) -> None:
        poison(dst)
        copier = BlockCopier(k0, v0, k1, v1, launch_device=torch.device(launch), block_words=block_words,
                             num_warps=warps)

        def run() -> None:
            copier.copy(src_ids, dst_ids)
            copier.synchronize()

        mode = "push" if launch == "cuda:0" else "pull"
        check(f"triton kernel {mode} (tile {block_words * 4 // 1024} KiB, {warps} warps)", timed(run, rep))

    for launch, block_words, warps in args.kernel_configs:
        attempt(case, f"kernel {launch} {block_words} {warps}", lambda: kernel(launch, block_words, warps))

    def kernel_only() -> None:
        """The push kernel alone, CUDA events on the source GPU (no id upload, launch or sync)."""
        poison(dst)
        copier = BlockCopier(k0, v0, k1, v1)
        copier.copy(src_ids, dst_ids)
        times = []
        for _ in range(rep):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            copier.copy(src_ids, dst_ids)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        check("triton kernel push, kernel time only (CUDA events, ids upload inside)",
              (min(times), statistics.median(times)))

    attempt(case, "kernel only", kernel_only)

    def split(share: float) -> None:
        poison(dst)
        push = BlockCopier(k0, v0, k1, v1)
        pull = BlockCopier(k0, v0, k1, v1, launch_device=torch.device("cuda:1"))
        check(f"triton kernels: source pushes {100 - share * 100:.0f}%, target pulls {share * 100:.0f}%",
              timed(lambda: split_copy(push, pull, src_ids, dst_ids, share), rep))

    def staged() -> None:
        poison(dst)
        check("staged: gather, 1 peer copy, scatter (old)",
              timed(lambda: _staged_copy(k0, v0, src_ids, k1, v1, dst_ids), rep))

    def two_processes(mode: str) -> None:
        poison(dst)
        torch.cuda.synchronize(1)
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        child = ctx.Process(target=ipc_child, args=(export_handles(dst), case, mode, rep, queue))
        child.start()
        seconds, sums, error = queue.get(timeout=240)
        child.join(60)
        if error:
            raise RuntimeError(error)
        di = torch.tensor(dst_ids, device="cuda:1")
        got = [float(t.index_select(0, di).float().sum()) for t in dst]
        ok = all(abs(x - y) <= 1e-3 * max(1.0, abs(y)) for x, y in zip(got, sums))
        report(case, f"triton kernel {mode}, 2 processes over CUDA IPC handles", num_bytes, seconds,
               PEER_CEILING_GBS, ceiling_gbs, ok)

    if args.final:  # only the shipped paths, the old one and the ceiling, more repeats
        attempt(case, "staged", staged)
        if not CASES[case][5]:
            attempt(case, "2 processes pull", lambda: two_processes("pull"))
        return
    for share in (0.5, 0.35, 0.2):
        attempt(case, f"split {share}", lambda: split(share))

    attempt(case, "staged", staged)

    def pipeline(chunks: int) -> None:
        poison(dst)
        assert n % chunks == 0
        step = n // chunks
        shape = buffer_shape(k0, step)
        bufs = ([torch.empty(shape, dtype=k0[0].dtype, device="cuda:0") for _ in range(chunks)],
                [torch.empty(shape, dtype=k0[0].dtype, device="cuda:1") for _ in range(chunks)])
        streams = (torch.cuda.Stream("cuda:0"), torch.cuda.Stream("cuda:0"), torch.cuda.Stream("cuda:1"),
                   torch.cuda.Stream("cuda:1"))
        check(f"chunked pipeline, {chunks} chunks of {step * piece_bytes * len(src) >> 20} MiB",
              timed(lambda: pipelined(k0, v0, src_ids, k1, v1, dst_ids, chunks, bufs, streams), rep))

    for chunks in (4, 8):
        attempt(case, f"pipeline {chunks}", lambda: pipeline(chunks))

    runs = block_runs(src_ids, dst_ids)
    if len(runs) * len(src) <= 4096:
        def run_copies() -> None:
            poison(dst)

            def go() -> None:
                with torch.cuda.device(1):
                    for s_t, d_t in zip(src, dst):
                        for s, d, m in runs:
                            d_t[d:d + m].copy_(s_t[s:s + m], non_blocking=True)

            check(f"copy_ per run of consecutive ids ({len(runs) * len(src)} copies)", timed(go, rep))

        attempt(case, "runs", run_copies)

    pieces = [(s_t[s].data_ptr(), d_t[d].data_ptr(), piece_bytes)
              for s_t, d_t in zip(src, dst) for s, d in zip(src_ids, dst_ids)]

    def per_piece() -> None:
        poison(dst)

        def go() -> None:
            for s_t, d_t in zip(src, dst):
                for s, d in zip(src_ids, dst_ids):
                    d_t[d].copy_(s_t[s], non_blocking=True)

        check(f"copy_ per piece ({len(pieces)} peer copies)", timed(go, 2))

    attempt(case, "per-piece", per_piece)

    def batched() -> None:
        poison(dst)
        stream = torch.cuda.Stream("cuda:0")  # the batch API refuses the legacy default stream
        check(f"cuMemcpyBatchAsync ({len(pieces)} copies, copy engines)",
              timed(lambda: batched_memcpy(pieces, stream, 0, 1), rep))

    attempt(case, "batched", batched)

    if not CASES[case][5]:
        def host_path() -> None:
            pinned = torch.empty(buffer_shape(k0, n), dtype=torch.bfloat16, pin_memory=True)

            def go() -> None:
                gather_blocks(k0, v0, src_ids, out=pinned)
                torch.cuda.synchronize(0)
                scatter_blocks(k1, v1, dst_ids, pinned)

            poison(dst)
            seconds = timed(go, max(3, rep // 4))
            ok = landed(src, src_ids, dst, dst_ids)
            report(case, "host backend data path (pinned, no TCP)", num_bytes, seconds, HOST_CEILING_GBS, None, ok)

        attempt(case, "host", host_path)

        for mode in ("push", "pull", "split"):
            attempt(case, f"2 processes {mode}", lambda: two_processes(mode))
    del k0, v0, k1, v1, src, dst
    torch.cuda.empty_cache()


def table() -> str:
    lines = ["| case | path | GB/s best | GB/s median | % of ceiling | % of this run's peer copy | landed |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in RESULTS:
        if "error" in r:
            lines.append(f"| {r['case']} | {r['path']} | error: {r['error']} | | | | |")
        else:
            lines.append(f"| {r['case']} | {r['path']} | {r['gbs']} | {r['gbs_median']} | "
                         f"{r['pct_of_ceiling']}% of {r['ceiling_gbs']:.0f} | {r['pct_of_measured_ceiling']} | "
                         f"{r['landed_ok']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", nargs="*", default=list(CASES))
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default="")
    parser.add_argument("--final", action="store_true", help="the shipped push/pull kernel, the old staged "
                        "path and two processes only")
    args = parser.parse_args()
    # (launching GPU, tile in 4-byte words, warps); the first is BlockCopier's default
    args.kernel_configs = [("cuda:0", 2048, 4), ("cuda:0", 1024, 4), ("cuda:0", 1024, 2), ("cuda:0", 4096, 8),
                           ("cuda:1", 2048, 4)]
    if args.final:
        args.kernel_configs = [("cuda:0", 2048, 4), ("cuda:1", 2048, 4)]
    assert torch.cuda.device_count() >= 2, "needs two GPUs"
    torch.cuda.set_device(0)
    print(json.dumps({"gpus": [torch.cuda.get_device_name(i) for i in range(2)],
                      "peer_access": torch.cuda.can_device_access_peer(0, 1), "torch": torch.__version__}), flush=True)
    for case in args.cases:
        run_case(case, args)
    print(table())
    if args.out:
        Path(args.out).write_text("\n".join(json.dumps(r) for r in RESULTS) + "\n")


if __name__ == "__main__":
    main()
