"""Monitors by name."""

from __future__ import annotations

from .base import Monitor
from .ood import OODMonitor
from .prada import PradaMonitor

__all__ = ["MONITORS"]

MONITORS: dict[str, type[Monitor]] = {"prada": PradaMonitor, "ood": OODMonitor}
