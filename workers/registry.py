"""The engines a worker can serve, by `--engine` name: each contributes its flags and builds
itself from them.

The imports below are function-local on purpose, and the only ones of the command lines: an
engine's modules pull in torch (builtin), vllm, sglang or tensorrt_llm, which a process serving
another engine must neither need installed nor pay seconds of import time for."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

from workers.engine import Engine

ENGINE_NAMES = ("builtin", "mocker", "vllm", "sglang", "trtllm")
# The engine every entry point serves unless told otherwise (README: the built-in engine).
DEFAULT_ENGINE = "builtin"


def _never(args: argparse.Namespace) -> bool:
    return False


@dataclass(frozen=True, slots=True)
class EngineSpec:
    add_args: Callable[[argparse.ArgumentParser], None]
    create: Callable[[argparse.Namespace], Engine]
    # Whether `dynamo.serve` gives each worker of this engine, as configured, a process of its
    # own unless told otherwise (--worker-processes): where its step loop would otherwise
    # share one interpreter with the HTTP path at a cost that was measured.
    own_process: Callable[[argparse.Namespace], bool] = _never


def _mocker() -> EngineSpec:
    from workers.mocker.args import MockerConfig, add_mocker_args
    from workers.mocker.engine import MockerEngine

    return EngineSpec(add_mocker_args, lambda args: MockerEngine(MockerConfig.from_args(args)))


def _builtin() -> EngineSpec:
    from workers.builtin.args import BuiltinConfig, add_builtin_args, on_a_gpu
    from workers.builtin.engine import BuiltinEngine

    return EngineSpec(add_builtin_args, lambda args: BuiltinEngine(BuiltinConfig.from_args(args)), on_a_gpu)


def _vllm() -> EngineSpec:
    # Only vllm.engine.arg_utils is imported to build the flags; the engine module (AsyncLLM)
    # is imported when the engine is created.
    from workers.vllm.args import VllmConfig, add_vllm_args

    def create(args: argparse.Namespace) -> Engine:
        from workers.vllm.engine import VllmEngine

        return VllmEngine(VllmConfig.from_args(args))

    return EngineSpec(add_vllm_args, create)


def _sglang() -> EngineSpec:
    # Building the flags imports sglang.srt.server_args; sglang.Engine is imported at start.
    from workers.sglang.args import SglangConfig, add_sglang_args

    def create(args: argparse.Namespace) -> Engine:
        from workers.sglang.engine import SglangEngine

        return SglangEngine(SglangConfig.from_args(args))

    return EngineSpec(add_sglang_args, create)


def _trtllm() -> EngineSpec:
    # The flags need no TensorRT-LLM; tensorrt_llm is imported when the engine starts.
    from workers.trtllm.args import TrtllmConfig, add_trtllm_args

    def create(args: argparse.Namespace) -> Engine:
        from workers.trtllm.engine import TrtllmEngine

        return TrtllmEngine(TrtllmConfig.from_args(args))

    return EngineSpec(add_trtllm_args, create)


_SPECS: dict[str, Callable[[], EngineSpec]] = {
    "mocker": _mocker,
    "builtin": _builtin,
    "vllm": _vllm,
    "sglang": _sglang,
    "trtllm": _trtllm,
}


def engine_spec(name: str) -> EngineSpec:
    try:
        return _SPECS[name]()
    except KeyError:
        raise SystemExit(f"unknown engine {name!r}; choose one of {', '.join(ENGINE_NAMES)}") from None
