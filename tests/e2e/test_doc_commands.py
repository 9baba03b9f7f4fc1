"""Every documented local command, run as written: the shell code blocks of README.md and
docs/**/*.md, on the CPU, as real processes, 127.0.0.1 only, with bounded waits, everything
killed at the end of its page (or when a later block starts processes of its own).

A block is a command block when its first word is a command (`python`, `./scripts/run.sh`,
`curl`, `export`, ...); diagrams and formulas are not. A marker comment just before a block
says how to treat it:

    <!-- doc-test: skip (needs a GPU) -->        not run here (the reason is required)
    <!-- doc-test: needs nats etcd -->           run with NATS and etcd running, as the page says
    <!-- doc-test: skip page (needs docker) -->  (anywhere on the page) none of its blocks run

What "as written" allows itself: each documented port is mapped to a free port (the same
documented port, the same free port, throughout a page), `/tmp/etcd-data` to a temporary
directory, HOME to a temporary directory; servers get DYN_HTTP_HOST, DYN_SYSTEM_HOST,
DYN_REQUEST_PLANE_HOST and DYN_KV_TRANSFER_HOST = 127.0.0.1 and DYN_HTTP_PORT = the port that
stands for 8000, so that nothing listens beyond loopback and pages do not collide. Lines that
start a server (`./scripts/run.sh`, `python -m dynamo.serve|frontend|worker|router`,
`nats-server`, `etcd`, or ending in `&`) run in the background; `curl` lines wait (bounded)
until the frontend they address serves a model, or the URL answers, then must exit 0 without an
error body or error event in their output; `export` lines set the page's environment; other lines must exit 0.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = ROOT / ".venv" / "bin"
MARKER = re.compile(r"<!--\s*doc-test:\s*(.*?)\s*-->")
COMMANDS = {
    "python", "python3", "bash", "sh", "curl", "export", ".", "source", "cd", "pip", "docker",
    "kubectl", "helm", "az", "aws", "gcloud", "eksctl", "kustomize", "nats-server", "etcd",
}
SERVER = re.compile(r"^(\./scripts/run\.sh|python -m dynamo\.(serve|frontend|worker|router)|nats-server|etcd)\b")
PORT_PATTERNS = (r"(?<=:)(\d{4,5})\b", r"(?<=-port )(\d{4,5})\b", r"(?<=-p )(\d{4,5})\b")
# What each process logs once it serves: a block's processes must all get there (and stay up).
READY_LINES = {
    "./scripts/run.sh": "frontend listening on",
    "python -m dynamo.serve": "frontend listening on",
    "python -m dynamo.frontend": "frontend listening on",
    "python -m dynamo.worker": " serves ",
    "python -m dynamo.router": "router service serves",
}
START_TIMEOUT_S = 300.0  # run.sh runs scripts/setup.sh first; the built-in engine imports torch
CURL_TIMEOUT_S = 60.0


@dataclass
class Block:
    page: Path
    line: int
    lines: list[str]
    marker: str | None
    language: str = "indented"  # a fence's language, or "indented"

    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def code_blocks(page: Path) -> list[Block]:
    """Fenced and indented code blocks, each with the doc-test marker just before it."""
    lines = page.read_text().split("\n")
    blocks: list[Block] = []
    marker: str | None = None
    i = 0
    while i < len(lines):
        line = lines[i]
        found = MARKER.search(line)
        if found:
            marker = found.group(1)
        elif line.startswith("```"):
            end = i + 1
            while end < len(lines) and not lines[end].startswith("```"):
                end += 1
            blocks.append(Block(page, i + 1, lines[i + 1 : end], marker, line[3:].strip()))
            marker, i = None, end
        elif line.startswith("    ") and (i == 0 or not lines[i - 1].strip()):
            end = i
            while end < len(lines) and (
                lines[end].startswith("    ")
                or (not lines[end].strip() and end + 1 < len(lines) and lines[end + 1].startswith("    "))
            ):
                end += 1
            blocks.append(Block(page, i + 1, [x[4:] for x in lines[i:end]], marker))
            marker, i = None, end - 1
        elif line.strip():
            marker = None  # a marker applies to the block right after it
        i += 1
    return blocks


def commands(block: Block) -> list[str]:
    """The block's commands: continuation lines (a trailing backslash, or a quote still open)
    joined, blank lines and comments dropped."""
    out: list[str] = []
    current = ""
    for raw in block.lines:
        line = raw.rstrip()
        if current.endswith("\\"):
            current = current[:-1].rstrip() + " " + line.strip()
        elif current:
            current += "\n" + line  # inside a quoted string: the newline is part of it
        else:
            current = line.strip()
        if current.endswith("\\") or not _quotes_closed(current):
            continue
        if current and not current.startswith("#"):
            out.append(current)
        current = ""
    return out


def _quotes_closed(text: str) -> bool:
    try:
        shlex.split(text, comments=True)
    except ValueError:  # "No closing quotation"
        return False
    return True


SHELL_LANGUAGES = ("", "bash", "sh", "shell", "console", "indented")


def is_command_block(block: Block) -> bool:
    if block.language not in SHELL_LANGUAGES:
        return False  # a Python snippet, JSON, YAML...
    cmds = commands(block)
    if not cmds:
        return False
    first = cmds[0].split()[0]
    return (
        first in COMMANDS
        or first.startswith(("./", ".venv"))
        or re.match(r"^[A-Za-z_][A-Za-z0-9_]*=\S", first) is not None
    )


def doc_pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def page_skip(page: Path) -> str | None:
    found = re.search(r"<!--\s*doc-test:\s*skip page \((.+?)\)\s*-->", page.read_text())
    return found.group(1) if found else None


def pages_to_run() -> list[Path]:
    return [p for p in doc_pages() if not page_skip(p) and any(
        is_command_block(b) and not (b.marker or "").startswith("skip") for b in code_blocks(p)
    )]


def test_every_command_block_is_run_or_says_why_not() -> None:
    for page in doc_pages():
        for block in code_blocks(page):
            marker = block.marker or ""
            if marker:
                assert marker == "needs nats etcd" or re.fullmatch(r"skip \(.+\)", marker), (
                    f"{block.where()}: unknown doc-test marker {marker!r}"
                )
            if marker.startswith("skip") or page_skip(page):
                continue
            for cmd in commands(block) if is_command_block(block) else []:
                first = cmd.split()[0]
                assert first not in {"docker", "kubectl", "helm", "az", "aws", "gcloud", "eksctl"}, (
                    f"{block.where()}: `{first}` is not a local command: mark the block "
                    "<!-- doc-test: skip (why) -->"
                )
                assert "cuda" not in cmd, f"{block.where()}: needs a GPU: mark the block skip"


# ------------------------------------------------------------------------------------ running


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class Running:
    cmd: str
    popen: subprocess.Popen[bytes]
    log: Path

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


@dataclass
class Page:
    """One page's run: its environment, its port map and its background processes."""

    page: Path
    tmp: Path
    infra: tuple[str, str] | None = None  # NATS URL, etcd endpoint, for "needs nats etcd"
    env: dict[str, str] = field(default_factory=dict)
    ports: dict[int, int] = field(default_factory=dict)
    procs: list[Running] = field(default_factory=list)
    starting: list[tuple[Running, str]] = field(default_factory=list)  # (process, its ready line)
    count: int = 0

    def __post_init__(self) -> None:
        home = self.tmp / "home"
        home.mkdir(parents=True, exist_ok=True)
        self.env = dict(os.environ)
        for name in list(self.env):
            if name.startswith(("DYN_", "NATS_", "ETCD_")):
                del self.env[name]  # the page's own defaults, not the test run's
        self.env.update(
            PATH=f"{VENV_BIN}{os.pathsep}{self.env.get('PATH', '')}",
            VIRTUAL_ENV=str(ROOT / ".venv"),
            HOME=str(home),
            PYTHONUNBUFFERED="1",
            DYN_HTTP_HOST="127.0.0.1",
            DYN_SYSTEM_HOST="127.0.0.1",
            DYN_REQUEST_PLANE_HOST="127.0.0.1",
            DYN_KV_TRANSFER_HOST="127.0.0.1",
            DYN_NAMESPACE=f"doc{os.getpid()}{abs(hash(self.page.name)) % 10000}",
            DYN_HTTP_PORT=str(self.port(8000)),
        )

    def port(self, documented: int) -> int:
        if documented not in self.ports:
            self.ports[documented] = free_port()
        return self.ports[documented]

    def localize(self, cmd: str) -> str:
        for pattern in PORT_PATTERNS:
            cmd = re.sub(pattern, lambda m: str(self.port(int(m.group(1)))), cmd)
        return cmd.replace("/tmp/etcd-data", str(self.tmp / "etcd-data"))

    # ---------------------------------------------------------------------------- commands

    def run_block(self, block: Block) -> None:
        cmds = [self.localize(c) for c in commands(block)]
        if any(self.is_server(c) for c in cmds):
            self.stop_all()  # a block that starts processes is a scene of its own
            if block.marker == "needs nats etcd":
                assert self.infra is not None
                self.env["NATS_SERVER"], self.env["ETCD_ENDPOINTS"] = self.infra
        for cmd in cmds:
            self.run_one(cmd, block)
        self.wait_started()

    @staticmethod
    def is_server(cmd: str) -> bool:
        return bool(SERVER.match(cmd)) or cmd.endswith("&")

    def run_one(self, cmd: str, block: Block) -> None:
        where = f"{block.where()}: `{cmd}`"
        words = shlex.split(cmd, comments=True)
        if not words or words[0] in (".", "source"):
            return  # activating .venv: its bin is first on PATH already
        if words[0] == "export":
            for assignment in words[1:]:
                name, _, value = assignment.partition("=")
                self.env[name] = value
            return
        if self.is_server(cmd):
            self.start(cmd.rstrip("&").strip(), where)
        elif words[0] == "curl":
            self.curl(cmd, where)
        else:
            result = subprocess.run(["bash", "-c", cmd], cwd=ROOT, env=self.env, capture_output=True, timeout=120)
            assert result.returncode == 0, f"{where} exited {result.returncode}:\n{result.stdout[-2000:]!r}\n{result.stderr[-2000:]!r}"

    def start(self, cmd: str, where: str) -> None:
        self.count += 1
        log = self.tmp / f"proc{self.count}.log"
        with log.open("wb") as out:
            popen = subprocess.Popen(
                ["bash", "-c", f"exec {cmd}"],
                cwd=ROOT,
                env=dict(self.env),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: killed whole at the end
            )
        running = Running(where, popen, log)
        self.procs.append(running)
        for prefix, line in READY_LINES.items():
            if cmd.startswith(prefix):
                self.starting.append((running, line))
        # Infrastructure must listen before the processes after it connect.
        port = None
        if cmd.startswith("nats-server"):
            port = int(re.search(r"-p (\d+)", cmd).group(1)) if "-p " in cmd else 4222  # type: ignore[union-attr]
        elif cmd.startswith("etcd"):
            found = re.search(r"--listen-client-urls \S+:(\d+)", cmd)
            port = int(found.group(1)) if found else 2379
        if port is not None:
            self.wait(lambda: port_open(port), f"{where} listening on {port}")

    def wait_started(self) -> None:
        """Every process started so far logged that it serves (and none has exited)."""
        for proc, line in self.starting:
            self.wait(lambda: line in proc.log.read_text(errors="replace"), f"{proc.cmd} to log {line!r}")
        self.starting.clear()

    def curl(self, cmd: str, where: str) -> None:
        self.wait_started()
        url = re.search(r"(?:https?://)?(?:127\.0\.0\.1|localhost):(\d+)(/[^\s'\"]*)?", cmd)
        assert url is not None, f"{where}: a curl to something other than this host's loopback"
        base = f"http://127.0.0.1:{url.group(1)}"
        target = base + (url.group(2) or "/")
        self.wait(lambda: self.ready_for(base, target), f"{where}: {base} ready")
        result = subprocess.run(["bash", "-c", cmd], cwd=ROOT, env=self.env, capture_output=True, timeout=CURL_TIMEOUT_S)
        output = result.stdout.decode(errors="replace")
        assert result.returncode == 0 and output.strip(), f"{where} exited {result.returncode}: {output[-2000:]}{self.logs()}"
        # An error body (OpenAI's, Anthropic's) or an SSE error event; `"error": null` is fine.
        assert not re.search(r'"error"\s*:\s*[{"]', output), f"{where} answered an error: {output[-2000:]}{self.logs()}"

    @staticmethod
    def ready_for(base: str, target: str) -> bool:
        """A frontend (it answers /v1/models) is ready once it serves a model; any other
        server (a system port) once `target` answers at all."""
        try:
            models = httpx.get(base + "/v1/models", timeout=2.0)
            if models.status_code == 200:
                return bool(models.json().get("data"))
            return httpx.get(target, timeout=2.0).status_code < 500
        except (httpx.HTTPError, ValueError):
            return False

    def wait(self, condition: object, what: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            for proc in self.procs:
                if proc.popen.poll() is not None:
                    raise AssertionError(f"{proc.cmd} exited {proc.popen.returncode} (waiting for {what}):\n{proc.tail()}")
            if condition():  # type: ignore[operator]
                return
            time.sleep(0.2)
        raise AssertionError(f"timed out after {START_TIMEOUT_S:.0f}s waiting for {what}{self.logs()}")

    def logs(self) -> str:
        return "".join(f"\n--- {p.cmd}\n{p.tail()}" for p in self.procs)

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.popen.poll() is None:
                os.killpg(proc.popen.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.popen.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.popen.pid, signal.SIGKILL)
                proc.popen.wait(timeout=10)
        self.procs.clear()


@pytest.mark.timeout(1200)
@pytest.mark.parametrize("page", pages_to_run(), ids=lambda p: str(p.relative_to(ROOT)))
def test_doc_page_commands_run_as_written(page: Path, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    blocks = [b for b in code_blocks(page) if is_command_block(b) and not (b.marker or "").startswith("skip")]
    needs_infra = any(b.marker == "needs nats etcd" for b in blocks)
    infra = (request.getfixturevalue("nats_server"), request.getfixturevalue("etcd_server")) if needs_infra else None
    run = Page(page, tmp_path, infra=infra)
    try:
        for block in blocks:
            run.run_block(block)
    finally:
        run.stop_all()
