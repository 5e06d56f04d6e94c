"""Noise-geometry metrics (stub: being implemented)."""

from __future__ import annotations

__all__ = ["NoiseGeometry", "noise_geometry"]


class NoiseGeometry:
    """Result of :func:`noise_geometry` (stub)."""


def noise_geometry(model, loss_fn, data, **kwargs):
    """Compute the noise-geometry metrics (stub)."""
    raise NotImplementedError
