"""One model behind the ledger: the request path that both protocols share.

A request is authorised (API key, with wrong keys throttled per client address; request rate
per key) before anything about the model is said or its body is read. A key that has no query
left is refused before its body is read (unless it repeats an idempotent request, which is
answered from the stored response). The body is read within a size and a time limit, and
parsed by the protocol's parser, which refuses more images than the key can pay for as soon
as it knows their number (from a declared shape or the list of instances) and before it
decodes them. The request's compute is checked against the per-request and per-key limits;
then it is charged to the key's account in the SQLite ledger, answered by the
:class:`~megex.oracle.Responder` in chunks (keys take turns between chunks), rendered by the
protocol's renderer, and refunded if any of that fails. An answered request's images and the
victim's honest probabilities then go to the query monitors, if any (:mod:`.monitoring`),
which the client does not wait for.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
from collections.abc import Callable, Mapping
from typing import Any

import torch
from fastapi import Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from ..explain import Explanation
from ..ledger import BudgetExceeded, Charge, Usage
from ..oracle import Answer, ExplanationNotOffered, Responder
from ..sqlite_ledger import (
    Account,
    IdempotencyConflict,
    SQLiteLedger,
    StoredResponse,
    Unauthorized,
)
from .body import drain, read_body
from .codec import WireError
from .errors import HTTPError, bad_request, check_passes
from .limits import PARSE_SLOTS, Limits
from .monitoring import MonitorHub
from .parsing import Afford, Parsed
from .settings import DEFAULT_MODEL_NAME

__all__ = ["DEFAULT_MODEL_NAME", "HTTPError", "Parser", "Renderer", "Service"]

log = logging.getLogger("megex.server")


Parser = Callable[[bytes, Afford], Parsed]
Renderer = Callable[[Answer, Parsed], tuple[bytes, str, dict[str, str]]]


class Service:
    """One model behind the ledger: authorises, limits, charges, answers, renders."""

    def __init__(
        self,
        responder: Responder,
        name: str,
        ledger: SQLiteLedger,
        limits: Limits,
        audit_images: bool = False,
        expose_architecture: bool = False,
        monitors: MonitorHub | None = None,
    ):
        self.responder, self.name, self.ledger, self.limits = responder, name, ledger, limits
        self.audit_images = audit_images
        self.expose_architecture = expose_architecture
        self.monitors = monitors
        self.request_limiter = limits.request_limiter()
        self.compute_limiter = limits.compute_limiter()
        self.failed_keys = limits.failed_key_limiter()
        self._parse_slots = threading.BoundedSemaphore(PARSE_SLOTS)
        names = ["probabilities", "labels"]
        if responder.prediction == "logits":
            names.append("logits")
        if responder.explanation is not None:
            names.append("explanation")
        self.output_names = names

    # --- access -------------------------------------------------------------------------

    def check_model(self, name: str, version: str | None = None) -> None:
        """404 unless `name` (and `version`) is the model served; asked only of callers with
        a key, so the message may name it."""
        if name != self.name or version not in (None, "1"):
            what = f"model {name[:80]!r}" + (f" version {version[:20]!r}" if version else "")
            raise HTTPError(
                404,
                f"{what} not found; this server serves {self.name!r} (version 1)",
                "model_not_found",
            )

    def authorize(self, headers: Mapping[str, str], address: str) -> Account:
        """The caller's account, or 401; 429 when its address sent too many wrong keys
        lately or the key is over its request rate."""
        if not self.ledger.open:
            wait = self.failed_keys.wait(address)
            if wait > 0:
                raise _retry_later(
                    f"too many wrong or missing API keys from {address}; at most "
                    f"{self.failed_keys.rate:g} per second after a burst of "
                    f"{self.failed_keys.burst:g}; retry in {wait:.1f} s",
                    "too_many_failed_keys",
                    wait,
                )
        try:
            account = self.ledger.authenticate(_api_key(headers))
        except Unauthorized as err:
            self.failed_keys.take(address)
            raise HTTPError(401, str(err), "unauthorized", {"WWW-Authenticate": "Bearer"}) from None
        if self.request_limiter is not None:
            wait = self.request_limiter.acquire(account.id)
            if wait > 0:
                raise _retry_later(
                    f"rate limit: at most {self.request_limiter.rate:g} requests/s per key; "
                    f"retry in {wait:.2f} s",
                    "rate_limited",
                    wait,
                    self.ledger.usage(account.id).headers(),
                )
        return account

    async def authorized_json(
        self, request: Request, model: tuple[str, str | None], doc: Callable[[], Any]
    ) -> JSONResponse:
        """`doc()` about model `model` (name, version), for a caller with a key, with the
        key's quota headers."""
        account = await run_in_threadpool(self.authorize, request.headers, _address(request))
        usage = await run_in_threadpool(self.ledger.usage, account.id)
        try:
            self.check_model(*model)
        except HTTPError as err:
            err.headers = {**usage.headers(), **err.headers}
            raise
        return JSONResponse(doc(), headers=usage.headers())

    # --- answering ----------------------------------------------------------------------

    async def serve(
        self,
        request: Request,
        endpoint: str,
        model: tuple[str, str | None],
        parse: Parser,
        render: Renderer,
    ) -> Response:
        """The whole request path; every refusal after authorisation carries the quota."""
        account = await run_in_threadpool(self.authorize, request.headers, _address(request))
        try:
            self.check_model(*model)
            idem_key = _idempotency_key(request.headers)
            usage = await run_in_threadpool(self.ledger.usage, account.id)
            if usage.remaining < 1 and not (
                idem_key is not None
                and await run_in_threadpool(self.ledger.has_idempotency_key, account.id, idem_key)
            ):
                # Nothing to pay with: refused before the body is decompressed or parsed.
                await drain(request, self.limits.max_body_bytes, self.limits.body_timeout_s)
                raise _budget_error(BudgetExceeded(1, usage))
            body = await read_body(request, self.limits.max_body_bytes, self.limits.body_timeout_s)
            return await run_in_threadpool(
                self.execute, account, endpoint, request.headers, idem_key, body, parse, render
            )
        except HTTPError as err:
            usage = await run_in_threadpool(self.ledger.usage, account.id)
            err.headers = {**usage.headers(), **err.headers}
            raise

    def execute(
        self,
        account: Account,
        endpoint: str,
        headers: Mapping[str, str],
        idem_key: str | None,
        body: bytes,
        parse: Parser,
        render: Renderer,
    ) -> Response:
        """Replay, or parse, check compute, charge, answer, render; refund if answering
        fails."""
        body_hash = ""
        if idem_key is not None:
            body_hash = _request_hash(endpoint, headers, body)
            stored = self._stored(account, idem_key, body_hash)
            if stored is not None:
                return self._replay(account, stored)
        parsed = self._parse(account, body, parse)
        spec = self._explanation(parsed)
        n = int(parsed.images.shape[0])
        passes = n * self.responder.passes_per_image(spec)
        self._check_compute(account, n, passes)
        charge = self._charge(account, endpoint, parsed, passes, idem_key, body_hash)
        if isinstance(charge, StoredResponse):  # the same request was answered meanwhile
            self._give_back_passes(account, passes)
            return self._replay(account, charge)
        content, content_type, extra, honest = self._answer(account, parsed, spec, charge, render)
        if honest is not None:
            self._show_monitors(account, parsed, honest)
        headers_out = {**extra, **charge.usage.headers(), "X-Model-Passes": str(passes)}
        return Response(content, 200, headers_out, content_type)

    def _stored(self, account: Account, idem_key: str, body_hash: str) -> StoredResponse | None:
        """The stored response of a repeated idempotent request (None: a new one), or 409/422."""
        try:
            return self.ledger.stored_response(account.id, idem_key, body_hash)
        except IdempotencyConflict as err:
            raise HTTPError(err.status, str(err), "idempotency_conflict") from None

    def _parse(self, account: Account, body: bytes, parse: Parser) -> Parsed:
        """The request parsed, refused (429) as soon as it asks for more than the key has."""
        usage = self.ledger.usage(account.id)

        def afford(count: int) -> None:
            if count > usage.remaining:
                raise _budget_error(BudgetExceeded(count, usage))

        with self._parse_slots:
            try:
                return parse(body, afford)
            except WireError as err:
                raise bad_request(str(err), err.code) from None

    def _explanation(self, parsed: Parsed) -> Explanation | None:
        try:
            return self.responder.resolve_explanation(parsed.explanation)
        except ExplanationNotOffered as err:
            raise HTTPError(403, str(err), "explanation_not_offered") from None

    def _charge(
        self,
        account: Account,
        endpoint: str,
        parsed: Parsed,
        passes: int,
        idem_key: str | None,
        body_hash: str,
    ) -> Charge | StoredResponse:
        """Charge the request's images to the key (the passes go back if it is refused)."""
        images = parsed.images.numpy().astype("<f4").tobytes() if self.audit_images else None
        try:
            return self.ledger.charge(
                account.id,
                int(parsed.images.shape[0]),
                endpoint,
                idem_key=idem_key,
                body_hash=body_hash,
                images=images,
            )
        except (BudgetExceeded, IdempotencyConflict) as err:
            self._give_back_passes(account, passes)
            if isinstance(err, BudgetExceeded):
                raise _budget_error(err) from None
            raise HTTPError(err.status, str(err), "idempotency_conflict") from None

    def _answer(
        self,
        account: Account,
        parsed: Parsed,
        spec: Explanation | None,
        charge: Charge,
        render: Renderer,
    ) -> tuple[bytes, str, dict[str, str], torch.Tensor | None]:
        """The rendered answer (content, type, headers) and, for the monitors, the victim's
        honest probabilities; the charge is refunded if any of it fails."""
        try:
            honest = None
            if self.monitors is None:
                answer = self.responder.answer(parsed.images, spec, party=account.id)
            else:
                answer, honest = self.responder.answer_with_probabilities(
                    parsed.images, spec, party=account.id
                )
            content, content_type, extra = render(answer, parsed)
            # Storing the response for replays is part of serving it: if that fails, the
            # client gets an error, so the charge is given back and a retry runs afresh
            # (instead of meeting a request "still being served" until the row expires).
            self.ledger.finish(charge, 200, content_type, content, extra)
        except BaseException:
            self.ledger.refund(charge)
            raise
        return content, content_type, extra, honest

    def _show_monitors(self, account: Account, parsed: Parsed, honest: torch.Tensor) -> None:
        try:
            self.monitors.submit(account.id, parsed.images, honest)
        except Exception:  # the answer stands whatever happens to the monitors
            log.exception("queueing a request of account %s for the monitors", account.id)

    def _check_compute(self, account: Account, n: int, passes: int) -> None:
        check_passes(n, passes, self.limits.max_passes_per_request)
        if self.compute_limiter is not None:
            wait = self.compute_limiter.acquire(account.id, passes)
            if wait > 0:
                raise _retry_later(
                    f"compute rate: at most {self.compute_limiter.rate:g} model passes/s per "
                    f"key; this request needs {passes}; retry in {wait:.2f} s",
                    "compute_rate_limited",
                    wait,
                    passes=passes,
                )

    def _give_back_passes(self, account: Account, passes: int) -> None:
        """Return the passes of a request refused after its compute was counted."""
        if self.compute_limiter is not None:
            self.compute_limiter.take(account.id, -passes)

    def _replay(self, account: Account, stored: StoredResponse) -> Response:
        if stored.body is None:
            raise HTTPError(
                410,
                "the response to this Idempotency-Key was given and is no longer kept (over "
                "the stored-response size caps); it is not charged again: send the request "
                "with a new Idempotency-Key to have it answered (and charged) anew",
                "response_not_kept",
            )
        headers = {
            **stored.headers,
            **self.ledger.usage(account.id).headers(),
            "Idempotent-Replayed": "true",
        }
        return Response(stored.body, stored.status, headers, stored.content_type)


# --- helpers ------------------------------------------------------------------------------


def _address(request: Request) -> str:
    return request.client.host if request.client is not None else "unknown"


def _api_key(headers: Mapping[str, str]) -> str | None:
    key = headers.get("x-api-key")
    auth = headers.get("authorization")
    if key is None and auth:
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("Authorization: expected 'Bearer KEY'")
        key = token.strip()
    return key


def _idempotency_key(headers: Mapping[str, str]) -> str | None:
    key = headers.get("idempotency-key")
    if key is not None and not 0 < len(key) <= 255:
        raise bad_request("Idempotency-Key: expected 1 to 255 characters")
    return key


def _request_hash(endpoint: str, headers: Mapping[str, str], body: bytes) -> str:
    # A replay must answer the same request: bind the key to endpoint and body.
    digest = hashlib.sha256(endpoint.encode() + b"\0")
    digest.update(headers.get("inference-header-content-length", "").encode() + b"\0")
    digest.update(body)
    return digest.hexdigest()


def _budget_error(err: BudgetExceeded) -> HTTPError:
    usage: Usage = err.usage
    return HTTPError(
        429,
        str(err),
        "budget_exceeded",
        usage.headers(),
        requested=err.requested,
        **usage.to_dict(),
    )


def _retry_later(
    message: str,
    code: str,
    wait: float,
    headers: Mapping[str, str] | None = None,
    **extra: Any,
) -> HTTPError:
    headers_out = {"Retry-After": str(max(1, math.ceil(wait))), **(headers or {})}
    return HTTPError(429, message, code, headers_out, retry_after_s=round(wait, 3), **extra)
