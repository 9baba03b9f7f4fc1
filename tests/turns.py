"""Waiting on the event loop's own work in unit tests: yield turns until a condition holds.

For conditions that tasks on this loop make true (a router consuming an event, an engine
finishing a step on the loop): bounded by turns, never by a timer, so a loaded machine makes
the wait slower, not shorter, and a condition that can never hold fails instead of hanging.
Conditions made true by other threads or processes need a bounded wait in time instead."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


async def until(condition: Callable[[], bool], max_turns: int = 20_000) -> None:
    for _ in range(max_turns):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"condition not reached in {max_turns} loop turns")
