"""Data-free model extraction attacks over the Oracle protocol."""

from . import presets
from .adaptive import AdaptiveMEGEX, AdaptiveMEGEXConfig, adapt_to
from .base import Attack
from .config import AttackConfig, SettingError, describe_settings, parse_setting
from .dfme import DFME, DFMEConfig
from .evasive import EvasiveDFME, EvasiveMEGEX
from .megex import MEGEX, MEGEXConfig

ATTACKS = {
    "megex": MEGEX,
    "dfme": DFME,
    "megex-adaptive": AdaptiveMEGEX,
    "megex-evasive": EvasiveMEGEX,
    "dfme-evasive": EvasiveDFME,
}

__all__ = [
    "ATTACKS",
    "AdaptiveMEGEX",
    "AdaptiveMEGEXConfig",
    "Attack",
    "AttackConfig",
    "DFME",
    "DFMEConfig",
    "EvasiveDFME",
    "EvasiveMEGEX",
    "MEGEX",
    "MEGEXConfig",
    "SettingError",
    "adapt_to",
    "describe_settings",
    "parse_setting",
    "presets",
]
