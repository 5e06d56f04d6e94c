"""geoopt_sgd: the geometry of SGD noise for PyTorch.

Curvature operators and eigensolvers, the noise-geometry metrics of Wu, Wang & Su
(2022), Wang & Wu (2023), Zhu et al. (2019) and Zhang, Yang & Tu, gradient descent
with injected noise, probes for live training runs, and cyclical learning rates.
"""

from ._losses import HalfSquaredError
from .curvature import (
    DenseOperator,
    EigenResult,
    Estimate,
    GGNOperator,
    HessianOperator,
    LinearOperator,
    SharpnessReport,
    SpectralDensity,
    bottom_eigenpairs,
    expected_sharpness,
    hutchinson_diagonal,
    hutchinson_trace,
    hutchpp_trace,
    sharpness,
    spectral_density,
    squared_frobenius,
    top_eigenpairs,
)
from .optim import (
    CyclicLRWrapper,
    NoisyGD,
    ProbedSGD,
    cyclic_lr,
    register_timm_optimizers,
)
from .probes import NoiseGeometry, NoiseProbe, noise_geometry, per_sample_gradients
from .probes.metrics import DEFAULT_METRICS, METRICS

__version__ = "0.1.0"

__all__ = [
    "__version__",
    # curvature operators
    "LinearOperator",
    "DenseOperator",
    "HessianOperator",
    "GGNOperator",
    # eigensolvers
    "EigenResult",
    "top_eigenpairs",
    "bottom_eigenpairs",
    # estimators
    "Estimate",
    "hutchinson_trace",
    "hutchpp_trace",
    "hutchinson_diagonal",
    "squared_frobenius",
    "SpectralDensity",
    "spectral_density",
    # sharpness
    "SharpnessReport",
    "expected_sharpness",
    "sharpness",
    # probes
    "per_sample_gradients",
    "NoiseGeometry",
    "noise_geometry",
    "NoiseProbe",
    "METRICS",
    "DEFAULT_METRICS",
    # losses
    "HalfSquaredError",
    # optimizers
    "ProbedSGD",
    "NoisyGD",
    "CyclicLRWrapper",
    "cyclic_lr",
    "register_timm_optimizers",
]
