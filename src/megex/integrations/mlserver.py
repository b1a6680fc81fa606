"""A megex victim served by Seldon's MLServer: a custom runtime (``mlserver.MLModel``) that
answers the Open Inference Protocol V2 exactly as ``megex serve`` does, so that
:class:`megex.client.RemoteOracle` (and ``megex attack --victim URL``) works against it.

The model's folder holds a ``model-settings.json``::

    {"name": "digits",
     "implementation": "megex.integrations.mlserver.MegexRuntime",
     "parameters": {"uri": "./victim.safetensors",
                    "extra": {"defenses": ["quantize:bits=2"], "seed": 0}}}

``parameters.uri`` is the victim file (:meth:`megex.Victim.save`; relative to the folder);
``parameters.extra`` holds the service's answering settings, named and checked as
:class:`megex.serving.ServiceSettings` names them: ``prediction``, ``top_k``,
``explanation`` (a method name, an object such as ``{"method": "smoothgrad", "samples":
8}``, or null for none), ``allow_explanation_choice``, ``defenses`` (specs, applied in
order), ``seed``, ``budget`` (queries in all; default unlimited), ``expose_architecture``,
and ``explainer`` (a spec of :mod:`megex.integrations.explainers`, e.g.
``"captum:IntegratedGradients"``).

Requests are parsed and answers rendered by megex's own V2 code (:mod:`megex.serving.v2`)
and computed by a :class:`megex.LocalOracle`, whose ledger counts every image answered: each
response carries ``X-Queries-Used``, ``X-Query-Budget`` and ``X-Queries-Remaining`` (as
MLServer sets a response's ``parameters.headers``), and the model metadata's parameters
carry ``queries_used`` (and ``query_budget``, where there is one). What MLServer itself does
not offer is not offered here: the binary tensor data extension (the client sends JSON to a
server whose metadata does not list it),
API keys, idempotent replays (a retried request is charged again) and refusal codes (an
error is ``{"error": ...}`` with its HTTP status). The count is per process: serve with
``parallel_workers: 0`` for one count. Needs the ``mlserver`` extra.
"""

from __future__ import annotations

import asyncio
import json
import math
from dataclasses import dataclass
from typing import Any

from mlserver import MLModel
from mlserver.errors import MLServerError
from mlserver.types import InferenceRequest, InferenceResponse, MetadataModelResponse
from mlserver.utils import get_model_uri

from ..defenses import build_defense
from ..explain import Explanation
from ..ledger import BudgetExceeded
from ..oracle import ExplanationNotOffered, InvalidQuery, LocalOracle, Responder
from ..serving.codec import WireError, dump_json
from ..serving.errors import HTTPError
from ..serving.parsing import Parsed
from ..serving.settings import ServiceSettings
from ..serving.v2 import metadata_document, parse_v2, render_v2
from ..victim import Victim
from .explainers import build_explainer

__all__ = ["MegexRuntime", "runtime_settings"]

# The settings that model-settings.json's parameters.extra may hold.
SETTINGS = (
    "prediction",
    "top_k",
    "explanation",
    "allow_explanation_choice",
    "defenses",
    "seed",
    "budget",
    "expose_architecture",
    "explainer",
)


def runtime_settings(extra: dict[str, Any]) -> ServiceSettings:
    """The service's settings from ``parameters.extra`` (ValueError naming what is wrong)."""
    unknown = sorted(set(extra) - set(SETTINGS))
    if unknown:
        raise ValueError(f"parameters.extra: unknown {unknown[0]!r}; known: {', '.join(SETTINGS)}")
    values = dict(extra)
    values["defenses"] = tuple(build_defense(spec) for spec in values.get("defenses", ()))
    explanation = values.get("explanation", "gradient")
    if isinstance(explanation, str):
        explanation = None if explanation == "none" else {"method": explanation}
    explainer = values.get("explainer")
    if explainer is not None:
        values["explainer"] = explainer = build_explainer(explainer)
        if explanation is not None and explainer.method is not None:
            explanation = {**explanation, "method": explainer.method}
    values["explanation"] = None if explanation is None else Explanation.from_dict(explanation)
    return ServiceSettings(**values)


@dataclass(frozen=True)
class _Described:
    """What megex's metadata document reads of a service."""

    responder: Responder
    name: str
    output_names: list[str]
    expose_architecture: bool


class MegexRuntime(MLModel):
    """An MLServer runtime serving a megex Victim with megex's answering code and defences."""

    async def load(self) -> bool:
        params = self.settings.parameters
        extra = dict((params.extra if params is not None else None) or {})
        try:
            settings = runtime_settings(extra)
        except ValueError as err:
            raise MLServerError(f"model {self.name}: {err}") from None
        victim = Victim.load(await get_model_uri(self.settings))
        self.oracle = LocalOracle(
            victim,
            budget=settings.budget,
            prediction=settings.prediction,
            top_k=settings.top_k,
            explanation=settings.explanation,
            allow_explanation_choice=settings.allow_explanation_choice,
            defenses=settings.defenses,
            seed=settings.seed,
            explainer=settings.explainer,
        )
        responder = self.oracle.responder
        names = ["probabilities", "labels"]
        if responder.prediction == "logits":
            names.append("logits")
        if responder.explanation is not None:
            names.append("explanation")
        self._described = _Described(responder, self.name, names, settings.expose_architecture)
        return True

    async def metadata(self) -> MetadataModelResponse:
        doc = metadata_document(self._described)
        doc["parameters"]["queries_used"] = self.oracle.queries_used
        if math.isfinite(self.oracle.budget):
            # Before its first answer a client learns the budget here, not from headers.
            doc["parameters"]["query_budget"] = int(self.oracle.budget)
        return MetadataModelResponse(**doc)

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        return await asyncio.to_thread(self._predict, payload)

    def _predict(self, payload: InferenceRequest) -> InferenceResponse:
        responder = self.oracle.responder
        doc = payload.model_dump(exclude_none=True)
        try:
            parsed = parse_v2(
                dump_json(doc),
                None,
                responder.input_shape,
                self._described.output_names,
                responder.explanation,
                self._afford,
                None,
                responder.num_classes,
            )
            answer = self.oracle.query(parsed.images, parsed.explanation)
        except HTTPError as err:
            raise MLServerError(err.message, err.status) from None
        except (WireError, InvalidQuery) as err:
            raise MLServerError(str(err), 400) from None
        except ExplanationNotOffered as err:
            raise MLServerError(str(err), 403) from None
        except BudgetExceeded as err:
            raise MLServerError(str(err), 429) from None
        # MLServer speaks JSON only: every output is rendered as JSON data.
        outputs = [(name, False) for name, _ in parsed.outputs]
        as_json = Parsed(parsed.images, parsed.explanation, outputs, parsed.request_id)
        body, _, _ = render_v2(answer, as_json, self.name)
        response = json.loads(body)
        usage = self.oracle.ledger.usage(LocalOracle.ACCOUNT)
        response["parameters"] = {"headers": usage.headers()}
        return InferenceResponse(**response)

    def _afford(self, count: int) -> None:
        """Refuse a request for more images than the budget has left, before decoding it."""
        usage = self.oracle.ledger.usage(LocalOracle.ACCOUNT)
        if count > usage.remaining:
            raise BudgetExceeded(count, usage)
