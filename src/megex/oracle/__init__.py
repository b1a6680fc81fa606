"""The black box: the Oracle protocol, the answering engine (:class:`Responder`) and
:class:`LocalOracle`, which is a Responder with a ledger.

One query is one image sent to the oracle, with or without an explanation. A request that
would take the ledger past its budget is refused whole (:class:`BudgetExceeded`) and costs
nothing. Attacks only ever see the Oracle protocol, so the same attack runs in-process or
over HTTP (:class:`megex.client.RemoteOracle`); the HTTP service answers with the same
Responder and charges a SQLite ledger (:mod:`megex.serving`).

- :mod:`.protocol`: the Oracle protocol, the Answer, the check of the images, the
  refusals, :class:`OracleView`, and :class:`VictimModel` (what an oracle needs of a victim).
- :mod:`.responder`: :class:`Responder`, the answering engine, which counts nothing.
- :mod:`.local`: :class:`LocalOracle`, a Responder with a ledger.
"""

from ..ledger import BudgetExceeded
from .local import LocalOracle
from .protocol import (
    PREDICTION_MODES,
    Answer,
    ExplanationNotOffered,
    InvalidQuery,
    Oracle,
    OracleView,
    VictimModel,
    validate_images,
)
from .responder import DEFAULT_CHUNK_PASSES, Responder

__all__ = [
    "DEFAULT_CHUNK_PASSES",
    "PREDICTION_MODES",
    "Answer",
    "BudgetExceeded",
    "ExplanationNotOffered",
    "InvalidQuery",
    "LocalOracle",
    "Oracle",
    "OracleView",
    "Responder",
    "VictimModel",
    "validate_images",
]
