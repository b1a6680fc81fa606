"""The service's refusals: an HTTP status, a one-line message and a machine-readable code."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["HTTPError", "bad_request"]


class HTTPError(Exception):
    """A request the server refuses: status, a one-line message, a machine-readable code;
    `extra` fields join the JSON error document."""

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


def check_passes(n: int, passes: int, limit: int | None) -> None:
    """Refuse (400, compute_limit) a request of `n` images costing `passes` model passes,
    more than `limit` per request (None: no limit)."""
    if limit is not None and passes > limit:
        raise HTTPError(
            400,
            f"compute: this request needs {passes} model passes ({n} images x "
            f"{passes // n}), more than the {limit} allowed per request; send fewer "
            "images, or ask for a cheaper explanation (fewer samples or steps, one class)",
            "compute_limit",
            passes=passes,
            max_passes_per_request=limit,
        )
