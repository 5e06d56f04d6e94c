"""Optimizers: ProbedSGD, NoisyGD and the cyclical-learning-rate wrapper."""

from .cyclic import CyclicLRWrapper, cyclic_lr
from .noisy_gd import NoisyGD
from .probed_sgd import ProbedSGD
from .registry import register_timm_optimizers

__all__ = [
    "CyclicLRWrapper",
    "NoisyGD",
    "ProbedSGD",
    "cyclic_lr",
    "register_timm_optimizers",
]
