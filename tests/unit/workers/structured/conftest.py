"""Fixtures for the structured-output tests (cases in structured_cases.py)."""

from __future__ import annotations

import pytest
from structured_cases import ENGINE_VOCAB, MODEL_DIR

from workers.structured import GrammarCompiler


@pytest.fixture(scope="session")
def compiler() -> GrammarCompiler:
    return GrammarCompiler.from_model_dir(MODEL_DIR, ENGINE_VOCAB)
