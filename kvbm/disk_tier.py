"""G3: KV blocks as files under <dir>/<layout fingerprint>/<block hash>.kvb, each with a header
(kvbm/layout.py), so a restarted worker or a neighbour with the same layout finds them. Writes
and deletes run in order on one owned thread fed by a bounded queue; reads run on the caller's
(model) thread and see blocks still queued for writing."""

from __future__ import annotations

import logging
import os
import queue
import threading
from pathlib import Path

import torch

from kvbm.layout import HEADER_BYTES, KvLayout

log = logging.getLogger(__name__)

_STOP = object()


class DiskStore:
    def __init__(self, root: str | Path, layout: KvLayout, queue_blocks: int = 256) -> None:
        self.layout = layout
        self.dir = Path(root) / layout.fingerprint
        self._queue: queue.Queue[object] = queue.Queue(maxsize=2 * queue_blocks + 1)
        self._inflight: dict[int, torch.Tensor] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.write_errors = 0

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

    def write(self, block_hash: int, parent_hash: int | None, data: torch.Tensor) -> None:
        """Queue a CPU tensor (the block's bytes) for writing; never blocks. The planner keeps
        the backlog under the queue's bound, so a full queue here is a bug."""
        with self._lock:
            self._inflight[block_hash] = data
        self._queue.put_nowait(("w", block_hash, parent_hash, data))

    def delete(self, block_hash: int) -> None:
        self._queue.put_nowait(("d", block_hash, None, None))

    def read(self, block_hash: int, out: torch.Tensor) -> bool:
        """Fill the contiguous CPU tensor `out` with the block; False if it is unreadable."""
        with self._lock:
            pending = self._inflight.get(block_hash)
        if pending is not None:
            out.copy_(pending.view(out.shape))
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
            try:
                self._write_file(block_hash, parent_hash, data)
            except OSError as exc:
                self.write_errors += 1
                log.warning("kvbm disk write of %016x failed: %s", block_hash, exc)
            finally:
                with self._lock:
                    if self._inflight.get(block_hash) is data:
                        del self._inflight[block_hash]

    def _write_file(self, block_hash: int, parent_hash: int | None, data: torch.Tensor) -> None:
        final = self.path(block_hash)
        tmp = final.with_name(f"{final.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        with open(tmp, "wb") as f:
            f.write(self.layout.header(block_hash, parent_hash))
            f.write(memoryview(data.contiguous().view(torch.uint8).numpy().reshape(-1)))
        # Atomic rename: a reader (or a neighbour's scan) never sees half a block.
        os.replace(tmp, final)
