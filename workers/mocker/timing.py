"""The mocker's timing model: how long one engine step takes, as a roofline of an 8B Llama in
bf16 on one H100 SXM, divided by the speedup ratio.

Where the numbers come from
---------------------------
A step runs one forward pass over every token scheduled in it (prefill chunks and one token
per decoding request). It is bound by whichever is slower, moving bytes or doing FLOPs, plus a
fixed per-step cost:

    step = overhead + max(bytes / HBM bandwidth, FLOPs / compute)

- Weights: Llama 3 8B has 8.03e9 parameters, 16.06 GB in bf16, read once per step.
- HBM: the H100 SXM's 3.35 TB/s; ~90% is reachable, so 3.0e12 B/s. Weights alone take
  16.06e9 / 3.0e12 = 5.35 ms: the floor of every step.
- KV reads: 32 layers x 8 KV heads x 128 dims x (K and V) x 2 bytes = 128 KiB per token of
  context, read by every step that attends over it. 64 requests x 2k tokens = 16.8 GB: 5.6 ms.
- FLOPs: 2 x 8.03e9 per token for the matmuls, plus attention, 4 x layers x hidden per
  (query, key) pair. The H100's dense bf16 peak is 989 TFLOP/s; prefill kernels reach ~45%,
  so 450e12 FLOP/s.
- Overhead: ~2 ms a step for launches, sampling and the scheduler (measured vLLM decode steps
  at batch 1 run 7-8 ms against the 5.35 ms weight floor).

- Grammar masks (structured outputs): the engine fills the constrained rows' token bitmasks on
  CPU threads while the GPU runs the forward pass, then copies and applies them: ~40 us a step
  with any constrained row, plus whatever part of the fill (~30 us a row over 8 threads for a
  128k vocabulary) outlasts the forward pass, which at 8B it never does.

Resulting figures (speedup 1): a decode step at batch 1 takes ~7.4 ms; at batch 64 with 2k
tokens of context each ~13 ms; a 2048-token prefill ~77 ms, ~26k prompt tokens/s.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class TimingModel:
    """Durations of engine steps in seconds of (sped-up) wall time."""

    num_params: float = 8.03e9
    weight_bytes: float = 16.06e9
    num_layers: int = 32
    hidden_size: int = 4096
    kv_bytes_per_token: int = 32 * 8 * 128 * 2 * 2
    hbm_bytes_per_s: float = 3.0e12
    flops_per_s: float = 450e12
    step_overhead_s: float = 2.0e-3
    mask_apply_s: float = 40e-6
    mask_fill_s_per_row: float = 30e-6
    mask_fill_threads: int = 8
    speedup_ratio: float = 1.0

    def step_time_s(self, num_tokens: int, kv_tokens: int, attn_pairs: int) -> float:
        """One forward pass over `num_tokens` new tokens that attend over `kv_tokens` of KV
        (new ones included) in `attn_pairs` (query, key) pairs in all."""
        return self.model_time_s(num_tokens, kv_tokens, attn_pairs) / self.speedup_ratio

    def model_time_s(self, num_tokens: int, kv_tokens: int, attn_pairs: int) -> float:
        """step_time_s on the modelled hardware, before the speedup ratio."""
        if num_tokens <= 0:
            return 0.0
        flops = 2.0 * self.num_params * num_tokens + 4.0 * self.num_layers * self.hidden_size * attn_pairs
        bytes_moved = self.weight_bytes + self.kv_bytes_per_token * kv_tokens
        return self.step_overhead_s + max(flops / self.flops_per_s, bytes_moved / self.hbm_bytes_per_s)

    def grammar_time_s(self, constrained_rows: int, forward_s: float) -> float:
        """What masking `constrained_rows` rows adds to a step whose forward pass takes
        `forward_s` (modelled seconds, before the speedup ratio)."""
        if constrained_rows <= 0:
            return 0.0
        fill_s = constrained_rows * self.mask_fill_s_per_row / self.mask_fill_threads
        return self.mask_apply_s + max(0.0, fill_s - forward_s)

    def prefill_time_s(self, num_new_tokens: int, num_cached_tokens: int = 0) -> float:
        """One request's prompt in a single step, its first `num_cached_tokens` already cached."""
        return self.step_time_s(
            num_new_tokens,
            num_cached_tokens + num_new_tokens,
            attn_pairs(num_cached_tokens, num_new_tokens),
        )

    def decode_time_s(self, batch_size: int, context_tokens_per_seq: int) -> float:
        """One decode step for `batch_size` requests of `context_tokens_per_seq` tokens each."""
        return self.step_time_s(
            batch_size,
            batch_size * context_tokens_per_seq,
            batch_size * context_tokens_per_seq,
        )


def attn_pairs(num_computed: int, num_new: int) -> int:
    """(query, key) pairs of causal attention for `num_new` tokens after `num_computed`."""
    return num_new * num_computed + num_new * (num_new + 1) // 2
