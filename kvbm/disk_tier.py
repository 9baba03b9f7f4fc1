"""G3: KV blocks as files under <dir>/<layout fingerprint>/<block hash>.kvb, each with a header
(kvbm/layout.py), so a restarted worker or a neighbour with the same layout finds them. Writes
and deletes run in order on one owned thread fed by a queue whose writes are bounded in blocks;
a batch of writes waits there, on that thread, for the device-to-host copies that fill its
sources (pinned host slots), and each write is reported done (completed()) once its file is in
place. Nothing here waits on the caller's thread, and nothing is fsynced: the tier is a cache,
a block lost in a crash is recomputed. Reads see blocks still queued for writing.
DiskReader reads blocks in parallel on a small pool of threads (file reads release the GIL)
into rows of a StagingPool (pinned once, on CUDA, and reused), so onboarding from disk never
blocks a step nor pins fresh host memory per request."""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dynamo.wire import KvLayoutSpec
from kvbm.layout import HEADER_BYTES, block_bytes, block_header, elements_per_layer, fingerprint, parse_block_header

log = logging.getLogger(__name__)

_STOP = object()


@dataclass(slots=True, frozen=True)
class _Writes:
    blocks: list[tuple[int, int | None, torch.Tensor]]  # hash, parent, bytes (a CPU tensor)
    ready: Any  # a CUDA event after the copies that fill the tensors; None: filled already
    on_done: Callable[[], None] | None  # the tensors are no longer read (borrowed rows go back)


@dataclass(slots=True, frozen=True)
class _Delete:
    block_hash: int


class DiskStore:
    """`queue_blocks` bounds the writes queued or in progress (twice that is refused: the
    caller's own bound, TieredCache's, comes first). With `report_writes`, completed() hands
    each write's outcome to the caller. `before_write`, a test hook, is called on the disk
    thread with a block's hash before its file is written: tests hold writes back with it (a
    threading.Event), a benchmark can slow the disk down."""

    def __init__(self, root: str | Path, layout: KvLayoutSpec, queue_blocks: int = 256, *,
                 report_writes: bool = False, before_write: Callable[[int], None] | None = None) -> None:
        self.layout = layout
        self.dir = Path(root) / fingerprint(layout)
        self._max_blocks = 2 * queue_blocks + 1
        self._queue: queue.Queue[object] = queue.Queue()
        self._inflight: dict[int, tuple[torch.Tensor, Any]] = {}  # bytes, and the event filling them
        self._lock = threading.Lock()  # around _inflight only: no I/O is done holding it
        self._thread: threading.Thread | None = None
        self._report = report_writes
        self._completed: deque[tuple[int, bool]] = deque()  # appended by the disk thread
        self.before_write = before_write
        self.write_errors = 0
        self.dropped_writes = 0

    # --------------------------------------------------------------------------- lifecycle

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._run, name="kvbm-disk", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Finish queued writes, then end the thread (blocking: call off the event loop)."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(_STOP)
            thread.join()

    def path(self, block_hash: int) -> Path:
        return self.dir / f"{block_hash:016x}.kvb"

    def exists(self, block_hash: int) -> bool:
        """Whether a block's file is on disk (written here or by a worker sharing the
        directory; files appear by atomic rename, so one that exists is whole). Asked on the
        scheduler's thread for nearly every admitted prompt: one stat, no Path objects (a
        pathlib lookup cost 4x as much)."""
        return os.path.exists(f"{self.dir}/{block_hash:016x}.kvb")

    def scan(self) -> list[tuple[int, int | None]]:
        """Blocks on disk with this layout, oldest first (blocking)."""
        found: list[tuple[float, int, int | None]] = []
        if not self.dir.is_dir():
            return []
        for entry in os.scandir(self.dir):
            if not entry.name.endswith(".kvb"):
                continue
            try:
                with open(entry.path, "rb") as f:
                    parsed = parse_block_header(self.layout, f.read(HEADER_BYTES))
                size_ok = entry.stat().st_size == HEADER_BYTES + block_bytes(self.layout)
                mtime = entry.stat().st_mtime
            except OSError:
                continue
            if parsed is not None and size_ok:
                found.append((mtime, parsed[0], parsed[1]))
        found.sort()
        return [(h, parent) for _, h, parent in found]

    # -------------------------------------------------------------------------------- I/O

    def backlog(self) -> int:
        """Writes queued or in progress."""
        return len(self._inflight)

    def write(self, block_hash: int, parent_hash: int | None, data: torch.Tensor, ready: Any = None) -> bool:
        """write_batch() of one block."""
        return self.write_batch([(block_hash, parent_hash, data)], ready)

    def write_batch(self, blocks: Sequence[tuple[int, int | None, torch.Tensor]], ready: Any = None,
                    on_done: Callable[[], None] | None = None) -> bool:
        """Queue CPU tensors (blocks' bytes: host slots or a downloaded batch) for writing;
        never blocks. `ready` (a CUDA event) is waited for on the disk thread before the
        bytes are read; the tensors must stay untouched until each write is reported done, or
        until `on_done` is called (on the disk thread once the whole batch is written; at once
        for a batch refused). Past the bound the whole batch is dropped (False; counted in
        `dropped_writes` and reported as failed writes)."""
        blocks = list(blocks)
        if not blocks:
            if on_done is not None:
                on_done()
            return True
        with self._lock:
            refused = len(self._inflight) + len(blocks) > self._max_blocks
            if not refused:
                for h, _, data in blocks:
                    self._inflight[h] = (data, ready)
        if refused:
            self.dropped_writes += len(blocks)
            if self._report:
                self._completed.extend((h, False) for h, _, _ in blocks)
            if on_done is not None:
                on_done()
            return False
        self._queue.put(_Writes(blocks, ready, on_done))
        return True

    def completed(self) -> list[tuple[int, bool]]:
        """(block hash, written) of the writes finished since the last call, in order (with
        `report_writes`; kvbm.tiered.DiskWrites). Never blocks."""
        out: list[tuple[int, bool]] = []
        done = self._completed
        while done:
            out.append(done.popleft())
        return out

    def delete(self, block_hash: int) -> None:
        """Queue a file's removal, after the writes queued before it."""
        self._queue.put(_Delete(block_hash))

    def read(self, block_hash: int, out: torch.Tensor) -> bool:
        """Fill the contiguous CPU tensor `out` with the block; False if it is unreadable."""
        while True:
            with self._lock:
                pending = self._inflight.get(block_hash)
            if pending is None:
                break
            data, ready = pending
            if ready is not None:
                ready.synchronize()
            # Copied while still queued (its source may be a borrowed row, handed back and
            # refilled once the write is done); once written, the file is in place.
            with self._lock:
                if self._inflight.get(block_hash) is pending:
                    out.copy_(data.view(out.shape))
                    return True
        try:
            with open(self.path(block_hash), "rb") as f:
                if parse_block_header(self.layout, f.read(HEADER_BYTES)) is None:
                    return False
                view = memoryview(out.view(torch.uint8).numpy().reshape(-1))
                return f.readinto(view) == block_bytes(self.layout)
        except OSError as exc:
            log.warning("kvbm disk read of %016x failed: %s", block_hash, exc)
            return False

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is _STOP:
                return
            if isinstance(job, _Delete):
                try:
                    os.unlink(self.path(job.block_hash))
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    log.warning("kvbm disk delete of %016x failed: %s", job.block_hash, exc)
                continue
            assert isinstance(job, _Writes)
            filled = True
            if job.ready is not None:
                try:
                    job.ready.synchronize()  # here, not on the model thread: the copies filling the sources
                except RuntimeError:
                    log.exception("kvbm: the copies of %d blocks to write failed", len(job.blocks))
                    filled = False
            for block_hash, parent_hash, data in job.blocks:
                self._write_one(block_hash, parent_hash, data, filled)
            if job.on_done is not None:
                job.on_done()

    def _write_one(self, block_hash: int, parent_hash: int | None, data: torch.Tensor, filled: bool) -> None:
        ok = False
        try:
            if filled:
                if self.before_write is not None:
                    self.before_write(block_hash)
                self._write_file(block_hash, parent_hash, data)
                ok = True
        except OSError as exc:
            self.write_errors += 1
            log.warning("kvbm disk write of %016x failed: %s", block_hash, exc)
        except Exception:  # keep the thread (and every later write) alive; the block is just not kept
            self.write_errors += 1
            log.exception("kvbm disk write of %016x failed", block_hash)
        finally:
            with self._lock:
                pending = self._inflight.get(block_hash)
                if pending is not None and pending[0] is data:
                    del self._inflight[block_hash]
            if self._report:
                self._completed.append((block_hash, ok))

    def write_now(self, block_hash: int, parent_hash: int | None, data: torch.Tensor) -> Path:
        """Write a block's file on the caller's thread, as the disk thread writes one, past the
        queue and unreported (the read probe's files, kvbm/disk_probe.py); returns its path."""
        self._write_file(block_hash, parent_hash, data)
        return self.path(block_hash)

    def _write_file(self, block_hash: int, parent_hash: int | None, data: torch.Tensor) -> None:
        final = self.path(block_hash)
        tmp = final.with_name(f"{final.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        with open(tmp, "wb") as f:
            f.write(block_header(self.layout, block_hash, parent_hash))
            f.write(memoryview(data.contiguous().view(torch.uint8).numpy().reshape(-1)))
        # Atomic rename: a reader (or a neighbour's scan) never sees half a block.
        os.replace(tmp, final)


class StagingPool:
    """A fixed [rows, 2L, E] host tensor (pinned on CUDA), allocated once, whose rows disk
    reads borrow: pinning host memory (cudaHostAlloc) per request is slow and stalls other
    CUDA calls. A released row is reused only after a fence, an event recorded by the
    executor once the copies planned out of it are queued, has completed (None: at once).
    take() never waits: None when too few rows are free (the caller allocates its own)."""

    def __init__(self, rows: int, row_shape: Sequence[int], dtype: torch.dtype, pin: bool) -> None:
        self.data = torch.empty((rows, *row_shape), dtype=dtype, pin_memory=pin)
        self.rows = rows
        self._free: list[int] = list(range(rows))  # ascending: reads get runs of rows
        self._released: list[int] = []  # not fenced yet
        self._fenced: list[tuple[Any, list[int]]] = []  # in fence order (= stream order)
        self._lock = threading.Lock()
        self.takes = 0
        self.misses = 0

    @property
    def num_free(self) -> int:
        with self._lock:
            self._reclaim()
            return len(self._free)

    def take(self, n: int) -> list[int] | None:
        with self._lock:
            self._reclaim()
            if n > len(self._free):
                self.misses += 1
                return None
            rows, self._free = self._free[:n], self._free[n:]
            self.takes += 1
            return rows

    def give_back(self, rows: Sequence[int]) -> None:
        """Rows nothing reads or copies into any more: free at once (no fence)."""
        if rows:
            with self._lock:
                self._free.extend(rows)
                self._free.sort()

    def release(self, rows: Sequence[int]) -> None:
        """Rows no longer read into nor handed to a plan (copies already planned out of them
        are queued by the next executed plan, whose fence frees them)."""
        if rows:
            with self._lock:
                self._released.extend(rows)

    def fence(self, event: Any) -> None:
        """On the model thread after a plan's copies are queued: the rows released so far
        become free once `event` has completed (None: the copies are done)."""
        with self._lock:
            if self._released:
                self._fenced.append((event, self._released))
                self._released = []

    def _reclaim(self) -> None:
        freed = False
        while self._fenced:
            event, rows = self._fenced[0]
            if event is not None and not event.query():
                break  # later fences were recorded after it on the same stream
            self._fenced.pop(0)
            self._free.extend(rows)
            freed = True
        if freed:
            self._free.sort()


class BlockReads:
    """The reads of one request's disk blocks (kvbm.tiered.DiskReads): row rows[i] of `buf`
    holds `hashes[i]` once `done`, if `ok[i]`. `read_s` is the seconds of the `read_blocks`
    reads that ran, each its own time, summed: what reading them one after another on one
    thread would take, however many reader threads shared them (an overstatement where the
    threads share a bandwidth-bound disk or too few cores; their wall time would understate it)."""

    def __init__(self, hashes: Sequence[int], on_done: Callable[[], None] | None) -> None:
        self.hashes = list(hashes)
        self.hits: list[Any] = []
        self.buf: torch.Tensor | None = None
        self.rows: list[int] = []
        self.ok = [False] * len(self.hashes)
        self._pool: StagingPool | None = None  # owner of `rows` of `buf`, if borrowed
        self._closed = False
        self._left = len(self.hashes)
        self.read_s = 0.0
        self.read_blocks = 0
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._on_done = on_done
        self._rows = {h: i for i, h in enumerate(self.hashes)}
        if not self.hashes:
            self._finish()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def staged(self, block_hash: int) -> tuple[torch.Tensor, int] | None:
        """(buffer, row) of a block read, None if it was not (or is not yet) read."""
        i = self._rows.get(block_hash)
        if i is None or not self.done or not self.ok[i] or self.buf is None:
            return None
        return self.buf, self.rows[i]

    def close(self) -> None:
        """Drop the buffer (rows already handed to a plan keep theirs: pooled rows are
        reused only after the plan's fence). Reads still running give theirs back when done."""
        with self._lock:
            self._closed = True
            give_back = self._left == 0
        if give_back:
            self._give_back()

    def _give_back(self) -> None:
        pool, rows = self._pool, self.rows
        self._pool, self.buf = None, None
        if pool is not None:
            pool.release(rows)

    def _read_one(self, store: DiskStore, i: int) -> None:
        started = time.perf_counter()
        try:
            assert self.buf is not None
            self.ok[i] = store.read(self.hashes[i], self.buf[self.rows[i]])
        except Exception:  # never leave a request waiting
            log.exception("kvbm disk read of %016x failed", self.hashes[i])
        finally:
            self._count_down(1, time.perf_counter() - started)

    def _count_down(self, n: int, read_s: float | None = None) -> None:
        """`n` blocks are done with, read in `read_s` (None: not read at all)."""
        with self._lock:
            if read_s is not None:
                self.read_s += read_s
                self.read_blocks += n
            self._left -= n
            last = self._left == 0
            closed = self._closed
        if last:
            if closed:  # aborted while reading
                self._give_back()
            self._finish()

    def _finish(self) -> None:
        self._done.set()
        if self._on_done is not None:
            try:
                self._on_done()
            except Exception:  # e.g. the event loop is gone
                log.debug("kvbm read notification failed", exc_info=True)


# An engine's disk reads land in one staging pool of this size (pinned on CUDA, allocated once
# with the reader); a request it cannot hold at the moment gets a buffer of its own.
READ_STAGING_BYTES = 512 << 20
READ_STAGING_MAX_ROWS = 8192


class DiskReader:
    """Reads blocks of a DiskStore on `threads` threads, into rows of a StagingPool of
    `staging_rows` rows (pinned host memory when `pin`); a request the pool cannot hold gets
    its own buffer, allocated on a reader thread (the caching host allocator keeps it until
    the copies queued out of it end). `notify` is called from a reader thread when all reads
    of a request are done."""

    def __init__(self, store: DiskStore, dtype: torch.dtype, pin: bool, threads: int = 4,
                 notify: Callable[[], None] | None = None, staging_rows: int = 0) -> None:
        self.store = store
        self.dtype = dtype
        self.pin = pin
        self.notify = notify
        layout = store.layout
        self.pool: StagingPool | None = None
        if staging_rows > 0:
            self.pool = StagingPool(staging_rows, (2 * layout.num_layers, elements_per_layer(layout)), dtype, pin)
        self._pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="kvbm-disk-read")

    @classmethod
    def for_tier(cls, store: DiskStore, dtype: torch.dtype, pin: bool, capacity_blocks: int) -> DiskReader:
        """The reader an engine gives its disk tier of `capacity_blocks`: up to four threads and
        a staging pool of READ_STAGING_BYTES, never of more rows than the tier holds."""
        size = block_bytes(store.layout)
        rows = max(1, min(READ_STAGING_MAX_ROWS, READ_STAGING_BYTES // size, capacity_blocks))
        return cls(store, dtype, pin, threads=min(4, os.cpu_count() or 1), staging_rows=rows)

    def start(self, hashes: Sequence[int]) -> BlockReads:
        """Read `hashes` into one buffer, on the reader threads."""
        reads = BlockReads(hashes, lambda: self.notify() if self.notify is not None else None)
        self.submit(reads)
        return reads

    def submit(self, reads: BlockReads) -> None:
        if reads.done:
            return
        try:
            self._pool.submit(self._begin, reads)
        except RuntimeError:  # shut down: nothing read
            reads._count_down(len(reads.hashes))

    def _begin(self, reads: BlockReads) -> None:
        layout, n = self.store.layout, len(reads.hashes)
        rows = self.pool.take(n) if self.pool is not None else None
        if rows is not None:
            assert self.pool is not None
            reads.buf, reads.rows, reads._pool = self.pool.data, rows, self.pool
        else:
            try:
                reads.buf = torch.empty((n, 2 * layout.num_layers, elements_per_layer(layout)),
                                        dtype=self.dtype, pin_memory=self.pin)
                reads.rows = list(range(n))
            except RuntimeError as exc:  # out of (pinned) host memory: recompute instead
                log.warning("kvbm: no staging memory for %d disk blocks: %s", n, exc)
                reads._count_down(n)
                return
        for i in range(n):
            try:
                self._pool.submit(reads._read_one, self.store, i)
            except RuntimeError:  # shut down
                reads._count_down(n - i)
                return

    def stop(self) -> None:
        self._pool.shutdown(wait=True)  # queued reads still finish: no request waits forever
