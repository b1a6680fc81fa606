"""The victim as an HTTP service: predictions and explanations with keys, quotas and limits.

Two protocols over one model:

- KServe V1 with Vertex AI payloads (:mod:`.v1`): ``POST /v1/models/{name}:predict`` and
  ``:explain``, body ``{"instances": [...], "parameters": {...}}``.
- Open Inference Protocol, KServe V2 / Triton (:mod:`.v2`): health, metadata and
  ``POST /v2/models/{name}/infer`` in JSON or with the binary tensor data extension, whose
  encoding (:mod:`.codec`) the client :class:`megex.client.RemoteOracle` shares.

Explanation settings go in the request's ``parameters`` when the server allows a choice:
``method``, ``target``, ``output``, and per method ``sigma``/``noiseSigma``,
``samples``/``noisySampleCount`` (smoothgrad), ``steps``/``stepCount``, ``baseline``
(integrated_gradients).

Every query is charged to an API key (``Authorization: Bearer KEY`` or ``x-api-key``) in a
SQLite ledger before it is computed (:mod:`megex.sqlite_ledger`); authenticated responses
carry ``X-Queries-Used``, ``X-Query-Budget`` and ``X-Queries-Remaining``. Compute is limited
apart, in model passes (:mod:`megex.compute`, :mod:`.limits`). Mistakes get a 4xx with
``{"error": "...", "code": "..."}``. Nothing about the model is served without a key.
Everything the service is set with is one dataclass of declared settings
(:class:`ServiceSettings`, :mod:`.settings`). The app (:func:`create_app`) needs the
``server`` extra (fastapi, uvicorn); :mod:`.codec` and :mod:`.settings` need none.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__all__ = [
    "DEFAULT_MODEL_NAME",
    "HTTPError",
    "Limits",
    "ServiceSettings",
    "create_app",
    "explanation_from_parameters",
    "read_keys_file",
]

_FROM = {
    "create_app": "app",
    "read_keys_file": "settings",
    "HTTPError": "errors",
    "Limits": "limits",
    "ServiceSettings": "settings",
    "DEFAULT_MODEL_NAME": "settings",
    "explanation_from_parameters": "parsing",
}


def __getattr__(name: str) -> Any:
    # Imported on first use, so that the client can use the codec without fastapi.
    if name not in _FROM:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{_FROM[name]}", __name__), name)
