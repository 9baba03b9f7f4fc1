"""Router flags: Dynamo's spellings, environment fallbacks, and RouterConfig.from_args."""

from __future__ import annotations

import argparse
import pytest

from router.args import RouterConfig, add_router_args


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_router_args(parser)
    return parser.parse_args(argv)


def test_defaults_match_the_config_defaults() -> None:
    args = parse([])
    assert args.router_mode == "round-robin"
    assert RouterConfig.from_args(args) == RouterConfig()


def test_dynamo_spellings() -> None:
    args = parse(
        [
            "--router-mode", "kv",
            "--kv-overlap-score-weight", "2.5",
            "--router-temperature", "0.3",
            "--kv-cache-block-size", "32",
            "--no-kv-events",
            "--router-seed", "7",
        ]
    )
    assert args.router_mode == "kv"
    config = RouterConfig.from_args(args)
    assert config == RouterConfig(
        kv_block_size=32, overlap_score_weight=2.5, temperature=0.3, use_kv_events=False, seed=7
    )


def test_environment_fallbacks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DYN_ROUTER_MODE", "least-loaded")
    monkeypatch.setenv("DYN_KV_OVERLAP_SCORE_WEIGHT", "0")
    monkeypatch.setenv("DYN_KV_EVENTS", "false")
    args = parse([])  # defaults are read when the flags are declared
    assert args.router_mode == "least-loaded"
    assert args.kv_overlap_score_weight == 0.0
    assert args.kv_events is False


def test_invalid_values_are_rejected() -> None:
    with pytest.raises(ValueError):
        RouterConfig(kv_block_size=0)
    with pytest.raises(ValueError):
        RouterConfig(temperature=-1)
    with pytest.raises(SystemExit):
        parse(["--router-mode", "fastest"])
