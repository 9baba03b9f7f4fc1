"""Embeddings as a user serves them: `python -m dynamo.serve --runner pooling` on a random-weight
Qwen3-shaped model with the built-in engine, driven over HTTP with the official openai client."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import openai
import pytest

from tests.e2e.procs import REPO, serving

pytestmark = pytest.mark.e2e

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

MODEL = "qwen3-embed-tiny"
TEXTS = ["What does the for statement do?", "hello", "The while statement repeats its body."]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from workers.builtin.testing_models import TinyModelSpec, build_random_model

    root = tmp_path_factory.mktemp(MODEL)
    spec = TinyModelSpec(
        architecture="Qwen3ForCausalLM", vocab_size=8192, hidden_size=64, intermediate_size=128, num_layers=2,
        num_heads=4, num_kv_heads=2, head_dim=16, tie_word_embeddings=True, max_position_embeddings=512, seed=5,
    )
    build_random_model(spec, root)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(REPO / "models" / "dynamo-tiny" / name, root / name)
    return root


@pytest.fixture(scope="module")
def base_url(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with serving(
        tmp_path_factory.mktemp("serve-embed"), "--engine", "builtin", "--model", str(model_dir),
        "--served-model-name", MODEL, "--runner", "pooling", "--pooling-type", "mean", "--dtype", "float32",
    ) as base:
        yield base


def client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60)


def test_embeddings_equal_a_transformers_forward(base_url: str, model_dir: Path) -> None:
    from frontend.tokenizer import ModelTokenizer

    response = client(base_url).embeddings.create(model=MODEL, input=TEXTS)
    got = np.array([d.embedding for d in response.data])
    tokenizer = ModelTokenizer.load(str(model_dir))
    hf = transformers.AutoModel.from_pretrained(str(model_dir), dtype=torch.float64).eval()
    for row, text in zip(got, TEXTS):
        ids = tokenizer.encode(text, add_special_tokens=True)
        with torch.no_grad():
            mean = hf(torch.tensor([ids])).last_hidden_state[0].mean(0).numpy()
        np.testing.assert_allclose(row, mean / np.linalg.norm(mean), atol=2e-5)
    floats = client(base_url).embeddings.create(model=MODEL, input=TEXTS, encoding_format="float")
    np.testing.assert_array_equal(np.array([d.embedding for d in floats.data], dtype=np.float32), got.astype(np.float32))


def test_models_and_refusals(base_url: str) -> None:
    models = {m.id: m.model_dump() for m in client(base_url).models.list().data}
    assert models[MODEL]["capabilities"] == ["embeddings"] and models[MODEL]["max_model_len"] == 512
    with pytest.raises(openai.BadRequestError, match="embedding model"):
        client(base_url).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="Matryoshka"):
        client(base_url).embeddings.create(model=MODEL, input="hi", dimensions=8)
    with pytest.raises(openai.BadRequestError, match="input"):
        client(base_url).embeddings.create(model=MODEL, input=[])
