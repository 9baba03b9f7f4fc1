"""Batched block copies between the engine's paged KV cache (per layer K and V of shape
[num_blocks, ...]) and host memory. On CUDA they run on a side stream: the next forward pass
waits only for what it needs (onboarded blocks written, evicted blocks read), while device-to-
host copies of offloaded blocks finish in the background. Imports only torch."""

from __future__ import annotations

from collections.abc import Sequence

import torch


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
    """Copies whole blocks, all layers at once, in the layout of kvbm/layout.py."""

    def __init__(self, k: Sequence[torch.Tensor], v: Sequence[torch.Tensor], host: torch.Tensor | None) -> None:
        self.layers = [t for pair in zip(k, v) for t in pair]  # K0, V0, K1, V1, ...
        first = self.layers[0]
        self.device = first.device
        self.num_blocks = first.shape[0]
        self.elements_per_layer = first[0].numel()
        self.dtype = first.dtype
        self.host = host
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self._ready: torch.cuda.Event | None = None  # forward may run: reads/writes of blocks done
        self._drained: torch.cuda.Event | None = None  # every copy into host memory done

    # ------------------------------------------------------------------------------ batches

    def begin(self) -> None:
        """Start a batch: side-stream work waits for the forward pass that wrote the blocks."""
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))

    def end(self) -> None:
        """End a batch: the next forward pass waits for its device-side work only."""
        if self.stream is not None and self._ready is not None:
            torch.cuda.current_stream(self.device).wait_event(self._ready)
            self._ready = None

    def drain(self) -> None:
        """Block until host memory holds every offloaded block (before reading it on the CPU)."""
        if self._drained is not None:
            self._drained.synchronize()
            self._drained = None

    def synchronize(self) -> None:
        if self.stream is not None:
            self.stream.synchronize()

    # ------------------------------------------------------------------------------- copies

    def gather(self, block_ids: Sequence[int]) -> torch.Tensor:
        """Blocks of the device cache as a [n, 2L, E] tensor on the device (side stream)."""
        with self._on_stream():
            # Allocated on the side stream, so the caching allocator orders its reuse after
            # the copies queued there.
            idx = torch.tensor(block_ids, dtype=torch.long).to(self.device, non_blocking=True)
            out = torch.empty((len(block_ids), len(self.layers), self.elements_per_layer),
                              dtype=self.dtype, device=self.device)
            for i, layer in enumerate(self.layers):
                out[:, i].copy_(layer.view(self.num_blocks, -1).index_select(0, idx))
        return out

    def scatter(self, block_ids: Sequence[int], data: torch.Tensor) -> None:
        """Write a [n, 2L, E] device tensor into the cache's blocks."""
        with self._on_stream():
            idx = torch.tensor(block_ids, dtype=torch.long).to(self.device, non_blocking=True)
            for i, layer in enumerate(self.layers):
                layer.view(self.num_blocks, -1).index_copy_(0, idx, data[:, i])

    def offload_to_host(self, block_ids: Sequence[int], slots: Sequence[int]) -> None:
        """Device blocks -> host slots. On CUDA the device-side gather is marked ready before
        the slow device-to-host copy is queued, so only the gather delays the next step."""
        self.land_in_host(self.gather_for_host(block_ids, slots))

    def gather_for_host(self, block_ids: Sequence[int], slots: Sequence[int]) -> tuple[torch.Tensor, list[int]]:
        """offload_to_host's first half: the device-side gather (marked ready: the blocks may
        be reused after it), for land_in_host() to copy into the slots, possibly after other
        work queued meanwhile (onboards the next forward pass waits for)."""
        assert self.host is not None
        order = sorted(range(len(slots)), key=lambda i: slots[i])
        block_ids = [block_ids[i] for i in order]
        staged = self.gather(block_ids)
        self._mark_ready()
        return staged, [slots[i] for i in order]

    def land_in_host(self, gathered: tuple[torch.Tensor, list[int]]) -> None:
        """offload_to_host's second half: the device-to-host copy into the slots (in the
        background on CUDA; drain() waits for it)."""
        assert self.host is not None
        staged, slots = gathered
        if self.stream is None:
            for first, start, n in contiguous_runs(slots):
                self.host[start : start + n].copy_(staged[first : first + n])
            return
        with torch.cuda.stream(self.stream):
            for first, start, n in contiguous_runs(slots):
                self.host[start : start + n].copy_(staged[first : first + n], non_blocking=True)
            self._drained = self.stream.record_event()

    def onboard_from_host(self, slots: Sequence[int], block_ids: Sequence[int]) -> None:
        """Host slots -> device blocks."""
        assert self.host is not None
        self.onboard_from_pinned(self.host, slots, block_ids)

    def onboard_from_pinned(self, src: torch.Tensor, rows: Sequence[int], block_ids: Sequence[int]) -> None:
        """Rows of a [n, 2L, E] host tensor (pinned on CUDA: the host tier, or blocks read
        from disk) -> device blocks, asynchronously on the side stream."""
        order = sorted(range(len(rows)), key=lambda i: rows[i])
        block_ids = [block_ids[i] for i in order]
        rows = [rows[i] for i in order]
        if self.stream is None:
            self.scatter(block_ids, src[torch.tensor(rows, dtype=torch.long)])
            return
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
            done = self.stream.record_event()
        return out, done

    def mark_ready(self) -> None:
        """The next forward pass waits for everything queued on the side stream so far."""
        self._mark_ready()

    def fence(self) -> torch.cuda.Event | None:
        """An event after everything queued on the side stream so far (None without one:
        the copies are done)."""
        return self.stream.record_event() if self.stream is not None else None

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
