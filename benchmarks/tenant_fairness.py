"""Tenant fairness on a saturated mocker fleet: three tenants, one flooding at 5x its share of
the fleet; the other two's TTFT p99 against their solo baseline, with fair queuing on (the
frontend's admission queue, frontend/admission.py), off (the same queue as one FIFO: every key
is one tenant), off with this frontend's defaults (no admission queue: the workers' own FIFO
queues), and NVIDIA Dynamo 1.6.1 at its defaults (its Rust frontend and mocker; no tenants).

Every run offers the same trace: Poisson arrivals per tenant at fixed rates, streaming
completions of --input-tokens / --output-tokens, the same prompts (seeded).

    python benchmarks/tenant_fairness.py --systems ours,fifo,nolimit,dynamo --duration-s 75 \
        --warmup-s 5 --speedup-ratio 0.1 --share-rps 4 --timeout-s 400 [--json-out F]

Dynamo runs from benchmarks/run_dynamo_anchor.sh's virtual environment ($DYN_VENV, default
/tmp/dyn; that script creates it when missing: run it once first).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loadgen import LoadConfig, build_prompts, percentile, request_body  # noqa: E402
from sse_client import RawConnection, RequestResult, one_request  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MODEL_DIR = REPO / "models" / "dynamo-tiny"
MODEL = "tiny"
TENANTS = ("flood", "steady-a", "steady-b")
OTHERS = TENANTS[1:]


@dataclass
class Tenant:
    name: str
    rate_rps: float
    results: list[RequestResult] = field(default_factory=list)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tenants_file(path: Path, fair: bool) -> None:
    """Fair: a tenant per key (equal weights). Off: every key in one tenant, so the admission
    queue is a single FIFO flow."""
    if fair:
        spec = {name: {"keys": [f"sk-{name}"]} for name in TENANTS}
    else:
        spec = {"everyone": {"keys": [f"sk-{name}" for name in TENANTS]}}
    path.write_text(json.dumps({"tenants": spec}))


def _wait_ready(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            resp = httpx.get(f"{url}/v1/models", timeout=1.0, headers={"authorization": "Bearer sk-flood"})
            if resp.status_code == 200 and resp.json().get("data"):
                # A first request proves the path end to end (Dynamo lists models before its
                # router has the worker).
                ok = httpx.post(
                    f"{url}/v1/completions", timeout=30, headers={"authorization": "Bearer sk-flood"},
                    json={"model": MODEL, "prompt": "hi", "max_tokens": 2},
                )
                if ok.status_code == 200:
                    return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not ready")


def headroom(args: argparse.Namespace) -> float:
    """The reserve past the limit for tenants under their share: by default, up to the engines'
    batch, so that borrowed slots start at once (docs/tenants.md, choosing the headroom)."""
    if args.fair_share_headroom is not None:
        return args.fair_share_headroom
    return max(0.0, args.max_num_seqs / args.inflight_per_worker - 1)


def start_ours(args: argparse.Namespace, mode: str, tmp: Path) -> tuple[str, list[subprocess.Popen[bytes]]]:
    port = _free_port()
    cmd = [
        sys.executable, "-m", "dynamo.serve", "--engine", "mocker", "--model", str(MODEL_DIR),
        "--served-model-name", MODEL, "--http-port", str(port), "--num-workers", str(args.workers),
        "--max-num-seqs", str(args.max_num_seqs), "--speedup-ratio", str(args.speedup_ratio),
        "--log-level", "warning", "--router-mode", args.router_mode,
    ]
    if mode in ("ours", "fifo"):
        tenants = tmp / f"tenants-{mode}.json"
        _tenants_file(tenants, fair=mode == "ours")
        cmd += [
            "--tenants-file", str(tenants),
            # Saturated = --inflight-per-worker requests per worker, below the engines' batch
            # limit: a request admitted by the frontend starts at once on whichever worker the
            # router picks, instead of waiting in that engine's FIFO queue.
            "--max-inflight-requests", str(args.workers * args.inflight_per_worker),
            "--max-waiting-requests", str(args.max_waiting), "--queue-timeout-s", str(args.queue_timeout_s),
            "--fair-share-headroom", str(headroom(args)),
        ]
    else:  # nolimit: the defaults (no admission queue), keys only to send the same requests
        cmd += ["--api-key", ",".join(f"sk-{name}" for name in TENANTS)]
    env = dict(os.environ, PYTHONUNBUFFERED="1", DYN_HTTP_HOST="127.0.0.1", DYN_SYSTEM_HOST="127.0.0.1",
               DYN_REQUEST_PLANE_HOST="127.0.0.1", DYN_KV_TRANSFER_HOST="127.0.0.1")
    log = (tmp / f"{mode}.log").open("wb")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    _wait_ready(url, proc)
    return url, [proc]


def start_dynamo(args: argparse.Namespace, tmp: Path) -> tuple[str, list[subprocess.Popen[bytes]]]:
    """Dynamo 1.6.1's frontend (defaults: round-robin, no queue of its own) and its mockers
    with the same batch size and speed; file discovery, TCP request plane, ZMQ events."""
    venv = Path(os.environ.get("DYN_VENV", "/tmp/dyn"))
    python = venv / "bin" / "python"
    if not python.exists():
        raise RuntimeError(f"no Dynamo venv at {venv}: run benchmarks/run_dynamo_anchor.sh once")
    port = _free_port()
    run_dir = Path(tempfile.mkdtemp(prefix="dyn-fair.", dir=tmp))
    env = dict(os.environ, DYN_DISCOVERY_BACKEND="file", DYN_FILE_KV=str(run_dir / "kv"), DYN_REQUEST_PLANE="tcp",
               DYN_EVENT_PLANE="zmq", DYN_LOG="warn", PYTHONUNBUFFERED="1")
    env.pop("PYTHONPATH", None)
    procs = []
    for i in range(args.workers):
        log = (tmp / f"dynamo-mocker-{i}.log").open("wb")
        procs.append(subprocess.Popen(
            [str(python), "-m", "dynamo.mocker", "--model-path", str(MODEL_DIR), "--model-name", MODEL,
             "--speedup-ratio", str(args.speedup_ratio), "--max-num-seqs", str(args.max_num_seqs)],
            cwd=run_dir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        ))
    log = (tmp / "dynamo-frontend.log").open("wb")
    procs.append(subprocess.Popen(
        [str(python), "-m", "dynamo.frontend", "--http-port", str(port)],
        cwd=run_dir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    ))
    url = f"http://127.0.0.1:{port}"
    _wait_ready(url, procs[-1])
    return url, procs


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in reversed(procs):
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


async def offer(url: str, tenants: list[Tenant], args: argparse.Namespace, seed: int) -> None:
    """Each tenant's Poisson arrivals for --duration-s, open loop (a request per connection)."""
    port = int(url.rsplit(":", 1)[1])
    config = LoadConfig(url=url, model=MODEL, endpoint="completions", input_tokens=args.input_tokens,
                        output_tokens=args.output_tokens, seed=seed)
    start = time.monotonic()
    deadline = start + args.duration_s

    async def tenant_loop(tenant: Tenant, index: int) -> None:
        rng = random.Random(seed * 100 + index)
        prompts = build_prompts(LoadConfig(**{**config.__dict__, "seed": seed * 100 + index}), 256)
        # Output lengths vary (0.5x to 1.5x): equal lengths would end a saturated fleet's
        # requests in cohorts, and every slot would free in the same step.
        bodies = []
        for p in prompts:
            body = json.loads(request_body(config, MODEL, p))
            body["max_tokens"] = rng.randint(args.output_tokens // 2, args.output_tokens * 3 // 2)
            bodies.append(json.dumps(body).encode())
        idle: list[RawConnection] = []
        tasks: set[asyncio.Task[None]] = set()
        headers = {"Authorization": f"Bearer sk-{tenant.name}"}
        next_t = time.monotonic()
        n = 0

        async def fire(body: bytes) -> None:
            conn = idle.pop() if idle else RawConnection("127.0.0.1", port, True, headers)
            try:
                result = await one_request(conn, "/v1/completions", body, False, args.timeout_s)
            finally:
                idle.append(conn)
            if result.start_s >= start + args.warmup_s:
                tenant.results.append(result)

        while True:
            next_t += rng.expovariate(tenant.rate_rps)
            if next_t >= deadline:
                break
            await asyncio.sleep(max(0.0, next_t - time.monotonic()))
            task = asyncio.create_task(fire(bodies[n % len(bodies)]))
            n += 1
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.gather(*tasks)
        for conn in idle:
            await conn.close()

    await asyncio.gather(*(tenant_loop(t, i) for i, t in enumerate(tenants)))


def summarize(tenant: Tenant) -> dict[str, object]:
    ok = [r for r in tenant.results if r.ok]
    ttft = sorted(r.ttft_s * 1000 for r in ok)
    errors: dict[str, int] = {}
    for r in tenant.results:
        if not r.ok:
            key = r.error[:60]
            errors[key] = errors.get(key, 0) + 1
    return {
        "offered_rps": tenant.rate_rps,
        "requests": len(tenant.results),
        "ok": len(ok),
        "ttft_p50_ms": round(percentile(ttft, 50), 1),
        "ttft_p99_ms": round(percentile(ttft, 99), 1),
        "errors": errors,
    }


def run_system(system: str, args: argparse.Namespace, tmp: Path) -> dict[str, object]:
    share = args.share_rps
    rates = {"flood": share * args.flood_factor, "steady-a": share * args.others_factor,
             "steady-b": share * args.others_factor}
    url, procs = start_dynamo(args, tmp) if system == "dynamo" else start_ours(args, system, tmp)
    out: dict[str, object] = {}
    try:
        solo = [Tenant(name, rates[name]) for name in OTHERS]
        asyncio.run(offer(url, solo, args, seed=1))
        out["solo"] = {t.name: summarize(t) for t in solo}
        flooded = [Tenant(name, rates[name]) for name in TENANTS]
        asyncio.run(offer(url, flooded, args, seed=1))
        out["flood"] = {t.name: summarize(t) for t in flooded}
    finally:
        stop(procs)
    ratios = {}
    for name in OTHERS:
        solo_p99 = out["solo"][name]["ttft_p99_ms"]  # type: ignore[index]
        flood_p99 = out["flood"][name]["ttft_p99_ms"]  # type: ignore[index]
        ratios[name] = round(flood_p99 / solo_p99, 2) if solo_p99 else None
    out["p99_ratio_vs_solo"] = ratios
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--systems", default="ours,fifo,nolimit,dynamo")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--router-mode", default="least-loaded",
        help="ours: a load-aware mode sends each admitted request to the worker with the free batch slot",
    )
    parser.add_argument("--max-num-seqs", type=int, default=24, help="every engine's batch limit (all systems)")
    parser.add_argument("--inflight-per-worker", type=int, default=16, help="ours: the admission limit per worker")
    parser.add_argument("--speedup-ratio", type=float, default=0.25)
    parser.add_argument("--share-rps", type=float, default=10.0, help="a tenant's fair share of the fleet, req/s")
    parser.add_argument("--flood-factor", type=float, default=5.0)
    parser.add_argument("--others-factor", type=float, default=0.6)
    parser.add_argument("--input-tokens", type=int, default=256)
    parser.add_argument("--output-tokens", type=int, default=32)
    parser.add_argument("--duration-s", type=float, default=40.0)
    parser.add_argument("--warmup-s", type=float, default=5.0)
    parser.add_argument("--max-waiting", type=int, default=256)
    parser.add_argument(
        "--fair-share-headroom", type=float, default=None,
        help="ours; default: what takes the limit to the engines' batch (--max-num-seqs / "
        "--inflight-per-worker - 1: 24 / 16 - 1 = 0.5), as docs/tenants.md advises",
    )
    parser.add_argument("--queue-timeout-s", type=float, default=30.0)
    parser.add_argument("--timeout-s", type=float, default=120.0)
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    results: dict[str, object] = {"config": {**config, "fair_share_headroom": headroom(args)}}
    # Kept afterwards: the servers' logs, for a look at a run that went wrong.
    tmp = Path(tempfile.mkdtemp(prefix="tenant-fairness."))
    print(f"logs in {tmp}", file=sys.stderr)
    for system in args.systems.split(","):
        print(f"== {system}", file=sys.stderr, flush=True)
        results[system] = run_system(system, args, tmp)
        print(json.dumps(results[system], indent=1), file=sys.stderr, flush=True)
    text = json.dumps(results, indent=1)
    if args.json_out:
        args.json_out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
