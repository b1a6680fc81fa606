"""The ASGI app serving one model: its settings (:class:`ServiceSettings`), the ledger,
error handlers and both protocols' routes."""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..oracle import LocalOracle, Responder
from ..sqlite_ledger import SQLiteLedger
from ..victim import Victim
from . import v1, v2
from .errors import HTTPError
from .limits import DEFAULT_MAX_BODY_BYTES
from .monitoring import MonitorHub
from .service import Service
from .settings import ServiceSettings, read_keys_file

__all__ = ["DEFAULT_MAX_BODY_BYTES", "ServiceSettings", "create_app", "read_keys_file"]

log = logging.getLogger("megex.server")

# Error messages may quote what a client sent; they are cut at this length.
_MAX_MESSAGE = 1000


def create_app(
    source: Victim | Responder | LocalOracle | Callable[[], Responder | LocalOracle],
    settings: ServiceSettings | None = None,
    **changes: Any,
) -> FastAPI:
    """The ASGI app serving one model, with `settings` (:class:`ServiceSettings`; default:
    its defaults) changed by keyword (``create_app(victim, keys=[...], budget=100)``).

    source: a Victim, answered as the settings say (prediction, top_k, explanation,
    allow_explanation_choice, defenses, seed, explainer, in chunks of at most chunk_passes
    model passes); or a Responder (or a LocalOracle with budget None, whose Responder is used; or
    a callable returning either) that answers as it is. The app's state holds the service,
    the ledger and the monitors; closing the app closes the ledger (releasing its lock).
    """
    settings = (settings or ServiceSettings()).replace(**changes)
    responder = _responder(source, settings)
    # The settings were checked when made, before the ledger is opened and locked: a
    # refused setting leaves it untouched.
    ledger = SQLiteLedger(
        settings.db_path,
        keys=settings.keys,
        default_budget=settings.budget,
        idempotency_ttl_s=settings.idempotency_ttl_s,
        stored_response_bytes_per_key=settings.stored_response_bytes_per_key,
        stored_response_bytes=settings.stored_response_bytes,
    )
    hub = MonitorHub(settings.monitors, ledger) if settings.monitors else None
    service = Service(
        responder,
        settings.model_name,
        ledger,
        settings,
        settings.audit_images,
        settings.expose_architecture,
        monitors=hub,
    )
    app = _fastapi_app(service.name, settings.openapi, ledger, hub)
    app.state.service = service
    app.state.ledger = ledger
    app.state.monitors = hub
    app.state.settings = settings
    _install_error_handlers(app)
    v2.add_routes(app, service)
    v1.add_routes(app, service)
    return app


def _fastapi_app(name: str, openapi: bool, ledger: SQLiteLedger, hub: MonitorHub | None) -> FastAPI:
    """An app without routes whose end closes the monitors and the ledger."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        if hub is not None:  # the requests answered so far are observed, their flags kept
            hub.close()
        # Closing releases the ledger's lock, so that the next server can take it over.
        ledger.close()

    return FastAPI(
        title=f"megex: {name}",
        version=__version__,
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json" if openapi else None,
        lifespan=lifespan,
    )


def _responder(source: Any, settings: ServiceSettings) -> Responder:
    """The Responder that answers: made from a Victim with the settings, else the one given."""
    if isinstance(source, Victim):
        return Responder(
            source,
            prediction=settings.prediction,
            top_k=settings.top_k,
            explanation=settings.explanation,
            allow_explanation_choice=settings.allow_explanation_choice,
            defenses=settings.defenses,
            seed=settings.seed,
            chunk_passes=settings.chunk_passes,
            explainer=settings.explainer,
        )
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
