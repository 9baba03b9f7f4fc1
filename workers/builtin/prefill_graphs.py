"""CUDA graphs for steps with prefill chunks: one graph per token-count bucket, captured over
static buffers, as cuda_graphs.py does for pure-decode steps. An eager prefill step launches
~80 Triton kernels and ~65 products from Python, 5.5 ms of host time for a 4 x 512-token step
that an H100 runs in 7.9 ms (benchmarks/prefill_host_gpu.py, RESULTS.md "Norm warps"), so a host
~1.45x slower or busier leaves the GPU waiting. A graph replays them in one call.

Every input of the Triton path is a device tensor (the varlen prefill kernel finds each tile's
sequence on the device), so a step pads into its bucket: tokens past the step's own get slot -1
(no K/V written) and belong to no sequence; sequences past the step's own have no new tokens and
length 0, so their programs return at once. No attention program writes a padded token's row, so
those rows carry whatever the output buffer held (Triton's interpreter may warn of an overflow in
the norm after them); every later op is row-wise and only the sampled rows are read, so no real
row sees them. The rows sampled are gathered inside the graph (the LM head runs over `max_seqs`
rows; rows past the step's sampled ones read row 0 and are dropped). On by default on CUDA
(--no-prefill-cuda-graphs turns them off): on an H100 they took 4 x 512 tokens from 40-62% to
70-72% of the matmul peak (benchmarks/RESULTS.md)."""

from __future__ import annotations

import numpy as np
import torch

from workers.builtin.attention import AttentionMetadata, SeqSlice, new_token_slots
from workers.builtin.cuda_graphs import BucketGraphs, bucket_for
from workers.builtin.kv_cache import KVCache
from workers.builtin.model import LlamaForCausalLM

# Token buckets: powers of two from 64 up to the step's token budget.
MIN_BUCKET = 64


def token_buckets(max_tokens: int) -> list[int]:
    sizes = []
    size = MIN_BUCKET
    while size < max_tokens:
        sizes.append(size)
        size *= 2
    sizes.append(max_tokens)
    return sizes


class PrefillInputs:
    """Static device buffers the graphs read and two sets of pinned host mirrors filled in turn
    (DecodeInputs' scheme: a set is refilled only after the step that used it was collected)."""

    def __init__(self, max_tokens: int, max_seqs: int, max_blocks_per_seq: int, device: torch.device) -> None:
        pin = device.type == "cuda"
        self.max_tokens, self.max_seqs = max_tokens, max_seqs

        def host() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            # device="cpu" stated: under a torch.device context a bare zeros() would not be on the host.
            return (torch.zeros((3, max_tokens), dtype=torch.long, device="cpu", pin_memory=pin),
                    torch.zeros((3, max_seqs + 1), dtype=torch.int32, device="cpu", pin_memory=pin),
                    torch.zeros((max_seqs, max_blocks_per_seq), dtype=torch.int32, device="cpu", pin_memory=pin))
        self._host = [host(), host()]
        self._turn = 0
        # ids, positions, slots | query starts, sequence lengths, sampled rows | block tables
        self.tokens = torch.zeros((3, max_tokens), dtype=torch.long, device=device)
        self.seqs = torch.zeros((3, max_seqs + 1), dtype=torch.int32, device=device)
        self.block_tables = torch.zeros((max_seqs, max_blocks_per_seq), dtype=torch.int32, device=device)
        self.input_ids, self.positions, self.slot_mapping = self.tokens.unbind(0)
        self.query_starts, seq_lens, sample = self.seqs.unbind(0)
        self.seq_lens, self.sample_rows = seq_lens[:max_seqs], sample[:max_seqs]
        self.slot_mapping.fill_(-1)

    def fill(self, input_ids: list[int], positions: list[int], seqs: list[SeqSlice], sample_indices: list[int],
             padded: int, block_size_tokens: int) -> None:
        """Write a step into the host mirrors (tokens past its own up to `padded` as padding),
        then copy to the device without waiting."""
        n, num_seqs = len(input_ids), len(seqs)
        tok_host, seq_host, table_host = self._host[self._turn]
        self._turn ^= 1
        tok, seq, table = tok_host.numpy(), seq_host.numpy(), table_host.numpy()
        tok[0, :n], tok[1, :n], tok[2, :n] = input_ids, positions, new_token_slots(seqs, block_size_tokens)
        tok[0, n:padded], tok[1, n:padded], tok[2, n:padded] = 0, 0, -1
        num_new = np.fromiter((s.num_new for s in seqs), dtype=np.int32, count=num_seqs)
        seq[0, 0] = 0
        np.cumsum(num_new, out=seq[0, 1 : num_seqs + 1])
        seq[0, num_seqs + 1 :] = n  # padded sequences: no new tokens
        seq[1, :num_seqs] = [s.num_computed + s.num_new for s in seqs]
        seq[1, num_seqs:] = 0
        seq[2, : len(sample_indices)] = sample_indices
        seq[2, len(sample_indices) :] = 0
        width = table.shape[1]
        for i, s in enumerate(seqs):
            used = -(-(s.num_computed + s.num_new) // block_size_tokens)
            if used > width:
                raise ValueError(f"sequence needs {used} blocks; graphs were captured for {width}")
            table[i, :used] = s.block_ids[:used]
        # Whole: a column slice is not contiguous, and torch may stage such a copy through
        # pageable memory (which waits for the stream); 24 bytes a token of the largest bucket.
        self.tokens.copy_(tok_host, non_blocking=True)
        self.seqs.copy_(seq_host, non_blocking=True)
        self.block_tables[:num_seqs].copy_(table_host[:num_seqs], non_blocking=True)
        # Rows of sequences this step does not have keep older tables: their length is 0, so
        # no program reads them.

    def metadata(self, tokens: int, block_size_tokens: int) -> AttentionMetadata:
        empty = torch.empty(0, device=self.tokens.device)
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:tokens], block_tables=self.block_tables, query_index=empty.long(),
            mask=empty.bool(), num_seqs=self.max_seqs, max_q=tokens,
            max_kv=self.block_tables.shape[1] * block_size_tokens,
            seq_lens=self.seq_lens, query_starts=self.query_starts,
        )


class PrefillGraphs(BucketGraphs):
    """Logits [max_seqs, vocab] of a step with prefill chunks by graph replay, the first
    len(sample_indices) rows the sampled ones."""

    def __init__(self, model: LlamaForCausalLM, kv: KVCache, device: torch.device, max_tokens: int, max_seqs: int,
                 max_blocks_per_seq: int, use_graphs: bool = True, feedback: torch.Tensor | None = None) -> None:
        super().__init__(token_buckets(max_tokens), use_graphs)
        self.model, self.kv, self.feedback = model, kv, feedback
        self.inputs = PrefillInputs(self.sizes[-1], max_seqs, max_blocks_per_seq, device)

    def _forward(self, tokens: int) -> torch.Tensor:
        inp = self.inputs
        meta = inp.metadata(tokens, self.kv.block_size_tokens)
        hidden = self.model(inp.input_ids[:tokens], inp.positions[:tokens], self.kv, meta, self.feedback)
        return self.model.compute_logits(hidden.index_select(0, inp.sample_rows.long()))

    def fits(self, num_tokens: int, num_seqs: int) -> int | None:
        """The bucket a step of `num_tokens` over `num_seqs` sequences replays, or None."""
        if num_seqs > self.inputs.max_seqs:
            return None
        return bucket_for(num_tokens, self.sizes)

    def run(self, input_ids: list[int], positions: list[int], seqs: list[SeqSlice], sample_indices: list[int],
            tokens: int) -> torch.Tensor:
        """Logits of the sampled rows, in sample_indices' order; `tokens` is fits(...)."""
        self.inputs.fill(input_ids, positions, seqs, sample_indices, tokens, self.kv.block_size_tokens)
        return self._replay(tokens)[: len(sample_indices)]
