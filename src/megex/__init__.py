"""megex: measure how much a model gives away when it returns explanations.

Core imports need only torch and numpy; the server, client, plots and reports import their
extras lazily.
"""

from . import data
from .engine import AttackResult, run
from .explain import Explanation, explain
from .oracle import (
    Answer,
    BudgetExceeded,
    ExplanationNotOffered,
    InvalidQuery,
    LocalOracle,
    Oracle,
)
from .victim import Victim, train_victim

__version__ = "0.1.0"

__all__ = [
    "Answer",
    "AttackResult",
    "BudgetExceeded",
    "Explanation",
    "ExplanationNotOffered",
    "InvalidQuery",
    "LocalOracle",
    "Oracle",
    "Victim",
    "data",
    "explain",
    "run",
    "train_victim",
    "__version__",
]
