"""Frames on a transfer connection: a 4-byte big-endian header length, a msgpack
TransferHeader, then `payload_bytes` of raw KV for data frames. Their kinds are the response
streams' own (dynamo.wire FRAME_DATA, FRAME_END: the sender wrote the blocks itself, FRAME_ERROR)."""

from __future__ import annotations

import asyncio
import struct

from dynamo.wire import TRANSFER_HEADER_CODEC, TransferHeader, encode

_LEN = struct.Struct(">I")
MAX_HEADER_BYTES = 1 << 16


def header_bytes(header: TransferHeader) -> bytes:
    body = encode(header)
    return _LEN.pack(len(body)) + body


async def read_header(reader: asyncio.StreamReader) -> TransferHeader:
    (length,) = _LEN.unpack(await reader.readexactly(_LEN.size))
    if length > MAX_HEADER_BYTES:
        raise ValueError(f"transfer header of {length} bytes: not a KV transfer peer")
    return TRANSFER_HEADER_CODEC.decode(await reader.readexactly(length))
