"""The tensor side of KV transfer, torch only (the GPU benchmark imports it without msgspec):
gather scattered blocks into one contiguous buffer, scatter one back, and device-to-device
block copies (one Triton kernel that writes straight into the peer GPU's blocks where it can).
A buffer is laid out [layers, 2 (K, V), blocks, block_size, kv_heads, head_dim]."""

from __future__ import annotations

import functools
import importlib.util
import io
import logging
import os
import pickle
from array import array
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch

log = logging.getLogger(__name__)


def buffer_shape(k: list[torch.Tensor], num_blocks: int) -> tuple[int, ...]:
    return (len(k), 2, num_blocks, *k[0].shape[1:])


def gather_blocks(
    k: list[torch.Tensor], v: list[torch.Tensor], block_ids: list[int], out: torch.Tensor | None = None
) -> torch.Tensor:
    """Copy blocks `block_ids` of every layer's K and V into one contiguous buffer (on `out`'s
    device if given, else the cache's). One index_select per tensor: a few large copies, not
    one per block."""
    device = k[0].device
    index = torch.tensor(block_ids, dtype=torch.long, device=device)
    shape = buffer_shape(k, len(block_ids))
    staging = out if out is not None and out.device == device else torch.empty(shape, dtype=k[0].dtype, device=device)
    for layer, (kl, vl) in enumerate(zip(k, v)):
        torch.index_select(kl, 0, index, out=staging[layer, 0])
        torch.index_select(vl, 0, index, out=staging[layer, 1])
    if out is not None and out is not staging:
        out.copy_(staging, non_blocking=out.is_pinned())
        return out
    return staging


def scatter_blocks(k: list[torch.Tensor], v: list[torch.Tensor], block_ids: list[int], buffer: torch.Tensor) -> None:
    """Write a gathered buffer into blocks `block_ids` (moved to the cache's device first)."""
    device = k[0].device
    index = torch.tensor(block_ids, dtype=torch.long, device=device)
    src = buffer.to(device, non_blocking=True) if buffer.device != device else buffer
    for layer, (kl, vl) in enumerate(zip(k, v)):
        kl.index_copy_(0, index, src[layer, 0])
        vl.index_copy_(0, index, src[layer, 1])


def block_runs(src_ids: list[int], dst_ids: list[int]) -> list[tuple[int, int, int]]:
    """Maximal runs in which source and target ids both advance by one, as (src_start,
    dst_start, length): each run is one contiguous slice of every layer's K and V on both
    sides, so it moves as one copy."""
    if len(src_ids) != len(dst_ids):
        raise ValueError(f"{len(src_ids)} source blocks but {len(dst_ids)} target blocks")
    runs: list[tuple[int, int, int]] = []
    for s, d in zip(src_ids, dst_ids):
        if runs:
            s0, d0, n = runs[-1]
            if s == s0 + n and d == d0 + n:
                runs[-1] = (s0, d0, n + 1)
                continue
        runs.append((s, d, 1))
    return runs


@dataclass(frozen=True, slots=True)
class WordPlan:
    """How the copy kernel addresses two sets of per-layer cache tensors: it moves
    `word_bytes` words, every address it forms is a multiple of `align_words` words (so loads
    and stores vectorize to 16 bytes where the allocations allow), and tensor t of each side
    starts `src_offsets[t]` / `dst_offsets[t]` words from one base tensor on the launching GPU.
    One pointer argument plus two tables instead of 4 x layers pointers; and with unified
    addressing the peer GPU's tensors are plain offsets too, so the kernel never receives a
    tensor of another device (and no launcher has to accept one)."""

    word_bytes: int
    align_words: int
    src_offsets: tuple[int, ...]
    dst_offsets: tuple[int, ...]


def word_plan(base_ptr: int, src_ptrs: list[int], dst_ptrs: list[int], block_bytes_per_tensor: int) -> WordPlan:
    """The widest word and alignment that the base, every tensor on both sides and the
    per-tensor block size allow (torch's allocator aligns to 512 bytes, so in practice 4-byte
    words and 16-byte vectors)."""
    everything = [base_ptr, *src_ptrs, *dst_ptrs]
    word = next(w for w in (4, 2, 1) if block_bytes_per_tensor % w == 0 and all(p % w == 0 for p in everything))
    align = next(a for a in (16, 8, 4, 2, 1) if a % word == 0 and block_bytes_per_tensor % a == 0
                 and all(p % a == 0 for p in everything))
    return WordPlan(word, align // word, tuple((p - base_ptr) // word for p in src_ptrs),
                    tuple((p - base_ptr) // word for p in dst_ptrs))


_WORD_DTYPES = {4: torch.int32, 2: torch.int16, 1: torch.uint8}
# Pinned buffers a copier uploads block ids through, taken in turn. A launch never waits for an
# earlier upload (which may sit on its stream behind a forward pass in flight) unless all of
# these are still being read: one or two launches a step leave them free.
ID_BUFFERS = 4


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _interpreting() -> bool:
    """Triton's CPU interpreter runs the kernel on host tensors (the CPU tests use it)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def _kernels() -> SimpleNamespace:
    import triton
    import triton.language as tl

    # The block count is a plain argument, not specialised on (Triton would compile one
    # variant for 1, one for multiples of 16 and one for the rest): one compile per layout,
    # done when the copier is made (warm()), never on a serving step.
    @triton.jit(do_not_specialize=["num_blocks"])
    def _copy_blocks_kernel(
        base, src_off_ptr, dst_off_ptr, ids_ptr, num_blocks,
        PIECE: tl.constexpr, ALIGN: tl.constexpr, BLOCK: tl.constexpr, EVEN: tl.constexpr,
    ):
        # One program per (block pair, layer tensor): PIECE words from source block ids[i] of
        # tensor t to target block ids[num_blocks + i] of the same tensor. Tensors are reached
        # as word offsets from `base`; with peer access on, the side that is not this GPU's is
        # read or written over NVLink directly, with no staging buffer.
        i = tl.program_id(0)
        t = tl.program_id(1)
        src_off = tl.multiple_of(tl.load(src_off_ptr + t), ALIGN)
        dst_off = tl.multiple_of(tl.load(dst_off_ptr + t), ALIGN)
        s = base + src_off + tl.load(ids_ptr + i) * PIECE
        d = base + dst_off + tl.load(ids_ptr + num_blocks + i) * PIECE
        for start in tl.range(0, PIECE, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            if EVEN:
                tl.store(d + offs, tl.load(s + offs))
            else:
                mask = offs < PIECE
                tl.store(d + offs, tl.load(s + offs, mask=mask), mask=mask)

    return SimpleNamespace(copy_blocks=_copy_blocks_kernel)


def ensure_peer_access(device: torch.device, peer: torch.device) -> None:
    """Let kernels on `device` touch `peer`'s memory. torch enables peer access from a copy's
    source device to its target device on the first such copy, and remembers it."""
    if device != peer:
        torch.empty(1, device=device).to(peer)


class BlockCopier:
    """Block copies between two KV caches of the same layout with one kernel launch: every
    (block, layer tensor) piece goes straight from its source block to its target block, on
    `launch_device` (the source GPU by default: it pushes over NVLink, and stores need no
    round trip). Tables are built once per pair of caches; `copy` only uploads the block ids.
    `reason_unsupported` says why a pair cannot use it (then use `copy_blocks`' staged path)."""

    def __init__(
        self,
        src_k: list[torch.Tensor],
        src_v: list[torch.Tensor],
        dst_k: list[torch.Tensor],
        dst_v: list[torch.Tensor],
        launch_device: torch.device | None = None,
        block_words: int = 2048,
        num_warps: int = 4,
    ) -> None:
        reason = self.reason_unsupported(src_k, src_v, dst_k, dst_v)
        if reason:
            raise ValueError(f"no direct block copy: {reason}")
        self.src = [*src_k, *src_v]
        self.dst = [*dst_k, *dst_v]
        self.device = launch_device or src_k[0].device
        if self.device not in (src_k[0].device, dst_k[0].device):
            raise ValueError(f"launch the copy on the source or the target device, not {self.device}")
        piece_bytes = src_k[0][0].numel() * src_k[0].element_size()
        src_ptrs = [t.data_ptr() for t in self.src]
        dst_ptrs = [t.data_ptr() for t in self.dst]
        base = self.src[0] if self.src[0].device == self.device else self.dst[0]
        self.plan = word_plan(base.data_ptr(), src_ptrs, dst_ptrs, piece_bytes)
        self.piece_words = piece_bytes // self.plan.word_bytes
        # The kernel's one pointer: a cache tensor of the launching GPU, in its word type.
        self.base = base.view(-1).view(torch.uint8).view(_WORD_DTYPES[self.plan.word_bytes])
        self.src_off = torch.tensor(self.plan.src_offsets, dtype=torch.int64, device=self.device)
        self.dst_off = torch.tensor(self.plan.dst_offsets, dtype=torch.int64, device=self.device)
        self.block_words = min(block_words, 1 << max(0, (self.piece_words - 1).bit_length()))
        # The kernel's compile-time arguments: copy() launches the variant warm() compiles.
        self._launch = {"PIECE": self.piece_words, "ALIGN": self.plan.align_words, "BLOCK": self.block_words,
                        "EVEN": self.piece_words % self.block_words == 0, "num_warps": num_warps}
        for other in {self.src[0].device, self.dst[0].device} - {self.device}:
            ensure_peer_access(self.device, other)
        self._cuda = self.device.type == "cuda"
        # (pinned ids, event after its last upload was read), taken in turn.
        self._id_buffers: list[tuple[torch.Tensor, torch.cuda.Event]] = []
        self._next_ids = 0

    @staticmethod
    def reason_unsupported(
        src_k: list[torch.Tensor], src_v: list[torch.Tensor], dst_k: list[torch.Tensor], dst_v: list[torch.Tensor]
    ) -> str:
        tensors = [*src_k, *src_v, *dst_k, *dst_v]
        if any(t.device.type != "cuda" for t in tensors) and not (
            _interpreting() and all(t.device.type == "cpu" for t in tensors)
        ):
            return "not every KV tensor is on a GPU"
        if not triton_available():
            return "Triton is not installed"
        if len({(t.shape[1:], t.dtype) for t in tensors}) != 1 or len(src_k) != len(dst_k):
            return "the two caches differ in layout"
        if not all(t.is_contiguous() for t in tensors):
            return "a KV tensor is not contiguous"
        devices = {t.device for t in tensors}
        if len(devices) == 2:
            a, b = devices
            if not torch.cuda.can_device_access_peer(a.index or 0, b.index or 0):
                return f"{a} cannot access {b} directly (no peer access)"
        elif len(devices) > 2:
            return "KV tensors on more than two GPUs"
        return ""

    def warm(self) -> None:
        """Compile the kernel for this pair of caches now, without running it: a first
        compile costs the model thread up to a second, which a serving step must not pay."""
        if not self._cuda:
            return
        ids = torch.zeros(2, dtype=torch.int64, device=self.device)
        try:
            with torch.cuda.device(self.device):
                compiled = _kernels().copy_blocks.warmup(
                    self.base, self.src_off, self.dst_off, ids, 1, grid=(1, len(self.src)), **self._launch
                )
                # Triton's warmup compiles but leaves loading the binary and building its
                # launcher (a C stub compiled with the host compiler, where Triton's cache does
                # not hold it yet) to the first launch: 0.3-0.4 s of a serving step on a fresh
                # H100 machine (py-spy, RESULTS.md "KVBM run 10"). Done here instead.
                init_handles = getattr(compiled, "_init_handles", None)
                if init_handles is not None:
                    init_handles()
        except Exception as exc:  # a Triton without this warmup API: compiled at the first copy instead
            log.warning("block copy kernel not compiled ahead (%s); the first copy compiles it", exc)

    def copy(self, src_ids: list[int], dst_ids: list[int]) -> None:
        """Enqueue the copy on `launch_device`'s current stream (ordered after the forward
        pass that wrote the source blocks when that runs there); does not wait for it."""
        if len(src_ids) != len(dst_ids):
            raise ValueError(f"{len(src_ids)} source blocks but {len(dst_ids)} target blocks")
        if not src_ids:
            return
        source = self.src[0].device
        if self._cuda and source != self.device:
            # Pulling: the blocks were written on the source GPU's stream, not this one's.
            torch.cuda.current_stream(source).synchronize()
        # array('q') -> tensor is ~10x faster than torch.tensor(list) for thousands of ids.
        ids = torch.frombuffer(array("q", [*src_ids, *dst_ids]), dtype=torch.int64)
        if self._cuda:
            ids = self._upload(ids)
        grid = (len(src_ids), len(self.src))
        with torch.cuda.device(self.device) if self._cuda else _null():
            _kernels().copy_blocks[grid](self.base, self.src_off, self.dst_off, ids, len(src_ids), **self._launch)

    def _upload(self, ids: torch.Tensor) -> torch.Tensor:
        """Ids to the launching GPU through reused pinned buffers (pinning a fresh tensor per
        transfer costs more than the copy). A buffer is rewritten only once its event says
        the upload before has read it; one still being read is passed over for the next, or
        a new one while there are fewer than ID_BUFFERS, so the caller does not wait."""
        n = ids.numel()
        buffers = self._id_buffers
        index = -1
        for k in range(len(buffers)):
            i = (self._next_ids + k) % len(buffers)
            if buffers[i][1].query():
                index = i
                break
        if index < 0 and len(buffers) < ID_BUFFERS:
            buffers.append((torch.empty(0, dtype=torch.int64), torch.cuda.Event()))
            index = len(buffers) - 1
        if index < 0:  # every buffer still being read: the oldest is the next in turn
            index = self._next_ids % len(buffers)
            buffers[index][1].synchronize()
        pinned, read = buffers[index]
        if pinned.numel() < n:
            pinned = torch.empty(1 << (n - 1).bit_length(), dtype=torch.int64, pin_memory=True)
            buffers[index] = (pinned, read)
        self._next_ids = index + 1
        host = pinned[:n]
        host.copy_(ids)
        out = torch.empty(n, dtype=torch.int64, device=self.device)
        out.copy_(host, non_blocking=True)
        read.record(torch.cuda.current_stream(self.device))
        return out

    def synchronize(self) -> None:
        if self._cuda:
            torch.cuda.current_stream(self.device).synchronize()


def copy_blocks(
    src_k: list[torch.Tensor],
    src_v: list[torch.Tensor],
    src_ids: list[int],
    dst_k: list[torch.Tensor],
    dst_v: list[torch.Tensor],
    dst_ids: list[int],
    copier: BlockCopier | None = None,
) -> None:
    """Blocks from one cache to another, possibly on another GPU, with no bounce through host
    memory; returns once they have landed, so the caller may announce completion. On GPUs
    with Triton: one kernel that moves every block straight into the target (`copier`, or one
    built here). Otherwise, few long runs of consecutive ids: one copy per run and tensor;
    else gather into one buffer, one (peer) copy, scatter."""
    if len(src_ids) != len(dst_ids):
        raise ValueError(f"{len(src_ids)} source blocks but {len(dst_ids)} target blocks")
    if not src_ids:
        return
    if copier is None and not BlockCopier.reason_unsupported(src_k, src_v, dst_k, dst_v):
        copier = BlockCopier(src_k, src_v, dst_k, dst_v)
    if copier is not None:
        copier.copy(src_ids, dst_ids)
        copier.synchronize()
        return
    runs = block_runs(src_ids, dst_ids)
    if len(runs) * 2 <= len(src_ids):  # mostly contiguous: slices beat index copies
        for src, dst in ((src_k, dst_k), (src_v, dst_v)):
            for s_layer, d_layer in zip(src, dst):
                for s, d, n in runs:
                    d_layer[d : d + n].copy_(s_layer[s : s + n], non_blocking=True)
    else:
        _staged_copy(src_k, src_v, src_ids, dst_k, dst_v, dst_ids)
    for device in {src_k[0].device, dst_k[0].device}:
        if device.type == "cuda":
            torch.cuda.synchronize(device)


def _staged_copy(
    src_k: list[torch.Tensor],
    src_v: list[torch.Tensor],
    src_ids: list[int],
    dst_k: list[torch.Tensor],
    dst_v: list[torch.Tensor],
    dst_ids: list[int],
) -> None:
    """Gather on the source device, one (peer) copy of the whole buffer, scatter on the
    target: the path without Triton (41% of the peer-copy ceiling on H200s: three passes)."""
    staging = gather_blocks(src_k, src_v, src_ids)
    dst_device = dst_k[0].device
    if staging.device != dst_device:
        if dst_device.type == "cuda" and staging.device.type == "cuda":
            # Order the peer copy after the gather on the source device's stream.
            torch.cuda.current_stream(staging.device).synchronize()
        with torch.cuda.device(dst_device) if dst_device.type == "cuda" else _null():
            landed = torch.empty_like(staging, device=dst_device)
            landed.copy_(staging)
            scatter_blocks(dst_k, dst_v, dst_ids, landed)
    else:
        scatter_blocks(dst_k, dst_v, dst_ids, staging)


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def export_handles(tensors: list[torch.Tensor]) -> bytes:
    """CUDA IPC handles of `tensors` (torch.multiprocessing's reduction: cudaIpcGetMemHandle
    on each tensor's storage), serialized for the peer."""
    from torch.multiprocessing.reductions import reduce_tensor

    return pickle.dumps([reduce_tensor(t)[1] for t in tensors])


class _TorchOnlyUnpickler(pickle.Unpickler):
    """Handles come from the network: allow only the torch types a handle tuple contains."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" or module.startswith("torch."):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing {module}.{name} in CUDA IPC handles")


def open_handles(data: bytes) -> list[torch.Tensor]:
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    return [rebuild_cuda_tensor(*args) for args in _TorchOnlyUnpickler(io.BytesIO(data)).load()]
