"""Frontend + router overhead, side by side: our stack (distributed: nats-server, etcd, frontend,
mocker worker) and NVIDIA Dynamo 1.6.1's (Rust frontend + its mocker), both at near-zero engine
time, under the same streaming workload, with each frontend process's CPU sampled per level.

    python benchmarks/frontend_overhead.py [--stacks ours,ours-tcp,dynamo,null] [--levels 1,16,64,256]
        [--duration-s 10] [--c1-requests 300] [--out-dir benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from loadgen import LoadConfig, add_load_args, config_from_args, format_summary, run_load  # noqa: E402
from proc_cpu import CpuWindow, pid_listening_on  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SERVED_MODEL = "tiny"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def find_binary(name: str, fallbacks: list[str]) -> str:
    for candidate in [shutil.which(name) or "", *fallbacks]:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise FileNotFoundError(f"{name} not found on PATH nor in {fallbacks}")


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str, alive: Callable[[], str | None]) -> None:
    """Polls condition; fails early with the reason alive() gives when a process has died."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        dead = alive()
        if dead:
            raise RuntimeError(f"{what}: {dead}")
        time.sleep(0.1)
    raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}")


def _http_ok(url: str, predicate: Callable[[bytes], bool] = lambda _: True) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            return resp.status == 200 and predicate(resp.read())
    except (OSError, urllib.error.URLError):
        return False


def _probe_completion(base_url: str) -> bool:
    """One short streamed chat completion succeeds (the model is listed *and* routable)."""
    body = json.dumps(
        {"model": SERVED_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stream": True}
    ).encode()
    req = urllib.request.Request(f"{base_url}/v1/chat/completions", body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status == 200 and b"[DONE]" in resp.read()
    except (OSError, urllib.error.URLError):
        return False


@dataclass
class Stack:
    """A set of processes serving SERVED_MODEL at base_url; the frontend is what we measure."""

    name: str
    http_port: int
    log_dir: Path
    procs: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)
    frontend_pid: int | None = None
    data_dir: Path | None = None  # infrastructure data (NATS JetStream, etcd), removed at stop

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def spawn(self, label: str, argv: list[str], env: dict[str, str] | None = None, cwd: Path = REPO) -> subprocess.Popen[bytes]:
        log = (self.log_dir / f"{self.name}-{label}.log").open("ab")
        proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, cwd=cwd, start_new_session=True
        )
        self.procs.append((label, proc))
        return proc

    def dead(self) -> str | None:
        for label, proc in self.procs:
            if proc.poll() is not None:
                return f"{label} exited with {proc.returncode}; log tail:\n{self.log_tail(label)}"
        return None

    def log_tail(self, label: str, chars: int = 3000) -> str:
        try:
            return (self.log_dir / f"{self.name}-{label}.log").read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def wait_ready(self, timeout_s: float) -> None:
        listed = lambda body: SERVED_MODEL.encode() in body  # noqa: E731
        wait_until(lambda: _http_ok(f"{self.base_url}/v1/models", listed), timeout_s, f"{self.name}: model listed", self.dead)
        wait_until(lambda: _probe_completion(self.base_url), timeout_s, f"{self.name}: first completion", self.dead)
        self.frontend_pid = pid_listening_on(self.http_port)
        if self.frontend_pid is None:
            raise RuntimeError(f"{self.name}: no process listens on {self.http_port}")

    def stop(self) -> None:
        # Reverse order: frontend and workers before the infrastructure they use.
        for _, proc in reversed(self.procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for _, proc in reversed(self.procs):
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)


def start_ours(
    args: argparse.Namespace,
    log_dir: Path,
    request_plane: str = "nats",
    extra_env: dict[str, str] | None = None,
    name: str | None = None,
) -> Stack:
    """Our distributed stack; `request_plane` is where the worker serves (nats: through
    nats-server; tcp: the frontend connects to the worker directly, NATS carries events only);
    `extra_env` goes to the frontend and the workers (benchmarks/tracing_overhead.py: exporters)."""
    stack = Stack(name or ("ours" if request_plane == "nats" else f"ours-{request_plane}"), free_port(), log_dir)
    env = {**start_infra(stack), "DYN_LOG": args.our_log_level, "DYN_REQUEST_PLANE": request_plane, **(extra_env or {})}
    python = repo_python()
    stack.spawn(
        "frontend",
        [python, "-m", "dynamo.frontend", "--http-port", str(stack.http_port), "--router-mode", args.router_mode],
        env,
    )
    for i in range(args.workers):
        stack.spawn(
            f"worker{i}",
            [
                python, "-m", "dynamo.worker", "--engine", "mocker", "--model", str(REPO / "models" / "dynamo-tiny"),
                "--served-model-name", SERVED_MODEL, "--speedup-ratio", str(args.speedup_ratio),
            ],
            env,
        )  # fmt: skip
    return stack


def repo_python() -> str:
    """This interpreter when it is the project's virtual environment's, else that one."""
    venv = REPO / ".venv"
    return sys.executable if venv.resolve() in Path(sys.executable).resolve().parents else str(venv / "bin" / "python")


def start_infra(stack: Stack) -> dict[str, str]:
    """nats-server and etcd on free local ports for `stack` (their data removed at its stop);
    returns the environment its frontend and workers need to find them."""
    venv_bin = REPO / ".venv" / "bin"
    nats = find_binary("nats-server", [str(venv_bin / "nats-server")])
    etcd = find_binary("etcd", [str(venv_bin / "etcd"), "/tmp/etcdx/usr/bin/etcd"])
    data = Path(tempfile.mkdtemp(prefix="bench-infra-", dir="/dev/shm" if os.access("/dev/shm", os.W_OK) else None))
    stack.data_dir = data
    nats_port, etcd_port, peer_port = free_port(), free_port(), free_port()
    stack.spawn("nats", [nats, "-js", "-a", "127.0.0.1", "-p", str(nats_port), "-sd", str(data / "js")])
    client_url, peer_url = f"http://127.0.0.1:{etcd_port}", f"http://127.0.0.1:{peer_port}"
    stack.spawn(
        "etcd",
        [
            etcd, "--name", "bench", "--data-dir", str(data / "etcd"),
            "--listen-client-urls", client_url, "--advertise-client-urls", client_url,
            "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
            "--initial-cluster", f"bench={peer_url}", "--log-level", "warn",
        ],
    )  # fmt: skip
    wait_until(lambda: _http_ok(f"{client_url}/health"), 30, "etcd health", stack.dead)
    return {
        "NATS_SERVER": f"nats://127.0.0.1:{nats_port}",
        "ETCD_ENDPOINTS": client_url,
        "DYN_NAMESPACE": f"bench{os.getpid()}",
        "DYN_REQUEST_PLANE_HOST": "127.0.0.1",
    }


def start_dynamo(args: argparse.Namespace, log_dir: Path) -> Stack:
    stack = Stack("dynamo", free_port(), log_dir)
    stack.spawn(
        "anchor",
        [
            "bash", str(REPO / "benchmarks" / "run_dynamo_anchor.sh"), "--http-port", str(stack.http_port),
            "--speedup-ratio", str(args.speedup_ratio), "--model-path", str(REPO / "models" / "dynamo-tiny"),
            "--model-name", SERVED_MODEL, "--router-mode", args.router_mode, "--workers", str(args.workers),
        ],
        {"DYN_LOG": "warn"},
    )  # fmt: skip
    return stack


def start_null(args: argparse.Namespace, log_dir: Path) -> Stack:
    """benchmarks/null_server.py: the floor (client, TCP, scheduler) under the same load."""
    stack = Stack("null", free_port(), log_dir)
    stack.spawn("server", [sys.executable, str(REPO / "benchmarks" / "null_server.py"), "--http-port", str(stack.http_port)])
    return stack


def measure(stack: Stack, config: LoadConfig) -> dict[str, object]:
    assert stack.frontend_pid is not None
    window = CpuWindow(stack.frontend_pid, include_children=True)
    # Everything the stack runs (frontend, workers, and for ours nats-server and etcd).
    labels = [label for label, _ in stack.procs]
    whole = [CpuWindow(proc.pid, include_children=True) for _, proc in stack.procs]
    load: dict[str, float] = {}

    def started() -> None:
        load["start"] = os.getloadavg()[0]
        window.start()
        for w in whole:
            w.start()

    def ended() -> None:
        window.stop()
        for w in whole:
            w.stop()
        load["end"] = os.getloadavg()[0]

    summary = run_load(config, started, ended)
    summary["stack"] = stack.name
    summary["frontend_cpu_cores"] = round(window.cores, 3)
    summary["stack_cpu_cores"] = round(sum(w.cores for w in whole), 3)
    summary["stack_cpu_cores_by_process"] = {label: round(w.cores, 3) for label, w in zip(labels, whole)}
    req_s = float(summary["req_per_s"])  # type: ignore[arg-type]
    tok_s = float(summary["output_tok_per_s"])  # type: ignore[arg-type]
    summary["req_per_s_per_frontend_core"] = round(req_s / window.cores, 1) if window.cores > 0 else None
    summary["tok_per_s_per_frontend_core"] = round(tok_s / window.cores, 1) if window.cores > 0 else None
    summary["frontend_cpu_ms_per_req"] = round(1000 * window.cores / req_s, 3) if req_s > 0 else None
    summary["loadavg_1m"] = {"start": round(load.get("start", 0.0), 2), "end": round(load.get("end", 0.0), 2)}
    return summary


def markdown(rows: list[dict[str, object]], levels: list[int]) -> str:
    lines = [
        "| stack | conc | req/s | out tok/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms "
        "| frontend cores | frontend CPU ms/req | req/s per core | tok/s per core | stack cores | errors | load 1m |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ttft, itl, la = r["ttft_ms"], r["itl_ms"], r["loadavg_1m"]
        assert isinstance(ttft, dict) and isinstance(itl, dict) and isinstance(la, dict)
        lines.append(
            f"| {r['stack']} | {r['concurrency']} | {r['req_per_s']} | {r['output_tok_per_s']} | {ttft['p50']:.2f} "
            f"| {ttft['p99']:.2f} | {itl['p50']:.3f} | {itl['p99']:.3f} | {r['frontend_cpu_cores']:.2f} "
            f"| {r['frontend_cpu_ms_per_req']} "
            f"| {r['req_per_s_per_frontend_core']} | {r['tok_per_s_per_frontend_core']} | {r['stack_cpu_cores']:.2f} | {r['requests_failed']} "
            f"| {la['start']:.1f}/{la['end']:.1f} |"
        )
    by = {(r["stack"], r["concurrency"]): r for r in rows}
    ours_names = sorted({s for s, _ in by if isinstance(s, str) and s.startswith("ours")})
    if ours_names and any(s == "dynamo" for s, _ in by):
        has_null = any(s == "null" for s, _ in by)
        lines += [
            "",
            "| stack | conc | req/s vs Dynamo | per-core vs Dynamo | TTFT p50 - Dynamo (ms) "
            "| TTFT p50 added over null (ms): ours / Dynamo |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for name in ours_names:
            for c in levels:
                o, d, n = by.get((name, c)), by.get(("dynamo", c)), by.get(("null", c))
                if not o or not d:
                    continue
                opc, dpc = o["req_per_s_per_frontend_core"], d["req_per_s_per_frontend_core"]
                per_core = f"{opc / dpc:.2f}" if isinstance(opc, float) and isinstance(dpc, float) and dpc else "n/a"
                d_ttft = o["ttft_ms"]["p50"] - d["ttft_ms"]["p50"]  # type: ignore[index]
                ratio = float(o["req_per_s"]) / float(d["req_per_s"]) if d["req_per_s"] else float("nan")  # type: ignore[arg-type]
                over_null = "n/a"
                if has_null and n:
                    floor = n["ttft_ms"]["p50"]  # type: ignore[index]
                    over_null = f"{o['ttft_ms']['p50'] - floor:.2f} / {d['ttft_ms']['p50'] - floor:.2f}"  # type: ignore[index]
                lines.append(f"| {name} | {c} | {ratio:.2f} | {per_core} | {d_ttft:+.2f} | {over_null} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_load_args(parser)
    parser.set_defaults(tokenizer=str(REPO / "models" / "dynamo-tiny"), model=SERVED_MODEL)
    parser.add_argument("--stacks", default="ours,dynamo", help="comma-separated: ours (requests over NATS), ours-tcp (direct TCP request plane), dynamo, "
        "null (a do-nothing SSE server: the floor)")
    parser.add_argument("--levels", default="1,16,64,256", help="concurrency levels")
    parser.add_argument("--duration-s", type=float, default=10.0, help="measured seconds per level (c > 1)")
    parser.add_argument("--c1-requests", type=int, default=300, help="requests at concurrency 1")
    parser.add_argument("--workers", type=int, default=1, help="mocker workers per stack")
    parser.add_argument("--speedup-ratio", type=float, default=1_000_000)
    parser.add_argument("--router-mode", default="round-robin")
    parser.add_argument("--our-log-level", default="WARNING")
    parser.add_argument("--ready-timeout-s", type=float, default=120.0)
    parser.add_argument("--out-dir", default=str(REPO / "benchmarks" / "results"))
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    names = [s.strip() for s in args.stacks.split(",") if s.strip()]
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log_dir = Path(tempfile.mkdtemp(prefix="frontend-overhead-"))
    print(f"logs in {log_dir}", flush=True)

    starters: dict[str, Callable[[argparse.Namespace, Path], Stack]] = {
        "ours": start_ours,
        "ours-tcp": lambda a, d: start_ours(a, d, "tcp"),
        "dynamo": start_dynamo,
        "null": start_null,
    }
    stacks: list[Stack] = []
    rows: list[dict[str, object]] = []
    try:
        for name in names:
            stacks.append(starters[name](args, log_dir))
        for stack in stacks:
            stack.wait_ready(args.ready_timeout_s)
            print(f"{stack.name}: ready at {stack.base_url}, frontend pid {stack.frontend_pid}", flush=True)
        for i, c in enumerate(levels):
            # Alternate the order per level so that drift in the machine's load hits both stacks.
            for stack in stacks if i % 2 == 0 else list(reversed(stacks)):
                config = config_from_args(
                    args,
                    url=stack.base_url,
                    concurrency=c,
                    num_requests=args.c1_requests if c == 1 else None,
                    duration_s=None if c == 1 else args.duration_s,
                )
                row = measure(stack, config)
                rows.append(row)
                print(f"{stack.name:>7} {format_summary(row)}  frontend {row['frontend_cpu_cores']:.2f} cores", flush=True)
                dead = stack.dead()
                if dead:
                    raise RuntimeError(f"{stack.name} died during the run: {dead}")
    finally:
        for stack in stacks:
            stack.stop()
            if stack.data_dir is not None:
                shutil.rmtree(stack.data_dir, ignore_errors=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        meta = {"argv": sys.argv, "cpus": os.cpu_count(), "uname": " ".join(os.uname()), "log_dir": str(log_dir)}
        (out_dir / f"frontend_overhead-{stamp}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
        table = markdown(rows, levels)
        (out_dir / f"frontend_overhead-{stamp}.md").write_text(table)
        print(table)


if __name__ == "__main__":
    main()
