"""The model's shape, read and checked from a Hugging Face model directory (config.json,
generation_config.json), with clear errors for missing files and unsupported architectures."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Architectures whose checkpoints map onto model.py's layout (Llama, Mistral, Qwen2, Qwen3).
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}


class ModelConfigError(ValueError):
    """The model directory is missing something or describes a model this engine cannot run."""


@dataclass(frozen=True, slots=True)
class RopeScaling:
    """rope_scaling from config.json; rope_type "default" means none."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    original_max_position_embeddings: int | None = None


@dataclass(frozen=True, slots=True)
class ModelConfig:
    model_dir: Path
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling = RopeScaling()
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2: q/k/v projections carry biases
    qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and k before RoPE
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str | None = None
    weight_files: tuple[Path, ...] = field(default=())

    @property
    def kv_elements_per_token(self) -> int:
        """K and V elements one token occupies across all layers; times the dtype size is bytes."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim


def load_model_config(model_dir: str | Path) -> ModelConfig:
    path = Path(model_dir)
    if not path.is_dir():
        raise ModelConfigError(f"model directory {path} does not exist")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ModelConfigError(f"{path} has no config.json; expected a Hugging Face model directory")
    raw: dict[str, Any] = json.loads(config_path.read_text())
    archs = raw.get("architectures") or []
    # A base model (`Qwen3Model`, as AutoModel saves embedding checkpoints) is the causal LM
    # without its head: the same layers.
    arch = next(
        (c for a in archs for c in (a, a.removesuffix("Model") + "ForCausalLM") if c in SUPPORTED_ARCHITECTURES), None
    )
    if arch is None:
        raise ModelConfigError(
            f"{config_path}: architectures {archs or '(none)'} not supported by the builtin engine; "
            f"it runs {', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
        )
    if raw.get("hidden_act", "silu") != "silu":
        raise ModelConfigError(f"{config_path}: hidden_act {raw['hidden_act']!r} not supported (silu only)")
    if raw.get("mlp_bias"):
        raise ModelConfigError(f"{config_path}: mlp_bias is not supported")
    if raw.get("sliding_window") and raw.get("use_sliding_window", arch == "MistralForCausalLM"):
        max_pos = raw.get("max_position_embeddings", 0)
        if raw["sliding_window"] < max_pos:
            raise ModelConfigError(f"{config_path}: sliding-window attention is not supported")

    num_heads = _required(raw, "num_attention_heads", config_path)
    hidden = _required(raw, "hidden_size", config_path)
    num_kv_heads = raw.get("num_key_value_heads") or num_heads
    head_dim = raw.get("head_dim") or hidden // num_heads
    if num_heads % num_kv_heads:
        raise ModelConfigError(f"{config_path}: {num_heads} heads not divisible by {num_kv_heads} KV heads")

    return ModelConfig(
        model_dir=path,
        architecture=arch,
        vocab_size=_required(raw, "vocab_size", config_path),
        hidden_size=hidden,
        intermediate_size=_required(raw, "intermediate_size", config_path),
        num_layers=_required(raw, "num_hidden_layers", config_path),
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        max_position_embeddings=raw.get("max_position_embeddings", 2048),
        rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
        # transformers >= 5 writes rope_parameters (theta inside); older files rope_scaling.
        rope_theta=float((raw.get("rope_parameters") or {}).get("rope_theta") or raw.get("rope_theta", 10000.0)),
        rope_scaling=_rope_scaling(raw.get("rope_parameters") or raw.get("rope_scaling"), config_path),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        # Qwen2 always has q/k/v biases; Llama says so with attention_bias.
        attention_bias=arch == "Qwen2ForCausalLM" or bool(raw.get("attention_bias", False)),
        qk_norm=arch == "Qwen3ForCausalLM",
        eos_token_ids=_eos_ids(path, raw),
        torch_dtype=raw.get("torch_dtype"),
        weight_files=_weight_files(path),
    )


def _required(raw: dict[str, Any], key: str, config_path: Path) -> Any:
    if key not in raw:
        raise ModelConfigError(f"{config_path} has no {key!r}")
    return raw[key]


def _rope_scaling(raw: dict[str, Any] | None, config_path: Path) -> RopeScaling:
    if not raw:
        return RopeScaling()
    rope_type = raw.get("rope_type") or raw.get("type") or "default"
    if rope_type not in ("default", "linear", "llama3", "dynamic"):
        raise ModelConfigError(
            f"{config_path}: rope_scaling type {rope_type!r} not supported (linear, llama3, dynamic)"
        )
    return RopeScaling(
        rope_type=rope_type,
        factor=float(raw.get("factor", 1.0)),
        low_freq_factor=float(raw.get("low_freq_factor", 1.0)),
        high_freq_factor=float(raw.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=raw.get("original_max_position_embeddings"),
    )


def _eos_ids(path: Path, raw: dict[str, Any]) -> tuple[int, ...]:
    """EOS ids from generation_config.json (which often lists several), else config.json."""
    value: Any = None
    gen_path = path / "generation_config.json"
    if gen_path.is_file():
        value = json.loads(gen_path.read_text()).get("eos_token_id")
    if value is None:
        value = raw.get("eos_token_id")
    if value is None:
        return ()
    return tuple(value) if isinstance(value, list) else (int(value),)


def _weight_files(path: Path) -> tuple[Path, ...]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return tuple(path / n for n in names)
    single = path / "model.safetensors"
    if single.is_file():
        return (single,)
    return tuple(sorted(path.glob("*.safetensors")))
