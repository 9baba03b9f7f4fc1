"""A worker of `dynamo.serve --worker-processes` in a child process of its own.

In one process the frontend's HTTP path (SSE chunks, socket writes, detokenizing) and the
engine's step loop share one interpreter, so together they get one core: on an H100 the built-in
engine served 0.66 of its offline throughput over HTTP that way (benchmarks/RESULTS.md). With a
child per worker each gets its own, as vLLM's engine core and SGLang's scheduler run beside their
HTTP servers. The child reaches the parent's discovery and events through the hub
(dynamo/runtime/hub.py) and serves requests over direct TCP on loopback.

The parent side is `WorkerProcess`; the child side is this module's `main`. The parent hands the
child its parsed arguments and role on stdin (a length-prefixed pickle: both ends are this
program) and keeps stdin open: the child stops when it reads EOF, so a parent that dies, even
by SIGKILL, takes its children with it. The child says it is serving with one line on stdout;
when the parent serves /metrics, the child serves its own on loopback for the parent to merge.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import pickle
import signal
import struct
import sys
from dataclasses import dataclass

from dynamo.config import RuntimeConfig
from dynamo.entry import freeze_startup_objects, run
from dynamo.runtime.hub import LOOPBACK, HubDiscovery, hub_child_runtime
from dynamo.system_server import SystemServer
from workers.registry import engine_spec
from workers.worker import Worker, WorkerConfig

log = logging.getLogger(__name__)

# The child's one line to its parent once it serves: this, its instance id (hex) and the port
# of its loopback metrics page (0: none; the parent serves no system port).
READY_PREFIX = b"dynamo-worker-process-ready "
_LENGTH = struct.Struct(">Q")
# A child asked to stop drains its requests for --graceful-shutdown-timeout-s; this much more is
# left for it to close its engine before it is killed.
EXIT_GRACE_S = 10.0


@dataclass(frozen=True, slots=True)
class ChildSpec:
    args: argparse.Namespace
    role: WorkerConfig
    hub_address: str
    index: int


class WorkerExited(Exception):
    """A worker process ended while the parent still needed it."""


class WorkerProcess:
    """The parent's handle on one worker child."""

    def __init__(self, spec: ChildSpec) -> None:
        self.spec = spec
        self._proc: asyncio.subprocess.Process | None = None
        self._stdout_task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self.instance_id = 0
        self.metrics_port = 0

    @property
    def label(self) -> str:
        return f"worker process {self.spec.index} ({self.spec.role.role})"

    @property
    def running(self) -> bool:
        return self._ready.is_set() and self._proc is not None and self._proc.returncode is None

    async def start(self) -> None:
        """Start the child and return once it serves; WorkerExited if it ends before that."""
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "serve.worker_process", stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
        )
        assert self._proc.stdin is not None
        blob = pickle.dumps(self.spec)
        self._proc.stdin.write(_LENGTH.pack(len(blob)) + blob)
        await self._proc.stdin.drain()
        self._stdout_task = asyncio.create_task(self._relay_stdout(), name=f"{self.label} stdout")
        ready = asyncio.create_task(self._ready.wait())
        exited = asyncio.create_task(self._proc.wait())
        try:
            await asyncio.wait({ready, exited}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ready.cancel()
            exited.cancel()
        if not self._ready.is_set():
            await self.stop(0.0)
            raise WorkerExited(f"{self.label} exited with code {self._proc.returncode} before serving")
        log.info("%s serving (pid %d)", self.label, self._proc.pid)

    async def _relay_stdout(self) -> None:
        """Wait for the ready line; anything else the child prints goes to this stdout."""
        assert self._proc is not None and self._proc.stdout is not None
        async for line in self._proc.stdout:
            if line.startswith(READY_PREFIX) and not self._ready.is_set():
                instance, port = line[len(READY_PREFIX) :].split()
                self.instance_id, self.metrics_port = int(instance, 16), int(port)
                self._ready.set()
            else:
                sys.stdout.buffer.write(line)
                sys.stdout.flush()

    async def wait(self) -> int:
        """Until the child exits; its exit code."""
        assert self._proc is not None
        return await self._proc.wait()

    async def stop(self, drain_s: float) -> None:
        """Ask the child to drain and exit (SIGTERM); kill it if it has not within drain_s plus
        EXIT_GRACE_S."""
        proc = self._proc
        if proc is None:
            return
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), drain_s + EXIT_GRACE_S)
            except TimeoutError:
                log.warning("%s did not exit within %.0fs of SIGTERM; killing it", self.label, drain_s + EXIT_GRACE_S)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        if proc.stdin is not None:
            proc.stdin.close()
        if self._stdout_task is not None:
            await self._stdout_task  # ends at the child's EOF


# ----------------------------------------------------------------------------------- the child


def _read_spec() -> ChildSpec:
    """Read exactly the spec from stdin (fd 0 unbuffered: what follows is only its EOF)."""

    def read_exactly(n: int) -> bytes:
        data = bytearray()
        while len(data) < n:
            chunk = os.read(0, n - len(data))
            if not chunk:
                raise SystemExit("serve.worker_process is started by dynamo.serve --worker-processes")
            data += chunk
        return bytes(data)

    (length,) = _LENGTH.unpack(read_exactly(_LENGTH.size))
    spec = pickle.loads(read_exactly(length))
    assert isinstance(spec, ChildSpec)
    return spec


async def _until_told_to_stop(lost_hub: asyncio.Event) -> str:
    """SIGTERM from the parent, EOF on stdin (the parent is gone), or the hub lost."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    reason = ""

    def told(why: str) -> None:
        nonlocal reason
        reason = reason or why
        stop.set()

    loop.add_signal_handler(signal.SIGTERM, told, "SIGTERM")
    stdin = asyncio.StreamReader()
    transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), os.fdopen(0, "rb", 0))

    async def eof() -> None:
        while await stdin.read(1 << 12):
            pass
        told("the parent process is gone")

    async def hub() -> None:
        await lost_hub.wait()
        told("the hub is gone")

    watchers = [asyncio.create_task(eof()), asyncio.create_task(hub())]
    try:
        await stop.wait()
    finally:
        for task in watchers:
            task.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)
        transport.close()
        loop.remove_signal_handler(signal.SIGTERM)
    return reason


async def serve_child(spec: ChildSpec) -> None:
    args = spec.args
    config = RuntimeConfig.from_args(args)
    async with await hub_child_runtime(config, spec.hub_address) as runtime:
        engine = engine_spec(args.engine).create(argparse.Namespace(**{**vars(args), "role": spec.role.role}))
        async with Worker(runtime, engine, spec.role) as worker, contextlib.AsyncExitStack() as stack:
            metrics_port = 0
            if args.system_port:
                # The parent's /metrics scrapes this page (loopback, an ephemeral port) and
                # labels its samples with this worker's instance, as in one process.
                system = SystemServer(LOOPBACK, 0, worker.registry, worker.ready)
                metrics_port = (await stack.enter_async_context(system)).bound_port
            freeze_startup_objects()
            sys.stdout.buffer.write(READY_PREFIX + f"{worker.instance_id:x} {metrics_port}\n".encode())
            sys.stdout.flush()
            assert isinstance(runtime.discovery, HubDiscovery)
            reason = await _until_told_to_stop(runtime.discovery.lost)
            log.info("worker process %d stopping: %s", spec.index, reason)
            await worker.drain(args.graceful_shutdown_timeout_s)


def main() -> None:
    spec = _read_spec()
    # Ctrl-C in a terminal reaches the whole process group: the parent drains its HTTP server
    # first and then stops each child itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    run(lambda: serve_child(spec), spec.args)


if __name__ == "__main__":
    # Run as serve.worker_process, not __main__: the pickled ChildSpec names that module.
    from serve.worker_process import main as module_main

    module_main()
