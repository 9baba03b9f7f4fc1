"""TaskSet: the background tasks a long-lived component owns. Every task it starts is kept
until it ends (so none is garbage-collected mid-flight or forgotten), a failure is logged with
the owner's words, and `cancel_all` cancels them and waits for them on the owner's exit."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

_log = logging.getLogger(__name__)


class TaskSet:
    def __init__(self, what: str, *, log: logging.Logger | None = None, level: int = logging.ERROR) -> None:
        """`what` names the tasks in the failure log line ("router task failed: ...");
        `log` and `level` are the owner's logger and how loud a failure is."""
        self._what = what
        self._log = log or _log
        self._level = level
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any], *, name: str | None = None) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._log.log(self._level, "%s failed", self._what, exc_info=task.exception())

    def __len__(self) -> int:
        return len(self._tasks)

    async def cancel_all(self) -> None:
        """Cancel every task and wait until all have ended (their errors are not raised)."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.difference_update(tasks)

    async def wait_all(self) -> None:
        """Wait until every task started so far has ended (their errors are not raised)."""
        tasks = list(self._tasks)
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.difference_update(tasks)
