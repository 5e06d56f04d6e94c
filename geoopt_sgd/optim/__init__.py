"""Optimizers: ProbedSGD, NoisyGD and the cyclical-learning-rate wrapper."""

from .cyclic import CyclicLRWrapper, cyclic_lr
from .noisy_gd import NoisyGD
from .probed_sgd import ProbedSGD

__all__ = ["CyclicLRWrapper", "NoisyGD", "ProbedSGD", "cyclic_lr"]
