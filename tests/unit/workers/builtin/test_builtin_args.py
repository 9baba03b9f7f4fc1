"""The built-in engine's flags: a prefill worker of dynamo.serve takes the --prefill-* device and
memory flags, a decode (or aggregated) worker the plain ones; --load-format and
--prefill-cuda-graphs reach the config."""

from __future__ import annotations

import argparse

import pytest

from workers.builtin.args import BuiltinConfig, add_builtin_args


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_builtin_args(parser)
    return parser.parse_args(argv)


@pytest.mark.parametrize("role", [None, "decode", "prefill"])
def test_prefill_workers_take_their_own_device_and_memory(role: str | None) -> None:
    args = parse([
        "--device", "cuda:0", "--gpu-memory-utilization", "0.4", "--prefill-device", "cuda:1",
        "--prefill-gpu-memory-utilization", "0.3", "--prefill-kv-cache-memory-gb", "2", "--no-overlap-schedule",
    ])
    args.role = role
    config = BuiltinConfig.from_args(args)
    if role == "prefill":
        assert (config.device, config.gpu_memory_utilization, config.kv_cache_memory_gb) == ("cuda:1", 0.3, 2.0)
    else:
        assert (config.device, config.gpu_memory_utilization, config.kv_cache_memory_gb) == ("cuda:0", 0.4, None)
    assert config.overlap_schedule is False


def test_unset_prefill_flags_fall_back_and_overlap_defaults_to_the_device() -> None:
    args = parse(["--device", "cpu"])
    args.role = "prefill"
    config = BuiltinConfig.from_args(args)
    assert config.device == "cpu" and config.overlap_schedule is None


def test_load_format_from_the_flag_or_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert BuiltinConfig.from_args(parse([])).load_format == "auto"
    assert BuiltinConfig.from_args(parse(["--load-format", "dummy"])).load_format == "dummy"
    monkeypatch.setenv("DYN_BUILTIN_LOAD_FORMAT", "dummy")
    assert BuiltinConfig.from_args(parse([])).load_format == "dummy"
    with pytest.raises(SystemExit):
        parse(["--load-format", "safetensors"])


def test_prefill_cuda_graphs_from_the_flag_or_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert BuiltinConfig.from_args(parse([])).prefill_cuda_graphs is True
    assert BuiltinConfig.from_args(parse(["--no-prefill-cuda-graphs"])).prefill_cuda_graphs is False
    monkeypatch.setenv("DYN_BUILTIN_PREFILL_CUDA_GRAPHS", "0")
    assert BuiltinConfig.from_args(parse([])).prefill_cuda_graphs is False
    assert BuiltinConfig.from_args(parse(["--prefill-cuda-graphs"])).prefill_cuda_graphs is True
