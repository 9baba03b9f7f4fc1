"""Random-weight tiny models of several shapes (built once per session) and transformers as the
reference implementation of their greedy outputs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from workers.builtin.testing_models import SHAPES, build_random_model, load_hf_model  # noqa: E402



@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
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
