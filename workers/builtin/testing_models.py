"""Builds random-weight Llama/Qwen2/Qwen3-shaped models in Hugging Face format, for tests and
benchmarks that need a model of a given shape and no download (uses transformers to write it)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True, slots=True)
class TinyModelSpec:
    architecture: str = "LlamaForCausalLM"  # or Qwen2ForCausalLM, Qwen3ForCausalLM
    vocab_size: int = 512
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 32
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 512
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    # Larger than HF's 0.02 so that logits are peaked and greedy paths vary with the prompt.
    initializer_range: float = 0.1
    eos_token_id: int = 1
    seed: int = 0
    dtype: str = "float32"
    extra: dict[str, Any] = field(default_factory=dict)


# Shapes unlike the default model's, for tests: head counts, GQA ratios, head dims, tied or
# untied embeddings, RoPE scaling, Qwen2 biases, Qwen3 q/k norms.
SHAPES: dict[str, TinyModelSpec] = {
    # GQA 2:1, head_dim 32, untied
    "llama-gqa": TinyModelSpec(),
    # MHA, head_dim 64, tied embeddings, 3 layers
    "llama-mha-tied": TinyModelSpec(
        hidden_size=128, num_heads=2, num_kv_heads=2, head_dim=64, num_layers=3, tie_word_embeddings=True, seed=1
    ),
    # GQA 4:1 with head_dim != hidden / heads, llama3 RoPE scaling
    "llama-mqa-llama3": TinyModelSpec(
        hidden_size=96, num_heads=4, num_kv_heads=1, head_dim=32, seed=2,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    ),
    "qwen2-bias": TinyModelSpec(architecture="Qwen2ForCausalLM", seed=3, tie_word_embeddings=True),
    "qwen3-qknorm": TinyModelSpec(architecture="Qwen3ForCausalLM", seed=4),
}


def hf_config(spec: TinyModelSpec) -> Any:
    import transformers

    kwargs: dict[str, Any] = dict(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        head_dim=spec.head_dim,
        tie_word_embeddings=spec.tie_word_embeddings,
        max_position_embeddings=spec.max_position_embeddings,
        rope_theta=spec.rope_theta,
        rope_scaling=spec.rope_scaling,
        initializer_range=spec.initializer_range,
        bos_token_id=0,
        eos_token_id=spec.eos_token_id,
        pad_token_id=0,
        torch_dtype=spec.dtype,
        **spec.extra,
    )
    config_cls = {
        "LlamaForCausalLM": transformers.LlamaConfig,
        "Qwen2ForCausalLM": transformers.Qwen2Config,
        "Qwen3ForCausalLM": transformers.Qwen3Config,
    }[spec.architecture]
    config = config_cls(**kwargs)
    config.architectures = [spec.architecture]
    return config


def build_random_model(spec: TinyModelSpec, out_dir: str | Path) -> Path:
    """Writes config.json, generation_config.json and model.safetensors into `out_dir`."""
    import torch
    import transformers

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = hf_config(spec)
    torch.manual_seed(spec.seed)
    model = getattr(transformers, spec.architecture)(config).to(getattr(torch, spec.dtype))
    model.save_pretrained(out, safe_serialization=True)
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": spec.eos_token_id}) + "\n")
    return out


def load_hf_model(model_dir: str | Path, dtype: str = "float64") -> Any:
    """The same weights in transformers, as the reference implementation."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=getattr(torch, dtype), attn_implementation="eager"
    )
    return model.eval()
