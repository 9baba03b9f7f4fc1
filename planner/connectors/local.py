"""The local connector: runs `python -m dynamo.worker` processes on this host, one per replica.

Scaling down picks the worker with the least work in flight (read from its own /metrics page,
`dynamo_worker_inflight_requests`) and sends it SIGTERM: the worker deregisters first, so no
new request reaches it, lets its streams finish within its --graceful-shutdown-timeout-s, and
the frontend migrates any still running after that. A worker that outlives
--worker-stop-timeout-s is killed."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import httpx

from dynamo.tasks import TaskSet
from planner.config import Role

log = logging.getLogger(__name__)

INFLIGHT = "dynamo_worker_inflight_requests"


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def inflight_on_page(text: str) -> float:
    """Requests in flight on a worker's /metrics page (every model's series summed)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(INFLIGHT) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


@dataclass(slots=True)
class LocalWorker:
    role: Role
    process: asyncio.subprocess.Process
    system_port: int
    started_s: float

    @property
    def alive(self) -> bool:
        return self.process.returncode is None


class LocalConnector:
    def __init__(
        self,
        worker_args: Mapping[Role, Sequence[str]],
        stop_timeout_s: float,
        host: str = "127.0.0.1",
        env: Mapping[str, str] | None = None,
    ) -> None:
        self._args = {role: tuple(args) for role, args in worker_args.items()}
        self._stop_timeout_s = stop_timeout_s
        self._host = host
        self._env = dict(env) if env is not None else None
        self._workers: dict[Role, list[LocalWorker]] = {"aggregated": [], "prefill": [], "decode": []}
        self._stopping = TaskSet("local worker stop", log=log)
        self._http = httpx.AsyncClient(timeout=1.0)

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        """Drain every worker (SIGTERM) and wait for them, bounded."""
        for workers in self._workers.values():
            for w in workers:
                self._stop(w)
            workers.clear()
        await self._stopping.wait_all()
        await self._http.aclose()

    def workers(self, role: Role) -> list[LocalWorker]:
        """This role's live workers (a worker that exited by itself is dropped here)."""
        live = []
        for w in self._workers[role]:
            if w.alive:
                live.append(w)
            else:
                log.warning("local %s worker pid %d exited by itself (code %s)", role, w.process.pid, w.process.returncode)
        self._workers[role] = live
        return live

    async def replicas(self) -> dict[Role, int]:
        return {role: len(self.workers(role)) for role in self._workers}

    async def scale(self, role: Role, replicas: int) -> None:
        workers = self.workers(role)
        while len(workers) < replicas:
            workers.append(await self._launch(role))
        if len(workers) > replicas:
            loads = await asyncio.gather(*(self._inflight(w) for w in workers))
            ranked = sorted(zip(loads, range(len(workers))), key=lambda x: (x[0], -x[1]))
            remove = {i for _, i in ranked[: len(workers) - replicas]}
            for i in sorted(remove):
                log.info("local: draining %s worker pid %d (%g requests in flight)", role, workers[i].process.pid, loads[i])
                self._stop(workers[i])
            self._workers[role] = [w for i, w in enumerate(workers) if i not in remove]

    async def _launch(self, role: Role) -> LocalWorker:
        port = _free_port(self._host)
        args = [*self._args.get(role, ()), "--system-port", str(port), "--system-host", self._host]
        if role != "aggregated" and "--role" not in args:
            args += ["--role", role]
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "dynamo.worker", *args, env=self._env, stdin=asyncio.subprocess.DEVNULL
        )
        log.info("local: started %s worker pid %d (system port %d)", role, process.pid, port)
        return LocalWorker(role, process, port, time.monotonic())

    async def _inflight(self, worker: LocalWorker) -> float:
        """A worker whose page cannot be read yet (still starting) has nothing in flight."""
        try:
            page = await self._http.get(f"http://{self._host}:{worker.system_port}/metrics")
            return inflight_on_page(page.text)
        except httpx.HTTPError:
            return 0.0

    def _stop(self, worker: LocalWorker) -> None:
        if worker.alive:
            worker.process.send_signal(signal.SIGTERM)
        self._stopping.spawn(self._reap(worker))

    async def _reap(self, worker: LocalWorker) -> None:
        try:
            await asyncio.wait_for(worker.process.wait(), self._stop_timeout_s)
        except TimeoutError:
            log.warning("local: worker pid %d still running %.0fs after SIGTERM; killing it", worker.process.pid, self._stop_timeout_s)
            worker.process.kill()
            await worker.process.wait()
        log.info("local: %s worker pid %d exited (code %s)", worker.role, worker.process.pid, worker.process.returncode)
