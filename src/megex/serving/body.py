"""Reading a request body within a size limit and a time limit, decompressing it within the
same size limit."""

from __future__ import annotations

import asyncio
import zlib

from fastapi import Request
from starlette.requests import ClientDisconnect

from .errors import HTTPError, bad_request

__all__ = ["drain", "read_body"]

# An oversized or refused body is read and dropped up to this much (within the time limit),
# so that the client reads the refusal instead of finding its connection reset mid-upload.
_DRAIN_BYTES = 8 * 1024 * 1024


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The request body, decompressed; 413 past `limit` bytes, 408 if it has not all
    arrived within `timeout_s` seconds."""
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise bad_request("Content-Length: not a number")
        if int(length) > limit:
            await drain(request, limit, timeout_s)
            raise _too_large(limit)
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    break
                chunks.append(chunk)
    except ClientDisconnect:
        raise bad_request("request body: the client disconnected before sending it all") from None
    except TimeoutError:
        raise HTTPError(
            408,
            f"request body: not received within {timeout_s:g} s",
            "body_timeout",
            {"Connection": "close"},
            body_timeout_s=timeout_s,
        ) from None
    if size > limit:
        await drain(request, limit, timeout_s)
        raise _too_large(limit)
    return _decompress(b"".join(chunks), request.headers.get("content-encoding"), limit)


def _decompress(body: bytes, content_encoding: str | None, limit: int) -> bytes:
    encoding = (content_encoding or "identity").strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "deflate"):
        raise HTTPError(
            415,
            f"Content-Encoding {encoding!r} not supported; use gzip or deflate",
            "unsupported_encoding",
        )
    # Bound the decompressed size too, so a small compressed body cannot expand without limit.
    inflater = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as err:
        raise bad_request(f"body: not valid {encoding} data ({err})") from None
    if len(out) > limit:
        raise _too_large(limit)
    if not inflater.eof:
        raise bad_request(f"body: truncated {encoding} data")
    return out


def _too_large(limit: int) -> HTTPError:
    return HTTPError(
        413,
        f"request body larger than {limit} bytes; send fewer images per request",
        "body_too_large",
        max_body_bytes=limit,
    )


async def drain(request: Request, limit: int, timeout_s: float) -> None:
    """Read and drop (part of) a body that will not be used; nothing is kept."""
    dropped = 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                dropped += len(chunk)
                if dropped > max(limit, _DRAIN_BYTES):
                    break
    except Exception:  # timed out, the client went away, or the body was already read
        pass
