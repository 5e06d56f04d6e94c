"""Dense Hessian and GGN references (being implemented)."""

__all__: list[str] = []
