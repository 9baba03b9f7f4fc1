"""The built-in engine's flags (spelled like vLLM's) with DYN_BUILTIN_* environment fallbacks,
and the frozen BuiltinConfig they turn into. --model belongs to the entry points."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from dynamo.config import env_default
from kvbm.config import KvbmConfig, add_kvbm_args

DEFAULT_MODEL = str(Path(__file__).resolve().parents[2] / "models" / "dynamo-tiny")


@dataclass(frozen=True, slots=True)
class BuiltinConfig:
    """KV cache size: num_gpu_blocks if set, else kv_cache_memory_gb if set, else on CUDA
    gpu_memory_utilization of free memory after loading, else (CPU) 0.25 GiB."""

    model: str = DEFAULT_MODEL
    dtype: str = "auto"  # auto: bf16 on GPU, fp32 on CPU
    device: str = "auto"  # auto: cuda if available, else cpu
    block_size_tokens: int = 16
    num_gpu_blocks: int | None = None
    kv_cache_memory_gb: float | None = None
    gpu_memory_utilization: float = 0.9
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    enforce_eager: bool = False  # True: no CUDA graphs for decode (they apply on CUDA only)
    seed: int = 0  # seeds requests that give no seed, in arrival order
    # Launch step N+1 before reading step N's tokens (PagedEngine's overlap loop); None: on CUDA.
    overlap_schedule: bool | None = None
    kvbm: KvbmConfig = KvbmConfig()  # host/disk tiers below the KV cache; off by default

    def __post_init__(self) -> None:
        for name in ("block_size_tokens", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_gpu_blocks is not None and self.num_gpu_blocks <= 0:
            raise ValueError(f"num_gpu_blocks must be positive, got {self.num_gpu_blocks}")
        if self.kv_cache_memory_gb is not None and not self.kv_cache_memory_gb > 0:
            raise ValueError(f"kv_cache_memory_gb must be positive, got {self.kv_cache_memory_gb}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be at least 2, got {self.max_model_len}")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> BuiltinConfig:
        """A prefill worker (`args.role`, set by dynamo.serve per worker) takes the --prefill-*
        device and memory flags where given, so that prefill and decode workers in one process
        can sit on different GPUs, or split one."""
        device, kv_gb, util = args.device, args.kv_cache_memory_gb, args.gpu_memory_utilization
        if getattr(args, "role", None) == "prefill":
            device = getattr(args, "prefill_device", None) or device
            kv_gb = getattr(args, "prefill_kv_cache_memory_gb", None) or kv_gb
            util = getattr(args, "prefill_gpu_memory_utilization", None) or util
        return cls(
            model=getattr(args, "model", None) or DEFAULT_MODEL,
            dtype=args.dtype,
            device=device,
            block_size_tokens=args.block_size,
            num_gpu_blocks=args.num_gpu_blocks,
            kv_cache_memory_gb=kv_gb,
            gpu_memory_utilization=util,
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            max_model_len=args.max_model_len,
            enforce_eager=args.enforce_eager,
            seed=args.seed,
            overlap_schedule=getattr(args, "overlap_schedule", None),
            kvbm=KvbmConfig.from_args(args),
        )


_DEFAULTS = BuiltinConfig()


def _opt_int(name: str) -> int | None:
    value = env_default(name)
    return int(value) if value else None


def _opt_float(name: str) -> float | None:
    value = env_default(name)
    return float(value) if value else None


def add_builtin_args(parser: argparse.ArgumentParser) -> None:
    d = _DEFAULTS
    group = parser.add_argument_group("builtin engine")
    group.add_argument(
        "--dtype", default=env_default("DYN_BUILTIN_DTYPE", d.dtype),
        choices=["auto", "float32", "bfloat16", "float16"],
        help="weights and KV cache dtype; auto is bf16 on GPU, fp32 on CPU [env DYN_BUILTIN_DTYPE]",
    )
    group.add_argument(
        "--device", default=env_default("DYN_BUILTIN_DEVICE", d.device),
        help="auto, cpu, cuda or cuda:N [env DYN_BUILTIN_DEVICE]",
    )
    group.add_argument(
        "--block-size", type=int, default=_opt_int("DYN_BUILTIN_BLOCK_SIZE") or d.block_size_tokens,
        help="tokens per KV block [env DYN_BUILTIN_BLOCK_SIZE]",
    )
    group.add_argument(
        "--num-gpu-blocks", type=int, default=_opt_int("DYN_BUILTIN_NUM_GPU_BLOCKS"),
        help="KV blocks to allocate (default: sized from memory) [env DYN_BUILTIN_NUM_GPU_BLOCKS]",
    )
    group.add_argument(
        "--kv-cache-memory-gb", type=float, default=_opt_float("DYN_BUILTIN_KV_CACHE_MEMORY_GB"),
        help="KV cache size in GB when --num-gpu-blocks is not given "
        "(default: 0.25 on CPU, free memory on GPU) [env DYN_BUILTIN_KV_CACHE_MEMORY_GB]",
    )
    group.add_argument(
        "--gpu-memory-utilization", type=float,
        default=_opt_float("DYN_BUILTIN_GPU_MEMORY_UTILIZATION") or d.gpu_memory_utilization,
        help="fraction of the GPU's memory this engine may use (its weights, KV cache and step "
        "activations), capped by what is free: two engines can split one GPU "
        "[env DYN_BUILTIN_GPU_MEMORY_UTILIZATION]",
    )
    group.add_argument(
        "--max-num-seqs", type=int, default=_opt_int("DYN_BUILTIN_MAX_NUM_SEQS") or d.max_num_seqs,
        help="most requests running at once [env DYN_BUILTIN_MAX_NUM_SEQS]",
    )
    group.add_argument(
        "--max-num-batched-tokens", type=int,
        default=_opt_int("DYN_BUILTIN_MAX_NUM_BATCHED_TOKENS") or d.max_num_batched_tokens,
        help="token budget of one step, prefill chunks included [env DYN_BUILTIN_MAX_NUM_BATCHED_TOKENS]",
    )
    group.add_argument(
        "--max-model-len", type=int, default=_opt_int("DYN_BUILTIN_MAX_MODEL_LEN"),
        help="context length: prompt plus generated tokens (default: the model's) "
        "[env DYN_BUILTIN_MAX_MODEL_LEN]",
    )
    group.add_argument(
        "--enforce-eager", action=argparse.BooleanOptionalAction,
        default=(env_default("DYN_BUILTIN_ENFORCE_EAGER", "0") or "0") not in ("0", "false"),
        help="run decode without CUDA graphs (graphs are used on CUDA only) [env DYN_BUILTIN_ENFORCE_EAGER]",
    )
    group.add_argument(
        "--seed", type=int, default=_opt_int("DYN_BUILTIN_SEED") or d.seed,
        help="base seed for requests that carry none [env DYN_BUILTIN_SEED]",
    )
    overlap = env_default("DYN_BUILTIN_OVERLAP_SCHEDULE")
    group.add_argument(
        "--overlap-schedule", action=argparse.BooleanOptionalAction,
        default=None if not overlap else overlap not in ("0", "false"),
        help="launch each step before reading the previous one's tokens, so scheduling overlaps "
        "the forward pass (default: on for CUDA) [env DYN_BUILTIN_OVERLAP_SCHEDULE]",
    )
    group.add_argument(
        "--prefill-device", default=env_default("DYN_BUILTIN_PREFILL_DEVICE"),
        help="prefill workers' device (disaggregated serving; default: --device) [env DYN_BUILTIN_PREFILL_DEVICE]",
    )
    group.add_argument(
        "--prefill-gpu-memory-utilization", type=float,
        default=_opt_float("DYN_BUILTIN_PREFILL_GPU_MEMORY_UTILIZATION"),
        help="prefill workers' --gpu-memory-utilization (default: the same) "
        "[env DYN_BUILTIN_PREFILL_GPU_MEMORY_UTILIZATION]",
    )
    group.add_argument(
        "--prefill-kv-cache-memory-gb", type=float, default=_opt_float("DYN_BUILTIN_PREFILL_KV_CACHE_MEMORY_GB"),
        help="prefill workers' --kv-cache-memory-gb (default: the same) [env DYN_BUILTIN_PREFILL_KV_CACHE_MEMORY_GB]",
    )
    add_kvbm_args(parser)
