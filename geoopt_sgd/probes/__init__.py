"""Probes: per-sample gradients and the papers' noise-geometry metrics."""

from .metrics import NoiseGeometry, noise_geometry
from .per_sample import per_sample_gradients
from .recorder import NoiseProbe

__all__ = ["NoiseGeometry", "NoiseProbe", "noise_geometry", "per_sample_gradients"]
