"""Load generator for any OpenAI-compatible endpoint: streaming chat or text completions at a
fixed concurrency or a Poisson request rate, optionally from several processes; reports req/s,
output tokens/s, TTFT and inter-chunk latency percentiles, errors, and its own CPU use.

    python benchmarks/loadgen.py --url http://127.0.0.1:8000 --concurrency 64 \
        --input-tokens 100 --output-tokens 32 --duration-s 20 [--processes 2] [--json-out F]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing as mp
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlsplit

from sse_client import HttpxConnection, RawConnection, RequestResult, one_request

WORDS = (
    "the of and to in is was for that on as with by he at from his it an were are which this be "
    "or has had not first one their its new after but who they have her she two been other when "
    "there all during into school time may years more most only over city some world would where "
    "later up such used many can state about national out known university united then made also "
    "american three between through year under being well both team family government life work "
    "people music war number part several while each film series because south north history "
    "second house early since area called before large game against until public season west "
    "following same best including played group four high member like band company based did "
    "system small left local population water these home around both week light river market "
    "church village power field period history paper model engine token stream cache block route "
    "server client window signal vector matrix memory garden mountain island harbor valley coast"
).split()


@dataclass
class LoadConfig:
    url: str = "http://127.0.0.1:8000"
    model: str | None = None  # None: the first model /v1/models lists
    endpoint: str = "chat"  # chat | completions
    concurrency: int = 1
    request_rate: float | None = None  # requests/s with Poisson arrivals; None: closed loop
    max_concurrency: int | None = None  # cap on in-flight requests in rate mode
    input_tokens: int = 100
    output_tokens: int = 32
    tokenizer: str | None = None  # a dir with tokenizer.json: exact prompt lengths
    tokens_per_word: float = 1.3  # without a tokenizer, words = input_tokens / this
    num_requests: int | None = None
    duration_s: float | None = None
    warmup_requests: int | None = None  # None: one per connection
    processes: int = 1
    client: str = "raw"  # raw (asyncio streams) | httpx
    quickack: bool = True  # raw client: ACK every chunk at once (see RawConnection.post_stream)
    use_uvloop: bool = True
    seed: int = 0
    timeout_s: float = 120.0
    prompt_pool: int = 512  # distinct prompts, cycled; each is unique so no prefix is shared


@dataclass
class ProcessResult:
    results: list[RequestResult]
    measure_start_s: float
    measure_end_s: float
    cpu_s: float  # this process's CPU seconds over its measurement


# ---------------------------------------------------------------- prompts


def build_prompts(config: LoadConfig, count: int) -> list[str]:
    rng = random.Random(config.seed)
    tokenizer = None
    if config.tokenizer:
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(Path(config.tokenizer) / "tokenizer.json"))
    prompts = []
    for i in range(count):
        # A distinct leading number keeps prompts from sharing a prefix (no accidental KV reuse).
        if tokenizer is None:
            n_words = max(1, round(config.input_tokens / config.tokens_per_word))
            prompts.append(f"{i} " + " ".join(rng.choice(WORDS) for _ in range(n_words - 1)))
            continue
        words = [str(i)]
        while len(tokenizer.encode(" ".join(words), add_special_tokens=False).ids) < config.input_tokens:
            words.extend(rng.choice(WORDS) for _ in range(8))
        ids = tokenizer.encode(" ".join(words), add_special_tokens=False).ids[: config.input_tokens]
        prompts.append(tokenizer.decode(ids))
    return prompts


def request_body(config: LoadConfig, model: str, prompt: str) -> bytes:
    body: dict[str, object] = {
        "model": model,
        "max_tokens": config.output_tokens,
        "ignore_eos": True,  # every request yields exactly output_tokens tokens
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if config.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    return json.dumps(body).encode()


# ---------------------------------------------------------------- one process's load


async def resolve_model(config: LoadConfig) -> str:
    if config.model:
        return config.model
    import httpx

    async with httpx.AsyncClient(base_url=config.url, timeout=10) as client:
        resp = await client.get("/v1/models")
        resp.raise_for_status()
        return resp.json()["data"][0]["id"]


async def _run_process_async(
    config: LoadConfig, model: str, prompts: list[str], start_gate: Callable[[], None]
) -> ProcessResult:
    parts = urlsplit(config.url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    path = "/v1/chat/completions" if config.endpoint == "chat" else "/v1/completions"
    chat = config.endpoint == "chat"
    bodies = [request_body(config, model, p) for p in prompts]
    n_conn = config.concurrency if config.request_rate is None else (config.max_concurrency or config.concurrency)

    httpx_client = None
    if config.client == "httpx":
        import httpx

        # Open loop without a cap: as many connections as requests in flight, like the raw client.
        pool = None if config.request_rate is not None and not config.max_concurrency else max(n_conn, 1)
        limits = httpx.Limits(max_connections=pool, max_keepalive_connections=pool)
        httpx_client = httpx.AsyncClient(base_url=config.url, limits=limits, timeout=config.timeout_s)

    def new_conn() -> RawConnection | HttpxConnection:
        return HttpxConnection(httpx_client) if httpx_client is not None else RawConnection(host, port, config.quickack)

    idle: list[RawConnection | HttpxConnection] = [new_conn() for _ in range(max(n_conn, 1))]
    counter = iter(range(1 << 62))

    async def call(conn: RawConnection | HttpxConnection) -> RequestResult:
        body = bodies[next(counter) % len(bodies)]
        return await one_request(conn, path, body, chat, config.timeout_s)

    async def closed_loop(n_requests: int | None, deadline: float | None, workers: int) -> list[RequestResult]:
        results: list[RequestResult] = []
        issued = 0

        async def worker(conn: RawConnection | HttpxConnection) -> None:
            nonlocal issued
            while (n_requests is None or issued < n_requests) and (deadline is None or time.monotonic() < deadline):
                issued += 1
                results.append(await call(conn))

        await asyncio.gather(*(worker(idle[i]) for i in range(workers)))
        return results

    async def open_loop(n_requests: int | None, deadline: float | None) -> list[RequestResult]:
        rng = random.Random(config.seed + os.getpid())
        results: list[RequestResult] = []
        tasks: set[asyncio.Task[None]] = set()
        limit = asyncio.Semaphore(config.max_concurrency) if config.max_concurrency else None
        assert config.request_rate
        next_t = time.monotonic()
        issued = 0

        async def fire() -> None:
            conn = idle.pop() if idle else new_conn()
            try:
                results.append(await call(conn))
            finally:
                idle.append(conn)
                if limit is not None:
                    limit.release()

        while (n_requests is None or issued < n_requests) and (deadline is None or time.monotonic() < deadline):
            next_t += rng.expovariate(config.request_rate)
            delay = next_t - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if limit is not None:
                await limit.acquire()
            issued += 1
            task = asyncio.create_task(fire())
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.gather(*tasks)
        return results

    try:
        warmup = config.warmup_requests if config.warmup_requests is not None else n_conn
        if warmup > 0:
            await closed_loop(warmup, None, min(warmup, len(idle)))
        await asyncio.get_running_loop().run_in_executor(None, start_gate)
        cpu0 = time.process_time()
        t_start = time.monotonic()
        deadline = t_start + config.duration_s if config.duration_s else None
        if config.request_rate is None:
            results = await closed_loop(config.num_requests, deadline, len(idle))
        else:
            results = await open_loop(config.num_requests, deadline)
        t_end = time.monotonic()
        cpu_s = time.process_time() - cpu0
    finally:
        for conn in idle:
            await conn.close()
        if httpx_client is not None:
            await httpx_client.aclose()
    return ProcessResult(results, t_start, t_end, cpu_s)


def _run_process(config: LoadConfig, model: str, prompts: list[str], start_gate: Callable[[], None]) -> ProcessResult:
    if config.use_uvloop:
        try:
            import uvloop

            return uvloop.run(_run_process_async(config, model, prompts, start_gate))
        except ImportError:
            pass
    return asyncio.run(_run_process_async(config, model, prompts, start_gate))


def _child(config: LoadConfig, model: str, prompts: list[str], barrier: object, queue: object) -> None:
    try:
        result = _run_process(config, model, prompts, barrier.wait)  # type: ignore[attr-defined]
    except BaseException as exc:
        barrier.abort()  # type: ignore[attr-defined]  # the parent must not wait forever
        queue.put(f"{type(exc).__name__}: {exc}")  # type: ignore[attr-defined]
        raise
    queue.put(result)  # type: ignore[attr-defined]


def _split(total: int | None, n: int, i: int) -> int | None:
    if total is None:
        return None
    return total // n + (1 if i < total % n else 0)


# ---------------------------------------------------------------- the whole run


def run_load(
    config: LoadConfig,
    on_measure_start: Callable[[], None] | None = None,
    on_measure_end: Callable[[], None] | None = None,
) -> dict[str, object]:
    """Runs warm-up then the measured load; the hooks bracket the measurement (e.g. to sample
    a server's CPU over exactly that window). Returns the summary as a JSON-able dict."""
    model = asyncio.run(resolve_model(config))
    prompts = build_prompts(config, config.prompt_pool)
    started = time.monotonic()

    if config.processes <= 1:

        def gate() -> None:
            if on_measure_start:
                on_measure_start()

        parts = [_run_process(config, model, prompts, gate)]
    else:
        n = config.processes
        ctx = mp.get_context("fork")
        barrier = ctx.Barrier(n + 1)
        queue = ctx.Queue()
        children = []
        for i in range(n):
            sub = LoadConfig(**asdict(config))
            sub.concurrency = max(1, _split(config.concurrency, n, i) or 1)
            sub.max_concurrency = _split(config.max_concurrency, n, i)
            sub.num_requests = _split(config.num_requests, n, i)
            sub.warmup_requests = _split(config.warmup_requests, n, i)
            sub.request_rate = config.request_rate / n if config.request_rate else None
            sub.seed = config.seed + 1000 * i
            proc = ctx.Process(target=_child, args=(sub, model, prompts[i::n] or prompts, barrier, queue))
            proc.start()
            children.append(proc)
        barrier.wait()  # every child has warmed up
        if on_measure_start:
            on_measure_start()
        parts = []
        for _ in range(n):
            got = queue.get()
            if isinstance(got, str):
                raise RuntimeError(f"load process failed: {got}")
            parts.append(got)
        for proc in children:
            proc.join()
    if on_measure_end:
        on_measure_end()
    summary = summarize(config, model, parts)
    summary["elapsed_incl_warmup_s"] = round(time.monotonic() - started, 3)
    return summary


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not sorted_values:
        return math.nan
    pos = (len(sorted_values) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summarize(config: LoadConfig, model: str, parts: list[ProcessResult]) -> dict[str, object]:
    results = [r for p in parts for r in p.results]
    ok = [r for r in results if r.ok]
    window_s = max(p.measure_end_s for p in parts) - min(p.measure_start_s for p in parts)
    ttft = sorted(r.ttft_s for r in ok)
    itl = sorted(g for r in ok for g in r.itl_s)
    e2e = sorted(r.end_s - r.start_s for r in ok)
    out_tokens = sum(r.output_tokens for r in ok)
    errors: dict[str, int] = {}
    for r in results:
        if not r.ok:
            errors[r.error] = errors.get(r.error, 0) + 1
    ms = 1000.0
    return {
        "url": config.url,
        "model": model,
        "endpoint": config.endpoint,
        "client": config.client,
        "concurrency": config.concurrency if config.request_rate is None else None,
        "request_rate": config.request_rate,
        "processes": config.processes,
        "input_tokens": config.input_tokens,
        "output_tokens": config.output_tokens,
        "requests_ok": len(ok),
        "requests_failed": len(results) - len(ok),
        "errors": dict(sorted(errors.items(), key=lambda kv: -kv[1])[:10]),
        "window_s": round(window_s, 3),
        "req_per_s": round(len(ok) / window_s, 2) if window_s > 0 else 0.0,
        "output_tok_per_s": round(out_tokens / window_s, 1) if window_s > 0 else 0.0,
        "mean_prompt_tokens": round(sum(r.prompt_tokens for r in ok) / len(ok), 1) if ok else 0.0,
        "mean_output_tokens": round(out_tokens / len(ok), 2) if ok else 0.0,
        "requests_wrong_token_count": sum(1 for r in ok if r.output_tokens != config.output_tokens),
        "empty_chunks": sum(r.empty_chunks for r in ok),
        "content_chunks": sum(r.content_chunks for r in ok),
        "ttft_ms": {q: round(percentile(ttft, p) * ms, 3) for q, p in (("p50", 50), ("p90", 90), ("p99", 99))},
        "itl_ms": {q: round(percentile(itl, p) * ms, 3) for q, p in (("p50", 50), ("p90", 90), ("p99", 99))},
        "e2e_ms": {q: round(percentile(e2e, p) * ms, 3) for q, p in (("p50", 50), ("p99", 99))},
        "loadgen_cpu_cores": round(sum(p.cpu_s for p in parts) / window_s, 3) if window_s > 0 else 0.0,
    }


def format_summary(s: dict[str, object]) -> str:
    ttft, itl = s["ttft_ms"], s["itl_ms"]
    assert isinstance(ttft, dict) and isinstance(itl, dict)
    load = f"c={s['concurrency']}" if s["request_rate"] is None else f"rate={s['request_rate']}/s"
    return (
        f"{load:>8} ok={s['requests_ok']:<6} err={s['requests_failed']:<4} "
        f"{s['req_per_s']:>8.1f} req/s {s['output_tok_per_s']:>9.1f} tok/s  "
        f"TTFT p50 {ttft['p50']:.2f} p99 {ttft['p99']:.2f} ms  ITL p50 {itl['p50']:.2f} p99 {itl['p99']:.2f} ms  "
        f"loadgen {s['loadgen_cpu_cores']:.2f} cores"
    )


def add_load_args(parser: argparse.ArgumentParser) -> None:
    d = LoadConfig()
    parser.add_argument("--url", default=d.url, help="base URL of the OpenAI-compatible server")
    parser.add_argument("--model", default=None, help="model name (default: the first in /v1/models)")
    parser.add_argument("--endpoint", choices=["chat", "completions"], default=d.endpoint)
    parser.add_argument("--input-tokens", type=int, default=d.input_tokens)
    parser.add_argument("--output-tokens", type=int, default=d.output_tokens)
    parser.add_argument("--tokenizer", default=None, help="dir with tokenizer.json for exact prompt lengths")
    parser.add_argument("--tokens-per-word", type=float, default=d.tokens_per_word)
    parser.add_argument("--warmup-requests", type=int, default=None, help="default: one per connection")
    parser.add_argument("--processes", type=int, default=d.processes, help="load processes sharing the load")
    parser.add_argument("--client", choices=["raw", "httpx"], default=d.client)
    parser.add_argument("--no-uvloop", action="store_true")
    parser.add_argument("--no-quickack", action="store_true", help="raw client: leave Linux's delayed ACKs on")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--timeout-s", type=float, default=d.timeout_s)


def config_from_args(args: argparse.Namespace, **overrides: object) -> LoadConfig:
    config = LoadConfig(
        url=args.url,
        model=args.model,
        endpoint=args.endpoint,
        input_tokens=args.input_tokens,
        output_tokens=args.output_tokens,
        tokenizer=args.tokenizer,
        tokens_per_word=args.tokens_per_word,
        warmup_requests=args.warmup_requests,
        processes=args.processes,
        client=args.client,
        use_uvloop=not args.no_uvloop,
        quickack=not args.no_quickack,
        seed=args.seed,
        timeout_s=args.timeout_s,
    )
    for k, v in overrides.items():
        setattr(config, k, v)
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_load_args(parser)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--concurrency", type=int, default=1, help="closed loop with this many in flight")
    mode.add_argument("--request-rate", type=float, default=None, help="Poisson arrivals at this rate (req/s)")
    parser.add_argument("--max-concurrency", type=int, default=None, help="in-flight cap in rate mode")
    parser.add_argument("--num-requests", type=int, default=None)
    parser.add_argument("--duration-s", type=float, default=None)
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args()
    if args.num_requests is None and args.duration_s is None:
        parser.error("give --num-requests and/or --duration-s")
    config = config_from_args(
        args,
        concurrency=args.concurrency,
        request_rate=args.request_rate,
        max_concurrency=args.max_concurrency,
        num_requests=args.num_requests,
        duration_s=args.duration_s,
    )
    summary = run_load(config)
    print(format_summary(summary))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(summary, indent=2) + "\n")
    else:
        json.dump(summary, sys.stdout, indent=2)
        print()
    sys.exit(1 if summary["requests_ok"] == 0 else 0)


if __name__ == "__main__":
    main()
