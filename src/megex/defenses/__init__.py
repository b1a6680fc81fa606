"""Defences: what a service changes in its answers to make extraction harder.

A defence is a small named object whose parameters are declared as dataclass fields
(:func:`megex.settings.setting`: default, help and rule, written once). The
:class:`~megex.oracle.Responder` (and so the HTTP service and :class:`~megex.oracle.LocalOracle`)
applies a list of them in order, after it has computed the honest answer, so the query ledger
is unaffected. Each acts on one side of the answer:

- prediction side (:mod:`.prediction`), :meth:`Defense.probabilities` on the (N, K)
  probabilities: ``round``, ``top-classes``, ``label-only``, ``reverse-sigmoid``;
- explanation side (:mod:`.explanation`), :meth:`Defense.explanation` on the maps,
  (N, C, H, W) or one per class (N, K, C, H, W): ``gaussian`` (alias ``noise``),
  ``laplace``, ``quantize``, ``topk``, ``sign``, ``predicted-only``, ``coarsen``,
  ``withhold``; and ``smooth``, which changes the explanation the service computes
  (:meth:`Defense.computed_explanation`) instead of the maps.

Every defence keeps shapes and dtypes and draws its randomness only from the ``generator``
it is given (the Responder's seeded generator, whose state a service saves), never from the
global RNG. Prediction defences keep the victim's predicted class at the largest returned
probability (ties are possible after rounding) unless their :attr:`Defense.keeps_label` is
False.

A defence is built from a spec (:func:`build_defense`, in :mod:`.specs`): ``name``,
``name:value`` (its first parameter: ``round:2``, ``noise:0.5``, ``topk:0.1``) or
``name:param=value,param=value`` (``laplace:scale=0.5``, ``quantize:bits=4``,
``reverse-sigmoid:beta=0.5,gamma=0.2``). :func:`describe_defenses` lists them all with their
side, parameters, defaults and rules (``megex defenses``). What a defence costs in
explanation quality is measured by :mod:`megex.experiments.utility`.
"""

from .base import SIDES, Defense, Param
from .explanation import (
    Coarsen,
    ExplanationNoise,
    ExplanationSign,
    ExplanationTopK,
    GaussianNoise,
    LaplaceNoise,
    PredictedClassOnly,
    Quantize,
    SmoothGradDefense,
    Withhold,
)
from .prediction import LabelOnly, ReverseSigmoid, RoundProbabilities, TopClasses
from .specs import DEFENSES, build_defense, build_defenses, describe_defenses

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
