"""Everything the service is set with, besides its model: one dataclass of declared settings.

:class:`ServiceSettings` extends :class:`~megex.serving.limits.Limits` with the keys and
budgets, what the service returns (prediction mode, explanation, defences), the stored
responses for idempotent retries, what it discloses, and the query monitors. Each field is a
:func:`megex.settings.setting` (default, rule, help, group), checked when the settings are
made: :func:`megex.serving.create_app` takes them, and ``megex serve`` makes its flags from
them. Needs no extra (no fastapi).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..defenses import Defense
from ..detection import Monitor
from ..explain import Explanation
from ..oracle import DEFAULT_CHUNK_PASSES, PREDICTION_MODES
from ..oracle.responder import Explainer
from ..settings import (
    COUNT,
    COUNT_0,
    FLAG,
    POSITIVE,
    Anything,
    Choice,
    Number,
    OrNone,
    SettingError,
    setting,
)
from ..stored_responses import (
    DEFAULT_IDEMPOTENCY_TTL_S,
    DEFAULT_STORED_RESPONSE_BYTES,
    DEFAULT_STORED_RESPONSE_BYTES_PER_KEY,
)
from .limits import Limits
from .monitoring import check_monitors

__all__ = ["DEFAULT_MODEL_NAME", "ServiceSettings", "UrlSegment", "read_keys_file"]

# The name in URLs unless the operator gives one: it says nothing about the model.
DEFAULT_MODEL_NAME = "model"


@dataclass(frozen=True)
class UrlSegment:
    """Text that can stand in a URL path segment: no '/' or ':'."""

    def check(self, name: str, value: Any) -> None:
        if not isinstance(value, str) or "/" in value or ":" in value:
            raise SettingError(f"{name}: {value!r} cannot appear in a URL path segment")

    def rule(self) -> str:
        return " (no '/' or ':')"

    def expected(self) -> str:
        return "text without '/' or ':'"

    def parse(self, value: Any, where: str = "") -> str:
        self.check(where, value)
        return value


@dataclass(frozen=True)
class ServiceSettings(Limits):
    """The service's settings: its limits (inherited) and everything else it is set with.

    Made like any dataclass (``ServiceSettings(budget=100, rate_limit=5.0)``) and changed
    with :meth:`replace`; every value is checked against its field's rule when made, so a
    refused setting never reaches the ledger. Sizes are in bytes, times in seconds. The
    settings about answering (prediction, top_k, explanation, allow_explanation_choice,
    defenses, seed, explainer, chunk_passes) apply when the service is made from a victim;
    a Responder given instead answers as it is.
    """

    name: str | None = setting(
        None,
        f"the model's name in URLs (default: {DEFAULT_MODEL_NAME!r}, which says nothing "
        "about the victim)",
        OrNone(UrlSegment()),
        "service",
    )
    keys: Mapping[str, int | None] | Iterable[str] | None = setting(
        None,
        "API key -> budget (None: the default budget), or an iterable of keys; None serves "
        "without auth, every caller sharing one account",
        Anything(),
        "keys",
    )
    db_path: str | os.PathLike = setting(
        ":memory:",
        "the SQLite ledger of keys, counts and the audit log (':memory:' forgets counts on exit)",
        Anything(),
        "keys",
    )
    budget: int | None = setting(
        None,
        "queries per key (one image = one query; default: unlimited)",
        OrNone(COUNT_0),
        "keys",
    )
    audit_images: bool = setting(False, "store every queried image in the audit log", FLAG, "keys")
    chunk_passes: int = setting(
        DEFAULT_CHUNK_PASSES,
        "model passes computed per turn before another key's request gets its turn",
        COUNT,
        "limits",
    )
    idempotency_ttl_s: float = setting(
        DEFAULT_IDEMPOTENCY_TTL_S,
        "seconds a response to an idempotent request is kept",
        POSITIVE,
        "limits",
    )
    stored_response_bytes_per_key: int = setting(
        DEFAULT_STORED_RESPONSE_BYTES_PER_KEY,
        "stored responses kept per key",
        COUNT_0,
        "limits",
    )
    stored_response_bytes: int = setting(
        DEFAULT_STORED_RESPONSE_BYTES,
        "stored responses kept over all keys",
        COUNT_0,
        "limits",
    )
    prediction: str = setting(
        "probabilities", "what predictions show", Choice(PREDICTION_MODES), "answers"
    )
    top_k: int | None = setting(
        None, "classes shown with prediction 'top-k'", OrNone(COUNT), "answers"
    )
    explanation: Explanation | None = setting(
        Explanation("gradient"),
        "the explanation returned on request (None: none is offered)",
        Anything(),
        "answers",
    )
    allow_explanation_choice: bool = setting(
        True,
        "requests may choose method, target, output and settings (Vertex AI's parameters)",
        FLAG,
        "answers",
    )
    defenses: Sequence[Defense] = setting(
        (),
        "defences applied to what is returned, in order (megex.defenses.build_defense)",
        Anything(),
        "answers",
    )
    seed: int = setting(0, "seed of SmoothGrad and defence noise", Number(whole=True), "answers")
    explainer: Explainer | None = setting(
        None,
        "what computes the maps instead of megex's own methods (megex.integrations.explainers: "
        "a captum method or a function); `explanation` labels them",
        Anything(),
        "answers",
    )
    openapi: bool = setting(
        False,
        "serve the OpenAPI document at /openapi.json (off: it describes the service to anyone)",
        FLAG,
        "disclosure",
    )
    expose_architecture: bool = setting(
        False,
        "name the victim's architecture and dataset in the V2 model metadata",
        FLAG,
        "disclosure",
    )
    monitors: Sequence[Monitor] = setting(
        (),
        "query-stream monitors (megex.detection; each kind at most once, each with a "
        "threshold) shown every answered request's images and the victim's honest "
        "probabilities; their flags go to the ledger's flags table",
        Anything(),
        "monitoring",
    )

    def check_combination(self) -> None:
        if self.stored_response_bytes_per_key > self.stored_response_bytes:
            raise SettingError(
                "stored response sizes: expected 0 <= bytes per key <= bytes in all, got "
                f"{self.stored_response_bytes_per_key} and {self.stored_response_bytes}"
            )
        check_monitors(self.monitors)

    @property
    def model_name(self) -> str:
        """The name in URLs: `name`, or the default."""
        return self.name or DEFAULT_MODEL_NAME

    def replace(self, **changes: Any) -> ServiceSettings:
        """These settings with `changes` (checked); an unknown name is a TypeError."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise TypeError(
                f"unknown service setting {unknown[0]!r}; settable: {', '.join(sorted(known))}"
            )
        return dataclasses.replace(self, **changes) if changes else self


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
