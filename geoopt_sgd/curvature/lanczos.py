"""Lanczos eigensolver (stub: being implemented)."""

from __future__ import annotations

__all__ = ["EigenResult", "bottom_eigenpairs", "top_eigenpairs"]


class EigenResult:
    """Eigenpairs with residuals and cost (stub)."""


def top_eigenpairs(operator, k, **kwargs):
    """Compute top-k eigenpairs (stub)."""
    raise NotImplementedError


def bottom_eigenpairs(operator, k, **kwargs):
    """Compute bottom-k eigenpairs (stub)."""
    raise NotImplementedError
