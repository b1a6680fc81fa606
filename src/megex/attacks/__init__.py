"""Data-free model extraction attacks over the Oracle protocol."""

from .base import LITERAL, Attack, AttackConfig, AttackResult
from .dfme import DFME, DFMEConfig
from .megex import MEGEX, MEGEXConfig

ATTACKS = {"megex": MEGEX, "dfme": DFME}

__all__ = [
    "ATTACKS",
    "LITERAL",
    "Attack",
    "AttackConfig",
    "AttackResult",
    "DFME",
    "DFMEConfig",
    "MEGEX",
    "MEGEXConfig",
]
