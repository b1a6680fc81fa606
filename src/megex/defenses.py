"""Defences: what a service changes in its answers to make extraction harder.

A defence is a small named object with documented parameters. The
:class:`~megex.oracle.Responder` (and so the HTTP service and :class:`~megex.oracle.LocalOracle`)
applies a list of them in order, after it has computed the honest answer, so the query ledger
is unaffected. Each acts on one side of the answer:

- prediction side, :meth:`Defense.probabilities` on the (N, K) probabilities: ``round``,
  ``top-classes``, ``label-only``, ``reverse-sigmoid``;
- explanation side, :meth:`Defense.explanation` on the maps, (N, C, H, W) or one per class
  (N, K, C, H, W): ``gaussian`` (alias ``noise``), ``laplace``, ``quantize``, ``topk``,
  ``sign``, ``predicted-only``, ``coarsen``, ``withhold``; and ``smooth``, which changes the
  explanation the service computes (:meth:`Defense.computed_explanation`) instead of the maps.

Every defence keeps shapes and dtypes and draws its randomness only from the ``generator``
it is given (the Responder's seeded generator, whose state a service saves), never from the
global RNG. Prediction defences keep the victim's predicted class at the largest returned
probability (ties are possible after rounding) unless their :attr:`Defense.keeps_label` is
False.

A defence is built from a spec (:func:`build_defense`): ``name``, ``name:value`` (its first
parameter: ``round:2``, ``noise:0.5``, ``topk:0.1``) or ``name:param=value,param=value``
(``laplace:scale=0.5``, ``quantize:bits=4``, ``reverse-sigmoid:beta=0.5,gamma=0.2``).
:func:`describe_defenses` lists them all with their side, parameters, defaults and rules
(``megex defenses``). What a defence costs in explanation quality is measured by
:mod:`megex.utility`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from .explain import MAX_PASSES, MAX_SIGMA, Explanation

__all__ = [
    "DEFENSES",
    "SIDES",
    "Coarsen",
    "Defense",
    "ExplanationNoise",
    "ExplanationSign",
    "ExplanationTopK",
    "GaussianNoise",
    "LabelOnly",
    "LaplaceNoise",
    "Param",
    "PredictedClassOnly",
    "Quantize",
    "ReverseSigmoid",
    "RoundProbabilities",
    "SmoothGradDefense",
    "TopClasses",
    "Withhold",
    "build_defense",
    "build_defenses",
    "describe_defenses",
]

SIDES = ("prediction", "explanation")

_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


@dataclass(frozen=True)
class Param:
    """One parameter of a defence: its name, type (float, int or bool), default, bounds and
    a one-line help. `low_open`: the lower bound itself is not allowed."""

    name: str
    kind: type
    default: Any
    help: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False

    @property
    def rule(self) -> str:
        """What a value must be, in words (shown in errors and in `megex defenses`)."""
        if self.kind is bool:
            return "true or false"
        what = "a whole number" if self.kind is int else "a number"
        low, high = self.low, self.high
        if self.kind is int and low is not None and high is not None:
            return f"{what} in {low:g}..{high:g}"
        if low is not None and high is not None:
            return f"{what} in {'(' if self.low_open else '['}{low:g}, {high:g}]"
        if low is not None:
            return f"{what} {'>' if self.low_open else '>='} {low:g}"
        return what

    def parse(self, value: Any, defense: str) -> Any:
        """`value` (a Python value, or text from a spec) checked against the rule."""
        where = f"defense {defense!r}: parameter {self.name!r}"
        if self.kind is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
                return value.strip().lower() in _TRUE
            raise ValueError(f"{where}: expected {self.rule}, got {value!r}")
        number = _number(value, where, self.rule)
        if self.kind is int:
            if not number.is_integer():
                raise ValueError(f"{where}: expected {self.rule}, got {value!r}")
            number = int(number)
        too_low = self.low is not None and (
            number <= self.low if self.low_open else number < self.low
        )
        too_high = self.high is not None and number > self.high
        if too_low or too_high:
            raise ValueError(f"{where}: expected {self.rule}, got {value!r}")
        return number

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "type": self.kind.__name__,
            "default": self.default,
            "rule": self.rule,
            "help": self.help,
        }


def _number(value: Any, where: str, rule: str) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{where}: expected {rule}, got {value!r}")
    try:
        number = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: {value!r} is not a number (expected {rule})") from None
    if not math.isfinite(number):
        raise ValueError(f"{where}: expected {rule}, got {value!r}")
    return number


class Defense:
    """A perturbation a service applies to its answers; the base class changes nothing.

    Subclasses set `name`, `side` ("prediction" or "explanation"), `summary` (one line),
    `params` (their :class:`Param` declarations, whose order is the order of `name:value`
    specs) and override the hook of their side. The constructor checks every parameter
    against its rule and raises ValueError naming the defence and the parameter.
    """

    name: ClassVar[str] = "none"
    side: ClassVar[str] = "explanation"
    summary: ClassVar[str] = "returns answers unchanged"
    params: ClassVar[tuple[Param, ...]] = ()
    # Prediction side: whether the victim's predicted class keeps the largest probability.
    keeps_label: ClassVar[bool] = True

    def __init__(self, **values: Any) -> None:
        declared = {p.name for p in self.params}
        unknown = sorted(set(values) - declared)
        if unknown:
            expected = ", ".join(sorted(declared)) if declared else "no parameters"
            raise ValueError(
                f"defense {self.name!r}: unknown parameter {unknown[0]!r}; expected {expected}"
            )
        for param in self.params:
            setattr(self, param.name, param.parse(values.get(param.name, param.default), self.name))

    # --- the hooks ----------------------------------------------------------------------

    def probabilities(
        self,
        p: torch.Tensor,
        *,
        labels: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """The (N, K) probabilities returned for honest (or earlier defended) ones `p`.
        labels: the victim's predicted classes (N,) (default: p's argmax)."""
        return p

    def explanation(
        self,
        e: torch.Tensor,
        generator: torch.Generator | None = None,
        *,
        labels: torch.Tensor | None = None,
        target: str | int | None = None,
    ) -> torch.Tensor:
        """The maps returned for maps `e`: (N, C, H, W), or (N, K, C, H, W) for every class.
        labels: the victim's predicted classes (N,); target: the explanation's target
        ("predicted", "all" or a class index; None: unknown)."""
        return e

    def computed_explanation(self, spec: Explanation) -> Explanation:
        """The explanation the service computes when `spec` is asked for (default: `spec`).
        Raises ValueError when the defence cannot apply to `spec`."""
        return spec

    # --- description --------------------------------------------------------------------

    def values(self) -> dict[str, Any]:
        """The parameters' values, by name."""
        return {p.name: getattr(self, p.name) for p in self.params}

    def spec(self) -> str:
        """The spec that builds this defence again (:func:`build_defense`)."""
        values = self.values()
        if not values:
            return self.name
        return f"{self.name}:" + ",".join(f"{k}={_text(v)}" for k, v in values.items())

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "side": self.side, **self.values()}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.values().items())
        return f"{type(self).__name__}({args})"


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        short = f"{value:g}"
        return short if float(short) == value else repr(value)  # exact, and short when it can
    return str(value)


def _map_dims(e: torch.Tensor) -> tuple[int, int, int]:
    """The dimensions of one map (C, H, W): the last three, for (N, ...) and (N, K, ...)."""
    if e.dim() not in (4, 5):
        raise ValueError(
            f"explanation: expected maps of shape (N, C, H, W) or (N, K, C, H, W), "
            f"got {tuple(e.shape)}"
        )
    return (e.dim() - 3, e.dim() - 2, e.dim() - 1)


def _rms(e: torch.Tensor) -> torch.Tensor:
    """Each map's norm divided by the square root of its size (broadcastable to e)."""
    return e.pow(2).mean(dim=_map_dims(e), keepdim=True).sqrt()


# --- prediction side ----------------------------------------------------------------------


class RoundProbabilities(Defense):
    """Round probabilities to `decimals` places (a common API default). Rounding is
    monotone, so the predicted class keeps the largest value, possibly tied with others."""

    name = "round"
    side = "prediction"
    summary = "round probabilities to a number of decimal places"
    params = (Param("decimals", int, 2, "decimal places kept", low=0, high=8),)

    def __init__(self, decimals: int = 2) -> None:
        super().__init__(decimals=decimals)

    def probabilities(
        self,
        p: torch.Tensor,
        *,
        labels: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        return torch.round(p, decimals=self.decimals)


class TopClasses(Defense):
    """Return only the `k` largest probabilities, the others as 0 (not renormalised, as the
    prediction mode "top-k" does); the predicted class is always among those kept."""

    name = "top-classes"
    side = "prediction"
    summary = "return only the k largest probabilities, the others as 0"
    params = (Param("k", int, 3, "classes whose probability is returned", low=1),)

    def __init__(self, k: int = 3) -> None:
        super().__init__(k=k)

    def probabilities(
        self,
        p: torch.Tensor,
        *,
        labels: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        if self.k >= p.shape[1]:
            return p
        ranking = p.clone()
        if labels is not None:
            # Ties at the top must not push the predicted class out.
            ranking.scatter_(1, labels.view(-1, 1).to(p.device), math.inf)
        keep = ranking.topk(self.k, dim=1).indices
        return torch.zeros_like(p).scatter_(1, keep, p.gather(1, keep))


class LabelOnly(Defense):
    """Return only the predicted class, as a one-hot vector."""

    name = "label-only"
    side = "prediction"
    summary = "return only the predicted class, as a one-hot vector"

    def probabilities(
        self,
        p: torch.Tensor,
        *,
        labels: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        labels = p.argmax(dim=1) if labels is None else labels.to(p.device)
        return F.one_hot(labels, p.shape[1]).to(p.dtype)


class ReverseSigmoid(Defense):
    """The reverse sigmoid perturbation of Lee, Edwards, Molloy and Srivatsa, "Defending
    against NN model stealing attacks using deceptive perturbations" (IEEE S&P Workshops
    2019, arXiv 1806.00054):

        r(y) = beta * (s(gamma * s^-1(y)) - 1/2),    y' = alpha * (y - r(y)),

    with s the sigmoid, s^-1(y) = log(y / (1 - y)) applied to each probability, and alpha
    the normaliser that makes y' sum to 1. beta (> 0) scales the perturbation, gamma (> 0)
    sets how fast it saturates. As in the Adversarial Robustness Toolbox's implementation,
    y is clipped to [1e-9, 1 - 1e-9] inside s^-1 and y - r(y) at 0 before normalising.

    The perturbation is not monotone (for small gamma it raises small probabilities more
    than larger ones), so for some outputs the predicted class would lose the largest
    value; with `keep_label` (the default, the paper's aim of an accuracy-preserving
    defence) the predicted class's value is then swapped with the largest one. With
    keep_label=false the formula is returned as it is, and the label can change.
    """

    name = "reverse-sigmoid"
    side = "prediction"
    summary = "Lee et al.'s reverse sigmoid perturbation of the probabilities"
    params = (
        Param("beta", float, 1.0, "size of the perturbation", low=0, low_open=True),
        Param("gamma", float, 0.1, "steepness of the sigmoid", low=0, low_open=True),
        Param("keep_label", bool, True, "swap values so that the predicted class stays on top"),
    )
    _CLIP = 1e-9

    def __init__(self, beta: float = 1.0, gamma: float = 0.1, keep_label: bool = True) -> None:
        super().__init__(beta=beta, gamma=gamma, keep_label=keep_label)

    @property
    def keeps_label(self) -> bool:  # type: ignore[override]
        return self.keep_label

    def probabilities(
        self,
        p: torch.Tensor,
        *,
        labels: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        # float64: s^-1 of probabilities near 1 needs more than float32's precision.
        y = p.double()
        clipped = y.clamp(self._CLIP, 1 - self._CLIP)
        r = self.beta * (torch.sigmoid(self.gamma * torch.logit(clipped)) - 0.5)
        out = (y - r).clamp_min(0.0)
        out = out / out.sum(dim=1, keepdim=True)
        if self.keep_label:
            labels = p.argmax(dim=1) if labels is None else labels.to(p.device)
            out = _label_on_top(out, labels)
        return out.to(p.dtype)


def _label_on_top(p: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Swap each row's value at `labels` with its largest value, where they differ."""
    rows = torch.arange(p.shape[0], device=p.device)
    top = p.argmax(dim=1)
    at_label = p[rows, labels]
    largest = p[rows, top]
    out = p.clone()
    out[rows, top] = at_label
    out[rows, labels] = largest
    return out


# --- explanation side: noise, quantisation, sparsity --------------------------------------


class GaussianNoise(Defense):
    """Add Gaussian noise to each map, scaled to that map's norm: the noise's expected
    squared norm is scale^2 times the map's (per-value std = scale * ||map|| / sqrt(size)),
    so a strength means the same on any model. All-zero maps stay zero."""

    name = "gaussian"
    side = "explanation"
    summary = "add Gaussian noise whose norm is `scale` times the map's"
    params = (Param("scale", float, 0.5, "noise norm relative to the map's norm", low=0),)

    def __init__(self, scale: float = 0.5) -> None:
        super().__init__(scale=scale)

    def explanation(
        self,
        e: torch.Tensor,
        generator: torch.Generator | None = None,
        *,
        labels: torch.Tensor | None = None,
        target: str | int | None = None,
    ) -> torch.Tensor:
        noise = torch.randn(e.shape, generator=generator, dtype=e.dtype).to(e.device)
        return e + self.scale * _rms(e) * noise


class LaplaceNoise(Defense):
    """Add Laplace noise to each map, scaled to that map's norm as :class:`GaussianNoise`
    (same expected squared norm: Laplace scale b = scale * ||map|| / sqrt(2 * size))."""

    name = "laplace"
    side = "explanation"
    summary = "add Laplace noise whose norm is `scale` times the map's"
    params = (Param("scale", float, 0.5, "noise norm relative to the map's norm", low=0),)

    def __init__(self, scale: float = 0.5) -> None:
        super().__init__(scale=scale)

    def explanation(
        self,
        e: torch.Tensor,
        generator: torch.Generator | None = None,
        *,
        labels: torch.Tensor | None = None,
        target: str | int | None = None,
    ) -> torch.Tensor:
        # A Laplace variable with scale 1 is the difference of two Exp(1) variables.
        a = torch.empty(e.shape, dtype=e.dtype).exponential_(generator=generator)
        b = torch.empty(e.shape, dtype=e.dtype).exponential_(generator=generator)
        b_scale = self.scale * _rms(e) / math.sqrt(2.0)
        return e + b_scale * (a - b).to(e.device)


class Quantize(Defense):
    """Quantise each map to `bits` bits, symmetrically around 0: values become multiples of
    step = max|map| / (2^(bits-1) - 1), rounded to the nearest, so 0 stays 0 and the
    largest magnitude is kept exactly (bits=2: -step, 0, +step). All-zero maps stay zero."""

    name = "quantize"
    side = "explanation"
    summary = "quantise each map to k bits, symmetric around 0"
    params = (Param("bits", int, 4, "bits per value, sign included", low=2, high=16),)

    def __init__(self, bits: int = 4) -> None:
        super().__init__(bits=bits)

    def explanation(
        self,
        e: torch.Tensor,
        generator: torch.Generator | None = None,
        *,
        labels: torch.Tensor | None = None,
        target: str | int | None = None,
    ) -> torch.Tensor:
        levels = 2 ** (self.bits - 1) - 1
        peak = e.abs().amax(dim=_map_dims(e), keepdim=True)
        step = torch.where(peak > 0, peak / levels, torch.ones_like(peak))
        return torch.round(e / step) * step


class ExplanationTopK(Defense):
    """Keep only the `fraction` of attributions with the largest magnitude in each map (the
    others become 0; values tied with the smallest kept one are kept too)."""

    name = "topk"
    side = "explanation"
    summary = "keep only the largest-magnitude fraction of each map"
    params = (
        Param("fraction", float, 0.1, "fraction of values kept", low=0, low_open=True, high=1),
    )

    def __init__(self, fraction: float = 0.1) -> None:
        super().__init__(fraction=fraction)

    def explanation(
        self,
        e: torch.Tensor,
        generator: torch.Generator | None = None,
        *,
        labels: torch.Tensor | None = None,
        target: str | int | None = None,
    ) -> torch.Tensor:
        _map_dims(e)
        flat = e.flatten(e.dim() - 3)
        k = max(1, int(round(self.fraction * flat.shape[-1])))
        threshold = flat.abs().topk(k, dim=-1).values[..., -1:]
        return (flat * (flat.abs() >= threshold)).view_as(e)


class ExplanationSign(Defense):
    """Return only the sign of each attribution (direction without magnitude)."""

    name = "sign"
    side = "explanation"
    summary = "return only the sign of each attribution"

    def explanation(
        self,
        e: torch.Tensor,
        generator: torch.Generator | None = None,
        *,
        labels: torch.Tensor | None = None,
        target: str | int | None = None,
    ) -> torch.Tensor:
        return torch.sign(e)


# --- explanation side: what is explained, and how finely ---------------------------------


class PredictedClassOnly(Defense):
    """Explain only the predicted class. Maps of every class (N, K, C, H, W): the predicted
    class's map is kept and the others are zeroed. One map per image (N, C, H, W) for a
    class index target: zeroed where that class is not the predicted one. Maps of the
    predicted class are returned unchanged."""

    name = "predicted-only"
    side = "explanation"
    summary = "keep the predicted class's map, zero the maps of other classes"

    def explanation(
        self,
        e: torch.Tensor,
        generator: torch.Generator | None = None,
        *,
        labels: torch.Tensor | None = None,
        target: str | int | None = None,
    ) -> torch.Tensor:
        _map_dims(e)
        if labels is None:
            raise ValueError("defense 'predicted-only': needs the predicted labels")
        labels = labels.to(e.device)
        if e.dim() == 5:
            keep = F.one_hot(labels, e.shape[1]).to(e.dtype)
            return e * keep.view(*keep.shape, 1, 1, 1)
        if isinstance(target, int) and not isinstance(target, bool):
            keep = (labels == target).to(e.dtype)
            return e * keep.view(-1, 1, 1, 1)
        return e


class SmoothGradDefense(Defense):
    """Return SmoothGrad instead of the plain gradient: the service computes the average of
    `samples` gradients at the image plus Gaussian noise of std `sigma` (on the [0, 1]
    scale), drawn from its seeded generator. A request for "gradient" is computed as
    "smoothgrad" with these settings; one for "smoothgrad" gets at least this sigma and
    these samples. Integrated gradients and input x gradient cannot be smoothed this way:
    a service with this defence does not offer them (ExplanationNotOffered, HTTP 403).

    The answer reports the explanation that was asked for (target and output are unchanged;
    a service does not announce its defences), and the compute it costs is SmoothGrad's,
    counted in model passes (:func:`megex.compute.passes_per_image`).
    """

    name = "smooth"
    side = "explanation"
    summary = "compute SmoothGrad (noise sigma, samples) instead of the plain gradient"
    params = (
        Param("sigma", float, 0.1, "noise std on the [0, 1] scale", low=0, low_open=True,
              high=MAX_SIGMA),
        Param("samples", int, 8, "noisy gradients averaged per image", low=1, high=MAX_PASSES),
    )  # fmt: skip

    def __init__(self, sigma: float = 0.1, samples: int = 8) -> None:
        super().__init__(sigma=sigma, samples=samples)

    def computed_explanation(self, spec: Explanation) -> Explanation:
        if spec.method == "gradient":
            sigma, samples = self.sigma, self.samples
        elif spec.method == "smoothgrad":
            sigma = max(self.sigma, spec.params["sigma"])
            samples = max(self.samples, spec.params["samples"])
        else:
            raise ValueError(
                f"defense 'smooth': applies to gradient and smoothgrad explanations, not "
                f"{spec.method}"
            )
        return Explanation(
            "smoothgrad", target=spec.target, output=spec.output, sigma=sigma, samples=samples
        )


class Coarsen(Defense):
    """Average each map over p x p patches (per channel) and return it at full size, every
    pixel of a patch holding the patch's mean; patches at the right and bottom edges are
    smaller when p does not divide the size."""

    name = "coarsen"
    side = "explanation"
    summary = "average each map over p x p patches (same shape returned)"
    params = (Param("patch", int, 2, "patch side p, in pixels", low=1),)

    def __init__(self, patch: int = 2) -> None:
        super().__init__(patch=patch)

    def explanation(
        self,
        e: torch.Tensor,
        generator: torch.Generator | None = None,
        *,
        labels: torch.Tensor | None = None,
        target: str | int | None = None,
    ) -> torch.Tensor:
        _map_dims(e)
        p = self.patch
        if p == 1:
            return e
        h, w = e.shape[-2:]
        planes = e.reshape(-1, 1, h, w)
        pad = (0, -w % p, 0, -h % p)
        total = F.avg_pool2d(F.pad(planes, pad), p) * (p * p)
        count = F.avg_pool2d(F.pad(torch.ones_like(planes[:1]), pad), p) * (p * p)
        means = total / count
        full = means.repeat_interleave(p, dim=-2).repeat_interleave(p, dim=-1)
        return full[..., :h, :w].reshape(e.shape).to(e.dtype)


class Withhold(Defense):
    """Withhold the maps of a random `fraction` of the images: each image independently,
    with that probability, gets all-zero maps (every class's, for target "all"), while its
    prediction is returned and its query counted as usual.

    All-zero is the convention for "no map": MEGEX (:meth:`megex.attacks.megex.MEGEX.
    loss_with_maps`) reads a zero attribution as one the map does not tell, so a withheld
    image adds nothing to its gradient-matching term, and its generator step gets no
    victim gradient from it.
    """

    name = "withhold"
    side = "explanation"
    summary = "return all-zero maps for a random fraction of the images"
    params = (
        Param("fraction", float, 0.5, "probability that an image's maps are withheld", low=0,
              high=1),
    )  # fmt: skip

    def __init__(self, fraction: float = 0.5) -> None:
        super().__init__(fraction=fraction)

    def explanation(
        self,
        e: torch.Tensor,
        generator: torch.Generator | None = None,
        *,
        labels: torch.Tensor | None = None,
        target: str | int | None = None,
    ) -> torch.Tensor:
        _map_dims(e)
        draws = torch.rand(e.shape[0], generator=generator)
        shown = (draws >= self.fraction).to(e.dtype).to(e.device)
        return e * shown.view(-1, *([1] * (e.dim() - 1)))


# The registry: name -> class; "noise" is the name `gaussian` had first.
DEFENSES: dict[str, type[Defense]] = {
    cls.name: cls
    for cls in (
        RoundProbabilities,
        TopClasses,
        LabelOnly,
        ReverseSigmoid,
        GaussianNoise,
        LaplaceNoise,
        Quantize,
        ExplanationTopK,
        ExplanationSign,
        PredictedClassOnly,
        SmoothGradDefense,
        Coarsen,
        Withhold,
    )
}
_ALIASES = {"noise": "gaussian"}
DEFENSES["noise"] = GaussianNoise
# The earlier name of the Gaussian defence, for code that imports it.
ExplanationNoise = GaussianNoise


def describe_defenses() -> list[dict[str, Any]]:
    """Every defence: name, aliases, side, summary, keeps_label (prediction side) and its
    parameters (name, type, default, rule, help), in the registry's order."""
    out = []
    for name, cls in DEFENSES.items():
        if name in _ALIASES:
            continue
        entry: dict[str, Any] = {
            "name": name,
            "aliases": sorted(a for a, target in _ALIASES.items() if target == name),
            "side": cls.side,
            "summary": cls.summary,
            "params": [p.describe() for p in cls.params],
        }
        if cls.side == "prediction":
            # reverse-sigmoid keeps the label only with keep_label (its default).
            entry["keeps_label"] = bool(cls().keeps_label)
        out.append(entry)
    return out


def build_defense(spec: str) -> Defense:
    """A defence from its spec: 'name', 'name:value' (its first parameter, e.g. 'round:2',
    'noise:0.5', 'topk:0.1') or 'name:param=value,param=value' (e.g. 'laplace:scale=0.5',
    'quantize:bits=4', 'reverse-sigmoid:beta=0.5,gamma=0.2'). Raises ValueError naming the
    defence, the parameter and what was expected."""
    if not isinstance(spec, str):
        raise ValueError(f"defense: expected a spec such as 'round:2', got {spec!r}")
    head, colon, body = spec.strip().partition(":")
    name = head.strip().lower().replace("_", "-")
    if name not in DEFENSES:
        raise ValueError(
            f"defense: unknown {head.strip()!r}; expected one of "
            f"{', '.join(n for n in DEFENSES if n not in _ALIASES)} (megex defenses lists them)"
        )
    cls = DEFENSES[name]
    body = body.strip()
    if not body:
        if colon:
            raise ValueError(f"defense {name!r}: nothing after ':' in {spec!r}")
        return cls()
    if not cls.params:
        raise ValueError(f"defense {name!r} takes no parameters, got {body!r}")
    values: dict[str, str] = {}
    if "=" not in body:
        values[cls.params[0].name] = body
    else:
        for item in body.split(","):
            key, eq, value = item.partition("=")
            key = key.strip().replace("-", "_")
            if not eq or not key or not value.strip():
                raise ValueError(
                    f"defense {name!r}: expected param=value pairs separated by commas, "
                    f"got {item.strip()!r}"
                )
            if key in values:
                raise ValueError(f"defense {name!r}: parameter {key!r} given twice")
            if key not in {p.name for p in cls.params}:
                raise ValueError(
                    f"defense {name!r}: unknown parameter {key!r}; expected "
                    f"{', '.join(p.name for p in cls.params)}"
                )
            values[key] = value.strip()
    return cls(**values)


def build_defenses(specs: Iterable[str]) -> list[Defense]:
    """Defences from specs, in order (the order in which they are applied)."""
    return [build_defense(spec) for spec in specs]
