"""KServe V1 routes with Vertex AI payloads: ``POST /v1/models/{name}:predict`` and
``:explain``, body ``{"instances": [...], "parameters": {...}}``.

An instance is one image as a nested list (C, H, W) of floats in [0, 1], or
``{"b64": ...}`` of its float32 little-endian bytes. ``:explain`` answers Vertex AI's
ExplainResponse: ``explanations``, ``deployedModelId`` (the model's name here) and
``predictions``.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import Response

from ..explain import Explanation
from ..oracle import Answer
from .codec import INPUT_NAME, WireError, dump_json, load_json, numeric_array
from .parsing import Afford, Parsed, explanation_from_parameters, validated_images
from .service import Renderer, Service

__all__ = ["add_routes", "parse_v1", "render_v1_explain", "render_v1_predict"]


def parse_v1(
    body: bytes,
    input_shape: Sequence[int],
    explain: bool,
    default: Explanation | None,
    afford: Afford | None = None,
    max_values: int | None = None,
    num_classes: int | None = None,
) -> Parsed:
    """{"instances": [...], "parameters": {...}} -> images and requested explanation.
    afford: called with the number of instances before they are decoded. max_values: the
    most JSON values the body may hold. num_classes: the model's, to check a target class."""
    doc = load_json(body, max_values=max_values)
    unknown = set(doc) - {"instances", "parameters"}
    if unknown:
        raise WireError(
            f"body: unknown fields {sorted(unknown)}; expected 'instances', 'parameters'"
        )
    instances = doc.get("instances")
    if not isinstance(instances, list) or not instances:
        raise WireError("instances: expected a non-empty list of images (C, H, W)")
    parameters = doc.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise WireError("parameters: expected a JSON object")
    requested = explanation_from_parameters(parameters, default, num_classes=num_classes)
    if afford is not None:
        afford(len(instances))
    if any(isinstance(inst, dict) for inst in instances):
        arr = np.stack([_v1_instance(i, inst, input_shape) for i, inst in enumerate(instances)])
    else:
        arr = numeric_array(instances, "instances")
    images = validated_images(arr, input_shape, "instances")
    return Parsed(images, requested if explain else None)


def _v1_instance(index: int, inst: Any, input_shape: Sequence[int]) -> np.ndarray:
    what = f"instances[{index}]"
    if not isinstance(inst, dict):
        arr = numeric_array(inst, what)
    elif set(inst) != {"b64"} or not isinstance(inst["b64"], str):
        raise WireError(f"{what}: expected a nested list or {{'b64': base64 of float32 bytes}}")
    else:
        try:
            raw = base64.b64decode(inst["b64"], validate=True)
        except ValueError:
            raise WireError(f"{what}.b64: not valid base64") from None
        size = math.prod(input_shape)
        if len(raw) != 4 * size:
            raise WireError(
                f"{what}.b64: {len(raw)} bytes, expected {4 * size} (float32 {input_shape})"
            )
        arr = np.frombuffer(raw, dtype="<f4").reshape(input_shape).copy()
    if arr.shape != tuple(input_shape):
        raise WireError(f"{what}: shape {arr.shape} does not match {tuple(input_shape)}")
    return arr


def _predictions(answer: Answer) -> list[list[float]]:
    values = answer.logits if answer.logits is not None else answer.probabilities
    return values.numpy().tolist()


def render_v1_predict(answer: Answer, parsed: Parsed) -> tuple[bytes, str, dict[str, str]]:
    return dump_json({"predictions": _predictions(answer)}), "application/json", {}


def render_v1_explain(
    answer: Answer, parsed: Parsed, model_name: str
) -> tuple[bytes, str, dict[str, str]]:
    """Vertex AI's ExplainResponse. instanceOutputValue is the prediction the service shows
    for that class (so it reveals nothing more); baselines and approximation errors are
    not estimated and read 0; deployedModelId is the model's name."""
    spec = answer.explanation_spec
    predictions = _predictions(answer)
    expl = answer.explanation
    explanations = []
    if expl is not None and spec is not None:
        maps = expl.numpy()
        for i, label in enumerate(answer.labels.tolist()):
            if spec.target == "all":
                pairs = [(k, maps[i, k]) for k in range(maps.shape[1])]
            else:
                k = label if spec.target == "predicted" else int(spec.target)
                pairs = [(k, maps[i])]
            explanations.append(
                {
                    "attributions": [
                        {
                            "featureAttributions": {INPUT_NAME: m.tolist()},
                            "outputIndex": [k],
                            "instanceOutputValue": predictions[i][k],
                            "baselineOutputValue": 0.0,
                            "approximationError": 0.0,
                        }
                        for k, m in pairs
                    ]
                }
            )
    doc = {"explanations": explanations, "deployedModelId": model_name, "predictions": predictions}
    return dump_json(doc), "application/json", {}


def add_routes(app: FastAPI, service: Service) -> None:
    # Nothing about the model is said to a caller without a key.
    @app.get("/v1/models")
    async def list_models(request: Request) -> Response:
        return await service.authorized_json(
            request, (service.name, None), lambda: {"models": [service.name]}
        )

    @app.get("/v1/models/{name}")
    async def model_status(request: Request, name: str) -> Response:
        return await service.authorized_json(
            request, (name, None), lambda: {"name": name, "ready": True}
        )

    def explain_response(answer: Answer, parsed: Parsed) -> tuple[bytes, str, dict[str, str]]:
        return render_v1_explain(answer, parsed, service.name)

    _add_answer_route(app, service, "predict", render_v1_predict)
    _add_answer_route(app, service, "explain", explain_response)


def _add_answer_route(app: FastAPI, service: Service, verb: str, render: Renderer) -> None:
    """``POST /v1/models/{name}:<verb>``; only ``:explain`` returns explanations."""
    responder = service.responder
    max_values = service.limits.max_json_values

    async def answer(request: Request, name: str) -> Response:
        def parse(body: bytes, afford: Afford) -> Parsed:
            return parse_v1(
                body,
                responder.input_shape,
                verb == "explain",
                responder.explanation,
                afford,
                max_values,
                responder.num_classes,
            )

        return await service.serve(request, f"v1/{verb}", (name, None), parse, render)

    # Named after the verb, as the OpenAPI document's operations are.
    app.post(f"/v1/models/{{name}}:{verb}", name=verb)(answer)
