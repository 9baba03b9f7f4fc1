"""Embedding models on a worker, whatever the engine: the flags and model-directory facts that
make a worker serve one (`--runner pooling`, or a sentence-transformers directory), the pooling
defaults they resolve to (EmbeddingConfig), the capability an engine implements to serve
embeddings (EmbeddingEngine), and the last steps every engine shares (Matryoshka truncation,
L2 normalisation, the wire output)."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

from dynamo import errors
from dynamo.flags import Flag, FlagGroup
from dynamo.wire import EmbeddingOutput, EmbeddingRequest, PoolingType

Runner = Literal["auto", "generate", "pooling"]
POOLING_TYPES: tuple[PoolingType, ...] = ("last", "mean", "cls")
EMBED_ENDPOINT = "embed"  # the request-plane endpoint an embedding worker serves by default

# Names as vLLM spells them (--runner), so that a vLLM command line means the same here.
EMBEDDING_FLAGS = FlagGroup(
    "embedding",
    [
        Flag(
            "--runner",
            "what the worker serves the model for: generate (chat and completions) or pooling "
            "(embeddings, on its own endpoint `embed`); auto: pooling when the model directory is "
            "a sentence-transformers model (modules.json with a Pooling module), else generate",
            default="auto",
            env="DYN_RUNNER",
            choices=("auto", "generate", "pooling"),
        ),
        Flag(
            "--pooling-type",
            "how an embedding model turns its final hidden states into one vector: the last "
            "token's, the mean over all tokens, or the first (CLS) token's; auto: the model's "
            "1_Pooling/config.json, else last (decoder embedding models such as Qwen3-Embedding)",
            default="auto",
            env="DYN_POOLING_TYPE",
            choices=("auto", *POOLING_TYPES),
        ),
        Flag(
            "--pooling-normalize",
            "L2-normalise embeddings",
            env="DYN_POOLING_NORMALIZE",
            type=bool,
            default_doc="on, unless the model's modules.json lists pooling without a Normalize module",
        ),
        Flag(
            "--is-matryoshka",
            "the model allows truncated embeddings (the `dimensions` request field)",
            env="DYN_IS_MATRYOSHKA",
            type=bool,
            default_doc="config.json's is_matryoshka or matryoshka_dimensions (as vLLM reads them)",
        ),
    ],
)

_ST_POOLING = "sentence_transformers.models.Pooling"
_ST_NORMALIZE = "sentence_transformers.models.Normalize"
_ST_TRANSFORMER = "sentence_transformers.models.Transformer"
# Engines that apply a sentence-transformers model's other modules (Dense projections, ...).
_ENGINES_WITH_ST_MODULES = ("vllm",)
# sentence-transformers' 1_Pooling/config.json keys -> our pooling types (None: not supported).
_ST_MODES: dict[str, PoolingType | None] = {
    "pooling_mode_lasttoken": "last",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": None,
    "pooling_mode_mean_sqrt_len_tokens": None,
    "pooling_mode_weightedmean_tokens": None,
}


@dataclass(frozen=True, slots=True)
class EmbeddingConfig:
    """How a worker serves an embedding model: requests that name no pooling or normalisation
    get these; `dimensions` is accepted only when `matryoshka` (and then only the listed sizes,
    when the model lists them)."""

    pooling: PoolingType = "last"
    normalize: bool = True
    matryoshka: bool = False
    matryoshka_dimensions: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class SentenceTransformersInfo:
    """What a sentence-transformers model directory says about pooling."""

    pooling: PoolingType | None  # None: a mode we do not implement (max, weighted mean, ...)
    pooling_mode: str  # its own name for the mode, for messages
    normalize: bool
    other_modules: tuple[str, ...] = ()  # e.g. a Dense projection after pooling


def read_sentence_transformers(model_dir: str | Path) -> SentenceTransformersInfo | None:
    """The pooling a sentence-transformers directory declares (modules.json naming a Pooling
    module, whose config.json says the mode), or None when it declares none."""
    root = Path(model_dir)
    modules = _read_json(root / "modules.json")
    if not isinstance(modules, list):
        return None
    pooling_path = next(
        (m.get("path", "") for m in modules if isinstance(m, dict) and m.get("type") == _ST_POOLING), None
    )
    if pooling_path is None:
        return None
    normalize = any(isinstance(m, dict) and m.get("type") == _ST_NORMALIZE for m in modules)
    known = (_ST_POOLING, _ST_NORMALIZE, _ST_TRANSFORMER)
    others = tuple(str(m.get("type")) for m in modules if isinstance(m, dict) and m.get("type") not in known)
    config = _read_json(root / pooling_path / "config.json")
    if not isinstance(config, dict):
        config = {}
    mode = config.get("pooling_mode")  # newer sentence-transformers spell it as one string
    if isinstance(mode, str):
        key = {"lasttoken": "pooling_mode_lasttoken", "mean": "pooling_mode_mean_tokens",
               "cls": "pooling_mode_cls_token"}.get(mode, mode)
        return SentenceTransformersInfo(_ST_MODES.get(key), mode, normalize, others)
    for key, pooling in _ST_MODES.items():
        if config.get(key):
            return SentenceTransformersInfo(pooling, key.removeprefix("pooling_mode_"), normalize, others)
    return SentenceTransformersInfo("mean", "mean_tokens", normalize, others)  # its default mode


def embedding_config(args: argparse.Namespace, model_dir: str) -> EmbeddingConfig | None:
    """The worker's embedding settings from its flags and model directory; None when it serves
    the model for generation."""
    st = read_sentence_transformers(model_dir)
    runner: Runner = args.runner
    if runner == "generate" or (runner == "auto" and st is None):
        return None
    engine = getattr(args, "engine", "builtin")
    if st is not None and st.other_modules and engine not in _ENGINES_WITH_ST_MODULES:
        raise SystemExit(
            f"{model_dir}: the {engine} engine does not apply sentence-transformers modules "
            f"{', '.join(st.other_modules)}; serve this model with --engine vllm"
        )
    pooling: PoolingType
    if args.pooling_type != "auto":
        pooling = args.pooling_type
    elif st is not None:
        if st.pooling is None:
            raise SystemExit(
                f"{model_dir}: sentence-transformers pooling mode {st.pooling_mode!r} is not supported; "
                f"choose one with --pooling-type ({', '.join(POOLING_TYPES)})"
            )
        pooling = st.pooling
    else:
        pooling = "last"
    normalize = args.pooling_normalize
    if normalize is None:
        normalize = st.normalize if st is not None else True
    config = _read_json(Path(model_dir) / "config.json")
    config = config if isinstance(config, dict) else {}
    dims = config.get("matryoshka_dimensions") or ()
    matryoshka = args.is_matryoshka
    if matryoshka is None:
        matryoshka = bool(dims) or bool(config.get("is_matryoshka", False))
    return EmbeddingConfig(pooling, bool(normalize), bool(matryoshka), tuple(int(d) for d in dims))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# ------------------------------------------------------------------------------ the capability


@dataclass(frozen=True, slots=True)
class PooledBatch:
    """An engine's answer: one pooled, not yet normalised float32 vector per input (rows of
    `vectors`, in input order) and the tokens it read."""

    vectors: np.ndarray  # [len(inputs), hidden] float32
    prompt_tokens: int


@runtime_checkable
class EmbeddingEngine(Protocol):
    """An engine that can serve an embedding model. The worker calls `enable_embeddings` once,
    before `start` (an engine that must choose a runner when it starts, like vLLM, does so
    there), then `embed` per request."""

    def enable_embeddings(self, config: EmbeddingConfig) -> None: ...

    @property
    def embedding_dim(self) -> int:
        """The length of the pooled vectors (the model's hidden size); known once started."""
        ...

    async def embed(self, request: EmbeddingRequest, pooling: PoolingType) -> PooledBatch:
        """Run every input of `request` (checked by `check_request`) and pool its final hidden
        states with `pooling`. Cancelling the call drops the inputs not yet computed."""
        ...


def check_request(
    request: EmbeddingRequest, config: EmbeddingConfig, context_length: int, hidden_size: int
) -> PoolingType:
    """Refuse what the model cannot do, naming the field; returns the pooling to use."""
    if not request.inputs:
        raise errors.InvalidRequest("input must not be empty", param="input")
    for i, ids in enumerate(request.inputs):
        if not ids:
            raise errors.InvalidRequest(f"input[{i}] is empty", param=f"input[{i}]")
        if len(ids) > context_length:
            raise errors.InvalidRequest(
                f"input[{i}] has {len(ids)} tokens; this model's context is {context_length} tokens",
                param=f"input[{i}]",
            )
    dims = request.dimensions
    if dims is not None:
        if not config.matryoshka:
            raise errors.InvalidRequest(
                f"model {request.model!r} does not support Matryoshka embeddings: dimensions must be unset",
                param="dimensions",
            )
        if not 1 <= dims <= hidden_size:
            raise errors.InvalidRequest(
                f"dimensions must be in [1, {hidden_size}] for model {request.model!r}, got {dims}",
                param="dimensions",
            )
        if config.matryoshka_dimensions and dims not in config.matryoshka_dimensions:
            raise errors.InvalidRequest(
                f"model {request.model!r} supports dimensions {list(config.matryoshka_dimensions)}, got {dims}",
                param="dimensions",
            )
    return request.pooling or config.pooling


def finish(batch: PooledBatch, request: EmbeddingRequest, config: EmbeddingConfig) -> EmbeddingOutput:
    """Truncate (Matryoshka), then normalise, as vLLM and sentence-transformers do, and pack the
    vectors for the wire."""
    vectors = np.asarray(batch.vectors, dtype=np.float32)
    if request.dimensions is not None:
        vectors = vectors[:, : request.dimensions]
    normalize = config.normalize if request.normalize is None else request.normalize
    if normalize:
        # torch.nn.functional.normalize's eps: a zero vector stays zero instead of NaN.
        norms = np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        vectors = vectors / norms
    data = np.ascontiguousarray(vectors, dtype="<f4").tobytes()
    return EmbeddingOutput(data=data, dim=int(vectors.shape[1]), prompt_tokens=batch.prompt_tokens)
