"""Cyclical learning rates (stub: being implemented)."""

from __future__ import annotations

import torch

__all__ = ["CyclicLRWrapper", "cyclic_lr"]


def cyclic_lr(step, base_lr, max_lr, step_size_up, **kwargs):
    """Return the cyclical learning rate at ``step`` (stub)."""
    raise NotImplementedError


class CyclicLRWrapper(torch.optim.Optimizer):
    """Cyclical learning rate for any optimizer (stub)."""
