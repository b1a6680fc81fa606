"""One way to make and save a figure: matplotlib on its file backend (no screen needed),
saved atomically. matplotlib is the 'plots' extra: it is imported on first use, and where it
is missing an ImportError reaches the writer, which reports the PNG as skipped."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .runs import save_figure_atomic

__all__ = ["save", "subplots"]


def subplots(*args: Any, **kwargs: Any) -> tuple[Any, Any]:
    """(figure, axes) as matplotlib.pyplot.subplots makes them, on the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def save(fig: Any, path: str | os.PathLike, **options: Any) -> Path:
    """Lay the figure out tightly and write it to `path` atomically (options: savefig's,
    e.g. dpi); the figure is closed."""
    fig.tight_layout()
    return save_figure_atomic(fig, path, **options)
