"""Per-sample gradients (stub: being implemented)."""

from __future__ import annotations

__all__ = ["per_sample_gradients"]


def per_sample_gradients(model, loss_fn, inputs, targets, **kwargs):
    """Compute per-sample gradients (stub)."""
    raise NotImplementedError
