"""Where a request's admission time goes, for benchmarks/kvbm_multiturn_gpu.py (run with its
arguments): per engine it builds (a config in a round, in creation order), the p50 of each
measured request's wait from Scheduler.add to the schedule() call that admitted it, and of that
call's duration, first turns and later turns apart; and the mean DiskStore.exists call (the disk
tier's neighbour probe, made on the event loop). Prints one `QPROBE {json}` line per engine.

    python benchmarks/kvbm_admission_probe.py --device cpu --model-size tiny --configs g1_only g1_g2small_g3

It patches the classes before the benchmark imports them, so it also times an older tree: run it
from that tree's root with that tree first on PYTHONPATH."""

from __future__ import annotations

import atexit
import collections
import json
import runpy
import sys
import time
from typing import Any

from workers.paged import scheduler as sched_mod

_engines: list[int] = []  # id(Scheduler), in creation order
_marks: dict[tuple[int, str], dict[str, float]] = collections.defaultdict(dict)
_exists = [0.0, 0]  # seconds, calls


def _patch() -> None:
    cls: Any = sched_mod.Scheduler
    add, schedule = cls.add, cls.schedule

    def timed_add(self: Any, seq: Any) -> Any:
        if id(self) not in _engines:
            _engines.append(id(self))
        _marks[(id(self), seq.request_id)]["add"] = time.perf_counter()
        return add(self, seq)

    def timed_schedule(self: Any) -> Any:
        started = time.perf_counter()
        batch = schedule(self)
        ended = time.perf_counter()
        for seq in batch.seqs:
            marks = _marks.get((id(self), seq.request_id))
            if marks is not None and "scheduled" not in marks:
                marks["scheduled"], marks["schedule_s"] = started, ended - started
        return batch

    cls.add, cls.schedule = timed_add, timed_schedule
    try:
        from kvbm import disk_tier
    except ImportError:
        return
    store: Any = disk_tier.DiskStore
    exists = store.exists

    def timed_exists(self: Any, block_hash: int) -> bool:
        t = time.perf_counter()
        try:
            return bool(exists(self, block_hash))
        finally:
            _exists[0] += time.perf_counter() - t
            _exists[1] += 1

    store.exists = timed_exists


def _p50(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2] if ordered else float("nan")


def _report() -> None:
    for index, engine in enumerate(_engines):
        split: dict[str, dict[str, list[float]]] = collections.defaultdict(lambda: collections.defaultdict(list))
        for (owner, rid), marks in _marks.items():
            if owner != engine or rid.startswith("warm") or "scheduled" not in marks:
                continue
            kind = "first" if rid.endswith("t0") else "later"
            split[kind]["wait"].append(1e3 * (marks["scheduled"] - marks["add"]))
            split[kind]["sched"].append(1e3 * marks["schedule_s"])
        row: dict[str, Any] = {"engine": index}
        for kind, parts in split.items():
            row[kind] = {name: round(_p50(v), 3) for name, v in parts.items()} | {"n": len(parts["wait"])}
        print("QPROBE", json.dumps(row))
    print("QPROBE exists us/call %.1f n %d" % (1e6 * _exists[0] / max(1, _exists[1]), _exists[1]))


if __name__ == "__main__":
    _patch()
    atexit.register(_report)
    sys.argv = ["benchmarks/kvbm_multiturn_gpu.py", *sys.argv[1:]]
    runpy.run_path("benchmarks/kvbm_multiturn_gpu.py", run_name="__main__")
