"""Dense gradient-covariance and metric references (being implemented)."""

__all__: list[str] = []
