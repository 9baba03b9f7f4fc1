"""Loads a Hugging Face safetensors checkpoint into model.py's modules: maps names, fuses q/k/v
and gate/up into their packed parameters, converts to the serving dtype on the target device.
Or, for --load-format dummy, builds the same modules with random weights (no checkpoint)."""

from __future__ import annotations

import logging

import torch
from safetensors import safe_open

from workers.builtin.attention import attention_backend
from workers.builtin.config import ModelConfig, ModelConfigError
from workers.builtin.model import LlamaForCausalLM

log = logging.getLogger(__name__)

# checkpoint name fragment -> (packed parameter fragment, shard index)
PACKED_MODULES = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float64": torch.float64,  # for exactness tests against transformers
}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' is bf16 on GPU and fp32 on CPU (CPU bf16 matmuls are slow without AMX)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose auto, {', '.join(DTYPES)}") from None


def random_model(config: ModelConfig, dtype: torch.dtype, device: torch.device) -> LlamaForCausalLM:
    """Random weights instead of a checkpoint: normal with std 0.02 (transformers' initializer
    range for these models), norm scales 1, seeded so that every run draws the same model."""
    model = _empty_model(config, dtype, device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    return model.eval()


def _empty_model(config: ModelConfig, dtype: torch.dtype, device: torch.device) -> LlamaForCausalLM:
    """The modules on `device` in `dtype`, their memory uninitialised, the LM head tied if so."""
    with torch.device("meta"):
        model = LlamaForCausalLM(config, attention_backend(device))
    # Materialise on the target device without running the default initialisers.
    model = model.to_empty(device=device).to(dtype)
    model.rotary.build(device)  # its tables were on meta, and must stay fp32
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


def load_model(config: ModelConfig, dtype: torch.dtype, device: torch.device) -> LlamaForCausalLM:
    if not config.weight_files:
        raise ModelConfigError(
            f"{config.model_dir} has no *.safetensors weights (--load-format dummy runs its shape with random weights)"
        )
    model = _empty_model(config, dtype, device)
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    bare = False  # saved from a base model (transformers' AutoModel): no `model.` prefix, no LM head
    for path in config.weight_files:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():
                name = key
                if name.endswith("rotary_emb.inv_freq"):
                    continue  # derived, not learned
                if name == "lm_head.weight" and config.tie_word_embeddings:
                    continue
                if name.startswith(_BARE_PREFIXES):
                    bare = True
                    name = "model." + name
                target, shard = _target(name)
                param = params.get(target)
                if param is None:
                    raise ModelConfigError(f"{path.name}: unexpected tensor {name!r}")
                _copy(param, f.get_tensor(key), shard, config, target)
                loaded.add(target if shard is None else f"{target}#{shard}")
    if bare and "lm_head.weight" not in loaded and not config.tie_word_embeddings:
        # Embedding checkpoints (e.g. Qwen3-Embedding) are base models: they pool hidden states
        # and have no LM head. The head is tied to the embeddings only to give the module one;
        # text generated from such a checkpoint means nothing, and the worker serves it for
        # embeddings (--runner pooling).
        log.info("%s is a base model without an LM head: serve it for embeddings", config.model_dir)
        model.lm_head.weight = model.model.embed_tokens.weight
        loaded.add("lm_head.weight")
    _check_complete(model, loaded, config)
    model.eval()
    return model


_BARE_PREFIXES = ("embed_tokens.", "layers.", "norm.")


def _target(name: str) -> tuple[str, int | None]:
    for fragment, (packed, shard) in PACKED_MODULES.items():
        if f".{fragment}." in name:
            return name.replace(f".{fragment}.", f".{packed}."), shard
    return name, None


def _copy(param: torch.Tensor, tensor: torch.Tensor, shard: int | None, config: ModelConfig, name: str) -> None:
    with torch.no_grad():
        if shard is None:
            if param.shape != tensor.shape:
                raise ModelConfigError(f"{name}: checkpoint shape {tuple(tensor.shape)} != {tuple(param.shape)}")
            param.copy_(tensor)
            return
        if "qkv_proj" in name:
            q = config.num_heads * config.head_dim
            kv = config.num_kv_heads * config.head_dim
            offsets = [0, q, q + kv, q + 2 * kv]
        else:
            inter = config.intermediate_size
            offsets = [0, inter, 2 * inter]
        part = param.narrow(0, offsets[shard], offsets[shard + 1] - offsets[shard])
        if part.shape != tensor.shape:
            raise ModelConfigError(f"{name}[{shard}]: checkpoint shape {tuple(tensor.shape)} != {tuple(part.shape)}")
        part.copy_(tensor)


def _check_complete(model: LlamaForCausalLM, loaded: set[str], config: ModelConfig) -> None:
    missing: list[str] = []
    for name, _ in model.named_parameters():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        shards = 3 if "qkv_proj" in name and name.endswith("weight") else 2 if "gate_up_proj" in name else None
        if "qkv_proj.bias" in name:
            shards = 3
        if shards is None:
            if name not in loaded:
                missing.append(name)
        else:
            missing.extend(f"{name}[{i}]" for i in range(shards) if f"{name}#{i}" not in loaded)
    if missing:
        raise ModelConfigError(f"checkpoint in {config.model_dir} lacks {len(missing)} tensors, e.g. {missing[:3]}")
