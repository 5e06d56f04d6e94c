"""Hessian operator (stub: being implemented)."""

from __future__ import annotations

from .linop import LinearOperator

__all__ = ["HessianOperator"]


class HessianOperator(LinearOperator):
    """Hessian of the full-data loss as a symmetric linear operator (stub)."""

    def __init__(self, *args, **kwargs) -> None:
        raise NotImplementedError
