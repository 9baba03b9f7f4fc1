"""CUDA graphs for pure-decode steps: one graph per batch-size bucket, captured over static
input buffers (token ids, positions, slot mapping, block tables, sequence lengths); a step is
padded up to its bucket, its inputs copied in from pinned memory, and the graph replayed.
BucketGraphs, the capture and replay, also serves prefill_graphs.py."""

from __future__ import annotations

import bisect
from abc import ABC, abstractmethod

import torch

from workers.builtin.attention import AttentionMetadata, SeqSlice, decode_slots_and_tables
from workers.builtin.kv_cache import KVCache
from workers.builtin.model import LlamaForCausalLM

MAX_GRAPH_BATCH = 256


def capture_sizes(max_num_seqs: int) -> list[int]:
    """Buckets: small powers of two, then every 16, up to max_num_seqs (capped at 256; a larger
    decode batch runs eagerly)."""
    cap = min(max_num_seqs, MAX_GRAPH_BATCH)
    sizes = [s for s in (1, 2, 4, 8) if s <= cap] + list(range(16, cap + 1, 16))
    if sizes[-1] != cap:
        sizes.append(cap)
    return sizes


def bucket_for(count: int, sizes: list[int]) -> int | None:
    """The smallest captured size (sequences, or prefill_graphs.py's tokens) that holds `count`,
    or None when none does."""
    i = bisect.bisect_left(sizes, count)
    return sizes[i] if i < len(sizes) else None


class DecodeInputs:
    """Static device buffers that graphs read, and pinned host mirrors that each step fills
    (through numpy views, so a step costs no per-row tensor ops). Two sets of mirrors, used in
    turn: with the overlap loop a step is filled while the previous one's copies may still wait
    in the stream, and a set is filled again only after the step that used it was collected."""

    def __init__(self, max_batch: int, max_blocks_per_seq: int, device: torch.device) -> None:
        pin = device.type == "cuda"
        # Token ids, positions, slots and lengths share one buffer: one copy a step, not four.
        self._host = [
            (torch.zeros((4, max_batch), dtype=torch.long, device="cpu", pin_memory=pin),
             torch.zeros((max_batch, max_blocks_per_seq), dtype=torch.int32, device="cpu", pin_memory=pin))
            for _ in range(2)
        ]
        self._turn = 0
        self.pack = torch.zeros((4, max_batch), dtype=torch.long, device=device)
        self.input_ids, self.positions, self.slot_mapping, self.seq_lens = self.pack.unbind(0)
        self.block_tables = torch.zeros((max_batch, max_blocks_per_seq), dtype=torch.int32, device=device)
        self.slot_mapping.fill_(-1)  # what a padded row holds: no cache slot

    def fill(self, input_ids: list[int], seqs: list[SeqSlice], padded: int, block_size_tokens: int) -> None:
        """Write a decode step into the host mirrors, rows past len(seqs) up to `padded` as
        padding (slot -1, length 0: they write no KV and read none), then copy to the device
        without waiting. The copies of the step before the previous one are done: it was
        collected (its sampling synchronised)."""
        n = len(seqs)
        positions, slots, seq_lens, tables = decode_slots_and_tables(seqs, block_size_tokens)
        host_pack, host_tables = self._host[self._turn]
        self._turn ^= 1
        pack = host_pack.numpy()
        table = host_tables.numpy()
        pack[0, :n], pack[1, :n], pack[2, :n], pack[3, :n] = input_ids, positions, slots, seq_lens
        pack[0, n:padded], pack[1, n:padded], pack[2, n:padded], pack[3, n:padded] = 0, 0, -1, 0
        width = table.shape[1]
        for i, row in enumerate(tables):
            if len(row) > width:
                raise ValueError(f"sequence needs {len(row)} blocks; graphs were captured for {width}")
            table[i, : len(row)] = row
        self.pack.copy_(host_pack, non_blocking=True)  # whole: contiguous, a few KB
        self.block_tables[:padded].copy_(host_tables[:padded], non_blocking=True)

    def metadata(self, batch: int, block_size_tokens: int) -> AttentionMetadata:
        empty = torch.empty(0, device=self.input_ids.device)
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:batch],
            block_tables=self.block_tables[:batch],
            query_index=empty.long(),
            mask=empty.bool(),
            num_seqs=batch,
            max_q=1,
            max_kv=self.block_tables.shape[1] * block_size_tokens,
            seq_lens=self.seq_lens[:batch],
        )


class BucketGraphs(ABC):
    """One CUDA graph per bucket size over static inputs that `_forward(size)` reads, each
    returning the logits it computed. With `use_graphs` False the same padded static-buffer
    step runs eagerly (how CPU tests exercise the padding logic)."""

    def __init__(self, sizes: list[int], use_graphs: bool) -> None:
        self.sizes = sizes
        self.use_graphs = use_graphs
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    @abstractmethod
    def _forward(self, size: int) -> torch.Tensor:
        """The bucket's forward pass over the static inputs: its logits."""

    @torch.inference_mode()
    def capture(self) -> None:
        """Largest bucket first, so the smaller ones reuse its memory from the shared pool. The
        buffers hold padding only (slot -1, length 0): capture touches no cache block."""
        if not self.use_graphs:
            return
        pool = None
        for size in reversed(self.sizes):
            self._forward(size)  # warm-up outside capture: Triton compiles, cuBLAS picks
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = self._forward(size)
            pool = graph.pool()
            self._graphs[size] = (graph, logits)
        torch.cuda.synchronize()

    def _replay(self, size: int) -> torch.Tensor:
        """The bucket's logits for the inputs just filled in."""
        if not self.use_graphs:
            return self._forward(size)
        graph, logits = self._graphs[size]
        graph.replay()
        return logits


class DecodeGraphs(BucketGraphs):
    """Logits [bucket, vocab] of a decode step by graph replay."""

    def __init__(
        self, model: LlamaForCausalLM, kv: KVCache, device: torch.device, sizes: list[int],
        max_blocks_per_seq: int, use_graphs: bool = True, feedback: torch.Tensor | None = None,
    ) -> None:
        super().__init__(sizes, use_graphs)
        self.model = model
        # The previous step's chosen ids on the device: placeholders in the inputs read them
        # inside the graph (runner.StepInput).
        self.feedback = feedback
        self.kv = kv
        self.inputs = DecodeInputs(sizes[-1], max_blocks_per_seq, device)

    def _forward(self, batch: int) -> torch.Tensor:
        inp = self.inputs
        meta = inp.metadata(batch, self.kv.block_size_tokens)
        hidden = self.model(inp.input_ids[:batch], inp.positions[:batch], self.kv, meta, self.feedback)
        return self.model.compute_logits(hidden)

    def bucket(self, num_seqs: int) -> int | None:
        return bucket_for(num_seqs, self.sizes)

    def run(self, input_ids: list[int], seqs: list[SeqSlice], batch: int) -> torch.Tensor:
        """Logits of the first len(seqs) rows; `batch` is bucket(len(seqs))."""
        self.inputs.fill(input_ids, seqs, batch, self.kv.block_size_tokens)
        return self._replay(batch)[: len(seqs)]

