"""G3: KV blocks as files under <dir>/<layout fingerprint>/<block hash>.kvb, each with a header
(kvbm/layout.py), so a restarted worker or a neighbour with the same layout finds them. Writes
and deletes run in order on one owned thread fed by a bounded queue (a write may wait there for
the device-to-host copy that fills its buffer); reads see blocks still queued for writing.
DiskReader reads blocks in parallel on a small pool of threads (file reads release the GIL)
into one (pinned, on CUDA) buffer per request, so onboarding from disk never blocks a step."""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from kvbm.layout import HEADER_BYTES, KvLayout

log = logging.getLogger(__name__)

_STOP = object()


class DiskStore:
    def __init__(self, root: str | Path, layout: KvLayout, queue_blocks: int = 256) -> None:
        self.layout = layout
        self.dir = Path(root) / layout.fingerprint
        self._queue: queue.Queue[object] = queue.Queue(maxsize=2 * queue_blocks + 1)
        self._inflight: dict[int, tuple[torch.Tensor, Any]] = {}  # bytes, and the event filling them
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
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
                    parsed = self.layout.parse_header(f.read(HEADER_BYTES))
                size_ok = entry.stat().st_size == HEADER_BYTES + self.layout.block_bytes
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
        """Queue a CPU tensor (the block's bytes) for writing; never blocks. `ready` (a CUDA
        event) is waited for on the disk thread before the bytes are read. The planner keeps
        the backlog under the queue's bound; if the queue is full anyway the write is dropped
        (False, counted in `dropped_writes`)."""
        with self._lock:
            self._inflight[block_hash] = (data, ready)
        try:
            self._queue.put_nowait(("w", block_hash, parent_hash, (data, ready)))
        except queue.Full:
            with self._lock:
                del self._inflight[block_hash]
            self.dropped_writes += 1
            return False
        return True

    def delete(self, block_hash: int) -> None:
        try:
            self._queue.put_nowait(("d", block_hash, None, None))
        except queue.Full:  # left behind: a later write of the block replaces it
            log.warning("kvbm disk queue full; file of %016x not deleted", block_hash)

    def read(self, block_hash: int, out: torch.Tensor) -> bool:
        """Fill the contiguous CPU tensor `out` with the block; False if it is unreadable."""
        with self._lock:
            pending = self._inflight.get(block_hash)
        if pending is not None:
            data, ready = pending
            if ready is not None:
                ready.synchronize()
            out.copy_(data.view(out.shape))
            return True
        try:
            with open(self.path(block_hash), "rb") as f:
                if self.layout.parse_header(f.read(HEADER_BYTES)) is None:
                    return False
                view = memoryview(out.view(torch.uint8).numpy().reshape(-1))
                return f.readinto(view) == self.layout.block_bytes
        except OSError as exc:
            log.warning("kvbm disk read of %016x failed: %s", block_hash, exc)
            return False

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is _STOP:
                return
            kind, block_hash, parent_hash, data = job  # type: ignore[misc]
            if kind == "d":
                try:
                    os.unlink(self.path(block_hash))
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    log.warning("kvbm disk delete of %016x failed: %s", block_hash, exc)
                continue
            data, ready = data
            try:
                if ready is not None:
                    ready.synchronize()  # the device-to-host copy filling `data`
                self._write_file(block_hash, parent_hash, data)
            except OSError as exc:
                self.write_errors += 1
                log.warning("kvbm disk write of %016x failed: %s", block_hash, exc)
            finally:
                with self._lock:
                    pending = self._inflight.get(block_hash)
                    if pending is not None and pending[0] is data:
                        del self._inflight[block_hash]

    def _write_file(self, block_hash: int, parent_hash: int | None, data: torch.Tensor) -> None:
        final = self.path(block_hash)
        tmp = final.with_name(f"{final.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        with open(tmp, "wb") as f:
            f.write(self.layout.header(block_hash, parent_hash))
            f.write(memoryview(data.contiguous().view(torch.uint8).numpy().reshape(-1)))
        # Atomic rename: a reader (or a neighbour's scan) never sees half a block.
        os.replace(tmp, final)


class BlockReads:
    """The reads of one request's disk blocks (kvbm.tiered.DiskReads): row i of `buf` holds
    `hashes[i]` once `done`, if `ok[i]`."""

    def __init__(self, hashes: Sequence[int], on_done: Callable[[], None] | None) -> None:
        self.hashes = list(hashes)
        self.hits: list[Any] = []
        self.buf: torch.Tensor | None = None
        self.ok = [False] * len(self.hashes)
        self._left = len(self.hashes)
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
        return self.buf, i

    def close(self) -> None:
        """Drop the buffer reference (rows already handed to a plan keep theirs)."""
        if self.done:
            self.buf = None

    def _read_one(self, store: DiskStore, i: int) -> None:
        try:
            assert self.buf is not None
            self.ok[i] = store.read(self.hashes[i], self.buf[i])
        except Exception:  # never leave a request waiting
            log.exception("kvbm disk read of %016x failed", self.hashes[i])
        finally:
            self._count_down(1)

    def _count_down(self, n: int) -> None:
        with self._lock:
            self._left -= n
            last = self._left == 0
        if last:
            self._finish()

    def _finish(self) -> None:
        self._done.set()
        if self._on_done is not None:
            try:
                self._on_done()
            except Exception:  # e.g. the event loop is gone
                log.debug("kvbm read notification failed", exc_info=True)


class DiskReader:
    """Reads blocks of a DiskStore on `threads` threads, into pinned host memory when `pin`
    (allocated on a reader thread; the caching host allocator reuses it, and keeps it until
    the copies queued out of it end). `notify` is called from a reader thread when all reads
    of a request are done."""

    def __init__(self, store: DiskStore, dtype: torch.dtype, pin: bool, threads: int = 4,
                 notify: Callable[[], None] | None = None) -> None:
        self.store = store
        self.dtype = dtype
        self.pin = pin
        self.notify = notify
        self._pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="kvbm-disk-read")

    def start(self, hashes: Sequence[int], defer: bool = False) -> BlockReads:
        """Read `hashes` into one buffer; with `defer`, only once submit() is called (after
        the writes of some of them are queued)."""
        reads = BlockReads(hashes, lambda: self.notify() if self.notify is not None else None)
        if not defer:
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
        try:
            reads.buf = torch.empty((n, 2 * layout.num_layers, layout.elements_per_layer),
                                    dtype=self.dtype, pin_memory=self.pin)
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
