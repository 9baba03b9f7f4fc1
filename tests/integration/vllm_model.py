"""A tiny random-weight Llama (head_dim 32: vLLM's CPU attention rejects 16) with the project's
tokenizer (models/dynamo-tiny, vocab 8192), written in Hugging Face layout for vLLM tests."""

from __future__ import annotations

import shutil
from pathlib import Path

from workers.builtin.testing_models import TinyModelSpec, build_random_model

REPO = Path(__file__).resolve().parents[2]
TOKENIZER_DIR = REPO / "models" / "dynamo-tiny"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

SPEC = TinyModelSpec(
    vocab_size=8192,
    hidden_size=128,
    intermediate_size=256,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=32,
    max_position_embeddings=1024,
    eos_token_id=3,  # dynamo-tiny's EOS
    seed=1234,
)


def build_vllm_test_model(out_dir: str | Path) -> Path:
    """Writes weights (seeded, so every build is the same model) and the tokenizer."""
    out = build_random_model(SPEC, out_dir)
    for name in TOKENIZER_FILES:
        if (TOKENIZER_DIR / name).exists():
            shutil.copy(TOKENIZER_DIR / name, out / name)
    return out
