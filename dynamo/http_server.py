"""uvicorn as a task on the caller's event loop, as the frontend's API server and the system
server run it: the entry point owns the signals, and a server that cannot listen fails its own
task instead of exiting the process."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator

import uvicorn


class LoopServer(uvicorn.Server):
    """uvicorn without its signal handlers, with an event for 'listening or failed' to
    synchronise on."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.startup_done = asyncio.Event()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        try:
            await super().startup(sockets)
        except SystemExit as exc:
            # uvicorn exits the process when it cannot bind; a SystemExit in a task would stop
            # the whole event loop, so it becomes an error of this server's task instead.
            raise OSError(f"HTTP server could not start (uvicorn exit {exc.code})") from None
        finally:
            self.startup_done.set()

    async def serve_in_task(self, task_name: str) -> asyncio.Task[None]:
        """Serves in a task named `task_name`, returned once the server listens or has failed
        to (`self.started` says which; a failed one's task ends with the error)."""
        task = asyncio.create_task(self.serve(), name=task_name)
        done = asyncio.create_task(self.startup_done.wait())
        await asyncio.wait({task, done}, return_when=asyncio.FIRST_COMPLETED)
        done.cancel()
        return task
