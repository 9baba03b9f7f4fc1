"""The one-command local run, as a user starts it: `python -m dynamo.serve` with the built-in
engine and the project's default model, driven with the official openai client."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest

from tests.e2e.procs import serving

pytestmark = pytest.mark.e2e

MODEL = "dynamo-tiny"


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with serving(tmp_path_factory.mktemp("serve"), "--engine", "builtin") as base:
        yield base


def client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60)


def test_greedy_chat_is_real_and_repeatable(base_url: str) -> None:
    messages = [{"role": "user", "content": "What does the for statement do?"}]
    first = client(base_url).chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0)
    second = client(base_url).chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0)
    text = first.choices[0].message.content or ""
    assert len(text.split()) >= 3  # words from a trained model, not an empty or byte soup answer
    assert second.choices[0].message.content == text
    # The repeat finds the prompt's full blocks in the engine's prefix cache.
    assert second.usage is not None and second.usage.prompt_tokens_details is not None
    assert second.usage.prompt_tokens_details.cached_tokens > 0


def test_streaming_matches_non_streaming(base_url: str) -> None:
    prompt = "The while statement"
    whole = client(base_url).completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    chunks = client(base_url).completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stream=True)
    streamed = "".join(c.choices[0].text for c in chunks if c.choices)
    assert streamed == whole.choices[0].text


def test_over_long_prompt_is_rejected(base_url: str) -> None:
    with pytest.raises(openai.BadRequestError, match="context"):
        client(base_url).completions.create(model=MODEL, prompt="for " * 3000, max_tokens=4)
