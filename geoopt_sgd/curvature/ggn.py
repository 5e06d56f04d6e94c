"""Generalised Gauss-Newton operator (stub: being implemented)."""

from __future__ import annotations

from .linop import LinearOperator

__all__ = ["GGNOperator"]


class GGNOperator(LinearOperator):
    """Generalised Gauss-Newton matrix as a linear operator (stub)."""

    def __init__(self, *args, **kwargs) -> None:
        raise NotImplementedError
