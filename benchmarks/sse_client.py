"""Streaming HTTP clients for the load generator: a minimal keep-alive HTTP/1.1 client on
asyncio streams (and an httpx one to compare with), and the SSE parser that turns one streamed
OpenAI response into TTFT, per-chunk gaps and token counts."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import socket
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field

try:  # msgspec decodes the per-chunk JSON several times faster than json; optional
    import msgspec

    _decode_json: Callable[[bytes], object] = msgspec.json.decode
except ImportError:  # pragma: no cover - depends on the environment
    _decode_json = json.loads


@dataclass
class RequestResult:
    ok: bool
    start_s: float  # time.monotonic() at send
    end_s: float
    ttft_s: float = math.nan
    itl_s: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0  # usage.prompt_tokens_details.cached_tokens: the engine's prefix hits
    content_chunks: int = 0
    empty_chunks: int = 0  # chunks with "" text and no finish_reason (not counted as content)
    error: str = ""


# ---------------------------------------------------------------- HTTP clients


class RawConnection:
    """One keep-alive HTTP/1.1 connection on asyncio streams: the cheapest client in CPU per
    chunk, so that the load generator is not what limits a fast server."""

    def __init__(self, host: str, port: int, quickack: bool, headers: dict[str, str] | None = None) -> None:
        self.host, self.port = host, port
        # Extra request headers (an API key: benchmarks/tenant_fairness.py's tenants).
        self.extra_headers = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        self.quickack = quickack and hasattr(socket, "TCP_QUICKACK")
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.sock: socket.socket | None = None

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.reader = self.writer = None

    async def post_stream(self, path: str, body: bytes) -> AsyncGenerator[tuple[int, bytes], None]:
        """Yields (status, body piece) as pieces arrive; the status repeats on every piece."""
        if self.writer is None or self.writer.is_closing():
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port, limit=1 << 20)
            self.sock = self.writer.get_extra_info("socket") if self.quickack else None
        reader, writer = self.reader, self.writer
        sock = self.sock
        assert reader is not None
        writer.write(
            (
                f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                f"Content-Type: application/json\r\nAccept: text/event-stream\r\n{self.extra_headers}"
                f"Content-Length: {len(body)}\r\n\r\n"
            ).encode()
            + body
        )
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split(" ", 2)[1])
            headers = {}
            for line in lines[1:]:
                if ":" in line:
                    k, v = line.split(":", 1)
                    headers[k.strip().lower()] = v.strip().lower()
            keep_alive = headers.get("connection") != "close"
            if headers.get("transfer-encoding") == "chunked":
                while True:
                    size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0], 16)
                    if size == 0:
                        await reader.readuntil(b"\r\n")  # no trailers are expected
                        break
                    piece = await reader.readexactly(size + 2)
                    if sock is not None:
                        # A server that leaves Nagle on (hyper does by default) holds each small
                        # SSE chunk until the previous one is ACKed; Linux delays ACKs on a
                        # keep-alive connection by up to 40 ms. Re-arming quick-ACK after each
                        # read keeps that client-side artifact out of TTFT and ITL.
                        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
                    yield status, piece[:-2]
            elif "content-length" in headers:
                yield status, await reader.readexactly(int(headers["content-length"]))
            else:
                keep_alive = False
                while piece := await reader.read(65536):
                    yield status, piece
        except BaseException:
            await self.close()  # a half-read response leaves the connection unusable
            raise
        if not keep_alive:
            await self.close()


class HttpxConnection:
    """The same interface over a shared httpx.AsyncClient (for comparison with the raw client)."""

    def __init__(self, client: object) -> None:
        self.client = client

    async def close(self) -> None:
        pass

    async def post_stream(self, path: str, body: bytes) -> AsyncGenerator[tuple[int, bytes], None]:
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        async with self.client.stream("POST", path, content=body, headers=headers) as resp:  # type: ignore[attr-defined]
            async for piece in resp.aiter_raw():
                yield resp.status_code, piece


# ---------------------------------------------------------------- one request


class StreamParser:
    """Turns the pieces of one SSE response into a RequestResult: TTFT, per-chunk gaps, usage."""

    def __init__(self, result: RequestResult, chat: bool, t0: float) -> None:
        self.result, self.chat, self.t0 = result, chat, t0
        self.buf = b""
        self.last_chunk_t = 0.0
        self.done = False

    def feed(self, piece: bytes, now: float) -> None:
        buf = self.buf + piece
        if b"\r" in buf:  # servers differ in SSE line endings; work on \n only
            buf = buf.replace(b"\r\n", b"\n")
        while (cut := buf.find(b"\n\n")) >= 0:
            event, buf = buf[:cut], buf[cut + 2 :]
            for line in event.split(b"\n"):
                if line.startswith(b"data:"):
                    self._data(line[5:].strip(), now)
        self.buf = buf

    def _data(self, data: bytes, now: float) -> None:
        result = self.result
        if data == b"[DONE]":
            self.done = True
            return
        msg = _decode_json(data)
        if not isinstance(msg, dict):
            return
        if "error" in msg:
            result.error = f"stream error: {str(msg['error'])[:200]}"
            return
        usage = msg.get("usage")
        if usage:
            result.output_tokens = usage.get("completion_tokens") or 0
            result.prompt_tokens = usage.get("prompt_tokens") or 0
            details = usage.get("prompt_tokens_details")
            if isinstance(details, dict):
                result.cached_tokens = details.get("cached_tokens") or 0
        choices = msg.get("choices")
        if not choices:
            return
        choice = choices[0]
        text = (choice.get("delta") or {}).get("content") if self.chat else choice.get("text")
        if not text:
            # A role-only first chunk, a finish-only chunk, or a token whose text is held back
            # (an incomplete UTF-8 character): as in vLLM's benchmark, time runs to text.
            if text == "" and not choice.get("finish_reason"):
                result.empty_chunks += 1
            return
        if result.content_chunks == 0:
            result.ttft_s = now - self.t0
        else:
            result.itl_s.append(now - self.last_chunk_t)
        self.last_chunk_t = now
        result.content_chunks += 1


async def one_request(
    conn: RawConnection | HttpxConnection, path: str, body: bytes, chat: bool, timeout_s: float
) -> RequestResult:
    start = time.monotonic()
    result = RequestResult(ok=False, start_s=start, end_s=start)
    parser = StreamParser(result, chat, time.perf_counter())
    status = 0
    error_body = b""
    try:
        # aclosing: a failure while parsing closes the stream (and so its connection) at once.
        async with asyncio.timeout(timeout_s), contextlib.aclosing(conn.post_stream(path, body)) as stream:
            async for status, piece in stream:
                if status != 200:
                    error_body += piece
                else:
                    parser.feed(piece, time.perf_counter())
        if error_body:
            result.error = f"HTTP {status}: {error_body[:200].decode(errors='replace')}"
        elif not parser.done and not result.error:
            result.error = "stream ended without [DONE]"
        elif result.content_chunks == 0 and not result.error:
            result.error = "no content chunks"
    except Exception as exc:  # noqa: BLE001 - every failure is counted and reported, none hidden
        result.error = f"{type(exc).__name__}: {exc}"[:200] or type(exc).__name__
    result.end_s = time.monotonic()
    if not result.output_tokens:
        result.output_tokens = result.content_chunks  # no usage block: one token per chunk
    result.ok = not result.error
    return result
