"""CPU time of a process (and its descendants) read from /proc, to report how many cores a
server kept busy over a measurement window; also finds the process listening on a TCP port.

    python benchmarks/proc_cpu.py --port 8000 --seconds 10     # cores busy, sampled each second
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass
from pathlib import Path

CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int, tid: int | None = None) -> list[str]:
    raw = Path(f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat").read_text()
    # The command name (field 2) may contain spaces and parentheses: split after its last ')'.
    return raw[raw.rindex(")") + 2 :].split()


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of one process (all its threads)."""
    return _cpu_s(_stat_fields(pid))


def thread_cpu_s(pid: int, tid: int) -> float:
    """User + system CPU seconds of one thread of pid; a Python process's main thread (its
    event loop, for an asyncio server) has tid == pid."""
    return _cpu_s(_stat_fields(pid, tid))


def _cpu_s(fields: list[str]) -> float:
    # After the name: state is fields[0], so utime (stat field 14) is fields[11], stime fields[12].
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS_PER_S


def descendants(pid: int) -> list[int]:
    """Live descendants of pid (children, grandchildren, ...), from each process's ppid."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            ppid = int(_stat_fields(int(entry.name))[1])
        except (OSError, ValueError, IndexError):
            continue  # the process ended while we looked
        children.setdefault(ppid, []).append(int(entry.name))
    found: list[int] = []
    stack = [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def tree_cpu_s(pid: int) -> float:
    """CPU seconds of pid and its live descendants (a child that exited is not counted)."""
    total = 0.0
    for p in [pid, *descendants(pid)]:
        try:
            total += process_cpu_s(p)
        except OSError:
            pass  # ended between listing and reading: its time is lost either way
    return total


def pid_listening_on(port: int) -> int | None:
    """The pid holding a listening TCP socket on port (IPv4 or IPv6), or None."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            local, state, inode = cols[1], cols[3], cols[9]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                inodes.add(inode)
    if not inodes:
        return None
    targets = {f"socket:[{inode}]" for inode in inodes}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            for fd in os.scandir(f"/proc/{entry.name}/fd"):
                if os.readlink(fd.path) in targets:
                    return int(entry.name)
        except OSError:
            continue
    return None


@dataclass
class CpuWindow:
    """CPU use of a process tree between start() and stop()."""

    pid: int
    include_children: bool = True
    cpu_s: float = 0.0
    wall_s: float = 0.0
    _cpu0: float = 0.0
    _t0: float = 0.0

    def _read(self) -> float:
        return tree_cpu_s(self.pid) if self.include_children else process_cpu_s(self.pid)

    def start(self) -> None:
        self._cpu0 = self._read()
        self._t0 = time.monotonic()

    def stop(self) -> float:
        """Ends the window; returns the average number of cores busy over it."""
        self.cpu_s = self._read() - self._cpu0
        self.wall_s = time.monotonic() - self._t0
        return self.cores

    @property
    def cores(self) -> float:
        return self.cpu_s / self.wall_s if self.wall_s > 0 else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description="Sample a process's CPU use (cores busy).")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--pid", type=int)
    target.add_argument("--port", type=int, help="the process listening on this TCP port")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--interval-s", type=float, default=1.0)
    parser.add_argument("--no-children", action="store_true")
    args = parser.parse_args()
    pid = args.pid if args.pid is not None else pid_listening_on(args.port)
    if pid is None:
        raise SystemExit(f"nothing listens on port {args.port}")
    total = CpuWindow(pid, include_children=not args.no_children)
    total.start()
    deadline = time.monotonic() + args.seconds
    while time.monotonic() < deadline:
        window = CpuWindow(pid, include_children=not args.no_children)
        window.start()
        time.sleep(args.interval_s)
        print(f"pid {pid}: {window.stop():.2f} cores")
    print(f"pid {pid}: {total.stop():.2f} cores on average over {total.wall_s:.1f} s")


if __name__ == "__main__":
    main()
