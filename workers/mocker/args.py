"""The mocker's flags (spelled like Dynamo's mocker and vLLM) with DYN_MOCKER_* environment
fallbacks, and the frozen MockerConfig they turn into."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from dynamo.flags import Flag, FlagGroup
from kvbm.config import KvbmConfig, add_kvbm_args


@dataclass(frozen=True, slots=True)
class MockerConfig:
    """Defaults describe an 8B Llama (bf16) on one H100 SXM 80 GB; see timing.py.

    block_size_tokens=16 is vLLM's default (Dynamo's mocker uses 64): a mocker fleet then
    produces the same block hashes and events as a vLLM fleet, and finer blocks share more of
    a prompt (a partial block is never reused). The cost is 4x more events per token, which
    only matters per prompt, not per generated token.

    num_gpu_blocks: 80 GB x 0.9 memory utilisation = 72 GB, less 16 GB of weights and ~4 GB of
    activations and CUDA graphs leaves ~52 GB of KV cache; at 128 KiB per token (32 layers x
    8 KV heads x 128 dims x K,V x 2 bytes) that is ~396k tokens, ~24.8k blocks of 16.
    """

    block_size_tokens: int = 16
    num_gpu_blocks: int = 24_576
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192  # vLLM v1's default chunked-prefill budget on an H100
    max_model_len: int = 8192  # Llama 3 8B
    speedup_ratio: float = 1.0
    vocab_size: int = 128_256  # Llama 3
    seed: int = 0
    # Ids never generated (special tokens), so detokenized output is always visible text.
    exclude_token_ids: frozenset[int] = frozenset()
    kvbm: KvbmConfig = KvbmConfig()  # simulated host/disk tiers (kvbm/simulated.py); off by default
    # The served model's directory: its tokenizer drives output constraints (structured outputs).
    model_dir: str | None = None

    def __post_init__(self) -> None:
        for name in ("block_size_tokens", "num_gpu_blocks", "max_num_seqs",
                     "max_num_batched_tokens", "vocab_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_model_len < 2:
            raise ValueError(f"max_model_len must be at least 2, got {self.max_model_len}")
        if not self.speedup_ratio > 0:
            raise ValueError(f"speedup_ratio must be positive, got {self.speedup_ratio}")
        if sum(1 for t in self.exclude_token_ids if 0 <= t < self.vocab_size) >= self.vocab_size:
            raise ValueError("exclude_token_ids leaves no token to generate")

    @property
    def kv_capacity_tokens(self) -> int:
        return self.num_gpu_blocks * self.block_size_tokens

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> MockerConfig:
        """Vocabulary size and special tokens come from the served model's files when present,
        so that generated ids detokenize; --vocab-size overrides the size."""
        model_dir = getattr(args, "model", None)
        vocab_size, special, context = (
            _model_vocab(Path(model_dir)) if model_dir else (None, frozenset(), None)
        )
        return cls(
            block_size_tokens=args.block_size,
            num_gpu_blocks=args.num_gpu_blocks,
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            max_model_len=args.max_model_len or context or _DEFAULTS.max_model_len,
            speedup_ratio=args.speedup_ratio,
            vocab_size=args.vocab_size or vocab_size or _DEFAULTS.vocab_size,
            seed=args.seed,
            exclude_token_ids=special,
            kvbm=KvbmConfig.from_args(args),
            model_dir=str(model_dir) if model_dir else None,
        )


_DEFAULTS = MockerConfig()  # slots dataclasses keep no class-level defaults to read


def _model_vocab(model_dir: Path) -> tuple[int | None, frozenset[int], int | None]:
    """(vocab_size and context length from config.json, special token ids from config.json
    and tokenizer.json): the mocker then answers with the served model's limits."""
    vocab_size: int | None = None
    context: int | None = None
    special: set[int] = set()
    config_path = model_dir / "config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text())
        vocab_size = config.get("vocab_size")
        context = config.get("max_position_embeddings")
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = config.get(key)
            special.update(value if isinstance(value, list) else [] if value is None else [value])
    tokenizer_path = model_dir / "tokenizer.json"
    if tokenizer_path.is_file():
        added = json.loads(tokenizer_path.read_text()).get("added_tokens", [])
        special.update(t["id"] for t in added if t.get("special"))
    return vocab_size, frozenset(special), context


_D = _DEFAULTS
MOCKER_FLAGS = FlagGroup(
    "mocker engine",
    [
        Flag("--block-size", "tokens per KV block", _D.block_size_tokens, "DYN_MOCKER_BLOCK_SIZE", int),
        Flag("--num-gpu-blocks", "KV blocks in the simulated GPU pool", _D.num_gpu_blocks,
             "DYN_MOCKER_NUM_GPU_BLOCKS", int),
        Flag("--max-num-seqs", "most requests running at once", _D.max_num_seqs, "DYN_MOCKER_MAX_NUM_SEQS", int),
        Flag("--max-num-batched-tokens", "token budget of one step, prefill chunks included",
             _D.max_num_batched_tokens, "DYN_MOCKER_MAX_NUM_BATCHED_TOKENS", int),
        Flag("--max-model-len", "context length: prompt plus generated tokens", None, "DYN_MOCKER_MAX_MODEL_LEN",
             int, default_doc=f"the model's max_position_embeddings, else {_D.max_model_len}"),
        Flag("--speedup-ratio", "divide simulated engine time by this; >= 1e6 means no sleeping at all",
             _D.speedup_ratio, "DYN_MOCKER_SPEEDUP_RATIO", float),
        Flag("--vocab-size", "generate ids below this", None, "DYN_MOCKER_VOCAB_SIZE", int,
             default_doc="the model's config.json"),
        Flag("--seed", "seed mixed into every request's token stream", _D.seed, "DYN_MOCKER_SEED", int),
    ],
)


def add_mocker_args(parser: argparse.ArgumentParser) -> None:
    MOCKER_FLAGS.add_to(parser)
    add_kvbm_args(parser)
