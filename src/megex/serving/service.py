"""One model behind the ledger: the request path that both protocols share.

A request is authorised (API key, rate limit), its body read within a size limit, parsed by
the protocol's parser, charged to the key's account in the SQLite ledger (or answered from a
stored response when it repeats an idempotent request), answered by the
:class:`~megex.oracle.Responder`, rendered by the protocol's renderer, and refunded if any
of that fails.
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from fastapi import Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from ..explain import Explanation, parse_target
from ..ledger import BudgetExceeded
from ..oracle import Answer, ExplanationNotOffered, InvalidQuery, Responder, validate_images
from ..sqlite_ledger import (
    Account,
    IdempotencyConflict,
    SQLiteLedger,
    StoredResponse,
    Unauthorized,
)
from ..victim import Victim
from .codec import WireError

__all__ = [
    "HTTPError",
    "Parsed",
    "RateLimiter",
    "Service",
    "default_model_name",
    "explanation_from_parameters",
    "read_body",
    "validated_images",
]

Renderer = Callable[[Answer, "Parsed"], tuple[bytes, str, dict[str, str]]]

# Vertex AI's names for explanation settings -> megex's.
_ALIASES = {
    "noiseSigma": "sigma",
    "noisySampleCount": "samples",
    "stepCount": "steps",
    "explanation_method": "method",
    "explanation_target": "target",
    "explanation_output": "output",
}
_EXPLANATION_KEYS = {"method", "target", "output", "sigma", "samples", "steps", "baseline"}


class HTTPError(Exception):
    """A request the server refuses: status, a one-line message, a machine-readable code."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str = "invalid_request",
        headers: Mapping[str, str] | None = None,
        **extra: Any,
    ):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers = dict(headers or {})
        self.extra = extra


def bad_request(message: str, code: str = "invalid_request") -> HTTPError:
    return HTTPError(400, message, code)


# --- what a request asks for ------------------------------------------------------------


@dataclass
class Parsed:
    """A request reduced to what the service needs, plus what its renderer needs."""

    images: torch.Tensor
    explanation: Explanation | bool | None
    outputs: list[tuple[str, bool]] = field(default_factory=list)  # V2: (name, binary)
    request_id: str | None = None


def validated_images(arr: np.ndarray, input_shape: Sequence[int], what: str) -> torch.Tensor:
    """`arr` as images the model takes, or WireError."""
    try:
        return validate_images(torch.from_numpy(arr), input_shape, name=what)
    except InvalidQuery as err:
        raise WireError(str(err), "invalid_images") from None


def explanation_from_parameters(
    parameters: Mapping[str, Any],
    default: Explanation | None,
    ignore: Iterable[str] = (),
) -> Explanation | bool:
    """The explanation that request `parameters` ask for: True (the server's own) when they
    set nothing, else an Explanation built over the server's defaults. Raises HTTPError 400
    for unknown keys or values."""
    settings: dict[str, Any] = {}
    ignored = set(ignore)
    for key, value in parameters.items():
        if key in ignored or key.startswith("triton_"):
            continue
        name = _ALIASES.get(key, key)
        if name not in _EXPLANATION_KEYS:
            known = sorted(_EXPLANATION_KEYS | set(_ALIASES))
            raise bad_request(f"parameters: unknown {key!r}; known: {', '.join(known)}")
        settings[name] = value
    if not settings:
        return True
    base = default or Explanation()
    method = settings.pop("method", base.method)
    target = settings.pop("target", base.target)
    output = settings.pop("output", base.output)
    params = dict(base.params) if method == base.method else {}
    params.update(settings)
    try:
        return Explanation(method, target=parse_target(target), output=output, **params)
    except (ValueError, TypeError, OverflowError) as err:
        raise bad_request(str(err), "invalid_explanation") from None


def default_model_name(victim: Victim) -> str:
    """The name in URLs: "<dataset>-<arch>" when both are known, else "victim"."""
    if victim.dataset and victim.arch:
        return f"{victim.dataset}-{victim.arch}"
    return "victim"


# --- access -----------------------------------------------------------------------------


class RateLimiter:
    """A token bucket per key: `rate` requests per second, bursts of up to `burst`."""

    def __init__(self, rate: float, burst: float | None = None):
        if not rate > 0:
            raise ValueError(f"rate limit: expected > 0 requests/s, got {rate}")
        self.rate = float(rate)
        self.burst = float(burst) if burst is not None else max(1.0, self.rate)
        self._buckets: dict[int, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def acquire(self, account_id: int) -> float:
        """Take one token; returns 0 if granted, else the seconds to wait for one."""
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(account_id, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            if tokens >= 1.0:
                self._buckets[account_id] = (tokens - 1.0, now)
                return 0.0
            self._buckets[account_id] = (tokens, now)
            return (1.0 - tokens) / self.rate


# --- the service ------------------------------------------------------------------------


class Service:
    """One model behind the ledger: authorises, charges, answers, renders."""

    def __init__(
        self,
        responder: Responder,
        name: str,
        ledger: SQLiteLedger,
        limiter: RateLimiter | None,
        max_body_bytes: int,
        audit_images: bool,
    ):
        self.responder, self.name, self.ledger, self.limiter = responder, name, ledger, limiter
        self.max_body_bytes = int(max_body_bytes)
        self.audit_images = audit_images
        names = ["probabilities", "labels"]
        if responder.prediction == "logits":
            names.append("logits")
        if responder.explanation is not None:
            names.append("explanation")
        self.output_names = names

    def check_model(self, name: str, version: str | None = None) -> None:
        if name != self.name or version not in (None, "1"):
            what = f"model {name!r}" + (f" version {version!r}" if version else "")
            raise HTTPError(
                404,
                f"{what} not found; this server serves {self.name!r} (version 1)",
                "model_not_found",
            )

    def authorize(self, headers: Mapping[str, str]) -> Account:
        key = headers.get("x-api-key")
        auth = headers.get("authorization")
        if key is None and auth:
            scheme, _, token = auth.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise HTTPError(
                    401,
                    "Authorization: expected 'Bearer KEY'",
                    "unauthorized",
                    {"WWW-Authenticate": "Bearer"},
                )
            key = token.strip()
        try:
            account = self.ledger.authenticate(key)
        except Unauthorized as err:
            raise HTTPError(401, str(err), "unauthorized", {"WWW-Authenticate": "Bearer"}) from None
        if self.limiter is not None:
            wait = self.limiter.acquire(account.id)
            if wait > 0:
                headers_out = {
                    "Retry-After": str(max(1, math.ceil(wait))),
                    **self.ledger.usage(account.id).headers(),
                }
                raise HTTPError(
                    429,
                    f"rate limit: at most {self.limiter.rate:g} requests/s per key; "
                    f"retry in {wait:.2f} s",
                    "rate_limited",
                    headers_out,
                    retry_after_s=round(wait, 3),
                )
        return account

    async def serve(
        self,
        request: Request,
        endpoint: str,
        parse: Callable[[bytes], Parsed],
        render: Renderer,
    ) -> Response:
        """The whole request path; every refusal after authorisation carries the quota."""
        account = await run_in_threadpool(self.authorize, request.headers)
        try:
            body = await read_body(request, self.max_body_bytes)
            return await run_in_threadpool(
                self.execute, account, endpoint, request.headers, body, parse, render
            )
        except HTTPError as err:
            usage = await run_in_threadpool(self.ledger.usage, account.id)
            err.headers = {**usage.headers(), **err.headers}
            raise

    async def authorized_json(self, request: Request, doc: Any) -> JSONResponse:
        """`doc` for a caller with a key, with the key's quota headers."""
        account = await run_in_threadpool(self.authorize, request.headers)
        usage = await run_in_threadpool(self.ledger.usage, account.id)
        return JSONResponse(doc, headers=usage.headers())

    def execute(
        self,
        account: Account,
        endpoint: str,
        headers: Mapping[str, str],
        body: bytes,
        parse: Callable[[bytes], Parsed],
        render: Renderer,
    ) -> Response:
        """Parse, charge (or replay), answer, render; refund if answering fails."""
        try:
            parsed = parse(body)
        except WireError as err:
            raise bad_request(str(err), err.code) from None
        try:
            spec = self.responder.resolve_explanation(parsed.explanation)
        except ExplanationNotOffered as err:
            raise HTTPError(403, str(err), "explanation_not_offered") from None
        n = int(parsed.images.shape[0])
        idem_key = headers.get("idempotency-key")
        if idem_key is not None and not 0 < len(idem_key) <= 255:
            raise bad_request("Idempotency-Key: expected 1 to 255 characters")
        body_hash = ""
        if idem_key is not None:
            # A replay must answer the same request: bind the key to endpoint and body.
            digest = hashlib.sha256(endpoint.encode() + b"\0")
            digest.update(headers.get("inference-header-content-length", "").encode() + b"\0")
            digest.update(body)
            body_hash = digest.hexdigest()
        images = parsed.images.numpy().astype("<f4").tobytes() if self.audit_images else None
        try:
            charge = self.ledger.charge(
                account.id,
                n,
                endpoint,
                idem_key=idem_key,
                body_hash=body_hash,
                images=images,
            )
        except BudgetExceeded as err:
            raise HTTPError(
                429,
                str(err),
                "budget_exceeded",
                err.usage.headers(),
                requested=n,
                **err.usage.to_dict(),
            ) from None
        except IdempotencyConflict as err:
            raise HTTPError(err.status, str(err), "idempotency_conflict") from None
        if isinstance(charge, StoredResponse):
            return self._replay(account, charge)
        try:
            answer = self.responder.answer(parsed.images, spec)
            content, content_type, extra = render(answer, parsed)
            # Storing the response for replays is part of serving it: if that fails, the
            # client gets an error, so the charge is given back and a retry runs afresh
            # (instead of meeting a request "still being served" until the row expires).
            self.ledger.finish(charge, 200, content_type, content, extra)
        except BaseException:
            self.ledger.refund(charge)
            raise
        return Response(content, 200, {**extra, **charge.usage.headers()}, content_type)

    def _replay(self, account: Account, stored: StoredResponse) -> Response:
        headers = {
            **stored.headers,
            **self.ledger.usage(account.id).headers(),
            "Idempotent-Replayed": "true",
        }
        return Response(stored.body, stored.status, headers, stored.content_type)


# --- the body ---------------------------------------------------------------------------


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, decompressed, refused with 413 past `limit` bytes."""
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise bad_request("Content-Length: not a number")
        if int(length) > limit:
            await _drain(request, limit)
            raise _too_large(limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            await _drain(request, limit)
            raise _too_large(limit)
        chunks.append(chunk)
    body = b"".join(chunks)
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
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


async def _drain(request: Request, limit: int) -> None:
    """Read and drop a little more of an oversized body, so the client can read the 413
    instead of finding its connection reset mid-upload."""
    dropped = 0
    try:
        async for chunk in request.stream():
            dropped += len(chunk)
            if dropped > max(limit, 8 << 20):
                break
    except Exception:  # the client went away or the body was already read: nothing to do
        pass
