"""Skipped eigenvalues inside a tight cluster at the k-th value (issue #14 §1).

A diagonal operator (P = 1000, float64) whose spectrum holds a run of six
values spaced ``w * tol`` (relative, w = 0.5, 1, 2) covering lambda_{k-2} to
lambda_{k+3}, ``k - 3`` values 3% apart above it, 40 values 0.5% apart below
it and a bulk under 60% of those: the shape of ``tests/curvature/
test_lanczos_verify.py``'s spectra, moved so that the run straddles the k-th
value. Each width is solved from ``--starts`` start vectors on one bulk (the
bulk barely matters: with five bulks and 20 start vectors, every skip repeated
for all five bulks with the same start vector, so those 300 solves were 60
cases). A solve *skipped* a value when it reported convergence and one of its
k values is more than ``tol`` (relative) from the true one.

Tools, on the same spectra and start-vector count:

* ``checked``: ``top_eigenpairs(..., verify=True)`` (the default);
* ``unchecked``: ``verify=False``;
* ``eigsh``: scipy's ARPACK ``eigsh(which="LA", tol=tol)`` from a Gaussian
  ``v0`` (skipped when scipy is missing).

``@tol`` after a tool's name runs it at a tighter tolerance (``eigsh@1e-4``,
``unchecked@3e-4``); a skip is still an error above 1e-3.

Products are deterministic, so the machine's load does not change the table.

Command::

    python benchmarks/cluster_skips.py --quick          # k = 5, 60 solves, ~15 s
    python benchmarks/cluster_skips.py                  # k = 3, 4, 5, 8, 10, 20
    python benchmarks/cluster_skips.py --ks 5,8 --tools checked

Results: a table on stdout and ``benchmarks/results/cluster_skips.json``.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

import torch
from _common import environment

from geoopt_sgd import LinearOperator, top_eigenpairs

TOL = 1e-3
WIDTHS = (0.5, 1.0, 2.0)


class Diagonal(LinearOperator):
    def __init__(self, lam: torch.Tensor):
        super().__init__(lam.numel(), lam.dtype, lam.device)
        self.lam = lam

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.lam[:, None] * V


def spectrum(k: int, width: float, P: int = 1000, seed: int = 0) -> torch.Tensor:
    """A run of six ``width * TOL`` apart over lambda_{k-2}..lambda_{k+3}."""
    g = torch.Generator().manual_seed(100 + seed)
    n_top = max(k - 3, 0)
    top = 2.0 * 0.97 ** torch.arange(n_top, dtype=torch.float64)
    first = float(top[-1]) * 0.97 if n_top else 2.0
    run = first * (1 - width * TOL) ** torch.arange(6, dtype=torch.float64)
    rest = run[-1] * 0.99 * 0.995 ** torch.arange(40, dtype=torch.float64)
    bulk = 0.6 * rest[-1] * torch.rand(P - n_top - 46, generator=g, dtype=torch.float64)
    return torch.cat([top, run, rest, bulk])


def solve(
    tool: str, lam: torch.Tensor, k: int, start: int
) -> tuple[torch.Tensor, int, bool]:
    """The k values found, the products used and whether it claimed success."""
    if tool.startswith("eigsh"):
        import numpy as np
        from scipy.sparse.linalg import LinearOperator as ScipyOperator
        from scipy.sparse.linalg import eigsh

        d = lam.numpy()
        count = [0]

        def matvec(x):
            count[0] += 1
            return d * x.ravel()

        op = ScipyOperator((d.size, d.size), matvec=matvec, dtype=np.float64)
        v0 = np.random.default_rng(start).standard_normal(d.size)
        tol = float(tool.split("@")[1]) if "@" in tool else TOL
        vals = eigsh(op, k, which="LA", tol=tol, v0=v0, return_eigenvectors=False)
        found = torch.from_numpy(np.sort(vals)[::-1].copy())
        return found, count[0], True
    name, _, tight = tool.partition("@")
    tol = float(tight) if tight else TOL
    res = top_eigenpairs(
        Diagonal(lam), k, tol=tol, seed=start, verify=name == "checked"
    )
    return res.eigenvalues, res.n_matvec, res.converged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ks", default="3,4,5,8,10,20", help="comma-separated k")
    parser.add_argument(
        "--starts", type=int, default=100, help="start vectors per width"
    )
    parser.add_argument("--tools", default="checked,unchecked,eigsh")
    parser.add_argument(
        "--quick", action="store_true", help="k = 5, 20 start vectors per width"
    )
    parser.add_argument(
        "--out", default=os.path.join(os.path.dirname(__file__), "results")
    )
    args = parser.parse_args()
    if args.quick:
        args.ks, args.starts = "5", 20
    tools = args.tools.split(",")
    try:
        import scipy  # noqa: F401
    except ImportError:
        tools = [t for t in tools if not t.startswith("eigsh")]
    rows: list[dict[str, Any]] = []
    print(
        f"{'k':>3} {'tool':>10} {'solves':>7} {'skipped':>8} "
        f"{'not converged':>14} {'HVPs':>7}"
    )
    for k in (int(x) for x in args.ks.split(",")):
        for tool in tools:
            skipped = unconverged = products = solves = 0
            for width in WIDTHS:
                lam = spectrum(k, width)
                ref = lam.sort(descending=True).values[:k]
                for start in range(args.starts):
                    found, n_mv, ok = solve(tool, lam, k, start)
                    err = float(((found - ref).abs() / ref).max())
                    skipped += ok and err > TOL
                    unconverged += not ok
                    products += n_mv
                    solves += 1
            row = dict(
                k=k,
                tool=tool,
                solves=solves,
                skipped=skipped,
                not_converged=unconverged,
                hvps=products / solves,
            )
            rows.append(row)
            print(
                f"{k:>3} {tool:>10} {solves:>7} {skipped:>8} {unconverged:>14} "
                f"{row['hvps']:>7.1f}",
                flush=True,
            )
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "cluster_skips.json")
    with open(path, "w") as f:
        json.dump(
            {"env": environment(), "tol": TOL, "widths": WIDTHS, "rows": rows},
            f,
            indent=1,
        )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
