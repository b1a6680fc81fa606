"""How the trade-off names its rows and attackers."""

from __future__ import annotations

import re

__all__ = ["ADAPTIVE", "row_name", "slug"]

ADAPTIVE = "+adaptive"


def row_name(specs: list[str]) -> str:
    return "+".join(specs) if specs else "none"


def slug(specs: list[str]) -> str:
    return re.sub(r"[^A-Za-z0-9.=-]+", "_", row_name(specs))
