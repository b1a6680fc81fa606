"""Explainers from outside megex: the maps a service returns computed by a captum attribution
method or by a user's function, so that a provider measures the explainer it ships.

A spec names one (``megex serve --explainer SPEC``; :func:`build_explainer`):

- ``captum:NAME`` or ``captum:NAME:key=value,...``: ``captum.attr.NAME`` (any attribution
  method made from the model alone: ``Saliency``, ``InputXGradient``,
  ``IntegratedGradients``, ``GuidedBackprop``, ...) or ``NoiseTunnel(NAME)``; the key=value
  pairs go to its ``attribute`` call (``captum:Saliency:abs=false``). Where megex has the
  same method, the explanation's settings are passed as captum's: ``n_steps`` and
  ``baselines`` from integrated gradients' steps and baseline, ``nt_samples`` and ``stdevs``
  from SmoothGrad's samples and sigma (``nt_type="smoothgrad"``); otherwise captum's own
  defaults hold (Saliency's ``abs=True``, IntegratedGradients' Gauss-Legendre rule).
- ``package.module:function``: a function ``(model, images, targets) -> maps``, called with
  gradients enabled; model maps images to the explanation's output (probabilities unless
  the request asks for log-probabilities or logits), targets holds one class per image.

Either way the explanation's target is resolved as megex does ("predicted": the class the
model predicts for the clean image; "all": one call per class, stacked to (N, K, C, H, W)),
and the maps must have the images' shape. captum draws SmoothGrad noise from torch's global
generator: each call seeds it, in a forked state, from the service's generator, so that the
answers follow the service's seed. captum is needed only for ``captum:`` specs.
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..explain import Explanation, output_values

__all__ = ["CAPTUM_METHODS", "ExternalExplainer", "build_explainer"]

# captum's methods that megex computes too -> the megex method that labels their maps.
CAPTUM_METHODS = {
    "Saliency": "gradient",
    "InputXGradient": "input_x_gradient",
    "IntegratedGradients": "integrated_gradients",
    "NoiseTunnel(Saliency)": "smoothgrad",
}

# (model in the output space, images, per-image classes, the explanation) -> maps.
Attribute = Callable[[nn.Module, torch.Tensor, torch.Tensor, Explanation], torch.Tensor]


@dataclass(frozen=True)
class ExternalExplainer:
    """An explainer with :func:`megex.explain.explain`'s signature (a Responder's
    `explainer`). spec: as given; method: the megex method that labels its maps (None: no
    megex method is the same; the service's configured one labels them)."""

    spec: str
    method: str | None
    attribute: Attribute
    seeded: bool = False

    def __call__(
        self,
        forward: Callable[[torch.Tensor], torch.Tensor],
        x: torch.Tensor,
        explanation: Explanation,
        *,
        generator: torch.Generator | None = None,
        logits: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if logits is None:
            with torch.no_grad():
                logits = forward(x)
        model = _InOutputSpace(forward, explanation.output)
        target = explanation.target
        with torch.enable_grad(), _seeded(generator if self.seeded else None):
            if target == "all":
                maps = [
                    self._maps(model, x, _classes(x, k), explanation)
                    for k in range(logits.shape[1])
                ]
                return torch.stack(maps, dim=1)
            classes = logits.argmax(dim=1) if target == "predicted" else _classes(x, target)
            return self._maps(model, x, classes, explanation)

    def _maps(
        self, model: nn.Module, x: torch.Tensor, classes: torch.Tensor, spec: Explanation
    ) -> torch.Tensor:
        maps = self.attribute(model, x, classes, spec)
        if not isinstance(maps, torch.Tensor) or maps.shape != x.shape:
            shape = tuple(maps.shape) if isinstance(maps, torch.Tensor) else type(maps).__name__
            raise ValueError(
                f"explainer {self.spec}: returned {shape}, expected maps shaped like the images "
                f"{tuple(x.shape)}"
            )
        return maps.detach().to(x.dtype)


class _InOutputSpace(nn.Module):
    """The model as the explanation sees it: images -> probabilities, log-probabilities or
    logits (captum's methods take an nn.Module or a function)."""

    def __init__(self, forward: Callable[[torch.Tensor], torch.Tensor], output: str):
        super().__init__()
        self.forward_fn, self.output = forward, output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return output_values(self.forward_fn(x), self.output)


def _classes(x: torch.Tensor, k: int) -> torch.Tensor:
    return torch.full((x.shape[0],), int(k), dtype=torch.long, device=x.device)


class _seeded:
    """Seed torch's global generator from `generator` within a forked generator state."""

    def __init__(self, generator: torch.Generator | None):
        self.generator = generator
        self._fork: Any = None

    def __enter__(self) -> None:
        if self.generator is not None:
            seed = int(torch.randint(0, 2**62, (1,), generator=self.generator))
            self._fork = torch.random.fork_rng(devices=[])
            self._fork.__enter__()
            torch.manual_seed(seed)

    def __exit__(self, *exc: Any) -> None:
        if self._fork is not None:
            self._fork.__exit__(*exc)
            self._fork = None


def build_explainer(spec: str) -> ExternalExplainer:
    """The explainer of a spec: ``captum:NAME[:key=value,...]`` or ``module:function``.
    Raises ValueError (one line) for an unknown captum method, a missing captum, or a
    module without the function."""
    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(
            f"expected captum:NAME (e.g. captum:IntegratedGradients) or module:function, "
            f"got {spec!r}"
        )
    head, _, rest = spec.strip().partition(":")
    if head == "captum":
        return _captum(spec, rest)
    return _function(spec, head, rest)


def _function(spec: str, module_name: str, name: str) -> ExternalExplainer:
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"{spec}: cannot import {module_name!r} ({err})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"{spec}: module {module_name!r} has no function {name!r}")

    def attribute(model: nn.Module, x: torch.Tensor, classes: torch.Tensor, _: Explanation):
        return fn(model, x, classes)

    return ExternalExplainer(spec, None, attribute)


_NOISE_TUNNEL = re.compile(r"NoiseTunnel\((?P<inner>\w+)\)")


def _captum(spec: str, rest: str) -> ExternalExplainer:
    name, _, options = rest.partition(":")
    name = name.strip()
    try:
        from captum import attr
    except ImportError:
        raise ValueError(f"{spec}: captum is not installed (pip install captum)") from None
    tunnel = _NOISE_TUNNEL.fullmatch(name)
    inner = tunnel["inner"] if tunnel else name
    cls = getattr(attr, inner, None) if inner.isidentifier() else None
    if not (isinstance(cls, type) and issubclass(cls, attr.Attribution)):
        known = ", ".join([*CAPTUM_METHODS, "..."])
        raise ValueError(f"{spec}: {name!r} is not a captum.attr attribution method ({known})")
    if _required_arguments(cls) != 1:
        raise ValueError(f"{spec}: {inner} needs more than the model (a layer or neurons)")
    kwargs = _options(spec, options)

    def attribute(model: nn.Module, x: torch.Tensor, classes: torch.Tensor, e: Explanation):
        method = cls(model)
        settings: dict[str, Any] = {}
        if tunnel:
            method = attr.NoiseTunnel(method)
            settings["nt_type"] = "smoothgrad"
            if e.method == "smoothgrad":
                settings.update(nt_samples=e.params["samples"], stdevs=e.params["sigma"])
        elif inner == "IntegratedGradients" and e.method == "integrated_gradients":
            settings.update(n_steps=e.params["steps"], baselines=e.params["baseline"])
        # captum sets requires_grad on the images it is given: give it a copy.
        return method.attribute(x.detach().clone(), target=classes, **{**settings, **kwargs})

    return ExternalExplainer(spec, CAPTUM_METHODS.get(name), attribute, seeded=True)


def _required_arguments(cls: type) -> int:
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    return sum(
        p.default is inspect.Parameter.empty
        and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        for p in params
    )


def _options(spec: str, text: str) -> dict[str, Any]:
    """key=value pairs for captum's attribute(): true/false, numbers, or text."""
    options: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, eq, value = (s.strip() for s in part.partition("="))
        if not eq or not key.isidentifier():
            raise ValueError(f"{spec}: expected key=value after the method, got {part!r}")
        options[key] = _value(value)
    return options


def _value(text: str) -> Any:
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text
