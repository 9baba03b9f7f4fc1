"""Checkpoint loading: a base-model checkpoint (transformers' AutoModel save, as embedding models
like Qwen3-Embedding ship: no `model.` prefix, no LM head) loads, its weights in place. And
--load-format dummy: a directory with only config.json serves its shape with random weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dynamo.wire import PreprocessedRequest, SamplingOptions, StopConditions
from workers.builtin.args import BuiltinConfig
from workers.builtin.config import ModelConfigError, load_model_config
from workers.builtin.engine import BuiltinEngine
from workers.builtin.loader import load_model, random_model
from workers.builtin.testing_models import SHAPES, TinyModelSpec, hf_config


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


def config_only_dir(spec: TinyModelSpec, path: Path) -> Path:
    hf_config(spec).save_pretrained(path)  # config.json, no weights
    assert [p.name for p in path.iterdir()] == ["config.json"]
    return path


async def test_dummy_load_format_serves_a_config_only_directory(tmp_path: Path) -> None:
    spec = SHAPES["qwen3-qknorm"]
    model_dir = config_only_dir(spec, tmp_path)
    with pytest.raises(ModelConfigError, match="--load-format dummy"):
        load_model(load_model_config(model_dir), torch.float32, torch.device("cpu"))

    config = BuiltinConfig(model=str(model_dir), load_format="dummy", device="cpu", num_gpu_blocks=64)
    request = PreprocessedRequest(
        request_id="r", model="m", token_ids=[5, 17, 99, 3], sampling=SamplingOptions(temperature=0.6, seed=1),
        stop=StopConditions(max_tokens=12, ignore_eos=True),
    )
    async with BuiltinEngine(config) as engine:
        generated = [t async for out in engine.generate(request) for t in out.token_ids]
    assert len(generated) == 12 and all(0 <= t < spec.vocab_size for t in generated)


def test_random_weights_are_seeded_with_unit_norms_and_tied_embeddings(tmp_path: Path) -> None:
    config = load_model_config(config_only_dir(SHAPES["qwen2-bias"], tmp_path))  # tied embeddings
    first, second = (random_model(config, torch.float32, torch.device("cpu")) for _ in range(2))
    for (name, a), b in zip(first.named_parameters(), second.parameters(), strict=True):
        assert torch.equal(a, b), name
        if name.endswith("norm.weight"):
            assert torch.all(a == 1.0), name
        else:
            assert 0.015 < a.std().item() < 0.025, name
    assert first.lm_head.weight is first.model.embed_tokens.weight


def test_load_format_is_checked() -> None:
    with pytest.raises(ValueError, match="load_format"):
        BuiltinConfig(load_format="pt")
