"""model.py + loader.py + attention.py: logits equal transformers' for every test shape, in one
prefill and in chunks over the paged cache; config errors are clear."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from workers.builtin.attention import SeqSlice
from workers.builtin.config import ModelConfigError, load_model_config
from workers.builtin.kv_cache import KVCache
from workers.builtin.loader import load_model
from workers.builtin.testing_models import SHAPES, load_hf_model

CPU = torch.device("cpu")


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_logits_match_transformers_over_paged_chunks(shape: str, model_dirs: Callable[[str], Path]) -> None:
    model_dir = model_dirs(shape)
    config = load_model_config(model_dir)
    model = load_model(config, torch.float64, CPU)
    hf = load_hf_model(model_dir, dtype="float64")
    ids = [(7 * i + 3) % config.vocab_size for i in range(90)]  # long enough for llama3's low freqs
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    block_size = 8
    blocks = [11, 2, 7, 5, 13, 0, 9, 4, 3, 1, 6, 8]  # scattered on purpose
    kv = KVCache.allocate(config, 16, block_size, torch.float64, CPU)
    backend = model.model.layers[0].self_attn.backend
    start = 0
    with torch.no_grad():
        for chunk in (37, 20, 1, 32):  # uneven chunks cross block boundaries
            meta = backend.build_metadata([SeqSlice(start, chunk, blocks)], block_size, CPU)
            hidden = model(torch.tensor(ids[start : start + chunk]), torch.arange(start, start + chunk), kv, meta)
            logits = model.compute_logits(hidden)
            torch.testing.assert_close(logits, ref[start : start + chunk], atol=1e-5, rtol=1e-5)
            start += chunk


def test_batched_mixed_prefill_and_decode_match_single(model_dirs: Callable[[str], Path]) -> None:
    config = load_model_config(model_dirs("llama-gqa"))
    model = load_model(config, torch.float64, CPU)
    backend = model.model.layers[0].self_attn.backend
    a, b = list(range(10, 30)), list(range(100, 105))

    def alone(ids: list[int]) -> torch.Tensor:
        kv = KVCache.allocate(config, 8, 4, torch.float64, CPU)
        meta = backend.build_metadata([SeqSlice(0, len(ids), list(range(8)))], 4, CPU)
        return model.compute_logits(model(torch.tensor(ids), torch.arange(len(ids)), kv, meta))

    with torch.no_grad():
        ref_a, ref_b = alone(a), alone(b)
        kv = KVCache.allocate(config, 16, 4, torch.float64, CPU)
        # a's first 19 tokens, then one batch: a's last token (decode) beside all of b (prefill)
        meta = backend.build_metadata([SeqSlice(0, 19, [0, 1, 2, 3, 4])], 4, CPU)
        model(torch.tensor(a[:19]), torch.arange(19), kv, meta)
        meta = backend.build_metadata([SeqSlice(19, 1, [0, 1, 2, 3, 4]), SeqSlice(0, 5, [9, 8])], 4, CPU)
        ids = torch.tensor(a[19:] + b)
        positions = torch.tensor([19, 0, 1, 2, 3, 4])
        logits = model.compute_logits(model(ids, positions, kv, meta))
    torch.testing.assert_close(logits[0], ref_a[-1])
    torch.testing.assert_close(logits[1:], ref_b)


def test_unsupported_architecture_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ModelConfigError, match="GPT2LMHeadModel.*not supported"):
        load_model_config(tmp_path)


def test_missing_files_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelConfigError, match="does not exist"):
        load_model_config(tmp_path / "nope")
    with pytest.raises(ModelConfigError, match="no config.json"):
        load_model_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**_tiny_raw(), "architectures": ["LlamaForCausalLM"]}))
    config = load_model_config(tmp_path)
    with pytest.raises(ModelConfigError, match="no \\*.safetensors"):
        load_model(config, torch.float32, CPU)


def _tiny_raw() -> dict[str, object]:
    return {"vocab_size": 32, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
            "num_attention_heads": 2}
