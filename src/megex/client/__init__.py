"""The Oracle protocol over HTTP: :class:`RemoteOracle` speaks the Open Inference Protocol
(V2) and :class:`RemoteV1Oracle` KServe V1; :func:`connect` returns the one a service
speaks (:func:`detect_protocol` asks it, without spending a query).

The server counts; the client reads the counts from the ``X-Queries-*`` headers of every
response. One logical query keeps one ``Idempotency-Key`` across its retries, so a retry after
a lost response is never charged twice. This package needs httpx (the ``server`` extra).
"""

# Imported first: without the 'server' extra, importing the client fails here, naming httpx.
import httpx  # noqa: F401

from .connect import PROTOCOLS, connect, detect_protocol
from .transport import ServiceClient, ServiceError
from .v1 import LAYOUTS, RemoteV1Oracle
from .v2 import ENCODINGS, RemoteOracle

__all__ = [
    "ENCODINGS",
    "LAYOUTS",
    "PROTOCOLS",
    "RemoteOracle",
    "RemoteV1Oracle",
    "ServiceClient",
    "ServiceError",
    "connect",
    "detect_protocol",
]
