"""Model extraction attacks over the Oracle protocol: data-free (MEGEX, DFME, DisGUIDE, dual
students, IDEAL and their variants) and with the attacker's own images (knockoff, JBDA and their
maps variants)."""

from . import presets
from .adaptive import AdaptiveMEGEX, AdaptiveMEGEXConfig, adapt_to, applicable_settings
from .adaptive_pool import AdaptiveKnockoffMaps, AdaptiveKnockoffMapsConfig
from .base import Attack
from .config import AttackConfig, SettingError, describe_settings, parse_setting
from .dfme import DFME, DFMEConfig
from .disguide import DisGUIDE, DisGUIDEConfig, DisGUIDEMaps, DisGUIDEMapsConfig
from .dual_students import DualStudents, DualStudentsConfig
from .evasive import EvasiveDFME, EvasiveMEGEX
from .ideal import Ideal, IdealConfig
from .jbda import JBDA, JBDAConfig, JBDAMaps, JBDAMapsConfig
from .knockoff import Knockoff, KnockoffConfig, KnockoffMaps, KnockoffMapsConfig
from .megex import MEGEX, MEGEXConfig
from .pool import PoolAttack, PoolAttackConfig

ATTACKS = {
    "megex": MEGEX,
    "dfme": DFME,
    "megex-adaptive": AdaptiveMEGEX,
    "megex-evasive": EvasiveMEGEX,
    "dfme-evasive": EvasiveDFME,
    "disguide": DisGUIDE,
    "dual-students": DualStudents,
    "ideal": Ideal,
    "disguide-maps": DisGUIDEMaps,
    "knockoff": Knockoff,
    "knockoff-maps": KnockoffMaps,
    "knockoff-maps-adaptive": AdaptiveKnockoffMaps,
    "jbda": JBDA,
    "jbda-maps": JBDAMaps,
}
# The attacks that take the attacker's images (constructed as Attack(pool, **settings)).
POOL_ATTACKS = frozenset(name for name, cls in ATTACKS.items() if issubclass(cls, PoolAttack))

__all__ = [
    "ATTACKS",
    "AdaptiveKnockoffMaps",
    "AdaptiveKnockoffMapsConfig",
    "AdaptiveMEGEX",
    "AdaptiveMEGEXConfig",
    "Attack",
    "AttackConfig",
    "DFME",
    "DFMEConfig",
    "DisGUIDE",
    "DisGUIDEConfig",
    "DisGUIDEMaps",
    "DisGUIDEMapsConfig",
    "DualStudents",
    "DualStudentsConfig",
    "EvasiveDFME",
    "EvasiveMEGEX",
    "Ideal",
    "IdealConfig",
    "JBDA",
    "JBDAConfig",
    "JBDAMaps",
    "JBDAMapsConfig",
    "Knockoff",
    "KnockoffConfig",
    "KnockoffMaps",
    "KnockoffMapsConfig",
    "MEGEX",
    "MEGEXConfig",
    "POOL_ATTACKS",
    "PoolAttack",
    "PoolAttackConfig",
    "SettingError",
    "adapt_to",
    "applicable_settings",
    "describe_settings",
    "parse_setting",
    "presets",
]
