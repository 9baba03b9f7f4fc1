"""POST /v1/embeddings end to end in one process: the official openai client, the frontend app,
the model manager, and a real worker serving a random-weight Qwen3-shaped embedding model on the
built-in engine (the model directory a sentence-transformers one, last-token pooling, normalised).
Vectors equal a transformers forward with the same pooling; the same text gives the same vector
whatever shares its request; base64 equals float; token ids equal text; bad inputs get OpenAI's
error shape; /v1/models says what each model serves."""

from __future__ import annotations

import argparse
import base64
import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
openai = pytest.importorskip("openai")

from dynamo.wire import ModelCard  # noqa: E402
from frontend.embeddings import EmbeddingsBody, tokenize_inputs  # noqa: E402
from frontend.tokenizer import ModelTokenizer  # noqa: E402
from router.args import RouterConfig  # noqa: E402
from router.base import RoundRobinRouter  # noqa: E402
from router.load_aware import LeastLoadedRouter  # noqa: E402
from router.metrics import RouterMetrics  # noqa: E402
from router.modes import model_router_factory  # noqa: E402
from tests.unit.frontend.conftest import MODEL, TINY_MODEL, Stack, start_worker  # noqa: E402
from workers.builtin.args import BuiltinConfig  # noqa: E402
from workers.builtin.engine import BuiltinEngine  # noqa: E402
from workers.builtin.testing_models import TinyModelSpec, build_random_model  # noqa: E402
from workers.embedding import EMBEDDING_FLAGS, embedding_config  # noqa: E402
from workers.worker import Worker, WorkerConfig  # noqa: E402

EMBED = "emb"  # matryoshka
PLAIN = "emb-plain"  # the same model, dimensions refused
CONTEXT = 256
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "hello",
    "Embeddings turn text into vectors.",
    "A somewhat longer sentence, with punctuation; and several clauses, to vary the length a bit more.",
]


def st_model(root: Path, matryoshka: bool) -> Path:
    """A random Qwen3-shaped model with the project tokenizer, laid out as a sentence-transformers
    model (last-token pooling, Normalize), like Qwen3-Embedding."""
    spec = TinyModelSpec(
        architecture="Qwen3ForCausalLM", vocab_size=8192, hidden_size=64, intermediate_size=128,
        num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, tie_word_embeddings=True,
        max_position_embeddings=CONTEXT, eos_token_id=3, seed=11,
    )
    build_random_model(spec, root)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(Path(TINY_MODEL) / name, root / name)
    (root / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]))
    (root / "1_Pooling").mkdir()
    (root / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 64, "pooling_mode_lasttoken": True, "pooling_mode_mean_tokens": False}
    ))
    if matryoshka:
        config = json.loads((root / "config.json").read_text())
        config["is_matryoshka"] = True
        (root / "config.json").write_text(json.dumps(config))
    return root


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {
        EMBED: st_model(tmp_path_factory.mktemp("emb"), matryoshka=True),
        PLAIN: st_model(tmp_path_factory.mktemp("emb-plain"), matryoshka=False),
    }


@pytest.fixture(scope="module")
def hf_embed(model_dirs: dict[str, Path]) -> Any:
    """transformers in fp64: last-token pooling of the final hidden states, normalised."""
    model = transformers.AutoModel.from_pretrained(
        str(model_dirs[EMBED]), dtype=torch.float64, attn_implementation="eager"
    ).eval()

    def run(ids: list[int]) -> np.ndarray:
        with torch.no_grad():
            last = model(torch.tensor([ids])).last_hidden_state[0, -1].numpy()
        return last / np.linalg.norm(last)

    return run


@pytest.fixture(scope="module")
def emb_tokenizer(model_dirs: dict[str, Path]) -> ModelTokenizer:
    return ModelTokenizer.load(str(model_dirs[EMBED]))


async def start_embedding_worker(stack: Stack, name: str, model_dir: Path) -> Worker:
    parser = argparse.ArgumentParser()
    EMBEDDING_FLAGS.add_to(parser, environ={})
    embedding = embedding_config(parser.parse_args([]), str(model_dir))  # --runner auto
    assert embedding is not None and embedding.pooling == "last" and embedding.normalize
    engine = BuiltinEngine(BuiltinConfig(model=str(model_dir), dtype="float32", device="cpu", num_gpu_blocks=128))
    runtime = stack.runtime.sibling()
    worker = Worker(runtime, engine, WorkerConfig(
        served_model_name=name, model_path=str(model_dir), engine_name="builtin", endpoint="embed",
        embedding=embedding,
    ))
    await worker.start()
    await stack.manager.wait_until(
        lambda: name in stack.manager.models and worker.instance_id in stack.manager.models[name].instance_ids(), 10
    )
    return worker


@pytest.fixture
async def served(stack: Stack, model_dirs: dict[str, Path]) -> AsyncIterator[Stack]:
    await start_worker(stack, [1, 2, 3])  # the generative model MODEL, scripted
    workers = [await start_embedding_worker(stack, EMBED, model_dirs[EMBED]),
               await start_embedding_worker(stack, PLAIN, model_dirs[PLAIN])]
    try:
        yield stack
    finally:
        for w in workers:
            await w.stop()
            await w.runtime.shutdown()


@pytest.fixture
def client(served: Stack) -> openai.AsyncOpenAI:
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=served.app))  # type: ignore[arg-type]
    return openai.AsyncOpenAI(api_key="unused", base_url="http://test/v1", http_client=http, max_retries=0)


def vectors(response: Any) -> np.ndarray:
    return np.array([d.embedding for d in response.data], dtype=np.float32)


# ------------------------------------------------------------------------------------ results


async def test_openai_client_embeddings_equal_transformers(
    client: openai.AsyncOpenAI, emb_tokenizer: ModelTokenizer, hf_embed: Any
) -> None:
    response = await client.embeddings.create(model=EMBED, input=TEXTS)  # base64 on the wire
    assert response.model == EMBED and [d.index for d in response.data] == [0, 1, 2, 3]
    ids = [emb_tokenizer.encode(t, add_special_tokens=True) for t in TEXTS]
    assert response.usage.prompt_tokens == response.usage.total_tokens == sum(len(i) for i in ids)
    got = vectors(response)
    assert got.shape == (4, 64)
    for row, token_ids in zip(got, ids):
        np.testing.assert_allclose(row, hf_embed(token_ids), atol=2e-5)


async def test_same_text_same_vector_in_batches_of_1_and_16(client: openai.AsyncOpenAI) -> None:
    text = TEXTS[0]
    alone = vectors(await client.embeddings.create(model=EMBED, input=text))[0]
    others = [f"filler sentence number {i} " * (i % 5 + 1) for i in range(15)]
    batch = vectors(await client.embeddings.create(model=EMBED, input=[*others[:9], text, *others[9:]]))
    assert batch.shape == (16, 64)
    np.testing.assert_allclose(batch[9], alone, rtol=0, atol=1e-6)


async def test_base64_decodes_to_the_float_values(served: Stack) -> None:
    body = {"model": EMBED, "input": TEXTS}
    floats = (await served.client.post("/v1/embeddings", json=body)).json()
    encoded = (await served.client.post("/v1/embeddings", json={**body, "encoding_format": "base64"})).json()
    assert floats["object"] == "list" and floats["data"][0]["object"] == "embedding"
    for f, b in zip(floats["data"], encoded["data"]):
        decoded = np.frombuffer(base64.b64decode(b["embedding"]), dtype="<f4")
        np.testing.assert_array_equal(decoded, np.array(f["embedding"], dtype=np.float32))
    assert floats["usage"] == encoded["usage"]


async def test_token_ids_equal_strings(client: openai.AsyncOpenAI, emb_tokenizer: ModelTokenizer) -> None:
    ids = [emb_tokenizer.encode(t, add_special_tokens=True) for t in TEXTS]
    from_text = vectors(await client.embeddings.create(model=EMBED, input=TEXTS))
    from_ids = vectors(await client.embeddings.create(model=EMBED, input=ids))
    np.testing.assert_array_equal(from_text, from_ids)
    one = vectors(await client.embeddings.create(model=EMBED, input=ids[2]))  # one list of token ids
    np.testing.assert_array_equal(one[0], from_text[2])


async def test_dimensions_truncate_and_renormalise(client: openai.AsyncOpenAI) -> None:
    full = vectors(await client.embeddings.create(model=EMBED, input=TEXTS[:2]))
    short = vectors(await client.embeddings.create(model=EMBED, input=TEXTS[:2], dimensions=16))
    assert short.shape == (2, 16)
    expected = full[:, :16] / np.linalg.norm(full[:, :16], axis=1, keepdims=True)
    np.testing.assert_allclose(short, expected, atol=1e-6)


async def test_models_list_says_what_each_model_serves(client: openai.AsyncOpenAI) -> None:
    models = {m.id: m.model_dump() for m in (await client.models.list()).data}
    assert models[EMBED]["capabilities"] == ["embeddings"] and models[EMBED]["max_model_len"] == CONTEXT
    assert models[MODEL]["capabilities"] == ["chat", "completions"]
    assert models[MODEL]["max_model_len"] == 256


async def test_cards_say_embedding(served: Stack) -> None:
    card = served.manager.models[EMBED].card
    assert card.model_type == "embedding" and card.embedding_dim == 64 and card.endpoint == "embed"
    assert served.manager.models[MODEL].card.model_type == "generate"


# ------------------------------------------------------------------------------------- errors


async def error(served: Stack, body: dict[str, Any], path: str = "/v1/embeddings") -> tuple[int, dict[str, Any]]:
    resp = await served.client.post(path, json=body)
    payload = resp.json()
    assert set(payload) == {"error"} and {"message", "type", "param", "code"} <= set(payload["error"])
    return resp.status_code, payload["error"]


async def test_bad_inputs_get_openai_errors(served: Stack) -> None:
    status, err = await error(served, {"model": EMBED, "input": []})
    assert status == 400 and err["param"] == "input" and err["type"] == "invalid_request_error"
    status, err = await error(served, {"model": EMBED, "input": ["ok", [1, 2]]})
    assert status == 400 and err["param"] == "input"
    status, err = await error(served, {"model": EMBED, "input": ["ok", "x " * 400]})
    assert status == 400 and err["param"] == "input[1]" and "256" in err["message"]
    status, err = await error(served, {"model": EMBED, "input": [[1, 2], [99999]]})
    assert status == 400 and err["param"] == "input[1]"
    status, err = await error(served, {"model": EMBED, "input": ""})
    assert status == 400 and err["param"] == "input"
    status, err = await error(served, {"model": EMBED, "input": "x", "encoding_format": "int8"})
    assert status == 400 and err["param"] == "encoding_format"
    status, err = await error(served, {"model": EMBED, "input": "x", "truncate": True})
    assert status == 400 and err["param"] == "truncate"
    status, err = await error(served, {"model": "nope", "input": "x"})
    assert status == 404


async def test_dimensions_refused_where_the_model_does_not_allow_them(served: Stack) -> None:
    # The worker refuses these (it knows the model); the request plane carries an error's code
    # and message, not its param, so the message names the field.
    status, err = await error(served, {"model": PLAIN, "input": "x", "dimensions": 16})
    assert status == 400 and "dimensions must be unset" in err["message"] and "Matryoshka" in err["message"]
    status, err = await error(served, {"model": EMBED, "input": "x", "dimensions": 65})
    assert status == 400 and err["message"].startswith("dimensions must be in [1, 64]")
    status, err = await error(served, {"model": EMBED, "input": "x", "dimensions": 0})
    assert status == 400 and err["param"] == "dimensions"


async def test_each_endpoint_only_for_models_that_serve_it(served: Stack, client: openai.AsyncOpenAI) -> None:
    status, err = await error(served, {"model": MODEL, "input": "hello"})
    assert status == 400 and "generative model" in err["message"] and err["param"] == "model"
    chat = {"model": EMBED, "messages": [{"role": "user", "content": "hi"}]}
    status, err = await error(served, chat, "/v1/chat/completions")
    assert status == 400 and "embedding model" in err["message"]
    status, err = await error(served, {"model": EMBED, "prompt": "hi"}, "/v1/completions")
    assert status == 400 and "embedding model" in err["message"]
    with pytest.raises(openai.BadRequestError) as info:
        await client.embeddings.create(model=MODEL, input="hello")
    assert info.value.status_code == 400


# ------------------------------------------------------------------------------- the pieces


def test_tokenize_inputs_shapes(emb_tokenizer: ModelTokenizer) -> None:
    def run(value: Any) -> list[list[int]]:
        return tokenize_inputs(EmbeddingsBody(model="m", input=value), emb_tokenizer, CONTEXT)

    hello = emb_tokenizer.encode("hello", add_special_tokens=True)
    assert run("hello") == [hello]
    assert run(["hello", "hello"]) == [hello, hello]
    assert run([5, 6, 7]) == [[5, 6, 7]]
    assert run([[5], [6, 7]]) == [[5], [6, 7]]


def test_embedding_models_are_routed_by_load() -> None:
    class FakeRuntime:
        events = None

    card = ModelCard(served_model_name="e", model_path="/x", context_length=8, kv_block_size=16, model_type="embedding")
    metrics = RouterMetrics(__import__("prometheus_client").CollectorRegistry())
    for mode, expected in (("kv", LeastLoadedRouter), ("remote", LeastLoadedRouter), ("round-robin", RoundRobinRouter)):
        make = model_router_factory(FakeRuntime(), mode, RouterConfig(), metrics)  # type: ignore[arg-type]
        assert type(make(card)) is expected


async def test_a_full_or_dead_worker_is_retried_on_another(served: Stack) -> None:
    """A second instance of the model that answers Overloaded: every request still succeeds,
    on the real worker, and the full one was tried."""
    from dynamo import errors
    from dynamo.model_registry import register_model
    from dynamo.runtime import RequestContext

    tried: list[int] = []

    async def full(payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
        tried.append(1)
        raise errors.Overloaded("queue full")
        yield b""  # pragma: no cover - makes this an async generator

    runtime = served.runtime.sibling()
    try:
        lease = await runtime.primary_lease()
        await runtime.endpoint("backend", "embed").serve(full)
        real = served.manager.models[EMBED].card
        card = ModelCard(
            served_model_name=EMBED, model_path=real.model_path, context_length=CONTEXT, kv_block_size=16,
            namespace=runtime.namespace, endpoint="embed", instance_id=lease, model_type="embedding", embedding_dim=64,
        )
        await register_model(runtime.discovery, card, lease)
        await served.manager.wait_until(lambda: lease in served.manager.models[EMBED].instance_ids(), 5)
        for _ in range(4):
            resp = await served.client.post("/v1/embeddings", json={"model": EMBED, "input": "hello"})
            assert resp.status_code == 200, resp.text
        assert tried  # round-robin sent some of them to the full worker first
    finally:
        await runtime.shutdown()
