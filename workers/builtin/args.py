"""The built-in engine's flags (spelled like vLLM's) with DYN_BUILTIN_* environment fallbacks,
and the frozen BuiltinConfig they turn into. --model belongs to the entry points."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from dynamo.flags import Flag, FlagGroup
from kvbm.config import KvbmConfig, add_kvbm_args

DEFAULT_MODEL = str(Path(__file__).resolve().parents[2] / "models" / "dynamo-tiny")
# auto: the model directory's safetensors checkpoint; dummy: random weights of its config.json's
# shape (vLLM's --load-format dummy), for benchmarks of a shape whose checkpoint is not at hand.
LOAD_FORMATS = ("auto", "dummy")


@dataclass(frozen=True, slots=True)
class BuiltinConfig:
    """KV cache size: num_gpu_blocks if set, else kv_cache_memory_gb if set, else on CUDA
    gpu_memory_utilization of free memory after loading, else (CPU) 0.25 GiB."""

    model: str = DEFAULT_MODEL
    dtype: str = "auto"  # auto: bf16 on GPU, fp32 on CPU
    load_format: str = "auto"  # one of LOAD_FORMATS
    device: str = "auto"  # auto: cuda if available, else cpu
    block_size_tokens: int = 16
    num_gpu_blocks: int | None = None
    kv_cache_memory_gb: float | None = None
    gpu_memory_utilization: float = 0.9
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    enforce_eager: bool = False  # True: no CUDA graphs for decode (they apply on CUDA only)
    # Steps with prefill chunks through CUDA graphs too (workers/builtin/prefill_graphs.py): on an
    # H100, 4 x 512 tokens ran at 70-72% of the matmul peak against 40-62% eager (RESULTS.md).
    prefill_cuda_graphs: bool = True
    seed: int = 0  # seeds requests that give no seed, in arrival order
    # Launch step N+1 before reading step N's tokens (PagedEngine's overlap loop); None: on CUDA.
    overlap_schedule: bool | None = None
    kvbm: KvbmConfig = KvbmConfig()  # host/disk tiers below the KV cache; off by default

    def __post_init__(self) -> None:
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(f"load_format must be one of {', '.join(LOAD_FORMATS)}, got {self.load_format!r}")
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
            load_format=args.load_format,
            device=device,
            block_size_tokens=args.block_size,
            num_gpu_blocks=args.num_gpu_blocks,
            kv_cache_memory_gb=kv_gb,
            gpu_memory_utilization=util,
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            max_model_len=args.max_model_len,
            enforce_eager=args.enforce_eager,
            prefill_cuda_graphs=args.prefill_cuda_graphs,
            seed=args.seed,
            overlap_schedule=getattr(args, "overlap_schedule", None),
            kvbm=KvbmConfig.from_args(args),
        )


_DEFAULTS = BuiltinConfig()


_D = _DEFAULTS
BUILTIN_FLAGS = FlagGroup(
    "builtin engine",
    [
        Flag("--dtype", "weights and KV cache dtype; auto is bf16 on GPU, fp32 on CPU", _D.dtype, "DYN_BUILTIN_DTYPE",
             choices=("auto", "float32", "bfloat16", "float16")),
        Flag("--load-format", "auto: the model directory's safetensors checkpoint; dummy: random weights of its "
             "config.json's shape, no checkpoint needed (benchmarks)", _D.load_format, "DYN_BUILTIN_LOAD_FORMAT",
             choices=LOAD_FORMATS),
        Flag("--device", "auto, cpu, cuda or cuda:N", _D.device, "DYN_BUILTIN_DEVICE"),
        Flag("--block-size", "tokens per KV block", _D.block_size_tokens, "DYN_BUILTIN_BLOCK_SIZE", int),
        Flag("--num-gpu-blocks", "KV blocks to allocate", None, "DYN_BUILTIN_NUM_GPU_BLOCKS", int,
             default_doc="sized from memory"),
        Flag("--kv-cache-memory-gb", "KV cache size in GB when --num-gpu-blocks is not given", None,
             "DYN_BUILTIN_KV_CACHE_MEMORY_GB", float, default_doc="0.25 on CPU, free memory on GPU"),
        Flag("--gpu-memory-utilization", "fraction of the GPU's memory this engine may use (its weights, KV cache "
             "and step activations), capped by what is free: two engines can split one GPU",
             _D.gpu_memory_utilization, "DYN_BUILTIN_GPU_MEMORY_UTILIZATION", float),
        Flag("--max-num-seqs", "most requests running at once", _D.max_num_seqs, "DYN_BUILTIN_MAX_NUM_SEQS", int),
        Flag("--max-num-batched-tokens", "token budget of one step, prefill chunks included",
             _D.max_num_batched_tokens, "DYN_BUILTIN_MAX_NUM_BATCHED_TOKENS", int),
        Flag("--max-model-len", "context length: prompt plus generated tokens", None, "DYN_BUILTIN_MAX_MODEL_LEN",
             int, default_doc="the model's"),
        Flag("--enforce-eager", "run decode without CUDA graphs (graphs are used on CUDA only)", _D.enforce_eager,
             "DYN_BUILTIN_ENFORCE_EAGER", bool),
        Flag("--prefill-cuda-graphs", "run steps with prefill chunks of up to --max-num-batched-tokens through CUDA "
             "graphs as well (one per token bucket; their activations are reserved a second time; CUDA only, "
             "not with --enforce-eager)", _D.prefill_cuda_graphs, "DYN_BUILTIN_PREFILL_CUDA_GRAPHS", bool),
        Flag("--seed", "base seed for requests that carry none", _D.seed, "DYN_BUILTIN_SEED", int),
        Flag("--overlap-schedule", "launch each step before reading the previous one's tokens, so scheduling "
             "overlaps the forward pass", None, "DYN_BUILTIN_OVERLAP_SCHEDULE", bool, default_doc="on for CUDA"),
        Flag("--prefill-device", "prefill workers' device (disaggregated serving)", None,
             "DYN_BUILTIN_PREFILL_DEVICE", default_doc="--device"),
        Flag("--prefill-gpu-memory-utilization", "prefill workers' --gpu-memory-utilization", None,
             "DYN_BUILTIN_PREFILL_GPU_MEMORY_UTILIZATION", float, default_doc="the same"),
        Flag("--prefill-kv-cache-memory-gb", "prefill workers' --kv-cache-memory-gb", None,
             "DYN_BUILTIN_PREFILL_KV_CACHE_MEMORY_GB", float, default_doc="the same"),
    ],
)


def on_a_gpu(args: argparse.Namespace) -> bool:
    """Whether any worker these flags configure runs on CUDA: there, under dynamo.serve, the
    step loop gets a process of its own by default. On an H100 the HTTP path in the engine's
    process served 0.74-0.97 of the in-process throughput; a worker process, 1.01-1.02
    (benchmarks/RESULTS.md, `dynamo.serve --worker-processes`)."""
    devices = {args.device, getattr(args, "prefill_device", None) or args.device}
    if any(d.startswith("cuda") for d in devices):
        return True
    if "auto" not in devices:
        return False
    import torch  # here only: the flags themselves need no torch

    return bool(torch.cuda.is_available())


def add_builtin_args(parser: argparse.ArgumentParser) -> None:
    BUILTIN_FLAGS.add_to(parser)
    add_kvbm_args(parser)
