"""Data-free model extraction attacks over the Oracle protocol."""

from . import presets
from .base import Attack
from .config import AttackConfig, SettingError, describe_settings, parse_setting
from .dfme import DFME, DFMEConfig
from .megex import MEGEX, MEGEXConfig

ATTACKS = {"megex": MEGEX, "dfme": DFME}

__all__ = [
    "ATTACKS",
    "Attack",
    "AttackConfig",
    "DFME",
    "DFMEConfig",
    "MEGEX",
    "MEGEXConfig",
    "SettingError",
    "describe_settings",
    "parse_setting",
    "presets",
]
