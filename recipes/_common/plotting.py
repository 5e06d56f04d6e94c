"""Figures: Matplotlib on the Agg backend, saved atomically."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .files import atomic_write

__all__ = ["pyplot", "save_figure"]


def pyplot() -> Any:
    """Return :mod:`matplotlib.pyplot` on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    plt.rcParams.update(
        {"figure.dpi": 110, "savefig.bbox": "tight", "axes.grid": True, "font.size": 9}
    )
    return plt


def save_figure(fig: Any, path: str | os.PathLike) -> Path:
    """Save a Matplotlib figure as PNG atomically (temp file + rename) and close it.

    An interrupted run never leaves a truncated PNG behind: readers see the old
    figure or the new one.
    """
    import matplotlib.pyplot as plt

    path = Path(path)
    try:
        atomic_write(path, lambda fh: fig.savefig(fh, format="png"))
    finally:
        plt.close(fig)
    return path
