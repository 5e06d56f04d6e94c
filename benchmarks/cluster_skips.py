"""Skipped eigenvalues inside a tight cluster at the k-th value (issue #14 §1).

A diagonal operator (P = 1000, float64) whose spectrum holds a run of six
values spaced ``w * tol`` (relative, w = 0.5, 1, 2; tol = 1e-3) covering
lambda_{k-2} to lambda_{k+3}, ``k - 3`` values 3% apart above it, 40 values
0.5% apart below it and a bulk under 60% of those: the shape of the clustered
spectra in ``tests/curvature/test_lanczos_verify.py``, moved so that the run
straddles the k-th value (k >= 3). Each width is solved from ``--starts``
start vectors (seeds ``0 .. starts - 1``) on one bulk.

A solve counts as *skipped* when it reported convergence and one of its k
values is more than ``tol`` (relative) from the true one: a value off by more
than the tolerance asked for. At width ``tol / 2`` a single missing member of
the run shifts the returned values by only ``tol / 2`` and is not counted; at
width ``2 tol`` it is. The JSON gives the count per width.

Tools, on the same spectra and start vectors:

* ``checked``: ``top_eigenpairs(..., verify=True)`` (the default);
* ``unchecked``: ``verify=False``;
* ``eigsh``: scipy's ARPACK ``eigsh(which="LA", tol=tol)`` from a Gaussian
  ``v0`` (left out, with a note, when scipy is missing).

``name@tol`` runs a tool at a tighter tolerance (``eigsh@1e-4``,
``unchecked@3e-4``); a skip is still an error above 1e-3.

Products are deterministic, so the machine's load does not change the table.

Command::

    python benchmarks/cluster_skips.py --quick          # k = 5, 60 solves
    python benchmarks/cluster_skips.py                  # k = 3, 4, 5, 8, 10, 20
    python benchmarks/cluster_skips.py --ks 5,8 --tools checked,unchecked@3e-4

Results: a table on stdout and ``benchmarks/results/cluster_skips.json``
(``cluster_skips_quick.json`` with ``--quick``; ``--out`` to choose).
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
TOOLS = ("checked", "unchecked", "eigsh")


class Diagonal(LinearOperator):
    def __init__(self, lam: torch.Tensor):
        super().__init__(lam.numel(), lam.dtype, lam.device)
        self.lam = lam

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.lam[:, None] * V


def spectrum(k: int, width: float, P: int = 1000, seed: int = 0) -> torch.Tensor:
    """A run of six ``width * TOL`` apart over lambda_{k-2}..lambda_{k+3}."""
    if k < 3:
        raise ValueError(f"k must be >= 3 (the run covers k-2..k+3), got {k}")
    g = torch.Generator().manual_seed(100 + seed)
    n_top = k - 3
    with torch.device("cpu"):  # a CPU benchmark, whatever the default device
        top = 2.0 * 0.97 ** torch.arange(n_top, dtype=torch.float64)
        first = float(top[-1]) * 0.97 if n_top else 2.0
        run = first * (1 - width * TOL) ** torch.arange(6, dtype=torch.float64)
        rest = run[-1] * 0.99 * 0.995 ** torch.arange(40, dtype=torch.float64)
        bulk = (
            0.6
            * rest[-1]
            * torch.rand(P - n_top - 46, generator=g, dtype=torch.float64)
        )
        return torch.cat([top, run, rest, bulk])


def solve(
    tool: str, lam: torch.Tensor, k: int, start: int
) -> tuple[torch.Tensor, int, bool]:
    """The k values found, the products used and whether it claimed success."""
    name, tol = parse_tool(tool)
    if name == "eigsh":
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
        vals = eigsh(op, k, which="LA", tol=tol, v0=v0, return_eigenvectors=False)
        found = torch.from_numpy(np.sort(vals)[::-1].copy())
        return found, count[0], True
    res = top_eigenpairs(
        Diagonal(lam), k, tol=tol, seed=start, verify=name == "checked"
    )
    return res.eigenvalues, res.n_matvec, res.converged


def parse_tool(tool: str) -> tuple[str, float]:
    """``"name"`` or ``"name@tol"`` -> (name, tol); ValueError when invalid."""
    name, _, tight = tool.partition("@")
    if name not in TOOLS:
        raise ValueError(f"tool {tool!r}: the name must be one of {TOOLS}")
    try:
        tol = float(tight) if tight else TOL
    except ValueError:
        msg = f"tool {tool!r}: the tolerance after '@' must be a number"
        raise ValueError(msg) from None
    if not tol > 0:
        raise ValueError(f"tool {tool!r}: the tolerance must be > 0")
    return name, tol


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--ks", default=None, help="comma-separated k >= 3 (3,4,5,8,10,20; 5 quick)"
    )
    parser.add_argument(
        "--starts", type=int, default=None, help="start vectors per width (100; 20)"
    )
    parser.add_argument(
        "--tools",
        default="checked,unchecked,eigsh",
        help=f"comma-separated, each one of {TOOLS}, optionally name@tol",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="k = 5, 20 start vectors per width, unless --ks/--starts say otherwise",
    )
    parser.add_argument("--out", default=None, help="JSON file to write")
    args = parser.parse_args()
    if args.ks is None:
        args.ks = "5" if args.quick else "3,4,5,8,10,20"
    if args.starts is None:
        args.starts = 20 if args.quick else 100
    results = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    if args.out is None:
        name = "cluster_skips_quick.json" if args.quick else "cluster_skips.json"
        args.out = os.path.join(results, name)
    try:
        ks = [int(x) for x in args.ks.split(",")]
    except ValueError:
        parser.error(f"--ks must be comma-separated integers, got {args.ks!r}")
    if min(ks) < 3:
        parser.error(f"--ks: every k must be >= 3 (the run covers k-2..k+3), got {ks}")
    if args.starts < 1:
        parser.error(f"--starts must be >= 1, got {args.starts}")
    tools = args.tools.split(",")
    for tool in tools:
        try:
            parse_tool(tool)
        except ValueError as e:
            parser.error(f"--tools: {e}")
    try:
        import scipy  # noqa: F401
    except ImportError:
        print("scipy is not installed: the eigsh rows are left out")
        tools = [t for t in tools if not t.startswith("eigsh")]
    rows: list[dict[str, Any]] = []
    print(
        f"{'k':>3} {'tool':>16} {'solves':>7} {'skipped':>8} "
        f"{'not converged':>14} {'HVPs':>7}"
    )
    for k in ks:
        for tool in tools:
            by_width: dict[str, int] = {}
            unconverged = products = solves = 0
            for width in WIDTHS:
                lam = spectrum(k, width)
                ref = lam.sort(descending=True).values[:k]
                by_width[str(width)] = 0
                for start in range(args.starts):
                    found, n_mv, ok = solve(tool, lam, k, start)
                    err = float(((found - ref).abs() / ref).max())
                    by_width[str(width)] += ok and err > TOL
                    unconverged += not ok
                    products += n_mv
                    solves += 1
            row = dict(
                k=k,
                tool=tool,
                solves=solves,
                skipped=sum(by_width.values()),
                skipped_by_width=by_width,
                not_converged=unconverged,
                hvps=products / solves,
            )
            rows.append(row)
            print(
                f"{k:>3} {tool:>16} {solves:>7} {row['skipped']:>8} "
                f"{unconverged:>14} {row['hvps']:>7.1f}",
                flush=True,
            )
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    config = dict(ks=ks, starts=args.starts, tools=tools, quick=args.quick)
    with open(args.out, "w") as f:
        json.dump(
            {
                "config": config,
                "env": environment(),
                "tol": TOL,
                "widths": WIDTHS,
                "rows": rows,
            },
            f,
            indent=1,
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
