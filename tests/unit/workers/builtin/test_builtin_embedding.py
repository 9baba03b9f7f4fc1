"""Embeddings on the built-in engine: pooled final hidden states equal a plain transformers
forward with the same pooling, are the same whatever else shares their pass, many inputs share
one pass; the batcher's budget, cancellation and errors; the worker's option checks and final
steps; how a model directory declares an embedding model."""

from __future__ import annotations

import argparse
import asyncio
import json
import random
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from dynamo import errors  # noqa: E402
from dynamo.wire import EmbeddingRequest  # noqa: E402
from workers.builtin.args import BuiltinConfig  # noqa: E402
from workers.builtin.engine import BuiltinEngine  # noqa: E402
from workers.embedding import (  # noqa: E402
    EMBEDDING_FLAGS,
    EmbeddingConfig,
    EmbeddingEngine,
    PooledBatch,
    check_request,
    embedding_config,
    finish,
    read_sentence_transformers,
)

SHAPE = "qwen3-qknorm"  # Qwen3: q/k norms, GQA; what Qwen3-Embedding is
VOCAB = 512


def random_inputs(n: int, seed: int, lo: int = 1, hi: int = 40) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(2, VOCAB) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def make_engine(model_dir: Path, **overrides: object) -> BuiltinEngine:
    kwargs: dict[str, object] = dict(
        model=str(model_dir), dtype="float32", device="cpu", num_gpu_blocks=256, block_size_tokens=16,
        max_num_batched_tokens=2048, max_num_seqs=64,
    )
    kwargs.update(overrides)
    return BuiltinEngine(BuiltinConfig(**kwargs))  # type: ignore[arg-type]


@pytest.fixture
async def engine(model_dirs: Callable[[str], Path]) -> AsyncIterator[BuiltinEngine]:
    eng = make_engine(model_dirs(SHAPE))
    eng.enable_embeddings(EmbeddingConfig())
    await eng.start()
    try:
        yield eng
    finally:
        await eng.stop()


@pytest.fixture(scope="module")
def hf_hidden(model_dirs: Callable[[str], Path]) -> Callable[[list[int]], np.ndarray]:
    """transformers' final hidden states (after the last norm) in fp64: [tokens, hidden]."""
    model = transformers.AutoModel.from_pretrained(
        str(model_dirs(SHAPE)), dtype=torch.float64, attn_implementation="eager"
    ).eval()

    def run(ids: list[int]) -> np.ndarray:
        with torch.no_grad():
            return model(torch.tensor([ids])).last_hidden_state[0].numpy()

    return run


def reference(hidden: np.ndarray, pooling: str) -> np.ndarray:
    vector = {"last": hidden[-1], "cls": hidden[0], "mean": hidden.mean(axis=0)}[pooling]
    return vector / np.linalg.norm(vector)


def request(inputs: list[list[int]], **options: object) -> EmbeddingRequest:
    return EmbeddingRequest(request_id="r", model="m", inputs=inputs, **options)  # type: ignore[arg-type]


async def embed(engine: BuiltinEngine, inputs: list[list[int]], pooling: str = "last", **options: object) -> np.ndarray:
    req = request(inputs, **options)
    out = finish(await engine.embed(req, pooling), req, EmbeddingConfig())  # type: ignore[arg-type]
    return np.frombuffer(out.data, dtype="<f4").reshape(len(inputs), out.dim)


def test_the_builtin_engine_is_an_embedding_engine(engine: BuiltinEngine) -> None:
    assert isinstance(engine, EmbeddingEngine)
    assert engine.embedding_dim == 64


@pytest.mark.parametrize("pooling", ["last", "mean", "cls"])
async def test_pooled_vectors_equal_a_transformers_forward(
    engine: BuiltinEngine, hf_hidden: Callable[[list[int]], np.ndarray], pooling: str
) -> None:
    inputs = random_inputs(12, seed=1)
    got = await embed(engine, inputs, pooling)
    for ids, vector in zip(inputs, got):
        np.testing.assert_allclose(vector, reference(hf_hidden(ids), pooling), atol=2e-5)
        assert abs(np.linalg.norm(vector) - 1) < 1e-5


async def test_same_input_same_vector_whatever_shares_its_pass(engine: BuiltinEngine) -> None:
    """Batch invariance: an input embedded alone, with 15 others of other lengths, or in
    another position of the batch gives the same vector (to fp32 rounding, and in practice
    exactly on this CPU)."""
    probe = random_inputs(1, seed=7, lo=23, hi=23)[0]
    alone = await embed(engine, [probe])
    others = random_inputs(15, seed=8)
    first = await embed(engine, [probe, *others])
    middle = await embed(engine, [*others[:7], probe, *others[7:]])
    assert engine.embeddings is not None
    np.testing.assert_allclose(first[0], alone[0], rtol=0, atol=1e-6)
    np.testing.assert_allclose(middle[7], alone[0], rtol=0, atol=1e-6)


async def test_many_inputs_share_one_forward_pass(engine: BuiltinEngine) -> None:
    batcher = engine.embeddings
    assert batcher is not None
    before = batcher.num_passes
    await embed(engine, random_inputs(16, seed=2, lo=10, hi=20))
    assert batcher.num_passes - before == 1


async def test_concurrent_requests_are_batched_together(engine: BuiltinEngine) -> None:
    batcher = engine.embeddings
    assert batcher is not None
    inputs = random_inputs(8, seed=3, lo=8, hi=8)
    alone = [await embed(engine, [ids]) for ids in inputs]
    before = batcher.num_passes
    together = await asyncio.gather(*(embed(engine, [ids]) for ids in inputs))
    # The first request may start its pass before the others are queued; the rest share one.
    assert batcher.num_passes - before <= 2
    for a, b in zip(alone, together):
        np.testing.assert_allclose(a, b, atol=1e-6)


async def test_budget_splits_passes_and_a_long_input_runs_alone(model_dirs: Callable[[str], Path]) -> None:
    eng = make_engine(model_dirs(SHAPE), max_num_batched_tokens=64, max_num_seqs=4)
    eng.enable_embeddings(EmbeddingConfig())
    await eng.start()
    try:
        batcher = eng.embeddings
        assert batcher is not None
        # 10 inputs of 16 tokens: 4 per pass (the padded size 4 x 16 fits 64) -> 3 passes.
        await embed(eng, random_inputs(10, seed=4, lo=16, hi=16))
        assert batcher.num_passes == 3
        # One input longer than the whole budget still runs (alone).
        long = random_inputs(1, seed=5, lo=100, hi=100)
        await embed(eng, long)
        assert batcher.num_passes == 4
        assert eng.pool.num_active_blocks == 0  # every lent block came back
    finally:
        await eng.stop()


async def test_cancelled_request_drops_its_queued_inputs(engine: BuiltinEngine) -> None:
    batcher = engine.embeddings
    assert batcher is not None
    task = asyncio.create_task(embed(engine, random_inputs(200, seed=6, lo=30, hi=40)))
    while batcher.num_running == 0:
        await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert batcher.num_waiting == 0 and batcher.waiting_tokens == 0
    # The engine goes on serving, and every block comes back once the pass in flight ends.
    await embed(engine, random_inputs(2, seed=9))
    assert engine.pool.num_active_blocks == 0


async def test_load_metrics_count_queued_inputs(engine: BuiltinEngine) -> None:
    batcher = engine.embeddings
    assert batcher is not None
    task = asyncio.create_task(embed(engine, random_inputs(300, seed=10, lo=30, hi=30)))
    while batcher.num_running == 0:
        await asyncio.sleep(0)
    metrics = engine.load_metrics()
    assert metrics.active_requests > 0 and metrics.waiting_requests > 0
    assert metrics.waiting_prefill_tokens == 30 * batcher.num_waiting
    await task


async def test_input_longer_than_the_kv_cache_is_refused(model_dirs: Callable[[str], Path]) -> None:
    eng = make_engine(model_dirs(SHAPE), num_gpu_blocks=2)
    eng.enable_embeddings(EmbeddingConfig())
    await eng.start()
    try:
        with pytest.raises(errors.InvalidRequest) as info:
            await eng.embed(request([[5] * 10, [5] * 40]), "last")
        assert info.value.param == "input[1]"
    finally:
        await eng.stop()


async def test_generation_still_works_beside_embeddings(engine: BuiltinEngine) -> None:
    from dynamo.wire import PreprocessedRequest, StopConditions

    gen = PreprocessedRequest(request_id="g", model="m", token_ids=[5, 6, 7], stop=StopConditions(max_tokens=4))
    tokens: list[int] = []
    emb = asyncio.create_task(embed(engine, random_inputs(32, seed=11)))
    async for out in engine.generate(gen):
        tokens.extend(out.token_ids)
    await emb
    assert len(tokens) == 4


async def test_mocker_refuses_embeddings() -> None:
    from workers.mocker.args import MockerConfig
    from workers.mocker.engine import MockerEngine

    with pytest.raises(errors.EngineError, match="cannot serve embedding"):
        MockerEngine(MockerConfig()).enable_embeddings(EmbeddingConfig())


# ------------------------------------------------------------------ options and final steps


def test_check_request_names_the_field() -> None:
    config = EmbeddingConfig(matryoshka=True, matryoshka_dimensions=(32, 64))
    with pytest.raises(errors.InvalidRequest) as info:
        check_request(request([[1], [1] * 9]), config, context_length=8, hidden_size=64)
    assert info.value.param == "input[1]"
    with pytest.raises(errors.InvalidRequest) as info:
        check_request(request([[1]], dimensions=16), config, 8, 64)
    assert info.value.param == "dimensions" and "[32, 64]" in info.value.message
    with pytest.raises(errors.InvalidRequest) as info:
        check_request(request([[1]], dimensions=128), config, 8, 64)
    assert info.value.param == "dimensions"
    with pytest.raises(errors.InvalidRequest, match="does not support Matryoshka") as info:
        check_request(request([[1]], dimensions=32), EmbeddingConfig(), 8, 64)
    assert check_request(request([[1]], dimensions=32), config, 8, 64) == "last"
    assert check_request(request([[1]], pooling="mean"), config, 8, 64) == "mean"


def test_finish_truncates_then_normalises() -> None:
    raw = np.arange(1, 9, dtype=np.float32).reshape(2, 4)
    out = finish(PooledBatch(raw, 7), request([[1], [2]], dimensions=2), EmbeddingConfig(matryoshka=True))
    got = np.frombuffer(out.data, dtype="<f4").reshape(2, 2)
    np.testing.assert_allclose(got[0], np.array([1, 2]) / np.sqrt(5), rtol=1e-6)
    assert out.dim == 2 and out.prompt_tokens == 7
    plain = finish(PooledBatch(raw, 7), request([[1], [2]]), EmbeddingConfig(normalize=False))
    np.testing.assert_array_equal(np.frombuffer(plain.data, dtype="<f4").reshape(2, 4), raw)
    zero = finish(PooledBatch(np.zeros((1, 4), np.float32), 1), request([[1]]), EmbeddingConfig())
    assert not np.isnan(np.frombuffer(zero.data, dtype="<f4")).any()


# ------------------------------------------------------------------ model directories, flags


def st_dir(root: Path, pooling: dict[str, object], normalize: bool = True, config: dict | None = None) -> Path:
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (root / "1_Pooling").mkdir(parents=True, exist_ok=True)
    (root / "modules.json").write_text(json.dumps(modules))
    (root / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    (root / "config.json").write_text(json.dumps(config or {"hidden_size": 64}))
    return root


def flags(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    EMBEDDING_FLAGS.add_to(parser, environ={})
    return parser.parse_args(list(argv))


def test_sentence_transformers_directories(tmp_path: Path) -> None:
    # Qwen3-Embedding's own 1_Pooling/config.json (with its Normalize module).
    qwen = st_dir(tmp_path / "qwen", {"word_embedding_dimension": 1024, "pooling_mode_cls_token": False,
                                      "pooling_mode_mean_tokens": False, "pooling_mode_lasttoken": True})
    info = read_sentence_transformers(qwen)
    assert info is not None and info.pooling == "last" and info.normalize
    assert embedding_config(flags(), str(qwen)) == EmbeddingConfig("last", True, False, ())
    mean = st_dir(tmp_path / "mean", {"pooling_mode_mean_tokens": True}, normalize=False,
                  config={"matryoshka_dimensions": [32, 64]})
    assert embedding_config(flags(), str(mean)) == EmbeddingConfig("mean", False, True, (32, 64))
    assert embedding_config(flags("--pooling-type", "cls", "--pooling-normalize"), str(mean)) == EmbeddingConfig(
        "cls", True, True, (32, 64)
    )
    # The newer one-string spelling.
    cls = st_dir(tmp_path / "cls", {"pooling_mode": "cls"})
    assert embedding_config(flags(), str(cls)).pooling == "cls"  # type: ignore[union-attr]
    # A mode we do not implement is refused at start-up unless a pooling type is given.
    maxed = st_dir(tmp_path / "max", {"pooling_mode_max_tokens": True})
    with pytest.raises(SystemExit, match="max_tokens"):
        embedding_config(flags(), str(maxed))
    assert embedding_config(flags("--pooling-type", "mean"), str(maxed)).pooling == "mean"  # type: ignore[union-attr]
    # Modules the built-in engine does not run (a Dense projection) are refused, not skipped.
    dense = st_dir(tmp_path / "dense", {"pooling_mode_mean_tokens": True})
    modules = json.loads((dense / "modules.json").read_text())
    modules.append({"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"})
    (dense / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(SystemExit, match="models.Dense"):
        embedding_config(flags(), str(dense))
    args = flags()
    args.engine = "vllm"  # which applies them
    assert embedding_config(args, str(dense)) is not None
    # --runner generate wins over the directory.
    assert embedding_config(flags("--runner", "generate"), str(qwen)) is None


def test_runner_flag_on_a_plain_model(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 64, "is_matryoshka": True}))
    assert embedding_config(flags(), str(tmp_path)) is None
    assert embedding_config(flags("--runner", "pooling"), str(tmp_path)) == EmbeddingConfig("last", True, True, ())
    assert embedding_config(
        flags("--runner", "pooling", "--no-pooling-normalize", "--no-is-matryoshka"), str(tmp_path)
    ) == EmbeddingConfig("last", False, False, ())
