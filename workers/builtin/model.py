"""The Llama-family forward pass (Llama 2/3, Mistral, Qwen2, Qwen3) over a flat batch of tokens:
RMSNorm, RoPE (default, linear, llama3, dynamic-NTK), GQA attention over the paged KV cache,
SwiGLU MLP, tied or untied embeddings. q/k/v and gate/up are fused into one matmul each. With the
Triton backend (CUDA) a second forward fuses residual adds, norms, RoPE and SiLU into Triton
kernels; the plain one stays the reference that matches transformers on CPU."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from workers.builtin import gpu_kernels
from workers.builtin.attention import AttentionBackend, AttentionMetadata, paged_attention
from workers.builtin.config import ModelConfig, RopeScaling
from workers.builtin.kv_cache import KVCache


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In fp32 whatever the model dtype (even fp64), exactly as Hugging Face does, so that
        # greedy outputs match it token for token.
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def rope_inv_freq(config: ModelConfig) -> tuple[torch.Tensor, int]:
    """Inverse frequencies (fp32, on CPU even under a meta device context) and the longest
    position they are meant for."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim))
    scaling: RopeScaling = config.rope_scaling
    max_pos = config.max_position_embeddings
    if scaling.rope_type == "linear":
        inv_freq = inv_freq / scaling.factor
        max_pos = int(max_pos * scaling.factor)
    elif scaling.rope_type == "llama3":
        old_len = scaling.original_max_position_embeddings or 8192
        low_wavelen = old_len / scaling.low_freq_factor
        high_wavelen = old_len / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
        smooth = (old_len / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
        smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv_freq = torch.where(medium, smoothed, scaled)
    elif scaling.rope_type == "dynamic":
        # vLLM's static form of dynamic NTK: one base, chosen for the scaled length. It equals
        # plain RoPE's positions only up to the original length's worth of rotation.
        max_pos = int(max_pos * scaling.factor)
        base = config.rope_theta * (
            (scaling.factor * max_pos / config.max_position_embeddings) - (scaling.factor - 1)
        ) ** (dim / (dim - 2))
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim))
    return inv_freq, max_pos


class RotaryEmbedding(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.inv_freq, self.max_positions = rope_inv_freq(config)
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)
        self.build(torch.device("cpu"))

    def build(self, device: torch.device) -> None:
        """(Re)compute the fp32 tables on `device`; the loader calls it after materialising
        the model from the meta device and converting its dtype."""
        positions = torch.arange(self.max_positions, dtype=torch.float32, device="cpu")
        freqs = positions[:, None] * self.inv_freq[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        self.cos = emb.cos().to(device)
        self.sin = emb.sin().to(device)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [T, 1, head_dim], broadcast over heads."""
        return self.cos[positions].to(dtype).unsqueeze(1), self.sin[positions].to(dtype).unsqueeze(1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, backend: AttentionBackend) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim**-0.5
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.backend = backend

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: KVCache, meta: AttentionMetadata
    ) -> torch.Tensor:
        tokens = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(tokens, self.num_heads, self.head_dim)
        k = k.view(tokens, self.num_kv_heads, self.head_dim)
        v = v.view(tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = self.backend.forward(q, k, v, kv.k[self.layer_idx], kv.v[self.layer_idx], meta, self.scale)
        return self.o_proj(out.reshape(tokens, self.q_size))

    def forward_fused(
        self, x: torch.Tensor, positions: torch.Tensor, rotary: RotaryEmbedding, kv: KVCache, meta: AttentionMetadata
    ) -> torch.Tensor:
        """[T, hidden]; in a decode step whose o projection is split (gpu_kernels.DECODE_SPLIT_K),
        its fp32 partials [parts, T, hidden], which the next norm sums."""
        tokens = x.shape[0]
        decode = fused_decode(meta)
        qkv = project("qkv", self.qkv_proj, x, decode)  # partials: summed by the decode kernel
        # Qwen3's per-head norms come before RoPE, in the same kernel.
        qk_norm = None
        if self.q_norm is not None and self.k_norm is not None:
            qk_norm = (self.q_norm.weight, self.k_norm.weight, self.q_norm.eps)
        k_cache, v_cache = kv.k[self.layer_idx], kv.v[self.layer_idx]
        if decode and meta.seq_lens is not None:
            # A pure-decode step: RoPE, the K/V write and attention in one kernel.
            out = gpu_kernels.rope_decode_attention(
                qkv, positions, rotary.cos, rotary.sin, self.num_heads, k_cache, v_cache, meta.slot_mapping,
                meta.block_tables, meta.seq_lens, self.scale, qk_norm,
            )
        else:
            # RoPE and the K/V cache write in one kernel, then attention reads K/V in place.
            gpu_kernels.rope_store_kv(
                qkv, positions, rotary.cos, rotary.sin, self.num_heads, self.num_kv_heads, self.head_dim,
                k_cache, v_cache, meta.slot_mapping, qk_norm,
            )
            q = qkv[:, : self.q_size].view(tokens, self.num_heads, self.head_dim)
            out = paged_attention(q, k_cache, v_cache, meta, self.scale)
        return project("o", self.o_proj, out.reshape(tokens, self.q_size), decode)  # partials: summed by the next norm


def fused_decode(meta: AttentionMetadata) -> bool:
    """A pure-decode step on the fused path: RoPE inside the attention kernel, and projections
    that may be split (gpu_kernels.DECODE_SPLIT_K)."""
    return meta.query_starts is None and meta.seq_lens is not None and gpu_kernels.DECODE_FUSED_ROPE


def project(name: str, linear: nn.Linear, x: torch.Tensor, decode: bool) -> torch.Tensor:
    """linear(x); in a fused decode step (`decode`) whose `name` projection ("qkv", "o" or
    "down") is split, its fp32 partials [parts, T, out] instead, which its consumer sums as it
    reads them; through the Triton skinny kernel where gpu_kernels.DECODE_TRITON names it."""
    parts = gpu_kernels.decode_split_k(name, x.shape[0], linear.weight, linear.bias) if decode else 1
    tiling = gpu_kernels.decode_triton(name, x.shape[0], linear.weight, parts) if decode and linear.bias is None else None
    if tiling is not None:  # its K slices may differ from DECODE_SPLIT_K's: the consumers sum any number
        return gpu_kernels.skinny_linear(x, linear.weight, tiling)
    if parts > 1:
        return gpu_kernels.split_k_linear(x, linear.weight, parts)
    return linear(x)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.intermediate = config.intermediate_size
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, backend: AttentionBackend) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx, backend)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(
        self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: KVCache, meta: AttentionMetadata
    ) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, kv, meta)
        return h + self.mlp(self.post_attention_layernorm(h))

    def forward_fused(
        self, h: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor,
        rotary: RotaryEmbedding, kv: KVCache, meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's output before its last residual add (in a decode step whose down projection
        is split, its fp32 partials), and the residual: the next norm does that add (and sums
        the partials) in the same kernel."""
        norm1, norm2 = self.input_layernorm, self.post_attention_layernorm
        x, residual = gpu_kernels.rms_norm(h, norm1.weight, norm1.eps, residual)
        h = self.self_attn.forward_fused(x, positions, rotary, kv, meta)
        x, residual = gpu_kernels.rms_norm(h, norm2.weight, norm2.eps, residual)
        decode = fused_decode(meta)
        gate_up = self.mlp.gate_up_proj.weight
        tiling = gpu_kernels.decode_triton("gate_up", x.shape[0], gate_up) if decode else None
        if tiling is not None:
            act = gpu_kernels.gate_up_silu(x, gate_up, tiling)
        else:
            act = gpu_kernels.silu_mul(self.mlp.gate_up_proj(x))
        return project("down", self.mlp.down_proj, act, decode), residual


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, backend: AttentionBackend) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i, backend) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """Parameter names follow Hugging Face's, but for the fused qkv_proj and gate_up_proj
    (see loader.PACKED_MODULES)."""

    def __init__(self, config: ModelConfig, backend: AttentionBackend) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, backend)
        self.rotary = RotaryEmbedding(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.fused = bool(getattr(backend, "fused_ops", False))

    @property
    def max_positions(self) -> int:
        return self.rotary.max_positions

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, kv: KVCache, meta: AttentionMetadata,
        feedback: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Hidden states [T, hidden] of a flat batch of tokens; their K/V go into `kv`. With
        `feedback`, an input id -(r + 1) stands for feedback[r] (runner.StepInput)."""
        if self.fused:
            return self._forward_fused(input_ids, positions, kv, meta, feedback)
        if feedback is not None:
            input_ids = torch.where(input_ids >= 0, input_ids, feedback[(-1 - input_ids).clamp(min=0)])
        h = self.model.embed_tokens(input_ids)
        cos, sin = self.rotary(positions, h.dtype)
        for layer in self.model.layers:
            h = layer(h, cos, sin, kv, meta)
        return self.model.norm(h)

    def _forward_fused(
        self, input_ids: torch.Tensor, positions: torch.Tensor, kv: KVCache, meta: AttentionMetadata,
        feedback: torch.Tensor | None,
    ) -> torch.Tensor:
        if feedback is not None:
            h = gpu_kernels.embed(input_ids, feedback, self.model.embed_tokens.weight)
        else:
            h = self.model.embed_tokens(input_ids)
        residual: torch.Tensor | None = None
        for layer in self.model.layers:
            h, residual = layer.forward_fused(h, residual, positions, self.rotary, kv, meta)  # type: ignore[operator]
        norm = self.model.norm
        return gpu_kernels.rms_norm(h, norm.weight, norm.eps, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)
