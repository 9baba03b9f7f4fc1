"""Mocker flags: spelled like Dynamo's mocker and vLLM, with environment fallbacks, and the
vocabulary taken from the served model's files."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from workers.mocker.args import MockerConfig, add_mocker_args


def parse(argv: list[str], model: str | None = None) -> MockerConfig:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=model)
    add_mocker_args(parser)
    return MockerConfig.from_args(parser.parse_args(argv))


def test_defaults_match_the_dataclass() -> None:
    assert parse([]) == MockerConfig()


def test_flags_are_spelled_like_vllm() -> None:
    cfg = parse(["--block-size", "64", "--num-gpu-blocks", "100", "--max-num-seqs", "4",
                 "--max-num-batched-tokens", "512", "--max-model-len", "2048",
                 "--speedup-ratio", "10", "--vocab-size", "500", "--seed", "3"])
    assert cfg == MockerConfig(block_size_tokens=64, num_gpu_blocks=100, max_num_seqs=4,
                               max_num_batched_tokens=512, max_model_len=2048, speedup_ratio=10.0,
                               vocab_size=500, seed=3)


def test_environment_fallbacks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DYN_MOCKER_SPEEDUP_RATIO", "1e6")
    monkeypatch.setenv("DYN_MOCKER_NUM_GPU_BLOCKS", "77")
    cfg = parse([])
    assert cfg.speedup_ratio == 1e6 and cfg.num_gpu_blocks == 77


def test_vocab_and_special_tokens_come_from_the_model(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(
        {"vocab_size": 300, "bos_token_id": 0, "eos_token_id": [1, 2], "pad_token_id": None}))
    (tmp_path / "tokenizer.json").write_text(json.dumps(
        {"added_tokens": [{"id": 5, "special": True}, {"id": 6, "special": False}]}))
    cfg = parse([], model=str(tmp_path))
    assert cfg.vocab_size == 300 and cfg.exclude_token_ids == {0, 1, 2, 5}
    assert parse(["--vocab-size", "1000"], model=str(tmp_path)).vocab_size == 1000


def test_invalid_values_are_refused() -> None:
    with pytest.raises(ValueError):
        MockerConfig(num_gpu_blocks=0)
    with pytest.raises(ValueError):
        MockerConfig(speedup_ratio=0)
    with pytest.raises(ValueError):
        MockerConfig(vocab_size=2, exclude_token_ids=frozenset({0, 1}))
