"""ProbedSGD (stub: being implemented)."""

from __future__ import annotations

import torch

__all__ = ["ProbedSGD"]


class ProbedSGD(torch.optim.Optimizer):
    """torch.optim.SGD plus a noise-geometry probe (stub)."""
