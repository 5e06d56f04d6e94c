"""Spectral density by stochastic Lanczos quadrature (stub: being implemented)."""

from __future__ import annotations

__all__ = ["SpectralDensity", "spectral_density"]


class SpectralDensity:
    """A smoothed spectral density on a grid (stub)."""


def spectral_density(operator, **kwargs):
    """Estimate the spectral density (stub)."""
    raise NotImplementedError
