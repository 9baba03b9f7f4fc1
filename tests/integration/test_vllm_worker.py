"""The vLLM worker on vLLM for CPUs (`pytest -m vllm`): greedy output equal to vLLM's own
LLM.generate, KV events re-hashed with our block hash, cancellation, and end to end: frontend
plus two vLLM workers, a repeated prompt routed by the KV router to the worker that cached it."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from dynamo.kv_hash import block_hash, block_hashes
from dynamo.wire import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EngineOutput,
    KvEventData,
    PreprocessedRequest,
    SamplingOptions,
    StopConditions,
)

HAVE_VLLM = importlib.util.find_spec("vllm") is not None
# CI that installed vLLM on purpose must not pass by skipping.
VLLM_REQUIRED = (
    os.environ.get("CI", "").lower() in ("1", "true", "yes") and os.environ.get("DYN_TEST_VLLM") == "1"
)
BLOCK = 32  # vLLM's CPU attention wants block sizes that are multiples of 32
ENGINE_KWARGS: dict[str, Any] = dict(dtype="float32", max_model_len=512, block_size=BLOCK, enforce_eager=True)
PROMPTS = [list(range(10, 80)), [7, 100, 2000, 31, 5, 5, 900, 12] * 5, [42] * 33]
MAX_TOKENS = 12


def require_vllm() -> None:
    if HAVE_VLLM:
        return
    message = "vllm is not importable here: run scripts/install_vllm.sh and pytest from that venv"
    if VLLM_REQUIRED:
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def request(token_ids: list[int], request_id: str, **stop: Any) -> PreprocessedRequest:
    stop.setdefault("max_tokens", MAX_TOKENS)
    sampling = stop.pop("sampling", SamplingOptions())
    return PreprocessedRequest(
        request_id=request_id, model="tiny", token_ids=token_ids, sampling=sampling, stop=StopConditions(**stop)
    )


# ------------------------------------------------------------------------- shared fixtures


@pytest.fixture(scope="session")
def vllm_env() -> Iterator[dict[str, str]]:
    """Environment for vLLM processes: 1 GiB of CPU KV cache keeps two workers small."""
    require_vllm()
    saved = os.environ.get("VLLM_CPU_KVCACHE_SPACE")
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = saved or "1"
    yield dict(os.environ)
    if saved is None:
        os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)


@pytest.fixture(scope="session")
def vllm_model(vllm_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.integration.vllm_model import build_vllm_test_model

    return build_vllm_test_model(tmp_path_factory.mktemp("vllm-model"))


REFERENCE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from vllm import LLM, SamplingParams

    if __name__ == "__main__":  # vLLM spawns its engine core
        model, prompts, max_tokens, kwargs = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4])
        llm = LLM(model=model, **kwargs)
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, detokenize=False)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        print("RESULT " + json.dumps([list(o.outputs[0].token_ids) for o in outs]), flush=True)
    """
)


@pytest.fixture(scope="session")
def reference_proc(vllm_model: Path, vllm_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[subprocess.Popen[str]]:
    """vLLM's own LLM.generate in its own process, started early so it loads while our engine
    does; the test that needs its answer waits for it."""
    script = tmp_path_factory.mktemp("vllm-ref") / "reference.py"
    script.write_text(REFERENCE_SCRIPT)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(vllm_model), json.dumps(PROMPTS), str(MAX_TOKENS), json.dumps(ENGINE_KWARGS)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=vllm_env,
    )
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


class EngineUnderTest:
    def __init__(self, engine: Any, events: list[KvEventData]) -> None:
        self.engine = engine
        self.events = events

    def stored_hashes(self) -> set[int]:
        return {h for e in self.events if isinstance(e, BlockStored) for h in e.block_hashes}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def vllm_engine(vllm_model: Path, reference_proc: subprocess.Popen[str]) -> AsyncIterator[EngineUnderTest]:
    from workers.vllm.args import VllmConfig
    from workers.vllm.engine import VllmEngine

    events: list[KvEventData] = []
    engine = VllmEngine(VllmConfig.for_model(str(vllm_model), **ENGINE_KWARGS))
    await engine.start(events.append)
    try:
        yield EngineUnderTest(engine, events)
    finally:
        await engine.stop()


async def collect(engine: Any, req: PreprocessedRequest) -> list[EngineOutput]:
    return [out async for out in engine.generate(req)]


async def wait_for(condition: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(0.02)


def tokens(outputs: list[EngineOutput]) -> list[int]:
    return [t for out in outputs for t in out.token_ids]


# ----------------------------------------------------------------------------- the engine

@pytest.mark.vllm
@pytest.mark.asyncio(loop_scope="module")
async def test_engine_info_comes_from_vllm_config(vllm_engine: EngineUnderTest) -> None:
    info = vllm_engine.engine.info
    assert info.kv_block_size == BLOCK
    assert info.context_length == 512
    assert info.kv_total_blocks > 0
    assert info.eos_token_ids == (3,)


@pytest.mark.vllm
@pytest.mark.asyncio(loop_scope="module")
async def test_greedy_output_equals_vllm_llm_generate(
    vllm_engine: EngineUnderTest, reference_proc: subprocess.Popen[str]
) -> None:
    ours = [
        tokens(await collect(vllm_engine.engine, request(p, f"greedy-{i}", ignore_eos=False)))
        for i, p in enumerate(PROMPTS)
    ]
    out, _ = await asyncio.to_thread(reference_proc.communicate, timeout=240)
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    assert lines, f"vLLM reference run failed:\n{out[-3000:]}"
    assert ours == json.loads(lines[-1][len("RESULT "):])


@pytest.mark.vllm
@pytest.mark.asyncio(loop_scope="module")
async def test_stream_shape_finish_reasons_and_cached_tokens(vllm_engine: EngineUnderTest) -> None:
    engine = vllm_engine.engine
    prompt = list(range(300, 300 + 3 * BLOCK + 5))
    first = await collect(engine, request(prompt, "shape-1", ignore_eos=True))
    assert [len(o.token_ids) for o in first] == [1] * MAX_TOKENS  # one delta per step
    assert [o.finish_reason for o in first] == [None] * (MAX_TOKENS - 1) + ["length"]
    assert first[0].cached_tokens == 0
    again = await collect(engine, request(prompt, "shape-2", ignore_eos=True))
    assert again[0].cached_tokens == 3 * BLOCK  # the prefix cache's full blocks
    assert tokens(again) == tokens(first)

    # A stop token ends the stream with "stop" and is the last token; min_tokens defers it.
    greedy = tokens(first)
    stop_at = greedy[3]
    stopped = await collect(engine, request(prompt, "shape-3", stop_token_ids=[stop_at], ignore_eos=True))
    assert tokens(stopped) == greedy[: greedy.index(stop_at) + 1]
    assert stopped[-1].finish_reason == "stop"
    deferred = await collect(engine, request(prompt, "shape-4", stop_token_ids=[stop_at], min_tokens=MAX_TOKENS, ignore_eos=True))
    assert len(tokens(deferred)) == MAX_TOKENS

    # Seeded sampling is reproducible; logprobs come one per token when asked for.
    sampled = SamplingOptions(temperature=1.0, top_p=0.9, top_k=50, seed=7, logprobs=True)
    a = await collect(engine, request(prompt, "shape-5", sampling=sampled))
    b = await collect(engine, request(prompt, "shape-6", sampling=sampled))
    assert tokens(a) == tokens(b)
    assert all(o.logprobs is not None and len(o.logprobs) == len(o.token_ids) for o in a)
    assert all(lp <= 0.0 for o in a for lp in o.logprobs or ())


@pytest.mark.vllm
@pytest.mark.asyncio(loop_scope="module")
async def test_kv_events_carry_our_block_hashes(vllm_engine: EngineUnderTest) -> None:
    engine = vllm_engine.engine
    prompt = [(i * 37) % 8000 + 5 for i in range(4 * BLOCK + 7)]
    ours = block_hashes(prompt, BLOCK)
    assert len(ours) == 4
    await collect(engine, request(prompt, "kv-1", max_tokens=2))
    await wait_for(lambda: set(ours) <= vllm_engine.stored_hashes(), 10, "BlockStored with our hashes")
    # Chains arrive with their parents translated too: each stored run links to the one before.
    for event in vllm_engine.events:
        if isinstance(event, BlockStored) and event.block_hashes[0] in ours[1:]:
            assert event.parent_hash == ours[ours.index(event.block_hashes[0]) - 1]
    snapshot = {h for e in engine.kv_snapshot() if isinstance(e, BlockStored) for h in e.block_hashes}
    assert set(ours) <= snapshot


@pytest.mark.vllm
@pytest.mark.asyncio(loop_scope="module")
async def test_closing_or_cancelling_the_stream_aborts_the_request(vllm_engine: EngineUnderTest) -> None:
    engine = vllm_engine.engine
    llm = engine._llm
    long = dict(max_tokens=400, ignore_eos=True, stop_token_ids=[])

    stream = engine.generate(request(list(range(500, 540)), "cancel-1", **long))
    got = [await stream.__anext__() for _ in range(3)]
    assert all(o.finish_reason is None for o in got)
    assert llm.get_num_unfinished_requests() == 1
    await stream.aclose()
    await wait_for(lambda: llm.get_num_unfinished_requests() == 0, 10, "vLLM to drop the closed request")

    first_token = asyncio.Event()

    async def consume() -> None:
        async for _ in engine.generate(request(list(range(600, 640)), "cancel-2", **long)):
            first_token.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(first_token.wait(), 30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_for(lambda: llm.get_num_unfinished_requests() == 0, 10, "vLLM to drop the cancelled request")
    load = engine.load_metrics()
    assert (load.active_requests, load.waiting_requests, load.waiting_prefill_tokens) == (0, 0, 0)


@pytest.mark.vllm
@pytest.mark.asyncio(loop_scope="module")
async def test_invalid_requests_are_invalid_request_errors(vllm_engine: EngineUnderTest) -> None:
    from dynamo import errors

    with pytest.raises(errors.InvalidRequest):
        await collect(vllm_engine.engine, request([1, 2, 3], "bad-1", max_tokens=4, sampling=SamplingOptions(top_p=7.0)))
    with pytest.raises(errors.InvalidRequest):
        await collect(vllm_engine.engine, request([1, 99999], "bad-2", max_tokens=4))


# ------------------------------------------------------------------- end to end, over HTTP

MODEL = "tiny"
LONG_PROMPT = " ".join(["The quick brown fox jumps over the lazy dog near the river bank."] * 12)


@pytest.fixture(scope="module")
def serve_stack(vllm_model: Path, vllm_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`python -m dynamo.serve --engine vllm --num-workers 2 --router-mode kv`: frontend, KV
    router and two vLLM workers (two engine cores) on the embedded runtime."""
    from tests.e2e.procs import Stack, base_env, free_port, http_ok, wait_until

    tmp = tmp_path_factory.mktemp("vllm-e2e")
    stack = Stack(tmp, base_env(VLLM_CPU_KVCACHE_SPACE=vllm_env["VLLM_CPU_KVCACHE_SPACE"]))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = stack.start(
        "serve", "dynamo.serve", "--engine", "vllm", "--num-workers", "2", "--router-mode", "kv",
        "--model", str(vllm_model), "--served-model-name", MODEL, "--http-port", str(port),
        "--dtype", "float32", "--max-model-len", "512", "--block-size", str(BLOCK), "--enforce-eager",
    )  # fmt: skip
    try:
        wait_until(lambda: http_ok(f"{base}/ready") or proc.popen.poll() is not None, 300, "frontend ready")
        # /ready needs one worker; the second engine is still loading then, and a request
        # served meanwhile races its registration. Wait for both workers' "serves" line.
        wait_until(
            lambda: proc.log_path.read_text(errors="replace").count(f" serves {MODEL} ") >= 2 or proc.popen.poll() is not None,
            300,
            "both workers up",
        )
        if proc.popen.poll() is not None:
            raise TimeoutError("dynamo.serve exited")
    except TimeoutError:
        log = proc.log()
        stack.stop_all()
        raise AssertionError(f"vLLM stack did not come up:\n{log}") from None
    yield base
    stack.stop_all()


@pytest.mark.vllm
@pytest.mark.e2e
def test_e2e_streaming_chat_through_two_vllm_workers(serve_stack: str) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{serve_stack}/v1", api_key="unused", max_retries=0, timeout=60)
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hello there"}], max_tokens=8, stream=True, temperature=0
    )
    chunks = list(stream)
    assert chunks and chunks[-1].choices[0].finish_reason in ("stop", "length")


@pytest.mark.vllm
@pytest.mark.e2e
def test_e2e_repeated_prompt_goes_to_the_worker_that_cached_it(serve_stack: str) -> None:
    import httpx
    import openai

    def router_metric(name: str) -> float:
        metrics = httpx.get(f"{serve_stack}/metrics", timeout=5).text
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in metrics.splitlines()
            if line.startswith(name) and not line.startswith("#") and "_created" not in line
        )

    client = openai.OpenAI(base_url=f"{serve_stack}/v1", api_key="unused", max_retries=0, timeout=60)
    indexed_before = router_metric("dynamo_router_index_blocks")
    first = client.completions.create(model=MODEL, prompt=LONG_PROMPT, max_tokens=2, temperature=0)
    prompt_tokens = first.usage.prompt_tokens
    assert prompt_tokens >= 2 * BLOCK
    full_blocks = prompt_tokens // BLOCK * BLOCK
    # KV events travel engine -> worker -> event plane -> router after the response: on a busy
    # machine the repeat could be routed before they land. Wait (bounded) until the router's
    # index holds the prompt's blocks, as a client can only expect routing to follow a cache
    # the router has heard of. (Counting events is not enough: startup clears count too.)
    from tests.e2e.procs import wait_until

    wait_until(
        lambda: router_metric("dynamo_router_index_blocks") - indexed_before >= full_blocks // BLOCK,
        60,
        "the router indexing the first request's blocks",
    )
    for _ in range(3):
        again = client.completions.create(model=MODEL, prompt=LONG_PROMPT, max_tokens=2, temperature=0)
        details = again.usage.prompt_tokens_details
        # Only the worker that served the first request holds these blocks: with two workers and
        # no KV events, each repeat would land elsewhere half of the time.
        assert details is not None and details.cached_tokens >= full_blocks - BLOCK, again.usage
        assert again.choices[0].text == first.choices[0].text
    assert router_metric("dynamo_router_kv_events_total") > 0, "the router saw no KV events"


# ------------------------------------------------- the re-hashing translator (no vLLM needed)


def _translator() -> tuple[Any, list[KvEventData]]:
    from workers.vllm.kv_events import KvEventTranslator

    out: list[KvEventData] = []
    return KvEventTranslator(out.append, block_size_tokens=2), out


def test_translator_rehashes_chains_and_parents() -> None:
    from workers.vllm.kv_events import VllmBlockStored

    t, out = _translator()
    t.apply(VllmBlockStored([b"a", b"b"], None, [1, 2, 3, 4], 2))
    t.apply(VllmBlockStored([b"c"], b"b", [5, 6], 2))
    h = block_hashes([1, 2, 3, 4, 5, 6], 2)
    assert out == [BlockStored([h[0], h[1]], None), BlockStored([h[2]], h[1])]
    assert t.snapshot() == [BlockStored(h, None)]
    # A block whose parent we never saw cannot be re-hashed: dropped, counted.
    t.apply(VllmBlockStored([b"x"], b"unknown", [7, 8], 2))
    assert len(out) == 2 and t.dropped_events == 1


def test_translator_removes_only_the_last_copy() -> None:
    from workers.vllm.kv_events import VllmAllBlocksCleared, VllmBlockRemoved, VllmBlockStored

    t, out = _translator()
    t.apply(VllmBlockStored([1], None, [1, 2], 2))
    t.apply(VllmBlockStored([1], None, [1, 2], 2))  # vLLM cached a second copy
    t.apply(VllmBlockStored([99], None, [1, 2], 2))  # another vLLM hash (e.g. a LoRA), same tokens
    ours = block_hash(None, [1, 2])
    out.clear()
    t.apply(VllmBlockRemoved([1]))
    t.apply(VllmBlockRemoved([1]))
    assert out == []
    t.apply(VllmBlockRemoved([99]))
    assert out == [BlockRemoved([ours])]
    t.apply(VllmBlockRemoved([12345]))  # unknown: ignored
    t.apply(VllmAllBlocksCleared())
    assert out[-1] == AllBlocksCleared() and t.snapshot() == []


def test_translator_decodes_vllm_wire_batches() -> None:
    import msgspec

    from workers.vllm.kv_events import BATCH_DECODER, VllmBlockRemoved, VllmBlockStored

    # What vLLM 0.32's publisher writes: an array-like batch of maps tagged by class name,
    # with fields this worker does not use.
    stored = {"type": "BlockStored", "block_hashes": [5], "parent_block_hash": None, "token_ids": [1, 2],
              "block_size": 2, "lora_id": None, "medium": "GPU", "lora_name": None, "group_idx": 0}  # fmt: skip
    removed = {"type": "BlockRemoved", "block_hashes": [5], "medium": "CPU"}
    batch = BATCH_DECODER.decode(msgspec.msgpack.encode([1.5, [stored, removed], 0]))
    assert isinstance(batch.events[0], VllmBlockStored) and batch.events[0].medium == "GPU"
    assert isinstance(batch.events[1], VllmBlockRemoved) and batch.events[1].medium == "CPU"
