"""The ASGI app serving one model: settings, the ledger, error handlers and both protocols'
routes."""

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
from ..explain import Explanation
from ..oracle import LocalOracle, Responder
from ..sqlite_ledger import SQLiteLedger
from ..victim import Victim
from . import v1, v2
from .service import HTTPError, RateLimiter, Service, default_model_name

__all__ = ["DEFAULT_MAX_BODY_BYTES", "create_app", "read_keys_file"]

log = logging.getLogger("megex.server")

DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024


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
    prediction: str = "probabilities",
    top_k: int | None = None,
    explanation: Explanation | None = Explanation("gradient"),
    allow_explanation_choice: bool = True,
    defenses: Sequence[Defense] = (),
    audit_images: bool = False,
    seed: int = 0,
    idempotency_ttl_s: float = 24 * 3600.0,
) -> FastAPI:
    """The ASGI app serving one model.

    source: a Victim (answered with prediction, top_k, explanation, allow_explanation_choice,
    defenses, seed), or a Responder (or a LocalOracle with budget None, whose Responder is
    used; or a callable returning either) that answers as it is. keys: API key -> budget
    (None: `budget`), or an iterable of keys; None serves without auth, one shared account.
    budget: per key, None = unlimited. db_path: the SQLite ledger (":memory:" forgets counts
    on exit). rate_limit: requests/s per key (bursts of `rate_burst`, default
    max(1, rate)). audit_images: keep every queried image in the audit table.
    """
    responder = _responder(
        source,
        prediction=prediction,
        top_k=top_k,
        explanation=explanation,
        allow_explanation_choice=allow_explanation_choice,
        defenses=defenses,
        seed=seed,
    )
    name = name or default_model_name(responder.victim)
    if not name or "/" in name or ":" in name:
        raise ValueError(f"name: {name!r} cannot appear in a URL path segment")
    if int(max_body_bytes) < 1:
        raise ValueError(f"max_body_bytes: expected >= 1, got {max_body_bytes}")
    # Checked before the ledger is opened (and locked): a refused setting leaves it untouched.
    limiter = RateLimiter(rate_limit, rate_burst) if rate_limit is not None else None
    ledger = SQLiteLedger(
        db_path, keys=keys, default_budget=budget, idempotency_ttl_s=idempotency_ttl_s
    )
    service = Service(responder, name, ledger, limiter, max_body_bytes, audit_images)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        # Closing releases the ledger's lock, so that the next server can take it over.
        ledger.close()

    app = FastAPI(
        title=f"megex: {name}",
        version=__version__,
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.service = service
    app.state.ledger = ledger
    _install_error_handlers(app)
    v2.add_routes(app, service)
    v1.add_routes(app, service)
    return app


def _responder(source, **settings) -> Responder:
    if isinstance(source, Victim):
        return Responder(source, **settings)
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
        content = {"error": err.message, "code": err.code, **err.extra}
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
