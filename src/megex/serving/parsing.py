"""What a request asks for: its images, the explanation its parameters choose and, for the
Open Inference Protocol, its outputs. Shared by both protocols' parsers."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..explain import Explanation, parse_target
from ..oracle import InvalidQuery, validate_images
from .codec import WireError
from .errors import bad_request

__all__ = ["Afford", "Parsed", "explanation_from_parameters", "validated_images"]

# Called by a parser with the number of images a request holds, as soon as it knows it and
# before it decodes them; raises when the key cannot pay for that many.
Afford = Callable[[int], None]

# Vertex AI's names for explanation settings -> megex's.
_ALIASES = {
    "noiseSigma": "sigma",
    "noisySampleCount": "samples",
    "stepCount": "steps",
    "explanation_method": "method",
    "explanation_target": "target",
    "explanation_output": "output",
}
_EXPLANATION_KEYS = {"method", "target", "output", "sigma", "samples", "steps", "baseline"}


@dataclass
class Parsed:
    """A request reduced to what the service needs, plus what its renderer needs."""

    images: torch.Tensor
    explanation: Explanation | bool | None
    outputs: list[tuple[str, bool]] = field(default_factory=list)  # V2: (name, binary)
    request_id: str | None = None


def validated_images(arr: np.ndarray, input_shape: Sequence[int], what: str) -> torch.Tensor:
    """`arr` as images the model takes, or WireError."""
    try:
        return validate_images(torch.from_numpy(arr), input_shape, name=what)
    except InvalidQuery as err:
        raise WireError(str(err), "invalid_images") from None


def explanation_from_parameters(
    parameters: Mapping[str, Any],
    default: Explanation | None,
    ignore: Iterable[str] = (),
    num_classes: int | None = None,
) -> Explanation | bool:
    """The explanation that request `parameters` ask for: True (the server's own) when they
    set nothing, else an Explanation built over the server's defaults. Raises HTTPError 400
    for unknown keys or values, and for a target class the model (of `num_classes`) lacks."""
    settings: dict[str, Any] = {}
    ignored = set(ignore)
    for key, value in parameters.items():
        if key in ignored or key.startswith("triton_"):
            continue
        name = _ALIASES.get(key, key)
        if name not in _EXPLANATION_KEYS:
            known = sorted(_EXPLANATION_KEYS | set(_ALIASES))
            raise bad_request(f"parameters: unknown {key[:80]!r}; known: {', '.join(known)}")
        settings[name] = value
    if not settings:
        return True
    base = default or Explanation()
    method = settings.pop("method", base.method)
    target = settings.pop("target", base.target)
    output = settings.pop("output", base.output)
    params = dict(base.params) if method == base.method else {}
    params.update(settings)
    try:
        spec = Explanation(method, target=parse_target(target), output=output, **params)
    except (ValueError, TypeError, OverflowError) as err:
        raise bad_request(_shortened(str(err)), "invalid_explanation") from None
    if num_classes is not None and isinstance(spec.target, int) and spec.target >= num_classes:
        raise bad_request(
            f"parameters.target: class {_shortened(str(spec.target))} does not exist; expected "
            f"'predicted', 'all' or a class index 0..{num_classes - 1}",
            "unknown_target",
        )
    return spec


def _shortened(text: str, limit: int = 300) -> str:
    # Messages may quote what a client sent, which may be anything.
    return text if len(text) <= limit else text[: limit - 3] + "..."
