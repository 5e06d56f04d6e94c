"""NoiseProbe (stub: being implemented)."""

from __future__ import annotations

__all__ = ["NoiseProbe"]


class NoiseProbe:
    """Attach noise-geometry measurements to any optimizer (stub)."""
