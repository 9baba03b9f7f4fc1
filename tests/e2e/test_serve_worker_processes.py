"""`python -m dynamo.serve --worker-processes`: the frontend in the process a user starts, each
worker in a child process on that process's hub, no NATS or etcd. Requests reach the children,
the children's sockets stay on loopback, and the processes live and die together: a dead worker
stops the server, a dead server stops its workers, SIGTERM drains everything."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.e2e.procs import (
    LOOPBACK,
    Proc,
    Stack,
    base_env,
    free_port,
    http_ok,
    in_networks,
    listening_sockets,
    metric_samples,
    metric_sum,
    wait_ready,
    wait_until,
)

pytestmark = pytest.mark.e2e

MODEL = "dynamo-tiny"
EXIT_WAIT_S = 30.0


def children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


def alive(pid: int) -> bool:
    """Running, not a zombie waiting to be reaped."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def start(tmp: Path, *args: str) -> tuple[Proc, str]:
    stack = Stack(tmp, base_env(OMP_NUM_THREADS="1"))
    port = free_port()
    proc = stack.start("serve", "dynamo.serve", "--http-port", str(port), "--worker-processes", *args)
    base = f"http://{LOOPBACK}:{port}"
    wait_ready(proc, base, 120)
    return proc, base


@pytest.fixture
def system_port() -> int:
    return free_port()


@pytest.fixture
def server(tmp_path: Path, system_port: int) -> Iterator[tuple[Proc, str]]:
    proc, base = start(tmp_path, "--engine", "mocker", "--num-workers", "2", "--system-port", str(system_port))
    try:
        yield proc, base
    finally:
        proc.kill()
        for child in children(proc.popen.pid):
            os.kill(child, signal.SIGKILL)


def client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60)


def test_requests_reach_worker_processes_over_loopback(server: tuple[Proc, str]) -> None:
    proc, base = server
    workers = children(proc.popen.pid)
    assert len(workers) == 2, proc.log()
    messages = [{"role": "user", "content": "hello"}]
    reply = client(base).chat.completions.create(model=MODEL, messages=messages, max_tokens=8)  # type: ignore[arg-type]
    assert reply.usage is not None and reply.usage.completion_tokens == 8
    stream = client(base).completions.create(model=MODEL, prompt="hi", max_tokens=6, stream=True)
    assert sum(1 for chunk in stream if chunk.choices and chunk.choices[0].text) >= 1
    # The parent's hub and every child's request plane listen on loopback only.
    for pid in [proc.popen.pid, *workers]:
        listening = listening_sockets(pid)
        assert listening, f"pid {pid} listens on nothing"
        assert all(in_networks(host, []) for host, _ in listening), listening


def test_one_metrics_page_carries_every_worker_process(server: tuple[Proc, str], system_port: int) -> None:
    proc, base = server
    for _ in range(4):
        client(base).completions.create(model=MODEL, prompt="hi", max_tokens=5)
    page = f"http://{LOOPBACK}:{system_port}/metrics"
    # Each child's samples, labelled with its instance, beside the frontend's own.
    served = metric_samples(page, "dynamo_worker_output_tokens_total")
    assert served is not None, proc.log()
    instances = {key.split('worker_instance="')[1].split('"')[0] for key in served}
    assert len(instances) == 2, served
    assert sum(served.values()) == 20
    assert metric_sum(page, "dynamo_frontend_requests_total") is not None
    assert http_ok(f"http://{LOOPBACK}:{system_port}/ready")


def test_a_dead_worker_process_stops_the_server(server: tuple[Proc, str]) -> None:
    proc, _ = server
    first, second = children(proc.popen.pid)
    os.kill(first, signal.SIGKILL)
    assert proc.popen.wait(timeout=EXIT_WAIT_S) != 0
    assert "exited unexpectedly" in proc.log()
    wait_until(lambda: not alive(second), EXIT_WAIT_S, "the other worker process to exit")


def test_a_killed_server_takes_its_worker_processes_with_it(server: tuple[Proc, str]) -> None:
    proc, _ = server
    workers = children(proc.popen.pid)
    proc.popen.kill()
    proc.popen.wait(timeout=EXIT_WAIT_S)
    # Orphans now: each reads EOF on the stdin the server held open, and exits.
    for pid in workers:
        wait_until(lambda: not alive(pid), EXIT_WAIT_S, f"worker process {pid} to exit")  # noqa: B023


def test_sigterm_drains_and_exits_cleanly(server: tuple[Proc, str]) -> None:
    proc, base = server
    workers = children(proc.popen.pid)
    stream = client(base).completions.create(model=MODEL, prompt="hi", max_tokens=64, stream=True)
    proc.popen.send_signal(signal.SIGTERM)
    # The request in flight when the signal came still finishes.
    finishes = [c.choices[0].finish_reason for c in stream if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert proc.popen.wait(timeout=EXIT_WAIT_S) == 0, proc.log()
    assert not any(alive(pid) for pid in workers)
    assert "stopping: SIGTERM" in proc.log()


def test_a_second_signal_during_the_drain_exits_at_once(server: tuple[Proc, str]) -> None:
    """The first SIGINT drains (a long stream keeps it waiting); a second one ends the server
    at once with 130, saying so, without a KeyboardInterrupt traceback, and its worker
    processes follow it."""
    proc, base = server
    workers = children(proc.popen.pid)
    stream = client(base).completions.create(model=MODEL, prompt="hi", max_tokens=1500, stream=True)
    next(iter(stream))  # in flight
    proc.popen.send_signal(signal.SIGINT)
    wait_until(lambda: "SIGINT: draining" in proc.log(), EXIT_WAIT_S, "the server to start draining")
    proc.popen.send_signal(signal.SIGINT)
    assert proc.popen.wait(timeout=EXIT_WAIT_S) == 128 + signal.SIGINT, proc.log()
    log = proc.log()
    assert "SIGINT during the drain: exiting now" in log and "Traceback" not in log, log
    for pid in workers:
        wait_until(lambda: not alive(pid), EXIT_WAIT_S, f"worker process {pid} to exit")  # noqa: B023


def test_builtin_engine_in_worker_processes_answers_as_in_process(tmp_path: Path) -> None:
    """The same greedy completions from the built-in engine in the server, in a child, and
    disaggregated over two children (every prompt prefilled by the prefill child, its KV pulled
    by the decode child over loopback)."""
    prompts = ["The for statement", "def main():"]
    setups = {
        "one process": [],
        "worker process": ["--worker-processes"],
        "disaggregated": ["--worker-processes", "--num-prefill-workers", "1", "--disagg-min-prefill-tokens", "1",
                          "--log-level", "DEBUG"],
    }
    answers = {}
    for i, (name, extra) in enumerate(setups.items()):
        stack = Stack(tmp_path, base_env(OMP_NUM_THREADS="1"))
        port = free_port()
        proc = stack.start(f"serve{i}", "dynamo.serve", "--http-port", str(port), "--engine", "builtin", *extra)
        base = f"http://{LOOPBACK}:{port}"
        try:
            wait_ready(proc, base, 120)
            answers[name] = [
                client(base).completions.create(model=MODEL, prompt=p, max_tokens=10, temperature=0).choices[0].text
                for p in prompts
            ]
        finally:
            stack.stop_all()
        if name == "disaggregated":
            log = proc.log_path.read_text(errors="replace")
            assert log.count("prefilled on worker") >= len(prompts), proc.log()
            assert "over host" in log and "KV transfer agent on 127.0.0.1:" in log
    assert answers["worker process"] == answers["one process"]
    assert answers["disaggregated"] == answers["one process"]
    assert all(answers["one process"])


def test_a_worker_that_cannot_start_fails_the_server(tmp_path: Path) -> None:
    stack = Stack(tmp_path, base_env(OMP_NUM_THREADS="1"))
    proc = stack.start(
        "serve", "dynamo.serve", "--http-port", str(free_port()), "--worker-processes", "--engine", "builtin",
        "--model", str(tmp_path / "no-such-model"),
    )
    try:
        assert proc.popen.wait(timeout=120) != 0
    except subprocess.TimeoutExpired:
        stack.stop_all()
        raise
    assert "before serving" in proc.log()
