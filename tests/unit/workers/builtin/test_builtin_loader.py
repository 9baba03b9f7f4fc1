"""Checkpoint loading: a base-model checkpoint (transformers' AutoModel save, as embedding models
like Qwen3-Embedding ship: no `model.` prefix, no LM head) loads, its weights in place."""

from __future__ import annotations

from pathlib import Path

import torch

from workers.builtin.config import load_model_config
from workers.builtin.loader import load_model
from workers.builtin.testing_models import SHAPES, hf_config


def test_base_model_checkpoint_without_lm_head_loads(tmp_path: Path) -> None:
    import transformers

    spec = SHAPES["qwen3-qknorm"]  # untied embeddings: the LM head cannot come from the checkpoint
    config = hf_config(spec)
    torch.manual_seed(0)
    base = transformers.Qwen3Model(config).float()
    base.save_pretrained(tmp_path, safe_serialization=True)
    names = set(base.state_dict())
    assert not any(n.startswith("model.") for n in names) and "lm_head.weight" not in names

    model = load_model(load_model_config(str(tmp_path)), torch.float32, torch.device("cpu"))
    ours = dict(model.named_parameters())
    assert torch.equal(ours["model.embed_tokens.weight"], base.embed_tokens.weight)
    assert torch.equal(ours["model.norm.weight"], base.norm.weight)
    assert model.lm_head.weight is model.model.embed_tokens.weight
