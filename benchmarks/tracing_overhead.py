"""Tracing's cost per request (dynamo/tracing.py): the same distributed stack (frontend, mocker
worker, TCP request plane, nats-server, etcd) four times, with tracing off, with spans written
to a file (DYN_TRACE_FILE) and with spans exported over OTLP/HTTP to a local sink that accepts
and drops them; the same streaming load on each, rounds interleaved so that drift in the
machine's load hits all of them; the frontend's and the worker's CPU per request compared;
and OTLP with one request in ten sampled (OTEL_TRACES_SAMPLER=parentbased_traceidratio). Also
the off path's own cost, timed in process: every tracing check a request passes with tracing
off.

    python benchmarks/tracing_overhead.py [--levels 1,16] [--rounds 3] [--duration-s 8]
        [--c1-requests 200] [--out-dir benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
import timeit
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from frontend_overhead import REPO, SERVED_MODEL, Stack, free_port, measure, start_ours  # noqa: E402
from loadgen import add_load_args, config_from_args  # noqa: E402


class _Sink(BaseHTTPRequestHandler):
    """An OTLP/HTTP collector that reads each export and answers success (an empty
    ExportTraceServiceResponse), so the exporter does all of its real work."""

    received = 0

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        self.rfile.read(int(self.headers.get("content-length", 0)))
        type(self).received += 1
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def off_path_ns() -> float:
    """Nanoseconds a request spends in tracing's checks with tracing off: each check of the
    frontend (endpoint, pipeline, one choice, a remote router), the worker and the engine, in
    the order a request meets them."""
    from dynamo import tracing
    from dynamo.wire import PreprocessedRequest

    assert not tracing.active
    request = PreprocessedRequest(request_id="r", model="m", token_ids=[1])

    def one_request() -> None:
        span = None if not tracing.active else object()  # endpoint: the server span
        if span is not None:  # endpoint: made current; the queue span
            pass
        if tracing.active:  # pipeline: preprocess span
            pass
        if tracing.active:  # choice stream: its span
            pass
        if request.trace is not None:  # choice stream: route span
            pass
        if tracing.active:  # remote router: the route span's context
            pass
        if request.trace is not None:  # choice stream: first_token's clock
            pass
        if request.trace is not None:  # choice stream: first_token span
            pass
        if request.trace is not None and tracing.active:  # worker
            pass
        if request.trace is not None and tracing.active:  # engine
            pass
        if span is not None:  # endpoint's end
            pass

    n = 200_000
    best = min(timeit.repeat(one_request, number=n, repeat=5))
    empty = min(timeit.repeat(lambda: None, number=n, repeat=5))
    return (best - empty) / n * 1e9


def on_path_us(config: object, n: int = 2000) -> tuple[float, float]:
    """CPU microseconds per request (the whole process: the request path and the exporter's
    thread) of the spans one traced request makes on the frontend (server, queue, preprocess,
    generate, route, first_token) and on the worker (worker.generate and three engine spans),
    made in process without the rest of the stack."""
    from dynamo import tracing
    from dynamo.wire import PreprocessedRequest

    client = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    base = PreprocessedRequest(request_id="r", model="m", token_ids=[1] * 100)

    def frontend() -> str | None:
        now = time.perf_counter
        server = tracing.start_span("POST /v1/chat/completions", client, kind="server", start_s=now())
        token = tracing.attach(server)
        with tracing.span("queue"):
            pass
        t = now()
        tracing.annotate({"dynamo.request_id": "r", "dynamo.model": "m"})
        tracing.emit("preprocess", tracing.CURRENT, t, now(), {"dynamo.prompt_tokens": 100})
        generate = tracing.start_span("generate", attributes={"dynamo.request_id": "r"})
        trace = tracing.traceparent(generate)
        with tracing.span("route", trace) as route:
            assert route is not None
            route.set_attributes({"dynamo.instance_id": "1f", "dynamo.overlap_blocks": 0.0})
        tracing.emit("first_token", trace, t, now(), {"dynamo.instance_id": "1f"})
        tracing.end(generate, attributes={"dynamo.instance_id": "1f", "dynamo.migrations": 0})
        tracing.detach(token)
        tracing.end(server, attributes={"http.response.status_code": 200})
        return trace

    def worker(trace: str | None) -> None:
        span = tracing.start_span("worker.generate", trace, kind="server", attributes={"dynamo.request_id": "r"})
        inner = tracing.traceparent(span)
        t = time.perf_counter()
        tracing.emit("engine.queue", inner, t, t)
        tracing.emit("engine.prefill", inner, t, t, {"dynamo.prompt_tokens": 100, "dynamo.cached_tokens": 0})
        tracing.emit("engine.decode", inner, t, t, {"dynamo.output_tokens": 32})
        tracing.end(span, attributes={"dynamo.output_tokens": 32, "dynamo.status": "ok"})

    assert base.trace is None
    results = []
    for part in ("frontend", "worker"):
        tracing.setup(config)  # type: ignore[arg-type]
        for _ in range(100):
            worker(frontend())
        start = time.process_time()
        for _ in range(n):
            if part == "frontend":
                frontend()
            else:
                worker(client)
            if _ % 100 == 99:
                tracing.flush()  # the exporter's queue holds 2048 spans: none may be dropped
        tracing.shutdown()  # exports what is still batched: counted
        results.append((time.process_time() - start) / n * 1e6)
    return results[0], results[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_load_args(parser)
    parser.set_defaults(tokenizer=str(REPO / "models" / "dynamo-tiny"), model=SERVED_MODEL)
    parser.add_argument("--levels", default="1,16", help="concurrency levels")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per level")
    parser.add_argument("--duration-s", type=float, default=8.0, help="measured seconds per run (c > 1)")
    parser.add_argument("--c1-requests", type=int, default=200, help="requests per run at concurrency 1")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--speedup-ratio", type=float, default=1_000_000)
    parser.add_argument("--router-mode", default="round-robin")
    parser.add_argument("--our-log-level", default="WARNING")
    parser.add_argument("--ready-timeout-s", type=float, default=120.0)
    parser.add_argument("--out-dir", default=str(REPO / "benchmarks" / "results"))
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    log_dir = Path(tempfile.mkdtemp(prefix="tracing-overhead-"))
    print(f"logs in {log_dir}", flush=True)

    print(f"off path: {off_path_ns():.0f} ns per request", flush=True)

    sink_port = free_port()
    sink = ThreadingHTTPServer(("127.0.0.1", sink_port), _Sink)
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    from dynamo.tracing import TracingConfig

    for label, tracing_config in (
        ("file", TracingConfig(trace_file=str(log_dir / "in-process.jsonl"))),
        ("otlp", TracingConfig(otlp_endpoint=f"http://127.0.0.1:{sink_port}")),
    ):
        fe_us, wk_us = on_path_us(tracing_config)
        print(f"in process, {label}: frontend spans {fe_us:.0f} us, worker spans {wk_us:.0f} us CPU per request", flush=True)
    configs = {
        "off": {},
        "file": {"DYN_TRACE_FILE": str(log_dir / "spans.jsonl")},
        "otlp": {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{sink_port}"},
        # Production-like: one request in ten recorded; the others carry nothing downstream.
        "otlp-10%": {
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{sink_port}",
            "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
            "OTEL_TRACES_SAMPLER_ARG": "0.1",
        },
    }
    stacks: list[Stack] = []
    rows: list[dict[str, object]] = []
    try:
        for name, env in configs.items():
            stacks.append(start_ours(args, log_dir, "tcp", extra_env=env, name=name))
        for stack in stacks:
            stack.wait_ready(args.ready_timeout_s)
        for c in levels:
            for r in range(args.rounds):
                order = stacks if r % 2 == 0 else list(reversed(stacks))
                for stack in order:
                    config = config_from_args(
                        args, url=stack.base_url, concurrency=c,
                        num_requests=args.c1_requests if c == 1 else None,
                        duration_s=None if c == 1 else args.duration_s,
                    )  # fmt: skip
                    row = measure(stack, config)
                    req_s = float(row["req_per_s"])  # type: ignore[arg-type]
                    by_process = row["stack_cpu_cores_by_process"]
                    assert isinstance(by_process, dict)
                    workers = sum(v for k, v in by_process.items() if k.startswith("worker"))
                    row["worker_cpu_ms_per_req"] = round(1000 * workers / req_s, 3) if req_s else None
                    row["round"] = r
                    rows.append(row)
                    print(
                        f"{stack.name:>8} c={c} round {r}: {row['req_per_s']} req/s, TTFT p50 "
                        f"{row['ttft_ms']['p50']:.2f} ms, frontend {row['frontend_cpu_ms_per_req']} ms/req, "  # type: ignore[index]
                        f"worker {row['worker_cpu_ms_per_req']} ms/req, errors {row['requests_failed']}",
                        flush=True,
                    )
    finally:
        for stack in stacks:
            stack.stop()
        sink.shutdown()
    print(f"OTLP sink received {_Sink.received} exports", flush=True)

    lines = [
        "| tracing | conc | req/s | TTFT p50 ms | TTFT p99 ms | frontend CPU ms/req | vs off | worker CPU ms/req | vs off |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    summary: dict[tuple[str, int], dict[str, float]] = {}
    for c in levels:
        for name in configs:
            runs = [r for r in rows if r["stack"] == name and r["concurrency"] == c]
            med = {
                key: statistics.median(float(x[key]) for x in runs)  # type: ignore[arg-type]
                for key in ("req_per_s", "frontend_cpu_ms_per_req", "worker_cpu_ms_per_req")
            }
            med["ttft_p50"] = statistics.median(float(x["ttft_ms"]["p50"]) for x in runs)  # type: ignore[index]
            med["ttft_p99"] = statistics.median(float(x["ttft_ms"]["p99"]) for x in runs)  # type: ignore[index]
            summary[(name, c)] = med
            off = summary[("off", c)]
            fe = med["frontend_cpu_ms_per_req"] - off["frontend_cpu_ms_per_req"]
            wk = med["worker_cpu_ms_per_req"] - off["worker_cpu_ms_per_req"]
            lines.append(
                f"| {name} | {c} | {med['req_per_s']:.1f} | {med['ttft_p50']:.2f} | {med['ttft_p99']:.2f} "
                f"| {med['frontend_cpu_ms_per_req']:.3f} | {fe:+.3f} | {med['worker_cpu_ms_per_req']:.3f} | {wk:+.3f} |"
            )
    table = "\n".join(lines) + "\n"
    print(table)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (out / f"tracing_overhead-{stamp}.json").write_text(json.dumps(rows, indent=1))
    (out / f"tracing_overhead-{stamp}.md").write_text(table)


if __name__ == "__main__":
    main()
