"""The black box: the Oracle protocol, the answering engine (:class:`Responder`) and
:class:`LocalOracle`, which is a Responder with a ledger.

One query is one image sent to the oracle, with or without an explanation. A request that
would take the ledger past its budget is refused whole (:class:`BudgetExceeded`) and costs
nothing. Attacks only ever see the Oracle protocol, so the same attack runs in-process or
over HTTP (:class:`megex.client.RemoteOracle`); the HTTP service answers with the same
Responder and charges a SQLite ledger (:mod:`megex.serving`).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from .accel import same_device
from .compute import TurnLock, passes_per_image
from .defenses import Defense
from .explain import Explanation, explain
from .ledger import BudgetExceeded, MemoryLedger
from .models import fast_layout
from .victim import Victim

__all__ = [
    "Answer",
    "Oracle",
    "LocalOracle",
    "OracleView",
    "Responder",
    "BudgetExceeded",
    "InvalidQuery",
    "ExplanationNotOffered",
    "DEFAULT_CHUNK_PASSES",
    "PREDICTION_MODES",
    "validate_images",
]

PREDICTION_MODES = ("probabilities", "logits", "top-k", "label")
# Model passes per chunk of a request that a service computes (megex.compute): a chunk is
# the longest that one key's request makes another key's request wait. For a digits-sized
# model on one loaded CPU core: about 0.2 s (the gradient of every class over 341 images, or
# integrated gradients with 256 steps over every class for one image); no slower in all than
# larger chunks, since explain() batches SmoothGrad samples and IG steps of small chunks.
DEFAULT_CHUNK_PASSES = 4096


class InvalidQuery(ValueError):
    """The images sent to the oracle are not valid (shape, dtype, range, NaN/inf)."""


class ExplanationNotOffered(ValueError):
    """The oracle does not return the explanation that was asked for."""


@dataclass
class Answer:
    """What the oracle returns for a batch of N images.

    probabilities: (N, K) float32 as the service exposes them (top-k: others are 0;
    label only: one-hot). logits: (N, K) in "logits" mode, else None. labels: (N,) argmax.
    explanation: (N, K, C, H, W) for target "all", (N, C, H, W) otherwise, or None;
    explanation_spec says which explanation it is.
    """

    probabilities: torch.Tensor
    labels: torch.Tensor
    logits: torch.Tensor | None = None
    explanation: torch.Tensor | None = None
    explanation_spec: Explanation | None = None
    prediction: str = "probabilities"


@runtime_checkable
class Oracle(Protocol):
    """Anything an attack can query: in-process, over HTTP, or the user's own."""

    @property
    def input_shape(self) -> tuple[int, int, int]: ...

    @property
    def num_classes(self) -> int: ...

    @property
    def queries_used(self) -> int: ...

    @property
    def remaining(self) -> int | float: ...

    def query(self, x: torch.Tensor, explanation: Explanation | bool | None = None) -> Answer: ...


def validate_images(
    x: Any, input_shape: Sequence[int], name: str = "x", keep_device: bool = False
) -> torch.Tensor:
    """Check a batch of images and return it as a float32 CPU tensor (on its own device with
    `keep_device`), or raise InvalidQuery."""
    if isinstance(x, np.ndarray):
        if not np.issubdtype(x.dtype, np.floating):
            raise InvalidQuery(
                f"{name}: dtype {x.dtype} is not floating point; send float32 images in [0, 1] "
                "(divide uint8 images by 255)"
            )
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise InvalidQuery(
            f"{name}: expected a torch tensor or numpy array, got {type(x).__name__}"
        )
    if not x.is_floating_point():
        raise InvalidQuery(
            f"{name}: dtype {x.dtype} is not floating point; send float32 images in [0, 1] "
            "(divide uint8 images by 255)"
        )
    expected = tuple(int(s) for s in input_shape)
    if x.dim() != 4 or tuple(x.shape[1:]) != expected:
        raise InvalidQuery(
            f"{name}: shape {tuple(x.shape)} does not match (N, {', '.join(map(str, expected))})"
        )
    if x.shape[0] == 0:
        raise InvalidQuery(f"{name}: the batch is empty")
    x = x.detach().to(x.device if keep_device else "cpu", torch.float32)
    # One read of the values (on an accelerator, the one wait for the device in answering:
    # bad images are refused before they are charged).
    summary = torch.stack([torch.isfinite(x).all().to(x.dtype), x.amin(), x.amax()])
    finite, lo, hi = summary.tolist()
    if not finite:
        raise InvalidQuery(f"{name}: contains NaN or infinite values")
    if lo < 0.0 or hi > 1.0:
        raise InvalidQuery(f"{name}: values must lie in [0, 1], got min {lo:.4g} and max {hi:.4g}")
    return x


class Responder:
    """The answering engine around a :class:`Victim`; it counts nothing.

    prediction: "probabilities", "logits", "top-k" (with top_k) or "label". explanation: the
    explanation returned when asked (None: none is returned). allow_explanation_choice:
    whether a request may ask for a different explanation (method, target, output), as
    Vertex AI's parameters allow. defenses (:mod:`megex.defenses`): applied to what is
    returned, in order, after the honest answer is computed; a defence may also change the
    explanation that is computed (:meth:`computed_explanation`; the answer still reports the
    one asked for), and a request for an explanation that a defence cannot apply to is
    refused (ExplanationNotOffered). The victim is moved to `device` in place, and on a CPU
    its convolutions are put in channels-last layout (:func:`megex.models.fast_layout`: same
    values, several times faster explanations).

    A request is computed in chunks of at most `batch_size` images and `chunk_passes` model
    passes (:func:`megex.compute.passes_per_image`; at least one image; None: no limit), one
    chunk at a time, with parties (the service's API keys) taking turns between chunks.

    answer_on_device: keep answers on `device` instead of copying them to the host (an
    in-process caller on the same device, :mod:`megex.accel`); not with defences, which
    draw their noise on the host.
    """

    def __init__(
        self,
        victim: Victim,
        *,
        prediction: str = "probabilities",
        top_k: int | None = None,
        explanation: Explanation | None = Explanation("gradient"),
        allow_explanation_choice: bool = True,
        defenses: Sequence[Defense] = (),
        seed: int = 0,
        device: str = "cpu",
        batch_size: int = 1024,
        chunk_passes: int | None = None,
        answer_on_device: bool = False,
    ):
        if prediction not in PREDICTION_MODES:
            raise ValueError(
                f"prediction: unknown mode {prediction!r}; expected one of "
                f"{', '.join(PREDICTION_MODES)}"
            )
        if prediction == "top-k" and (top_k is None or not 1 <= int(top_k) <= victim.num_classes):
            raise ValueError(f"top_k: expected 1..{victim.num_classes} for 'top-k', got {top_k}")
        for defense in defenses:
            if not isinstance(defense, Defense):
                raise ValueError(
                    f"defenses: expected Defense objects (megex.defenses.build_defense), "
                    f"got {type(defense).__name__}"
                )
        if prediction in ("logits", "label") and any(d.side == "prediction" for d in defenses):
            # Logits would expose what a probability defence hides; labels are unaffected.
            raise ValueError(
                f"defenses: a defence of probabilities does not apply to prediction={prediction!r}"
            )
        self._answer_on_device = False
        self._defenses: list[Defense] = []
        self.answer_on_device = answer_on_device
        self.victim = fast_layout(victim.eval(), device)
        self.prediction = prediction
        self.top_k = None if top_k is None else int(top_k)
        self.explanation = explanation
        self.allow_explanation_choice = allow_explanation_choice
        self.defenses = list(defenses)
        self.device = device
        if int(batch_size) < 1 or (chunk_passes is not None and int(chunk_passes) < 1):
            raise ValueError(
                f"batch_size and chunk_passes: expected >= 1, got {batch_size} and {chunk_passes}"
            )
        self.batch_size = int(batch_size)
        self.chunk_passes = None if chunk_passes is None else int(chunk_passes)
        self._turns = TurnLock()
        self._rng = torch.Generator().manual_seed(seed)
        if explanation is not None:
            # A defence that cannot apply to the configured explanation is a setting mistake.
            self.computed_explanation(explanation)

    @property
    def defenses(self) -> list[Defense]:
        return self._defenses

    @defenses.setter
    def defenses(self, defenses: Sequence[Defense]) -> None:
        self._check_device_answers(self.answer_on_device, defenses)
        self._defenses = list(defenses)

    @property
    def answer_on_device(self) -> bool:
        return self._answer_on_device

    @answer_on_device.setter
    def answer_on_device(self, value: bool) -> None:
        self._check_device_answers(value, self.defenses)
        self._answer_on_device = bool(value)

    @staticmethod
    def _check_device_answers(on_device: bool, defenses: Sequence[Defense]) -> None:
        if on_device and defenses:
            raise ValueError(
                "answer_on_device: defences draw their noise on the host; answer on the host "
                "(answer_on_device=False) to apply them"
            )

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.victim.input_shape

    @property
    def num_classes(self) -> int:
        return self.victim.num_classes

    def state_dict(self) -> dict[str, Any]:
        """The noise generator's state, for a service that restarts."""
        return {"rng": self._rng.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._rng.set_state(state["rng"])

    def computed_explanation(self, spec: Explanation) -> Explanation:
        """The explanation computed to answer a request for `spec`: `spec` as the defences
        change it (a smoothing defence computes SmoothGrad for a gradient). Raises
        ValueError when a defence cannot apply to `spec`."""
        for defense in self.defenses:
            spec = defense.computed_explanation(spec)
        return spec

    def passes_per_image(self, spec: Explanation | None) -> int:
        """Model passes that answering one image with explanation `spec` (as requested)
        costs, with the explanation the defences make the service compute."""
        computed = None if spec is None else self.computed_explanation(spec)
        return passes_per_image(computed, self.num_classes)

    def resolve_explanation(self, requested: Explanation | bool | None) -> Explanation | None:
        """The explanation a request will get, or ExplanationNotOffered."""
        spec = self._resolve(requested)
        if spec is not None:
            try:
                self.computed_explanation(spec)
            except ValueError as err:
                raise ExplanationNotOffered(f"explanation: {err}") from None
        return spec

    def _resolve(self, requested: Explanation | bool | None) -> Explanation | None:
        if requested is None or requested is False:
            return None
        if self.explanation is None:
            raise ExplanationNotOffered("explanation: this oracle returns no explanations")
        if requested is True:
            return self.explanation
        if not isinstance(requested, Explanation):
            raise ExplanationNotOffered(
                "explanation: expected None, True or an Explanation, "
                f"got {type(requested).__name__}"
            )
        if requested != self.explanation and not self.allow_explanation_choice:
            raise ExplanationNotOffered(
                f"explanation: this oracle returns only {self.explanation.describe()}, "
                f"not {requested.describe()}"
            )
        if isinstance(requested.target, int) and requested.target >= self.num_classes:
            raise ExplanationNotOffered(
                f"explanation target: class {requested.target} does not exist "
                f"(the model has {self.num_classes} classes)"
            )
        return requested

    def answer(self, images: torch.Tensor, spec: Explanation | None, party: Hashable = 0) -> Answer:
        """Answer images checked by :func:`validate_images` with the explanation `spec`
        resolved by :meth:`resolve_explanation`, chunk by chunk, taking turns on the compute
        with other parties' requests."""
        return self.answer_with_probabilities(images, spec, party)[0]

    def answer_with_probabilities(
        self, images: torch.Tensor, spec: Explanation | None, party: Hashable = 0
    ) -> tuple[Answer, torch.Tensor]:
        """:meth:`answer`, and the victim's honest (N, K) probabilities (before defences and
        the prediction mode): what a service shows its query monitors, never its clients."""
        size = self.batch_size
        if self.chunk_passes is not None:
            per_image = self.passes_per_image(spec)
            size = max(1, min(size, self.chunk_passes // per_image))
        parts, honest = [], []
        for i in range(0, images.shape[0], size):
            with self._turns.turn(party):
                part, probs = self._answer_chunk(images[i : i + size], spec)
            parts.append(part)
            honest.append(probs)
        if len(parts) == 1:
            return parts[0], honest[0]
        first = parts[0]
        answer = Answer(
            _joined([p.probabilities for p in parts]),
            _joined([p.labels for p in parts]),
            None if first.logits is None else _joined([p.logits for p in parts]),
            None if first.explanation is None else _joined([p.explanation for p in parts]),
            spec,
            self.prediction,
        )
        return answer, _joined(honest)

    def _answer_chunk(
        self, images: torch.Tensor, spec: Explanation | None
    ) -> tuple[Answer, torch.Tensor]:
        # The service computes at its own precision: an in-process caller's autocast (an
        # attack running in bf16, megex.accel) must not reach the victim.
        with torch.autocast(torch.device(self.device).type, enabled=False):
            return self._answer_chunk_fp32(images, spec)

    def _answer_chunk_fp32(
        self, images: torch.Tensor, spec: Explanation | None
    ) -> tuple[Answer, torch.Tensor]:
        # Every defence acts on each image alone, so a chunk is answered as a whole request.
        chunk = images.to(self.device)
        with torch.no_grad():
            chunk_logits = self.victim(chunk)
        logits = chunk_logits.float()
        if not self.answer_on_device:
            logits = logits.cpu()
        probs = torch.softmax(logits, dim=1)
        # Kept apart from what the defences return (a defence may work in place).
        honest = probs.clone() if self.defenses else probs
        labels = logits.argmax(dim=1)
        for defense in self.defenses:
            probs = defense.probabilities(probs, labels=labels, generator=self._rng)
        shown_logits = None
        if self.prediction == "logits":
            shown_logits = logits
        elif self.prediction == "top-k":
            top = probs.topk(self.top_k, dim=1)
            probs = torch.zeros_like(probs).scatter_(1, top.indices, top.values)
        elif self.prediction == "label":
            probs = torch.nn.functional.one_hot(labels, self.num_classes).float()
        expl = None
        if spec is not None:
            computed = self.computed_explanation(spec)
            expl = explain(self.victim, chunk, computed, generator=self._rng, logits=chunk_logits)
            if not self.answer_on_device:
                expl = expl.cpu()
            for defense in self.defenses:
                expl = defense.explanation(
                    expl, generator=self._rng, labels=labels, target=spec.target
                )
        return Answer(probs, labels, shown_logits, expl, spec, self.prediction), honest


class OracleView:
    """An Oracle in front of another: its shape, classes, count and what it has left are the
    wrapped oracle's, and every query goes through to it. Subclasses watch or limit the
    queries (a run's budget, a recording, a query monitor)."""

    def __init__(self, oracle: Oracle):
        self.oracle = oracle

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.oracle.input_shape

    @property
    def num_classes(self) -> int:
        return self.oracle.num_classes

    @property
    def queries_used(self) -> int:
        return self.oracle.queries_used

    @property
    def remaining(self) -> int | float:
        return self.oracle.remaining

    def query(self, x: torch.Tensor, explanation: Any = None) -> Answer:
        return self.oracle.query(x, explanation=explanation)


def _responder_setting(name: str) -> property:
    # LocalOracle's settings are its Responder's: read and changed there (bench.py sets
    # `explanation` on a live oracle).
    def get(oracle: LocalOracle) -> Any:
        return getattr(oracle.responder, name)

    def set_(oracle: LocalOracle, value: Any) -> None:
        setattr(oracle.responder, name, value)

    return property(get, set_, doc=f"The responder's {name}.")


class LocalOracle:
    """An in-process service: a :class:`Responder` that charges a :class:`MemoryLedger`.

    budget: queries allowed (None: unlimited); queries_used: queries already spent (a
    service restored from a checkpoint). The other settings are the Responder's:
    prediction, top_k, explanation, allow_explanation_choice, defenses, seed, device,
    batch_size and answer_on_device (then answers stay on `device`, and images sent from
    there, its `query_device`, are checked there without a copy to the host).
    """

    # One account: an in-process oracle has one client.
    ACCOUNT = 0

    input_shape = _responder_setting("input_shape")
    num_classes = _responder_setting("num_classes")
    victim = _responder_setting("victim")
    prediction = _responder_setting("prediction")
    top_k = _responder_setting("top_k")
    explanation = _responder_setting("explanation")
    allow_explanation_choice = _responder_setting("allow_explanation_choice")
    defenses = _responder_setting("defenses")
    device = _responder_setting("device")
    batch_size = _responder_setting("batch_size")
    answer_on_device = _responder_setting("answer_on_device")

    def __init__(
        self,
        victim: Victim,
        budget: int | None = None,
        *,
        prediction: str = "probabilities",
        top_k: int | None = None,
        explanation: Explanation | None = Explanation("gradient"),
        allow_explanation_choice: bool = True,
        defenses: Sequence[Defense] = (),
        seed: int = 0,
        queries_used: int = 0,
        device: str = "cpu",
        batch_size: int = 1024,
        answer_on_device: bool = False,
    ):
        self.responder = Responder(
            victim,
            prediction=prediction,
            top_k=top_k,
            explanation=explanation,
            allow_explanation_choice=allow_explanation_choice,
            defenses=defenses,
            seed=seed,
            device=device,
            batch_size=batch_size,
            answer_on_device=answer_on_device,
        )
        self.ledger = MemoryLedger(budget)
        self.ledger.set_used(self.ACCOUNT, queries_used)

    @property
    def budget(self) -> int | float:
        """Queries allowed (math.inf: unlimited)."""
        budget = self.ledger.usage(self.ACCOUNT).budget
        return math.inf if budget is None else budget

    @property
    def queries_used(self) -> int:
        return self.ledger.usage(self.ACCOUNT).used

    @property
    def remaining(self) -> int | float:
        return self.ledger.usage(self.ACCOUNT).remaining

    @property
    def query_device(self) -> str:
        """Where a caller's images may come from without a copy: `device` when answers stay
        there, else the host."""
        return str(self.device) if self.answer_on_device else "cpu"

    def state_dict(self) -> dict[str, Any]:
        """The service's state (ledger and noise RNG), for a service that restarts."""
        return {"queries_used": self.queries_used, **self.responder.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ledger.set_used(self.ACCOUNT, int(state["queries_used"]))
        self.responder.load_state_dict(state)

    def resolve_explanation(self, requested: Explanation | bool | None) -> Explanation | None:
        """The explanation a request will get, or ExplanationNotOffered."""
        return self.responder.resolve_explanation(requested)

    def query(self, x: Any, explanation: Explanation | bool | None = None) -> Answer:
        """Answer a batch of images; charges one query per image."""
        sent_from_here = isinstance(x, torch.Tensor) and same_device(x.device, self.query_device)
        images = validate_images(x, self.input_shape, keep_device=sent_from_here)
        spec = self.responder.resolve_explanation(explanation)
        charge = self.ledger.charge(self.ACCOUNT, images.shape[0])
        try:
            return self.responder.answer(images, spec)
        except BaseException:
            self.ledger.refund(charge)
            raise


def _joined(parts: list[torch.Tensor]) -> torch.Tensor:
    # One chunk (the usual case) is returned as is: torch.cat would copy it.
    return parts[0] if len(parts) == 1 else torch.cat(parts)
