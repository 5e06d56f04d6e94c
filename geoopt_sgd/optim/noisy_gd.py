"""NoisyGD (stub: being implemented)."""

from __future__ import annotations

import torch

__all__ = ["NoisyGD"]


class NoisyGD(torch.optim.Optimizer):
    """Gradient descent with injected noise (stub)."""
