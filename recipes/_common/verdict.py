"""Verdict rows: does a measured value meet the paper's threshold?"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

__all__ = ["claim", "strict_max", "strict_min", "verdict_table"]

_OPS = {
    ">=": lambda v, t: v >= t,
    ">": lambda v, t: v > t,
    "<=": lambda v, t: v <= t,
    "<": lambda v, t: v < t,
}


def claim(
    claim: str,
    value: float | None,
    op: str,
    threshold: float,
    *,
    source: str = "",
    note: str = "",
) -> dict[str, Any]:
    """Return one verdict row: does ``value op threshold`` hold?

    A missing or non-finite value fails.

    Args:
        claim: The paper's claim in words (e.g. "GD escapes along u_1").
        value: The measured value.
        op: One of ``">="``, ``">"``, ``"<="``, ``"<"``.
        threshold: The threshold (from the paper, or our choice).
        source: Where the claim and threshold come from: the paper (authors, year,
            arXiv id, figure or theorem), or "ours (docs/recipes/<recipe>.md)"
            where the threshold is our choice.
        note: Anything a reader needs (e.g. which arm, which k).

    Returns:
        ``{"claim", "value", "op", "threshold", "passed", "source", "note"}``.

    Raises:
        ValueError: If ``op`` is unknown.
    """
    if op not in _OPS:
        raise ValueError(
            f"`op` must be one of {', '.join(map(repr, _OPS))}; got {op!r}."
        )
    v = None if value is None else float(value)
    ok = v is not None and math.isfinite(v) and bool(_OPS[op](v, float(threshold)))
    return {
        "claim": claim,
        "value": v,
        "op": op,
        "threshold": float(threshold),
        "passed": ok,
        "source": source,
        "note": note,
    }


def strict_min(values: Iterable[float]) -> float:
    """The minimum, NaN when there is none or any value is not finite.

    Python's ``min`` skips a NaN that is not first, so a row taking the worst
    of several statistics would pass over a failed one.
    """
    vals = [float(v) for v in values]
    return min(vals) if vals and all(map(math.isfinite, vals)) else math.nan


def strict_max(values: Iterable[float]) -> float:
    """The maximum, NaN when there is none or any value is not finite."""
    vals = [float(v) for v in values]
    return max(vals) if vals and all(map(math.isfinite, vals)) else math.nan


def verdict_table(rows: Iterable[dict[str, Any]]) -> str:
    """Format verdict rows as a Markdown table (for the terminal and README)."""
    lines = ["| claim | value | threshold | pass |", "|---|---|---|---|"]
    for r in rows:
        v = "n/a" if r["value"] is None else f"{r['value']:.4g}"
        lines.append(
            f"| {r['claim']} | {v} | {r['op']} {r['threshold']:.4g} | "
            f"{'PASS' if r['passed'] else 'FAIL'} |"
        )
    return "\n".join(lines)
