"""Exactly repeated eigenvalues: found, or flagged (issue #14 §1).

``A = Q diag(l) Q^T`` (P = 400, ``Q`` random orthogonal): 30 values
``10 * r**i`` (r = 0.9, 0.98) with one of them repeated exactly, over a bulk
below half the 30th; float64 and float32. Each case is solved from 10 start
vectors (seeds 0-9) with ``top_eigenpairs(..., tol=1e-3)``:

* ``checked``: the default (``verify=True``);
* ``one copy per chain``: the same with the multiplicity rule switched off
  (no fresh direction for a group of equal values), i.e. the check before it.

A solve is *wrong* when one of its k values is more than ``tol`` (relative)
from the true one; "wrong, verified" counts those that said ``verified=True``.
Products are deterministic, so the machine's load does not change the table.

Command::

    python benchmarks/multiplicities.py            # 24 cases, about 1 min
    python benchmarks/multiplicities.py --quick    # float64, r = 0.9 only

Results: a table on stdout and ``benchmarks/results/multiplicities.json``
(``--out`` to choose).
"""

from __future__ import annotations

import argparse
import json
import os
import warnings
from typing import Any

import torch
from _common import environment

from geoopt_sgd import DenseOperator, top_eigenpairs
from geoopt_sgd.curvature import lanczos

TOL = 1e-3
P = 400
# (position of the first copy, copies, k)
CASES = ((3, 2, 5), (3, 3, 5), (3, 4, 5), (9, 3, 10), (16, 3, 20), (1, 5, 5))


def operator(first: int, copies: int, ratio: float, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    with torch.device("cpu"):  # a CPU benchmark, whatever the default device
        lam = 10 * ratio ** torch.arange(30, dtype=torch.float64)
        lam[first : first + copies - 1] = lam[first - 1]
        bulk = (
            0.5 * float(lam[-1]) * torch.rand(P - 30, generator=g, dtype=torch.float64)
        )
        lam = torch.cat([lam, bulk])
        Q, _ = torch.linalg.qr(torch.randn(P, P, generator=g, dtype=torch.float64))
    return DenseOperator(((Q * lam) @ Q.T).to(dtype)), lam.sort(descending=True).values


def solve_all(
    A: DenseOperator, ref: torch.Tensor, k: int, starts: int
) -> dict[str, Any]:
    wrong = wrong_verified = unverified = products = 0
    for seed in range(starts):
        res = top_eigenpairs(A, k, tol=TOL, seed=seed)
        bad = float(((res.eigenvalues - ref[:k]).abs() / ref[:k]).max()) > TOL
        wrong += bad
        wrong_verified += bad and res.verified
        unverified += not res.verified
        products += res.n_matvec
    return {
        "wrong": wrong,
        "wrong_verified": wrong_verified,
        "not_verified": unverified,
        "hvps": products / starts,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--starts", type=int, default=10)
    here = os.path.dirname(os.path.abspath(__file__))
    parser.add_argument(
        "--out", default=os.path.join(here, "results", "multiplicities.json")
    )
    args = parser.parse_args()
    if args.starts < 1:
        parser.error(f"--starts must be >= 1; got {args.starts}")
    dtypes = (torch.float64,) if args.quick else (torch.float64, torch.float32)
    ratios = (0.9,) if args.quick else (0.9, 0.98)
    print(
        f"{'dtype':8} {'r':>5} {'copies':>6} {'at':>3} {'k':>3}  "
        f"{'checked: wrong, wrong+verified, unverified, HVPs':50} one copy per chain"
    )
    with warnings.catch_warnings():
        # "could not verify" is counted in the table
        warnings.simplefilter("ignore", RuntimeWarning)
        rows = run(dtypes, ratios, args.starts)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(
            {"env": environment(), "starts": args.starts, "rows": rows}, f, indent=1
        )
    print(f"wrote {args.out}")


def run(
    dtypes: tuple[torch.dtype, ...], ratios: tuple[float, ...], starts: int
) -> list[dict[str, Any]]:
    """Every case, checked and with the multiplicity rule off."""
    rows = []
    rule = lanczos._may_hide_copies
    for dtype in dtypes:
        for ratio in ratios:
            for first, copies, k in CASES:
                A, ref = operator(
                    first, copies, ratio, dtype, seed=100 * copies + first
                )
                row: dict[str, Any] = {
                    "dtype": str(dtype).removeprefix("torch."),
                    "ratio": ratio,
                    "first": first,
                    "copies": copies,
                    "k": k,
                }
                lanczos._may_hide_copies = rule
                row["checked"] = solve_all(A, ref, k, starts)
                lanczos._may_hide_copies = lambda *a: None
                try:
                    row["one_copy_per_chain"] = solve_all(A, ref, k, starts)
                finally:
                    lanczos._may_hide_copies = rule
                rows.append(row)
                c, o = row["checked"], row["one_copy_per_chain"]
                print(
                    f"{row['dtype']:8} {ratio:5} {copies:6} {first:3} {k:3}  "
                    f"{c['wrong']:3} {c['wrong_verified']:3} {c['not_verified']:3} "
                    f"{c['hvps']:7.1f}{'':31}"
                    f"{o['wrong']:3} {o['wrong_verified']:3} {o['not_verified']:3} "
                    f"{o['hvps']:7.1f}"
                )
    return rows


if __name__ == "__main__":
    main()
