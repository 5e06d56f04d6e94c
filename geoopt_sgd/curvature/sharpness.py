"""Sharpness measures (stub: being implemented)."""

from __future__ import annotations

__all__ = ["SharpnessReport", "expected_sharpness", "sharpness"]


class SharpnessReport:
    """All sharpness measures of one point (stub)."""


def expected_sharpness(model, loss_fn, data, **kwargs):
    """Estimate expected sharpness (stub)."""
    raise NotImplementedError


def sharpness(model, loss_fn, data, **kwargs):
    """Compute all sharpness measures (stub)."""
    raise NotImplementedError
