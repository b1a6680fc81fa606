"""The ASGI app serving one model: settings, limits, the ledger, error handlers and both
protocols' routes."""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..defenses import Defense
from ..detection import Monitor
from ..explain import Explanation
from ..oracle import DEFAULT_CHUNK_PASSES, LocalOracle, Responder
from ..sqlite_ledger import SQLiteLedger
from ..stored_responses import (
    DEFAULT_IDEMPOTENCY_TTL_S,
    DEFAULT_STORED_RESPONSE_BYTES,
    DEFAULT_STORED_RESPONSE_BYTES_PER_KEY,
)
from ..victim import Victim
from . import v1, v2
from .errors import HTTPError
from .limits import (
    DEFAULT_BODY_TIMEOUT_S,
    DEFAULT_FAILED_KEY_BURST,
    DEFAULT_FAILED_KEY_RATE,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_JSON_VALUES,
    DEFAULT_MAX_PASSES_PER_REQUEST,
    Limits,
)
from .monitoring import MonitorHub, check_monitors
from .service import DEFAULT_MODEL_NAME, Service

__all__ = ["DEFAULT_MAX_BODY_BYTES", "create_app", "read_keys_file"]

log = logging.getLogger("megex.server")

# Error messages may quote what a client sent; they are cut at this length.
_MAX_MESSAGE = 1000


def create_app(
    source: Victim | Responder | LocalOracle | Callable[[], Responder | LocalOracle],
    *,
    name: str | None = None,
    keys: Mapping[str, int | None] | Iterable[str] | None = None,
    db_path: str | os.PathLike = ":memory:",
    budget: int | None = None,
    rate_limit: float | None = None,
    rate_burst: float | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S,
    max_json_values: int = DEFAULT_MAX_JSON_VALUES,
    max_passes_per_request: int | None = DEFAULT_MAX_PASSES_PER_REQUEST,
    compute_rate: float | None = None,
    compute_burst: float | None = None,
    chunk_passes: int = DEFAULT_CHUNK_PASSES,
    failed_key_rate: float = DEFAULT_FAILED_KEY_RATE,
    failed_key_burst: float = DEFAULT_FAILED_KEY_BURST,
    prediction: str = "probabilities",
    top_k: int | None = None,
    explanation: Explanation | None = Explanation("gradient"),
    allow_explanation_choice: bool = True,
    defenses: Sequence[Defense] = (),
    audit_images: bool = False,
    seed: int = 0,
    idempotency_ttl_s: float = DEFAULT_IDEMPOTENCY_TTL_S,
    stored_response_bytes_per_key: int = DEFAULT_STORED_RESPONSE_BYTES_PER_KEY,
    stored_response_bytes: int = DEFAULT_STORED_RESPONSE_BYTES,
    openapi: bool = False,
    expose_architecture: bool = False,
    monitors: Sequence[Monitor] = (),
) -> FastAPI:
    """The ASGI app serving one model.

    source: a Victim (answered with prediction, top_k, explanation, allow_explanation_choice,
    defenses, seed, in chunks of at most chunk_passes model passes), or a Responder (or a
    LocalOracle with budget None, whose Responder is used; or a callable returning either)
    that answers as it is. keys: API key -> budget (None: `budget`), or an iterable of keys;
    None serves without auth, one shared account. budget: per key, None = unlimited. name:
    the model's name in URLs (default "model", which says nothing about it). db_path: the
    SQLite ledger (":memory:" forgets counts on exit). audit_images: keep every queried
    image in the audit table.

    Limits (:class:`~megex.serving.limits.Limits`): max_body_bytes, body_timeout_s,
    max_json_values, max_passes_per_request, compute_rate and compute_burst (model passes
    per second per key), rate_limit and rate_burst (requests per second per key),
    failed_key_rate and failed_key_burst (wrong keys per second per client address).
    Stored responses for idempotent retries: idempotency_ttl_s,
    stored_response_bytes_per_key, stored_response_bytes (:mod:`megex.stored_responses`).
    openapi: serve the OpenAPI document at /openapi.json (off: it describes the service to
    anyone). expose_architecture: name the victim's architecture and dataset in the V2
    model metadata. monitors: query-stream monitors (:mod:`megex.detection`, each kind at
    most once, each with a threshold) shown every answered request's images and the
    victim's honest probabilities; their flags go to the ledger's ``flags`` table
    (:mod:`.monitoring`).
    """
    responder = _responder(
        source,
        prediction=prediction,
        top_k=top_k,
        explanation=explanation,
        allow_explanation_choice=allow_explanation_choice,
        defenses=defenses,
        seed=seed,
        chunk_passes=chunk_passes,
    )
    name = name or DEFAULT_MODEL_NAME
    if not name or "/" in name or ":" in name:
        raise ValueError(f"name: {name!r} cannot appear in a URL path segment")
    limits = Limits(
        max_body_bytes=max_body_bytes,
        body_timeout_s=body_timeout_s,
        max_json_values=max_json_values,
        max_passes_per_request=max_passes_per_request,
        compute_rate=compute_rate,
        compute_burst=compute_burst,
        rate_limit=rate_limit,
        rate_burst=rate_burst,
        failed_key_rate=failed_key_rate,
        failed_key_burst=failed_key_burst,
    )
    check_monitors(monitors)
    # Limits and monitors are checked (above) before the ledger is opened and locked: a
    # refused setting leaves it untouched.
    ledger = SQLiteLedger(
        db_path,
        keys=keys,
        default_budget=budget,
        idempotency_ttl_s=idempotency_ttl_s,
        stored_response_bytes_per_key=stored_response_bytes_per_key,
        stored_response_bytes=stored_response_bytes,
    )
    hub = MonitorHub(monitors, ledger) if monitors else None
    service = Service(
        responder, name, ledger, limits, audit_images, expose_architecture, monitors=hub
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        if hub is not None:  # the requests answered so far are observed, their flags kept
            hub.close()
        # Closing releases the ledger's lock, so that the next server can take it over.
        ledger.close()

    app = FastAPI(
        title=f"megex: {name}",
        version=__version__,
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json" if openapi else None,
        lifespan=lifespan,
    )
    app.state.service = service
    app.state.ledger = ledger
    app.state.monitors = hub
    _install_error_handlers(app)
    v2.add_routes(app, service)
    v1.add_routes(app, service)
    return app


def _responder(source, *, chunk_passes: int, **settings) -> Responder:
    if isinstance(source, Victim):
        return Responder(source, chunk_passes=chunk_passes, **settings)
    if not isinstance(source, (Responder, LocalOracle)):
        source = source()
    if isinstance(source, LocalOracle):
        if source.budget != math.inf:
            raise ValueError(
                "source: the LocalOracle only answers here and must have budget=None; "
                "give the per-key budget to create_app"
            )
        source = source.responder
    if not isinstance(source, Responder):
        raise TypeError(
            f"source: expected a Victim, Responder or LocalOracle, got {type(source).__name__}"
        )
    return source


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(HTTPError)
    async def _http_error(request: Request, err: HTTPError) -> JSONResponse:
        message = err.message
        if len(message) > _MAX_MESSAGE:
            message = message[: _MAX_MESSAGE - 3] + "..."
        content = {"error": message, "code": err.code, **err.extra}
        return JSONResponse(content, err.status, err.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _starlette_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        message = {
            404: f"no such endpoint: {request.method} {request.url.path}",
            405: f"method {request.method} not allowed on {request.url.path}",
        }
        text = message.get(err.status_code, str(err.detail))
        return JSONResponse(
            {"error": text, "code": "http_error"}, err.status_code, getattr(err, "headers", None)
        )

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        return JSONResponse({"error": f"invalid request: {err.errors()}", "code": "invalid"}, 400)

    @app.exception_handler(Exception)
    async def _internal(request: Request, err: Exception) -> JSONResponse:
        log.exception("internal error on %s %s", request.method, request.url.path)
        return JSONResponse({"error": "internal server error", "code": "internal"}, 500)


def read_keys_file(path: str | os.PathLike) -> dict[str, int | None]:
    """Read API keys, one per line: ``KEY`` or ``KEY,BUDGET``; '#' starts a comment."""
    keys: dict[str, int | None] = {}
    for number, raw in enumerate(Path(path).read_text().splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        key, _, budget = (part.strip() for part in line.partition(","))
        if not key or any(c.isspace() for c in key):
            raise ValueError(f"keys file {path}, line {number}: not a key: {raw.strip()!r}")
        if budget:
            try:
                value = int(budget)
            except ValueError:
                raise ValueError(
                    f"keys file {path}, line {number}: budget {budget!r} is not an integer"
                ) from None
            if value < 0:
                raise ValueError(f"keys file {path}, line {number}: budget must be >= 0")
            keys[key] = value
        else:
            keys[key] = None
    return keys
