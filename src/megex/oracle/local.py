"""An in-process service: :class:`LocalOracle`, a Responder that charges a ledger."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from ..accel import same_device
from ..defenses import Defense
from ..explain import Explanation
from ..ledger import MemoryLedger
from .protocol import Answer, VictimModel, validate_images
from .responder import Explainer, Responder

__all__ = ["LocalOracle"]


def _responder_setting(name: str) -> property:
    # LocalOracle's settings are its Responder's: read and changed there (an experiment
    # may set `explanation` on a live oracle).
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
    batch_size, answer_on_device (then answers stay on `device`, and images sent from
    there, its `query_device`, are checked there without a copy to the host) and explainer
    (what computes the maps instead of megex's own methods).
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
        victim: VictimModel,
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
        explainer: Explainer | None = None,
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
            explainer=explainer,
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
