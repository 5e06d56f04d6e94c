"""Curvature: Hessian/GGN operators, Lanczos, trace/Frobenius/density estimators."""

from .density import SpectralDensity, spectral_density
from .ggn import GGNOperator
from .hessian import HessianOperator
from .lanczos import EigenResult, bottom_eigenpairs, top_eigenpairs
from .linop import DenseOperator, LinearOperator
from .sharpness import SharpnessReport, expected_sharpness, sharpness
from .trace import (
    Estimate,
    hutchinson_diagonal,
    hutchinson_trace,
    hutchpp_trace,
    squared_frobenius,
)

__all__ = [
    "DenseOperator",
    "EigenResult",
    "Estimate",
    "GGNOperator",
    "HessianOperator",
    "LinearOperator",
    "SharpnessReport",
    "SpectralDensity",
    "bottom_eigenpairs",
    "expected_sharpness",
    "hutchinson_diagonal",
    "hutchinson_trace",
    "hutchpp_trace",
    "sharpness",
    "spectral_density",
    "squared_frobenius",
    "top_eigenpairs",
]
