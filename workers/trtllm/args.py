"""The TensorRT-LLM worker's flags and the TrtllmConfig they make. TensorRT-LLM's LLM API takes
its engine arguments as keyword arguments (LlmArgs, pydantic); its server `trtllm-serve` takes a
few as flags and the rest from `--extra_llm_api_options FILE` (YAML). We do the same: the same
flag names, the same YAML file, passed to `LLM(**kwargs)` unchanged. No TensorRT-LLM import here."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from dynamo.config import env_default
from dynamo.flags import Flag, FlagGroup

TRTLLM_VERSION = "1.2.1"
INSTALL_HINT = (
    f"--engine trtllm needs TensorRT-LLM: `pip install tensorrt-llm=={TRTLLM_VERSION}` (NVIDIA GPU, "
    "CUDA, MPI; several GB)"
)

# Default size of TensorRT-LLM's KV event buffer when we turn events on and the user did not.
DEFAULT_EVENT_BUFFER = 1024

# trtllm-serve's flags that map onto LLM keyword arguments (flag -> LlmArgs field). Each is
# spelled with underscores as trtllm-serve does and with dashes as our other flags are.
TRTLLM_SERVE_FLAGS: dict[str, tuple[str, type]] = {
    "tokenizer": ("tokenizer", str),
    "backend": ("backend", str),
    "tp_size": ("tensor_parallel_size", int),
    "pp_size": ("pipeline_parallel_size", int),
    "ep_size": ("moe_expert_parallel_size", int),
    "max_batch_size": ("max_batch_size", int),
    "max_num_tokens": ("max_num_tokens", int),
    "max_seq_len": ("max_seq_len", int),
    "max_beam_width": ("max_beam_width", int),
}


@dataclass(frozen=True, slots=True)
class TrtllmConfig:
    model: str
    llm_kwargs: dict[str, Any] = field(default_factory=dict)
    publish_kv_events: bool = True
    stats_poll_s: float = 0.25

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> TrtllmConfig:
        return cls(
            model=args.model,
            llm_kwargs=llm_kwargs_from_args(args),
            publish_kv_events=args.publish_kv_events,
            stats_poll_s=args.trtllm_stats_poll_s,
        )

    def with_llm_kwargs(self, **changes: Any) -> TrtllmConfig:
        return replace(self, llm_kwargs={**self.llm_kwargs, **changes})


def load_options_file(path: str) -> dict[str, Any]:
    """trtllm-serve's --extra_llm_api_options: a YAML mapping (JSON is YAML too)."""
    text = Path(path).read_text()
    try:
        import yaml
    except ImportError:
        data = json.loads(text)
    else:
        data = yaml.safe_load(text)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SystemExit(f"{path}: expected a mapping of LLM API options, got {type(data).__name__}")
    return data


def llm_kwargs_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Flags first, then the options file on top (as trtllm-serve merges them), then the
    options that make the worker work: token ids in and out."""
    kwargs: dict[str, Any] = {}
    for dest, (llm_name, _) in TRTLLM_SERVE_FLAGS.items():
        value = getattr(args, f"trtllm_{dest}", None)
        if value is not None:
            kwargs[llm_name] = value
    if args.trust_remote_code:
        kwargs["trust_remote_code"] = True
    if args.kv_cache_free_gpu_memory_fraction is not None:
        kwargs["kv_cache_config"] = {"free_gpu_memory_fraction": args.kv_cache_free_gpu_memory_fraction}
    if args.extra_llm_api_options:
        for key, value in load_options_file(args.extra_llm_api_options).items():
            if isinstance(value, dict) and isinstance(kwargs.get(key), dict):
                kwargs[key] = {**kwargs[key], **value}
            else:
                kwargs[key] = value
    return kwargs


def with_kv_events(llm_kwargs: dict[str, Any]) -> dict[str, Any]:
    """The kwargs with KV cache events on: TensorRT-LLM emits them only with block reuse on and a
    positive event_buffer_max_size. A user's own buffer size is kept; a user's explicit
    enable_block_reuse=False is kept too (then no events come, and routing is load-only)."""
    kv = llm_kwargs.get("kv_cache_config")
    kv = dict(kv) if isinstance(kv, dict) else kv
    if kv is None:
        kv = {}
    if isinstance(kv, dict):
        kv.setdefault("enable_block_reuse", True)
        if not kv.get("event_buffer_max_size"):
            kv["event_buffer_max_size"] = DEFAULT_EVENT_BUFFER
        return {**llm_kwargs, "kv_cache_config": kv}
    # A KvCacheConfig object built in code: set the same fields on a copy.
    updates: dict[str, Any] = {}
    if getattr(kv, "enable_block_reuse", None) is None:
        updates["enable_block_reuse"] = True
    if not getattr(kv, "event_buffer_max_size", 0):
        updates["event_buffer_max_size"] = DEFAULT_EVENT_BUFFER
    if updates:
        kv = kv.model_copy(update=updates)
    return {**llm_kwargs, "kv_cache_config": kv}


def add_trtllm_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "trtllm", "TensorRT-LLM's LLM API arguments, spelled as trtllm-serve spells them"
    )
    for dest, (llm_name, kind) in TRTLLM_SERVE_FLAGS.items():
        flags = [f"--{dest}"]
        if "_" in dest:
            flags.append(f"--{dest.replace('_', '-')}")
        if llm_name.endswith("_parallel_size") and llm_name != dest:
            flags.append(f"--{llm_name.replace('_', '-')}")  # the LLM API name, as vLLM spells it
        group.add_argument(*flags, dest=f"trtllm_{dest}", type=kind, default=None, help=f"LLM({llm_name}=...)")
    group.add_argument("--trust_remote_code", "--trust-remote-code", dest="trust_remote_code", action="store_true")
    group.add_argument(
        "--kv_cache_free_gpu_memory_fraction",
        "--kv-cache-free-gpu-memory-fraction",
        dest="kv_cache_free_gpu_memory_fraction",
        type=float,
        default=None,
        help="LLM(kv_cache_config={'free_gpu_memory_fraction': ...})",
    )
    group.add_argument(
        "--extra_llm_api_options",
        "--extra-llm-api-options",
        "--extra-engine-args",
        dest="extra_llm_api_options",
        default=env_default("DYN_TRTLLM_EXTRA_OPTIONS"),
        help="YAML file of further LLM API options, merged over the flags (as trtllm-serve does) "
        "[env DYN_TRTLLM_EXTRA_OPTIONS]",
    )
    TRTLLM_FLAGS.add_to(parser)


TRTLLM_FLAGS = FlagGroup(
    "trtllm worker",
    [
        Flag("--publish-kv-events", "turn on TensorRT-LLM's KV cache events and publish them, re-hashed, for "
             "KV-aware routing", True, "DYN_TRTLLM_PUBLISH_KV_EVENTS", bool),
        Flag("--trtllm-stats-poll-s", "how long each read of TensorRT-LLM's iteration stats waits", 0.25,
             "DYN_TRTLLM_STATS_POLL_S", float),
    ],
)
