"""Explanation methods: signed input gradients of a model, batched.

An explanation is described by :class:`Explanation` ``(method, target, output, **params)``:

- method: ``gradient``, ``smoothgrad``, ``integrated_gradients`` or ``input_x_gradient``;
- target: ``"predicted"`` (the class the model predicts for the clean input), a class
  index, or ``"all"`` (one map per class);
- output: the quantity differentiated: ``probability``, ``log_probability`` or ``logit``.

Maps are signed (no abs) and taken with respect to the [0, 1] input. For target "all" they
have shape (N, K, C, H, W), else (N, C, H, W).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["Explanation", "METHODS", "OUTPUTS", "explain", "output_values", "parse_target"]

METHODS = ("gradient", "smoothgrad", "integrated_gradients", "input_x_gradient")
OUTPUTS = ("probability", "log_probability", "logit")

# One request must not be able to hold the service for minutes: at most this many
# forward/backward passes per image (SmoothGrad samples, IG steps).
MAX_PASSES = 256
MAX_SIGMA = 10.0
# Images per batched pass over SmoothGrad samples or integrated-gradients steps: a small
# batch (a service computes requests in small chunks) evaluates several samples or steps in
# one pass, which is several times faster than one small pass per sample or step.
_POINTS_PER_PASS = 256

_DEFAULT_PARAMS: dict[str, dict[str, Any]] = {
    "gradient": {},
    "input_x_gradient": {},
    # Vertex AI's SmoothGrad defaults: noiseSigma 0.1, noisySampleCount 3.
    "smoothgrad": {"sigma": 0.1, "samples": 3},
    "integrated_gradients": {"steps": 16, "baseline": 0.0},
}


@dataclass(frozen=True)
class Explanation:
    """What kind of explanation to compute. Parameters depend on the method:
    smoothgrad: sigma (noise std on the [0, 1] scale), samples;
    integrated_gradients: steps, baseline (a number, the fill value of the baseline image).
    """

    method: str = "gradient"
    target: str | int = "predicted"
    output: str = "probability"
    params: dict[str, Any] = field(default_factory=dict)

    def __init__(
        self,
        method: str = "gradient",
        target: str | int = "predicted",
        output: str = "probability",
        **params: Any,
    ):
        if method not in METHODS:
            raise ValueError(
                f"explanation method: unknown {method!r}; expected one of {', '.join(METHODS)}"
            )
        if isinstance(target, bool) or not (
            target in ("predicted", "all") or isinstance(target, int)
        ):
            raise ValueError(
                f"explanation target: expected 'predicted', 'all' or a class index, got {target!r}"
            )
        if isinstance(target, int) and target < 0:
            raise ValueError(f"explanation target: class index must be >= 0, got {target}")
        if output not in OUTPUTS:
            raise ValueError(
                f"explanation output: unknown {output!r}; expected one of {', '.join(OUTPUTS)}"
            )
        allowed = _DEFAULT_PARAMS[method]
        unknown = set(params) - set(allowed)
        if unknown:
            raise ValueError(
                f"explanation parameters: {sorted(unknown)} not known for {method!r}; "
                f"expected {sorted(allowed) or 'none'}"
            )
        merged = {**allowed, **params}
        if method == "smoothgrad":
            merged = {
                "sigma": _number("smoothgrad sigma", merged["sigma"], 0.0, MAX_SIGMA),
                "samples": _count("smoothgrad samples", merged["samples"], MAX_PASSES),
            }
        if method == "integrated_gradients":
            merged = {
                "steps": _count("integrated_gradients steps", merged["steps"], MAX_PASSES),
                "baseline": _number("integrated_gradients baseline", merged["baseline"], 0.0, 1.0),
            }
        object.__setattr__(self, "method", method)
        object.__setattr__(self, "target", target)
        object.__setattr__(self, "output", output)
        object.__setattr__(self, "params", merged)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "target": self.target, "output": self.output, **self.params}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Explanation:
        data = dict(data)
        return cls(
            data.pop("method", "gradient"),
            target=data.pop("target", "predicted"),
            output=data.pop("output", "probability"),
            **data,
        )

    def __hash__(self) -> int:
        return hash((self.method, self.target, self.output, tuple(sorted(self.params.items()))))

    def describe(self) -> str:
        extra = ", ".join(f"{k}={v}" for k, v in self.params.items())
        extra = ", " + extra if extra else ""
        return f"{self.method}(target={self.target}, output={self.output}{extra})"


def parse_target(value: Any) -> str | int:
    """An explanation target as a command line or a request writes it: "predicted", "all",
    a class index, or its digits as text ("3") or a whole float (3.0, as JSON may carry it).
    Raises ValueError for anything else; a class index is checked by :class:`Explanation`."""
    if isinstance(value, str):
        text = value.strip()
        if text.isascii() and text.isdigit():
            return int(text)
        if value in ("predicted", "all"):
            return value
    elif isinstance(value, float) and value.is_integer():
        return int(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        return value
    raise ValueError(
        f"explanation target: expected 'predicted', 'all' or a class index, got {value!r}"
    )


def _number(name: str, value: Any, low: float, high: float) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{name}: expected a number, got {value!r}") from None
    if not (math.isfinite(number) and low <= number <= high):
        raise ValueError(f"{name}: expected a number in [{low:g}, {high:g}], got {value!r}")
    return number


def _count(name: str, value: Any, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name}: expected a whole number, got {value!r}")
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        raise ValueError(f"{name}: expected a whole number, got {value!r}")
    if not 1 <= value <= high:
        raise ValueError(f"{name}: expected 1..{high}, got {value!r}")
    return int(value)


def output_values(logits: torch.Tensor, output: str) -> torch.Tensor:
    """A model's outputs in an explanation's output space: logit, log_probability or
    probability (what the maps are gradients of)."""
    if output == "logit":
        return logits
    if output == "log_probability":
        return torch.log_softmax(logits, dim=1)
    return torch.softmax(logits, dim=1)


def batched_classes(device: torch.device) -> bool:
    """Whether all-class maps are computed in one batched backward: off the CPU (the same
    values; on a CPU the per-class loop is kept, which measured faster there)."""
    return device.type != "cpu" or _BATCH_CLASSES_ON_CPU


# Tests compare the batched pass with the loop on a CPU.
_BATCH_CLASSES_ON_CPU = False


def _gradients(
    forward: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    output: str,
    classes: torch.Tensor | None,
) -> torch.Tensor:
    """d output[class] / dx for each image; classes None means every class (N, K, ...)."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        values = output_values(forward(x), output)
        if classes is not None:
            selected = values.gather(1, classes.view(-1, 1)).sum()
            (grad,) = torch.autograd.grad(selected, x)
            return grad
        k = values.shape[1]
        if batched_classes(x.device):
            # Every class's backward in one batched pass (vmap over the K one-hot output
            # gradients): one launch of each kernel instead of K, which an accelerator needs.
            eye = torch.eye(k, dtype=values.dtype, device=values.device)
            seeds = eye.unsqueeze(1).expand(k, *values.shape)
            (grads,) = torch.autograd.grad(values, x, grad_outputs=seeds, is_grads_batched=True)
            return grads.transpose(0, 1)
        grads = []
        # Images in a batch are independent (eval mode), so one backward per class
        # gives every image's gradient for that class.
        for c in range(k):
            (g,) = torch.autograd.grad(values[:, c].sum(), x, retain_graph=c < k - 1)
            grads.append(g)
        return torch.stack(grads, dim=1)


def explain(
    forward: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    explanation: Explanation,
    *,
    generator: torch.Generator | None = None,
    logits: torch.Tensor | None = None,
) -> torch.Tensor:
    """Compute `explanation` for images `x` (float, [0, 1], (N, C, H, W)).

    `forward` maps images to logits (e.g. a :class:`megex.Victim` in eval mode).
    `generator` seeds SmoothGrad's noise. `logits`: forward(x) in eval mode if the caller
    has it already (a service answering the same images), which saves one forward pass.
    A module is explained in eval mode (its mode is restored afterwards), so that batch
    statistics never mix images.
    """
    if isinstance(forward, torch.nn.Module) and forward.training:
        forward.eval()
        try:
            return explain(forward, x, explanation, generator=generator)
        finally:
            forward.train()
    if logits is None:
        with torch.no_grad():
            logits = forward(x)
    elif logits.shape[0] != x.shape[0]:
        raise ValueError(
            f"logits: expected {x.shape[0]} rows (one per image), got {logits.shape[0]}"
        )
    classes = _explained_classes(logits, explanation.target, x)
    method, params, output = explanation.method, explanation.params, explanation.output
    if method == "gradient":
        return _gradients(forward, x, output, classes)
    if method == "input_x_gradient":
        grad = _gradients(forward, x, output, classes)
        return grad * (x if classes is not None else x.unsqueeze(1))
    if method == "smoothgrad":
        return _smoothgrad(forward, x, output, classes, params, generator)
    return _integrated_gradients(forward, x, output, classes, params)


def _explained_classes(logits: torch.Tensor, target: Any, x: torch.Tensor) -> torch.Tensor | None:
    """The class explained for each image (None: every class), from the target and logits."""
    num_classes = logits.shape[1]
    if target == "all":
        return None
    if target == "predicted":
        return logits.argmax(dim=1)
    if target >= num_classes:
        raise ValueError(
            f"explanation target: class {target} does not exist (model has {num_classes})"
        )
    return torch.full((x.shape[0],), int(target), dtype=torch.long, device=x.device)


def _smoothgrad(
    forward: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    output: str,
    classes: torch.Tensor | None,
    params: dict[str, Any],
    generator: torch.Generator | None,
) -> torch.Tensor:
    """SmoothGrad: the mean gradient over noisy copies of the images."""

    def noisy(_: int) -> torch.Tensor:
        # Drawn on the CPU so that a CPU generator seeds it wherever the model runs.
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        return x + params["sigma"] * noise

    total = _summed_gradients(forward, noisy, params["samples"], x, output, classes)
    return total / params["samples"]


def _integrated_gradients(
    forward: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    output: str,
    classes: torch.Tensor | None,
    params: dict[str, Any],
) -> torch.Tensor:
    """Integrated gradients: midpoint Riemann sum along the straight path baseline -> x."""
    baseline = torch.full_like(x, params["baseline"])
    steps = params["steps"]
    delta = x - baseline

    def on_path(i: int) -> torch.Tensor:
        return baseline + ((i + 0.5) / steps) * delta

    total = _summed_gradients(forward, on_path, steps, x, output, classes)
    return (total / steps) * (delta if classes is not None else delta.unsqueeze(1))


def _summed_gradients(
    forward: Callable[[torch.Tensor], torch.Tensor],
    point: Callable[[int], torch.Tensor],
    count: int,
    x: torch.Tensor,
    output: str,
    classes: torch.Tensor | None,
) -> torch.Tensor:
    """The sum over i < count of the gradients at `point(i)` (a batch shaped like x), with
    as many points per pass as fit in _POINTS_PER_PASS images."""
    n = x.shape[0]
    group = max(1, min(count, _POINTS_PER_PASS // max(1, n)))
    total = None
    for start in range(0, count, group):
        points = [point(i) for i in range(start, min(count, start + group))]
        repeated = None if classes is None else classes.repeat(len(points))
        g = _gradients(forward, torch.cat(points), output, repeated)
        g = g.view(len(points), n, *g.shape[1:]).sum(0)
        total = g if total is None else total + g
    return total
