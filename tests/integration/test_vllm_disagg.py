"""Disaggregated vLLM on vLLM for CPUs (`pytest -m vllm`): one prefill and one decode worker
process (`--engine vllm --role prefill|decode`, real NATS and etcd) and a frontend. The prompt's
KV moves through our transfer connector inside vLLM (workers/vllm/connector/transfer.py) over
the host backend. Greedy output equals an aggregated vLLM worker's; the decode worker computes
no prefill for a transferred prompt; a prefill worker killed mid-transfer still yields a
complete answer (the decode worker recomputes the prompt).

The aggregated reference is the prefill worker itself: every worker also serves `generate` on
its component, and a prefill worker's `generate` runs the whole request in its own vLLM."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import signal
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from dynamo.wire import OUTPUT_CODEC, PreprocessedRequest, SamplingOptions, StopConditions, encode

# Two vLLM engines start at once: on a loaded 2-core machine that alone can take minutes.
pytestmark = [pytest.mark.integration, pytest.mark.vllm, pytest.mark.timeout(900)]

HAVE_VLLM = importlib.util.find_spec("vllm") is not None
BLOCK = 32
MODEL = "tiny"
MIN_REMOTE = 64  # --disagg-min-prefill-tokens: prompts below this are prefilled by the decode worker
MAX_TOKENS = 10
# Long enough to go remote, several blocks plus a partial one.
PROMPTS = [list(range(100, 100 + 150)), [7, 100, 2000, 31, 5, 5, 900, 12] * 12, [4242] * 97]
KILL_PROMPT = " ".join(["Disaggregated prefill has to survive a prefill worker that dies."] * 8)


def require_vllm() -> None:
    if HAVE_VLLM:
        return
    message = "vllm is not importable here: run scripts/install_vllm.sh and pytest from that venv"
    if os.environ.get("DYN_TEST_VLLM") == "1":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@dataclass
class DisaggStack:
    stack: object  # tests.e2e.procs.Stack
    base: str  # the frontend
    prefill: object  # Proc
    decode: object  # Proc
    decode_metrics: str
    env: dict[str, str]
    stall_file: Path


def _metric(url: str, name: str, **labels: str) -> float:
    from tests.e2e.procs import metric_samples

    samples = metric_samples(url, name) or {}
    want = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(v for key, v in samples.items() if all(w in key for w in want))


@pytest.fixture(scope="module")
def disagg(nats_server: str, etcd_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DisaggStack]:
    require_vllm()
    from tests.e2e.procs import Stack, base_env, free_port, http_ok, wait_until
    from tests.integration.vllm_model import build_vllm_test_model

    tmp = tmp_path_factory.mktemp("vllm-disagg")
    model = build_vllm_test_model(tmp / "model")
    stall_file = tmp / "stall"
    env = base_env(
        NATS_SERVER=nats_server,
        ETCD_ENDPOINTS=etcd_server,
        DYN_NAMESPACE=f"vd{free_port()}",
        VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE") or "1",
        DYN_VLLM_TRANSFER_TEST_STALL_FILE=str(stall_file),
        # A long lease: no test here waits for one to expire (a killed prefill worker's pull
        # fails on its connection), and with two vLLM engines and CI beside them on two
        # cores a 2 s lease expired under the decode worker mid-request.
        DYN_LEASE_TTL_S="60",
    )
    stack = Stack(tmp, env)
    port, metrics_port = free_port(), free_port()
    base = f"http://127.0.0.1:{port}"
    vllm_flags = ("--engine", "vllm", "--model", str(model), "--served-model-name", MODEL, "--dtype", "float32",
                  "--max-model-len", "512", "--block-size", str(BLOCK), "--enforce-eager")
    # Both engines load at once (each takes 20-40 s here).
    prefill = stack.start("prefill", "dynamo.worker", *vllm_flags, "--role", "prefill")
    decode = stack.start(
        "decode", "dynamo.worker", *vllm_flags, "--role", "decode",
        "--disagg-min-prefill-tokens", str(MIN_REMOTE), "--disagg-prefill-timeout-s", "120",
        "--system-port", str(metrics_port),
    )  # fmt: skip
    stack.start("frontend", "dynamo.frontend", "--http-port", str(port), "--router-mode", "kv")
    procs = (prefill, decode)
    try:
        wait_until(lambda: http_ok(f"{base}/ready") or any(p.popen.poll() is not None for p in procs), 600,
                   "frontend ready with the decode worker")
        wait_until(lambda: f" serves {MODEL} " in prefill.log_path.read_text(errors="replace")
                   or prefill.popen.poll() is not None, 600, "prefill worker up")
        if any(p.popen.poll() is not None for p in procs):
            raise TimeoutError("a worker exited")
    except TimeoutError:
        logs = "\n".join(f"--- {p.name}\n{p.log()}" for p in stack.procs)
        stack.stop_all()
        raise AssertionError(f"disaggregated vLLM stack did not come up:\n{logs}") from None
    yield DisaggStack(stack, base, prefill, decode, f"http://127.0.0.1:{metrics_port}/metrics", env, stall_file)
    stack.stop_all()


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def _kill_tree(pid: int) -> None:
    """SIGKILL a process this test started and every descendant of it."""
    pids, i = [pid], 0
    while i < len(pids):
        pids.extend(_children(pids[i]))
        i += 1
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _request(tokens: list[int]) -> PreprocessedRequest:
    return PreprocessedRequest(
        request_id=uuid.uuid4().hex, model=MODEL, token_ids=tokens, sampling=SamplingOptions(temperature=0.0),
        stop=StopConditions(max_tokens=MAX_TOKENS, ignore_eos=True),
    )


async def _generate(env: dict[str, str], component: str, requests: list[PreprocessedRequest]) -> list[tuple[list[int], int]]:
    """(tokens, cached_tokens) of each request, served by `component`'s `generate` endpoint
    (what the frontend calls on a decode worker)."""
    from dynamo.config import RuntimeConfig
    from dynamo.runtime import Runtime

    config = RuntimeConfig(
        backend="distributed", nats_server=env["NATS_SERVER"], etcd_endpoints=(env["ETCD_ENDPOINTS"],),
        namespace=env["DYN_NAMESPACE"], request_plane_host="127.0.0.1",
    )
    out = []
    async with await Runtime.create(config) as runtime:
        async with await runtime.endpoint(component, "generate").client() as client:
            await client.wait_for_instances(timeout_s=60)
            for req in requests:
                stream = await client.generate(encode(req), client.instance_ids()[0], req.request_id)
                tokens: list[int] = []
                cached = -1
                async for payload in stream:
                    chunk = OUTPUT_CODEC.decode(payload)
                    if cached < 0 and chunk.cached_tokens is not None:
                        cached = chunk.cached_tokens
                    tokens.extend(chunk.token_ids)
                out.append((tokens, cached))
    return out


def _wait_remote_ready(stack: DisaggStack) -> None:
    """The decode worker prefills locally until it has seen the prefill worker in discovery:
    warm up with throwaway prompts until one goes remote (bounded)."""
    from tests.e2e.procs import wait_until

    def remote_once() -> bool:
        before = _metric(stack.decode_metrics, "dynamo_worker_prefills_total", where="remote")
        asyncio.run(_generate(stack.env, "backend", [_request([uuid.uuid4().int % 8000 + 10 for _ in range(MIN_REMOTE + 8)])]))
        return _metric(stack.decode_metrics, "dynamo_worker_prefills_total", where="remote") > before

    wait_until(remote_once, 120, "a remote prefill", interval_s=0.5)


def test_disaggregated_greedy_output_equals_aggregated_and_decode_computes_no_prefill(disagg: DisaggStack) -> None:
    _wait_remote_ready(disagg)
    # Aggregated first, on the prefill worker (its own vLLM computes everything).
    reference = asyncio.run(_generate(disagg.env, "prefill", [_request(p) for p in PROMPTS]))
    remote_before = _metric(disagg.decode_metrics, "dynamo_worker_prefills_total", where="remote")
    local_before = _metric(disagg.decode_metrics, "dynamo_worker_prefills_total", where="local")
    got = asyncio.run(_generate(disagg.env, "backend", [_request(p) for p in PROMPTS]))
    for prompt, (ref_tokens, _), (tokens, cached) in zip(PROMPTS, reference, got):
        assert len(ref_tokens) == MAX_TOKENS
        assert tokens == ref_tokens
        # vLLM on the decode worker counts the whole prompt as cached (external: it arrived from
        # the prefill worker); it recomputes only the last token, to sample from.
        assert cached >= len(prompt) - 1, (cached, len(prompt))
    assert _metric(disagg.decode_metrics, "dynamo_worker_prefills_total", where="remote") - remote_before == len(PROMPTS)
    assert _metric(disagg.decode_metrics, "dynamo_worker_prefills_total", where="local") == local_before


def test_through_the_frontend_a_long_prompt_is_prefilled_remotely(disagg: DisaggStack) -> None:
    import openai

    _wait_remote_ready(disagg)
    client = openai.OpenAI(base_url=f"{disagg.base}/v1", api_key="unused", max_retries=0, timeout=120)
    before = _metric(disagg.decode_metrics, "dynamo_worker_prefills_total", where="remote")
    prompt = " ".join(["Prefill over there, decode over here, and the same words either way."] * 6)
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0)
    assert out.choices[0].finish_reason in ("stop", "length")
    assert out.usage is not None and out.usage.prompt_tokens >= MIN_REMOTE
    details = out.usage.prompt_tokens_details
    assert details is not None and details.cached_tokens >= out.usage.prompt_tokens - 1, out.usage
    assert _metric(disagg.decode_metrics, "dynamo_worker_prefills_total", where="remote") == before + 1


def test_killing_the_prefill_worker_mid_transfer_still_answers(disagg: DisaggStack) -> None:
    """Last in this module: it kills the prefill worker."""
    import openai

    from tests.e2e.procs import wait_until

    _wait_remote_ready(disagg)
    disagg.stall_file.write_text("stall")  # the prefill worker's next pull waits (test hook)
    client = openai.OpenAI(base_url=f"{disagg.base}/v1", api_key="unused", max_retries=0, timeout=180)
    result: dict[str, object] = {}

    async def ask() -> None:
        result["out"] = await asyncio.to_thread(
            client.completions.create, model=MODEL, prompt=KILL_PROMPT, max_tokens=8, temperature=0
        )

    async def main() -> None:
        task = asyncio.create_task(ask())
        from workers.vllm.connector.transfer_core import STALL_MARK

        # The prefill worker answered and the decode worker's pull is waiting on it: kill it.
        await asyncio.to_thread(
            wait_until, lambda: STALL_MARK in disagg.prefill.log_path.read_text(errors="replace") or task.done(),
            120, "the pull to stall",
        )
        assert not task.done(), result
        # The whole prefill worker, vLLM's engine core (where the stalled pull is) included, as
        # when its machine or container dies.
        _kill_tree(disagg.prefill.popen.pid)  # type: ignore[attr-defined]
        await asyncio.wait_for(task, 180)

    asyncio.run(main())
    out = result["out"]
    assert out.choices[0].finish_reason in ("stop", "length")  # type: ignore[attr-defined]
    assert len(out.choices[0].text) > 0  # type: ignore[attr-defined]
    # The decode worker's pull failed and its vLLM recomputed the prompt (its log says so).
    from tests.e2e.procs import wait_until as wait

    wait(lambda: "the prompt is recomputed here" in disagg.decode.log_path.read_text(errors="replace"),  # type: ignore[attr-defined]
         30, "the decode worker's failed-pull warning")
