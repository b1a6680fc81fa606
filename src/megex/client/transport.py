"""What both protocols' clients share: the URL of a model, one HTTP request with its retries
and Idempotency-Key, the query counts read from the ``X-Queries-*`` headers, the service's
refusals as the Oracle protocol's exceptions, and the request parameters that choose an
explanation."""

from __future__ import annotations

import math
import re
import threading
import time
import uuid
from typing import Any, Self
from urllib.parse import urlsplit, urlunsplit

import httpx

from ..explain import Explanation
from ..ledger import BudgetExceeded, Usage
from ..oracle import ExplanationNotOffered, InvalidQuery

__all__ = ["ServiceClient", "ServiceError", "requested_parameters", "split_url"]

_MODEL_PATH = re.compile(r"^(?P<root>.*?)/(?P<protocol>v[12])/models/(?P<name>[^/:]+)")


class ServiceError(RuntimeError):
    """The service could not answer: unreachable, unauthorised, or an unexpected reply."""

    def __init__(self, message: str, status: int | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.code = status, code


def split_url(url: str) -> tuple[str, str | None, str | None]:
    """(server root, "v1" or "v2" where the URL names a model under that protocol's path,
    the model's name or None) of a server root or a model URL; ValueError for anything else."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(
            f"url: expected http(s)://host[:port] or a model URL "
            f"(.../v2/models/NAME or .../v1/models/NAME), got {url!r}"
        )
    path = parts.path.rstrip("/")
    match = _MODEL_PATH.match(path)
    protocol = name = None
    if match:
        path, protocol, name = match["root"], match["protocol"], match["name"]
    return urlunsplit((parts.scheme, parts.netloc, path, "", "")), protocol, name


class ServiceClient:
    """An HTTP client of one model's service: requests with retries, the counts its
    responses carry, and its refusals mapped to the Oracle protocol's exceptions.

    url: the server root or a model URL (:func:`split_url`). retries: extra attempts after a
    connection error or a 5xx, waiting backoff * 2**attempt seconds; a 429 rate limit (of
    requests or of compute) waits for its Retry-After and does not use up retries, nor does
    a 409 (the same idempotent request still computed), up to `max_rate_limit_waits` waits.
    Without ``X-Queries-*`` headers (a service with no ledger) the budget is unlimited here:
    the run's budget is then the caller's to enforce (``megex.run(..., budget=N)``).
    """

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        *,
        timeout: float = 60.0,
        retries: int = 3,
        backoff: float = 0.25,
        max_rate_limit_waits: int = 100,
    ):
        if int(retries) < 0 or not float(backoff) >= 0:
            raise ValueError("retries and backoff: expected >= 0")
        self.root, self.url_protocol, self.name = split_url(url)
        self.retries, self.backoff = int(retries), float(backoff)
        self.max_rate_limit_waits = int(max_rate_limit_waits)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(timeout=timeout, headers=headers)
        self._lock = threading.Lock()
        self._used = 0
        self._budget: int | float = math.inf

    # --- the counts (the Oracle protocol's) -------------------------------------------------

    @property
    def queries_used(self) -> int:
        return self._used

    @property
    def budget(self) -> int | float:
        return self._budget

    @property
    def remaining(self) -> int | float:
        return self._budget - self._used

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # --- requests ---------------------------------------------------------------------------

    def only_model(self) -> str:
        """The name of the one model the server lists (``GET /v1/models``, which KServe and
        megex serve answer), or ServiceError."""
        models = self.get_json("/v1/models").get("models") or []
        if len(models) != 1:
            raise ServiceError(
                f"{self.root} serves {len(models)} models ({', '.join(map(str, models))}); "
                "give the model URL, e.g. .../v2/models/NAME or .../v1/models/NAME"
            )
        return str(models[0])

    def get_json(self, path: str) -> dict[str, Any]:
        """A GET's JSON object, or ServiceError (also for a reply that is not an object)."""
        response = self.call("GET", path)
        try:
            doc = response.json()
        except ValueError:
            raise ServiceError(f"GET {path}: the reply is not JSON") from None
        if not isinstance(doc, dict):
            raise ServiceError(f"GET {path}: expected a JSON object, got {type(doc).__name__}")
        return doc

    def call(
        self,
        method: str,
        path: str,
        *,
        content: bytes | None = None,
        headers: dict[str, str] | None = None,
        idempotent: bool = False,
    ) -> httpx.Response:
        """One logical request: retried on connection errors, 5xx and 409 (the same
        idempotent request still in progress), always with the same Idempotency-Key."""
        headers = dict(headers or {})
        if idempotent:
            headers["Idempotency-Key"] = uuid.uuid4().hex
        url = self.root + path
        attempt = waits = 0
        while True:
            try:
                response = self._http.request(method, url, content=content, headers=headers)
            except httpx.TransportError as err:
                if attempt >= self.retries:
                    raise ServiceError(
                        f"{method} {url}: no answer after {attempt + 1} attempts ({err!r})"
                    ) from err
                time.sleep(self.backoff * 2**attempt)
                attempt += 1
                continue
            self._read_usage(response.headers)
            status = response.status_code
            if status == 409 and waits < self.max_rate_limit_waits:
                # The same request is still being computed (an earlier attempt timed out):
                # wait for it under the same idempotency key rather than lose a paid answer.
                waits += 1
                time.sleep(min(5.0, self.backoff * 2 ** min(waits, 5)))
                continue
            if status >= 500 and attempt < self.retries:
                time.sleep(self.backoff * 2**attempt)
                attempt += 1
                continue
            if status == 429 and _error(response)[1] in ("rate_limited", "compute_rate_limited"):
                if waits < self.max_rate_limit_waits:
                    waits += 1
                    time.sleep(_retry_after(response))
                    continue
            if status >= 400:
                _raise_for(response, method, url)
            return response

    def count_from(self, used: Any, budget: Any = None) -> None:
        """A count (and budget) the service states elsewhere than in headers (the MLServer
        runtime's metadata): the queries answered before this client's first, so not its
        own."""
        if isinstance(used, int) and not isinstance(used, bool):
            with self._lock:
                self._used = max(self._used, used)
                if isinstance(budget, int) and not isinstance(budget, bool):
                    self._budget = budget

    def _read_usage(self, headers: httpx.Headers) -> None:
        usage = Usage.from_headers(headers)
        if usage is None:
            return
        with self._lock:
            # Answers to concurrent requests can arrive out of order; counts only grow
            # (refunds aside), so keep the largest seen.
            self._used = max(self._used, usage.used)
            self._budget = math.inf if usage.budget is None else usage.budget


def requested_parameters(explanation: Explanation | bool) -> dict[str, Any]:
    """The request parameters that ask for `explanation` (True: the service's own, none),
    as megex's servers read them on both protocols."""
    if isinstance(explanation, Explanation):
        return explanation.to_dict()
    if explanation is not True:
        raise ExplanationNotOffered(
            f"explanation: expected None, True or an Explanation, got {type(explanation).__name__}"
        )
    return {}


def _error(response: httpx.Response) -> tuple[str, str | None, dict[str, Any]]:
    try:
        doc = response.json()
    except ValueError:
        return response.text[:200] or response.reason_phrase, None, {}
    if not isinstance(doc, dict):
        return str(doc)[:200], None, {}
    return str(doc.get("error", doc)), doc.get("code"), doc


def _retry_after(response: httpx.Response) -> float:
    _, _, doc = _error(response)
    wait = doc.get("retry_after_s")
    if wait is None:
        try:
            wait = float(response.headers.get("retry-after", "1"))
        except ValueError:
            wait = 1.0
    return max(0.0, min(float(wait), 60.0))


def _raise_for(response: httpx.Response, method: str, url: str) -> None:
    message, code, doc = _error(response)
    status = response.status_code
    if status == 429 and code == "budget_exceeded":
        raise BudgetExceeded(int(doc.get("requested", 0)), Usage.from_dict(doc))
    if code in ("explanation_not_offered", "unknown_target"):
        # As LocalOracle raises them: the service does not return this explanation.
        raise ExplanationNotOffered(message)
    if status in (400, 413, 422) and code != "idempotency_conflict":
        raise InvalidQuery(message)
    raise ServiceError(f"{method} {url}: HTTP {status}: {message}", status, code)
