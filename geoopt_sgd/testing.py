"""Dense float64 reference implementations, for tests, doctests and users' checks.

Everything here forms explicit matrices and is meant for small models
(P up to a few thousand).
"""

from __future__ import annotations

__all__: list[str] = []
