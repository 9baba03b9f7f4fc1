"""Random-weight tiny models of several shapes (built once per session) and transformers as the
reference implementation of their greedy outputs and logits. "llama-tok" has the vocabulary
and tokenizer of models/dynamo-tiny (8,192 ids, EOS 3), for output constraints."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from workers.builtin.testing_models import SHAPES, TinyModelSpec, build_random_model, load_hf_model  # noqa: E402

TINY_DIR = Path(__file__).resolve().parents[4] / "models" / "dynamo-tiny"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
WITH_TOKENIZER = {"llama-tok": TinyModelSpec(vocab_size=8192, eos_token_id=3, seed=5)}


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            if name in WITH_TOKENIZER:
                path = build_random_model(WITH_TOKENIZER[name], tmp_path_factory.mktemp(name))
                for file in TOKENIZER_FILES:
                    shutil.copy(TINY_DIR / file, path / file)
                built[name] = path
            else:
                built[name] = build_random_model(SHAPES[name], tmp_path_factory.mktemp(name))
        return built[name]

    return get


@pytest.fixture(scope="session")
def hf_greedy(model_dirs: Callable[[str], Path]) -> Callable[[str, list[int], int], list[int]]:
    """transformers' generate(do_sample=False) in fp64: the tokens the engine must match."""
    models: dict[str, object] = {}

    def run(name: str, prompt: list[int], max_new_tokens: int) -> list[int]:
        if name not in models:
            models[name] = load_hf_model(model_dirs(name), dtype="float64")
        model = models[name]
        with torch.no_grad():
            out = model.generate(  # type: ignore[attr-defined]
                torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                eos_token_id=None, pad_token_id=0,
            )
        return out[0, len(prompt):].tolist()

    return run


@pytest.fixture(scope="session")
def hf_logits(model_dirs: Callable[[str], Path]) -> Callable[[str, list[int]], torch.Tensor]:
    """transformers' forward in fp64: logits [len(tokens), vocab] at every position."""
    models: dict[str, object] = {}

    def run(name: str, tokens: list[int]) -> torch.Tensor:
        if name not in models:
            models[name] = load_hf_model(model_dirs(name), dtype="float64")
        with torch.no_grad():
            return models[name](torch.tensor([tokens])).logits[0]  # type: ignore[operator]

    return run
