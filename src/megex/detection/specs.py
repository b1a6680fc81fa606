"""A monitor from its spec (``megex serve --monitor``): 'name' or 'name:setting=value,...',
or a calibration file's settings and threshold."""

from __future__ import annotations

from .base import Monitor
from .calibration import Calibration
from .registry import MONITORS

__all__ = ["build_monitor"]


def build_monitor(spec: str) -> Monitor:
    """A monitor from 'name' or 'name:param=value,...', e.g. 'prada', 'prada:threshold=0.92',
    'ood:threshold=0.4,window=200,score=entropy' or 'ood:calibration=FILE' (a file written by
    :meth:`Calibration.save`, whose settings and threshold it takes). Values are read by the
    settings' fields; ValueError names the monitor, the setting and what was expected."""
    name, _, rest = spec.partition(":")
    name = name.strip()
    if name not in MONITORS:
        raise ValueError(f"monitor: unknown {name!r}; expected one of {', '.join(MONITORS)}")
    cls = MONITORS[name]
    given = _spec_values(name, rest)
    allowed = ["threshold", "calibration", *cls.PARAMS]
    unknown = [k for k in given if k not in allowed]
    if unknown:
        raise ValueError(
            f"monitor {name!r}: unknown parameter {unknown[0]!r}; expected one of "
            f"{', '.join(allowed)}"
        )
    if "calibration" not in given:
        return cls(**given)  # the constructor reads each text by its setting's check
    others = sorted(set(given) - {"calibration"})
    if others:
        raise ValueError(
            f"monitor {name!r}: calibration=FILE sets the threshold and the settings it "
            f"was calibrated with; drop {', '.join(others)}"
        )
    calibration = Calibration.load(given["calibration"])
    if calibration.monitor != name:
        raise ValueError(
            f"monitor {name!r}: {given['calibration']} calibrates monitor {calibration.monitor!r}"
        )
    return calibration.build()


def _spec_values(name: str, rest: str) -> dict[str, str]:
    """The texts of a spec's 'param=value' pairs (what follows 'name:'), by name."""
    given: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in rest.split(","))):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"monitor {name!r}: expected param=value, got {part!r}")
        if key in given:
            raise ValueError(f"monitor {name!r}: {key} given twice")
        given[key] = value.strip()
    return given
