"""Randomised trace, diagonal and Frobenius estimators (stub: being implemented)."""

from __future__ import annotations

__all__ = [
    "Estimate",
    "hutchinson_diagonal",
    "hutchinson_trace",
    "hutchpp_trace",
    "squared_frobenius",
]


class Estimate:
    """An estimate with its standard error and cost (stub)."""


def hutchinson_trace(operator, **kwargs):
    """Estimate the trace (stub)."""
    raise NotImplementedError


def hutchpp_trace(operator, **kwargs):
    """Estimate the trace with Hutch++ (stub)."""
    raise NotImplementedError


def hutchinson_diagonal(operator, **kwargs):
    """Estimate the diagonal (stub)."""
    raise NotImplementedError


def squared_frobenius(operator, **kwargs):
    """Estimate the squared Frobenius norm (stub)."""
    raise NotImplementedError
