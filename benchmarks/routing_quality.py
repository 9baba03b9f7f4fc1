"""Routing quality (issue 8): 8 mocker workers (the H100 / 8B timing model) behind one frontend,
once per router mode, on two seeded traces sent at a fixed Poisson rate: TTFT, ITL, throughput
and the engines' own prefix-hit rate; NVIDIA Dynamo 1.6.1's router and mocker on the same traces.

    python benchmarks/routing_quality.py [--traces shared,multiturn]
        [--modes kv,round-robin,random,least-loaded,kv-approx] [--dynamo-modes kv,round-robin]
        [--time-scale S] [--json-out benchmarks/results/routing_quality.json]
        [--shared-groups N] [--shared-prefix-tokens N] [--num-gpu-blocks N]

The last three make the cache-pressure variant of the shared trace: more distinct system
prompts than one worker's KV pool holds (both stacks' mockers get the same pool size).

Mode `kv-affinity` is `kv` with session affinity: every request carries its conversation's id
in `x-dynamo-session-id` (docs/routing.md, "Session affinity"); its rows add the router's
affinity outcomes (hit, miss, repin, overloaded) from /metrics. `kv-affinity-rR` sets
`--router-session-overload-ratio R`; `kv-approx-affinity` is the same on `kv-approx`.

`--sglang-modes cache_aware,round_robin` adds SGLang's router (PyPI sglang-router, in
SGLANG_ROUTER_VENV, default /tmp/sgr) in front of 8 HTTP backends, each our frontend with one
mocker worker; it takes only text prompts, so those runs (and every run with `--text-prompts`)
send each prompt as the tokenizer's decoding of its ids.

Time runs slowed down: both mockers get `--speedup-ratio TIME_SCALE` (< 1 stretches every
simulated step) and requests are sent at RATE * TIME_SCALE per second of wall time; latencies
and rates are reported back in simulated (H100) time. The CPU work per request is unchanged, so
slowing time down keeps the 2-core machine's frontend and client from shaping the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from frontend_overhead import Stack, _probe_completion, free_port, wait_until  # noqa: E402
from loadgen import percentile  # noqa: E402
from proc_cpu import CpuWindow, pid_listening_on  # noqa: E402
from sse_client import RawConnection, RequestResult, one_request  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SERVED_MODEL = "tiny"
BLOCK_SIZE_TOKENS = 16  # both mockers and both routers
MAX_MODEL_LEN = 16384
# Prompt token ids are drawn from this range of the served tokenizer's 8192-token vocabulary,
# clear of its special tokens.
TOKEN_ID_RANGE = (16, 8000)
DEFAULT_GPU_BLOCKS = 24_576  # our mocker's default pool (workers/mocker/args.py), per worker
DYNAMO_VENV = Path(os.environ.get("DYN_VENV", "/tmp/dyn"))
# SGLang's router (PyPI sglang-router, a Rust binary): `python3 -m venv /tmp/sgr &&
# /tmp/sgr/bin/pip install sglang-router==0.3.2`.
SGLANG_ROUTER_VENV = Path(os.environ.get("SGLANG_ROUTER_VENV", "/tmp/sgr"))


# ---------------------------------------------------------------------------------- traces


@dataclass(frozen=True, slots=True)
class TraceRequest:
    send_at_s: float  # simulated seconds after the run starts (Poisson arrivals)
    token_ids: list[int]
    max_tokens: int
    after: int | None  # index of the previous turn of the same conversation, sent only once it is done
    reusable_tokens: int  # block-aligned prefix some earlier request already sent (the fleet's ideal hit)


@dataclass(frozen=True, slots=True)
class TraceSpec:
    name: str
    description: str
    rate_per_s: float
    requests: list[TraceRequest]
    time_scale: float = 1.0  # wall seconds per simulated second, inverted: see the module docstring


def _ids(rng: random.Random, n: int) -> list[int]:
    lo, hi = TOKEN_ID_RANGE
    return [rng.randrange(lo, hi) for _ in range(n)]


def _arrivals(rng: random.Random, rate_per_s: float, n: int) -> list[float]:
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate_per_s)
        out.append(t)
    return out


def _reusable(prompts: list[list[int]]) -> list[int]:
    """Per prompt, the longest block-aligned prefix an earlier prompt shares, capped like the
    engines cap a hit (the last prompt token is always computed)."""
    seen: set[int] = set()
    out = []
    bs = BLOCK_SIZE_TOKENS
    for ids in prompts:
        h, hit, matching = 0, 0, True
        for b in range((len(ids) - 1) // bs):
            h = hash((h, tuple(ids[b * bs : (b + 1) * bs])))
            if matching and h in seen:
                hit += 1
            else:
                matching = False
            seen.add(h)
        out.append(hit * bs)
    return out


def shared_prefix_trace(
    seed: int, n: int, rate_per_s: float, groups: int, prefix_tokens: int, user_tokens: int, output_tokens: int
) -> TraceSpec:
    rng = random.Random(seed)
    prefixes = [_ids(rng, prefix_tokens) for _ in range(groups)]
    prompts = [prefixes[rng.randrange(groups)] + _ids(rng, user_tokens) for _ in range(n)]
    times = _arrivals(rng, rate_per_s, n)
    reuse = _reusable(prompts)
    requests = [TraceRequest(t, p, output_tokens, None, r) for t, p, r in zip(times, prompts, reuse)]
    description = (
        f"{n} requests, {groups} groups (uniform), {prefix_tokens}-token system prompt + "
        f"{user_tokens}-token unique user turn, {output_tokens} output tokens"
    )
    return TraceSpec("shared", description, rate_per_s, requests)


def multiturn_trace(
    seed: int, n: int, rate_per_s: float, active: int, turns: tuple[int, int],
    user_tokens: tuple[int, int], reply_tokens: int,
) -> TraceSpec:
    """`active` conversations run at once; each request continues one of them, chosen round by
    round in a fresh random order, so a conversation's next turn comes ~`active` requests
    later. A finished conversation is replaced by a new one. Every turn resends the whole
    history: earlier user turns and replies (the replies are drawn here, `reply_tokens` long,
    so the trace does not depend on what an engine generates)."""
    rng = random.Random(seed)

    @dataclass
    class Conversation:
        turns_left: int
        history: list[int] = field(default_factory=list)
        last_request: int | None = None

    def new() -> Conversation:
        return Conversation(rng.randint(*turns))

    slots = [new() for _ in range(active)]
    prompts: list[list[int]] = []
    after: list[int | None] = []
    order: list[int] = []
    while len(prompts) < n:
        if not order:
            order = list(range(active))
            rng.shuffle(order)
        slot = order.pop()
        conv = slots[slot]
        conv.history += _ids(rng, rng.randint(*user_tokens))
        prompts.append(list(conv.history))
        after.append(conv.last_request)
        conv.last_request = len(prompts) - 1
        conv.history += _ids(rng, reply_tokens)
        conv.turns_left -= 1
        if conv.turns_left == 0:
            slots[slot] = new()
    times = _arrivals(rng, rate_per_s, n)
    reuse = _reusable(prompts)
    requests = [TraceRequest(t, p, reply_tokens, a, r) for t, p, a, r in zip(times, prompts, after, reuse)]
    description = (
        f"{n} requests, {active} conversations at a time, {turns[0]}-{turns[1]} turns each (uniform), "
        f"user turns {user_tokens[0]}-{user_tokens[1]} tokens, replies {reply_tokens} tokens, whole history resent"
    )
    return TraceSpec("multiturn", description, rate_per_s, requests)


# ---------------------------------------------------------------------------------- stacks


def model_dir(tmp: Path) -> Path:
    """The test tokenizer with a context long enough for the traces (its config says 2048)."""
    src = REPO / "models" / "dynamo-tiny"
    dst = tmp / "model"
    dst.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        if (src / name).exists():
            shutil.copy(src / name, dst / name)
    config = json.loads((src / "config.json").read_text())
    config["max_position_embeddings"] = MAX_MODEL_LEN
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def start_ours(
    mode: str, workers: int, time_scale: float, tmp: Path, model: Path, seed: int, overlap_weight: float | None,
    num_gpu_blocks: int,
) -> Stack:
    """`python -m dynamo.serve`: frontend, router and all mocker workers in one process on the
    embedded runtime (the mocker's time is sleeps, so one core serves eight of them)."""
    stack = Stack(f"ours-{mode}", free_port(), tmp)
    # MODE-affinity[-rR]: MODE, and the client sends session ids (`sessions` in drive);
    # -rR sets the overload ratio, e.g. kv-affinity-r1.25, kv-approx-affinity.
    mode, _, ratio = mode.partition("-affinity")
    session_args = ["--router-session-overload-ratio", ratio.removeprefix("-r")] if ratio else []
    router = ["--router-mode", "kv", "--no-kv-events"] if mode == "kv-approx" else ["--router-mode", mode]
    if mode.startswith("kv-w"):  # kv with another overlap weight, e.g. kv-w4
        router = ["--router-mode", "kv"]
        overlap_weight = float(mode.removeprefix("kv-w"))
    if overlap_weight is not None:
        router += ["--kv-overlap-score-weight", str(overlap_weight)]
    router += session_args
    stack.spawn(
        "serve",
        [
            str(REPO / ".venv" / "bin" / "python"), "-m", "dynamo.serve", "--engine", "mocker",
            "--model", str(model), "--served-model-name", SERVED_MODEL, "--num-workers", str(workers),
            "--http-port", str(stack.http_port), *router, "--router-seed", str(seed),
            "--speedup-ratio", str(time_scale), "--max-model-len", str(MAX_MODEL_LEN),
            "--block-size", str(BLOCK_SIZE_TOKENS), "--kv-cache-block-size", str(BLOCK_SIZE_TOKENS),
            "--num-gpu-blocks", str(num_gpu_blocks), "--request-timeout-s", "3600",
        ],
        {"DYN_LOG": "warning", "DYN_LOG_LEVEL": "warning"},
    )  # fmt: skip
    return stack


def dynamo_timing_npz(path: Path) -> None:
    """Our timing model (workers/mocker/timing.py) tabulated in the form Dynamo's mocker reads
    with --planner-profile-data: prefill time by tokens computed in a step, and decode step
    time by (active KV tokens, context length per request)."""
    import numpy as np

    sys.path.insert(0, str(REPO))
    from workers.mocker.timing import TimingModel

    timing = TimingModel()
    isl = np.linspace(1, MAX_MODEL_LEN, 512)
    prefill_ms = [timing.prefill_time_s(int(n)) * 1e3 for n in isl]
    kv = np.linspace(0, DEFAULT_GPU_BLOCKS * BLOCK_SIZE_TOKENS, 128)
    ctx = np.linspace(1, MAX_MODEL_LEN, 128)
    itl = np.array(
        [[timing.decode_time_s(max(1, round(k / c)), int(c)) * 1e3 for c in ctx] for k in kv]
    )
    np.savez(path, prefill_isl=isl, prefill_ttft_ms=np.array(prefill_ms),
             decode_active_kv_tokens=kv, decode_context_length=ctx, decode_itl=itl)  # fmt: skip


def start_dynamo(mode: str, workers: int, time_scale: float, tmp: Path, model: Path, num_gpu_blocks: int) -> Stack:
    """Dynamo's mocker (all workers in one process) and its Rust frontend with the same
    engine shape as ours: block size, KV pool, batch limits and the timing table above."""
    stack = Stack(f"dynamo-{mode}", free_port(), tmp)
    run_dir = Path(tempfile.mkdtemp(prefix="dyn-", dir=tmp))
    npz = run_dir / "timing.npz"
    dynamo_timing_npz(npz)
    env = {
        "DYN_DISCOVERY_BACKEND": "file", "DYN_FILE_KV": str(run_dir / "kv"), "DYN_REQUEST_PLANE": "tcp",
        "DYN_EVENT_PLANE": "zmq", "DYN_LOG": "warn",
    }  # fmt: skip
    python = str(DYNAMO_VENV / "bin" / "python")
    # From run_dir, so that `-m dynamo...` imports Dynamo's package, not this repository's.
    stack.spawn(
        "mocker",
        [
            python, "-m", "dynamo.mocker", "--model-path", str(model), "--model-name", SERVED_MODEL,
            "--num-workers", str(workers), "--speedup-ratio", str(time_scale),
            "--block-size", str(BLOCK_SIZE_TOKENS), "--num-gpu-blocks-override", str(num_gpu_blocks),
            "--max-num-seqs", "256", "--max-num-batched-tokens", "8192", "--max-model-len", str(MAX_MODEL_LEN),
            "--planner-profile-data", str(npz),
        ],
        env, cwd=run_dir,
    )  # fmt: skip
    stack.spawn(
        "frontend",
        [python, "-m", "dynamo.frontend", "--http-port", str(stack.http_port), "--router-mode", mode,
         "--kv-cache-block-size", str(BLOCK_SIZE_TOKENS)],
        env, cwd=run_dir,
    )  # fmt: skip
    return stack


def start_sglang_router(
    policy: str, workers: int, time_scale: float, tmp: Path, model: Path, num_gpu_blocks: int
) -> Stack:
    """SGLang's router (`--policy cache_aware|round_robin|...`, its defaults otherwise) in
    front of `workers` HTTP backends, each our frontend with one mocker worker (the same
    engine as in our stack), since the router balances OpenAI-compatible servers. Its
    cache_aware policy keeps a radix tree of the request text per worker."""
    stack = Stack(f"sglang-{policy}", free_port(), tmp)
    ports = [free_port() for _ in range(workers)]
    for i, port in enumerate(ports):
        stack.spawn(
            f"backend{i}",
            [
                str(REPO / ".venv" / "bin" / "python"), "-m", "dynamo.serve", "--engine", "mocker",
                "--model", str(model), "--served-model-name", SERVED_MODEL, "--num-workers", "1",
                "--http-port", str(port), "--router-mode", "round-robin", "--namespace", f"sgl{i}",
                "--speedup-ratio", str(time_scale), "--max-model-len", str(MAX_MODEL_LEN),
                "--block-size", str(BLOCK_SIZE_TOKENS), "--num-gpu-blocks", str(num_gpu_blocks),
                "--request-timeout-s", "3600",
            ],
            {"DYN_LOG": "warning", "DYN_LOG_LEVEL": "warning"},
        )  # fmt: skip
    stack.spawn(
        "router",
        [
            str(SGLANG_ROUTER_VENV / "bin" / "python"), "-m", "sglang_router.launch_router",
            "--host", "127.0.0.1", "--port", str(stack.http_port), "--policy", policy,
            "--worker-urls", *[f"http://127.0.0.1:{port}" for port in ports],
            "--worker-startup-timeout-secs", "120", "--log-level", "warn",
            "--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port()),
            "--request-timeout-secs", "3600",
        ],
    )  # fmt: skip
    return stack


# ------------------------------------------------------------------------------- the load


@dataclass(slots=True)
class Sent:
    result: RequestResult
    wait_s: float  # wall seconds it waited past its arrival time for its previous turn
    resent: bool = False  # sent again on a fresh connection after a stale keep-alive one


def conversation_ids(trace: TraceSpec) -> list[str]:
    """Each request's conversation, as a session id: the first turn's index, followed along
    `after`."""
    ids: list[str] = []
    for i, req in enumerate(trace.requests):
        ids.append(ids[req.after] if req.after is not None else f"conv-{i}")
    return ids


async def drive(
    base_url: str, trace: TraceSpec, time_scale: float, timeout_s: float, texts: list[str] | None = None,
    sessions: list[str] | None = None,
) -> list[Sent]:
    """Sends each request at its arrival time (stretched by 1 / time_scale), a later turn only
    after the previous turn of its conversation has finished. `texts`: send each prompt as
    this text instead of its token ids (for routers that take only text). `sessions`: each
    request's session id, sent in `x-dynamo-session-id`."""
    host, port = base_url.removeprefix("http://").split(":")
    idle: list[RawConnection] = []
    done = [asyncio.Event() for _ in trace.requests]
    out: list[Sent | None] = [None] * len(trace.requests)
    loop = asyncio.get_running_loop()
    t0 = loop.time() + 0.05

    async def send(i: int, req: TraceRequest, due: float) -> None:
        waited = 0.0
        if req.after is not None and not done[req.after].is_set():
            await done[req.after].wait()
            waited = loop.time() - due
        body = json.dumps({
            "model": SERVED_MODEL, "prompt": texts[i] if texts is not None else req.token_ids,
            "max_tokens": req.max_tokens,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
        }).encode()  # fmt: skip
        retried = False
        while True:
            conn = idle.pop() if idle else RawConnection(host, int(port), quickack=True)
            if sessions is not None:  # per request: connections are pooled across sessions
                conn.extra_headers = f"x-dynamo-session-id: {sessions[i]}\r\n"
            try:
                result = await one_request(conn, "/v1/completions", body, chat=False, timeout_s=timeout_s)
            finally:
                idle.append(conn)
            # The server closes keep-alive connections idle for a few seconds; a request sent on
            # one reads EOF before any response byte, so it never reached the engine: resend.
            if retried or result.ok or result.content_chunks or not result.error.startswith("IncompleteReadError"):
                break
            retried = True
        out[i] = Sent(result, waited, retried)
        done[i].set()

    tasks = []
    for i, req in enumerate(trace.requests):
        due = t0 + req.send_at_s / time_scale
        delay = due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(send(i, req, due)))
    await asyncio.gather(*tasks)
    for conn in idle:
        await conn.close()
    return [s for s in out if s is not None]


def summarize(trace: TraceSpec, sent: list[Sent], time_scale: float) -> dict[str, object]:
    ok = [s.result for s in sent if s.result.ok]
    errors: dict[str, int] = {}
    for s in sent:
        if not s.result.ok:
            errors[s.result.error] = errors.get(s.result.error, 0) + 1
    scale_ms = time_scale * 1e3  # wall seconds -> simulated milliseconds
    ttft = sorted(r.ttft_s for r in ok)
    itl = sorted(g for r in ok for g in r.itl_s)
    window_s = (max(r.end_s for r in ok) - min(r.start_s for r in ok)) * time_scale if ok else math.nan
    prompt = sum(r.prompt_tokens for r in ok)
    cached = sum(r.cached_tokens for r in ok)
    reusable = sum(req.reusable_tokens for req, s in zip(trace.requests, sent) if s.result.ok)
    waited = [s.wait_s for s in sent if s.wait_s > 0]

    def pct(values: list[float], q: float) -> float:
        return round(percentile(values, q) * scale_ms, 2)

    return {
        "requests_ok": len(ok),
        "requests_failed": len(sent) - len(ok),
        "errors": errors,
        "ttft_ms": {"p50": pct(ttft, 50), "p90": pct(ttft, 90), "p99": pct(ttft, 99)},
        "itl_ms": {"p50": pct(itl, 50), "p99": pct(itl, 99)},
        "e2e_ms_p50": pct(sorted(r.end_s - r.start_s for r in ok), 50),
        "window_s": round(window_s, 2),
        "req_per_s": round(len(ok) / window_s, 2),
        "output_tok_per_s": round(sum(r.output_tokens for r in ok) / window_s, 1),
        "prompt_tokens": prompt,
        "cached_tokens": cached,
        "prefix_hit_rate": round(cached / prompt, 4) if prompt else 0.0,
        "ideal_hit_rate": round(reusable / prompt, 4) if prompt else 0.0,
        "resent_on_stale_connection": sum(1 for s in sent if s.resent),
        "turns_delayed": len(waited),
        "turn_delay_ms_p50": pct(sorted(waited), 50) if waited else 0.0,
    }


def run_one_locked(stack_name: str, mode: str, trace: TraceSpec, args: argparse.Namespace, tmp: Path, model: Path) -> dict[str, object]:
    """One measurement under the machine-wide benchmark lock (other benchmarks share the CPU)."""
    import fcntl

    with open(args.lock, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            summary = run_one(stack_name, mode, trace, args, tmp, model)
            summary["load_1m_at_end"] = round(os.getloadavg()[0], 2)
            return summary
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


_TEXTS: dict[str, list[str]] = {}


def prompt_texts(trace: TraceSpec, model: Path) -> list[str]:
    """The trace's prompts as text (the served tokenizer's decoding of their ids). Byte-level
    BPE decodes a prefix of ids to a prefix of the text, so shared prefixes stay shared; the
    frontend re-tokenizes them, so prompt lengths can differ from the ids' by a few tokens."""
    if trace.name not in _TEXTS:
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(model / "tokenizer.json"))
        _TEXTS[trace.name] = tokenizer.decode_batch([r.token_ids for r in trace.requests], skip_special_tokens=False)
    return _TEXTS[trace.name]


def run_one(stack_name: str, mode: str, trace: TraceSpec, args: argparse.Namespace, tmp: Path, model: Path) -> dict[str, object]:
    if stack_name == "ours":
        stack = start_ours(
            mode, args.workers, trace.time_scale, tmp, model, args.seed, args.kv_overlap_score_weight,
            args.num_gpu_blocks,
        )
    elif stack_name == "sglang":
        stack = start_sglang_router(mode, args.workers, trace.time_scale, tmp, model, args.num_gpu_blocks)
    else:
        stack = start_dynamo(mode, args.workers, trace.time_scale, tmp, model, args.num_gpu_blocks)
    try:
        if stack_name == "sglang":  # its /v1/models names no model (ours has no /model_info for it)
            wait_until(lambda: _probe_completion(stack.base_url), 180, f"{stack.name}: first completion", stack.dead)
            stack.frontend_pid = pid_listening_on(stack.http_port)
        else:
            stack.wait_ready(180)
        stack_cpu = CpuWindow(stack.procs[0][1].pid)
        frontend_cpu = CpuWindow(stack.frontend_pid or stack.procs[-1][1].pid, include_children=False)
        # SGLang's stack: the router plus one process per backend, each its own tree.
        backend_cpus = [CpuWindow(proc.pid) for _, proc in stack.procs[1:-1]] if stack_name == "sglang" else []
        for window in (stack_cpu, frontend_cpu, *backend_cpus):
            window.start()
        cpu0 = time.process_time()
        texts = prompt_texts(trace, model) if args.text_prompts or stack_name == "sglang" else None
        sessions = conversation_ids(trace) if "-affinity" in mode else None
        sent = asyncio.run(drive(stack.base_url, trace, trace.time_scale, args.timeout_s, texts, sessions))
        client_cpu_s = time.process_time() - cpu0
        for window in (frontend_cpu, stack_cpu, *backend_cpus):
            window.stop()
        if stack.name.startswith("dynamo"):  # the mocker and the frontend are separate trees
            stack_cores = stack_cpu.cores + frontend_cpu.cores
        elif stack_name == "sglang":
            stack_cores = stack_cpu.cores + frontend_cpu.cores + sum(w.cores for w in backend_cpus)
        else:
            stack_cores = stack_cpu.cores
        summary = summarize(trace, sent, trace.time_scale)
        if sessions is not None:
            summary["session_affinity"] = affinity_outcomes(stack.base_url)
        summary.update(
            stack=stack_name, mode=mode, trace=trace.name, time_scale=trace.time_scale,
            num_gpu_blocks=args.num_gpu_blocks, prompts_as="text" if texts is not None else "token ids",
            wall_s=round(stack_cpu.wall_s, 1),
            client_cpu_cores=round(client_cpu_s / stack_cpu.wall_s, 3),
            stack_cpu_cores=round(stack_cores, 3),
            frontend_cpu_cores=round(frontend_cpu.cores, 3),
        )  # fmt: skip
        return summary
    finally:
        stack.stop()


def affinity_outcomes(base_url: str) -> dict[str, float]:
    """The router's session-affinity outcomes (hit, miss, repin, overloaded) from /metrics."""
    import urllib.request

    with urllib.request.urlopen(f"{base_url}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("dynamo_router_session_affinity_total{"):
            labels, value = line.rsplit(" ", 1)
            outcome = labels.split('outcome="', 1)[1].split('"', 1)[0]
            out[outcome] = out.get(outcome, 0.0) + float(value)
    total = sum(out.values())
    out["hit_rate"] = round(out.get("hit", 0.0) / total, 4) if total else 0.0
    return out


def format_row(s: dict[str, object]) -> str:
    ttft, itl = s["ttft_ms"], s["itl_ms"]
    assert isinstance(ttft, dict) and isinstance(itl, dict)
    return (
        f"{s['trace']:<9} {s['stack']:<6} {s['mode']:<12} ok={s['requests_ok']:<5} err={s['requests_failed']:<3} "
        f"TTFT p50 {ttft['p50']:8.1f} p99 {ttft['p99']:8.1f} ms  ITL p50 {itl['p50']:6.2f} p99 {itl['p99']:6.2f} ms  "
        f"{s['req_per_s']:6.1f} req/s {s['output_tok_per_s']:8.0f} tok/s  hit {s['prefix_hit_rate']:.3f} "
        f"(ideal {s['ideal_hit_rate']:.3f})  delayed {s['turns_delayed']}  "
        f"cpu client {s['client_cpu_cores']:.2f} stack {s['stack_cpu_cores']:.2f}"
        + (f"  affinity {s['session_affinity']}" if "session_affinity" in s else "")
    )


def build_traces(args: argparse.Namespace) -> dict[str, TraceSpec]:
    """Default time scales keep the wall-clock request rate near 32/s for both traces."""
    from dataclasses import replace

    traces = {
        "shared": shared_prefix_trace(
            args.seed, args.shared_requests, args.shared_rate, groups=args.shared_groups,
            prefix_tokens=args.shared_prefix_tokens,
            user_tokens=200, output_tokens=args.shared_output_tokens,
        ),
        "multiturn": multiturn_trace(
            args.seed, args.multiturn_requests, args.multiturn_rate, active=args.multiturn_active,
            turns=(4, 8), user_tokens=(100, 400), reply_tokens=args.multiturn_reply_tokens,
        ),
    }  # fmt: skip
    scales = {"shared": 0.2, "multiturn": 0.5}
    return {n: replace(t, time_scale=args.time_scale or scales[n]) for n, t in traces.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--traces", default="shared,multiturn")
    p.add_argument("--modes", default="kv,round-robin,random,least-loaded,kv-approx,kv-w4",
                   help="our router modes; kv-approx is kv with --no-kv-events, kv-wN kv with "
                   "--kv-overlap-score-weight N, kv-affinity kv with session ids sent")
    p.add_argument("--dynamo-modes", default="kv,round-robin", help="Dynamo's router modes ('' for none)")
    p.add_argument("--text-prompts", action="store_true",
                   help="send prompts as text for every stack (SGLang's router takes only text)")
    p.add_argument("--sglang-modes", default="",
                   help="SGLang router policies, e.g. cache_aware,round_robin (needs SGLANG_ROUTER_VENV)")
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--time-scale", type=float, default=None,
                   help="mocker speedup ratio and wall/simulated time ratio (< 1: slow motion)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shared-requests", type=int, default=1600)
    p.add_argument("--shared-rate", type=float, default=160.0, help="requests per simulated second")
    p.add_argument("--shared-output-tokens", type=int, default=100)
    p.add_argument("--shared-groups", type=int, default=16, help="distinct system prompts")
    p.add_argument("--shared-prefix-tokens", type=int, default=2000, help="system prompt length")
    p.add_argument("--num-gpu-blocks", type=int, default=DEFAULT_GPU_BLOCKS,
                   help=f"KV blocks ({BLOCK_SIZE_TOKENS} tokens) per worker, same for both stacks' mockers")
    p.add_argument("--multiturn-requests", type=int, default=1600)
    p.add_argument("--multiturn-rate", type=float, default=64.0, help="requests per simulated second")
    p.add_argument("--multiturn-active", type=int, default=96)
    p.add_argument("--multiturn-reply-tokens", type=int, default=100)
    p.add_argument("--kv-overlap-score-weight", type=float, default=None,
                   help="our kv router's overlap weight (default: the router's own default)")
    p.add_argument("--timeout-s", type=float, default=600.0)
    p.add_argument("--lock", default="/tmp/bench.lock", help="flock file serialising measurements")
    p.add_argument("--json-out", default=None)
    args = p.parse_args()

    traces = build_traces(args)
    tmp = Path(tempfile.mkdtemp(prefix="routing-quality-"))
    model = model_dir(tmp)
    print(f"logs in {tmp}", flush=True)
    runs: list[dict[str, object]] = []
    plan = [("ours", m) for m in args.modes.split(",") if m] + [("dynamo", m) for m in args.dynamo_modes.split(",") if m]
    plan += [("sglang", m) for m in args.sglang_modes.split(",") if m]
    for trace_name in args.traces.split(","):
        trace = traces[trace_name]
        print(f"trace {trace_name}: {trace.description}, {trace.rate_per_s} req/s", flush=True)
        if trace_name == "shared":
            prefix_blocks = args.shared_groups * (args.shared_prefix_tokens // BLOCK_SIZE_TOKENS)
            print(
                f"  prefixes {prefix_blocks} blocks = {prefix_blocks / args.num_gpu_blocks:.2f}x one worker's "
                f"pool of {args.num_gpu_blocks} blocks, {prefix_blocks / (args.num_gpu_blocks * args.workers):.2f}x "
                "the fleet's", flush=True,
            )  # fmt: skip
        for stack_name, mode in plan:
            summary = run_one_locked(stack_name, mode, trace, args, tmp, model)
            runs.append(summary)
            print(format_row(summary), flush=True)
            if summary["errors"]:
                print(f"  errors: {summary['errors']}", flush=True)
            if args.json_out:  # after every run, so an interrupted sweep keeps what it measured
                write_json(Path(args.json_out), args, traces, runs)


def write_json(path: Path, args: argparse.Namespace, traces: dict[str, TraceSpec], runs: list[dict[str, object]]) -> None:
    doc = {
        "command": " ".join(sys.argv),
        "args": vars(args),
        "machine": f"{os.cpu_count()} CPUs, {os.uname().sysname} {os.uname().release}",
        "started_load_1m": os.getloadavg()[0],
        "traces": {n: {"description": t.description, "rate_per_s": t.rate_per_s, "time_scale": t.time_scale} for n, t in traces.items()},
        "kv_pool_per_worker": {"blocks": args.num_gpu_blocks, "tokens": args.num_gpu_blocks * BLOCK_SIZE_TOKENS},
        "runs": runs,
    }
    path.write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
