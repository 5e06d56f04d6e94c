"""Inner products of ``P``-long vectors accumulated in float64, in one place.

Float32 reductions over millions of entries lose digits (a float32 norm of an
11M-entry vector came out ~4e-4 too small on CPU), which shows up as biased
eigenvalues and traces. Every inner product, Gram matrix and norm of
parameter-sized vectors in the package goes through these helpers: blocks of
:data:`CHUNK` entries are reduced in the input dtype and the block results are
summed in float64. Float64 inputs are reduced directly where the layout allows.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["CHUNK", "coldot64", "gram64", "row_gram64", "rowdot64"]

#: Entries per block of a chunked float64-accumulated reduction.
CHUNK = 1 << 15


def coldot64(X: Tensor, Y: Tensor) -> Tensor:
    """Return the column-wise inner products ``sum_i X[i, c] Y[i, c]`` in float64.

    Args:
        X: ``(P, c)`` block.
        Y: ``(P, c)`` block.

    Returns:
        ``(c,)`` float64 tensor on ``X``'s device.
    """
    out = torch.zeros(X.shape[-1], dtype=torch.float64, device=X.device)
    for s in range(0, X.shape[0], CHUNK):
        out += (X[s : s + CHUNK].double() * Y[s : s + CHUNK].double()).sum(0)
    return out


def gram64(A: Tensor, B: Tensor) -> Tensor:
    """Return ``A^T B`` for ``(P, a)`` and ``(P, b)`` blocks, ``(a, b)`` float64."""
    if A.dtype == torch.float64:
        return A.T @ B
    out = torch.zeros(A.shape[1], B.shape[1], dtype=torch.float64, device=A.device)
    for s in range(0, A.shape[0], CHUNK):
        out += (A[s : s + CHUNK].T @ B[s : s + CHUNK]).double()
    return out


def rowdot64(Vt: Tensor, w: Tensor) -> Tensor:
    """Return ``Vt @ w`` for ``(j, P)`` rows and a ``(P,)`` vector, ``(j,)`` float64."""
    if Vt.dtype == torch.float64:
        return Vt @ w
    out = torch.zeros(Vt.shape[0], dtype=torch.float64, device=w.device)
    for s in range(0, w.shape[0], CHUNK):
        out += (Vt[:, s : s + CHUNK] @ w[s : s + CHUNK]).double()
    return out


def row_gram64(rows: Sequence[Tensor]) -> Tensor:
    """Return ``Y Y^T`` for the row blocks ``Y = [rows]`` (each ``(q_j, P)``), float64.

    The blocks are never concatenated along ``P`` (no ``(m, P)`` copy), only
    column slices of :data:`CHUNK` entries at a time.
    """
    if rows[0].dtype == torch.float64:
        Y = torch.cat(list(rows), 0)
        return Y @ Y.T
    m = sum(r.shape[0] for r in rows)
    out = torch.zeros(m, m, dtype=torch.float64, device=rows[0].device)
    for s in range(0, rows[0].shape[1], CHUNK):
        Ys = torch.cat([r[:, s : s + CHUNK] for r in rows], 0)
        out += (Ys @ Ys.T).double()
    return out
