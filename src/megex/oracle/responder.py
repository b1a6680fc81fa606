"""The answering engine around a victim: :class:`Responder`, which counts nothing."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch

from ..compute import TurnLock, passes_per_image
from ..defenses import Defense
from ..explain import Explanation, explain
from ..models import fast_layout
from .protocol import PREDICTION_MODES, Answer, ExplanationNotOffered, VictimModel

__all__ = ["DEFAULT_CHUNK_PASSES", "Explainer", "Responder"]

# What computes the maps: explain()'s signature, (forward, images, spec, generator=,
# logits=) -> maps; megex.integrations.explainers adapts captum's methods and user functions.
Explainer = Callable[..., torch.Tensor]

# Model passes per chunk of a request that a service computes (megex.compute): a chunk is
# the longest that one key's request makes another key's request wait. For a digits-sized
# model on one loaded CPU core: about 0.2 s (the gradient of every class over 341 images, or
# integrated gradients with 256 steps over every class for one image); no slower in all than
# larger chunks, since explain() batches SmoothGrad samples and IG steps of small chunks.
DEFAULT_CHUNK_PASSES = 4096


class Responder:
    """The answering engine around a victim (:class:`VictimModel`); it counts nothing.

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

    explainer: what computes the maps instead of :func:`megex.explain.explain` (an
    :data:`Explainer`, e.g. a captum method); `explanation` then labels its maps, requests
    may choose target and output (if allowed) but not another method, and no defence may
    change the explanation computed.
    """

    def __init__(
        self,
        victim: VictimModel,
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
        explainer: Explainer | None = None,
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
        self.explainer = explainer
        if explainer is not None and explanation is None:
            raise ValueError("explainer: give the explanation that labels its maps")
        if explanation is not None:
            # A defence that cannot apply to the configured explanation is a setting mistake.
            computed = self.computed_explanation(explanation)
            if explainer is not None and computed != explanation:
                # The explainer computes its own maps: a defence cannot change them first.
                raise ValueError(
                    f"defenses: a defence that changes the explanation computed (to "
                    f"{computed.describe()}) does not apply to an explainer"
                )

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
        if self.explainer is not None and requested.method != self.explanation.method:
            raise ExplanationNotOffered(
                f"explanation: this oracle computes its maps with its own explainer, labelled "
                f"{self.explanation.method!r}, not {requested.method!r}"
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
            compute = explain if self.explainer is None else self.explainer
            expl = compute(self.victim, chunk, computed, generator=self._rng, logits=chunk_logits)
            if not self.answer_on_device:
                expl = expl.cpu()
            for defense in self.defenses:
                expl = defense.explanation(
                    expl, generator=self._rng, labels=labels, target=spec.target
                )
        return Answer(probs, labels, shown_logits, expl, spec, self.prediction), honest


def _joined(parts: list[torch.Tensor]) -> torch.Tensor:
    # One chunk (the usual case) is returned as is: torch.cat would copy it.
    return parts[0] if len(parts) == 1 else torch.cat(parts)
