"""A do-nothing OpenAI-style streaming server (fixed SSE chunks, no tokenizer, no engine): the
floor that the load generator, TCP and the scheduler set for TTFT and ITL on this machine.

    python benchmarks/null_server.py --http-port 8000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket

MODELS = b'{"object":"list","data":[{"id":"tiny","object":"model","owned_by":"bench"}]}'


def _chunk(payload: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def _event(text: str, finish: str | None = None, usage: bool = False, tokens: int = 0) -> bytes:
    msg: dict[str, object] = {
        "id": "null",
        "object": "chat.completion.chunk",
        "model": "tiny",
        "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": finish}],
    }
    if usage:
        msg = {"id": "null", "object": "chat.completion.chunk", "model": "tiny", "choices": [],
               "usage": {"prompt_tokens": 0, "completion_tokens": tokens, "total_tokens": tokens}}  # fmt: skip
    return b"data: " + json.dumps(msg).encode() + b"\n\n"


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            length = 0
            for line in lines[1:]:
                if line.lower().startswith("content-length:"):
                    length = int(line.split(":", 1)[1])
            body = json.loads(await reader.readexactly(length)) if length else {}
            if lines[0].startswith("GET"):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(MODELS) + MODELS)
                continue
            n = int(body.get("max_tokens") or 16)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
            # One write per token, as a real server emits them, so the client sees n chunks.
            for i in range(n):
                writer.write(_chunk(_event(" tok", "length" if i == n - 1 else None)))
                await writer.drain()
            writer.write(_chunk(_event("", usage=True, tokens=n)) + _chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass  # the client closed its keep-alive connection
    finally:
        writer.close()


async def serve(port: int) -> None:
    server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--http-port", type=int, default=8000)
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.run(serve(args.http_port))
    except ImportError:
        asyncio.run(serve(args.http_port))


if __name__ == "__main__":
    main()
