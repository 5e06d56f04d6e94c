"""Small statistics in torch for the noise-geometry metrics (no scipy needed)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "fro",
    "haar",
    "jackknife",
    "linregress",
    "random_directions",
    "rank",
    "spearman",
]


def linregress(x: Tensor, y: Tensor) -> tuple[float, float]:
    """Least-squares slope of ``y`` on ``x`` and ``R^2`` (NaN when undefined)."""
    xm, ym = x - x.mean(), y - y.mean()
    sxx, syy, sxy = (xm * xm).sum(), (ym * ym).sum(), (xm * ym).sum()
    if x.numel() < 2 or float(sxx) == 0.0:
        return math.nan, math.nan
    r2 = float(sxy * sxy / (sxx * syy)) if float(syy) > 0 else math.nan
    return float(sxy / sxx), r2


def rank(x: Tensor) -> Tensor:
    """Ranks with ties averaged (as ``scipy.stats.rankdata``)."""
    order = torch.argsort(x)
    xs = x[order]
    ranks = torch.empty_like(x)
    i, n = 0, x.numel()
    while i < n:
        j = i
        while j + 1 < n and xs[j + 1] == xs[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def spearman(x: Tensor, y: Tensor) -> float:
    """Spearman rank correlation (Pearson correlation of the ranks)."""
    if x.numel() < 2:
        return math.nan
    rx, ry = rank(x) - (x.numel() + 1) / 2, rank(y) - (y.numel() + 1) / 2
    den = float(((rx * rx).sum() * (ry * ry).sum()).sqrt())
    return float((rx * ry).sum()) / den if den > 0 else math.nan


def fro(A: Tensor) -> Tensor:
    """Frobenius norm ``||A||_F``."""
    return (A * A).sum().sqrt()


def haar(k: int, draws: int, gen: torch.Generator) -> list[Tensor]:
    """Haar-distributed orthogonal ``(k, k)`` matrices (QR of Gaussians, sign-fixed)."""
    out = []
    for _ in range(draws):
        Q, R = torch.linalg.qr(
            torch.randn(k, k, generator=gen, dtype=torch.float64, device="cpu")
        )
        out.append(Q * torch.sign(torch.diagonal(R)).unsqueeze(0))
    return out


def random_directions(
    P: int, r: int, gen: torch.Generator, dtype: torch.dtype = torch.float64
) -> Tensor:
    """``r`` unit Gaussian directions ``(P, r)`` on the CPU, drawn column by column."""
    R = torch.empty(P, r, dtype=dtype, device="cpu")
    for j in range(r):
        v = torch.randn(P, generator=gen, dtype=dtype, device="cpu")
        R[:, j] = v / v.double().norm().to(dtype)
    return R


def jackknife(replicates: list[dict[str, float]]) -> dict[str, float]:
    """Jackknife standard errors from the ``s`` leave-one-out replicates."""
    s = len(replicates)
    out = {}
    for key in replicates[0]:
        v = torch.tensor(
            [r[key] for r in replicates], dtype=torch.float64, device="cpu"
        )
        se = ((s - 1) / s * ((v - v.mean()) ** 2).sum()).sqrt()
        out[key] = float(se) if bool(torch.isfinite(se)) else math.nan
    return out
