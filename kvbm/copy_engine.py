"""Batched block copies between the engine's paged KV cache (per layer K and V of shape
[num_blocks, ...]) and host memory. On CUDA they run on a side stream: the next forward pass
waits only for what it needs (onboarded blocks written, evicted blocks read), while device-to-
host copies of offloaded blocks finish in the background.

Small batches are what lose bandwidth: 2 x layers index kernels per batch, and one device-to-
host copy per run of slots per step. So offloaded blocks are gathered, every layer in one
launch where Triton is present (kvbm.transfer.torch_ops' block-copy kernel, pointed at rows
of a device staging ring), into the ring, and their device-to-host copies wait there until
`flush_blocks` are gathered or the next step boundary (begin()), then go in as few, long copies
as the host slots allow. Onboards come up through a second staging buffer and one scatter
launch. Imports only torch (and Triton when present)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from kvbm.transfer.torch_ops import BlockCopier as FusedCopier
from kvbm.transfer.torch_ops import block_runs, triton_available

# Each staging buffer (offload ring, onboard buffer) holds up to this many bytes of blocks on
# the device, allocated on first use: batches beyond it take the per-layer path, where the
# fixed costs no longer matter.
STAGING_BYTES = 128 << 20
STAGING_MAX_ROWS = 1024


def contiguous_runs(slots: Sequence[int]) -> list[tuple[int, int, int]]:
    """(first position, first slot, length) of each run of consecutive slots, in order."""
    runs: list[tuple[int, int, int]] = []
    for i, slot in enumerate(slots):
        if runs and runs[-1][1] + runs[-1][2] == slot:
            first, start, n = runs[-1]
            runs[-1] = (first, start, n + 1)
        else:
            runs.append((i, slot, 1))
    return runs


class BlockCopier:
    """Copies whole blocks, all layers at once, in the layout of kvbm/layout.py.

    `k` and `v`: the cache's per-layer K and V tensors of shape [num_blocks, ...]; a block's
    host row is their pieces K0, V0, K1, V1, ... Or `v` empty and `k` the tensors whose pieces
    make the row, in order (vLLM backends keep a layer's K and V at one block index). `host`:
    [slots, pieces, elements of a piece]."""

    def __init__(self, k: Sequence[torch.Tensor], v: Sequence[torch.Tensor], host: torch.Tensor | None,
                 flush_blocks: int = 1, fused: bool | None = None, staging_bytes: int = STAGING_BYTES,
                 ring: bool | None = None) -> None:
        """`ring`: make the offload ring (and compile its kernel) now; by default where there
        is a host tier (gather_staged() uses it too: set it for a disk tier without one)."""
        self.layers = [t for pair in zip(k, v) for t in pair] if v else list(k)
        first = self.layers[0]
        self.device = first.device
        self.num_blocks = first.shape[0]
        self.elements_per_layer = first[0].numel()
        self.dtype = first.dtype
        self.host = host
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self._ready: torch.cuda.Event | None = None  # forward may run: reads/writes of blocks done
        # Offloads gathered into the ring whose device-to-host copies are not queued yet,
        # as (ring row, host slot); flushed at `flush_blocks` or the next begin().
        self.flush_blocks = max(1, flush_blocks)
        self._pending: list[tuple[int, int]] = []
        self._pending_since_step = False  # some were gathered before the current step
        self.flushes = 0  # device-to-host flushes queued (tests, benchmarks)
        row_bytes = len(self.layers) * self.elements_per_layer * first.element_size()
        self.staging_rows = max(1, min(STAGING_MAX_ROWS, staging_bytes // max(1, row_bytes)))
        self._ring: torch.Tensor | None = None
        self._ring_next = 0
        self._inbuf: torch.Tensor | None = None
        self._ring_copier: FusedCopier | None = None
        self._in_copier: FusedCopier | None = None
        if fused is None:
            fused = self.cuda and triton_available() and all(t.is_contiguous() for t in self.layers)
        self.fused = fused
        self._timings: list[tuple[Any, Any, int]] = []  # (start, end event or seconds, bytes)
        if self.fused and self.cuda:
            # The staging buffers and the copy kernels now, not at the first offload and
            # onboard: compiling a kernel there stalled the model thread mid-serving (py-spy
            # on an H100, benchmarks/RESULTS.md "Where G3's cost is").
            if ring or (ring is None and self.host is not None):
                self._ring = self._staging()
                self._fused_ring().warm()
            self._inbuf = self._staging()
            self._fused_in().warm()

    def _staging(self) -> torch.Tensor:
        return torch.empty((self.staging_rows, len(self.layers), self.elements_per_layer),
                           dtype=self.dtype, device=self.device)

    # ------------------------------------------------------------------------------ batches

    def begin(self) -> None:
        """Start a batch (a step boundary): side-stream work waits for the forward pass that
        wrote the blocks, and offloads gathered at an earlier step have their device-to-host
        copies queued now at the latest (with this step's, when they come in time)."""
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
        self._pending_since_step = bool(self._pending)

    def end(self) -> None:
        """End a batch: the next forward pass waits for its device-side work only. Offloads
        left from an earlier step get their device-to-host copies now (the bound on their
        wait: one step)."""
        if self._pending_since_step:
            self.flush_offloads()
        if self.stream is not None and self._ready is not None:
            torch.cuda.current_stream(self.device).wait_event(self._ready)
            self._ready = None

    def has_pending_offloads(self) -> bool:
        """Gathered blocks wait for their device-to-host copies (the next step must flush)."""
        return bool(self._pending)

    def drain(self) -> None:
        """Block until host memory holds every offloaded block (tests, benchmarks; never the
        engine's path: the disk thread, which reads host slots, waits for a fence() event)."""
        self.flush_offloads()
        self.synchronize()

    def synchronize(self) -> None:
        if self.stream is not None:
            self.stream.synchronize()

    # ------------------------------------------------------------------------------- copies

    def gather(self, block_ids: Sequence[int]) -> torch.Tensor:
        """Blocks of the device cache as a [n, 2L, E] tensor on the device (side stream)."""
        with self._on_stream():
            # Allocated on the side stream, so the caching allocator orders its reuse after
            # the copies queued there.
            idx = self._ids(block_ids)
            out = torch.empty((len(block_ids), len(self.layers), self.elements_per_layer),
                              dtype=self.dtype, device=self.device)
            for i, layer in enumerate(self.layers):
                out[:, i].copy_(layer.view(self.num_blocks, -1).index_select(0, idx))
        return out

    def gather_staged(self, block_ids: Sequence[int]) -> torch.Tensor:
        """gather(), in one launch of the block-copy kernel into rows of the offload ring where
        they fit (a per-layer gather is two launches a layer: ~2 ms of the model thread for a
        1.1B model's disk-bound offloads, in the H100 profile of issue 21). The result may be
        a view of ring rows, good until the next gather into the ring: queue its copy out
        first (stream order then keeps the rows until it has read them)."""
        n = len(block_ids)
        if not self.fused or n == 0 or n > self.staging_rows:
            return self.gather(block_ids)
        start = self._gather_to_ring(block_ids)
        assert self._ring is not None
        return self._ring[start : start + n]

    def _gather_to_ring(self, block_ids: Sequence[int]) -> int:
        """Gather the blocks into consecutive ring rows (one kernel launch where fused), on
        the side stream; returns the first row."""
        n = len(block_ids)
        start = self._ring_rows(n)
        ring = self._ring
        assert ring is not None
        with self._on_stream():
            if self.fused:
                self._fused_ring().copy(list(block_ids), [(start + i) * len(self.layers) for i in range(n)])
            else:
                self._gather_into(block_ids, ring[start : start + n])
        return start

    def scatter(self, block_ids: Sequence[int], data: torch.Tensor) -> None:
        """Write a [n, 2L, E] device tensor into the cache's blocks."""
        with self._on_stream():
            idx = self._ids(block_ids)
            for i, layer in enumerate(self.layers):
                layer.view(self.num_blocks, -1).index_copy_(0, idx, data[:, i])

    def offload_to_host(self, block_ids: Sequence[int], slots: Sequence[int]) -> None:
        """Device blocks -> host slots. On CUDA the device-side gather is marked ready before
        the slow device-to-host copy is queued, so only the gather delays the next step; that
        copy may wait for more blocks until the next step boundary (see flush_blocks)."""
        self.land_in_host(self.gather_for_host(block_ids, slots))

    def gather_for_host(self, block_ids: Sequence[int], slots: Sequence[int]) -> tuple[torch.Tensor | None, list[int]]:
        """offload_to_host's first half: the device-side gather (marked ready: the blocks may
        be reused after it), for land_in_host() to copy into the slots, possibly after other
        work queued meanwhile (onboards the next forward pass waits for). A batch the
        staging ring holds goes there (returned tensor None); a larger one to its own buffer."""
        assert self.host is not None
        order = sorted(range(len(slots)), key=lambda i: slots[i])
        block_ids = [block_ids[i] for i in order]
        slots = [slots[i] for i in order]
        n = len(block_ids)
        if n == 0 or n > self.staging_rows:
            staged = self.gather(block_ids) if n else None
            self._mark_ready()
            return staged, slots
        start = self._gather_to_ring(block_ids)
        self._mark_ready()
        self._pending.extend(zip(range(start, start + n), slots))
        return None, []

    def land_in_host(self, gathered: tuple[torch.Tensor | None, list[int]]) -> None:
        """offload_to_host's second half: the device-to-host copy into the slots (in the
        background on CUDA: an event recorded by fence() afterwards follows it). Blocks staged
        in the ring are copied once `flush_blocks` wait there or, at the latest, at the next
        step's flush."""
        assert self.host is not None
        staged, slots = gathered
        if staged is not None:
            self._copy_to_host(staged, list(range(len(slots))), slots)
        if len(self._pending) >= self.flush_blocks or self._pending_since_step:
            self.flush_offloads()

    def flush_offloads(self, slots: Sequence[int] | None = None) -> None:
        """Queue the device-to-host copies of the blocks waiting in the ring: all of them, or
        only if one of them goes to one of `slots` (about to be read)."""
        pending = self._pending
        if not pending:
            return
        if slots is not None:
            wanted = set(slots)
            if not any(slot in wanted for _, slot in pending):
                return
        assert self._ring is not None
        self._pending, self._pending_since_step = [], False
        rows = [row for row, _ in pending]
        self._copy_to_host(self._ring, rows, [slot for _, slot in pending])
        self.flushes += 1

    def _copy_to_host(self, src: torch.Tensor, rows: list[int], slots: list[int]) -> None:
        """Rows of a staging tensor -> host slots, one copy per run in which both advance by
        one."""
        assert self.host is not None
        order = sorted(range(len(slots)), key=lambda i: slots[i])
        runs = block_runs([rows[i] for i in order], [slots[i] for i in order])
        if self.stream is None:
            for row, slot, n in runs:
                self.host[slot : slot + n].copy_(src[row : row + n])
            return
        with torch.cuda.stream(self.stream):
            for row, slot, n in runs:
                self.host[slot : slot + n].copy_(src[row : row + n], non_blocking=True)

    def _ring_rows(self, n: int) -> int:
        """First of `n` consecutive ring rows for a gather. Rows are reused in ring order, so
        a gather waits (stream order) only behind device-to-host copies a ring's length
        old; a row still waiting for its copy has it queued first."""
        if self._ring is None:
            self._ring = self._staging()
        start = self._ring_next if self._ring_next + n <= self.staging_rows else 0
        if any(start <= row < start + n for row, _ in self._pending):
            self.flush_offloads()
        self._ring_next = start + n
        return start

    def _fused_ring(self) -> FusedCopier:
        """The block-copy kernel from the cache into ring rows: ring row r, layer tensor t is
        "block" r * 2L of a tensor starting t pieces into the ring (the kernel's target
        address is offset + id * piece), so one launch gathers every layer."""
        if self._ring_copier is None:
            assert self._ring is not None
            views = self._row_views(self._ring)
            self._ring_copier = FusedCopier(self.layers, [], views, [])
        return self._ring_copier

    def _fused_in(self) -> FusedCopier:
        if self._in_copier is None:
            assert self._inbuf is not None
            views = self._row_views(self._inbuf)
            self._in_copier = FusedCopier(views, [], self.layers, [])
        return self._in_copier

    def _row_views(self, staging: torch.Tensor) -> list[torch.Tensor]:
        """Per piece t (K0, V0, K1, ...), a view of `staging` whose block i*2L is row
        i's piece t."""
        width = len(self.layers)
        flat = staging.view(-1)
        e = self.elements_per_layer
        rows = (staging.shape[0] - 1) * width + 1
        shape = tuple(self.layers[0].shape[1:])
        return [flat[t * e : t * e + rows * e].view(rows, *shape) for t in range(width)]

    def _ids(self, block_ids: Sequence[int]) -> torch.Tensor:
        """Block ids on the device, queued on the current stream. Through pinned memory on
        CUDA: a copy from pageable memory may first synchronize with the stream (CUDA's API
        synchronization behavior), and the side stream waits for the forward pass in flight,
        so the model thread would stall until that step ends (the GPU then idles while it
        launches the next one)."""
        return torch.tensor(block_ids, dtype=torch.long, pin_memory=self.cuda).to(self.device, non_blocking=True)

    def _gather_into(self, block_ids: Sequence[int], out: torch.Tensor) -> None:
        idx = self._ids(block_ids)
        for i, layer in enumerate(self.layers):
            out[:, i].copy_(layer.view(self.num_blocks, -1).index_select(0, idx))

    def onboard_from_host(self, slots: Sequence[int], block_ids: Sequence[int]) -> None:
        """Host slots -> device blocks."""
        assert self.host is not None
        self.onboard_from_pinned(self.host, slots, block_ids)

    def onboard_from_pinned(self, src: torch.Tensor, rows: Sequence[int], block_ids: Sequence[int]) -> None:
        """Rows of a [n, 2L, E] host tensor (pinned on CUDA: the host tier, or blocks read
        from disk) -> device blocks, asynchronously on the side stream."""
        self.onboard_many([(src, rows, block_ids)])

    def onboard_many(self, groups: Sequence[tuple[torch.Tensor, Sequence[int], Sequence[int]]]) -> None:
        """Several onboard_from_pinned() (source tensor, its rows, device blocks) in one scatter
        launch where they fit the onboard staging. One launch a step matters beyond its own
        cost: the kernel's id upload reuses one pinned buffer, so a second launch in a step
        would wait for the first's upload, queued behind the forward pass in flight."""
        sorted_groups: list[tuple[torch.Tensor, list[int], list[int]]] = []
        for src, rows, block_ids in groups:
            if not rows:
                continue
            order = sorted(range(len(rows)), key=lambda i: rows[i])
            ordered_rows = [rows[i] for i in order]
            if src is self.host:
                self.flush_offloads(ordered_rows)  # a slot still waiting for its offloaded bytes
            sorted_groups.append((src, ordered_rows, [block_ids[i] for i in order]))
        total = sum(len(rows) for _, rows, _ in sorted_groups)
        if not total:
            return
        if self.stream is None:
            for src, rows, block_ids in sorted_groups:
                self.scatter(block_ids, src[torch.tensor(rows, dtype=torch.long)])
            return
        if self.fused and total <= self.staging_rows:
            if self._inbuf is None:
                self._inbuf = self._staging()
            targets: list[int] = []
            with torch.cuda.stream(self.stream):
                # Reused by the next onboard only after this one's scatter (stream order).
                offset = 0
                for src, rows, block_ids in sorted_groups:
                    for first, start, m in contiguous_runs(rows):
                        at = offset + first
                        self._inbuf[at : at + m].copy_(src[start : start + m], non_blocking=src.is_pinned())
                    offset += len(rows)
                    targets += block_ids
                self._fused_in().copy([i * len(self.layers) for i in range(total)], targets)
            self._mark_ready()
            return
        for src, rows, block_ids in sorted_groups:
            with torch.cuda.stream(self.stream):
                staged = torch.empty((len(rows), len(self.layers), self.elements_per_layer),
                                     dtype=self.dtype, device=self.device)
                for first, start, n in contiguous_runs(rows):
                    staged[first : first + n].copy_(src[start : start + n], non_blocking=src.is_pinned())
            self.scatter(block_ids, staged)
        self._mark_ready()

    def onboard_from_cpu(self, data: torch.Tensor, block_ids: Sequence[int]) -> None:
        """A [n, 2L, E] CPU tensor (blocks read from disk) -> device blocks."""
        with self._on_stream():
            # Blocking: `data` is pageable and freed by the caller right after.
            staged = data.to(self.device)
        self.scatter(block_ids, staged)
        self._mark_ready()

    def to_cpu(self, block_ids: Sequence[int]) -> torch.Tensor:
        """Device blocks as a [n, 2L, E] CPU tensor, synchronously (disk-bound offloads)."""
        staged = self.gather(block_ids)
        if self.stream is None:
            return staged.clone() if staged.device.type == "cpu" else staged.cpu()
        with torch.cuda.stream(self.stream):
            out = staged.to("cpu", non_blocking=False)
        return out

    def to_pinned(self, block_ids: Sequence[int], pin: bool) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        """Device blocks as a [n, 2L, E] CPU tensor (pinned when `pin`) and the event after
        which it holds them: on CUDA the device-side gather is marked ready first and the
        device-to-host copy runs in the background (disk-bound offloads; the disk thread
        waits for the event). Without a stream the copy is done on return (event None)."""
        staged = self.gather(block_ids)
        self._mark_ready()
        return self.download(staged, pin)

    def download(self, staged: torch.Tensor, pin: bool) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        """to_pinned's second half, for a gather() already marked ready."""
        if self.stream is None:
            return (staged.clone() if staged.device.type == "cpu" else staged.cpu()), None
        out = torch.empty(tuple(staged.shape), dtype=self.dtype, pin_memory=pin)
        with torch.cuda.stream(self.stream):
            out.copy_(staged, non_blocking=pin)
        done = self.fence(blocking=True)  # the disk thread waits for it
        return out, done

    def download_into(self, staged: torch.Tensor, dst: torch.Tensor, rows: Sequence[int]) -> torch.cuda.Event | None:
        """download() into rows of a host tensor allocated once (pinned on CUDA): block i of
        `staged` to dst[rows[i]]. Returns the event after which they hold the blocks (None:
        done on return)."""
        if self.stream is None:
            for first, start, n in contiguous_runs(rows):
                dst[start : start + n].copy_(staged[first : first + n])
            return None
        with torch.cuda.stream(self.stream):
            for first, start, n in contiguous_runs(rows):
                dst[start : start + n].copy_(staged[first : first + n], non_blocking=dst.is_pinned())
        return self.fence(blocking=True)  # the disk thread waits for it

    def timer_start(self) -> Any:
        """A mark before copies whose duration the caller wants (timer_stop)."""
        if self.stream is None:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record(self.stream)
        return event

    def timer_stop(self, start: Any, nbytes: int) -> None:
        """The copies queued since `start` moved `nbytes`; their time comes out of
        timings() once they are done (on CUDA: without waiting for them)."""
        if self.stream is None:
            self._timings.append((None, time.perf_counter() - start, nbytes))
            return
        end = torch.cuda.Event(enable_timing=True)
        end.record(self.stream)
        self._timings.append((start, end, nbytes))

    def timings(self) -> list[tuple[int, float]]:
        """(bytes, seconds) of timed copies that have finished, oldest first."""
        out: list[tuple[int, float]] = []
        while self._timings:
            start, end, nbytes = self._timings[0]
            if start is None:
                out.append((nbytes, end))
            elif end.query():
                out.append((nbytes, start.elapsed_time(end) / 1e3))
            else:
                break  # later ones were recorded after it on the same stream
            self._timings.pop(0)
        return out

    def mark_ready(self) -> None:
        """The next forward pass waits for everything queued on the side stream so far."""
        self._mark_ready()

    def fence(self, blocking: bool = False) -> torch.cuda.Event | None:
        """An event after everything queued on the side stream so far (None without one:
        the copies are done). `blocking`: for another thread to synchronize() on (the disk
        thread): it then sleeps until the event completes instead of spinning a core in the
        CUDA driver, which the model thread's launches share."""
        if self.stream is None:
            return None
        if not blocking:
            return self.stream.record_event()
        event = torch.cuda.Event(blocking=True)
        event.record(self.stream)
        return event

    def _mark_ready(self) -> None:
        if self.stream is not None:
            self._ready = self.stream.record_event()

    def _on_stream(self):  # type: ignore[no-untyped-def]
        return torch.cuda.stream(self.stream) if self.stream is not None else _NullContext()


class _NullContext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None
